#include "backend/cpu_backend.h"

#include <cblas.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <limits>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "backend/cpu_device_memory.h"
#include "backend/host_memory.h"
#include "backend/cpu_kernels.h"
#include "common/parallel_for.h"
#include "common/status_macros.h"
#include "kernels/random_init.h"
#include "kvpolicy/sequence_policy.h"

namespace lorc {
namespace {

constexpr const char* kCpu = BackendKindName(BackendKind::kCpu);

inline float* Row(const Tensor2D& t, int64_t r) { return t.as<float>() + r * t.stride(); }

// The CPU plan keeps the split as two host lists of sequence indices.
class CpuAttentionPlan final : public AttentionPlan {
 public:
  explicit CpuAttentionPlan(const AttentionLimits& limits) : limits_(limits) {
    decodes_.reserve(limits.max_num_seqs);
    prefills_.reserve(limits.max_num_seqs);
  }
  absl::Status Plan(const AttentionBatch& b);
  const std::vector<int32_t>& decodes() const { return decodes_; }
  const std::vector<int32_t>& prefills() const { return prefills_; }

 private:
  AttentionLimits limits_;
  std::vector<int32_t> decodes_, prefills_;
};

absl::Status CpuAttentionPlan::Plan(const AttentionBatch& b) {
  if (b.num_seqs < 0 || b.num_seqs > limits_.max_num_seqs) {
    return absl::InvalidArgumentError(absl::StrCat("attention plan: ", b.num_seqs,
                                                   " sequences exceed max_num_seqs ",
                                                   limits_.max_num_seqs));
  }
  if (b.num_tokens > limits_.max_num_batched_tokens) {
    return absl::InvalidArgumentError(absl::StrCat("attention plan: ", b.num_tokens,
                                                   " tokens exceed max_num_batched_tokens ",
                                                   limits_.max_num_batched_tokens));
  }
  if (b.max_blocks_per_seq > limits_.max_blocks_per_seq || b.block_size <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("attention plan: max_blocks_per_seq ",
                                                   b.max_blocks_per_seq, " exceeds ",
                                                   limits_.max_blocks_per_seq,
                                                   " or block_size ", b.block_size, " <= 0"));
  }
  decodes_.clear();
  prefills_.clear();
  for (int32_t s = 0; s < b.num_seqs; ++s) {
    const int32_t q_len = b.host_query_start[s + 1] - b.host_query_start[s];
    const int32_t len = b.host_seq_lens[s];
    if (q_len < 0 || len < q_len ||
        len > static_cast<int64_t>(b.max_blocks_per_seq) * b.block_size) {
      return absl::InvalidArgumentError(absl::StrCat("attention plan: sequence ", s, " has ", q_len,
                                                     " queries and seq_len ", len));
    }
    if (q_len == 1) {
      decodes_.push_back(s);
    } else if (q_len > 1) {
      prefills_.push_back(s);
    }
  }
  batch_ = b;
  num_decodes_ = static_cast<int32_t>(decodes_.size());
  num_prefills_ = static_cast<int32_t>(prefills_.size());
  return absl::OkStatus();
}

class CpuGraph final : public Graph {};
class CpuEvent final : public Event {};

class CpuBackend final : public Backend {
 public:
  CpuBackend(int threads, int64_t fused_norm_rows) : fused_norm_rows_(fused_norm_rows < 0 ? 0 : fused_norm_rows) {
    if (threads > 0) openblas_set_num_threads(threads);
  }

  // Only with BackendOptions::fused_norm_rows > 0 (tests): the base class's NormMatmul* then copy
  // the stream into the caller's `next` buffer, as a fusing backend stores it there.
  bool FusesNormMatmul(int64_t tokens) const override { return tokens >= 1 && tokens <= fused_norm_rows_; }

  const char* name() const override { return kCpu; }
  std::string Describe() const override {
    return absl::StrCat("cpu: fp32, OpenBLAS ", openblas_get_config(), ", ",
                        openblas_get_num_threads(), " BLAS threads, ",
                        std::thread::hardware_concurrency(), " hardware threads");
  }

  // Everything runs synchronously on the calling thread: the "stream" is always idle.
  void* stream_handle() const override { return nullptr; }
  absl::Status Synchronize() override { return absl::OkStatus(); }
  absl::StatusOr<std::unique_ptr<Event>> CreateEvent() override {
    return std::unique_ptr<Event>(new CpuEvent());
  }
  absl::Status RecordEvent(Event&) override { return absl::OkStatus(); }
  absl::Status SynchronizeEvent(Event&) override { return absl::OkStatus(); }
  absl::Status StreamWaitEvent(Event&) override { return absl::OkStatus(); }
  bool SupportsGraphs() const override { return false; }
  absl::Status BeginCapture() override {
    if (capturing_) return absl::FailedPreconditionError("cpu backend: BeginCapture while capturing");
    capturing_ = true;
    return absl::OkStatus();
  }
  absl::StatusOr<std::unique_ptr<Graph>> EndCapture() override {
    if (!capturing_) return absl::FailedPreconditionError("cpu backend: EndCapture without BeginCapture");
    capturing_ = false;
    return std::unique_ptr<Graph>(new CpuGraph());
  }
  absl::Status ReplayGraph(const Graph&) override { return absl::OkStatus(); }

  absl::StatusOr<DeviceBuffer> Allocate(size_t bytes) override { return Alloc(bytes, MemoryKind::kDevice); }
  absl::StatusOr<DeviceBuffer> AllocateHost(size_t bytes) override {
    return Alloc(bytes, MemoryKind::kPinnedHost);
  }
  MemoryInfo GetMemoryInfo() const override;
  absl::Status CopyToDevice(void* dst, const void* src, size_t bytes) override {
    if (bytes) std::memcpy(dst, src, bytes);
    return absl::OkStatus();
  }
  absl::Status CopyToHost(void* dst, const void* src, size_t bytes) override {
    if (bytes) std::memcpy(dst, src, bytes);
    return absl::OkStatus();
  }
  absl::Status CopyOnDevice(void* dst, const void* src, size_t bytes) override {
    if (bytes) std::memmove(dst, src, bytes);
    return absl::OkStatus();
  }
  absl::Status Memset(void* dst, int value, size_t bytes) override {
    if (bytes) std::memset(dst, value, bytes);
    return absl::OkStatus();
  }

  absl::Status Embedding(const Tensor2D& table, const int32_t* ids, Tensor2D out) override {
    RETURN_IF_ERROR(RequireF32(kCpu, "Embedding", "table", table.dtype));
    RETURN_IF_ERROR(RequireF32(kCpu, "Embedding", "output", out.dtype));
    for (int64_t i = 0; i < out.rows; ++i) {
      std::memcpy(Row(out, i), Row(table, ids[i]), sizeof(float) * out.cols);
    }
    return absl::OkStatus();
  }

  absl::Status RmsNorm(const Tensor2D& x, const Tensor2D& weight, float eps, Tensor2D out) override {
    RETURN_IF_ERROR(RequireF32(kCpu, "RmsNorm", "input", x.dtype));
    RETURN_IF_ERROR(RequireF32(kCpu, "RmsNorm", "weight", weight.dtype));
    RETURN_IF_ERROR(RequireF32(kCpu, "RmsNorm", "output", out.dtype));
    for (int64_t i = 0; i < x.rows; ++i) NormRow(Row(x, i), weight.as<float>(), x.cols, eps, Row(out, i));
    return absl::OkStatus();
  }

  absl::Status FusedAddRmsNorm(Tensor2D residual, const Tensor2D& x, const Tensor2D& weight,
                               float eps, Tensor2D out) override {
    RETURN_IF_ERROR(RequireF32(kCpu, "FusedAddRmsNorm", "residual", residual.dtype));
    RETURN_IF_ERROR(RequireF32(kCpu, "FusedAddRmsNorm", "input", x.dtype));
    RETURN_IF_ERROR(RequireF32(kCpu, "FusedAddRmsNorm", "weight", weight.dtype));
    RETURN_IF_ERROR(RequireF32(kCpu, "FusedAddRmsNorm", "output", out.dtype));
    for (int64_t i = 0; i < residual.rows; ++i) {
      float* r = Row(residual, i);
      const float* xi = Row(x, i);
      for (int64_t j = 0; j < residual.cols; ++j) r[j] += xi[j];
      NormRow(r, weight.as<float>(), residual.cols, eps, Row(out, i));
    }
    return absl::OkStatus();
  }

  absl::Status Matmul(const Tensor2D& x, const Tensor2D& w, Tensor2D out) override {
    RETURN_IF_ERROR(RequireF32(kCpu, "Matmul", "input", x.dtype));
    RETURN_IF_ERROR(RequireF32(kCpu, "Matmul", "weight", w.dtype));
    RETURN_IF_ERROR(RequireF32(kCpu, "Matmul", "output", out.dtype));
    if (x.cols != w.cols || out.rows != x.rows || out.cols != w.rows) {
      return absl::InvalidArgumentError(absl::StrCat(
          "cpu backend: Matmul: shape mismatch x[", x.rows, ",", x.cols, "] w[", w.rows, ",",
          w.cols, "] out[", out.rows, ",", out.cols, "]"));
    }
    if (x.rows == 0) return absl::OkStatus();
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(x.rows),
                static_cast<int>(w.rows), static_cast<int>(x.cols), 1.0f, x.as<float>(),
                static_cast<int>(x.stride()), w.as<float>(), static_cast<int>(w.stride()), 0.0f,
                out.as<float>(), static_cast<int>(out.stride()));
    return absl::OkStatus();
  }

  absl::Status AddInPlace(Tensor2D acc, const Tensor2D& x) override {
    RETURN_IF_ERROR(RequireF32(kCpu, "AddInPlace", "accumulator", acc.dtype));
    RETURN_IF_ERROR(RequireF32(kCpu, "AddInPlace", "input", x.dtype));
    for (int64_t i = 0; i < acc.rows; ++i) {
      float* a = Row(acc, i);
      const float* b = Row(x, i);
      for (int64_t j = 0; j < acc.cols; ++j) a[j] += b[j];
    }
    return absl::OkStatus();
  }

  absl::Status SiluMul(const Tensor2D& gate_up, Tensor2D out) override {
    RETURN_IF_ERROR(RequireF32(kCpu, "SiluMul", "input", gate_up.dtype));
    RETURN_IF_ERROR(RequireF32(kCpu, "SiluMul", "output", out.dtype));
    const int64_t inter = out.cols;
    for (int64_t i = 0; i < out.rows; ++i) {
      const float* g = Row(gate_up, i);
      const float* u = g + inter;
      float* o = Row(out, i);
      for (int64_t j = 0; j < inter; ++j) o[j] = g[j] / (1.0f + std::exp(-g[j])) * u[j];
    }
    return absl::OkStatus();
  }

  absl::Status Rope(const RopeParams& p) override {
    RETURN_IF_ERROR(RequireF32(kCpu, "Rope", "input", p.x.dtype));
    RotateRows(p.x, p.num_heads, p.head_dim, p.positions, p.inv_freq);
    return absl::OkStatus();
  }

  // F32 rows copied; BF16 rounded to nearest even; quantized caches quantized per token
  // (kernels/kv_quant.h).
  absl::Status WriteKv(const KvLayer& cache, const Tensor2D& k, const Tensor2D& v,
                       const int32_t* slot_mapping) override {
    RETURN_IF_ERROR(cpu_internal::CheckKvCache("WriteKv", cache));
    RETURN_IF_ERROR(RequireF32(kCpu, "WriteKv", "key", k.dtype));
    RETURN_IF_ERROR(RequireF32(kCpu, "WriteKv", "value", v.dtype));
    for (int64_t t = 0; t < k.rows; ++t) {
      const int64_t slot = slot_mapping[t];
      if (slot < 0) continue;
      cpu_internal::StoreKvRow(cache, /*v_side=*/false, slot, Row(k, t));
      cpu_internal::StoreKvRow(cache, /*v_side=*/true, slot, Row(v, t));
    }
    return absl::OkStatus();
  }

  absl::Status RopeKvWrite(const RopeKvWriteParams& p) override {
    RETURN_IF_ERROR(RequireF32(kCpu, "RopeKvWrite", "query", p.q.dtype));
    RETURN_IF_ERROR(RequireF32(kCpu, "RopeKvWrite", "key", p.k.dtype));
    if (p.k.cols != p.cache.k_width || p.v.cols != p.cache.v_width ||
        (p.rotate_k && p.k.cols != static_cast<int64_t>(p.num_kv_heads) * p.head_dim)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "cpu backend: RopeKvWrite: k has ", p.k.cols, " columns, v ", p.v.cols, ", cache widths ",
          p.cache.k_width, "/", p.cache.v_width, ", kv heads x head_dim ",
          p.num_kv_heads * p.head_dim));
    }
    RotateRows(p.q, p.num_heads, p.head_dim, p.positions, p.inv_freq);
    // LoRC latent layers store the key latents unrotated (LatentAttention rotates keys).
    if (p.rotate_k) RotateRows(p.k, p.num_kv_heads, p.head_dim, p.positions, p.inv_freq);
    return WriteKv(p.cache, p.k, p.v, p.slot_mapping);
  }

  absl::StatusOr<std::unique_ptr<AttentionPlan>> CreateAttentionPlan(
      const AttentionLimits& limits) override {
    if (limits.max_num_seqs <= 0 || limits.max_num_batched_tokens <= 0 ||
        limits.max_blocks_per_seq <= 0) {
      return absl::InvalidArgumentError("cpu backend: attention limits must be positive");
    }
    return std::unique_ptr<AttentionPlan>(new CpuAttentionPlan(limits));
  }
  absl::Status PlanAttention(const AttentionBatch& batch, AttentionPlan& plan) override {
    return static_cast<CpuAttentionPlan&>(plan).Plan(batch);
  }
  absl::Status DecodeAttention(const AttentionParams& p, const AttentionPlan& plan) override {
    return Attend(p, plan.batch(), static_cast<const CpuAttentionPlan&>(plan).decodes(), "DecodeAttention");
  }
  absl::Status PrefillAttention(const AttentionParams& p, const AttentionPlan& plan) override {
    return Attend(p, plan.batch(), static_cast<const CpuAttentionPlan&>(plan).prefills(), "PrefillAttention");
  }

  bool SupportsQuantizedKvCache() const override { return true; }
  bool SupportsLatentAttention() const override { return true; }
  bool SupportsKvPolicy() const override { return true; }
  absl::Status LatentAttention(const LatentAttentionParams& p, const AttentionPlan& plan) override {
    const auto& cp = static_cast<const CpuAttentionPlan&>(plan);
    RETURN_IF_ERROR(cpu_internal::LatentAttention(p, plan.batch(), cp.decodes(), &latent_));
    return cpu_internal::LatentAttention(p, plan.batch(), cp.prefills(), &latent_);
  }

  absl::Status GatherRows(const Tensor2D& x, const int32_t* rows, Tensor2D out) override {
    RETURN_IF_ERROR(RequireF32(kCpu, "GatherRows", "input", x.dtype));
    for (int64_t i = 0; i < out.rows; ++i) {
      std::memcpy(Row(out, i), Row(x, rows[i]), sizeof(float) * out.cols);
    }
    return absl::OkStatus();
  }

  // Rows split over the host cores (common/parallel_for.h): each row's values depend only on
  // its indices, so the result is the one-thread result.
  absl::Status FillWeights(const WeightFillParams& p) override {
    RETURN_IF_ERROR(RequireF32(kCpu, "FillWeights", "output", p.out.dtype));
    RETURN_IF_ERROR(ValidateWeightFill(kCpu, p));
    const Tensor2D& o = p.out;
    ParallelFor(o.rows, o.cols, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        float* row = Row(o, r);
        if (p.constant) {
          std::fill(row, row + o.cols, p.value);
          continue;
        }
        const uint64_t base = static_cast<uint64_t>((p.row0 + r) * p.full_cols + p.col0);
        for (int64_t c = 0; c < o.cols; ++c) {
          row[c] = kernels::UniformWeightValue(p.key, base + static_cast<uint64_t>(c), p.scale);
        }
      }
    });
    return absl::OkStatus();
  }

  absl::Status Sample(const Tensor2D& logits, absl::Span<const SamplingRow> rows,
                      SampleOutput* out) override;
  // The draw completes in BeginSample; its tokens are begun_out_'s (backend memory is host memory).
  absl::Status BeginSample(const Tensor2D& logits, absl::Span<const SamplingRow> rows,
                           const int32_t** drawn_tokens) override;
  absl::Status FinishSample(SampleOutput* out) override;
  absl::Status TakeDrawnTokens(int32_t* ids, const int32_t* drawn, const int32_t* pairs, int32_t n,
                               int32_t vocab) override;
  // Host tier: plain memcpy (the "device" is host memory), complete on return.
  absl::Status OffloadKvBlocks(absl::Span<const KvLayer> layers, int32_t block_size, int32_t num_blocks,
                               HostKvStorage& host, absl::Span<const HostBlockCopy> copies) override {
    return TransferKvBlocks("kv_offloads", layers, block_size, num_blocks, host, copies, true);
  }
  absl::Status LoadKvBlocks(absl::Span<const KvLayer> layers, int32_t block_size, int32_t num_blocks,
                            const HostKvStorage& host, absl::Span<const HostBlockCopy> copies) override {
    return TransferKvBlocks("kv_loads", layers, block_size, num_blocks, host, copies, false);
  }
  absl::Status CopyBlocks(absl::Span<const KvLayer> layers, int32_t block_size, int32_t num_blocks,
                          absl::Span<const BlockCopy> copies) override;
  absl::Status CompactKvHeads(absl::Span<const KvLayer> layers, int32_t block_size, int32_t num_blocks,
                              absl::Span<const KvHeadMove> moves, absl::Span<const KvLowRun> low,
                              int low_bits) override;

 protected:
  void Free(void* data, MemoryKind) override { memory_.Free(data); }

 private:
  // Offload (to_host) or load: validates everything, then copies pair after pair.
  absl::Status TransferKvBlocks(const char* what, absl::Span<const KvLayer> layers, int32_t block_size,
                                int32_t num_blocks, const HostKvStorage& host,
                                absl::Span<const HostBlockCopy> copies, bool to_host);
  KvTransferSegments segments_;  // reused by TransferKvBlocks
  absl::StatusOr<DeviceBuffer> Alloc(size_t bytes, MemoryKind kind) {
    if (bytes == 0) return DeviceBuffer();
    ASSIGN_OR_RETURN(void* p, memory_.Allocate(bytes));
    return DeviceBuffer(this, p, bytes, kind);
  }
  static void NormRow(const float* x, const float* w, int64_t n, float eps, float* out) {
    float ss = 0.f;
    for (int64_t j = 0; j < n; ++j) ss += x[j] * x[j];
    const float inv = 1.0f / std::sqrt(ss / static_cast<float>(n) + eps);
    for (int64_t j = 0; j < n; ++j) out[j] = w[j] * (x[j] * inv);
  }
  void RotateRows(const Tensor2D& x, int heads, int head_dim, const int32_t* positions,
                  const float* inv_freq);
  absl::Status Attend(const AttentionParams& p, const AttentionBatch& b,
                      const std::vector<int32_t>& seqs, const char* op);

  CpuDeviceMemory memory_;  // every DeviceBuffer's storage (page-granular mappings)
  bool capturing_ = false;
  int64_t fused_norm_rows_ = 0;  // BackendOptions::fused_norm_rows (tests)
  std::vector<float> cos_, sin_, k_buf_, v_buf_, scores_;
  std::vector<int32_t> kept_;
  SampleScratch sample_scratch_;
  SampleOutput begun_out_;  // BeginSample's draw until FinishSample
  bool begun_ = false;
  cpu_internal::LatentScratch latent_;
};

MemoryInfo CpuBackend::GetMemoryInfo() const {
  MemoryInfo m;
  const HostMemory h = ReadHostMemory();  // MemAvailable / MemTotal within the cgroup's limit
  const int64_t page = sysconf(_SC_PAGESIZE);
  m.total_bytes = h.total_bytes > 0 ? h.total_bytes : static_cast<int64_t>(sysconf(_SC_PHYS_PAGES)) * page;
  m.free_bytes = h.available_bytes >= 0 ? h.available_bytes : static_cast<int64_t>(sysconf(_SC_AVPHYS_PAGES)) * page;
  return m;
}

void CpuBackend::RotateRows(const Tensor2D& x, int heads, int head_dim, const int32_t* positions,
                            const float* inv_freq) {
  cpu_internal::RotateRows(x.as<float>(), x.rows, x.stride(), heads, head_dim, positions, inv_freq,
                           &cos_, &sin_);
}

absl::Status KvPolicyBroken(const char* op, int32_t s) {
  return absl::InternalError(absl::StrCat("cpu backend: ", op, ": sequence ", s,
                                          ": the KV policy left out a token of this step"));
}

// Decode and prefill share this body on the CPU: per sequence and KV head, gather the keys and
// values into contiguous fp32 rows (dequantized from a BF16 or quantized cache), then two GEMMs
// around a causal softmax.
absl::Status CpuBackend::Attend(const AttentionParams& p, const AttentionBatch& b,
                                const std::vector<int32_t>& seqs, const char* op) {
  RETURN_IF_ERROR(cpu_internal::CheckKvCache(op, p.cache));
  RETURN_IF_ERROR(RequireF32(kCpu, op, "query", p.q.dtype));
  RETURN_IF_ERROR(RequireF32(kCpu, op, "output", p.out.dtype));
  if (p.num_kv_heads <= 0 || p.num_heads % p.num_kv_heads != 0) {
    return absl::InvalidArgumentError(absl::StrCat("cpu backend: ", op, ": ", p.num_heads,
                                                   " query heads over ", p.num_kv_heads, " KV heads"));
  }
  const int hd = p.head_dim;
  const int group = p.num_heads / p.num_kv_heads;
  const int64_t q_ld = p.q.stride();
  const int64_t o_ld = p.out.stride();
  for (const int32_t s : seqs) {
    const int q0 = b.query_start[s];
    const int q_len = b.query_start[s + 1] - q0;
    if (q_len == 0) continue;
    const int len = b.seq_lens[s];
    const int32_t* table = b.block_tables + static_cast<int64_t>(s) * b.max_blocks_per_seq;
    kvpolicy::SequenceKvPolicy* policy =
        p.kv_policy.seqs != nullptr ? p.kv_policy.seqs[s] : nullptr;
    for (int g = 0; g < p.num_kv_heads; ++g) {
      // The kept keys in position order (all of them without a policy); a step's own tokens are
      // always kept, so the causal mask over the kept list is CausalSoftmax's.
      const int n = cpu_internal::GatherKeptHead(p.cache, policy, p.kv_policy.layer, table,
                                                 b.block_size, len, q_len, g, hd, hd, &kept_,
                                                 &k_buf_, &v_buf_);
      if (n < 0) return KvPolicyBroken(op, s);
      scores_.resize(static_cast<size_t>(q_len) * n);
      const float* q_g = p.q.as<float>() + static_cast<int64_t>(q0) * q_ld + g * group * hd;
      if (policy != nullptr) policy->ObserveQueries(p.kv_policy.layer, g, q_g, q_len, q_ld, group, hd);
      for (int hh = 0; hh < group; ++hh) {
        const int h = g * group + hh;
        const float* q = p.q.as<float>() + static_cast<int64_t>(q0) * q_ld + h * hd;
        float* out = p.out.as<float>() + static_cast<int64_t>(q0) * o_ld + h * hd;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, q_len, n, hd, p.scale, q,
                    static_cast<int>(q_ld), k_buf_.data(), hd, 0.0f, scores_.data(), n);
        cpu_internal::CausalSoftmax(scores_.data(), q_len, n);
        if (policy != nullptr) {
          cpu_internal::RecordImportance(scores_.data(), q_len, n, len, kept_.data(),
                                         policy->last_hit(p.kv_policy.layer, g));
        }
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, q_len, hd, n, 1.0f,
                    scores_.data(), n, v_buf_.data(), hd, 0.0f, out, static_cast<int>(o_ld));
      }
      if (policy != nullptr) policy->Apply(p.kv_policy.layer, g, kept_, k_buf_.data());
    }
  }
  return absl::OkStatus();
}

absl::Status CpuBackend::Sample(const Tensor2D& logits, absl::Span<const SamplingRow> rows,
                                SampleOutput* out) {
  RETURN_IF_ERROR(RequireF32(kCpu, "Sample", "logits", logits.dtype));
  for (size_t i = 0; i < rows.size(); ++i) {
    const int32_t r = rows[i].logits_row;
    if (r < 0 || r >= logits.rows) {
      return absl::InvalidArgumentError(absl::StrCat("cpu backend: Sample: row ", i, " reads logits row ",
                                                     r, " of ", logits.rows));
    }
    if (rows[i].logprobs < -1 || rows[i].logprobs > SampleOutput::kStride) {
      return absl::InvalidArgumentError(absl::StrCat("cpu backend: Sample: row ", i, " asks for ",
                                                     rows[i].logprobs, " logprobs (at most ",
                                                     SampleOutput::kStride, ")"));
    }
  }
  out->Resize(rows.size());
  for (size_t i = 0; i < rows.size(); ++i) {
    const absl::Span<const float> row(Row(logits, rows[i].logits_row),
                                      static_cast<size_t>(logits.cols));
    out->tokens[i] = SampleRow(row, rows[i], &sample_scratch_);
    out->non_finite[i] = RowIsFinite(row) ? 0 : 1;
    if (rows[i].logprobs >= 0) {
      const size_t at = i * SampleOutput::kStride;
      ComputeLogprobs(row, out->tokens[i], rows[i].logprobs, &sample_scratch_, &out->logprobs[i],
                      &out->ranks[i], &out->top_ids[at], &out->top_logprobs[at]);
    }
  }
  return absl::OkStatus();
}

absl::Status CpuBackend::BeginSample(const Tensor2D& logits, absl::Span<const SamplingRow> rows,
                                     const int32_t** drawn_tokens) {
  if (begun_) return absl::FailedPreconditionError("cpu backend: BeginSample: the last draw was not finished");
  RETURN_IF_ERROR(Sample(logits, rows, &begun_out_));  // backend memory is host memory
  *drawn_tokens = begun_out_.tokens.data();
  begun_ = true;
  return absl::OkStatus();
}

absl::Status CpuBackend::FinishSample(SampleOutput* out) {
  if (!begun_) return absl::FailedPreconditionError("cpu backend: FinishSample: no draw begun");
  begun_ = false;
  std::swap(*out, begun_out_);
  return absl::OkStatus();
}

absl::Status CpuBackend::TakeDrawnTokens(int32_t* ids, const int32_t* drawn, const int32_t* pairs, int32_t n,
                                         int32_t vocab) {
  for (int32_t i = 0; i < n; ++i) {
    const int32_t t = drawn[pairs[2 * i + 1]];
    ids[pairs[2 * i]] = t >= 0 && t < vocab ? t : 0;
  }
  return absl::OkStatus();
}

absl::Status CpuBackend::TransferKvBlocks(const char* what, absl::Span<const KvLayer> layers,
                                          int32_t block_size, int32_t num_blocks,
                                          const HostKvStorage& host,
                                          absl::Span<const HostBlockCopy> copies, bool to_host) {
  RETURN_IF_ERROR(ValidateKvTransfer(name(), what, layers, block_size, num_blocks, host, copies));
  for (const KvLayer& layer : layers) RETURN_IF_ERROR(cpu_internal::CheckKvCache(what, layer));
  // Pairs in order, so a later pair sees an earlier one's bytes (the segments are per pair).
  segments_.dsts.clear();
  segments_.srcs.clear();
  segments_.sizes.clear();
  AppendKvTransferSegments(layers, host, copies, to_host, &segments_);
  for (size_t i = 0; i < segments_.sizes.size(); ++i) {
    std::memcpy(segments_.dsts[i], segments_.srcs[i], segments_.sizes[i]);
  }
  return absl::OkStatus();
}

absl::Status CpuBackend::CopyBlocks(absl::Span<const KvLayer> layers, int32_t block_size,
                                    int32_t num_blocks, absl::Span<const BlockCopy> copies) {
  if (absl::Status s = ValidateBlockCopies(copies, num_blocks); !s.ok()) return s;
  for (const KvLayer& layer : layers) {
    RETURN_IF_ERROR(cpu_internal::CheckKvCache("CopyBlocks", layer));
  }
  // A block's bytes hold its codes and scales alike (kvstore/kv_spec.h).
  for (const KvLayer& layer : layers) {
    const size_t k_block = static_cast<size_t>(KvLayerBlockBytes(layer, false, block_size));
    const size_t v_block = static_cast<size_t>(KvLayerBlockBytes(layer, true, block_size));
    char* k = static_cast<char*>(layer.k);
    char* v = static_cast<char*>(layer.v);
    for (const BlockCopy& c : copies) {
      std::memmove(k + c.dst * k_block, k + c.src * k_block, k_block);
      std::memmove(v + c.dst * v_block, v + c.src * v_block, v_block);
    }
  }
  return absl::OkStatus();
}

absl::Status CpuBackend::CompactKvHeads(absl::Span<const KvLayer> layers, int32_t block_size,
                                        int32_t num_blocks, absl::Span<const KvHeadMove> moves,
                                        absl::Span<const KvLowRun> low, int low_bits) {
  const int64_t num_slots = static_cast<int64_t>(block_size) * num_blocks;
  auto slot_ok = [&](int64_t s) { return s >= 0 && s < num_slots; };
  auto head_ok = [&](int32_t layer, int32_t head) {
    return layer >= 0 && static_cast<size_t>(layer) < layers.size() && head >= 0 &&
           head < layers[layer].num_kv_heads;
  };
  for (size_t i = 0; i < moves.size(); ++i) {
    const KvHeadMove& m = moves[i];
    if (!head_ok(m.layer, m.head) || !slot_ok(m.src) || !slot_ok(m.dst)) {
      const bool layer_ok = m.layer >= 0 && static_cast<size_t>(m.layer) < layers.size();
      return absl::InvalidArgumentError(absl::StrCat(
          "cpu backend: CompactKvHeads: move ", i, " (layer ", m.layer, ", head ", m.head, ", slot ",
          m.src, " -> ", m.dst, ") outside ", layers.size(), " layers of ",
          layer_ok ? layers[m.layer].num_kv_heads : 0, " KV heads and ", num_slots, " slots"));
    }
  }
  if (!low.empty() && low_bits != 4 && low_bits != 2) {
    return absl::InvalidArgumentError(absl::StrCat("cpu backend: CompactKvHeads: low_bits ", low_bits,
                                                   " (4 or 2)"));
  }
  for (size_t r = 0; r < low.size(); ++r) {
    const KvLowRun& run = low[r];
    auto bad = [&](const std::string& why) {
      return absl::InvalidArgumentError(absl::StrCat("cpu backend: CompactKvHeads: low run ", r,
                                                     " (layer ", run.layer, ", head ", run.head, "): ", why));
    };
    if (!head_ok(run.layer, run.head)) return bad(absl::StrCat("outside ", layers.size(), " layers and their KV heads"));
    const KvLayer& c = layers[run.layer];
    for (const std::vector<int64_t>* slots : {&run.old_slots, &run.new_slots}) {
      for (int64_t s : *slots) {
        if (!slot_ok(s)) return bad(absl::StrCat("slot ", s, " outside ", num_slots, " slots"));
      }
    }
    // Entries each run's slots hold: the fewer of its K and V capacities.
    auto capacity = [&](size_t run_slots) {
      int64_t most = std::numeric_limits<int64_t>::max();
      for (bool v_side : {false, true}) {
        const int64_t w = (v_side ? c.v_width : c.k_width) / c.num_kv_heads;
        most = std::min(most, static_cast<int64_t>(run_slots) * KvHeadSlotBytes(c, v_side) /
                                  kvpolicy::LowEntryBytes(w, low_bits));
      }
      return most;
    };
    if (static_cast<int64_t>(run.sources.size()) > capacity(run.new_slots.size())) {
      return bad(absl::StrCat(run.sources.size(), " entries do not fit in ", run.new_slots.size(), " slots"));
    }
    const int64_t old_entries = capacity(run.old_slots.size());
    for (int64_t src : run.sources) {
      if (src >= old_entries || (src < 0 && !slot_ok(-1 - src))) {
        return bad(absl::StrCat("source ", src, " is neither an entry of its old run (", old_entries,
                                " fit its slots) nor -1 - a slot of ", num_slots));
      }
    }
  }
  for (const KvLayer& layer : layers) RETURN_IF_ERROR(cpu_internal::CheckKvCache("CompactKvHeads", layer));
  cpu_internal::CompactKvHeads(layers, moves, low, low_bits);
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<Backend>> CreateCpuBackend(const BackendOptions& options) {
  return std::unique_ptr<Backend>(new CpuBackend(options.threads, options.fused_norm_rows));
}

}  // namespace lorc
