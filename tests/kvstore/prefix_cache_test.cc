// The prefix index (kvstore/prefix_cache.h) through KvBlockManager, the pool's O(1) Acquire, and
// sessions (kvstore/session_store.h): keys, sharing, LRU eviction, pinning.
#include "kvstore/prefix_cache.h"

#include <algorithm>
#include <map>
#include <numeric>
#include <random>
#include <set>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kvstore/block_pool.h"
#include "kvstore/kv_block_manager.h"
#include "kvstore/kv_spec.h"
#include "kvstore/session_store.h"
#include "tests/testing/status_matchers.h"

namespace lorc {
namespace {

using ::lorc::testing::StatusIs;
using ::testing::ElementsAre;
using ::testing::ElementsAreArray;
using ::testing::HasSubstr;
using ::testing::IsEmpty;

constexpr int32_t kBs = 4;

std::vector<int32_t> Tokens(int n, int first = 1) {
  std::vector<int32_t> t(n);
  std::iota(t.begin(), t.end(), first);
  return t;
}

std::vector<BlockHash> Chain(const std::vector<int32_t>& tokens, std::string_view salt = "",
                             std::string_view format = "fmt") {
  std::vector<BlockHash> h;
  ExtendBlockHashes(PrefixRootHash(format, salt), tokens, kBs, &h);
  return h;
}

ModelConfig TinyConfig() {
  ModelConfig c;
  c.vocab_size = 100;
  c.hidden_size = 64;
  c.num_layers = 2;
  c.num_heads = 4;
  c.num_kv_heads = 2;
  c.head_dim = 16;
  c.max_position_embeddings = 128;
  return c;
}

TEST(PrefixHashTest, ChainDependsOnEveryEarlierTokenSaltAndFormat) {
  const std::vector<int32_t> a = Tokens(12);
  std::vector<BlockHash> h = Chain(a);
  ASSERT_EQ(h.size(), 3u);
  EXPECT_EQ(Chain(a), h);  // deterministic
  // Only full blocks are hashed.
  EXPECT_EQ(Chain(Tokens(11)).size(), 2u);
  // A change in block 0 changes every later key, not only block 0's.
  std::vector<int32_t> b = a;
  b[1] = 77;
  const std::vector<BlockHash> hb = Chain(b);
  for (int i = 0; i < 3; ++i) EXPECT_FALSE(hb[i] == h[i]) << i;
  // A change in block 2 leaves blocks 0 and 1.
  b = a;
  b[9] = 77;
  EXPECT_EQ(Chain(b)[0], h[0]);
  EXPECT_EQ(Chain(b)[1], h[1]);
  EXPECT_FALSE(Chain(b)[2] == h[2]);
  // Salts and formats separate everything.
  EXPECT_FALSE(Chain(a, "tenant-a")[0] == h[0]);
  EXPECT_FALSE(Chain(a, "tenant-a")[0] == Chain(a, "tenant-b")[0]);
  EXPECT_FALSE(Chain(a, "", "other format")[0] == h[0]);
  // Length-prefixed: moving a byte between format and salt is another key.
  EXPECT_FALSE(PrefixRootHash("ab", "c") == PrefixRootHash("a", "bc"));
}

TEST(PrefixHashTest, FormatIdentityDiffersForDtypeRanksAndBlockSize) {
  const ModelConfig c = TinyConfig();
  KvSpecOptions o;
  o.block_size = 16;
  const KvCacheSpec full = *MakeKvCacheSpec(c, o);
  KvSpecOptions o8 = o;
  o8.kv_cache_dtype = KvCacheDtype::kInt8;
  const KvCacheSpec int8 = *MakeKvCacheSpec(c, o8);
  KvSpecOptions o32 = o;
  o32.block_size = 32;
  const KvCacheSpec bs32 = *MakeKvCacheSpec(c, o32);
  // LoRC latents of two rank schedules.
  ModelConfig lc = c;
  lc.lorc = LorcConfig{};
  lc.lorc->method = "svd";
  lc.lorc->layers = {{8, 8}, {8, 8}};
  const KvCacheSpec lorc8 = *MakeKvCacheSpec(lc, o);
  ModelConfig lc2 = lc;
  lc2.lorc->layers = {{8, 8}, {8, 4}};
  const KvCacheSpec lorc84 = *MakeKvCacheSpec(lc2, o);
  const std::vector<std::string> ids = {
      KvFormatIdentity(c, full),    KvFormatIdentity(c, int8),     KvFormatIdentity(c, bs32),
      KvFormatIdentity(lc, lorc8),  KvFormatIdentity(lc2, lorc84),
  };
  EXPECT_EQ(std::set<std::string>(ids.begin(), ids.end()).size(), ids.size());
  EXPECT_EQ(KvFormatIdentity(c, full), KvFormatIdentity(c, *MakeKvCacheSpec(c, o)));
  // And so the chains never meet.
  const std::vector<int32_t> t = Tokens(16);
  std::set<std::pair<uint64_t, uint64_t>> roots;
  for (const std::string& id : ids) {
    const BlockHash h = Chain(t, "", id)[0];
    roots.insert({h.hi, h.lo});
  }
  EXPECT_EQ(roots.size(), ids.size());
}

TEST(BlockPoolAcquireTest, AcquireTakesAFreeBlockOutOfTheMiddleOfTheQueue) {
  BlockPool pool(4);
  pool.Acquire(2);
  EXPECT_EQ(pool.RefCount(2), 1);
  EXPECT_EQ(pool.num_free(), 3);
  pool.Acquire(2);  // in use: shared
  EXPECT_EQ(pool.RefCount(2), 2);
  auto rest = pool.Allocate(3);
  ASSERT_OK(rest);
  EXPECT_THAT(*rest, ElementsAre(0, 1, 3));  // queue order, without 2
  pool.Release(2);
  pool.Release(2);
  pool.Release(3);
  pool.Release(0);
  auto again = pool.Allocate(3);
  ASSERT_OK(again);
  EXPECT_THAT(*again, ElementsAre(2, 3, 0));  // least recently freed first
}

TEST(PrefixCacheTest, TwoSequencesWithACommonPrefixShareBlockIds) {
  KvBlockManager m(kBs, 16);
  const std::vector<int32_t> a = Tokens(10);
  ASSERT_OK(m.AddSequence(1));
  ASSERT_OK(m.Reserve(1, 10).status());
  const std::vector<int32_t> table1(m.BlockTable(1).begin(), m.BlockTable(1).end());
  const std::vector<BlockHash> ha = Chain(a);
  EXPECT_EQ(m.CacheFullBlocks(1, ha), 2);  // 2 full blocks of 10 tokens
  EXPECT_EQ(m.CacheFullBlocks(1, ha), 0);  // once
  EXPECT_EQ(m.prefix_cache().num_cached_blocks(), 2);

  // Same first 8 tokens, another tail.
  std::vector<int32_t> b = Tokens(8);
  for (int i = 0; i < 5; ++i) b.push_back(50 + i);
  const std::vector<int32_t> hit = m.MatchPrefix(Chain(b));
  EXPECT_THAT(hit, ElementsAre(table1[0], table1[1]));
  EXPECT_EQ(m.NumFree(hit), 0);  // in use by sequence 1
  ASSERT_OK(m.AddSequence(2, hit));
  EXPECT_EQ(m.NumTokens(2), 8);
  ASSERT_OK(m.Reserve(2, 13).status());
  const absl::Span<const int32_t> table2 = m.BlockTable(2);
  EXPECT_EQ(table2[0], table1[0]);
  EXPECT_EQ(table2[1], table1[1]);
  EXPECT_NE(table2[2], table1[2]);
  EXPECT_EQ(m.pool().RefCount(table1[0]), 2);
  EXPECT_EQ(m.pool().RefCount(table1[1]), 2);
  EXPECT_EQ(m.pool().RefCount(table1[2]), 1);
  // A salted chain of the same tokens finds nothing.
  EXPECT_THAT(m.MatchPrefix(Chain(b, "other tenant")), IsEmpty());
}

TEST(PrefixCacheTest, FreedCachedBlocksStayReusableUntilEvictedTailFirst) {
  KvBlockManager m(kBs, 6);
  const std::vector<int32_t> a = Tokens(12);
  ASSERT_OK(m.AddSequence(1));
  ASSERT_OK(m.Reserve(1, 12).status());
  const std::vector<int32_t> table(m.BlockTable(1).begin(), m.BlockTable(1).end());
  m.CacheFullBlocks(1, Chain(a));
  m.Free(1);
  EXPECT_EQ(m.num_free_blocks(), 6);  // cached blocks are free (evictable)
  EXPECT_THAT(m.MatchPrefix(Chain(a)), ElementsAreArray(table));
  // 3 never-used blocks go first, then the cached ones from the tail: block 2 of the chain.
  ASSERT_OK(m.AddSequence(2));
  ASSERT_OK(m.Reserve(2, 16).status());  // 4 blocks
  EXPECT_EQ(m.prefix_cache_stats().evictions, 1);
  EXPECT_THAT(m.MatchPrefix(Chain(a)), ElementsAre(table[0], table[1]));  // head kept
  // A hit on a free cached block takes it out of the free queue.
  const std::vector<int32_t> hit = m.MatchPrefix(Chain(a));
  EXPECT_EQ(m.NumFree(hit), 2);
  ASSERT_OK(m.AddSequence(3, hit));
  EXPECT_EQ(m.num_free_blocks(), 0);
  EXPECT_EQ(m.pool().RefCount(table[0]), 1);
  // Full cache: nothing in use is ever handed out.
  EXPECT_THAT(m.Reserve(3, 9).status(), StatusIs(absl::StatusCode::kResourceExhausted));
  EXPECT_THAT(m.MatchPrefix(Chain(a)), ElementsAre(table[0], table[1]));
}

TEST(PrefixCacheTest, EvictionUnderPressureNeverTouchesABlockInUse) {
  // Many sequences come and go on a tiny pool; at every point, every block held by a live
  // sequence keeps its ref count and is never handed to another sequence, and a MatchPrefix hit
  // only names blocks whose contents are the chain's (tracked here by "writing" the hash).
  KvBlockManager m(kBs, 10);
  std::map<int32_t, std::pair<uint64_t, uint64_t>> contents;  // block -> chain key written there
  std::map<int64_t, std::vector<int32_t>> live;
  std::mt19937 rng(7);
  int64_t next = 1;
  for (int iter = 0; iter < 2000; ++iter) {
    if (!live.empty() && (rng() % 3 == 0 || m.num_free_blocks() < 3)) {
      auto it = live.begin();
      std::advance(it, rng() % live.size());
      m.Free(it->first);
      live.erase(it);
      continue;
    }
    // Prompts from 4 families sharing prefixes.
    std::vector<int32_t> t = Tokens(4 * (1 + rng() % 3) + 1, 1 + 100 * (rng() % 4));
    const std::vector<BlockHash> h = Chain(t);
    std::vector<int32_t> hit = m.MatchPrefix(h);
    for (size_t i = 0; i < hit.size(); ++i) {
      ASSERT_EQ(contents[hit[i]], std::make_pair(h[i].hi, h[i].lo)) << "stale block " << hit[i];
    }
    const int64_t id = next++;
    const int32_t need = m.BlocksNeeded(id, static_cast<int64_t>(t.size())) -
                         static_cast<int32_t>(hit.size()) + m.NumFree(hit);
    if (need > m.num_free_blocks()) continue;
    ASSERT_OK(m.AddSequence(id, hit));
    std::map<int32_t, int32_t> before;
    for (const auto& [s, blocks] : live) {
      for (int32_t b : blocks) before[b] = m.pool().RefCount(b);
    }
    ASSERT_OK(m.Reserve(id, static_cast<int64_t>(t.size())).status());
    const std::vector<int32_t> table(m.BlockTable(id).begin(), m.BlockTable(id).end());
    for (size_t i = hit.size(); i < table.size(); ++i) {
      ASSERT_FALSE(before.contains(table[i])) << "block " << table[i] << " in use was reused";
      if (i < h.size()) contents[table[i]] = {h[i].hi, h[i].lo};  // computed
    }
    m.CacheFullBlocks(id, h);
    live[id] = table;
  }
  EXPECT_GT(m.prefix_cache_stats().evictions, 0);
}

TEST(PrefixCacheTest, ClearDropsTheIndexButNotTheBlocks) {
  KvBlockManager m(kBs, 8);
  ASSERT_OK(m.AddSequence(1));
  ASSERT_OK(m.Reserve(1, 8).status());
  m.CacheFullBlocks(1, Chain(Tokens(8)));
  m.ClearPrefixCache();
  EXPECT_THAT(m.MatchPrefix(Chain(Tokens(8))), IsEmpty());
  EXPECT_EQ(m.prefix_cache().num_cached_blocks(), 0);
  EXPECT_EQ(m.BlockTable(1).size(), 2u);
  EXPECT_EQ(m.prefix_cache().stats().resets, 1);
}

TEST(SessionStoreTest, KeepPinsUntilTtlCloseOrCap) {
  KvBlockManager m(kBs, 12);
  const absl::Time t0 = absl::FromUnixSeconds(1000);
  SessionStore sessions(&m, absl::Seconds(60), /*max_blocks=*/5);
  ASSERT_OK(m.AddSequence(1));
  ASSERT_OK(m.Reserve(1, 12).status());
  const std::vector<int32_t> t1(m.BlockTable(1).begin(), m.BlockTable(1).end());
  m.CacheFullBlocks(1, Chain(Tokens(12)));
  sessions.Keep({"", "a"}, t1, t0);
  m.Free(1);
  for (int32_t b : t1) EXPECT_EQ(m.pool().RefCount(b), 1) << "pinned after the turn ended";
  EXPECT_EQ(sessions.num_pinned_blocks(), 3);
  EXPECT_EQ(m.num_free_blocks(), 9);

  // A second turn extends the conversation: the shared blocks stay pinned throughout.
  ASSERT_OK(m.AddSequence(2, absl::MakeConstSpan(t1).first(2)));
  ASSERT_OK(m.Reserve(2, 16).status());
  const std::vector<int32_t> t2(m.BlockTable(2).begin(), m.BlockTable(2).end());
  sessions.Keep({"", "a"}, t2, t0 + absl::Seconds(30));
  m.Free(2);
  EXPECT_THAT(sessions.PinnedBlocks({"", "a"}), ElementsAreArray(t2));
  EXPECT_EQ(m.pool().RefCount(t1[2]), 0);  // the old third block is no longer the conversation
  EXPECT_EQ(sessions.num_pinned_blocks(), 4);

  // Idle time: 60 s after its last use (t0 + 30 s), not before.
  EXPECT_EQ(sessions.Expire(t0 + absl::Seconds(89)), 0);
  sessions.Touch({"", "a"}, t0 + absl::Seconds(80));
  EXPECT_EQ(sessions.Expire(t0 + absl::Seconds(139)), 0);
  EXPECT_EQ(sessions.Expire(t0 + absl::Seconds(141)), 1);
  EXPECT_FALSE(sessions.Has({"", "a"}));
  EXPECT_EQ(m.num_free_blocks(), 12);
  EXPECT_EQ(sessions.num_expired(), 1);

  // Close; unknown ids are NotFound.
  ASSERT_OK(m.AddSequence(3));
  ASSERT_OK(m.Reserve(3, 8).status());
  sessions.Keep({"", "b"}, std::vector<int32_t>(m.BlockTable(3).begin(), m.BlockTable(3).end()), t0);
  m.Free(3);
  EXPECT_EQ(m.num_free_blocks(), 10);
  EXPECT_OK(sessions.Close({"", "b"}));
  EXPECT_EQ(m.num_free_blocks(), 12);
  EXPECT_THAT(sessions.Close({"", "b"}), StatusIs(absl::StatusCode::kNotFound, HasSubstr("'b'")));
  EXPECT_THAT(sessions.Close({"", "never"}), StatusIs(absl::StatusCode::kNotFound));

  // The cap (5 blocks): the oldest session goes first.
  for (int64_t id : {4, 5}) {
    ASSERT_OK(m.AddSequence(id));
    ASSERT_OK(m.Reserve(id, 12).status());
    sessions.Keep({"", id == 4 ? "old" : "new"},
                  std::vector<int32_t>(m.BlockTable(id).begin(), m.BlockTable(id).end()),
                  t0 + absl::Seconds(id));
    m.Free(id);
  }
  EXPECT_FALSE(sessions.Has({"", "old"}));
  EXPECT_TRUE(sessions.Has({"", "new"}));
  EXPECT_EQ(sessions.num_pinned_blocks(), 3);
  EXPECT_EQ(sessions.num_capped(), 1);
  EXPECT_EQ(m.num_free_blocks(), 9);
  // Sessions that pin nothing (shorter than a block) are bounded too: at most max_blocks of
  // them, the oldest released first.
  for (int i = 0; i < 8; ++i) sessions.Keep({"", absl::StrCat("empty", i)}, {}, t0 + absl::Seconds(10 + i));
  EXPECT_EQ(sessions.num_sessions(), 5);
  EXPECT_FALSE(sessions.Has({"", "new"}));  // the oldest
  EXPECT_TRUE(sessions.Has({"", "empty7"}));
  EXPECT_EQ(sessions.num_capped(), 5);
  sessions.Clear();
  EXPECT_EQ(m.num_free_blocks(), 12);
}

// Sessions are per (cache_salt, session_id): another tenant's session of the same id neither
// replaces nor closes this one.
TEST(SessionStoreTest, KeyedBySaltAndId) {
  KvBlockManager m(kBs, 12);
  const absl::Time t0 = absl::FromUnixSeconds(1000);
  SessionStore sessions(&m, absl::Seconds(60), /*max_blocks=*/12);
  for (int64_t id : {1, 2}) {
    ASSERT_OK(m.AddSequence(id));
    ASSERT_OK(m.Reserve(id, 8).status());
    sessions.Keep({id == 1 ? "tenant-a" : "tenant-b", "chat"},
                  std::vector<int32_t>(m.BlockTable(id).begin(), m.BlockTable(id).end()), t0);
    m.Free(id);
  }
  EXPECT_EQ(sessions.num_sessions(), 2);
  EXPECT_EQ(sessions.num_pinned_blocks(), 4);
  EXPECT_EQ(sessions.PinnedBlocks({"tenant-a", "chat"}).size(), 2u);
  EXPECT_THAT(sessions.Close({"", "chat"}), StatusIs(absl::StatusCode::kNotFound));
  EXPECT_OK(sessions.Close({"tenant-b", "chat"}));
  EXPECT_TRUE(sessions.Has({"tenant-a", "chat"}));
  EXPECT_EQ(sessions.num_pinned_blocks(), 2);
}

// A block shared by several sessions (one system prompt) counts once, for the cap and
// num_pinned_blocks; a session alone over the cap is not kept and the others stay.
TEST(SessionStoreTest, SharedBlocksCountOnceAndAnOversizedSessionIsNotKept) {
  KvBlockManager m(kBs, 16);
  const absl::Time t0 = absl::FromUnixSeconds(1000);
  SessionStore sessions(&m, absl::Seconds(60), /*max_blocks=*/4);
  // Three sessions share 2 prefix blocks and own 1 block each: 5 distinct blocks, 9 per session.
  ASSERT_OK(m.AddSequence(1));
  ASSERT_OK(m.Reserve(1, 8).status());
  m.CacheFullBlocks(1, Chain(Tokens(8)));
  const std::vector<int32_t> prefix(m.BlockTable(1).begin(), m.BlockTable(1).end());
  for (int64_t id : {2, 3}) {
    ASSERT_OK(m.AddSequence(id, prefix));
    ASSERT_OK(m.Reserve(id, 12).status());
    sessions.Keep({"", id == 2 ? "x" : "y"},
                  std::vector<int32_t>(m.BlockTable(id).begin(), m.BlockTable(id).end()),
                  t0 + absl::Seconds(id));
    m.Free(id);
  }
  m.Free(1);
  EXPECT_EQ(sessions.num_sessions(), 2);      // 4 distinct blocks: within the cap
  EXPECT_EQ(sessions.num_pinned_blocks(), 4);  // not 6
  EXPECT_EQ(sessions.PinCount(prefix[0]), 2);
  EXPECT_EQ(sessions.num_capped(), 0);
  EXPECT_EQ(m.num_free_blocks(), 12);

  // A 5-block session alone exceeds the cap of 4: not kept, x and y stay.
  ASSERT_OK(m.AddSequence(9));
  ASSERT_OK(m.Reserve(9, 20).status());
  sessions.Keep({"", "big"}, std::vector<int32_t>(m.BlockTable(9).begin(), m.BlockTable(9).end()),
                t0 + absl::Seconds(9));
  m.Free(9);
  EXPECT_FALSE(sessions.Has({"", "big"}));
  EXPECT_TRUE(sessions.Has({"", "x"}));
  EXPECT_TRUE(sessions.Has({"", "y"}));
  EXPECT_EQ(sessions.num_capped(), 1);
  EXPECT_EQ(sessions.num_pinned_blocks(), 4);
  EXPECT_EQ(m.num_free_blocks(), 12);
}

}  // namespace
}  // namespace lorc
