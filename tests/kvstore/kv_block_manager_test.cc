#include "kvstore/kv_block_manager.h"

#include <algorithm>
#include <cstdint>
#include <map>
#include <random>
#include <set>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/status_matchers.h"

namespace lorc {
namespace {

using ::lorc::testing::IsOk;
using ::lorc::testing::StatusIs;
using ::testing::_;
using ::testing::AllOf;
using ::testing::ElementsAre;
using ::testing::ElementsAreArray;
using ::testing::HasSubstr;
using ::testing::IsEmpty;
using ::testing::SizeIs;

std::vector<int32_t> Table(const KvBlockManager& m, int64_t seq) {
  auto t = m.BlockTable(seq);
  return std::vector<int32_t>(t.begin(), t.end());
}

TEST(KvBlockManagerTest, AddSequenceTwiceIsAlreadyExists) {
  KvBlockManager m(4, 8);
  ASSERT_OK(m.AddSequence(7));
  EXPECT_TRUE(m.Has(7));
  EXPECT_FALSE(m.Has(8));
  EXPECT_EQ(m.num_sequences(), 1u);
  EXPECT_THAT(m.AddSequence(7), StatusIs(absl::StatusCode::kAlreadyExists, HasSubstr("7")));
  EXPECT_EQ(m.num_sequences(), 1u);
  EXPECT_EQ(m.NumTokens(7), 0);
  EXPECT_THAT(m.BlockTable(7), IsEmpty());
}

// KV policy compaction: the blocks from from_block on leave the index (rewritten in place), the
// blocks past the new slot count are released tail first, the sequence then counts slots; a
// shared block in the range, a count out of range or an unknown id changes nothing.
TEST(KvBlockManagerTest, CompactReleasesTheTailAndUnindexesTheRewrittenBlocks) {
  KvBlockManager m(4, 16);
  ASSERT_OK(m.AddSequence(1));
  ASSERT_OK(m.Reserve(1, 24).status());  // 6 blocks
  std::vector<BlockHash> hashes;
  std::vector<int32_t> tokens(24);
  for (int i = 0; i < 24; ++i) tokens[i] = i;
  ExtendBlockHashes(PrefixRootHash("", ""), tokens, 4, &hashes);
  EXPECT_EQ(m.CacheFullBlocks(1, hashes), 6);
  const std::vector<int32_t> before = Table(m, 1);
  // A second sequence shares the first two blocks (a prefix hit).
  ASSERT_OK(m.AddSequence(2, m.MatchPrefix(absl::MakeConstSpan(hashes).first(2))));
  EXPECT_FALSE(m.CanCompact(1, 0));
  EXPECT_THAT(m.Compact(1, 1, 10), StatusIs(absl::StatusCode::kFailedPrecondition));
  EXPECT_TRUE(m.CanCompact(1, 2));
  EXPECT_THAT(m.Compact(1, 2, 7), StatusIs(absl::StatusCode::kFailedPrecondition));   // < 2 x 4
  EXPECT_THAT(m.Compact(1, 2, 25), StatusIs(absl::StatusCode::kFailedPrecondition));  // > 24
  EXPECT_THAT(m.Compact(9, 2, 10), StatusIs(absl::StatusCode::kNotFound));
  EXPECT_EQ(Table(m, 1), before);
  const int32_t free_before = m.num_free_blocks();
  ASSERT_OK(m.Compact(1, 2, 10));
  EXPECT_EQ(m.NumTokens(1), 10);
  EXPECT_THAT(Table(m, 1), ElementsAre(before[0], before[1], before[2]));
  EXPECT_EQ(m.num_free_blocks(), free_before + 3);
  EXPECT_TRUE(m.prefix_cache().IsCached(before[0]));
  EXPECT_TRUE(m.prefix_cache().IsCached(before[1]));
  for (int i = 2; i < 6; ++i) EXPECT_FALSE(m.prefix_cache().IsCached(before[i])) << i;
  // It grows from its slots.
  EXPECT_EQ(m.BlocksNeeded(1, 13), 1);
}

TEST(KvBlockManagerTest, ReserveUnknownSequenceIsNotFound) {
  KvBlockManager m(4, 8);
  EXPECT_THAT(m.Reserve(42, 3), StatusIs(absl::StatusCode::kNotFound, HasSubstr("42")));
  EXPECT_EQ(m.num_free_blocks(), 8);
  EXPECT_FALSE(m.Has(42));
}

TEST(KvBlockManagerTest, ForkErrors) {
  KvBlockManager m(4, 8);
  EXPECT_THAT(m.Fork(1, 2), StatusIs(absl::StatusCode::kNotFound, HasSubstr("1")));
  ASSERT_OK(m.AddSequence(1));
  ASSERT_OK(m.AddSequence(2));
  ASSERT_OK(m.Reserve(1, 3));
  EXPECT_THAT(m.Fork(1, 2), StatusIs(absl::StatusCode::kAlreadyExists, HasSubstr("2")));
  EXPECT_THAT(m.Fork(1, 1), StatusIs(absl::StatusCode::kAlreadyExists, _));
  // Nothing changed.
  EXPECT_EQ(m.pool().RefCount(Table(m, 1)[0]), 1);
  EXPECT_THAT(m.BlockTable(2), IsEmpty());
}

TEST(KvBlockManagerTest, ReserveGrowsAcrossBlockBoundaries) {
  KvBlockManager m(/*block_size=*/4, /*num_blocks=*/10);
  ASSERT_OK(m.AddSequence(1));
  struct Step {
    int64_t tokens;
    size_t blocks;
  };
  for (const Step& st : {Step{1, 1}, Step{4, 1}, Step{5, 2}, Step{8, 2}, Step{9, 3}}) {
    SCOPED_TRACE(st.tokens);
    const int32_t need = m.BlocksNeeded(1, st.tokens);
    const int32_t free_before = m.num_free_blocks();
    const size_t blocks_before = m.BlockTable(1).size();
    auto copies = m.Reserve(1, st.tokens);
    ASSERT_OK(copies);
    EXPECT_THAT(*copies, IsEmpty());
    EXPECT_EQ(m.NumTokens(1), st.tokens);
    EXPECT_THAT(m.BlockTable(1), SizeIs(st.blocks));
    // BlocksNeeded agrees with what Reserve took.
    EXPECT_EQ(free_before - m.num_free_blocks(), need);
    EXPECT_EQ(static_cast<size_t>(need), st.blocks - blocks_before);
  }
  // Fresh pool: ids in order, earlier blocks unchanged as the sequence grows.
  EXPECT_THAT(Table(m, 1), ElementsAre(0, 1, 2));
  EXPECT_EQ(m.num_free_blocks(), 7);
}

TEST(KvBlockManagerTest, ReserveToFewerOrEqualTokensIsANoOp) {
  KvBlockManager m(4, 10);
  ASSERT_OK(m.AddSequence(1));
  ASSERT_OK(m.Reserve(1, 6));
  EXPECT_EQ(m.BlocksNeeded(1, 6), 0);
  EXPECT_EQ(m.BlocksNeeded(1, 3), 0);
  auto r = m.Reserve(1, 3);
  ASSERT_OK(r);
  EXPECT_THAT(*r, IsEmpty());
  EXPECT_EQ(m.NumTokens(1), 6);
  EXPECT_THAT(m.BlockTable(1), SizeIs(2));
  EXPECT_EQ(m.num_free_blocks(), 8);
}

TEST(KvBlockManagerTest, BlocksNeededForUnknownSequenceIsFullCount) {
  KvBlockManager m(4, 10);
  EXPECT_EQ(m.BlocksNeeded(99, 0), 0);
  EXPECT_EQ(m.BlocksNeeded(99, 1), 1);
  EXPECT_EQ(m.BlocksNeeded(99, 8), 2);
  EXPECT_EQ(m.BlocksNeeded(99, 9), 3);
}

TEST(KvBlockManagerTest, ReserveIsAllOrNothing) {
  KvBlockManager m(4, 3);
  ASSERT_OK(m.AddSequence(1));
  ASSERT_OK(m.Reserve(1, 5));  // 2 blocks
  const std::vector<int32_t> before = Table(m, 1);
  EXPECT_EQ(m.BlocksNeeded(1, 13), 2);
  EXPECT_THAT(m.Reserve(1, 13), StatusIs(absl::StatusCode::kResourceExhausted,
                                         AllOf(HasSubstr("needs 2"), HasSubstr("1 free of 3"))));
  EXPECT_EQ(m.NumTokens(1), 5);
  EXPECT_EQ(Table(m, 1), before);
  EXPECT_EQ(m.num_free_blocks(), 1);
  ASSERT_OK(m.Reserve(1, 12));  // exactly fits
  EXPECT_EQ(m.num_free_blocks(), 0);
}

TEST(KvBlockManagerTest, ReserveWithCopyOnWriteIsAllOrNothing) {
  // A shared partial last block needs a CoW block; with no free block nothing may change.
  KvBlockManager m(4, 2);
  ASSERT_OK(m.AddSequence(1));
  ASSERT_OK(m.Reserve(1, 6));  // both blocks
  ASSERT_OK(m.Fork(1, 2));
  EXPECT_EQ(m.BlocksNeeded(1, 7), 1);
  EXPECT_THAT(m.Reserve(1, 7), StatusIs(absl::StatusCode::kResourceExhausted, _));
  EXPECT_EQ(Table(m, 1), Table(m, 2));
  EXPECT_EQ(m.NumTokens(1), 6);
  for (int32_t b : Table(m, 1)) EXPECT_EQ(m.pool().RefCount(b), 2);
}

TEST(KvBlockManagerTest, ForkSharesBlocks) {
  KvBlockManager m(4, 10);
  ASSERT_OK(m.AddSequence(1));
  ASSERT_OK(m.Reserve(1, 10));  // 3 blocks, last one partial
  ASSERT_OK(m.Fork(1, 2));
  EXPECT_TRUE(m.Has(2));
  EXPECT_EQ(m.NumTokens(2), 10);
  EXPECT_EQ(Table(m, 1), Table(m, 2));
  for (int32_t b : Table(m, 1)) EXPECT_EQ(m.pool().RefCount(b), 2);
  EXPECT_EQ(m.num_free_blocks(), 7);  // forking takes no blocks
}

TEST(KvBlockManagerTest, CopyOnWriteWhenWritingIntoSharedPartialBlock) {
  KvBlockManager m(4, 10);
  ASSERT_OK(m.AddSequence(1));
  ASSERT_OK(m.Reserve(1, 6));  // blocks [b0, b1], b1 holds 2 of 4 slots
  ASSERT_OK(m.Fork(1, 2));
  const std::vector<int32_t> shared = Table(m, 1);
  ASSERT_THAT(shared, SizeIs(2));

  // Parent appends one token into the shared partial block: it needs a private copy.
  EXPECT_EQ(m.BlocksNeeded(1, 7), 1);
  const int32_t free_before = m.num_free_blocks();
  auto copies = m.Reserve(1, 7);
  ASSERT_OK(copies);
  ASSERT_THAT(*copies, SizeIs(1));
  const std::vector<int32_t> parent = Table(m, 1);
  EXPECT_EQ((*copies)[0].src, shared[1]);
  EXPECT_EQ((*copies)[0].dst, parent[1]);
  EXPECT_NE(parent[1], shared[1]);
  EXPECT_EQ(parent[0], shared[0]);  // full block stays shared
  EXPECT_EQ(free_before - m.num_free_blocks(), 1);
  // The other sequence keeps the old blocks.
  EXPECT_EQ(Table(m, 2), shared);
  EXPECT_EQ(m.pool().RefCount(shared[0]), 2);
  EXPECT_EQ(m.pool().RefCount(shared[1]), 1);
  EXPECT_EQ(m.pool().RefCount(parent[1]), 1);

  // The child now owns its last block alone: writing into it needs no copy.
  EXPECT_EQ(m.BlocksNeeded(2, 8), 0);
  auto child_copies = m.Reserve(2, 8);
  ASSERT_OK(child_copies);
  EXPECT_THAT(*child_copies, IsEmpty());
  EXPECT_EQ(Table(m, 2), shared);
}

TEST(KvBlockManagerTest, CopyOnWritePlusGrowthInOneReserve) {
  KvBlockManager m(4, 10);
  ASSERT_OK(m.AddSequence(1));
  ASSERT_OK(m.Reserve(1, 5));  // [b0 full, b1 with 1 token]
  ASSERT_OK(m.Fork(1, 2));
  const std::vector<int32_t> shared = Table(m, 1);
  // Grow the child to 13 tokens: CoW of b1 plus two new blocks.
  EXPECT_EQ(m.BlocksNeeded(2, 13), 3);
  const int32_t free_before = m.num_free_blocks();
  auto copies = m.Reserve(2, 13);
  ASSERT_OK(copies);
  EXPECT_EQ(free_before - m.num_free_blocks(), 3);
  const std::vector<int32_t> child = Table(m, 2);
  ASSERT_THAT(child, SizeIs(4));
  ASSERT_THAT(*copies, SizeIs(1));
  EXPECT_EQ((*copies)[0].src, shared[1]);
  EXPECT_EQ((*copies)[0].dst, child[1]);
  EXPECT_EQ(child[0], shared[0]);
  EXPECT_EQ(Table(m, 1), shared);
}

TEST(KvBlockManagerTest, NoCopyWhenSharedLastBlockIsFull) {
  KvBlockManager m(4, 10);
  ASSERT_OK(m.AddSequence(1));
  ASSERT_OK(m.Reserve(1, 8));  // two full blocks
  ASSERT_OK(m.Fork(1, 2));
  const std::vector<int32_t> shared = Table(m, 1);
  EXPECT_EQ(m.BlocksNeeded(1, 9), 1);  // just the new block
  auto copies = m.Reserve(1, 9);
  ASSERT_OK(copies);
  EXPECT_THAT(*copies, IsEmpty());
  const std::vector<int32_t> parent = Table(m, 1);
  ASSERT_THAT(parent, SizeIs(3));
  EXPECT_EQ(parent[0], shared[0]);
  EXPECT_EQ(parent[1], shared[1]);
  EXPECT_EQ(m.pool().RefCount(shared[0]), 2);
  EXPECT_EQ(m.pool().RefCount(shared[1]), 2);
  EXPECT_EQ(m.pool().RefCount(parent[2]), 1);
  EXPECT_EQ(Table(m, 2), shared);
}

std::vector<BlockHash> Chain(int n, int32_t salt) {
  std::vector<int32_t> tokens;
  for (int i = 0; i < 4 * n; ++i) tokens.push_back(salt * 1000 + i);
  std::vector<BlockHash> hashes;
  ExtendBlockHashes(PrefixRootHash("test", ""), tokens, 4, &hashes);
  return hashes;
}

TEST(KvBlockManagerTest, EvictionsAreRecordedWithTheirHashesOnlyWhenAsked) {
  for (bool record : {false, true}) {
    KvBlockManager m(4, 4);
    m.set_record_evictions(record);
    const std::vector<BlockHash> h = Chain(2, 1);
    ASSERT_OK(m.AddSequence(1));
    ASSERT_OK(m.Reserve(1, 9).status());  // blocks 0, 1 full, 2 partial
    EXPECT_EQ(m.CacheFullBlocks(1, h), 2);
    const std::vector<int32_t> t1 = Table(m, 1);
    m.Free(1);  // free queue: 3, then 2, 1, 0 (tail first)
    EXPECT_THAT(m.TakeEvicted(), IsEmpty());
    ASSERT_OK(m.AddSequence(2));
    ASSERT_OK(m.Reserve(2, 12).status());  // 3, 2, then 1: the indexed tail block (h[1])
    const std::vector<EvictedBlock> ev = m.TakeEvicted();
    if (!record) {
      EXPECT_THAT(ev, IsEmpty());
      continue;
    }
    ASSERT_EQ(ev.size(), 1u);
    EXPECT_EQ(ev[0].block, t1[1]);
    EXPECT_EQ(ev[0].hash, h[1]);
    EXPECT_THAT(m.TakeEvicted(), IsEmpty());  // taken once
    EXPECT_THAT(m.MatchPrefix(h), ElementsAre(t1[0]));
  }
}

TEST(KvBlockManagerTest, AppendLoadedBlocksContinuesADeviceHitAndIndexesTheBlocks) {
  KvBlockManager m(4, 6);
  m.set_record_evictions(true);
  const std::vector<BlockHash> h = Chain(3, 2);
  ASSERT_OK(m.AddSequence(1));
  ASSERT_OK(m.Reserve(1, 12).status());
  EXPECT_EQ(m.CacheFullBlocks(1, absl::MakeConstSpan(h).first(1)), 1);
  const int32_t head = Table(m, 1)[0];
  m.Free(1);
  // A new sequence: the device hit (h[0]) plus two blocks from the host (h[1], h[2]).
  ASSERT_OK(m.AddSequence(2, m.MatchPrefix(h)));
  absl::StatusOr<std::vector<int32_t>> loaded =
      m.AppendLoadedBlocks(2, absl::MakeConstSpan(h).subspan(1));
  ASSERT_OK(loaded.status());
  ASSERT_EQ(loaded->size(), 2u);
  EXPECT_THAT(Table(m, 2), ElementsAre(head, (*loaded)[0], (*loaded)[1]));
  EXPECT_EQ(m.NumTokens(2), 12);
  EXPECT_THAT(m.MatchPrefix(h), ElementsAre(head, (*loaded)[0], (*loaded)[1]));
  EXPECT_EQ(m.num_free_blocks(), 3);
  // Indexed already: CacheFullBlocks adds nothing for them.
  EXPECT_EQ(m.CacheFullBlocks(2, h), 0);
  // All or nothing: 4 more blocks than are free.
  ASSERT_OK(m.AddSequence(3));
  EXPECT_THAT(m.AppendLoadedBlocks(3, Chain(4, 3)),
              StatusIs(absl::StatusCode::kResourceExhausted));
  EXPECT_EQ(m.num_free_blocks(), 3);
  EXPECT_EQ(m.NumTokens(3), 0);
  // Only after whole blocks.
  ASSERT_OK(m.Reserve(3, 2).status());
  EXPECT_THAT(m.AppendLoadedBlocks(3, Chain(1, 4)),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("sequence 3")));
  EXPECT_THAT(m.AppendLoadedBlocks(9, Chain(1, 4)), StatusIs(absl::StatusCode::kNotFound));
}

TEST(KvBlockManagerTest, FreeReleasesEverything) {
  KvBlockManager m(4, 10);
  ASSERT_OK(m.AddSequence(1));
  ASSERT_OK(m.AddSequence(2));
  ASSERT_OK(m.Reserve(1, 9));
  ASSERT_OK(m.Reserve(2, 4));
  EXPECT_EQ(m.num_free_blocks(), 6);
  m.Free(1);
  EXPECT_FALSE(m.Has(1));
  EXPECT_EQ(m.num_free_blocks(), 9);
  m.Free(2);
  EXPECT_EQ(m.num_free_blocks(), 10);
  EXPECT_EQ(m.num_sequences(), 0u);
  m.Free(2);   // unknown: no-op
  m.Free(77);  // never existed: no-op
  EXPECT_EQ(m.num_free_blocks(), 10);
  // The id can be reused after Free.
  EXPECT_OK(m.AddSequence(1));
}

class KvBlockManagerFreeOrderTest : public ::testing::TestWithParam<bool> {};

TEST_P(KvBlockManagerFreeOrderTest, FreeAfterForkInEitherOrder) {
  const bool parent_first = GetParam();
  KvBlockManager m(4, 10);
  ASSERT_OK(m.AddSequence(1));
  ASSERT_OK(m.Reserve(1, 6));
  ASSERT_OK(m.Fork(1, 2));
  ASSERT_OK(m.Fork(2, 3));
  ASSERT_OK(m.Reserve(2, 11));  // CoW + 1 new block for the child
  ASSERT_OK(m.Reserve(3, 6));   // no-op
  const std::vector<int64_t> order = parent_first ? std::vector<int64_t>{1, 2, 3}
                                                  : std::vector<int64_t>{3, 2, 1};
  for (int64_t s : order) {
    const std::vector<int32_t> t = Table(m, s);
    m.Free(s);
    for (int32_t b : t) EXPECT_GE(m.pool().RefCount(b), 0);
  }
  EXPECT_EQ(m.num_free_blocks(), 10);
  EXPECT_EQ(m.pool().num_used(), 0);
  for (int32_t b = 0; b < 10; ++b) EXPECT_EQ(m.pool().RefCount(b), 0);
}

INSTANTIATE_TEST_SUITE_P(Orders, KvBlockManagerFreeOrderTest, ::testing::Bool(),
                         [](const ::testing::TestParamInfo<bool>& i) {
                           return i.param ? "ParentFirst" : "ChildFirst";
                         });

// --- randomized property test ------------------------------------------------------------------
//
// Many sequences grow, fork and free at random on a small pool (so exhaustion happens). Besides
// the block bookkeeping, the test simulates the cache contents: every block slot holds a value,
// copies returned by Reserve are performed, and each sequence writes its own token values at the
// new positions. Every sequence must read back exactly what it wrote (through its block table),
// which fails if a shared block were ever written or a required copy were missing.

struct Model {
  int32_t block_size;
  std::vector<std::vector<int64_t>> data;         // [block][slot] contents of the fake cache
  std::map<int64_t, std::vector<int64_t>> tokens;  // expected contents per sequence
};

void CheckInvariants(const KvBlockManager& m, const Model& model) {
  const BlockPool& pool = m.pool();
  ASSERT_EQ(m.num_sequences(), model.tokens.size());
  std::vector<int32_t> holders(pool.num_blocks(), 0);
  for (const auto& [seq, toks] : model.tokens) {
    ASSERT_TRUE(m.Has(seq));
    ASSERT_EQ(m.NumTokens(seq), static_cast<int64_t>(toks.size()));
    auto table = m.BlockTable(seq);
    const size_t want_blocks = (toks.size() + model.block_size - 1) / model.block_size;
    ASSERT_EQ(table.size(), want_blocks) << "seq " << seq;
    std::set<int32_t> uniq(table.begin(), table.end());
    ASSERT_EQ(uniq.size(), table.size()) << "seq " << seq << " holds a block twice";
    for (int32_t b : table) {
      ASSERT_GE(b, 0);
      ASSERT_LT(b, pool.num_blocks());
      ++holders[b];
    }
    for (size_t p = 0; p < toks.size(); ++p) {
      ASSERT_EQ(model.data[table[p / model.block_size]][p % model.block_size], toks[p])
          << "seq " << seq << " position " << p;
    }
  }
  int32_t used = 0;
  for (int32_t b = 0; b < pool.num_blocks(); ++b) {
    ASSERT_EQ(pool.RefCount(b), holders[b]) << "block " << b;
    if (holders[b] > 0) ++used;
  }
  ASSERT_EQ(pool.num_used(), used);
  ASSERT_EQ(pool.num_free() + used, pool.num_blocks());
}

class KvBlockManagerPropertyTest : public ::testing::TestWithParam<uint32_t> {};

TEST_P(KvBlockManagerPropertyTest, RandomGrowForkFree) {
  const uint32_t seed = GetParam();
  std::mt19937 rng(seed);
  const int32_t block_size = 1 + static_cast<int32_t>(rng() % 6);  // 1..6
  const int32_t num_blocks = 24 + static_cast<int32_t>(rng() % 24);
  KvBlockManager m(block_size, num_blocks);
  Model model{block_size, std::vector<std::vector<int64_t>>(num_blocks,
                                                            std::vector<int64_t>(block_size, -1)),
              {}};
  int64_t next_id = 1;
  int64_t next_value = 1000;
  int exhausted = 0, copies_seen = 0, forks = 0;

  auto pick = [&]() -> int64_t {
    auto it = model.tokens.begin();
    std::advance(it, rng() % model.tokens.size());
    return it->first;
  };

  for (int step = 0; step < 3000; ++step) {
    SCOPED_TRACE(::testing::Message() << "seed " << seed << " step " << step);
    const int op = static_cast<int>(rng() % 10);
    if (model.tokens.empty() || op == 0) {
      const int64_t id = next_id++;
      ASSERT_OK(m.AddSequence(id));
      model.tokens[id];
    } else if (op <= 5) {
      // Grow by 1..(2 * block_size + 1) tokens (sometimes 0: a no-op Reserve).
      const int64_t seq = pick();
      std::vector<int64_t>& toks = model.tokens[seq];
      const int64_t old_n = static_cast<int64_t>(toks.size());
      const int64_t new_n = old_n + static_cast<int64_t>(rng() % (2 * block_size + 2));
      const std::vector<int32_t> old_table = Table(m, seq);
      const bool shared_partial = old_n % block_size != 0 && !old_table.empty() &&
                                  m.pool().RefCount(old_table.back()) > 1;
      const int32_t need = m.BlocksNeeded(seq, new_n);
      const int32_t free_before = m.num_free_blocks();
      auto copies = m.Reserve(seq, new_n);
      if (!copies.ok()) {
        ASSERT_THAT(copies, StatusIs(absl::StatusCode::kResourceExhausted, _));
        ASSERT_GT(need, free_before);
        ASSERT_EQ(Table(m, seq), old_table);
        ASSERT_EQ(m.num_free_blocks(), free_before);
        ++exhausted;
      } else {
        ASSERT_EQ(free_before - m.num_free_blocks(), need);
        const std::vector<int32_t> table = Table(m, seq);
        if (new_n > old_n && shared_partial) {
          ASSERT_THAT(*copies, SizeIs(1));
          ASSERT_EQ((*copies)[0].src, old_table.back());
          ASSERT_EQ((*copies)[0].dst, table[old_table.size() - 1]);
          ++copies_seen;
        } else {
          ASSERT_THAT(*copies, IsEmpty());
        }
        // Earlier blocks (all but a copied last one) are unchanged.
        for (size_t i = 0; i + 1 < old_table.size(); ++i) ASSERT_EQ(table[i], old_table[i]);
        // Perform the copies, then write the new tokens.
        for (const BlockCopy& c : *copies) model.data[c.dst] = model.data[c.src];
        for (int64_t p = old_n; p < new_n; ++p) {
          const int64_t v = next_value++;
          model.data[table[p / block_size]][p % block_size] = v;
          toks.push_back(v);
        }
      }
    } else if (op <= 7) {
      const int64_t parent = pick();
      const int64_t child = next_id++;
      ASSERT_OK(m.Fork(parent, child));
      model.tokens[child] = model.tokens[parent];
      ++forks;
    } else {
      const int64_t seq = pick();
      m.Free(seq);
      model.tokens.erase(seq);
    }
    ASSERT_NO_FATAL_FAILURE(CheckInvariants(m, model));
  }
  // The run exercised the interesting paths.
  EXPECT_GT(exhausted, 0);
  EXPECT_GT(forks, 0);
  if (block_size > 1) {
    EXPECT_GT(copies_seen, 0);
  }

  // Free everything in random order: all blocks return.
  std::vector<int64_t> ids;
  for (const auto& [seq, toks] : model.tokens) ids.push_back(seq);
  std::shuffle(ids.begin(), ids.end(), rng);
  for (int64_t seq : ids) {
    m.Free(seq);
    model.tokens.erase(seq);
    ASSERT_NO_FATAL_FAILURE(CheckInvariants(m, model));
  }
  EXPECT_EQ(m.num_sequences(), 0u);
  EXPECT_EQ(m.num_free_blocks(), num_blocks);
  for (int32_t b = 0; b < num_blocks; ++b) EXPECT_EQ(m.pool().RefCount(b), 0);
}

INSTANTIATE_TEST_SUITE_P(Seeds, KvBlockManagerPropertyTest, ::testing::Range(1u, 11u));

}  // namespace
}  // namespace lorc
