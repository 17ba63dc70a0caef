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

// Whether the tensor-core kernels serve the current device: sm_80+ (mma.sync bf16, cp.async)
// and the environment variable `off_switch` not 0 (the A/B switch of their measurements: the
// CUDA-core kernels instead; read by common/env_switch.h's EnvFlag: 0 or 1, another value is
// reported and leaves them on). False when the device cannot be queried (the error cleared). Not
// cached: callers read it once.
bool TensorCoreKernelsEnabled(const char* off_switch);

// CUDA runtime and driver versions (e.g. 13000 for 13.0).
cudaError_t QueryCudaVersions(int* runtime_version, int* driver_version);

}  // namespace lorc::kernels
