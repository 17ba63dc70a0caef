// The CUDA backend's host KV tier (backend.h: OffloadKvBlocks / LoadKvBlocks): every block,
// layer and side of one call is one segment of one cudaMemcpyBatchAsync (CUDA 12.8+; one
// cudaMemcpyAsync per segment before) on the backend's copy stream, between pinned host memory
// (HostKvStorage) and the KV cache. Ordering: the copy stream first waits for an event recorded
// on the compute stream (the copies see every write enqueued before them); an event after the
// copies is what WaitKvTransfers makes the compute stream wait for and SynchronizeKvTransfers
// makes the host wait for. Until then the copies run on the copy engines next to the compute
// stream's kernels.
#ifdef LORC_HAVE_CUDA

#include <cuda_runtime.h>

#include "absl/strings/str_cat.h"
#include "backend/cuda_backend_impl.h"
#include "common/status_macros.h"

namespace lorc::cuda_internal {
namespace {

// Enqueues every segment on `stream`, in order.
cudaError_t BatchCopy(const KvTransferSegments& s, cudaStream_t stream) {
  const size_t n = s.sizes.size();
  if (n == 0) return cudaSuccess;
#if CUDART_VERSION >= 12080
  cudaMemcpyAttributes attr{};
  attr.srcAccessOrder = cudaMemcpySrcAccessOrderStream;  // sources are read in stream order
  attr.flags = cudaMemcpyFlagPreferOverlapWithCompute;
  size_t first = 0;
#if CUDART_VERSION >= 13000
  cudaError_t e = cudaMemcpyBatchAsync(s.dsts.data(), s.srcs.data(), s.sizes.data(), n, &attr,
                                       &first, 1, stream);
#else
  size_t fail = 0;
  cudaError_t e = cudaMemcpyBatchAsync(const_cast<void**>(s.dsts.data()),
                                       const_cast<void**>(s.srcs.data()),
                                       const_cast<size_t*>(s.sizes.data()), n, &attr, &first, 1,
                                       &fail, stream);
#endif
  if (e == cudaSuccess) return e;
  // A driver without batched copies (or one refusing this batch): one copy per segment; a real
  // fault fails those too and is reported from there.
  (void)cudaGetLastError();
#endif
  for (size_t i = 0; i < n; ++i) {
    const cudaError_t e1 = cudaMemcpyAsync(s.dsts[i], s.srcs[i], s.sizes[i], cudaMemcpyDefault, stream);
    if (e1 != cudaSuccess) return e1;
  }
  return cudaSuccess;
}

}  // namespace

absl::Status CudaBackend::OffloadKvBlocks(absl::Span<const KvLayer> layers, int32_t block_size,
                                          int32_t num_blocks, HostKvStorage& host,
                                          absl::Span<const HostBlockCopy> copies) {
  return TransferKvBlocks("kv_offloads", layers, block_size, num_blocks, host, copies, true);
}

absl::Status CudaBackend::LoadKvBlocks(absl::Span<const KvLayer> layers, int32_t block_size,
                                       int32_t num_blocks, const HostKvStorage& host,
                                       absl::Span<const HostBlockCopy> copies) {
  return TransferKvBlocks("kv_loads", layers, block_size, num_blocks, host, copies, false);
}

absl::Status CudaBackend::TransferKvBlocks(const char* what, absl::Span<const KvLayer> layers,
                                           int32_t block_size, int32_t num_blocks,
                                           const HostKvStorage& host,
                                           absl::Span<const HostBlockCopy> copies, bool to_host) {
  RETURN_IF_ERROR(ValidateKvTransfer(name(), what, layers, block_size, num_blocks, host, copies));
  if (copies.empty()) return absl::OkStatus();
  if (capturing_) {
    return absl::FailedPreconditionError(
        absl::StrCat("cuda backend: ", what, ": host KV copies cannot be captured into a graph"));
  }
  if (copy_stream_ == nullptr) {
    RETURN_IF_ERROR(CudaError(cudaStreamCreateWithFlags(&copy_stream_, cudaStreamNonBlocking),
                              "create the KV copy stream"));
    RETURN_IF_ERROR(CudaError(cudaEventCreateWithFlags(&compute_mark_, cudaEventDisableTiming), "event"));
    RETURN_IF_ERROR(CudaError(cudaEventCreateWithFlags(&transfers_done_, cudaEventDisableTiming), "event"));
  }
  segments_.dsts.clear();
  segments_.srcs.clear();
  segments_.sizes.clear();
  AppendKvTransferSegments(layers, host, copies, to_host, &segments_);
  RETURN_IF_ERROR(CudaError(cudaEventRecord(compute_mark_, stream_), what));
  RETURN_IF_ERROR(CudaError(cudaStreamWaitEvent(copy_stream_, compute_mark_, 0), what));
  RETURN_IF_ERROR(CudaError(BatchCopy(segments_, copy_stream_), what));
  RETURN_IF_ERROR(CudaError(cudaEventRecord(transfers_done_, copy_stream_), what));
  compute_waited_ = false;
  host_waited_ = false;
  return absl::OkStatus();
}

absl::Status CudaBackend::WaitKvTransfers() {
  if (compute_waited_) return absl::OkStatus();
  RETURN_IF_ERROR(CudaError(cudaStreamWaitEvent(stream_, transfers_done_, 0), "wait for KV transfers"));
  compute_waited_ = true;
  return absl::OkStatus();
}

absl::Status CudaBackend::SynchronizeKvTransfers() {
  if (host_waited_) return absl::OkStatus();
  RETURN_IF_ERROR(CudaError(cudaEventSynchronize(transfers_done_), "synchronize KV transfers"));
  host_waited_ = true;
  compute_waited_ = true;  // done: nothing left to wait for
  return absl::OkStatus();
}

void CudaBackend::DestroyCopyStream() {
  if (copy_stream_ == nullptr) return;
  cudaStreamSynchronize(copy_stream_);
  cudaEventDestroy(compute_mark_);
  cudaEventDestroy(transfers_done_);
  cudaStreamDestroy(copy_stream_);
  copy_stream_ = nullptr;
}

}  // namespace lorc::cuda_internal

#endif  // LORC_HAVE_CUDA
