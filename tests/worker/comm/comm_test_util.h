// Shared by the NCCL communicator tests: NVLink multicast off, the tests' CommOptions and, in
// CUDA builds (LORC_COMM_TEST_CUDA), the GPU count and CUDA_ASSERT.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

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

// The custom all-reduce tests' inputs: bf16 bits of rank `rank`'s element i in case `c` (random
// sign, exponent in [-8, 7], mantissa, so that the sums need rounding), `count` of them.
inline std::vector<uint16_t> AllReduceInputs(int rank, int c, int64_t count) {
  std::vector<uint16_t> v(count);
  for (int64_t i = 0; i < count; ++i) {
    uint64_t x = (static_cast<uint64_t>(rank) << 56) ^ (static_cast<uint64_t>(c) << 40) ^ static_cast<uint64_t>(i);
    x = (x ^ (x >> 31)) * 0x7fb5d329728ea185ull;
    x = (x ^ (x >> 27)) * 0x81dadef4bc2dd44dull;
    x ^= x >> 33;
    const uint16_t sign = static_cast<uint16_t>((x & 1) << 15);
    const uint16_t exponent = static_cast<uint16_t>(127 - 8 + ((x >> 1) & 15));
    const uint16_t mantissa = static_cast<uint16_t>((x >> 8) & 127);
    v[i] = static_cast<uint16_t>(sign | (exponent << 7) | mantissa);
  }
  return v;
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
