// HostKvPool: the coordinator's bookkeeping of the host KV tier (slots by block hash, LRU, pins).
#include "kvstore/host_kv_pool.h"

#include <set>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/status_matchers.h"

namespace lorc {
namespace {

using ::lorc::testing::StatusIs;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

BlockHash H(uint64_t i) { return {i * 0x9e3779b97f4a7c15ull, ~i}; }

TEST(HostKvPoolTest, FillsFreeSlotsThenEvictsLeastRecentlyUsed) {
  HostKvPool pool(3);
  std::set<int32_t> slots;
  for (uint64_t i = 0; i < 3; ++i) {
    ASSERT_OK_AND_ASSIGN(HostKvPool::Insertion ins, pool.Insert(H(i)));
    EXPECT_TRUE(ins.copy);
    EXPECT_FALSE(ins.evicted.has_value());
    slots.insert(ins.slot);
  }
  EXPECT_EQ(slots, (std::set<int32_t>{0, 1, 2}));
  EXPECT_EQ(pool.num_used(), 3);
  // A hit refreshes H(0): H(1) is now the least recently used.
  const int32_t slot0 = pool.Lookup(H(0));
  EXPECT_GE(slot0, 0);
  EXPECT_THAT(pool.LruOrder(), ElementsAre(H(1), H(2), H(0)));
  const int32_t slot1 = pool.Peek(H(1));
  ASSERT_OK_AND_ASSIGN(HostKvPool::Insertion ins, pool.Insert(H(7)));
  EXPECT_TRUE(ins.copy);
  EXPECT_EQ(ins.slot, slot1);  // H(1)'s slot is reused
  ASSERT_TRUE(ins.evicted.has_value());
  EXPECT_EQ(*ins.evicted, H(1));
  EXPECT_EQ(pool.Lookup(H(1)), -1);
  EXPECT_EQ(pool.Lookup(H(7)), slot1);
  EXPECT_EQ(pool.num_evictions(), 1);
  EXPECT_EQ(pool.num_used(), 3);
}

TEST(HostKvPoolTest, InsertOfAPresentHashNeedsNoCopy) {
  HostKvPool pool(2);
  ASSERT_OK_AND_ASSIGN(HostKvPool::Insertion a, pool.Insert(H(1)));
  ASSERT_OK_AND_ASSIGN(HostKvPool::Insertion b, pool.Insert(H(2)));
  ASSERT_OK_AND_ASSIGN(HostKvPool::Insertion again, pool.Insert(H(1)));
  EXPECT_FALSE(again.copy);
  EXPECT_EQ(again.slot, a.slot);
  EXPECT_FALSE(again.evicted.has_value());
  // ... and refreshes it: H(2) goes first.
  ASSERT_OK_AND_ASSIGN(HostKvPool::Insertion c, pool.Insert(H(3)));
  EXPECT_EQ(c.slot, b.slot);
  EXPECT_EQ(*c.evicted, H(2));
}

TEST(HostKvPoolTest, PinnedEntriesAreNeverEvicted) {
  HostKvPool pool(2);
  ASSERT_OK_AND_ASSIGN(HostKvPool::Insertion a, pool.Insert(H(1)));
  ASSERT_OK(pool.Insert(H(2)).status());
  ASSERT_OK(pool.Pin(H(1)));  // least recently used, but a load of it is in a plan being built
  ASSERT_OK(pool.Pin(H(1)));  // pins count
  EXPECT_EQ(pool.num_pinned(), 1);
  ASSERT_OK_AND_ASSIGN(HostKvPool::Insertion c, pool.Insert(H(3)));
  EXPECT_EQ(*c.evicted, H(2));
  EXPECT_NE(c.slot, a.slot);
  ASSERT_OK(pool.Pin(H(3)));
  EXPECT_THAT(pool.Insert(H(4)).status(),
              StatusIs(absl::StatusCode::kResourceExhausted, HasSubstr("2 pinned")));
  EXPECT_EQ(pool.num_used(), 2);  // the failed insert changed nothing
  EXPECT_THAT(pool.Erase(H(1)), StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("pinned")));
  ASSERT_OK(pool.Unpin(H(1)));
  EXPECT_THAT(pool.Insert(H(4)).status(), StatusIs(absl::StatusCode::kResourceExhausted));
  ASSERT_OK(pool.Unpin(H(1)));
  EXPECT_EQ(pool.num_pinned(), 1);
  ASSERT_OK_AND_ASSIGN(HostKvPool::Insertion d, pool.Insert(H(4)));
  EXPECT_EQ(*d.evicted, H(1));
  EXPECT_EQ(d.slot, a.slot);
}

TEST(HostKvPoolTest, PinErrorsNameTheProblem) {
  HostKvPool pool(1);
  EXPECT_THAT(pool.Pin(H(5)), StatusIs(absl::StatusCode::kNotFound, HasSubstr("not here")));
  EXPECT_THAT(pool.Unpin(H(5)), StatusIs(absl::StatusCode::kNotFound));
  ASSERT_OK(pool.Insert(H(5)).status());
  EXPECT_THAT(pool.Unpin(H(5)), StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("not pinned")));
}

TEST(HostKvPoolTest, EraseAndClearFreeSlots) {
  HostKvPool pool(2);
  ASSERT_OK_AND_ASSIGN(HostKvPool::Insertion a, pool.Insert(H(1)));
  ASSERT_OK(pool.Insert(H(2)).status());
  ASSERT_OK(pool.Erase(H(1)));
  EXPECT_THAT(pool.Erase(H(1)), StatusIs(absl::StatusCode::kNotFound));
  ASSERT_OK_AND_ASSIGN(HostKvPool::Insertion c, pool.Insert(H(3)));
  EXPECT_EQ(c.slot, a.slot);  // the freed slot, no eviction
  EXPECT_FALSE(c.evicted.has_value());
  ASSERT_OK(pool.Pin(H(3)));
  pool.Clear();
  EXPECT_EQ(pool.num_used(), 0);
  EXPECT_EQ(pool.num_pinned(), 0);
  EXPECT_EQ(pool.Lookup(H(2)), -1);
  for (uint64_t i = 10; i < 12; ++i) {
    ASSERT_OK_AND_ASSIGN(HostKvPool::Insertion ins, pool.Insert(H(i)));
    EXPECT_FALSE(ins.evicted.has_value());
  }
}

TEST(HostKvPoolTest, AnEmptyPoolHoldsNothing) {
  HostKvPool pool(0);
  EXPECT_THAT(pool.Insert(H(1)).status(),
              StatusIs(absl::StatusCode::kResourceExhausted, HasSubstr("--kv-offloading-size")));
  EXPECT_EQ(pool.Lookup(H(1)), -1);
}

// Many inserts over a small pool: slots stay a bijection onto the live hashes.
TEST(HostKvPoolTest, SlotsStayDistinctUnderChurn) {
  HostKvPool pool(8);
  for (uint64_t i = 0; i < 200; ++i) {
    ASSERT_OK(pool.Insert(H(i % 13)).status());
    if (i % 5 == 0) (void)pool.Lookup(H(i % 7));
    std::set<int32_t> seen;
    for (uint64_t j = 0; j < 13; ++j) {
      const int32_t s = pool.Peek(H(j));
      if (s < 0) continue;
      EXPECT_TRUE(s < 8 && seen.insert(s).second) << "slot " << s << " twice or out of range";
    }
    EXPECT_EQ(static_cast<int32_t>(seen.size()), pool.num_used());
  }
}

}  // namespace
}  // namespace lorc
