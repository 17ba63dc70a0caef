// CUDA device discovery. Framework-free: plain CUDA runtime types, no Abseil.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

namespace lorc::kernels {

struct CudaDeviceProps {
  char name[256];
  size_t total_memory_bytes;
  int compute_major;
  int compute_minor;
  int multiprocessors;
};

// Fills up to `max` entries of `out`; `*count` receives the number of devices present.
// Returns the runtime's error (cudaErrorNoDevice, cudaErrorInsufficientDriver, ...) as is.
cudaError_t QueryCudaDevices(CudaDeviceProps* out, int max, int* count);

// CUDA runtime and driver versions (e.g. 13000 for 13.0).
cudaError_t QueryCudaVersions(int* runtime_version, int* driver_version);

}  // namespace lorc::kernels
