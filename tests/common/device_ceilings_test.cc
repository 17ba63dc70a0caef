// common/device_ceilings.h: the bench floors' per-device ceilings are found by the device name the
// CUDA backend describes itself with, and a device without a row gets none (no made-up floor).
#include "common/device_ceilings.h"

#include <string_view>

#include "gtest/gtest.h"

namespace lorc {
namespace {

TEST(DeviceCeilings, TheH200IsFoundByTheNameTheCudaBackendReports) {
  // As CudaBackend::Describe() printed it on the lent H200 (docs/data, 2026-12-01).
  const std::optional<DeviceCeilings> c = CeilingsFor(
      "NVIDIA H200 (device 0, sm_90, 132 SMs, 143155 MiB), CUDA runtime 13.0, driver 13.0");
  ASSERT_TRUE(c.has_value());
  EXPECT_EQ(std::string_view(c->name), "H200");
  EXPECT_DOUBLE_EQ(c->copy_tbps, 4.275);
  EXPECT_DOUBLE_EQ(c->gemm_peak_tflops, 696.0);
}

TEST(DeviceCeilings, ADeviceWithoutARowHasNone) {
  EXPECT_FALSE(CeilingsFor("cpu: fp32, OpenBLAS 0.3.21, 1 BLAS threads").has_value());
  // Not measured yet (docs/PERFORMANCE.md, 2026-12-05): no floor rather than the H200's.
  EXPECT_FALSE(CeilingsFor("NVIDIA H100 80GB HBM3 (device 0, sm_90, 132 SMs, 81559 MiB)").has_value());
  EXPECT_FALSE(CeilingsFor("").has_value());
}

TEST(DeviceCeilings, EveryRowIsPositiveAndSaysWhereItWasMeasured) {
  for (const DeviceCeilings& c : kDeviceCeilings) {
    ASSERT_NE(c.name, nullptr);
    ASSERT_NE(c.measured, nullptr);
    EXPECT_FALSE(std::string_view(c.name).empty());
    EXPECT_GT(c.copy_tbps, 0.0) << c.name;
    EXPECT_GT(c.gemm_peak_tflops, 0.0) << c.name;
    EXPECT_FALSE(std::string_view(c.measured).empty()) << c.name;
  }
}

}  // namespace
}  // namespace lorc
