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

}  // namespace
}  // namespace lorc
