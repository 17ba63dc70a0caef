// The CPU reference and the CUDA backend side by side, for the GPU parity tests
// (cuda_kernels_test, cuda_attention_test, cuda_sampling_test). SetUp skips the test when there
// is no CUDA device: the only reason a GPU test may skip.
#pragma once

#include <memory>
#include <utility>

#include "backend/backend.h"
#include "backend/cuda_backend.h"
#include "gtest/gtest.h"
#include "tests/testing/status_matchers.h"

namespace lorc {

template <typename Base = ::testing::Test>
class CpuCudaPair : public Base {
 protected:
  void SetUp() override {
    auto devices = ListCudaDevices();
    if (!devices.ok() || devices->empty()) GTEST_SKIP() << "no CUDA device: " << devices.status();
    auto cpu = CreateBackend(BackendOptions{BackendKind::kCpu});
    ASSERT_OK(cpu);
    cpu_ = std::move(*cpu);
    auto cuda = CreatePartialCudaBackend(BackendOptions{BackendKind::kCuda});
    ASSERT_OK(cuda);
    cuda_ = std::move(*cuda);
  }

  std::unique_ptr<Backend> cpu_;   // the reference
  std::unique_ptr<Backend> cuda_;  // under test
};

}  // namespace lorc
