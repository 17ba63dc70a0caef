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
  // Matmul read a 1 GiB weight at M = 1 at 4.438 TB/s (gemm_bench ceilings, 2026-12-06): faster than
  // the copy, so the decode floor divides by it.
  EXPECT_DOUBLE_EQ(c->decode_tbps(), 4.438);
}

TEST(DeviceCeilings, TheH100sDecodeFloorIsItsWeightReadWhichBeatsItsCopy) {
  // As CudaBackend::Describe() printed it on the lent H100 (docs/data, 2026-12-05).
  const std::optional<DeviceCeilings> c = CeilingsFor(
      "NVIDIA H100 80GB HBM3 (device 0, sm_90, 132 SMs, 81079 MiB), CUDA runtime 13.0, driver 13.0");
  ASSERT_TRUE(c.has_value());
  EXPECT_EQ(std::string_view(c->name), "H100");
  EXPECT_DOUBLE_EQ(c->copy_tbps, 2.447);
  EXPECT_DOUBLE_EQ(c->decode_tbps(), 3.152);
  // The H200's row is not the H100's, nor the other way round.
  EXPECT_EQ(std::string_view(CeilingsFor("NVIDIA H200")->name), "H200");
}

TEST(DeviceCeilings, ADeviceWithoutARowHasNone) {
  EXPECT_FALSE(CeilingsFor("cpu: fp32, OpenBLAS 0.3.21, 1 BLAS threads").has_value());
  // Not measured: no floor rather than another device's.
  EXPECT_FALSE(CeilingsFor("NVIDIA A100-SXM4-80GB (device 0, sm_80, 108 SMs, 81037 MiB)").has_value());
  EXPECT_FALSE(CeilingsFor("").has_value());
}

TEST(DeviceCeilings, EveryRowIsPositiveAndSaysWhereItWasMeasured) {
  for (const DeviceCeilings& c : kDeviceCeilings) {
    ASSERT_NE(c.name, nullptr);
    ASSERT_NE(c.measured, nullptr);
    EXPECT_FALSE(std::string_view(c.name).empty());
    EXPECT_GT(c.copy_tbps, 0.0) << c.name;
    EXPECT_GT(c.gemm_peak_tflops, 0.0) << c.name;
    EXPECT_GE(c.weight_read_tbps, 0.0) << c.name;
    EXPECT_GE(c.decode_tbps(), c.copy_tbps) << c.name;
    EXPECT_FALSE(std::string_view(c.measured).empty()) << c.name;
  }
}

}  // namespace
}  // namespace lorc
