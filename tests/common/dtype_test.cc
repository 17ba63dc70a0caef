#include "common/dtype.h"

#include <cmath>
#include <random>

#include "gtest/gtest.h"
#include "tests/testing/status_matchers.h"

namespace lorc {
namespace {

using ::lorc::testing::StatusIs;
using ::testing::HasSubstr;

TEST(DTypeTest, Bf16RoundTripsExactlyRepresentableValues) {
  for (float v : {0.0f, 1.0f, -2.5f, 1024.0f, 0.15625f}) {
    EXPECT_EQ(Bf16ToF32(F32ToBf16(v)), v);
  }
}

TEST(DTypeTest, Bf16RoundsToNearestEven) {
  // 1 + 2^-8 is exactly half-way between two bf16 values (1 and 1 + 2^-7): ties go to even (1).
  EXPECT_EQ(Bf16ToF32(F32ToBf16(1.0f + std::ldexp(1.0f, -8))), 1.0f);
  EXPECT_EQ(Bf16ToF32(F32ToBf16(1.0f + 3 * std::ldexp(1.0f, -8))), 1.0f + std::ldexp(1.0f, -6));
}

TEST(DTypeTest, F16RoundTripAndSpecialValues) {
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> d(-60000.f, 60000.f);
  for (int i = 0; i < 10000; ++i) {
    const float v = d(rng);
    const float r = F16ToF32(F32ToF16(v));
    EXPECT_NEAR(r, v, std::abs(v) * 1e-3f + 1e-7f);
    EXPECT_EQ(F32ToF16(r), F32ToF16(v));  // idempotent
  }
  EXPECT_EQ(F16ToF32(0x3c00), 1.0f);
  EXPECT_EQ(F16ToF32(0x0001), std::ldexp(1.0f, -24));  // smallest subnormal
  EXPECT_TRUE(std::isinf(F16ToF32(0x7c00)));
  EXPECT_TRUE(std::isnan(F16ToF32(0x7e00)));
  EXPECT_EQ(F32ToF16(1e6f), 0x7c00);
}

TEST(DTypeTest, ParseRejectsUnknownDtype) {
  EXPECT_THAT(ParseSafetensorsDType("F8_E4M3"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("F8_E4M3")));
  EXPECT_EQ(*ParseSafetensorsDType("BF16"), DType::kBF16);
}

}  // namespace
}  // namespace lorc
