// The compute backend interface: device memory and the operations of a Llama forward pass.
//
// One interface, two implementations: CpuBackend (fp32, OpenBLAS; the reference every CUDA
// kernel is checked against) and CudaBackend (kernels/ + cuBLAS; reports Unimplemented when the
// build has no CUDA). All pointers handed to ops are device pointers of this backend (host memory
// for the CPU backend). Ops may run asynchronously on the backend's stream; Synchronize() waits.
// A Backend is used by one thread at a time (the worker's engine thread).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include "absl/strings/string_view.h"
#include <utility>

#include "absl/status/statusor.h"
#include "common/dtype.h"

namespace lorc {

class Backend;

// Move-only owner of a device allocation.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(Backend* owner, void* data, size_t bytes) : owner_(owner), data_(data), bytes_(bytes) {}
  ~DeviceBuffer() { Reset(); }
  DeviceBuffer(DeviceBuffer&& o) noexcept { *this = std::move(o); }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  void* data() const { return data_; }
  template <typename T> T* as() const { return static_cast<T*>(data_); }
  size_t bytes() const { return bytes_; }
  bool empty() const { return data_ == nullptr; }
  void Reset();

 private:
  Backend* owner_ = nullptr;
  void* data_ = nullptr;
  size_t bytes_ = 0;
};

// A row-major 2-D view: `rows` x `cols` elements, consecutive rows `ld` elements apart.
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

// The flattened batch of one forward step, as the attention op sees it. All arrays are device
// memory. Sequence s contributes query rows [query_start[s], query_start[s+1]) of q; after this
// step it has context_len[s] tokens in the cache (its new tokens included), so its query row i
// sits at position context_len[s] - q_len + i and attends to positions [0, that position].
struct AttentionBatch {
  int32_t num_seqs = 0;
  int32_t num_tokens = 0;            // total query rows
  int32_t max_context_len = 0;       // max over context_len (host-side hint for kernels)
  const int32_t* query_start = nullptr;   // [num_seqs + 1]
  const int32_t* context_len = nullptr;   // [num_seqs]
  const int32_t* block_tables = nullptr;  // [num_seqs][max_blocks_per_seq]
  int32_t max_blocks_per_seq = 0;
  int32_t block_size = 0;
};

// One layer's paged cache (layout in kvstore/kv_spec.h).
struct KvLayer {
  void* k = nullptr;  // [num_blocks][block_size][k_width]
  void* v = nullptr;  // [num_blocks][block_size][v_width]
  int64_t k_width = 0;
  int64_t v_width = 0;
  DType dtype = DType::kF32;
};

struct AttentionParams {
  Tensor2D q;          // [num_tokens, num_heads * head_dim], RoPE applied
  Tensor2D out;        // [num_tokens, num_heads * head_dim]
  KvLayer cache;
  AttentionBatch batch;
  int32_t num_heads = 0;     // query heads (on this rank)
  int32_t num_kv_heads = 0;  // KV heads (on this rank)
  int32_t head_dim = 0;
  float scale = 1.0f;
};

struct RopeParams {
  Tensor2D x;                  // [num_tokens, num_heads * head_dim], rotated in place
  int32_t num_heads = 0;
  int32_t head_dim = 0;
  const int32_t* positions = nullptr;  // [num_tokens], device
  const float* inv_freq = nullptr;     // [head_dim / 2], device
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual const char* name() const = 0;
  // A one-line description of the device ("cpu: 2 threads, OpenBLAS ...", "NVIDIA H200 ...").
  virtual std::string Describe() const = 0;

  // --- memory -------------------------------------------------------------------------------
  virtual absl::StatusOr<DeviceBuffer> Allocate(size_t bytes) = 0;
  virtual absl::Status CopyToDevice(void* dst, const void* src, size_t bytes) = 0;
  virtual absl::Status CopyToHost(void* dst, const void* src, size_t bytes) = 0;
  virtual absl::Status Memset(void* dst, int value, size_t bytes) = 0;
  virtual absl::Status Synchronize() = 0;

  // --- ops (all shapes in elements) -----------------------------------------------------------
  // out[i, :] = table[ids[i], :]. Ids are trusted (validated before the step).
  virtual absl::Status Embedding(const Tensor2D& table, const int32_t* ids, Tensor2D out) = 0;
  // out[i, :] = x[i, :] / sqrt(mean(x[i, :]^2) + eps) * weight[0, :]. `out` may alias `x`.
  virtual absl::Status RmsNorm(const Tensor2D& x, const Tensor2D& weight, float eps,
                                Tensor2D out) = 0;
  // out = x * w^T for x [T, K], w [N, K] (a Hugging Face nn.Linear weight), out [T, N].
  virtual absl::Status Matmul(const Tensor2D& x, const Tensor2D& w, Tensor2D out) = 0;
  // acc += x, elementwise.
  virtual absl::Status AddInPlace(Tensor2D acc, const Tensor2D& x) = 0;
  // out[:, j] = silu(gate_up[:, j]) * gate_up[:, I + j] for gate_up [T, 2I], out [T, I].
  virtual absl::Status SiluMul(const Tensor2D& gate_up, Tensor2D out) = 0;
  // Rotary embedding, Hugging Face "rotate_half" convention (pairs i and i + head_dim/2).
  virtual absl::Status Rope(const RopeParams& p) = 0;
  // Writes k [T, k_width] and v [T, v_width] rows into the cache at flat slot indices.
  virtual absl::Status WriteKv(const KvLayer& cache, const Tensor2D& k, const Tensor2D& v,
                               const int32_t* slot_mapping, int32_t block_size) = 0;
  // Causal attention of the batch's queries over the paged cache.
  virtual absl::Status PagedAttention(const AttentionParams& p) = 0;
  // out[i, :] = x[rows[i], :].
  virtual absl::Status GatherRows(const Tensor2D& x, const int32_t* rows, Tensor2D out) = 0;
  // Copies whole blocks (every token slot) src -> dst of one layer's K and V.
  virtual absl::Status CopyBlock(const KvLayer& cache, int32_t block_size, int32_t src,
                                 int32_t dst) = 0;

 protected:
  friend class DeviceBuffer;
  virtual void Free(void* data) = 0;
};

enum class BackendKind { kCpu, kCuda };
absl::StatusOr<BackendKind> ParseBackendKind(absl::string_view s);

struct BackendOptions {
  BackendKind kind = BackendKind::kCpu;
  int device = 0;   // CUDA device ordinal
  int threads = 0;  // CPU: BLAS threads (0 = library default)
};

// Creates a backend. CUDA: Unimplemented when built without CUDA, FailedPrecondition without a device.
absl::StatusOr<std::unique_ptr<Backend>> CreateBackend(const BackendOptions& options);

}  // namespace lorc
