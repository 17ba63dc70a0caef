// The CPU reference and the CUDA backend side by side, for the GPU parity tests
// (cuda_kernels_test, cuda_attention_test, cuda_sampling_test). SetUp skips the test when there
// is no CUDA device: the only reason a GPU test may skip.
#pragma once

#include <algorithm>
#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "backend/backend.h"
#include "backend/cuda_backend.h"
#include "common/check.h"
#include "common/dtype.h"
#include "gtest/gtest.h"
#include "tests/testing/status_matchers.h"

namespace lorc {

// Host <-> backend values for the parity tests: F32 values stored as `d` (F32, BF16 or F16;
// rounded to nearest even) and read back as F32. CHECK-fails on a backend error (tests only).
namespace parity {

inline DeviceBuffer Put(Backend& be, const std::vector<float>& v, DType d) {
  const size_t n = v.size(), esz = DTypeSize(d);
  auto buf = be.Allocate(std::max<size_t>(1, n) * esz);
  CHECK(buf.ok()) << buf.status();
  if (d == DType::kBF16 || d == DType::kF16) {
    std::vector<uint16_t> h(n);
    for (size_t i = 0; i < n; ++i) h[i] = d == DType::kBF16 ? F32ToBf16(v[i]) : F32ToF16(v[i]);
    CHECK_OK(be.CopyToDevice(buf->data(), h.data(), n * esz));
  } else {
    CHECK_OK(be.CopyToDevice(buf->data(), v.data(), n * esz));
  }
  CHECK_OK(be.Synchronize());
  return std::move(*buf);
}

template <typename T>
DeviceBuffer PutRaw(Backend& be, const std::vector<T>& v) {
  auto buf = be.Allocate(std::max<size_t>(1, v.size()) * sizeof(T));
  CHECK(buf.ok()) << buf.status();
  CHECK_OK(be.CopyToDevice(buf->data(), v.data(), v.size() * sizeof(T)));
  CHECK_OK(be.Synchronize());
  return std::move(*buf);
}

inline std::vector<float> Get(Backend& be, const DeviceBuffer& b, DType d) {
  const size_t n = b.bytes() / DTypeSize(d);
  std::vector<float> out(n);
  if (d == DType::kBF16 || d == DType::kF16) {
    std::vector<uint16_t> h(n);
    CHECK_OK(be.CopyToHost(h.data(), b.data(), n * 2));
    CHECK_OK(be.Synchronize());
    for (size_t i = 0; i < n; ++i) out[i] = d == DType::kBF16 ? Bf16ToF32(h[i]) : F16ToF32(h[i]);
  } else {
    CHECK_OK(be.CopyToHost(out.data(), b.data(), n * 4));
    CHECK_OK(be.Synchronize());
  }
  return out;
}

}  // namespace parity

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
