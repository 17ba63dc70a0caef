// Shared by the NCCL communicator tests: NVLink multicast off, the tests' CommOptions and, in
// CUDA builds (LORC_COMM_TEST_CUDA), the GPU count and CUDA_ASSERT.
#pragma once

#include <cstdlib>
#include <string>

#include "absl/time/time.h"
#include "gtest/gtest.h"
#include "worker/comm/communicator.h"

#if LORC_COMM_TEST_CUDA
#include <cuda_runtime.h>
#endif

namespace lorc::testing {

// NVLink multicast (NVLS) must stay off on the GPU hosts; set before NCCL reads its environment.
inline const bool kNvlsDisabled = [] {
  setenv("NCCL_NVLS_ENABLE", "0", 1);
  return true;
}();

// Generous join and op timeouts (120 s): GPU hosts may be slow to initialize NCCL.
inline CommOptions TestCommOptions(const std::string& group) {
  CommOptions o;
  o.group = group;
  o.join_timeout = absl::Seconds(120);
  o.op_timeout = absl::Seconds(120);
  return o;
}

#if LORC_COMM_TEST_CUDA
// Number of usable GPUs, 0 when the runtime has no driver or device.
inline int GpuCount() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the error state
    return 0;
  }
  return n;
}

#define CUDA_ASSERT(expr)                                                  \
  do {                                                                     \
    cudaError_t e_ = (expr);                                               \
    ASSERT_EQ(e_, cudaSuccess) << #expr << ": " << cudaGetErrorString(e_); \
  } while (0)
#endif

}  // namespace lorc::testing
