// MakeKvCacheSpec: the one place the per-layer KV geometry is decided.
#include "kvstore/kv_spec.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/status_matchers.h"

namespace lorc {
namespace {

using ::lorc::testing::StatusIs;
using ::testing::Each;
using ::testing::HasSubstr;

ModelConfig Gqa() {
  ModelConfig c;
  c.num_layers = 3;
  c.num_heads = 8;
  c.num_kv_heads = 4;
  c.head_dim = 16;
  return c;
}

TEST(MakeKvCacheSpecTest, FullKvPerLayerWidthsFromTheRanksHeads) {
  KvSpecOptions o;
  o.block_size = 8;
  auto all = MakeKvCacheSpec(Gqa(), o);
  ASSERT_OK(all);
  EXPECT_EQ(all->num_layers(), 3);
  EXPECT_EQ(all->block_size, 8);
  EXPECT_EQ(all->num_blocks, 0);  // the worker sizes it
  EXPECT_THAT(all->k_width, Each(4 * 16));
  EXPECT_THAT(all->v_width, Each(4 * 16));
  EXPECT_THAT(all->rope, Each(KvRope::kBeforeCache));
  EXPECT_EQ(all->CompressionName(), "none");
  EXPECT_OK(all->Validate());

  o.num_kv_heads = 1;  // tp 4: one KV head on this rank
  o.dtype = DType::kBF16;
  auto rank = MakeKvCacheSpec(Gqa(), o);
  ASSERT_OK(rank);
  EXPECT_THAT(rank->k_width, Each(16));
  EXPECT_EQ(rank->dtype, DType::kBF16);
  EXPECT_EQ(rank->BytesPerToken(), 3 * 2 * 16 * 2);
}

TEST(MakeKvCacheSpecTest, LatentLayersReportCompressionAndValidateLengths) {
  auto spec = MakeKvCacheSpec(Gqa(), {});
  ASSERT_OK(spec);
  spec->rope[1] = KvRope::kAtAttention;
  EXPECT_NE(spec->CompressionName(), "none");
  spec->rope.pop_back();
  EXPECT_THAT(spec->Validate(), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("rope has 2")));
}

// A LoRC model (compress/FORMAT.md): per layer KV heads x r_k / r_v, unrotated latents.
TEST(MakeKvCacheSpecTest, LorcLayersHoldLatentsOfTheirRanks) {
  ModelConfig c = Gqa();
  c.lorc = LorcConfig{};
  c.lorc->method = "whitened-svd";
  c.lorc->layers = {{16, 12}, {8, 8}, {4, 8}};
  KvSpecOptions o;
  o.num_kv_heads = 2;  // tp 2
  auto spec = MakeKvCacheSpec(c, o);
  ASSERT_OK(spec);
  EXPECT_EQ(spec->k_width, (std::vector<int64_t>{32, 16, 8}));
  EXPECT_EQ(spec->v_width, (std::vector<int64_t>{24, 16, 16}));
  EXPECT_THAT(spec->rope, Each(KvRope::kAtAttention));
  EXPECT_OK(spec->Validate());
  // F32: 4 bytes per element of every layer's widths.
  EXPECT_EQ(spec->BytesPerToken(), (32 + 16 + 8 + 24 + 16 + 16) * 4);
  // 112 of 3 * 2 * 32 = 192 full elements.
  EXPECT_EQ(spec->CompressionName(), "lorc:whitened-svd k=16..4 v=12..8, 58.3% KV");
  // Ranks that rise again with depth (a searched schedule) report their range, not first..last.
  c.lorc->layers = {{8, 12}, {4, 8}, {16, 12}};
  auto searched = MakeKvCacheSpec(c, o);
  ASSERT_OK(searched);
  EXPECT_EQ(searched->CompressionName(), "lorc:whitened-svd k=4-16 v=8-12, 62.5% KV");
  c.lorc->method = "svd";
  c.lorc->layers = {{8, 8}, {8, 8}, {8, 8}};
  auto uniform = MakeKvCacheSpec(c, {});
  ASSERT_OK(uniform);
  EXPECT_EQ(uniform->CompressionName(), "lorc:svd k=8 v=8, 50% KV");
  EXPECT_THAT(uniform->k_width, Each(4 * 8));
  c.lorc->layers.pop_back();
  EXPECT_THAT(MakeKvCacheSpec(c, {}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("lorc.json has 2 layers")));
}

TEST(MakeKvCacheSpecTest, RejectsBadInputs) {
  KvSpecOptions o;
  o.block_size = 0;
  EXPECT_THAT(MakeKvCacheSpec(Gqa(), o),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("block_size 0")));
  ModelConfig c = Gqa();
  c.num_kv_heads = 0;
  EXPECT_THAT(MakeKvCacheSpec(c, {}), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("KV heads")));
}

// --kv-cache-dtype: the stored dtype, bytes per token with the scales counted, the name reported.
// The fixture's shape (models/tiny-llama-a: 8 layers, 2 KV heads of 128): full F32 16384 bytes a
// token; fp8 / int8 one byte a value plus one fp16 scale per token and KV head (8 layers x K, V x
// 2 heads x 2 bytes = 64); int4 half a byte plus per group of 32 an fp16 scale and zero point (8 x 2
// x 2 heads x 4 groups x 4 bytes = 512).
ModelConfig FixtureShape() {
  ModelConfig c;
  c.num_layers = 8;
  c.num_heads = 4;
  c.num_kv_heads = 2;
  c.head_dim = 128;
  return c;
}

TEST(KvCacheDtypeTest, BytesPerTokenCountsScales) {
  const std::vector<std::pair<KvCacheDtype, int64_t>> want = {
      {KvCacheDtype::kAuto, 16384}, {KvCacheDtype::kBf16, 8192}, {KvCacheDtype::kFp8, 4096 + 64},
      {KvCacheDtype::kInt8, 4096 + 64}, {KvCacheDtype::kInt4, 2048 + 512}};
  for (const auto& [d, bytes] : want) {
    KvSpecOptions o;
    o.kv_cache_dtype = d;
    auto spec = MakeKvCacheSpec(FixtureShape(), o);
    ASSERT_OK(spec);
    EXPECT_EQ(spec->BytesPerToken(), bytes) << KvCacheDtypeName(d);
    EXPECT_EQ(spec->BytesPerBlock(), bytes * spec->block_size);
    EXPECT_EQ(spec->KBytesPerToken(0) + spec->VBytesPerToken(0), bytes / 8);
    EXPECT_OK(spec->Validate());
  }
  KvSpecOptions o;
  o.kv_cache_dtype = KvCacheDtype::kBf16;
  EXPECT_EQ(MakeKvCacheSpec(FixtureShape(), o)->dtype, DType::kBF16);
  EXPECT_EQ(MakeKvCacheSpec(FixtureShape(), o)->StorageName(), "BF16");
  o.kv_cache_dtype = KvCacheDtype::kFp8;
  EXPECT_EQ(MakeKvCacheSpec(FixtureShape(), o)->dtype, DType::kU8);
  EXPECT_EQ(MakeKvCacheSpec(FixtureShape(), o)->StorageName(), "fp8_e4m3");
  EXPECT_EQ(MakeKvCacheSpec(FixtureShape(), o)->CompressionName(), "fp8");
  o.kv_cache_dtype = KvCacheDtype::kAuto;
  EXPECT_EQ(MakeKvCacheSpec(FixtureShape(), o)->CompressionName(), "none");
  EXPECT_EQ(MakeKvCacheSpec(FixtureShape(), o)->StorageName(), "F32");
}

// Latents: scales per token and KV head latent of r values (int4: groups of 32 within it).
TEST(KvCacheDtypeTest, LatentCachesQuantizePerHeadLatent) {
  ModelConfig c = FixtureShape();
  c.lorc = LorcConfig{};
  c.lorc->method = "svd";
  c.lorc->layers.assign(8, {64, 48});
  KvSpecOptions o;
  o.kv_cache_dtype = KvCacheDtype::kInt4;
  auto spec = MakeKvCacheSpec(c, o);
  ASSERT_OK(spec);
  // K: 2 heads x 32 bytes + 2 x 2 groups x 4 = 80; V: 2 x 24 = 48 bytes + 2 x 2 groups x 4 = 64.
  EXPECT_EQ(spec->KBytesPerToken(0), 80);
  EXPECT_EQ(spec->VBytesPerToken(0), 64);
  EXPECT_EQ(spec->BytesPerToken(), 8 * (80 + 64));
  EXPECT_EQ(spec->CompressionName(), "lorc:svd k=64 v=48, 43.8% KV, int4");
  o.kv_cache_dtype = KvCacheDtype::kInt8;
  o.num_kv_heads = 1;  // tp 2: one KV head; 64 + 2 and 48 + 2, rows padded to 16 bytes
  spec = MakeKvCacheSpec(c, o);
  ASSERT_OK(spec);
  EXPECT_EQ(spec->BytesPerToken(), 8 * (64 + 2 + 48 + 2));
}

TEST(KvCacheDtypeTest, ParseNamesTheFlag) {
  for (KvCacheDtype d : {KvCacheDtype::kAuto, KvCacheDtype::kBf16, KvCacheDtype::kFp8,
                         KvCacheDtype::kInt8, KvCacheDtype::kInt4}) {
    auto parsed = ParseKvCacheDtype(KvCacheDtypeName(d));
    ASSERT_OK(parsed);
    EXPECT_EQ(*parsed, d);
  }
  EXPECT_EQ(*ParseKvCacheDtype("fp8_e4m3"), KvCacheDtype::kFp8);
  EXPECT_THAT(ParseKvCacheDtype("int3"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("--kv-cache-dtype: 'int3'")));
  EXPECT_THAT(ParseKvCacheDtype(""), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("--kv-cache-dtype")));
  EXPECT_EQ(KvQuantOf(KvCacheDtype::kBf16), kernels::KvQuant::kNone);
  EXPECT_EQ(KvQuantOf(KvCacheDtype::kInt4), kernels::KvQuant::kInt4);
}

TEST(KvCacheDtypeTest, QuantizedSpecsNeedHeadsDividingTheWidths) {
  KvSpecOptions o;
  o.kv_cache_dtype = KvCacheDtype::kInt8;
  auto spec = MakeKvCacheSpec(Gqa(), o);
  ASSERT_OK(spec);
  spec->num_kv_heads = 3;  // does not divide 64
  EXPECT_THAT(spec->Validate(), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("--kv-cache-dtype int8")));
  spec->num_kv_heads = 0;
  EXPECT_THAT(spec->Validate(), StatusIs(absl::StatusCode::kInvalidArgument));
}

}  // namespace
}  // namespace lorc
