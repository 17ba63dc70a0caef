#include "backend/cuda_backend.h"

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

absl::StatusOr<std::unique_ptr<Backend>> CreateCudaBackend(const BackendOptions& options) {
  ASSIGN_OR_RETURN(std::vector<CudaDeviceInfo> devices, ListCudaDevices());
  if (options.device < 0 || options.device >= static_cast<int>(devices.size())) {
    return absl::FailedPreconditionError(absl::StrCat("CUDA device ", options.device, " not present (",
                                                      devices.size(), " devices)"));
  }
  return absl::UnimplementedError(
      "the CUDA backend's forward-pass kernels are not part of this build yet; use --backend cpu");
}

#else  // !LORC_HAVE_CUDA

bool CudaCompiledIn() { return false; }
absl::StatusOr<std::vector<CudaDeviceInfo>> ListCudaDevices() {
  return absl::UnimplementedError("built without CUDA");
}
std::string CudaVersionString() { return "not compiled in"; }
absl::StatusOr<std::unique_ptr<Backend>> CreateCudaBackend(const BackendOptions&) {
  return absl::UnimplementedError("the CUDA backend is not compiled into this binary (built without nvcc)");
}

#endif

}  // namespace lorc
