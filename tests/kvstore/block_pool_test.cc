#include "kvstore/block_pool.h"

#include <algorithm>
#include <cstdint>
#include <set>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kvstore/kv_spec.h"
#include "tests/testing/status_matchers.h"

namespace lorc {
namespace {

using ::lorc::testing::IsOk;
using ::lorc::testing::StatusIs;
using ::testing::_;
using ::testing::AllOf;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::IsEmpty;

TEST(BlockPoolTest, StartsAllFree) {
  BlockPool pool(5);
  EXPECT_EQ(pool.num_blocks(), 5);
  EXPECT_EQ(pool.num_free(), 5);
  EXPECT_EQ(pool.num_used(), 0);
  for (int32_t b = 0; b < 5; ++b) EXPECT_EQ(pool.RefCount(b), 0);
}

TEST(BlockPoolTest, EmptyPool) {
  BlockPool pool(0);
  EXPECT_EQ(pool.num_blocks(), 0);
  auto none = pool.Allocate(0);
  ASSERT_OK(none);
  EXPECT_THAT(*none, IsEmpty());
  EXPECT_THAT(pool.Allocate(1), StatusIs(absl::StatusCode::kResourceExhausted, HasSubstr("need 1")));
}

TEST(BlockPoolTest, AllocateGivesDistinctBlocksWithRefCountOne) {
  BlockPool pool(8);
  auto a = pool.Allocate(3);
  ASSERT_OK(a);
  ASSERT_EQ(a->size(), 3u);
  // Fresh pool hands out ids in order.
  EXPECT_THAT(*a, ElementsAre(0, 1, 2));
  for (int32_t b : *a) EXPECT_EQ(pool.RefCount(b), 1);
  EXPECT_EQ(pool.num_free(), 5);
  EXPECT_EQ(pool.num_used(), 3);

  auto b = pool.Allocate(5);
  ASSERT_OK(b);
  std::set<int32_t> all(a->begin(), a->end());
  all.insert(b->begin(), b->end());
  EXPECT_EQ(all.size(), 8u);
  EXPECT_EQ(pool.num_free(), 0);
}

TEST(BlockPoolTest, AllocateZeroIsOkAndTakesNothing) {
  BlockPool pool(2);
  auto a = pool.Allocate(0);
  ASSERT_OK(a);
  EXPECT_THAT(*a, IsEmpty());
  EXPECT_EQ(pool.num_free(), 2);
}

TEST(BlockPoolTest, AllocateIsAllOrNothing) {
  BlockPool pool(6);
  ASSERT_OK(pool.Allocate(4));
  ASSERT_EQ(pool.num_free(), 2);
  auto r = pool.Allocate(3);
  EXPECT_THAT(r, StatusIs(absl::StatusCode::kResourceExhausted,
                          AllOf(HasSubstr("need 3"), HasSubstr("2 of 6"))));
  // Nothing was taken.
  EXPECT_EQ(pool.num_free(), 2);
  EXPECT_EQ(pool.num_used(), 4);
  EXPECT_EQ(pool.RefCount(4), 0);
  EXPECT_EQ(pool.RefCount(5), 0);
  // The remaining two are still allocatable, in the original order.
  auto rest = pool.Allocate(2);
  ASSERT_OK(rest);
  EXPECT_THAT(*rest, ElementsAre(4, 5));
  EXPECT_THAT(pool.Allocate(1), StatusIs(absl::StatusCode::kResourceExhausted,
                                         AllOf(HasSubstr("need 1"), HasSubstr("0 of 6"))));
}

TEST(BlockPoolTest, FreedBlocksAreReusedInLruOrder) {
  BlockPool pool(6);
  auto a = pool.Allocate(6);
  ASSERT_OK(a);
  // Free in the order 3, 1, 5: the least recently freed (3) is reused first.
  pool.Release(3);
  pool.Release(1);
  pool.Release(5);
  EXPECT_EQ(pool.num_free(), 3);
  auto b = pool.Allocate(2);
  ASSERT_OK(b);
  EXPECT_THAT(*b, ElementsAre(3, 1));
  // Block 0 freed now goes behind 5.
  pool.Release(0);
  auto c = pool.Allocate(2);
  ASSERT_OK(c);
  EXPECT_THAT(*c, ElementsAre(5, 0));
}

TEST(BlockPoolTest, NeverUsedBlocksComeBeforeRecentlyFreedOnes) {
  BlockPool pool(4);
  auto a = pool.Allocate(2);  // 0, 1
  ASSERT_OK(a);
  pool.Release(0);  // queue: 2, 3, 0
  auto b = pool.Allocate(3);
  ASSERT_OK(b);
  EXPECT_THAT(*b, ElementsAre(2, 3, 0));
}

TEST(BlockPoolTest, RefCountsWithIncRefAndRelease) {
  BlockPool pool(3);
  auto a = pool.Allocate(1);
  ASSERT_OK(a);
  const int32_t blk = (*a)[0];
  pool.IncRef(blk);
  pool.IncRef(blk);
  EXPECT_EQ(pool.RefCount(blk), 3);
  EXPECT_EQ(pool.num_free(), 2);

  pool.Release(blk);
  EXPECT_EQ(pool.RefCount(blk), 2);
  EXPECT_EQ(pool.num_free(), 2);  // still in use
  pool.Release(blk);
  EXPECT_EQ(pool.RefCount(blk), 1);
  EXPECT_EQ(pool.num_free(), 2);
  pool.Release(blk);
  EXPECT_EQ(pool.RefCount(blk), 0);
  EXPECT_EQ(pool.num_free(), 3);  // back exactly once

  // Re-allocating everything yields each block exactly once (no duplicate queue entries).
  auto all = pool.Allocate(3);
  ASSERT_OK(all);
  std::set<int32_t> uniq(all->begin(), all->end());
  EXPECT_EQ(uniq.size(), 3u);
  EXPECT_THAT(pool.Allocate(1), StatusIs(absl::StatusCode::kResourceExhausted, _));
}

TEST(BlockPoolDeathTest, MisuseChecks) {
  BlockPool pool(2);
  EXPECT_DEATH(pool.IncRef(0), "IncRef on free block");
  EXPECT_DEATH(pool.Release(1), "Release on free block");
  EXPECT_DEATH(pool.RefCount(2), "block 2");
  EXPECT_DEATH(pool.RefCount(-1), "block -1");
}

// --- KvCacheSpec -------------------------------------------------------------------------------

TEST(KvCacheSpecTest, BytesPerTokenSumsAllLayersKAndV) {
  KvCacheSpec spec;
  spec.block_size = 16;
  spec.num_blocks = 10;
  spec.dtype = DType::kF32;
  spec.k_width = {128, 64, 32};
  spec.v_width = {128, 48, 16};
  const int64_t elems = 128 + 128 + 64 + 48 + 32 + 16;
  EXPECT_EQ(spec.num_layers(), 3);
  EXPECT_EQ(spec.BytesPerToken(), elems * 4);
  EXPECT_EQ(spec.BytesPerBlock(), elems * 4 * 16);
  EXPECT_EQ(spec.TotalBytes(), elems * 4 * 16 * 10);
  EXPECT_OK(spec.Validate());

  spec.dtype = DType::kBF16;
  EXPECT_EQ(spec.BytesPerToken(), elems * 2);
  spec.dtype = DType::kF16;
  EXPECT_EQ(spec.BytesPerToken(), elems * 2);
}

TEST(KvCacheSpecTest, BlocksForTokensRoundsUp) {
  KvCacheSpec spec;
  spec.block_size = 4;
  EXPECT_EQ(spec.BlocksForTokens(0), 0);
  EXPECT_EQ(spec.BlocksForTokens(1), 1);
  EXPECT_EQ(spec.BlocksForTokens(4), 1);
  EXPECT_EQ(spec.BlocksForTokens(5), 2);
  EXPECT_EQ(spec.BlocksForTokens(8), 2);
  EXPECT_EQ(spec.BlocksForTokens(9), 3);
  spec.block_size = 16;
  EXPECT_EQ(spec.BlocksForTokens(4096), 256);
  EXPECT_EQ(spec.BlocksForTokens(4097), 257);
}

TEST(KvCacheSpecTest, ValidateRejectsBadSpecs) {
  KvCacheSpec good;
  good.block_size = 8;
  good.num_blocks = 4;
  good.k_width = {10, 20};
  good.v_width = {30, 5};
  ASSERT_OK(good.Validate());

  KvCacheSpec s = good;
  s.num_blocks = 0;  // an empty cache is a valid shape
  EXPECT_OK(s.Validate());

  s = good;
  s.block_size = 0;
  EXPECT_THAT(s.Validate(), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("block_size")));
  s.block_size = -4;
  EXPECT_THAT(s.Validate(), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("block_size")));

  s = good;
  s.num_blocks = -1;
  EXPECT_THAT(s.Validate(), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("num_blocks")));

  s = good;
  s.k_width.clear();
  s.v_width.clear();
  EXPECT_THAT(s.Validate(), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("k_width")));

  s = good;
  s.v_width = {30};
  EXPECT_THAT(s.Validate(),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("k_width has 2 layers, v_width 1")));

  s = good;
  s.k_width[1] = 0;
  EXPECT_THAT(s.Validate(), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("layer 1")));
  s = good;
  s.v_width[0] = -3;
  EXPECT_THAT(s.Validate(), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("layer 0")));
}

}  // namespace
}  // namespace lorc
