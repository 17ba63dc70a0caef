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
