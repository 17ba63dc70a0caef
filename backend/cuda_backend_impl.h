// The CUDA backend's class, shared by the files that implement its ops: cuda_backend.cc
// (runtime, memory, element-wise and row ops), cuda_matmul.cc (cuBLASLt), cuda_attention.cc
// (paged attention), cuda_sampling.cc (the sampling contract of backend/sampling.h). Internal to
// backend/: everything else goes through backend.h / cuda_backend.h. Only with LORC_HAVE_CUDA.
#pragma once

#ifdef LORC_HAVE_CUDA

#include <cuda_runtime.h>

#include <algorithm>
#include <memory>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "backend/backend.h"
#include "backend/cuda_backend.h"
#include "kernels/kv_quant.h"
#include "common/status_macros.h"

namespace lorc::kernels {
struct LatentAttentionArgs;  // kernels/attention_latent.cuh
}  // namespace lorc::kernels

namespace lorc::cuda_internal {

inline absl::Status CudaError(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return absl::OkStatus();
  const std::string msg = absl::StrCat("cuda backend: ", what, ": ", cudaGetErrorString(e));
  if (e == cudaErrorMemoryAllocation) return absl::ResourceExhaustedError(msg);
  if (e == cudaErrorStreamCaptureUnsupported || e == cudaErrorStreamCaptureInvalidated ||
      e == cudaErrorIllegalState) {
    return absl::FailedPreconditionError(msg);
  }
  return absl::InternalError(msg);
}

inline absl::Status NoKernel(const char* op) {
  return absl::UnimplementedError(absl::StrCat("cuda backend: ", op,
                                               ": kernel not implemented yet (use --backend cpu)"));
}

// InvalidArgument naming the op unless a quantized cache (KvLayer::quant != kNone) has KV heads
// dividing its widths and a block size (cuda_backend.cc).
absl::Status CheckQuantizedCache(const char* op, const KvLayer& c);

// A quantized cache (KvLayer::quant != kNone) as the kernels read it (cuda_attention.cc): KV heads
// and block size those of the call, each side's widths exactly heads x head_width (k_head /
// v_head values), the byte geometry the kernels' 8-channel loads take (head widths multiples of 8,
// blocks 16-byte aligned: KvqSideReadable). Fills the sides' geometry (MakeKvqSide).
// InvalidArgument for a cache of another shape, Unimplemented for a geometry the kernels cannot read.
absl::Status QuantizedCacheGeometry(const char* op, const KvLayer& c, int32_t num_kv_heads, int64_t k_head,
                                    int64_t v_head, int32_t block_size, kernels::KvqSide* k_q, kernels::KvqSide* v_q);

class CudaEvent final : public Event {
 public:
  ~CudaEvent() override {
    if (event != nullptr) cudaEventDestroy(event);
  }
  cudaEvent_t event = nullptr;
};

// cuda_matmul.cc: the cuBLASLt handle, its fixed workspace and the per-shape algorithm cache,
// made with the backend (so before any capture); holds the error if cuBLASLt is unusable.
struct MatmulState;
std::shared_ptr<MatmulState> NewMatmulState();
// One step's KV policy lists and buffers (cuda_kv_policy.cc); the deleter frees them.
struct CudaKvPolicyStep;
struct CudaKvPolicyStepDeleter { void operator()(CudaKvPolicyStep* s) const; };
// Sample's workspaces (cuda_sampling.cc); the deleter frees them.
struct CudaSampler;
struct CudaSamplerDeleter { void operator()(CudaSampler* s) const; };

class CudaGraph final : public Graph {
 public:
  ~CudaGraph() override {
    if (exec != nullptr) cudaGraphExecDestroy(exec);
  }
  cudaGraphExec_t exec = nullptr;
};

// The CUDA backend: one non-blocking stream on one device, events, graph capture, device and
// pinned memory, async copies, CopyBlocks and the element-wise / row ops over kernels/ launchers.
// Matmul goes through cuBLASLt, attention and Sample through kernels/. The device is made current on the creating thread,
// which must be the thread that uses the backend (the worker's engine thread).
class CudaBackend final : public Backend {
 public:
  CudaBackend(int device, std::string description, cudaStream_t stream, int64_t fused_norm_rows = -1)
      : device_(device), description_(std::move(description)), stream_(stream), fused_norm_rows_(fused_norm_rows) {}
  ~CudaBackend() override {
    cudaSetDevice(device_);
    cudaStreamSynchronize(stream_);
    DestroyCopyStream();  // cuda_host_kv.cc
    cudaStreamDestroy(stream_);
  }

  const char* name() const override { return BackendKindName(BackendKind::kCuda); }
  std::string Describe() const override { return description_; }
  DType compute_dtype() const override { return DType::kBF16; }  // weights, activations, KV cache

  void* stream_handle() const override { return stream_; }
  absl::Status Synchronize() override { return CudaError(cudaStreamSynchronize(stream_), "synchronize"); }
  absl::StatusOr<std::unique_ptr<Event>> CreateEvent() override {
    auto e = std::make_unique<CudaEvent>();
    RETURN_IF_ERROR(CudaError(cudaEventCreateWithFlags(&e->event, cudaEventDisableTiming), "event"));
    return std::unique_ptr<Event>(std::move(e));
  }
  absl::Status RecordEvent(Event& e) override {
    return CudaError(cudaEventRecord(static_cast<CudaEvent&>(e).event, stream_), "record event");
  }
  absl::Status SynchronizeEvent(Event& e) override {
    return CudaError(cudaEventSynchronize(static_cast<CudaEvent&>(e).event), "synchronize event");
  }
  absl::Status StreamWaitEvent(Event& e) override {
    return CudaError(cudaStreamWaitEvent(stream_, static_cast<CudaEvent&>(e).event, 0), "wait event");
  }
  bool SupportsGraphs() const override { return true; }
  bool TimesMatmulAtFirstUse() const override { return true; }
  absl::Status BeginCapture() override {
    if (capturing_) return absl::FailedPreconditionError("cuda backend: BeginCapture while capturing");
    RETURN_IF_ERROR(CudaError(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal), "begin capture"));
    capturing_ = true;
    return absl::OkStatus();
  }
  absl::StatusOr<std::unique_ptr<Graph>> EndCapture() override {
    if (!capturing_) return absl::FailedPreconditionError("cuda backend: EndCapture without BeginCapture");
    capturing_ = false;
    cudaGraph_t graph = nullptr;
    RETURN_IF_ERROR(CudaError(cudaStreamEndCapture(stream_, &graph), "end capture"));
    auto g = std::make_unique<CudaGraph>();
    const cudaError_t e = cudaGraphInstantiate(&g->exec, graph, 0);
    cudaGraphDestroy(graph);
    RETURN_IF_ERROR(CudaError(e, "instantiate graph"));
    return std::unique_ptr<Graph>(std::move(g));
  }
  absl::Status ReplayGraph(const Graph& g) override {
    return CudaError(cudaGraphLaunch(static_cast<const CudaGraph&>(g).exec, stream_), "replay graph");
  }

  absl::StatusOr<DeviceBuffer> Allocate(size_t bytes) override {
    if (bytes == 0) return DeviceBuffer();
    void* p = nullptr;
    RETURN_IF_ERROR(CudaError(cudaMalloc(&p, bytes), "cudaMalloc"));
    return DeviceBuffer(this, p, bytes, MemoryKind::kDevice);
  }
  absl::StatusOr<DeviceBuffer> AllocateHost(size_t bytes) override {
    if (bytes == 0) return DeviceBuffer();
    void* p = nullptr;
    RETURN_IF_ERROR(CudaError(cudaMallocHost(&p, bytes), "cudaMallocHost"));
    return DeviceBuffer(this, p, bytes, MemoryKind::kPinnedHost);
  }
  MemoryInfo GetMemoryInfo() const override {
    size_t free_b = 0, total_b = 0;
    if (cudaMemGetInfo(&free_b, &total_b) != cudaSuccess) return {};
    return {static_cast<int64_t>(free_b), static_cast<int64_t>(total_b)};
  }
  // cudaMemcpyAsync from pageable memory stages the source before returning (the documented
  // contract in backend.h); from pinned memory it is truly asynchronous.
  absl::Status CopyToDevice(void* dst, const void* src, size_t bytes) override {
    if (bytes == 0) return absl::OkStatus();
    return CudaError(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream_), "copy to device");
  }
  absl::Status CopyToHost(void* dst, const void* src, size_t bytes) override {
    if (bytes == 0) return absl::OkStatus();
    return CudaError(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream_), "copy to host");
  }
  absl::Status CopyOnDevice(void* dst, const void* src, size_t bytes) override {
    if (bytes == 0) return absl::OkStatus();
    return CudaError(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream_), "copy on device");
  }
  absl::Status Memset(void* dst, int value, size_t bytes) override {
    if (bytes == 0) return absl::OkStatus();
    return CudaError(cudaMemsetAsync(dst, value, bytes, stream_), "memset");
  }

  // Element-wise and row ops: kernels/ launchers on the stream (definitions below the class).
  absl::Status Embedding(const Tensor2D& table, const int32_t* ids, Tensor2D out) override;
  absl::Status RmsNorm(const Tensor2D& x, const Tensor2D& weight, float eps, Tensor2D out) override;
  absl::Status FusedAddRmsNorm(Tensor2D residual, const Tensor2D& x, const Tensor2D& weight, float eps,
                               Tensor2D out) override;
  // cuda_matmul.cc
  absl::Status Matmul(const Tensor2D& x, const Tensor2D& w, Tensor2D out) override;
  absl::Status AddInPlace(Tensor2D acc, const Tensor2D& x) override;
  absl::Status SiluMul(const Tensor2D& gate_up, Tensor2D out) override;
  absl::Status SumSquaresPartials(const Tensor2D& x, float* out) override;  // kernels/rms_norm.cu
  absl::Status ScaleColumns(Tensor2D w, const Tensor2D& g) override;        // kernels/elementwise.cu
  absl::Status Rope(const RopeParams& p) override;
  absl::Status WriteKv(const KvLayer& cache, const Tensor2D& k, const Tensor2D& v,
                       const int32_t* slot_mapping) override;
  absl::Status RopeKvWrite(const RopeKvWriteParams& p) override;
  // One launch (kernels::LaunchGemvRopeKvWrite) when FusedQkvApplies, else the two ops.
  absl::Status MatmulRopeKvWrite(const Tensor2D& x, const Tensor2D& w, Tensor2D out,
                                 const RopeKvWriteParams& p) override;
  // One launch (kernels::LaunchGemvSiluMul; BF16, T <= kGemvMaxRows) once Matmul has timed its
  // choice for the same operands: where that is the GEMV configuration the fused kernel shares
  // (act is then the two ops' bits), or where the fused kernel timed faster than Matmul then
  // SiluMul (once per key, cuda_matmul.cc); else the two ops.
  absl::Status MatmulSiluMul(const Tensor2D& x, const Tensor2D& w, Tensor2D gate_up, Tensor2D act) override;
  // One launch (kernels::LaunchGemvAddBf16 with the chosen configuration) where Matmul's timed
  // choice for (x, w, scratch) is a GEMV configuration and acc and scratch are BF16; else the two
  // ops.
  absl::Status MatmulAdd(const Tensor2D& x, const Tensor2D& w, Tensor2D acc, Tensor2D scratch,
                         float* sum_squares = nullptr) override;
  // kernels::kGemvNormMaxRows where GetCudaFoldedNorms() held at creation (cuda_gemv.h), under a
  // policy that allows the GEMV; else 0.
  int64_t FoldedNormRows() const override;
  // Steps of T <= GetCudaFusedNormRows() (cuda_gemv.h; off by default: measured slower) tokens
  // under a policy that allows the GEMV: one kernels::LaunchGemvNorm each (the rotary / SiLU
  // epilogue, or the plain store then RopeKvWrite where the fused QKV does not apply); else, or
  // where the operands do not suit the kernel, the unfused ops.
  bool FusesNormMatmul(int64_t tokens) const override;
  absl::Status NormMatmulRopeKvWrite(const NormedInput& in, const Tensor2D& w, Tensor2D out,
                                     const RopeKvWriteParams& p) override;
  absl::Status NormMatmulSiluMul(const NormedInput& in, const Tensor2D& w, Tensor2D gate_up, Tensor2D act) override;
  absl::Status FillWeights(const WeightFillParams& p) override;  // kernels/random_fill.cu
  // cuda_attention.cc
  absl::StatusOr<std::unique_ptr<AttentionPlan>> CreateAttentionPlan(const AttentionLimits& limits) override;
  absl::Status PlanAttention(const AttentionBatch& batch, AttentionPlan& plan) override;
  absl::Status DecodeAttention(const AttentionParams& p, const AttentionPlan& plan) override;
  absl::Status PrefillAttention(const AttentionParams& p, const AttentionPlan& plan) override;
  // LoRC latent attention (kernels/attention_latent.cu) over the same plan.
  bool SupportsLatentAttention() const override { return true; }
  bool RunsAsynchronously() const override { return true; }
  // fp8 / int8 / int4 caches: quantized by RopeKvWrite / WriteKv (kernels/rope.cu), read by every
  // attention kernel (kernels/kv_quant.cuh).
  bool SupportsQuantizedKvCache() const override { return true; }
  absl::Status LatentAttention(const LatentAttentionParams& p, const AttentionPlan& plan) override;
  // cuda_sampling.cc
  absl::Status Sample(const Tensor2D& logits, absl::Span<const SamplingRow> rows, SampleOutput* out) override;
  // A draw without prefix rows stays enqueued until FinishSample (its tokens: the pass's output
  // array); one with prefix rows completes here (they may be drawn again on the host's word).
  absl::Status BeginSample(const Tensor2D& logits, absl::Span<const SamplingRow> rows,
                           const int32_t** drawn_tokens) override;
  absl::Status FinishSample(SampleOutput* out) override;
  absl::Status TakeDrawnTokens(int32_t* ids, const int32_t* drawn, const int32_t* pairs, int32_t n,
                               int32_t vocab) override;
  // At creation (cuda_sampling.cc): the sampler's pinned staging and output buffers for typical
  // steps, so that serving rarely allocates pinned memory (cudaMallocHost maps into every context
  // of the process and can wait on another GPU's running collective).
  absl::Status ReserveSampler();
  // The sampler's counters (GetCudaSampleCounters; zeros before its first call).
  CudaSampleCounters sample_counters() const;
  absl::Status GatherRows(const Tensor2D& x, const int32_t* rows, Tensor2D out) override;

  // Token-level KV policies (cuda_kv_policy.cc; kvpolicy/README.md "On the GPU"): CORM over a
  // bf16 full-KV cache, states device-resident.
  bool SupportsKvPolicy() const override { return true; }
  absl::Status CheckKvPolicy(const kvpolicy::KvPolicyConfig& config, KvCacheDtype kv_cache_dtype, bool latent,
                             int32_t query_group) const override;
  bool KvPolicyOnDevice() const override { return true; }
  KvPolicyStateMemory KvPolicyMemory(int64_t rows, int64_t mikv_head_dim, bool mikv_latent, int64_t max_model_len,
                                     int64_t max_num_seqs) const override;
  absl::Status KvPolicyBeginStep(absl::Span<kvpolicy::SequenceKvPolicy* const> seqs, AttentionPlan& plan) override;
  absl::Status KvPolicyEndStep(absl::Span<kvpolicy::SequenceKvPolicy* const> seqs) override;
  absl::Status KvPolicyCompact(kvpolicy::SequenceKvPolicy& seq, absl::Span<const KvLayer> layers, int32_t block_size,
                               absl::Span<const int32_t> block_table, int64_t from) override;

  // One device-to-device copy per (pair, layer, K/V) for now; a single batched kernel later.
  absl::Status CopyBlocks(absl::Span<const KvLayer> layers, int32_t block_size, int32_t num_blocks,
                          absl::Span<const BlockCopy> copies) override {
    RETURN_IF_ERROR(ValidateBlockCopies(copies, num_blocks));
    for (const KvLayer& l : layers) {
      const size_t kb = static_cast<size_t>(KvLayerBlockBytes(l, false, block_size));
      const size_t vb = static_cast<size_t>(KvLayerBlockBytes(l, true, block_size));
      for (const BlockCopy& c : copies) {
        if (c.src == c.dst) continue;
        RETURN_IF_ERROR(CopyOnDevice(static_cast<char*>(l.k) + c.dst * kb, static_cast<char*>(l.k) + c.src * kb, kb));
        RETURN_IF_ERROR(CopyOnDevice(static_cast<char*>(l.v) + c.dst * vb, static_cast<char*>(l.v) + c.src * vb, vb));
      }
    }
    return absl::OkStatus();
  }

  // Host KV tier (cuda_host_kv.cc): batched copies on a second stream (copy_stream_), ordered
  // against stream_ with events (backend.h states the contract).
  absl::Status OffloadKvBlocks(absl::Span<const KvLayer> layers, int32_t block_size, int32_t num_blocks,
                               HostKvStorage& host, absl::Span<const HostBlockCopy> copies) override;
  absl::Status LoadKvBlocks(absl::Span<const KvLayer> layers, int32_t block_size, int32_t num_blocks,
                            const HostKvStorage& host, absl::Span<const HostBlockCopy> copies) override;
  absl::Status WaitKvTransfers() override;
  absl::Status SynchronizeKvTransfers() override;

 protected:
  void Free(void* data, MemoryKind kind) override {
    if (kind == MemoryKind::kPinnedHost) {
      cudaFreeHost(data);
    } else {
      cudaFree(data);
    }
  }

 private:
  int device_;
  std::string description_;
  cudaStream_t stream_;
  bool capturing_ = false;
  std::shared_ptr<MatmulState> matmul_ = NewMatmulState();  // cuda_matmul.cc
  int64_t fused_norm_rows_ = -1;  // BackendOptions::fused_norm_rows (-1: GetCudaFusedNormRows())
  std::unique_ptr<CudaSampler, CudaSamplerDeleter> sampler_;  // cuda_sampling.cc, ReserveSampler
  // Whether this call's pass may select prefixes (not while the sampler backs off; counts down).
  bool TakePrefix();
  // After a pass with `num_prefix` prefix rows finished into `out`: rows that came back
  // kSampleRedo drawn again sorted whole, the redo rate and back-off updated.
  absl::Status RedoPrefixRows(const Tensor2D& logits, absl::Span<const SamplingRow> rows, int32_t num_prefix,
                              SampleOutput* out);
  // cuda_kv_policy.cc: the step's policy entries (made by KvPolicyBeginStep), and the policy
  // decode over the decode (`decode`) or prompt entries of the layer of p.kv_policy.
  std::unique_ptr<CudaKvPolicyStep, CudaKvPolicyStepDeleter> kv_policy_step_;
  absl::Status KvPolicyAttention(const AttentionParams& p, const AttentionPlan& plan, bool decode);
  // cuda_kv_policy.cc: CORM's decode over a LoRC latent layer for every entry of the step, decodes
  // and prompt rows (`a`: the layer's kernel arguments, LatentAttention's checks passed).
  absl::Status KvPolicyLatentAttention(const LatentAttentionParams& p, const kernels::LatentAttentionArgs& a);
  // cuda_attention.cc: takes batch sequences `seqs` (ascending) out of the plan's prefills (the
  // plain paged prefill kernel skips them; KV policy prompts read through the slot map).
  absl::Status ExcludePlainPrefills(AttentionPlan& plan, absl::Span<const int32_t> seqs);
  // Host KV tier (cuda_host_kv.cc), made on first use: the copy stream, an event marking the
  // compute stream's end when a transfer is enqueued, an event after the last transfer; whether
  // stream_ / the host have waited for that last event yet.
  absl::Status TransferKvBlocks(const char* what, absl::Span<const KvLayer> layers, int32_t block_size,
                                int32_t num_blocks, const HostKvStorage& host,
                                absl::Span<const HostBlockCopy> copies, bool to_host);
  void DestroyCopyStream();
  cudaStream_t copy_stream_ = nullptr;
  cudaEvent_t compute_mark_ = nullptr;
  cudaEvent_t transfers_done_ = nullptr;
  bool compute_waited_ = true;
  bool host_waited_ = true;
  KvTransferSegments segments_;
};

}  // namespace lorc::cuda_internal

#endif  // LORC_HAVE_CUDA
