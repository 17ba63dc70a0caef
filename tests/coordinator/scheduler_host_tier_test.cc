// The host KV tier in the scheduler (coordinator/scheduler.h, kvstore/host_kv_pool.h), through the
// fake worker of scheduler_test_harness.h: it keeps what every device block and host slot holds
// (an offload saves the block's tokens, a load restores them), so a load from a wrong or stale
// slot, an offload of a block in use, or a slot overwritten before its load shows as wrong K/V.
#include <random>

#include "tests/coordinator/scheduler_test_harness.h"

namespace lorc {
namespace scheduler_test {
namespace {

SchedulerConfig HostConfig(int32_t block_size, int32_t num_blocks, int32_t num_host_blocks,
                           int32_t budget = 2048) {
  SchedulerConfig c = Config(block_size, num_blocks, budget);
  c.num_host_blocks = num_host_blocks;
  return c;
}

// Runs request `id` alone to its end; returns the plan that admitted it.
PlanView RunOne(Harness& h, int64_t id, const std::vector<int32_t>& prompt, int32_t max_tokens) {
  EXPECT_OK(h.Add(id, prompt, Params(max_tokens)));
  PlanView first = h.Step();
  h.CheckInvariants();
  h.RunToCompletion();
  EXPECT_EQ(h.outputs[id], Expected(id, static_cast<int64_t>(prompt.size()), max_tokens))
      << "request " << id;
  return first;
}

TEST(SchedulerHostTierTest, APrefixEvictedFromTheDeviceIsLoadedBackFromTheHost) {
  // 12 device blocks of 4 tokens. A (20 tokens, 5 full blocks) runs; B (40 tokens) then needs
  // 11 blocks, evicting A's cached blocks; a request starting with A finds them on the host.
  for (int32_t host : {0, 16}) {
    SCOPED_TRACE(host);
    Harness h(HostConfig(4, 12, host));
    const std::vector<int32_t> a = Prompt(20, 1);
    RunOne(h, 1, a, 2);
    EXPECT_EQ(h.sched.prefix_cache_report().cached_blocks, 5);
    RunOne(h, 2, Prompt(40, 2), 2);
    const int64_t device_left = h.sched.blocks().MatchPrefix(
        [&] {
          std::vector<BlockHash> hs;
          ExtendBlockHashes(PrefixRootHash("", ""), a, 4, &hs);
          return hs;
        }()).size();
    EXPECT_LT(device_left, 5);  // some of A's blocks were evicted
    if (host == 0) {
      EXPECT_EQ(h.worker.num_offloads(), 0);
    } else {
      // Every evicted block of A (indexed, unreferenced) was saved, each to its own slot.
      EXPECT_EQ(h.worker.num_offloads(), 5 - device_left);
      EXPECT_EQ(h.sched.host_pool().num_used(), 5 - device_left);
      EXPECT_EQ(h.sched.prefix_cache_report().host_blocks_used, 5 - device_left);
      EXPECT_EQ(h.sched.prefix_cache_report().stats.host_offloads, 5 - device_left);
    }
    const std::vector<int32_t> a2 = WithTail(a, 20, 5, 600);
    PlanView pa = RunOne(h, 3, a2, 3);
    if (host == 0) {
      EXPECT_THAT(pa.kv_loads, IsEmpty());
      EXPECT_EQ(h.sched.prefix_cache_report().stats.host_hit_tokens, 0);
    } else {
      // The chain continues on the host past the device hit: A's 5 blocks are all cached.
      EXPECT_EQ(static_cast<int64_t>(pa.kv_loads.size()), 5 - device_left);
      ASSERT_EQ(pa.seqs.size(), 1u);
      EXPECT_EQ(pa.seqs[0].num_cached, 20);
      EXPECT_EQ(pa.seqs[0].tokens.size(), 5u);  // only the new tail is computed
      for (size_t i = 0; i < pa.kv_loads.size(); ++i) {
        EXPECT_EQ(pa.kv_loads[i].block, pa.seqs[0].block_table[device_left + i]) << i;
      }
      const PrefixCacheReport r = h.sched.prefix_cache_report();
      EXPECT_EQ(r.stats.host_hit_tokens, 4 * (5 - device_left));
      EXPECT_EQ(r.stats.host_loads, 5 - device_left);
      EXPECT_EQ(h.worker.num_loads(), 5 - device_left);
    }
    // cached_prompt_tokens counts device and host hits; the worker's K/V check (RunOne) passed.
    // (GetSequence is gone once it ended: the plan's num_cached above is what it reported.)
    EXPECT_EQ(h.outputs[3], Expected(3, 25, 3));
  }
}

TEST(SchedulerHostTierTest, CachedPromptTokensIncludeHostHits) {
  Harness h(HostConfig(4, 12, 16));
  const std::vector<int32_t> a = Prompt(20, 1);
  RunOne(h, 1, a, 2);
  RunOne(h, 2, Prompt(40, 2), 2);
  ASSERT_OK(h.Add(3, WithTail(a, 20, 5, 600), Params(3)));
  h.Step();
  EXPECT_EQ(h.sched.GetSequence(3)->num_cached_prompt_tokens, 20);
  h.CheckInvariants();
  h.RunToCompletion();
  EXPECT_EQ(h.outputs[3], Expected(3, 25, 3));
}

TEST(SchedulerHostTierTest, TheHostPoolEvictsLeastRecentlyUsedEntries) {
  // 3 host slots only: A's evicted blocks are replaced by B's, so A comes back computed and B
  // from the host.
  Harness h(HostConfig(4, 12, 3));
  const std::vector<int32_t> a = Prompt(20, 1), b = Prompt(20, 2);
  RunOne(h, 1, a, 2);
  RunOne(h, 2, Prompt(44, 3), 1);  // evicts A
  const int64_t after_a = h.sched.host_pool().num_used();
  EXPECT_EQ(after_a, 3);
  RunOne(h, 3, b, 2);
  RunOne(h, 4, Prompt(44, 4), 1);  // evicts B: the host pool drops A's entries for B's
  EXPECT_EQ(h.sched.host_pool().num_used(), 3);
  EXPECT_GE(h.sched.host_pool().num_evictions(), 3);
  PlanView pa = RunOne(h, 5, WithTail(a, 20, 3, 600), 2);
  EXPECT_THAT(pa.kv_loads, IsEmpty());
  EXPECT_EQ(pa.seqs[0].num_cached, 0);
  // Request 5 evicted request 4's blocks again (new entries); B's most recent ones may remain.
  EXPECT_LE(h.sched.host_pool().num_used(), 3);
  const int64_t loads = h.sched.prefix_cache_report().stats.host_loads;
  EXPECT_EQ(loads, 0);
}

TEST(SchedulerHostTierTest, AResetClearsTheHostTier) {
  Harness h(HostConfig(4, 12, 16));
  const std::vector<int32_t> a = Prompt(20, 1);
  RunOne(h, 1, a, 2);
  RunOne(h, 2, Prompt(40, 2), 2);
  ASSERT_GT(h.sched.host_pool().num_used(), 0);
  // A worker restart / failure: the workers' memory (device and host) is gone.
  h.sched.ResetPrefixCache();
  h.worker.ClearHost();
  EXPECT_EQ(h.sched.host_pool().num_used(), 0);
  EXPECT_EQ(h.sched.prefix_cache_report().host_blocks_used, 0);
  PlanView pa = RunOne(h, 3, WithTail(a, 20, 5, 600), 3);
  EXPECT_THAT(pa.kv_loads, IsEmpty());
  EXPECT_EQ(pa.seqs[0].num_cached, 0);
}

TEST(SchedulerHostTierTest, ABlockInUseIsNeverOffloadedAndAKnownHashIsNotCopiedTwice) {
  // A long request holds its blocks while others churn the pool: nothing of it is offloaded
  // (the fake worker fails any offload of a block in a running request's table). A prefix
  // loaded back and evicted again costs no second copy (the tier is inclusive).
  Harness h(HostConfig(4, 16, 32));
  ASSERT_OK(h.Add(100, Prompt(20, 9), Params(20)));
  h.Step();
  const std::vector<int32_t> a = Prompt(12, 1);
  RunOne(h, 1, a, 1);  // runs alongside 100 until its end
  EXPECT_EQ(h.sched.num_running(), 0);  // RunOne ran 100 to its end too
  const int64_t offloads0 = h.worker.num_offloads();
  RunOne(h, 2, Prompt(56, 2), 1);  // evicts A (and 100's cached blocks)
  const int64_t offloads1 = h.worker.num_offloads();
  EXPECT_GT(offloads1, offloads0);
  RunOne(h, 3, WithTail(a, 12, 2, 600), 1);  // A from the host
  EXPECT_GT(h.worker.num_loads(), 0);
  RunOne(h, 4, Prompt(56, 2), 1);  // B again, partly from the host
  RunOne(h, 5, Prompt(60, 5), 1);  // evicts everything cached, A's loaded blocks again
  const PrefixCacheReport r = h.sched.prefix_cache_report();
  EXPECT_EQ(r.stats.host_offloads, h.worker.num_offloads());
  EXPECT_EQ(r.host_blocks_used, h.sched.host_pool().num_used());
  // Every offload created an entry: offloads = entries + entries replaced (none here).
  EXPECT_EQ(h.sched.host_pool().num_evictions(), 0);
  EXPECT_EQ(r.stats.host_offloads, h.sched.host_pool().num_used());
}

TEST(SchedulerHostTierTest, SoakWithSharedPrefixesATinyCacheAHostTierAndTwoStepsInFlight) {
  for (size_t depth : {1u, 2u}) {
    SCOPED_TRACE(depth);
    Harness h(HostConfig(4, 24, 10, 32));
    std::mt19937 rng(21 + depth);
    SoakShape shape;
    shape.families = 5;
    shape.family_len = 48;
    shape.keep_range = 28;
    shape.len_range = 40;
    shape.salts = false;
    shape.check = true;
    const std::map<int64_t, std::pair<int64_t, int32_t>> want =
        SoakSharedPrefixes(h, rng, 600, depth, shape);
    h.RunToCompletion(100000, depth);
    for (const auto& [id, w] : want) {
      EXPECT_EQ(h.outputs[id], Expected(id, w.first, w.second)) << "request " << id;
    }
    EXPECT_GT(h.worker.num_offloads(), 10);
    EXPECT_GT(h.worker.num_loads(), 10);
    EXPECT_GT(h.sched.host_pool().num_evictions(), 0);
    EXPECT_EQ(h.sched.host_pool().num_pinned(), 0);
    EXPECT_EQ(h.sched.prefix_cache_report().stats.host_loads, h.worker.num_loads());
  }
}

}  // namespace
}  // namespace scheduler_test
}  // namespace lorc
