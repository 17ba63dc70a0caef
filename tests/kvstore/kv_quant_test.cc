// kernels/kv_quant.h, the quantize / dequantize math of --kv-cache-dtype fp8 / int8 / int4 (and
// bf16 through common/dtype.h): scalar conversions against exhaustive or independent references,
// and per-dtype round-trip error bounds on random rows and edge cases (all zeros, one huge
// outlier, all negative, constant, tiny values, head widths that are not a multiple of the int4
// group, odd widths).
#include "kernels/kv_quant.h"

#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "common/dtype.h"
#include "gtest/gtest.h"

namespace lorc::kernels {
namespace {

TEST(KvQuantTest, Fp8E4m3DecodesEveryCodeAndEncodesItBack) {
  int finite = 0;
  for (int c = 0; c < 256; ++c) {
    const float v = KvqFp8E4m3ToF32(static_cast<uint8_t>(c));
    if ((c & 0x7f) == 0x7f) {
      EXPECT_TRUE(std::isnan(v)) << c;
      continue;
    }
    ++finite;
    // Independent decode: (-1)^s 2^(e-7) (1 + m/8), subnormal 2^-6 (m/8).
    const int e = (c >> 3) & 15, m = c & 7;
    const double want = (c & 0x80 ? -1 : 1) * (e == 0 ? std::ldexp(m / 8.0, -6) : std::ldexp(1 + m / 8.0, e - 7));
    EXPECT_EQ(v, want) << c;
    EXPECT_EQ(KvqF32ToFp8E4m3(v), c) << c;
  }
  EXPECT_EQ(finite, 254);
  EXPECT_EQ(KvqFp8E4m3ToF32(0x7e), 448.0f);
}

TEST(KvQuantTest, Fp8E4m3RoundsToNearestEvenAndSaturates) {
  EXPECT_EQ(KvqF32ToFp8E4m3(448.0f), 0x7e);
  EXPECT_EQ(KvqF32ToFp8E4m3(460.0f), 0x7e);   // between 448 and 480: saturates, no NaN
  EXPECT_EQ(KvqF32ToFp8E4m3(1e6f), 0x7e);
  EXPECT_EQ(KvqF32ToFp8E4m3(-std::numeric_limits<float>::infinity()), 0xfe);
  EXPECT_EQ(KvqF32ToFp8E4m3(std::nanf("")) & 0x7f, 0x7f);
  EXPECT_EQ(KvqF32ToFp8E4m3(1.0625f), 0x38);  // tie between 1 (m 0) and 1.125 (m 1): even
  EXPECT_EQ(KvqF32ToFp8E4m3(1.1875f), 0x3a);  // tie between 1.125 and 1.25: even (1.25)
  EXPECT_EQ(KvqF32ToFp8E4m3(1.07f), 0x39);
  EXPECT_EQ(KvqF32ToFp8E4m3(std::ldexp(1.0f, -10)), 0x00);  // subnormal tie: even (0)
  EXPECT_EQ(KvqF32ToFp8E4m3(std::ldexp(3.0f, -10)), 0x02);  // 1.5 ulp: even (2)
  EXPECT_EQ(KvqF32ToFp8E4m3(std::ldexp(15.0f, -10)), 0x08);  // 7.5 ulp: rounds up to 2^-6
  EXPECT_EQ(KvqF32ToFp8E4m3(-2.0f), 0xc0);
  // Every float in a sweep maps to a nearest code (ties aside).
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> d(-500.f, 500.f);
  for (int i = 0; i < 20000; ++i) {
    const float x = i % 2 ? d(rng) : d(rng) * 1e-3f;
    const float got = KvqFp8E4m3ToF32(KvqF32ToFp8E4m3(x));
    const float clamped = std::fmin(std::fmax(x, -448.f), 448.f);
    float best = 1e30f;
    for (int c = 0; c < 256; ++c) {
      if ((c & 0x7f) == 0x7f) continue;
      best = std::fmin(best, std::fabs(KvqFp8E4m3ToF32(static_cast<uint8_t>(c)) - clamped));
    }
    ASSERT_EQ(std::fabs(got - clamped), best) << x;
  }
}

TEST(KvQuantTest, F16MatchesCommonConversionAndRoundsInTheAskedDirection) {
  std::mt19937 rng(11);
  std::uniform_real_distribution<float> mant(1.0f, 2.0f);
  std::uniform_int_distribution<int> ex(-30, 15);
  for (int i = 0; i < 50000; ++i) {
    const float x = std::ldexp(mant(rng), ex(rng)) * (i % 3 == 0 ? -1.f : 1.f);
    if (std::fabs(x) > 65504.f) continue;
    const uint16_t h = KvqF32ToF16(x);
    ASSERT_EQ(h, F32ToF16(x)) << x;  // common/dtype.h: the RNE reference
    ASSERT_EQ(KvqF16ToF32(h), F16ToF32(h)) << h;
    if (x >= 0) {
      const float up = KvqF16ToF32(KvqF16RoundUp(x));
      ASSERT_GE(up, x);
      ASSERT_LE(up - x, std::fabs(x) * std::ldexp(1.f, -10) + std::ldexp(1.f, -24)) << x;
    }
    const float down = KvqF16ToF32(KvqF16RoundDown(x));
    ASSERT_LE(down, x);
    ASSERT_LE(x - down, std::fabs(x) * std::ldexp(1.f, -10) + std::ldexp(1.f, -24)) << x;
  }
  EXPECT_EQ(KvqF16ToF32(KvqF16RoundDown(-1e-9f)), -std::ldexp(1.f, -24));
  EXPECT_EQ(KvqF16ToF32(KvqF16RoundUp(1e-9f)), std::ldexp(1.f, -24));
  EXPECT_EQ(KvqF16RoundUp(0.f), 0);
  EXPECT_EQ(KvqF32ToF16(70000.f), 0x7bff);  // saturates
}

// One token row of `heads` heads of `hw` values through quantize -> dequantize, with each
// element's error checked against the bound of its format and stored scale.
struct RoundTrip {
  std::vector<float> back;
  double worst_ratio = 0;  // max err / bound
};

RoundTrip Check(KvQuant q, const std::vector<float>& x, int64_t heads, int64_t hw, const std::string& what) {
  std::vector<uint8_t> codes(KvqCodeRowBytes(q, heads, hw), 0xab);
  std::vector<uint16_t> scales(KvqScaleRowBytes(q, heads, hw) / 2, 0xffff);
  KvqQuantizeToken(q, x.data(), heads, hw, codes.data(), scales.data());
  for (size_t i = heads * KvqHeadCodeBytes(q, hw); i < codes.size(); ++i) {
    EXPECT_EQ(codes[i], 0) << what << ": padding byte " << i;
  }
  RoundTrip r;
  r.back.resize(x.size());
  const int64_t groups = KvqGroupsPerHead(q, hw);
  for (int64_t h = 0; h < heads; ++h) {
    KvqDequantizeHead(q, codes.data(), scales.data(), hw, h, &r.back[h * hw]);
    for (int64_t i = 0; i < hw; ++i) {
      const float xi = x[h * hw + i], yi = r.back[h * hw + i];
      EXPECT_TRUE(std::isfinite(yi)) << what << ": element " << h * hw + i;
      double bound;
      if (q == KvQuant::kInt4) {
        const float s = KvqF16ToF32(scales[2 * (h * groups + i / kKvInt4Group)]);
        bound = s / 2;
      } else if (q == KvQuant::kInt8) {
        bound = KvqF16ToF32(scales[h]) / 2;
      } else {  // fp8: half an ulp of 3 mantissa bits, or of the subnormal step 2^-9 (x scale)
        bound = std::ldexp(std::fabs(xi), -4) + std::ldexp(static_cast<double>(KvqF16ToF32(scales[h])), -10);
      }
      // fp32 arithmetic of x / s and z + c * s: a few ulps of the element.
      const double slack = 4e-7 * std::fabs(xi) + 1e-30;
      const double err = std::fabs(static_cast<double>(xi) - yi);
      EXPECT_LE(err, bound * (1 + 1e-6) + slack)
          << what << ": element " << h * hw + i << " x " << xi << " -> " << yi;
      if (bound > 0) r.worst_ratio = std::max(r.worst_ratio, err / bound);
    }
  }
  return r;
}

class KvQuantRoundTripTest : public ::testing::TestWithParam<KvQuant> {};

TEST_P(KvQuantRoundTripTest, ErrorsStayWithinTheBoundOfTheStoredScale) {
  const KvQuant q = GetParam();
  std::mt19937 rng(static_cast<int>(q) * 101 + 5);
  std::normal_distribution<float> n(0.f, 1.f);
  for (int64_t hw : {128, 64, 48, 20, 5, 1}) {
    for (int64_t heads : {1, 2, 3}) {
      std::vector<float> x(heads * hw);
      for (float& v : x) v = 3.f * n(rng);
      const RoundTrip r = Check(q, x, heads, hw, "random hw " + std::to_string(hw));
      // The bound is tight-ish: errors reach a good share of it (the test could fail).
      if (hw >= 20 && q != KvQuant::kFp8E4m3) {
        EXPECT_GT(r.worst_ratio, 0.5) << hw;
      }
    }
  }
}

TEST_P(KvQuantRoundTripTest, EdgeCases) {
  const KvQuant q = GetParam();
  const int64_t heads = 2, hw = 64;
  std::mt19937 rng(3);
  std::normal_distribution<float> n(0.f, 1.f);
  // All zeros: zero scales, exact zeros back, no NaN (0 / 0).
  const RoundTrip zeros = Check(q, std::vector<float>(heads * hw, 0.f), heads, hw, "zeros");
  for (float v : zeros.back) EXPECT_EQ(v, 0.f);
  // One huge outlier in head 1: head 0 keeps its precision (per-head / per-group scales).
  std::vector<float> x(heads * hw);
  for (float& v : x) v = n(rng);
  x[hw + 7] = 1e4f;
  const RoundTrip out = Check(q, x, heads, hw, "outlier");
  EXPECT_NEAR(out.back[hw + 7], 1e4f, 10.f) << "the outlier anchors its scale";
  std::vector<float> calm = x;
  calm[hw + 7] = 0.f;
  const RoundTrip without = Check(q, calm, heads, hw, "no outlier");
  for (int64_t i = 0; i < hw; ++i) {
    EXPECT_EQ(out.back[i], without.back[i]) << "head 0 must not pay for head 1's outlier: " << i;
  }
  // All negative; constant; tiny; large (near the fp16 range of int4's zero point).
  std::vector<float> neg(heads * hw);
  for (float& v : neg) v = -1.f - std::fabs(n(rng));
  Check(q, neg, heads, hw, "negative");
  Check(q, std::vector<float>(heads * hw, -2.5f), heads, hw, "constant");
  std::vector<float> tiny(heads * hw);
  for (float& v : tiny) v = 1e-9f * n(rng);
  Check(q, tiny, heads, hw, "tiny");
  std::vector<float> big(heads * hw);
  for (float& v : big) v = 3e4f + 100.f * n(rng);
  Check(q, big, heads, hw, "large");
}

INSTANTIATE_TEST_SUITE_P(Formats, KvQuantRoundTripTest,
                         ::testing::Values(KvQuant::kFp8E4m3, KvQuant::kInt8, KvQuant::kInt4),
                         [](const ::testing::TestParamInfo<KvQuant>& i) {
                           return std::string(i.param == KvQuant::kFp8E4m3 ? "Fp8"
                                              : i.param == KvQuant::kInt8  ? "Int8"
                                                                           : "Int4");
                         });

// --kv-cache-dtype bf16 stores common/dtype.h's F32ToBf16 (round-to-nearest-even): relative error
// at most 2^-8 (half an ulp of 8 significant bits) for normal values; zeros stay zero.
TEST(KvQuantTest, Bf16RoundTripWithinTwoToTheMinusEight) {
  std::mt19937 rng(9);
  std::normal_distribution<float> n(0.f, 1.f);
  for (int i = 0; i < 100000; ++i) {
    const float x = n(rng) * (i % 2 ? 1e3f : 1e-3f);
    const float y = Bf16ToF32(F32ToBf16(x));
    ASSERT_LE(std::fabs(x - y), std::ldexp(std::fabs(x), -8)) << x;
  }
  EXPECT_EQ(Bf16ToF32(F32ToBf16(0.f)), 0.f);
}

TEST(KvQuantTest, LayoutSizes) {
  // fp8 / int8: 128 codes + one fp16 scale per head; int4: 64 bytes + 4 groups x (scale, zero).
  EXPECT_EQ(KvqTokenBytes(KvQuant::kInt8, 2, 128), 256 + 2 * 2);
  EXPECT_EQ(KvqTokenBytes(KvQuant::kFp8E4m3, 2, 128), 256 + 2 * 2);
  EXPECT_EQ(KvqTokenBytes(KvQuant::kInt4, 2, 128), 128 + 2 * 4 * 4);
  // Rows pad to 16 bytes; a 48-wide int4 head has groups of 32 and 16 channels.
  EXPECT_EQ(KvqCodeRowBytes(KvQuant::kInt8, 1, 5), 16);
  EXPECT_EQ(KvqGroupsPerHead(KvQuant::kInt4, 48), 2);
  EXPECT_EQ(KvqTokenBytes(KvQuant::kInt4, 1, 48), 32 + 2 * 4);
  // Block b: block_size code rows, then block_size scale rows; slot 5 of blocks of 4 is row 1
  // of block 1.
  alignas(16) static uint8_t base[4096];
  const int64_t tb = KvqTokenBytes(KvQuant::kInt4, 2, 48);
  EXPECT_EQ(KvqTokenCodes(base, KvQuant::kInt4, 4, 2, 48, 5) - base, 4 * tb + 48);
  EXPECT_EQ(reinterpret_cast<uint8_t*>(KvqTokenScales(base, KvQuant::kInt4, 4, 2, 48, 5)) - base,
            4 * tb + 4 * 48 + 16);
}

}  // namespace
}  // namespace lorc::kernels
