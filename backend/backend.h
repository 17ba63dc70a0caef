// The compute backend interface (Backend v2): device memory, a stream, events, graph capture and
// the operations of a Llama forward pass.
//
// One interface, two implementations: CpuBackend (computes in fp32 with OpenBLAS; the reference
// every CUDA kernel is checked against) and CudaBackend (kernels/ + cuBLASLt, BF16 serving). All data pointers handed to ops are device pointers of this
// backend (host memory for the CPU backend) unless a field says "host".
//
// Execution model (designed for CUDA, trivially true on the CPU):
// - A backend owns ONE stream (stream_handle(): a cudaStream_t as void*, a non-blocking stream,
//   never the legacy default stream; nullptr on the CPU). Every op and copy is enqueued on it in
//   call order and returns once enqueued; kernel errors may surface at a later call or at
//   Synchronize(). The NCCL communicator of the rank must be created on this stream
//   (CreateNcclCommunicator(..., backend->stream_handle(), ...)) so collectives order with ops.
// - Synchronize() waits for everything enqueued so far. Events mark a point in the stream:
//   RecordEvent() then SynchronizeEvent() (host waits) or StreamWaitEvent() (a later stream of
//   another backend waits, e.g. a copy stream).
// - Graphs: BeginCapture() .. ops .. EndCapture() records the ops instead of running them (CUDA
//   graph capture of the stream); ReplayGraph() re-runs them with the same device addresses. So
//   every buffer a captured op reads (ids, positions, slot mappings, block tables, the attention
//   plan's workspace) must live at a fixed address and be refreshed in place before a replay.
//   The CPU backend does not capture (SupportsGraphs() false): BeginCapture and EndCapture are
//   no-ops returning an empty graph, and ops run eagerly.
// - A Backend is used by one thread at a time (the worker's engine thread).
//
// Dtypes: tensors carry their dtype (Tensor2D::dtype, KvLayer::dtype); the interface is generic
// over F32, BF16 and F16 activations, weights and KV caches. A backend rejects a combination it
// does not implement with Unimplemented naming the op and the dtype ("cpu backend: Matmul: weight
// dtype BF16 not implemented"). The CPU backend implements F32 only, except its KV cache, which
// may also be BF16 or quantized (KvLayer::quant): F32 activations rounded on write.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "backend/sampling.h"
#include "common/dtype.h"
#include "kernels/kv_quant.h"
#include "kvstore/host_kv_pool.h"
#include "kvstore/kv_block_manager.h"
#include "kvstore/kv_spec.h"

namespace lorc {
namespace kvpolicy {
class SequenceKvPolicy;  // kvpolicy/sequence_policy.h
struct SlotMove;
struct LowRepack;
struct KvPolicyConfig;   // kvpolicy/kv_policy_config.h
}  // namespace kvpolicy

// Token-level KV policy of one attention call (kvpolicy/, issue #17; backends with
// SupportsKvPolicy()). `seqs`: per sequence of the plan's batch (num_seqs, batch order) its
// state or null (no policy for that sequence); null `seqs`: no policy at all. Attention then
// reads only the slots the state keeps (kDead skipped, kLow read from its low-precision entry),
// takes the causal order over the kept keys (a step's own tokens are always kept), writes
// last_hit for every key a query gives probability >= 1/t (t: the keys that query attends),
// and after the step's attention of each (sequence, KV head) applies the policy's choice
// (SequenceKvPolicy::Apply). The paged cache itself is never written. With device-resident states
// (Backend::KvPolicyOnDevice) the choice runs in KvPolicyEndStep instead, once per step.
struct KvPolicyAttention {
  kvpolicy::SequenceKvPolicy* const* seqs = nullptr;
  int32_t layer = 0;  // the model layer (index into the policy's layers)
};

// One KV head's cache entry moving between two slots of the paged cache (Backend::CompactKvHeads).
struct KvHeadMove {
  int32_t layer = 0;
  int32_t head = 0;  // KV head of this rank's shard
  int64_t src = 0;   // cache slots: block id x block_size + offset
  int64_t dst = 0;
};

// MiKV's low-precision entries of one (layer, KV head) written as one packed run by a
// compaction (Backend::CompactKvHeads; kvpolicy/README.md "Low entries in the paged cache";
// entry format and run layout: kvpolicy/low_precision.h, widths = the layer's per-head widths,
// slot regions of KvHeadSlotBytes bytes).
struct KvLowRun {
  int32_t layer = 0;
  int32_t head = 0;              // KV head of this rank's shard
  std::vector<int64_t> old_slots;  // cache slots of the run before it, in run order (may be empty)
  std::vector<int64_t> new_slots;  // cache slots of the new run, in run order
  // Per entry of the new run, in order: an entry of the old run (>= 0), or -1 - the cache slot of
  // a full-precision entry to quantize (keys times `balance`).
  std::vector<int64_t> sources;
  const float* balance = nullptr;  // host memory, the layer's per-head K width; null: none
};

// A sequence's compaction (kvpolicy::SequenceKvPolicy::Compact's moves and MiKV repacks, in the
// sequence's slots) in cache slots through its block table `table` (block_size slots a block):
// what Backend::CompactKvHeads takes, keys' runs balanced by `st`'s factors.
struct KvCacheCompaction {
  std::vector<KvHeadMove> moves;
  std::vector<KvLowRun> runs;
};
KvCacheCompaction ToCacheCompaction(const kvpolicy::SequenceKvPolicy& st, absl::Span<const kvpolicy::SlotMove> moves,
                                    absl::Span<const kvpolicy::LowRepack> low, const int32_t* table,
                                    int32_t block_size);

class Backend;

// Where an allocation lives: device memory, or page-locked host memory (AllocateHost).
enum class MemoryKind : uint8_t { kDevice, kPinnedHost };

// Move-only owner of a device (or pinned host) allocation.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(Backend* owner, void* data, size_t bytes, MemoryKind kind = MemoryKind::kDevice)
      : owner_(owner), data_(data), bytes_(bytes), kind_(kind) {}
  ~DeviceBuffer() { Reset(); }
  DeviceBuffer(DeviceBuffer&& o) noexcept { *this = std::move(o); }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  void* data() const { return data_; }
  template <typename T> T* as() const { return static_cast<T*>(data_); }
  size_t bytes() const { return bytes_; }
  MemoryKind kind() const { return kind_; }
  bool empty() const { return data_ == nullptr; }
  void Reset();

 private:
  Backend* owner_ = nullptr;
  void* data_ = nullptr;
  size_t bytes_ = 0;
  MemoryKind kind_ = MemoryKind::kDevice;
};

// A row-major 2-D view: `rows` x `cols` elements of `dtype`, consecutive rows `ld` elements apart.
struct Tensor2D {
  void* data = nullptr;
  DType dtype = DType::kF32;
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t ld = 0;  // leading dimension (elements); 0 means cols

  int64_t stride() const { return ld ? ld : cols; }
  template <typename T> T* as() const { return static_cast<T*>(data); }
  // Columns [c0, c0 + n) of this view (same rows, same stride).
  Tensor2D ColSlice(int64_t c0, int64_t n) const;
  // Rows [r0, r0 + n).
  Tensor2D RowSlice(int64_t r0, int64_t n) const;
};

// One layer's paged cache (layout in kvstore/kv_spec.h).
struct KvLayer {
  void* k = nullptr;  // [num_blocks][block_size][k_width], `dtype`
  void* v = nullptr;  // [num_blocks][block_size][v_width], `dtype`
  int64_t k_width = 0;
  int64_t v_width = 0;
  DType dtype = DType::kF32;
  // Quantized storage (--kv-cache-dtype fp8 / int8 / int4; kernels/kv_quant.h): each block of k
  // (v) holds block_size code rows then block_size fp16 scale rows, scale groups per KV head of
  // k_width / num_kv_heads (v_width / num_kv_heads) values; `dtype` is then U8. kNone: the
  // element layout above and num_kv_heads / block_size unused.
  kernels::KvQuant quant = kernels::KvQuant::kNone;
  int32_t num_kv_heads = 0;
  int32_t block_size = 0;
};

// Bytes of one block of a layer's K (v_side false) or V (v_side true) array: block_size x width x
// the dtype's size, or for a quantized cache the block's codes and scales (kvstore/kv_spec.h,
// kernels::KvqBlockBytes). What CopyBlocks and the host tier move per block, layer and side.
int64_t KvLayerBlockBytes(const KvLayer& layer, bool v_side, int32_t block_size);
// Bytes of one KV head's region of one slot of K (v_side false) or V: its width x the dtype's
// size, or a quantized cache's codes (KvqHeadCodeBytes; the scales are not part of it). What a
// packed run of MiKV low entries uses per slot (KvLowRun). Needs num_kv_heads > 0.
int64_t KvHeadSlotBytes(const KvLayer& layer, bool v_side);

// The host tier's memory on one worker (issue #10; the bookkeeping is kvstore/host_kv_pool.h):
// `num_slots` slots, each the exact bytes of one KV block of every layer (layer 0's K block, its
// V block, layer 1's K block, ...; quantized blocks with their scales), slot after slot, in
// memory from Backend::AllocateHost (pinned on CUDA, so copies are asynchronous DMA). Made by
// Backend::CreateHostKvStorage for one cache geometry; moved by OffloadKvBlocks / LoadKvBlocks.
class HostKvStorage {
 public:
  HostKvStorage() = default;
  int32_t num_slots() const { return num_slots_; }
  int64_t slot_bytes() const { return slot_bytes_; }
  // Slot s's bytes (host memory). Read or write them only when no copy is in flight
  // (Backend::SynchronizeKvTransfers): tests, debugging.
  uint8_t* slot(int32_t s) const { return memory_.as<uint8_t>() + s * slot_bytes_; }
  // Byte offset of layer l's K block (V block: k_offset(l) + k_bytes(l)) inside a slot.
  int64_t k_offset(int l) const { return offsets_[l]; }
  int64_t k_bytes(int l) const { return k_bytes_[l]; }
  int64_t v_bytes(int l) const { return v_bytes_[l]; }
  int num_layers() const { return static_cast<int>(offsets_.size()); }

 private:
  friend class Backend;
  DeviceBuffer memory_;
  int32_t num_slots_ = 0;
  int64_t slot_bytes_ = 0;
  std::vector<int64_t> offsets_, k_bytes_, v_bytes_;
};

// --- attention: a per-step plan and a per-layer run -------------------------------------------
//
// The flattened batch of one step. Sequence s contributes query rows [query_start[s],
// query_start[s+1]) of q; after this step it has seq_lens[s] tokens in the cache (its new tokens
// included: seq_lens = num_computed_tokens + new tokens), so its query row i sits at position
// seq_lens[s] - q_len + i and attends to positions [0, that position]. A sequence with q_len 1
// is a decode; any other is a prefill (a whole prompt or a chunk on top of a cached prefix).
// The device arrays are read by the per-layer run (they must keep their contents and addresses
// until the step's last attention call has run); the host mirrors are read by PlanAttention only.
struct AttentionBatch {
  int32_t num_seqs = 0;
  int32_t num_tokens = 0;          // total query rows = query_start[num_seqs]
  int32_t max_seq_len = 0;         // max over seq_lens
  int32_t max_blocks_per_seq = 0;  // row stride of block_tables
  int32_t block_size = 0;          // tokens per block
  const int32_t* query_start = nullptr;   // device, [num_seqs + 1], non-decreasing, starts at 0
  const int32_t* seq_lens = nullptr;      // device, [num_seqs]
  const int32_t* block_tables = nullptr;  // device, [num_seqs][max_blocks_per_seq]
  const int32_t* host_query_start = nullptr;  // host mirror of query_start
  const int32_t* host_seq_lens = nullptr;     // host mirror of seq_lens
};

// Capacity of an attention plan, fixed when it is created (start-up), so its workspace never
// moves: PlanAttention rejects a batch beyond it with InvalidArgument.
struct AttentionLimits {
  int32_t max_num_seqs = 0;
  int32_t max_num_batched_tokens = 0;
  int32_t max_blocks_per_seq = 0;
};

// Per-step host metadata turned into a schedule, plus the backend's fixed-address workspace that
// the per-layer runs read (CUDA: work lists and split-KV chunking, FlashInfer-style). Created
// once by CreateAttentionPlan; refilled by PlanAttention every step; read by DecodeAttention and
// PrefillAttention for every layer of that step.
class AttentionPlan {
 public:
  virtual ~AttentionPlan() = default;
  // The batch the plan was last made for (device pointers valid as documented above).
  const AttentionBatch& batch() const { return batch_; }
  int32_t num_decodes() const { return num_decodes_; }    // sequences with q_len == 1
  int32_t num_prefills() const { return num_prefills_; }  // the others with q_len > 0

 protected:
  AttentionBatch batch_;
  int32_t num_decodes_ = 0;
  int32_t num_prefills_ = 0;
};

struct AttentionParams {
  Tensor2D q;          // [num_tokens, num_heads * head_dim], RoPE applied
  Tensor2D out;        // [num_tokens, num_heads * head_dim]; rows of the other path untouched
  KvLayer cache;       // this layer's cache, the step's K/V already written
  int32_t num_heads = 0;     // query heads (on this rank)
  int32_t num_kv_heads = 0;  // KV heads (on this rank); divides num_heads
  int32_t head_dim = 0;
  float scale = 1.0f;        // softmax scale, usually 1/sqrt(head_dim)
  KvPolicyAttention kv_policy;  // none by default
};

struct RopeParams {
  Tensor2D x;                  // [num_tokens, num_heads * head_dim], rotated in place
  int32_t num_heads = 0;
  int32_t head_dim = 0;
  const int32_t* positions = nullptr;  // [num_tokens], device
  const float* inv_freq = nullptr;     // [head_dim / 2], device, fp32
};

// RoPE on q and k (Hugging Face rotate_half convention, fp32 angles) fused with the write of the
// rotated k and of v into one layer's cache at slot_mapping. q is rotated in place; k is rotated
// in place too (callers must not rely on either way). A slot of -1 skips that token's write
// (padding rows of a replayed graph).
// With rotate_k false (LoRC latent layers, kvstore KvRope::kAtAttention) only q is rotated; k
// holds the key latents [num_tokens, cache.k_width] (num_kv_heads * r_k), written unrotated
// (LatentAttention rotates the reconstructed keys).
struct RopeKvWriteParams {
  Tensor2D q;  // [num_tokens, num_heads * head_dim]
  Tensor2D k;  // [num_tokens, cache.k_width]: num_kv_heads * head_dim, or latents (rotate_k false)
  Tensor2D v;  // [num_tokens, cache.v_width]
  KvLayer cache;
  int32_t num_heads = 0;
  int32_t num_kv_heads = 0;
  int32_t head_dim = 0;
  const int32_t* positions = nullptr;     // [num_tokens], device
  const float* inv_freq = nullptr;        // [head_dim / 2], device, fp32
  const int32_t* slot_mapping = nullptr;  // [num_tokens], device, flat slot or -1
  // false: LoRC latents (compress/FORMAT.md): q rotated, k stored as given (rotated at attention).
  bool rotate_k = true;
};

// The input of Backend::NormMatmulRopeKvWrite / NormMatmulSiluMul: the residual stream before a
// projection, its sub-layer's output to add, and the RMSNorm that feeds the projection.
struct NormedInput {
  Tensor2D residual;  // [T, H]: the stream
  Tensor2D add;       // [T, H], or data == nullptr: nothing added (the stream is residual as is)
  Tensor2D next;      // [T, H]: where residual + add is stored (with add); may alias residual
                      // unless the backend FusesNormMatmul(T)
  Tensor2D weight;    // [1, H]: the RMSNorm weight
  float eps = 1e-6f;
  Tensor2D normed;    // [T, H] scratch of the unfused path: RMSNorm(stream) * weight
  // The folded form (Backend::FoldedNormRows; no add; weight all ones, the model's norm weight
  // folded into w by ScaleColumns): partial sums of squares of residual's rows, fp32 [T, ceil(H /
  // 16)] as MatmulAdd writes them. A backend may take each row's 1 / rms from them and skip the
  // norm (the CUDA GEMV); the unfused path ignores them. Null: none.
  const float* sum_squares = nullptr;
};

// OK, or InvalidArgument "<op>: NormedInput.<field> <shape, dtype, pitch> (want ...)": residual
// set; weight [1, H]; normed and add like residual; with add, `next` either residual itself or
// another dense buffer like it (residual dense too) overlapping neither residual nor add.
absl::Status CheckNormedInput(const char* op, const NormedInput& in);

// Attention over LoRC latents (compress/FORMAT.md) for one layer. The cache holds, per token
// and KV head g, the unrotated key latent c_K (r_k values at columns [g*r_k, (g+1)*r_k)) and value
// latent c_V (r_v values at [g*r_v, (g+1)*r_v)). For every sequence of the plan (decode and
// prefill alike: paged through block_tables, chunks attend to the cached context) and KV head g,
// the key of the token at position t is k_t = B_K,g c_K,t (B_K,g = k_up rows [g*head_dim,
// (g+1)*head_dim)), rotated at position t with the same RoPE as RopeKvWrite (inv_freq, fp32
// angles, rotate_half); each query head j of g's group (j / (num_heads / num_kv_heads) == g)
// takes the causal softmax of scale * q_j . k_t and writes sum_t p_t c_V,t (r_v wide) to out
// columns [j*v_rank, (j+1)*v_rank). The output projection then reads those r_v-wide rows.
// InvalidArgument for shapes that do not match the ranks; CPU: F32 q/k_up/out (exact fp32
// reference), the cache F32, BF16 or quantized (latents dequantized per KV head);
// CUDA: BF16 (the cache BF16 or quantized), head_dim 128, group 1/2/4/8/16, ranks multiples of 8
// (Unimplemented otherwise).
struct LatentAttentionParams {
  Tensor2D q;     // [num_tokens, num_heads * head_dim], RoPE applied
  Tensor2D k_up;  // [num_kv_heads * head_dim, k_rank]
  Tensor2D out;   // [num_tokens, num_heads * v_rank]
  KvLayer cache;  // k_width = num_kv_heads * k_rank, v_width = num_kv_heads * v_rank
  int32_t num_heads = 0;     // query heads (on this rank)
  int32_t num_kv_heads = 0;  // KV heads (on this rank); divides num_heads
  int32_t head_dim = 0;
  int32_t k_rank = 0;        // r_k, 1..head_dim
  int32_t v_rank = 0;        // r_v, 1..head_dim
  float scale = 1.0f;        // softmax scale, 1/sqrt(head_dim)
  const float* inv_freq = nullptr;  // [head_dim / 2], device, fp32 (the runner's, scaling applied)
  KvPolicyAttention kv_policy;      // none by default (latent widths: r_k / r_v per KV head)
};

// Seeded weight initialisation (`--random-weights`) of one block, computed where the buffer
// lives (no host staging). The block is rows [row0, row0 + out.rows) x columns [col0, col0 +
// out.cols) of a full row-major tensor with `full_cols` columns, so the tensor-parallel slices of
// one tensor get the values of the same full tensor.
struct WeightFillParams {
  Tensor2D out;           // [rows, cols], written; its dtype is the stored type (see FillWeights)
  bool constant = false;  // true: every element = `value` (norm weights); the fields below unused
  float value = 0.0f;
  uint64_t key = 0;       // the tensor's key: kernels::WeightInitKey(seed, hash of its name)
  int64_t row0 = 0;       // first row / column of the block in the full tensor, >= 0
  int64_t col0 = 0;
  int64_t full_cols = 0;  // columns of the full tensor, >= col0 + out.cols
  float scale = 0.0f;     // values uniform on [-scale, scale)
};

// Free and total memory of the backend's device, in bytes (CPU: MemAvailable and MemTotal of
// /proc/meminfo within this process's cgroup memory limit, backend/host_memory.h; sysconf where
// those are missing).
struct MemoryInfo {
  int64_t free_bytes = 0;
  int64_t total_bytes = 0;
};

// A captured graph (CUDA: a cudaGraphExec_t). Empty on backends that do not capture.
class Graph {
 public:
  virtual ~Graph() = default;
};

// A point in the backend's stream (CUDA: a cudaEvent_t).
class Event {
 public:
  virtual ~Event() = default;
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual const char* name() const = 0;
  // A one-line description of the device ("cpu: fp32, OpenBLAS ...", "NVIDIA H200 ...").
  virtual std::string Describe() const = 0;
  // The dtype the model runner keeps weights, activations and the KV cache in on this backend
  // (logits are always F32): F32 on the CPU, BF16 on CUDA.
  virtual DType compute_dtype() const { return DType::kF32; }

  // --- stream, events, graphs -------------------------------------------------------------------
  // The native stream (cudaStream_t as void*); nullptr on the CPU. Lives as long as the backend.
  virtual void* stream_handle() const = 0;
  // Waits for all enqueued work; reports asynchronous errors.
  virtual absl::Status Synchronize() = 0;
  virtual absl::StatusOr<std::unique_ptr<Event>> CreateEvent() = 0;
  // Marks the current end of the stream.
  virtual absl::Status RecordEvent(Event& event) = 0;
  // Host waits until the work before the event's last record has completed.
  virtual absl::Status SynchronizeEvent(Event& event) = 0;
  // Later work on this backend's stream waits for `event` (recorded on any stream of the device).
  virtual absl::Status StreamWaitEvent(Event& event) = 0;
  virtual bool SupportsGraphs() const = 0;
  // Whether enqueued work runs while the host goes on (CUDA: yes; the CPU backend runs every op
  // inside its call). Launch-ahead (StepExecutor) gains only where it does.
  virtual bool RunsAsynchronously() const { return false; }
  // Whether Matmul picks its algorithm by timing candidates at the first call of a shape bucket
  // (CUDA: per power-of-two bucket of the token count, timed at the token count of that first
  // call). The model runner then runs its start-up warm-up (ModelRunner, MatmulWarmUpSizes) so
  // that every bucket is timed at the largest token count a step of it can have.
  virtual bool TimesMatmulAtFirstUse() const { return false; }
  // Starts recording this stream's ops into a graph (FailedPrecondition when already capturing).
  // While capturing, nothing may synchronize and no memory may be allocated or freed.
  virtual absl::Status BeginCapture() = 0;
  // Ends the capture; the graph re-runs the recorded ops at the same addresses. CPU: an empty graph.
  virtual absl::StatusOr<std::unique_ptr<Graph>> EndCapture() = 0;
  // Enqueues a replay (no-op for an empty graph).
  virtual absl::Status ReplayGraph(const Graph& graph) = 0;

  // --- memory -----------------------------------------------------------------------------------
  // Device memory; ResourceExhausted when it does not fit.
  virtual absl::StatusOr<DeviceBuffer> Allocate(size_t bytes) = 0;
  // Page-locked host memory (CUDA: cudaMallocHost; CPU: ordinary memory), for staging copies that
  // are truly asynchronous.
  virtual absl::StatusOr<DeviceBuffer> AllocateHost(size_t bytes) = 0;
  virtual MemoryInfo GetMemoryInfo() const = 0;
  // Host -> device, enqueued on the stream. Lifetime of `src`:
  // - pageable host memory: the backend has consumed (staged) it when the call returns; the caller
  //   may reuse it at once;
  // - pinned memory from AllocateHost: the copy reads `src` asynchronously; the caller must not
  //   modify it until the stream has passed the copy (an event recorded after it, or Synchronize()).
  virtual absl::Status CopyToDevice(void* dst, const void* src, size_t bytes) = 0;
  // Device -> host, enqueued on the stream. `dst` holds the data only after the stream has passed
  // the copy (Synchronize() or an event recorded after it); for pageable `dst` the CUDA backend may
  // block until then. The source must not be overwritten by later ops before that point, which
  // stream order guarantees for ops enqueued on this backend.
  virtual absl::Status CopyToHost(void* dst, const void* src, size_t bytes) = 0;
  // Device -> device on the stream.
  virtual absl::Status CopyOnDevice(void* dst, const void* src, size_t bytes) = 0;
  virtual absl::Status Memset(void* dst, int value, size_t bytes) = 0;

  // --- ops (all shapes in elements) -------------------------------------------------------------
  // out[i, :] = table[ids[i], :]. Ids are trusted (validated before the step).
  virtual absl::Status Embedding(const Tensor2D& table, const int32_t* ids, Tensor2D out) = 0;
  // out[i, :] = x[i, :] / sqrt(mean(x[i, :]^2) + eps) * weight[0, :]. `out` may alias `x`.
  virtual absl::Status RmsNorm(const Tensor2D& x, const Tensor2D& weight, float eps,
                                Tensor2D out) = 0;
  // Fused residual add + RMSNorm: residual += x, then out = RmsNorm(residual) * weight.
  // residual, x, out: [T, H]; weight [1, H]. `out` may alias `x` (not `residual`).
  virtual absl::Status FusedAddRmsNorm(Tensor2D residual, const Tensor2D& x, const Tensor2D& weight,
                                       float eps, Tensor2D out) = 0;
  // out = x * w^T for x [T, K], w [N, K] (a Hugging Face nn.Linear weight), out [T, N].
  // InvalidArgument on a shape mismatch. w must not be written by the backend op just before
  // this one (the CUDA GEMV reads it before its programmatic-dependent-launch wait,
  // kernels/pdl.cuh); weights never are.
  virtual absl::Status Matmul(const Tensor2D& x, const Tensor2D& w, Tensor2D out) = 0;
  // acc += x, elementwise.
  virtual absl::Status AddInPlace(Tensor2D acc, const Tensor2D& x) = 0;
  // out[:, j] = silu(gate_up[:, j]) * gate_up[:, I + j] for gate_up [T, 2I], out [T, I].
  virtual absl::Status SiluMul(const Tensor2D& gate_up, Tensor2D out) = 0;
  // Rotary embedding, Hugging Face "rotate_half" convention (pairs i and i + head_dim/2).
  virtual absl::Status Rope(const RopeParams& p) = 0;
  // Writes k [T, k_width] and v [T, v_width] rows into the cache at flat slot indices (-1: skip).
  virtual absl::Status WriteKv(const KvLayer& cache, const Tensor2D& k, const Tensor2D& v,
                               const int32_t* slot_mapping) = 0;
  // Rope on q and k + WriteKv in one op (see RopeKvWriteParams).
  virtual absl::Status RopeKvWrite(const RopeKvWriteParams& p) = 0;
  // The QKV projection and RopeKvWrite: Matmul(x, w, out), then RopeKvWrite(p), where p.q, p.k
  // and p.v are views of out's columns. This default runs the two ops; the CUDA backend fuses
  // them into one GEMV for decode-sized batches over a BF16 cache (backend/README.md).
  virtual absl::Status MatmulRopeKvWrite(const Tensor2D& x, const Tensor2D& w, Tensor2D out,
                                         const RopeKvWriteParams& p) {
    absl::Status s = Matmul(x, w, out);
    return s.ok() ? RopeKvWrite(p) : s;
  }
  // The MLP's gate_up projection and SiluMul: gate_up = x * w^T ([T, 2I], w's rows [gate | up]),
  // then act = SiluMul(gate_up) ([T, I]). This default runs the two ops; the CUDA backend fuses
  // them into one GEMV for decode-sized batches where Matmul picks the GEMV's configuration the
  // fused kernel shares (act then bit for bit the two ops') or where the fused kernel timed
  // faster than the two ops (backend/README.md). gate_up is scratch: a fused call does not write
  // it, the call that times the choice may. Errors: Matmul's and SiluMul's.
  virtual absl::Status MatmulSiluMul(const Tensor2D& x, const Tensor2D& w, Tensor2D gate_up, Tensor2D act) {
    absl::Status s = Matmul(x, w, gate_up);
    return s.ok() ? SiluMul(gate_up, act) : s;
  }
  // The residual add after a projection: acc += x * w^T (acc [T, N]), the product rounded to acc's
  // dtype first: the bits of Matmul(x, w, scratch) then AddInPlace(acc, scratch), scratch [T, N]
  // of acc's dtype. This default runs the two ops (scratch written); the CUDA backend makes it
  // one GEMV where Matmul's timed choice for (x, w, scratch) is a GEMV configuration (scratch
  // then untouched; the runner's decode steps at TP = 1 with the norms fused or folded,
  // backend/README.md). sum_squares (or null): also SumSquaresPartials of the updated acc.
  // InvalidArgument when acc and scratch differ in shape or dtype; else Matmul's, AddInPlace's
  // and SumSquaresPartials's errors.
  virtual absl::Status MatmulAdd(const Tensor2D& x, const Tensor2D& w, Tensor2D acc, Tensor2D scratch,
                                 float* sum_squares = nullptr);
  // out[t, p] = the sum of x[t, c]^2 over columns c in [16p, min(16p + 16, cols)), fp32 [T,
  // ceil(cols / 16)] dense (kernels/rms_norm.cuh LaunchSumSquaresPartials): what a folded-norm
  // projection reduces to its rows' rms (NormedInput::sum_squares). BF16 x on CUDA; this default
  // is Unimplemented (the CPU folds nothing).
  virtual absl::Status SumSquaresPartials(const Tensor2D& x, float* out);
  // w[r, c] *= g[0, c] (one rounding): an RMSNorm weight g [1, cols] folded into the projection w
  // [rows, cols] after it, at load (ModelRunner; FoldedNormRows). Default Unimplemented.
  virtual absl::Status ScaleColumns(Tensor2D w, const Tensor2D& g);
  // Decode steps of at most this many tokens may take the folded norms (0: none, the default):
  // the runner then folds the input and post-attention RMSNorm weights into the qkv and gate_up
  // projections at load, runs every norm before them with a unit weight, and at one rank passes
  // MatmulAdd's partial sums of squares to the projections (NormedInput::sum_squares).
  virtual int64_t FoldedNormRows() const { return 0; }
  // The residual stream's (add +) RMSNorm fused into the projection after it. Decode-sized steps
  // on the CUDA backend run each as one GEMV whose input is the normalized stream
  // (kernels/gemv.cuh LaunchGemvNorm: the 1 / rms scale applied to the fp32 sums, so the
  // projection differs from the unfused ops' by bf16 rounding order; the stream is bit for bit the
  // same). Where FusesNormMatmul(T) is true the caller passes `next` != `residual` (the kernel
  // reads the stream while it stores the sum); elsewhere `next` may alias `residual`.
  // NormMatmulRopeKvWrite: MatmulRopeKvWrite(RMSNorm(next) * weight, w, out, p).
  // NormMatmulSiluMul: gate_up = RMSNorm(next) * weight * w^T, act = SiluMul(gate_up); the fused
  // path writes act only (gate_up untouched).
  // InvalidArgument naming the op and the operand when the NormedInput's shapes, dtypes or
  // pitches disagree, or `next` (when another buffer than `residual`) overlaps residual or add
  // or is not dense; nothing is written then. The projections' own errors are those of the ops
  // they replace.
  virtual bool FusesNormMatmul(int64_t tokens) const {
    (void)tokens;
    return false;
  }
  virtual absl::Status NormMatmulRopeKvWrite(const NormedInput& in, const Tensor2D& w, Tensor2D out,
                                             const RopeKvWriteParams& p);
  virtual absl::Status NormMatmulSiluMul(const NormedInput& in, const Tensor2D& w, Tensor2D gate_up, Tensor2D act);

  // Attention plan: allocated once (its workspace never moves), refilled each step.
  virtual absl::StatusOr<std::unique_ptr<AttentionPlan>> CreateAttentionPlan(
      const AttentionLimits& limits) = 0;
  // Once per step, before the first layer: host work over batch's host mirrors (decode/prefill
  // split, work partitioning), written into the plan's workspace. InvalidArgument when the batch
  // exceeds the plan's limits or its host metadata is inconsistent.
  virtual absl::Status PlanAttention(const AttentionBatch& batch, AttentionPlan& plan) = 0;
  // Per layer: causal attention over the paged cache for the plan's decode sequences (q_len 1) /
  // prefill sequences (q_len > 1). Each writes only its own sequences' rows of p.out; a step runs
  // both (either may have no sequences).
  virtual absl::Status DecodeAttention(const AttentionParams& p, const AttentionPlan& plan) = 0;
  virtual absl::Status PrefillAttention(const AttentionParams& p, const AttentionPlan& plan) = 0;

  // Whether KV caches with quant != kNone (--kv-cache-dtype fp8 / int8 / int4) are written and
  // read here: the model runner refuses them at load otherwise (Unimplemented naming the flag).
  virtual bool SupportsQuantizedKvCache() const { return false; }
  // Whether LatentAttention (and RopeKvWrite with rotate_k false) run here: the model runner
  // refuses a LoRC model at load otherwise (Unimplemented naming the backend).
  virtual bool SupportsLatentAttention() const { return false; }
  // Whether attention honours AttentionParams / LatentAttentionParams::kv_policy (CPU; CUDA within
  // CheckKvPolicy's limits). The model runner refuses --kv-policy otherwise.
  virtual bool SupportsKvPolicy() const { return false; }
  // Whether this backend runs `config` over a cache of `kv_cache_dtype` (`latent`: some layer is a
  // LoRC latent layer; `query_group`: query heads per KV head): Unimplemented naming the flag it
  // cannot run. Called at load.
  virtual absl::Status CheckKvPolicy(const kvpolicy::KvPolicyConfig& config, KvCacheDtype kv_cache_dtype,
                                     bool latent, int32_t query_group) const {
    return SupportsKvPolicy() ? absl::OkStatus()
                              : absl::UnimplementedError(absl::StrCat(name(), " backend: no token-level KV policies"));
  }

  // --- device-resident KV policy states (kvpolicy/sequence_policy.h; CUDA) -----------------------
  // When true the model runner makes its KvPolicyStore device-resident and, per step with a
  // policy, calls KvPolicyBeginStep after PlanAttention and KvPolicyStore::Prepare (`seqs`: the
  // plan's batch order), the attention calls, then KvPolicyEndStep after the forward pass;
  // compactions go through KvPolicyCompact. Attention then reads the device arrays, and the
  // states' host arrays stay empty.
  virtual bool KvPolicyOnDevice() const { return false; }
  // Device memory of device-resident KV policy states (KvPolicyOnDevice backends; the model
  // runner takes it out of the KV budget, kvpolicy/state_memory.h):
  //  bytes_per_position: one position of one sequence over `rows` (layers x this rank's KV heads)
  //    (arrays[rows][capacity], capacity = kvpolicy::DeviceStateCapacity of its positions);
  //    (`mikv_latent`: MiKV over LoRC latent layers, whose states map packed entries to positions);
  //  reserve_bytes: set aside besides, for at most `max_num_seqs` states of at most
  //    `max_model_len` positions: each state's allocation rounding and (MiKV, `mikv_head_dim` > 0)
  //    per-head arrays, the old arrays of a state while it grows, and the steps' scratch.
  // Zeros on backends that keep the states in host memory.
  struct KvPolicyStateMemory {
    int64_t bytes_per_position = 0;
    int64_t reserve_bytes = 0;
  };
  virtual KvPolicyStateMemory KvPolicyMemory(int64_t rows, int64_t mikv_head_dim, bool mikv_latent,
                                             int64_t max_model_len, int64_t max_num_seqs) const {
    return {};
  }
  // Makes or grows each state's device arrays to its seq_len (new positions kFull, last_hit = the
  // position, slot = position - slot_offset), and prepares the step's attention over `plan`
  // (which may be re-planned: prompts of states that have chosen are read through the slot map,
  // not by the plain paged kernels). ResourceExhausted when the device has no memory for them.
  virtual absl::Status KvPolicyBeginStep(absl::Span<kvpolicy::SequenceKvPolicy* const> seqs,
                                         AttentionPlan& plan) {
    return absl::UnimplementedError(absl::StrCat(name(), " backend: device-resident KV policies"));
  }
  // After the forward pass: the policy's choice for every state with choose() (CORM: victims
  // kDead), then each state's counts (SequenceKvPolicy::SetDeviceCounts, from CompactFrom of the
  // plan's block_size); synchronizes the stream.
  virtual absl::Status KvPolicyEndStep(absl::Span<kvpolicy::SequenceKvPolicy* const> seqs) {
    return absl::UnimplementedError(absl::StrCat(name(), " backend: device-resident KV policies"));
  }
  // Compaction of one state from slot `from` (SequenceKvPolicy::Compact's moves, run on the
  // device): `block_table` (host) is the sequence's table before it. The caller checks the
  // slots first (SequenceKvPolicy::CheckCompaction) and then marks the state compacted
  // (MarkCompacted): here the state still holds its slots from before.
  virtual absl::Status KvPolicyCompact(kvpolicy::SequenceKvPolicy& seq, absl::Span<const KvLayer> layers,
                                       int32_t block_size, absl::Span<const int32_t> block_table,
                                       int64_t from) {
    return absl::UnimplementedError(absl::StrCat(name(), " backend: device-resident KV policies"));
  }
  // Per layer, for a LoRC layer: latent attention for every sequence of the plan, decode and
  // prefill (see LatentAttentionParams).
  virtual absl::Status LatentAttention(const LatentAttentionParams& p, const AttentionPlan& plan) = 0;

  // out[i, :] = x[rows[i], :].
  virtual absl::Status GatherRows(const Tensor2D& x, const int32_t* rows, Tensor2D out) = 0;
  // For every (src, dst) pair (host memory) and every layer of `layers`, copies all block_size
  // token slots of block src to block dst, K and V, in one call (copy-on-write; later the host
  // tier). Pairs apply in order; InvalidArgument for a block id outside [0, num_blocks).
  virtual absl::Status CopyBlocks(absl::Span<const KvLayer> layers, int32_t block_size,
                                  int32_t num_blocks, absl::Span<const BlockCopy> copies) = 0;

  // Token-level KV policies' compaction (kvpolicy/, StepPlan::kv_compactions), in three phases:
  // every entry of every `low` run is read first (an old run's entry, or a full slot quantized
  // to `low_bits` 4 or 2: kvpolicy::EncodeLowEntry), then each of `moves` runs in order (KV head
  // `head`'s K and V entries of layer `layer` copied from cache slot src to dst, slot = block id x
  // block_size + offset; quantized caches: the head's codes and scales), then each run is written
  // to its new slots. So a move may overwrite an old run or a demoted key's slot. InvalidArgument
  // naming the first move or run with a layer, head, slot or entry out of range (a run's new slots
  // too few for its entries, a source past its old run), before anything is read or copied.
  // Unimplemented on backends without SupportsKvPolicy().
  virtual absl::Status CompactKvHeads(absl::Span<const KvLayer> layers, int32_t block_size,
                                      int32_t num_blocks, absl::Span<const KvHeadMove> moves,
                                      absl::Span<const KvLowRun> low, int low_bits) {
    return absl::UnimplementedError(absl::StrCat(name(), " backend: CompactKvHeads (KV policies) not implemented"));
  }

  // --- host KV tier (issue #10; StepPlan::kv_offloads / kv_loads) ------------------------------
  // Host memory for `num_slots` blocks of `layers` (block_size tokens each; see HostKvStorage).
  // InvalidArgument for num_slots <= 0 or block_size <= 0; ResourceExhausted when the memory is
  // not there. Call at start-up (pinned allocations can wait on the device).
  absl::StatusOr<HostKvStorage> CreateHostKvStorage(absl::Span<const KvLayer> layers,
                                                    int32_t block_size, int32_t num_slots);
  // Copies device block `block` -> host slot `slot` (offload) / slot -> block (load) for every
  // pair and every layer of `layers` (the layers `host` was made for), K and V, the block's exact
  // bytes. Pairs apply in order. InvalidArgument naming the pair (ValidateHostBlockCopies) before
  // anything is copied. Ordering (CUDA: a copy stream of the backend, one batched copy per call):
  //  - the copies start after all work enqueued on the compute stream before the call (so an
  //    offload reads what the forward passes wrote) and run in call order among themselves (so a
  //    load after an offload of the same slot reads the new bytes);
  //  - the compute stream does NOT wait for them: call WaitKvTransfers() before the first compute
  //    op that reads a loaded block or overwrites an offloaded one (until then they overlap);
  //  - SynchronizeKvTransfers() waits on the host (before reading a slot on the host, freeing
  //    the storage, or ending a step).
  // CPU: memcpy on the calling thread; the waits are no-ops.
  virtual absl::Status OffloadKvBlocks(absl::Span<const KvLayer> layers, int32_t block_size,
                                       int32_t num_blocks, HostKvStorage& host,
                                       absl::Span<const HostBlockCopy> copies) = 0;
  virtual absl::Status LoadKvBlocks(absl::Span<const KvLayer> layers, int32_t block_size,
                                    int32_t num_blocks, const HostKvStorage& host,
                                    absl::Span<const HostBlockCopy> copies) = 0;
  // Later work on the compute stream waits for every Offload/LoadKvBlocks call so far.
  virtual absl::Status WaitKvTransfers() { return absl::OkStatus(); }
  // The host waits for every Offload/LoadKvBlocks call so far; reports their errors.
  virtual absl::Status SynchronizeKvTransfers() { return absl::OkStatus(); }

  // Weight initialisation: out[r, c] = kernels::UniformWeightValue(key, (row0 + r) * full_cols +
  // col0 + c, scale) (kernels/random_init.h: the same fp32 value on every backend), or `value`
  // when p.constant, stored as out.dtype (BF16: rounded to nearest even, as F32ToBf16).
  // InvalidArgument for negative sizes or offsets, col0 + cols > full_cols, an index beyond
  // int64 or ld < cols (ValidateWeightFill); Unimplemented for a dtype the backend does not
  // store (CPU: F32 only; CUDA: F32 and BF16).
  virtual absl::Status FillWeights(const WeightFillParams& p) = 0;

  // Sampling (backend/sampling.h gives the contract and the CPU reference): for each of `rows`,
  // reading row rows[i].logits_row of `logits` [n, vocab] F32 (device memory, not modified; read
  // in the stream's order, so a forward pass still running when the call starts is waited for), the
  // token, whether the row's raw logits hold a NaN or an infinity (out->non_finite) and, for rows
  // with logprobs >= 0, its raw log-probability, rank and top-N alternatives, into `out` (host
  // memory, resized to rows.size() rows, valid when the call returns OK, unspecified after an
  // error). Several rows may read the same logits row (parallel sampling). InvalidArgument for a
  // logits_row outside [0, n) or a logprobs value outside [-1, kMaxLogprobs].
  virtual absl::Status Sample(const Tensor2D& logits, absl::Span<const SamplingRow> rows,
                              SampleOutput* out) = 0;
  // Sample in two halves, so that the next step's forward pass can be enqueued before the host
  // has the tokens (StepExecutor's launch-ahead; vLLM's async scheduling, ENGINE.md 1.3).
  // BeginSample: Sample's checks and errors, the draw enqueued; *drawn_tokens (backend memory,
  // int32 [rows.size()], row i's token) holds the tokens in the stream's order from then until the
  // next BeginSample or Sample. FinishSample: waits for the draw and fills `out` as Sample does;
  // one FinishSample per successful BeginSample, before the next BeginSample or Sample
  // (FailedPrecondition otherwise). A backend may complete the draw inside BeginSample (the CPU
  // backend does; the CUDA backend enqueues draws without prefix rows, completes the others).
  virtual absl::Status BeginSample(const Tensor2D& logits, absl::Span<const SamplingRow> rows,
                                   const int32_t** drawn_tokens) = 0;
  virtual absl::Status FinishSample(SampleOutput* out) = 0;
  // Input ids taken from an enqueued draw (launch-ahead): ids[pairs[2 i]] = drawn[pairs[2 i + 1]]
  // for i in [0, n), an id outside [0, vocab) taken as 0 (a draw from logits with a NaN or an
  // infinity, whose request fails when the draw is finished). ids, drawn and pairs: backend
  // memory, int32; pairs trusted (the runner builds them). In the stream's order.
  virtual absl::Status TakeDrawnTokens(int32_t* ids, const int32_t* drawn, const int32_t* pairs, int32_t n,
                                       int32_t vocab) = 0;

 protected:
  friend class DeviceBuffer;
  virtual void Free(void* data, MemoryKind kind) = 0;
};

// The backends. Their names ("cpu", "cuda") are what --backend takes and Backend::name() returns;
// BackendKindName is the one place they are spelled.
enum class BackendKind { kCpu, kCuda };
constexpr const char* BackendKindName(BackendKind kind) {
  return kind == BackendKind::kCuda ? "cuda" : "cpu";
}
// A backend name, case-insensitive. InvalidArgument naming `s` for any other string.
absl::StatusOr<BackendKind> ParseBackendKind(absl::string_view s);
// Whether `name` (a --backend value or a Backend::name()) names `kind`, as ParseBackendKind
// reads it; false for a name that is no backend's.
bool IsBackendKind(absl::string_view name, BackendKind kind);

struct BackendOptions {
  BackendKind kind = BackendKind::kCpu;
  int device = 0;   // CUDA device ordinal
  int threads = 0;  // CPU: BLAS threads (0 = library default)
  // Backend::FusesNormMatmul(T) for T <= this (0: never). -1: the backend's default (CUDA:
  // GetCudaFusedNormRows() of backend/cuda_gemv.h, off: measured slower; CPU: 0). On the CPU a
  // positive value only routes the stream through the base class's copy into `next` (no speed-up):
  // for tests of the callers' stream bookkeeping.
  int64_t fused_norm_rows = -1;
};

// Creates a backend. CUDA: Unimplemented when built without CUDA, Unavailable without a driver,
// FailedPrecondition for a device ordinal that is not present.
absl::StatusOr<std::unique_ptr<Backend>> CreateBackend(const BackendOptions& options);

// "cpu backend: <op>: <what> dtype <DT> not implemented" as Unimplemented unless t.dtype is F32.
absl::Status RequireF32(const char* backend, const char* op, const char* what, DType dtype);

// InvalidArgument naming the first copy with a block outside [0, num_blocks) ("block copy i: src
// block b outside the cache of n blocks"); what every backend's CopyBlocks checks before copying
// anything.
absl::Status ValidateBlockCopies(absl::Span<const BlockCopy> copies, int32_t num_blocks);

// InvalidArgument naming the first pair with a block outside [0, num_blocks) or a slot outside
// [0, num_slots) ("<what> 3: slot 70 outside the host KV pool of 64 slots"; `what` names the
// list, e.g. "kv_loads"); what OffloadKvBlocks / LoadKvBlocks check before copying anything.
absl::Status ValidateHostBlockCopies(const char* what, absl::Span<const HostBlockCopy> copies,
                                     int32_t num_blocks, int32_t num_slots);

// ValidateHostBlockCopies plus the geometry: `host` was made for `layers` and `block_size` (same
// layer count and block bytes), else InvalidArgument "<backend> backend: <what>: ...".
absl::Status ValidateKvTransfer(const char* backend, const char* what,
                                absl::Span<const KvLayer> layers, int32_t block_size,
                                int32_t num_blocks, const HostKvStorage& host,
                                absl::Span<const HostBlockCopy> copies);

// For backends: the memcpy segments of Offload/LoadKvBlocks (to_host: device -> host), one per
// pair, layer and side in that order, appended to dsts / srcs / sizes. Assumes valid pairs.
struct KvTransferSegments {
  std::vector<void*> dsts;
  std::vector<const void*> srcs;
  std::vector<size_t> sizes;
};
void AppendKvTransferSegments(absl::Span<const KvLayer> layers, const HostKvStorage& host,
                              absl::Span<const HostBlockCopy> copies, bool to_host,
                              KvTransferSegments* out);

// The InvalidArgument checks of FillWeights ("<backend> backend: FillWeights: ..." naming the
// field), shared by every backend.
absl::Status ValidateWeightFill(const char* backend, const WeightFillParams& p);

}  // namespace lorc
