// ShardLayout: which heads, MLP columns and vocabulary rows each tensor-parallel rank holds.
#include "model/weights.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/status_matchers.h"

namespace lorc {
namespace {

using ::lorc::testing::StatusIs;
using ::testing::HasSubstr;

ModelConfig Config(int64_t heads, int64_t kv_heads, int64_t inter, int64_t vocab) {
  ModelConfig c;
  c.num_heads = heads;
  c.num_kv_heads = kv_heads;
  c.head_dim = 16;
  c.hidden_size = heads * 16;
  c.intermediate_size = inter;
  c.vocab_size = vocab;
  c.num_layers = 1;
  return c;
}

TEST(ShardLayoutTest, SplitsHeadsAndMlpColumns) {
  const ModelConfig c = Config(8, 4, 96, 1000);
  for (int32_t tp : {1, 2, 4}) {
    int64_t heads = 0, kv = 0, inter = 0;
    for (int32_t r = 0; r < tp; ++r) {
      auto s = ShardLayout::Make(c, r, tp);
      ASSERT_OK(s);
      EXPECT_EQ(s->head_begin, heads);
      EXPECT_EQ(s->kv_head_begin, kv);
      EXPECT_EQ(s->inter_begin, inter);
      EXPECT_FALSE(s->lm_head_sharded);
      EXPECT_EQ(s->vocab_size, 1000);
      heads += s->num_heads;
      kv += s->num_kv_heads;
      inter += s->inter_size;
    }
    EXPECT_EQ(heads, 8);
    EXPECT_EQ(kv, 4);
    EXPECT_EQ(inter, 96);
  }
}

TEST(ShardLayoutTest, ReplicatesKvHeadsWhenTpExceedsThem) {
  // 4 query heads over 2 KV heads (groups of 2), TP = 4: rank r holds query head r and the KV
  // head that query head uses, so ranks 0-1 share KV head 0 and ranks 2-3 KV head 1.
  const ModelConfig c = Config(4, 2, 64, 4096);
  for (int32_t r = 0; r < 4; ++r) {
    auto s = ShardLayout::Make(c, r, 4);
    ASSERT_OK(s);
    EXPECT_EQ(s->num_heads, 1);
    EXPECT_EQ(s->head_begin, r);
    EXPECT_EQ(s->num_kv_heads, 1);
    EXPECT_EQ(s->kv_head_begin, r / 2);
  }
}

TEST(ShardLayoutTest, ShardsTheLmHeadByVocabulary) {
  const ModelConfig c = Config(4, 2, 64, 4096);
  for (int32_t r = 0; r < 2; ++r) {
    auto s = ShardLayout::Make(c, r, 2, /*shard_lm_head=*/true);
    ASSERT_OK(s);
    EXPECT_TRUE(s->lm_head_sharded);
    EXPECT_EQ(s->vocab_size, 2048);
    EXPECT_EQ(s->vocab_begin, r * 2048);
  }
  // TP = 1 never shards.
  auto one = ShardLayout::Make(c, 0, 1, true);
  ASSERT_OK(one);
  EXPECT_FALSE(one->lm_head_sharded);
  EXPECT_THAT(ShardLayout::Make(Config(4, 2, 64, 4095), 0, 2, true),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("vocab_size 4095")));
}

TEST(ShardLayoutTest, RejectsSplitsThatDoNotDivide) {
  EXPECT_THAT(ShardLayout::Make(Config(6, 2, 64, 100), 0, 4),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("6 attention heads")));
  EXPECT_THAT(ShardLayout::Make(Config(8, 8, 60, 100), 0, 8),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("intermediate_size 60")));
  EXPECT_THAT(ShardLayout::Make(Config(12, 3, 48, 100), 0, 4),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("neither divides")));
  EXPECT_THAT(ShardLayout::Make(Config(4, 2, 64, 100), 2, 2),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("rank 2 of 2")));
}

// The LM head placement when the user does not say: split on GPUs, on CPUs from TP = 4 (both
// measured), replicated when the vocabulary does not split evenly; ShardLayout::Make follows it.
TEST(ShardLayoutTest, DefaultLmHeadPlacementFollowsTheMeasurements) {
  const ModelConfig c = Config(8, 8, 64, 4096);
  EXPECT_FALSE(DefaultLmHeadSplit(c, 1, /*cuda=*/true));
  EXPECT_TRUE(DefaultLmHeadSplit(c, 2, /*cuda=*/true));
  EXPECT_FALSE(DefaultLmHeadSplit(c, 2, /*cuda=*/false));
  EXPECT_TRUE(DefaultLmHeadSplit(c, 4, /*cuda=*/false));
  EXPECT_FALSE(DefaultLmHeadSplit(Config(8, 8, 64, 4095), 2, /*cuda=*/true));
  auto gpu = ShardLayout::Make(c, 0, 2, std::nullopt, /*cuda=*/true);
  ASSERT_TRUE(gpu.ok());
  EXPECT_TRUE(gpu->lm_head_sharded);
  auto cpu = ShardLayout::Make(c, 0, 2, std::nullopt, /*cuda=*/false);
  ASSERT_TRUE(cpu.ok());
  EXPECT_FALSE(cpu->lm_head_sharded);
  auto odd = ShardLayout::Make(Config(8, 8, 64, 4095), 0, 2, std::nullopt, /*cuda=*/true);
  ASSERT_TRUE(odd.ok()) << odd.status();  // auto falls back to replicated, explicit split fails
  EXPECT_FALSE(odd->lm_head_sharded);
}

}  // namespace
}  // namespace lorc
