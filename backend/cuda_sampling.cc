// CudaBackend::Sample: the sampling contract of backend/sampling.h on the GPU (the CUDA backend
// issue). Not implemented yet.
#include "backend/cuda_backend_impl.h"

#ifdef LORC_HAVE_CUDA
namespace lorc::cuda_internal {

absl::Status CudaBackend::Sample(const Tensor2D&, absl::Span<const SamplingRow>, SampleOutput*) {
  return NoKernel("Sample");
}

}  // namespace lorc::cuda_internal
#endif
