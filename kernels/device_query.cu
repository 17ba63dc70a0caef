#include "kernels/device_query.cuh"

#include <cstring>

#include "common/env_switch.h"

namespace lorc::kernels {

cudaError_t QueryCudaDevices(CudaDeviceProps* out, int max, int* count) {
  *count = 0;
  int n = 0;
  cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) return err;
  *count = n;
  for (int i = 0; i < n && i < max; ++i) {
    cudaDeviceProp p;
    err = cudaGetDeviceProperties(&p, i);
    if (err != cudaSuccess) return err;
    std::strncpy(out[i].name, p.name, sizeof(out[i].name) - 1);
    out[i].name[sizeof(out[i].name) - 1] = '\0';
    out[i].total_memory_bytes = p.totalGlobalMem;
    out[i].compute_major = p.major;
    out[i].compute_minor = p.minor;
    out[i].multiprocessors = p.multiProcessorCount;
  }
  return cudaSuccess;
}

bool TensorCoreKernelsEnabled(const char* off_switch) {
  int dev = 0, major = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return major >= 8 && EnvFlag(off_switch, true);
}

cudaError_t QueryCudaVersions(int* runtime_version, int* driver_version) {
  cudaError_t err = cudaRuntimeGetVersion(runtime_version);
  if (err != cudaSuccess) return err;
  return cudaDriverGetVersion(driver_version);
}

}  // namespace lorc::kernels
