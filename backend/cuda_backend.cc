#include "backend/cuda_backend.h"

#include <memory>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

#ifdef LORC_HAVE_CUDA
#include "kernels/device_query.cuh"
#endif

namespace lorc {

#ifdef LORC_HAVE_CUDA

bool CudaCompiledIn() { return true; }

absl::StatusOr<std::vector<CudaDeviceInfo>> ListCudaDevices() {
  kernels::CudaDeviceProps props[16];
  int count = 0;
  const cudaError_t err = kernels::QueryCudaDevices(props, 16, &count);
  if (err != cudaSuccess) {
    return absl::UnavailableError(absl::StrCat("CUDA: ", cudaGetErrorString(err)));
  }
  std::vector<CudaDeviceInfo> out;
  for (int i = 0; i < count && i < 16; ++i) {
    out.push_back({i, props[i].name, static_cast<int64_t>(props[i].total_memory_bytes),
                   props[i].compute_major, props[i].compute_minor, props[i].multiprocessors});
  }
  return out;
}

std::string CudaVersionString() {
  int rt = 0, drv = 0;
  const cudaError_t err = kernels::QueryCudaVersions(&rt, &drv);
  const std::string runtime = absl::StrCat(rt / 1000, ".", (rt % 1000) / 10);
  if (err != cudaSuccess) return absl::StrCat("runtime ", runtime, ", driver: ", cudaGetErrorString(err));
  if (drv == 0) return absl::StrCat("runtime ", runtime, ", no driver");
  return absl::StrCat("runtime ", runtime, ", driver ", drv / 1000, ".", (drv % 1000) / 10);
}

namespace {

absl::Status CudaError(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return absl::OkStatus();
  const std::string msg = absl::StrCat("cuda backend: ", what, ": ", cudaGetErrorString(e));
  if (e == cudaErrorMemoryAllocation) return absl::ResourceExhaustedError(msg);
  if (e == cudaErrorStreamCaptureUnsupported || e == cudaErrorStreamCaptureInvalidated ||
      e == cudaErrorIllegalState) {
    return absl::FailedPreconditionError(msg);
  }
  return absl::InternalError(msg);
}

absl::Status NoKernel(const char* op) {
  return absl::UnimplementedError(absl::StrCat("cuda backend: ", op,
                                               ": kernel not implemented yet (use --backend cpu)"));
}

class CudaEvent final : public Event {
 public:
  ~CudaEvent() override {
    if (event != nullptr) cudaEventDestroy(event);
  }
  cudaEvent_t event = nullptr;
};

class CudaGraph final : public Graph {
 public:
  ~CudaGraph() override {
    if (exec != nullptr) cudaGraphExecDestroy(exec);
  }
  cudaGraphExec_t exec = nullptr;
};

// The runtime half of the CUDA backend: one non-blocking stream on one device, events, graph
// capture, device and pinned memory, async copies and CopyBlocks. Compute ops report
// Unimplemented until kernels/ has them. The device is made current on the creating thread,
// which must be the thread that uses the backend (the worker's engine thread).
class CudaBackend final : public Backend {
 public:
  CudaBackend(int device, std::string description, cudaStream_t stream)
      : device_(device), description_(std::move(description)), stream_(stream) {}
  ~CudaBackend() override {
    cudaSetDevice(device_);
    cudaStreamSynchronize(stream_);
    cudaStreamDestroy(stream_);
  }

  const char* name() const override { return "cuda"; }
  std::string Describe() const override { return description_; }

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

  absl::Status Embedding(const Tensor2D&, const int32_t*, Tensor2D) override { return NoKernel("Embedding"); }
  absl::Status RmsNorm(const Tensor2D&, const Tensor2D&, float, Tensor2D) override { return NoKernel("RmsNorm"); }
  absl::Status FusedAddRmsNorm(Tensor2D, const Tensor2D&, const Tensor2D&, float, Tensor2D) override {
    return NoKernel("FusedAddRmsNorm");
  }
  absl::Status Matmul(const Tensor2D&, const Tensor2D&, Tensor2D) override { return NoKernel("Matmul"); }
  absl::Status AddInPlace(Tensor2D, const Tensor2D&) override { return NoKernel("AddInPlace"); }
  absl::Status SiluMul(const Tensor2D&, Tensor2D) override { return NoKernel("SiluMul"); }
  absl::Status Rope(const RopeParams&) override { return NoKernel("Rope"); }
  absl::Status WriteKv(const KvLayer&, const Tensor2D&, const Tensor2D&, const int32_t*) override {
    return NoKernel("WriteKv");
  }
  absl::Status RopeKvWrite(const RopeKvWriteParams&) override { return NoKernel("RopeKvWrite"); }
  absl::StatusOr<std::unique_ptr<AttentionPlan>> CreateAttentionPlan(const AttentionLimits&) override {
    return NoKernel("CreateAttentionPlan");
  }
  absl::Status PlanAttention(const AttentionBatch&, AttentionPlan&) override { return NoKernel("PlanAttention"); }
  absl::Status DecodeAttention(const AttentionParams&, const AttentionPlan&) override {
    return NoKernel("DecodeAttention");
  }
  absl::Status PrefillAttention(const AttentionParams&, const AttentionPlan&) override {
    return NoKernel("PrefillAttention");
  }
  absl::Status Sample(const Tensor2D&, absl::Span<const SamplingRow>, SampleOutput*) override {
    return NoKernel("Sample");
  }
  absl::Status GatherRows(const Tensor2D&, const int32_t*, Tensor2D) override { return NoKernel("GatherRows"); }

  // One device-to-device copy per (pair, layer, K/V) for now; a single batched kernel later.
  absl::Status CopyBlocks(absl::Span<const KvLayer> layers, int32_t block_size, int32_t num_blocks,
                          absl::Span<const BlockCopy> copies) override {
    RETURN_IF_ERROR(ValidateBlockCopies(copies, num_blocks));
    for (const KvLayer& l : layers) {
      const size_t esz = DTypeSize(l.dtype);
      const size_t kb = static_cast<size_t>(block_size) * l.k_width * esz;
      const size_t vb = static_cast<size_t>(block_size) * l.v_width * esz;
      for (const BlockCopy& c : copies) {
        if (c.src == c.dst) continue;
        RETURN_IF_ERROR(CopyOnDevice(static_cast<char*>(l.k) + c.dst * kb, static_cast<char*>(l.k) + c.src * kb, kb));
        RETURN_IF_ERROR(CopyOnDevice(static_cast<char*>(l.v) + c.dst * vb, static_cast<char*>(l.v) + c.src * vb, vb));
      }
    }
    return absl::OkStatus();
  }

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
};

}  // namespace

absl::StatusOr<std::unique_ptr<Backend>> CreateCudaBackendWithoutKernels(const BackendOptions& options) {
  ASSIGN_OR_RETURN(std::vector<CudaDeviceInfo> devices, ListCudaDevices());
  if (options.device < 0 || options.device >= static_cast<int>(devices.size())) {
    return absl::FailedPreconditionError(absl::StrCat("CUDA device ", options.device, " not present (",
                                                      devices.size(), " devices)"));
  }
  RETURN_IF_ERROR(CudaError(cudaSetDevice(options.device), "set device"));
  cudaStream_t stream = nullptr;
  RETURN_IF_ERROR(CudaError(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "create stream"));
  const CudaDeviceInfo& d = devices[options.device];
  return std::unique_ptr<Backend>(new CudaBackend(
      options.device,
      absl::StrCat(d.name, " (device ", d.ordinal, ", sm_", d.compute_major, d.compute_minor, ", ",
                   d.multiprocessors, " SMs, ", d.memory_bytes >> 20, " MiB), CUDA ", CudaVersionString()),
      stream));
}

absl::StatusOr<std::unique_ptr<Backend>> CreateCudaBackend(const BackendOptions& options) {
  // Fails early with the runtime's reason when there is no usable device.
  ASSIGN_OR_RETURN(std::unique_ptr<Backend> runtime, CreateCudaBackendWithoutKernels(options));
  return absl::UnimplementedError(
      "the CUDA backend's forward-pass kernels are not part of this build yet; use --backend cpu");
}

#else  // !LORC_HAVE_CUDA

bool CudaCompiledIn() { return false; }
absl::StatusOr<std::vector<CudaDeviceInfo>> ListCudaDevices() {
  return absl::UnimplementedError("built without CUDA");
}
std::string CudaVersionString() { return "not compiled in"; }
absl::StatusOr<std::unique_ptr<Backend>> CreateCudaBackendWithoutKernels(const BackendOptions&) {
  return absl::UnimplementedError("the CUDA backend is not compiled into this binary (built without nvcc)");
}
absl::StatusOr<std::unique_ptr<Backend>> CreateCudaBackend(const BackendOptions&) {
  return absl::UnimplementedError("the CUDA backend is not compiled into this binary (built without nvcc)");
}

#endif

}  // namespace lorc
