// KV policy compaction in the scheduler (coordinator/scheduler.h "KV policy compaction"): the
// workers' slot reports (StepResult::kv_slots) turn into a KvCompaction at the head of a plan, the
// blocks past the reported need are released at once and never indexed again, the sequence then
// grows from its compacted slots, and nothing is compacted that another holder shares, that a
// session keeps, or that frees too little. Plans and results are built by hand here: the fake
// worker of scheduler_test_harness.h knows no policy.
#include "tests/coordinator/scheduler_test_harness.h"

namespace lorc {
namespace scheduler_test {
namespace {

SchedulerConfig CompactingConfig(int32_t block_size, int32_t num_blocks) {
  SchedulerConfig c = Config(block_size, num_blocks);
  c.kv_compaction = true;
  return c;
}

// Rank 0's result for `plan`: a token for every sampling entry and the given slot reports.
StepResult ResultFor(const StepPlan& plan, std::vector<KvSlotReport> reports) {
  StepResult r;
  r.step_id = plan.step_id;
  for (const ScheduledSequence& s : plan.seqs) {
    if (s.sample) r.sampled.push_back({s.seq_id, 7, std::nullopt});
  }
  r.kv_slots = std::move(reports);
  return r;
}

TEST(SchedulerKvCompactionTest, AReportFreeingBlocksCompactsAndTheSequenceGrowsFromThere) {
  auto sched = MakeScheduler(CompactingConfig(4, 32));
  ASSERT_OK(sched->Add(1, Prompt(20), Params(30)));
  StepPlan p1 = sched->Schedule();  // the whole prompt: 5 blocks
  ASSERT_EQ(p1.seqs.size(), 1u);
  EXPECT_TRUE(p1.kv_compactions.empty());
  EXPECT_EQ(sched->num_free_blocks(), 27);
  // The policy kept at most 8 keys per (layer, head) past slot 0 after the prompt.
  sched->Apply(ResultFor(p1, {{1, 20, 0, 8}}));
  EXPECT_EQ(sched->prefix_cache_report().cached_blocks, 5);
  StepPlan p2 = sched->Schedule();
  ASSERT_EQ(p2.kv_compactions.size(), 1u);
  EXPECT_EQ(p2.kv_compactions[0].seq_id, 1);
  EXPECT_EQ(p2.kv_compactions[0].num_slots, 8);
  // 2 blocks kept, 3 released, then one more for the token computed in this step (slot 8).
  ASSERT_EQ(p2.seqs.size(), 1u);
  EXPECT_EQ(p2.seqs[0].num_computed_tokens, 20);
  EXPECT_EQ(p2.seqs[0].new_block_ids.size(), 1u);
  EXPECT_EQ(sched->blocks().NumTokens(1), 9);
  EXPECT_EQ(sched->GetSequence(1)->num_blocks, 3);
  EXPECT_EQ(sched->num_free_blocks(), 29);
  EXPECT_EQ(sched->num_kv_compactions(), 1);
  EXPECT_EQ(sched->num_kv_compaction_freed_blocks(), 3);
  // Rewritten in place: out of the prefix index, and not indexed again as they fill.
  EXPECT_EQ(sched->prefix_cache_report().cached_blocks, 0);
  EXPECT_OK(sched->Validate());
  sched->Apply(ResultFor(p2, {}));
  for (int i = 0; i < 10; ++i) {
    StepPlan p = sched->Schedule();
    EXPECT_TRUE(p.kv_compactions.empty());  // no new report
    sched->Apply(ResultFor(p, {}));
    EXPECT_OK(sched->Validate());
  }
  EXPECT_EQ(sched->blocks().NumTokens(1), 19);  // 8 + 11 tokens computed since
  EXPECT_EQ(sched->prefix_cache_report().cached_blocks, 0);
}

TEST(SchedulerKvCompactionTest, TheBoundCountsTokensInFlightAndFreesEnoughOrNothing) {
  auto sched = MakeScheduler(CompactingConfig(4, 64));
  ASSERT_OK(sched->Add(1, Prompt(40), Params(30)));
  StepPlan p1 = sched->Schedule();  // 10 blocks
  sched->Apply(ResultFor(p1, {}));
  StepPlan p2 = sched->Schedule();  // computes token 41 (slot 40), 11 blocks
  StepPlan p3 = sched->Schedule();  // in flight too: token 42
  // p2's result: after 41 tokens 33 slots are needed; p3 (in flight) computes one more: bound
  // 33 + (42 - 41) = 34 -> 9 blocks of 11: 2 freed, less than a quarter (3): nothing.
  sched->Apply(ResultFor(p2, {{1, 41, 0, 33}}));
  StepPlan p4 = sched->Schedule();
  EXPECT_TRUE(p4.kv_compactions.empty());
  // p3's result: 29 needed after 42 -> bound 29 + (43 - 42) = 30 -> 8 of 11 blocks: 3 freed.
  sched->Apply(ResultFor(p3, {{1, 42, 0, 29}}));
  StepPlan p5 = sched->Schedule();
  ASSERT_EQ(p5.kv_compactions.size(), 1u);
  EXPECT_EQ(p5.kv_compactions[0].num_slots, 30);
  EXPECT_OK(sched->Validate());
  sched->Apply(ResultFor(p4, {}));
  sched->Apply(ResultFor(p5, {}));
  EXPECT_OK(sched->Validate());
}

TEST(SchedulerKvCompactionTest, MikvKeysDemotedInTheirSlotsCompactWithoutFreeingEnoughBlocks) {
  // 400 prompt tokens on 4-token blocks: 100 blocks. MiKV packs its demoted keys into a run a
  // quarter of their slots, so a compaction frees few blocks, and during decode (well under a
  // quarter of 100 blocks freed) only the keys still demoted in their slots ask for one, once
  // they fill a block (4 here).
  auto sched = MakeScheduler(CompactingConfig(4, 128));
  ASSERT_OK(sched->Add(1, Prompt(400), Params(64)));
  StepPlan p1 = sched->Schedule();
  sched->Apply(ResultFor(p1, {}));
  StepPlan p2 = sched->Schedule();  // computes token 401
  // 396 slots needed (1 block freed, far from 25), and 3 keys demoted in their slots: nothing.
  sched->Apply(ResultFor(p2, {{1, 401, 0, 396, 3}}));
  StepPlan p3 = sched->Schedule();
  EXPECT_TRUE(p3.kv_compactions.empty());
  sched->Apply(ResultFor(p3, {}));
  // 4 keys: compacted to the bound.
  StepPlan p4 = sched->Schedule();
  sched->Apply(ResultFor(p4, {{1, 403, 0, 396, 4}}));
  StepPlan p5 = sched->Schedule();
  ASSERT_EQ(p5.kv_compactions.size(), 1u);
  EXPECT_EQ(p5.kv_compactions[0].num_slots, 396);  // nothing computed since the report
  EXPECT_EQ(sched->num_kv_compactions(), 1);
  EXPECT_OK(sched->Validate());
  sched->Apply(ResultFor(p5, {}));
  // CORM (no low entries) with the same slots: the freed-blocks rule alone, so nothing.
  auto corm = MakeScheduler(CompactingConfig(4, 128));
  ASSERT_OK(corm->Add(1, Prompt(400), Params(64)));
  StepPlan c1 = corm->Schedule();
  corm->Apply(ResultFor(c1, {{1, 400, 0, 396}}));
  EXPECT_TRUE(corm->Schedule().kv_compactions.empty());
  EXPECT_OK(corm->Validate());
}

TEST(SchedulerKvCompactionTest, SharedBlocksSessionsAndStaleReportsAreNotCompacted) {
  auto sched = MakeScheduler(CompactingConfig(4, 64));
  // Request 1 fills 5 indexed blocks; request 2 starts with the same 20 tokens and hits all 5.
  ASSERT_OK(sched->Add(1, Prompt(20), Params(30)));
  StepPlan p1 = sched->Schedule();
  sched->Apply(ResultFor(p1, {}));
  ASSERT_OK(sched->Add(2, Prompt(36), Params(30)));
  StepPlan p2 = sched->Schedule();
  ASSERT_EQ(sched->GetSequence(2)->num_cached_prompt_tokens, 20);
  // Request 1 reports from slot 0: its blocks are shared with 2, so no compaction. 2 reports from
  // its hit (slot 20) and compacts its own blocks: 22 slots, 6 of its 9 blocks.
  sched->Apply(ResultFor(p2, {{1, 21, 0, 4}, {2, 36, 20, 22}}));
  StepPlan p3 = sched->Schedule();
  ASSERT_EQ(p3.kv_compactions.size(), 1u);
  EXPECT_EQ(p3.kv_compactions[0].seq_id, 2);
  EXPECT_EQ(p3.kv_compactions[0].num_slots, 22);  // nothing computed since the report
  EXPECT_EQ(sched->GetSequence(2)->num_blocks, 6);
  EXPECT_EQ(sched->GetSequence(1)->num_blocks, 6);
  EXPECT_EQ(sched->prefix_cache_report().cached_blocks, 5);  // 1's blocks stay indexed
  EXPECT_OK(sched->Validate());
  sched->Apply(ResultFor(p3, {}));
  // A session's request is never compacted (its blocks stay pinned for the conversation).
  ASSERT_OK(sched->Add(3, Prompt(40, 3), Params(30), 0, {}, PrefixOptions{"", "chat"}));
  StepPlan p4 = sched->Schedule();
  sched->Apply(ResultFor(p4, {{3, 40, 0, 4}}));
  StepPlan p5 = sched->Schedule();
  for (const KvCompaction& c : p5.kv_compactions) EXPECT_NE(c.seq_id, 3);
  sched->Apply(ResultFor(p5, {}));
  EXPECT_OK(sched->Validate());
}

TEST(SchedulerKvCompactionTest, OffByDefaultAndPreemptionStartsOver) {
  {
    auto sched = MakeScheduler(Config(4, 32));  // kv_compaction off
    ASSERT_OK(sched->Add(1, Prompt(20), Params(30)));
    StepPlan p1 = sched->Schedule();
    sched->Apply(ResultFor(p1, {{1, 20, 0, 4}}));
    EXPECT_TRUE(sched->Schedule().kv_compactions.empty());
  }
  // 12 blocks: 1 (20 tokens, compacted to 4 slots) and 2 (12 tokens, higher priority) grow until
  // the cache is full; 1 is preempted and will be recomputed from scratch.
  auto sched = MakeScheduler(CompactingConfig(4, 12));
  ASSERT_OK(sched->Add(1, Prompt(20, 1), Params(20), /*priority=*/0));
  StepPlan p1 = sched->Schedule();
  sched->Apply(ResultFor(p1, {{1, 20, 0, 4}}));
  StepPlan p2 = sched->Schedule();
  ASSERT_EQ(p2.kv_compactions.size(), 1u);
  sched->Apply(ResultFor(p2, {}));
  ASSERT_OK(sched->Add(2, Prompt(12, 2), Params(30), /*priority=*/1));
  bool preempted = false;
  for (int i = 0; i < 20 && !preempted; ++i) {
    StepPlan p = sched->Schedule();
    preempted = std::find(p.preempted.begin(), p.preempted.end(), 1) != p.preempted.end();
    EXPECT_OK(sched->Validate());
    sched->Apply(ResultFor(p, {}));
  }
  ASSERT_TRUE(preempted);
  // Readmitted later from scratch: every token recomputed, slots = positions again.
  EXPECT_EQ(sched->GetSequence(1)->num_computed, 0);
  EXPECT_OK(sched->Validate());
}

}  // namespace
}  // namespace scheduler_test
}  // namespace lorc
