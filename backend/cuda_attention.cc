// CudaBackend's paged attention: plan, decode (split-KV) and prefill (the CUDA backend issue).
// Not implemented yet.
#include "backend/cuda_backend_impl.h"

#ifdef LORC_HAVE_CUDA
namespace lorc::cuda_internal {

absl::StatusOr<std::unique_ptr<AttentionPlan>> CudaBackend::CreateAttentionPlan(const AttentionLimits&) {
  return NoKernel("CreateAttentionPlan");
}
absl::Status CudaBackend::PlanAttention(const AttentionBatch&, AttentionPlan&) { return NoKernel("PlanAttention"); }
absl::Status CudaBackend::DecodeAttention(const AttentionParams&, const AttentionPlan&) {
  return NoKernel("DecodeAttention");
}
absl::Status CudaBackend::PrefillAttention(const AttentionParams&, const AttentionPlan&) {
  return NoKernel("PrefillAttention");
}

}  // namespace lorc::cuda_internal
#endif
