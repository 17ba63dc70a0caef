// CudaBackend::Matmul: cuBLASLt GEMMs (the CUDA backend issue). Not implemented yet.
#include "backend/cuda_backend_impl.h"

#ifdef LORC_HAVE_CUDA
namespace lorc::cuda_internal {

absl::Status CudaBackend::Matmul(const Tensor2D&, const Tensor2D&, Tensor2D) { return NoKernel("Matmul"); }

}  // namespace lorc::cuda_internal
#endif
