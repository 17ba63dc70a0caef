// The request scheduler: admission, chunked prefill, preemption, priorities, stopping, aborts,
// the apply path's edge cases and validation (the harness: scheduler_test_harness.h).
#include "tests/coordinator/scheduler_test_harness.h"

namespace lorc {
namespace scheduler_test {
namespace {

// --- Basics ---------------------------------------------------------------------------------

TEST(SchedulerTest, OneRequestPrefillsThenDecodesToMaxTokens) {
  Harness h(Config(16, 64));
  ASSERT_OK(h.Add(1, Prompt(20), Params(5)));
  EXPECT_EQ(h.sched.num_waiting(), 1);
  EXPECT_TRUE(h.sched.HasWork());

  PlanView p = h.Step();
  ASSERT_EQ(p.seqs.size(), 1u);
  EXPECT_EQ(p.seqs[0].seq_id, 1);
  EXPECT_EQ(p.seqs[0].tokens, Prompt(20));
  EXPECT_EQ(p.seqs[0].num_cached, 0);
  EXPECT_EQ(p.seqs[0].block_table.size(), 2u);
  EXPECT_TRUE(p.seqs[0].sample);
  ASSERT_TRUE(p.seqs[0].params.has_value());
  EXPECT_EQ(p.seqs[0].params->max_tokens, 5);
  EXPECT_THAT(p.copies, IsEmpty());
  ASSERT_EQ(h.last_events.size(), 1u);
  EXPECT_EQ(h.last_events[0].token, PlainModel(1, 20));
  EXPECT_FALSE(h.last_events[0].finished);
  EXPECT_EQ(h.sched.num_running(), 1);
  EXPECT_EQ(h.sched.num_free_blocks(), 62);

  for (int i = 1; i < 5; ++i) {
    p = h.Step();
    ASSERT_EQ(p.seqs.size(), 1u);
    EXPECT_EQ(p.seqs[0].num_cached, 20 + i - 1);
    EXPECT_THAT(p.seqs[0].tokens, ElementsAre(PlainModel(1, 20 + i - 1)));
    EXPECT_TRUE(p.seqs[0].sample);
    EXPECT_FALSE(p.seqs[0].params.has_value());
    ASSERT_EQ(h.last_events.size(), 1u);
    EXPECT_EQ(h.last_events[0].finished, i == 4);
  }
  EXPECT_EQ(h.last_events[0].reason, FinishReason::kLength);
  EXPECT_EQ(h.outputs[1], Expected(1, 20, 5));
  EXPECT_EQ(h.ended[1], FinishReason::kLength);
  EXPECT_EQ(h.sched.num_free_blocks(), 64);
  EXPECT_EQ(h.sched.num_running(), 0);
  EXPECT_FALSE(h.sched.Contains(1));

  // The workers still have to hear of the end.
  EXPECT_TRUE(h.sched.HasWork());
  p = h.Step();
  EXPECT_THAT(p.seqs, IsEmpty());
  EXPECT_THAT(p.finished, ElementsAre(1));
  EXPECT_FALSE(h.sched.HasWork());
  EXPECT_THAT(h.sched.Schedule().finished, IsEmpty());
}

TEST(SchedulerTest, ChunkedPrefillSamplesOnlyAfterTheLastChunk) {
  Harness h(Config(16, 400, 2048));
  ASSERT_OK(h.Add(7, Prompt(5000), Params(3)));
  const int64_t chunks[] = {2048, 2048, 904};
  int64_t cached = 0;
  for (int i = 0; i < 3; ++i) {
    PlanView p = h.Step();
    ASSERT_EQ(p.seqs.size(), 1u);
    const SeqView& s = p.seqs[0];
    EXPECT_EQ(static_cast<int64_t>(s.tokens.size()), chunks[i]);
    EXPECT_EQ(s.num_cached, cached);
    EXPECT_EQ(s.params.has_value(), i == 0);
    EXPECT_EQ(s.sample, i == 2);
    EXPECT_EQ(static_cast<int64_t>(s.block_table.size()), CeilDiv(cached + chunks[i], 16));
    cached += chunks[i];
    EXPECT_EQ(h.sched.GetSequence(7)->num_computed, cached);
    EXPECT_EQ(h.last_events.size(), i == 2 ? 1u : 0u);
  }
  PlanView p = h.Step();
  ASSERT_EQ(p.seqs.size(), 1u);
  EXPECT_EQ(p.seqs[0].num_cached, 5000);
  EXPECT_EQ(p.seqs[0].tokens.size(), 1u);
  h.RunToCompletion();
  EXPECT_EQ(h.outputs[7], Expected(7, 5000, 3));
}

TEST(SchedulerTest, DecodesGoBeforePrefillsWithinTheBudget) {
  // Without prefix caching: request 5's prompt is a prefix of 4's (prefix_cache_test covers that).
  Harness h(NoPrefixCaching(Config(4, 1000, 64)));
  for (int64_t id = 1; id <= 3; ++id) ASSERT_OK(h.Add(id, Prompt(10, id), Params(20)));
  PlanView p = h.Step();
  ASSERT_EQ(p.seqs.size(), 3u);  // 30 tokens of prefill
  ASSERT_OK(h.Add(4, Prompt(100), Params(5)));
  p = h.Step();
  ASSERT_EQ(p.seqs.size(), 4u);
  for (int i = 0; i < 3; ++i) EXPECT_EQ(p.seqs[i].tokens.size(), 1u);
  EXPECT_EQ(p.seqs[3].seq_id, 4);
  EXPECT_EQ(p.seqs[3].tokens.size(), 61u);  // 64 - 3 decodes
  EXPECT_FALSE(p.seqs[3].sample);
  // A partial prefill continues before new admissions.
  ASSERT_OK(h.Add(5, Prompt(10), Params(5)));
  p = h.Step();
  ASSERT_EQ(p.seqs.size(), 5u);
  EXPECT_EQ(p.seqs[3].seq_id, 4);
  EXPECT_EQ(p.seqs[3].tokens.size(), 39u);
  EXPECT_TRUE(p.seqs[3].sample);
  EXPECT_EQ(p.seqs[4].seq_id, 5);
  EXPECT_EQ(p.seqs[4].tokens.size(), 10u);
  h.RunToCompletion();
  for (int64_t id = 1; id <= 3; ++id) EXPECT_EQ(h.outputs[id], Expected(id, 10, 20));
  EXPECT_EQ(h.outputs[4], Expected(4, 100, 5));
}

// kv_policy_prefill_interval (--kv-policy-prefill every-chunk): a prompt's chunk never crosses a
// multiple of the interval, where the workers' policy chooses, so the choices see the same
// prompt positions whatever shares the steps. Decodes and the rest of the budget are unchanged.
TEST(SchedulerTest, PromptChunksEndAtMultiplesOfThePolicyInterval) {
  for (const int64_t interval : {int64_t{0}, int64_t{64}}) {
    SchedulerConfig c = NoPrefixCaching(Config(4, 1000, 64));
    c.kv_policy_prefill_interval = interval;
    Harness h(c);
    for (int64_t id = 1; id <= 3; ++id) ASSERT_OK(h.Add(id, Prompt(10, id), Params(20)));
    PlanView p = h.Step();
    ASSERT_EQ(p.seqs.size(), 3u);  // 30 tokens of prefill, under the interval
    for (const SeqView& s : p.seqs) EXPECT_EQ(s.tokens.size(), 10u);
    ASSERT_OK(h.Add(4, Prompt(150), Params(5)));
    // 3 decodes leave 61 tokens a step: without the interval 61, 61, 28; with it each chunk
    // stops at 64 and 128 first.
    const std::vector<size_t> chunks = interval > 0 ? std::vector<size_t>{61, 3, 61, 3, 22}
                                                    : std::vector<size_t>{61, 61, 28};
    for (size_t i = 0; i < chunks.size(); ++i) {
      p = h.Step();
      ASSERT_EQ(p.seqs.size(), 4u) << "step " << i;
      for (int j = 0; j < 3; ++j) EXPECT_EQ(p.seqs[j].tokens.size(), 1u);
      EXPECT_EQ(p.seqs[3].seq_id, 4);
      EXPECT_EQ(p.seqs[3].tokens.size(), chunks[i]) << "interval " << interval << ", chunk " << i;
      EXPECT_EQ(p.seqs[3].sample, i + 1 == chunks.size());
    }
    h.RunToCompletion();
    for (int64_t id = 1; id <= 3; ++id) EXPECT_EQ(h.outputs[id], Expected(id, 10, 20));
    EXPECT_EQ(h.outputs[4], Expected(4, 150, 5));
  }
  SchedulerConfig bad = Config(16, 64);
  bad.kv_policy_prefill_interval = -1;
  EXPECT_THAT(Scheduler::Create(bad).status(),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("kv_policy_prefill_interval must be >= 0")));
}

TEST(SchedulerTest, BudgetSmallerThanTheDecodesLeavesTheRestForNextStep) {
  Harness h(Config(4, 1000, 2));
  for (int64_t id = 1; id <= 3; ++id) ASSERT_OK(h.Add(id, Prompt(1, id), Params(4)));
  h.RunToCompletion();  // the harness checks that no step exceeds 2 tokens
  for (int64_t id = 1; id <= 3; ++id) EXPECT_EQ(h.outputs[id], Expected(id, 1, 4));
}

// --- Admission and capacity -----------------------------------------------------------------

TEST(SchedulerTest, LaterRequestsWaitForBlocks) {
  // Each request holds at most 19 tokens of K/V: 5 blocks of 4. Admission needs blocks for the
  // prompt + 1 and one spare block per running sequence.
  Harness h(Config(4, 10));
  for (int64_t id = 1; id <= 3; ++id) ASSERT_OK(h.Add(id, Prompt(16, id), Params(4)));
  PlanView p = h.Step();
  ASSERT_EQ(p.seqs.size(), 2u);  // 1: 5 <= 10; 2: 5 + 1 spare <= 6; 3: 5 + 2 > 2
  EXPECT_EQ(h.sched.num_waiting(), 1);
  EXPECT_EQ(h.sched.GetSequence(3)->state, SequenceState::kWaiting);
  h.RunToCompletion();
  EXPECT_EQ(h.sched.num_preemptions(), 0);
  EXPECT_GT(h.first_step[3], 4u);  // after 1 and 2 finished (4 steps)
  for (int64_t id = 1; id <= 3; ++id) EXPECT_EQ(h.outputs[id], Expected(id, 16, 4));
}

TEST(SchedulerTest, MaxRunningBoundsTheRunningSet) {
  SchedulerConfig c = Config(4, 1000);
  c.max_num_seqs = 2;
  Harness h(c);
  for (int64_t id = 1; id <= 5; ++id) ASSERT_OK(h.Add(id, Prompt(3, id), Params(3)));
  h.Step();
  EXPECT_EQ(h.sched.num_running(), 2);
  EXPECT_EQ(h.sched.num_waiting(), 3);
  h.RunToCompletion();
  for (int64_t id = 1; id <= 5; ++id) EXPECT_EQ(h.outputs[id], Expected(id, 3, 3));
}

TEST(SchedulerTest, BoundedQueue) {
  SchedulerConfig c = Config(4, 100);
  c.max_waiting = 2;
  Harness h(c);
  ASSERT_OK(h.Add(1, Prompt(4), Params(2)));
  ASSERT_OK(h.Add(2, Prompt(4), Params(2)));
  EXPECT_THAT(h.Add(3, Prompt(4), Params(2)),
              StatusIs(absl::StatusCode::kResourceExhausted, HasSubstr("queue full (2 waiting)")));
  EXPECT_FALSE(h.sched.Contains(3));
  h.Step();  // admits both
  EXPECT_OK(h.Add(3, Prompt(4), Params(2)));
  h.RunToCompletion();
}

TEST(SchedulerTest, RequestLargerThanTheWholeCacheIsRejected) {
  Harness h(Config(4, 10));
  // Never fits: INVALID_ARGUMENT (retrying cannot help), not the retryable RESOURCE_EXHAUSTED.
  EXPECT_THAT(h.Add(1, Prompt(30), Params(20)),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("needs 13 KV blocks for 49 cached tokens (prompt + max_tokens - "
                                 "1), the whole cache has 10")));
  // The prompt alone is too long (41 tokens: 11 blocks): the error names the prompt, not max_tokens.
  EXPECT_THAT(h.Add(1, Prompt(41), Params(1)),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("prompt: its 41 tokens need 11 KV blocks, the whole cache has 10")));
  // Exactly the whole cache (30 + 11 - 1 = 40 cached tokens: the last sampled token is never
  // written): runs alone, to the end.
  ASSERT_OK(h.Add(2, Prompt(30), Params(11)));
  ASSERT_OK(h.Add(3, Prompt(2), Params(2)));
  h.RunToCompletion();
  EXPECT_EQ(h.outputs[2], Expected(2, 30, 11));
  // A prompt that fills the whole cache and samples one token: admitted and run.
  ASSERT_OK(h.Add(4, Prompt(40), Params(1)));
  h.RunToCompletion();
  EXPECT_EQ(h.outputs[4], Expected(4, 40, 1));
  EXPECT_EQ(h.outputs[3], Expected(3, 2, 2));
}

// --- Preemption -----------------------------------------------------------------------------

// Outputs of the same requests with a cache large enough for no preemption.
std::map<int64_t, std::vector<int32_t>> Reference(
    const std::vector<std::tuple<int64_t, int64_t, int32_t>>& requests) {
  Harness big(Config(4, 10000));
  for (auto [id, prompt, max_tokens] : requests) {
    EXPECT_OK(big.Add(id, Prompt(prompt, id), Params(max_tokens)));
  }
  big.RunToCompletion();
  EXPECT_EQ(big.sched.num_preemptions(), 0);
  return big.outputs;
}

TEST(SchedulerTest, PreemptsTheLatestAdmittedAndRecomputesTransparently) {
  // Two requests of 8 + 16 tokens: 6 blocks each at most, 8 in the cache.
  const std::vector<std::tuple<int64_t, int64_t, int32_t>> reqs = {{1, 8, 16}, {2, 8, 16}};
  // Without prefix caching (with it, readmission starts at its own cached blocks:
  // SchedulerPrefixCacheTest.APreemptedSequenceResumesFromItsCachedBlocks).
  Harness h(NoPrefixCaching(Config(4, 8)));
  for (auto [id, prompt, max_tokens] : reqs) {
    ASSERT_OK(h.Add(id, Prompt(prompt, id), Params(max_tokens)));
  }
  PlanView p = h.Step();
  ASSERT_EQ(p.seqs.size(), 2u);  // 3 + 0 <= 8, then 3 + 1 spare <= 6
  int steps = 1;
  while (p.preempted.empty() && steps < 100) {
    p = h.Step();
    ++steps;
  }
  ASSERT_THAT(p.preempted, ElementsAre(2));
  ASSERT_EQ(p.seqs.size(), 1u);
  EXPECT_EQ(p.seqs[0].seq_id, 1);
  std::optional<SequenceInfo> info = h.sched.GetSequence(2);
  ASSERT_TRUE(info.has_value());
  EXPECT_EQ(info->state, SequenceState::kWaiting);
  EXPECT_EQ(info->num_computed, 0);
  EXPECT_EQ(info->num_blocks, 0);
  EXPECT_EQ(info->num_preemptions, 1);
  EXPECT_GT(info->num_generated, 0);
  const std::vector<int32_t> tokens_at_preemption(h.sched.Tokens(2).begin(),
                                                  h.sched.Tokens(2).end());
  EXPECT_EQ(h.sched.num_preemptions(), 1);

  // Readmission recomputes prompt + generated from position 0: the whole history is sent again,
  // the params are not (the workers kept the sampler).
  bool readmitted = false;
  while (!readmitted && h.sched.HasWork()) {
    p = h.Step();
    for (const SeqView& s : p.seqs) {
      if (s.seq_id != 2) continue;
      readmitted = true;
      EXPECT_EQ(s.num_cached, 0);
      EXPECT_FALSE(s.params.has_value());
      EXPECT_EQ(s.new_token_ids, tokens_at_preemption);
      EXPECT_EQ(s.tokens, tokens_at_preemption);
      EXPECT_TRUE(s.sample);
    }
  }
  EXPECT_TRUE(readmitted);
  h.RunToCompletion();
  EXPECT_EQ(h.outputs, Reference(reqs));
  EXPECT_EQ(h.ended[1], FinishReason::kLength);
  EXPECT_EQ(h.ended[2], FinishReason::kLength);
}

TEST(SchedulerTest, PreemptsTheLowestPriorityFirst) {
  Harness h(Config(4, 8));
  ASSERT_OK(h.Add(1, Prompt(8, 1), Params(16), /*priority=*/0));
  h.Step();
  ASSERT_OK(h.Add(2, Prompt(8, 2), Params(16), /*priority=*/1));
  PlanView p = h.Step();
  ASSERT_EQ(p.seqs.size(), 2u);
  while (p.preempted.empty() && h.sched.HasWork()) p = h.Step();
  EXPECT_THAT(p.preempted, ElementsAre(1));  // admitted first, but lower priority
  h.RunToCompletion();
  EXPECT_EQ(h.outputs, Reference({{1, 8, 16}, {2, 8, 16}}));
}

TEST(SchedulerTest, ASequenceThatIsItselfTheVictimStepsAside) {
  // 2 (latest admitted) needs a block first; it is the victim itself, 1 continues.
  Harness h(Config(4, 8));
  ASSERT_OK(h.Add(1, Prompt(7, 1), Params(17)));
  ASSERT_OK(h.Add(2, Prompt(8, 2), Params(16)));
  PlanView p = h.Step();
  while (p.preempted.empty() && h.sched.HasWork()) p = h.Step();
  EXPECT_THAT(p.preempted, ElementsAre(2));
  h.RunToCompletion();
  EXPECT_EQ(h.outputs, Reference({{1, 7, 17}, {2, 8, 16}}));
}

TEST(SchedulerTest, PreemptedSequenceGoesBackToTheFrontOfItsPriorityClass) {
  Harness h(Config(4, 8));
  ASSERT_OK(h.Add(1, Prompt(8, 1), Params(16)));
  ASSERT_OK(h.Add(2, Prompt(8, 2), Params(16)));
  h.Step();
  ASSERT_OK(h.Add(3, Prompt(8, 3), Params(16)));  // arrives before 2 is preempted
  PlanView p = h.Step();
  while (p.preempted.empty() && h.sched.HasWork()) p = h.Step();
  ASSERT_THAT(p.preempted, ElementsAre(2));
  const uint64_t preempted_at = p.step_id;
  uint64_t readmitted_at = 0;
  while (h.sched.HasWork()) {
    p = h.Step();
    for (const SeqView& s : p.seqs) {
      if (s.seq_id == 2 && !s.new_token_ids.empty() && p.step_id > preempted_at &&
          readmitted_at == 0) {
        readmitted_at = p.step_id;
      }
    }
  }
  EXPECT_GT(readmitted_at, preempted_at);
  EXPECT_LT(readmitted_at, h.first_step[3]);
  EXPECT_EQ(h.outputs, Reference({{1, 8, 16}, {2, 8, 16}, {3, 8, 16}}));
}

TEST(SchedulerTest, AVictimAlreadyScheduledInTheStepIsTakenBack) {
  // Low-priority 1 decodes; high-priority 2 prefills one token a step beside it. When 2's next
  // chunk finds no free block, 1 (already in the plan: decodes go first) is preempted.
  Harness h(Config(4, 16, 2));
  ASSERT_OK(h.Add(1, Prompt(4, 1), Params(60), /*priority=*/0));
  while (h.sched.GetSequence(1)->num_computed < 36) h.Step();
  ASSERT_OK(h.Add(2, Prompt(16, 2), Params(1), /*priority=*/1));
  PlanView p = h.Step();
  ASSERT_EQ(p.seqs.size(), 2u);  // 5 blocks + 1 spare <= 6 free
  while (p.preempted.empty() && h.sched.HasWork()) p = h.Step();
  EXPECT_THAT(p.preempted, ElementsAre(1));
  ASSERT_EQ(p.seqs.size(), 1u);
  EXPECT_EQ(p.seqs[0].seq_id, 2);
  EXPECT_EQ(p.seqs[0].tokens.size(), 1u);
  EXPECT_EQ(h.sched.GetSequence(1)->num_blocks, 0);
  h.RunToCompletion();
  EXPECT_EQ(h.outputs, Reference({{1, 4, 60}, {2, 16, 1}}));
}

// --- Priority -------------------------------------------------------------------------------

TEST(SchedulerTest, HigherPriorityIsAdmittedFirstThenArrivalOrder) {
  // One request at a time fits (5 of 6 blocks).
  Harness h(Config(4, 6));
  ASSERT_OK(h.Add(1, Prompt(16, 1), Params(4), 0));
  ASSERT_OK(h.Add(2, Prompt(16, 2), Params(4), 5));
  ASSERT_OK(h.Add(3, Prompt(16, 3), Params(4), 9));
  ASSERT_OK(h.Add(4, Prompt(16, 4), Params(4), 5));
  ASSERT_OK(h.Add(5, Prompt(16, 5), Params(4), -3));
  h.RunToCompletion();
  EXPECT_LT(h.first_step[3], h.first_step[2]);
  EXPECT_LT(h.first_step[2], h.first_step[4]);
  EXPECT_LT(h.first_step[4], h.first_step[1]);
  EXPECT_LT(h.first_step[1], h.first_step[5]);
  EXPECT_EQ(h.sched.num_preemptions(), 0);
}

TEST(SchedulerTest, AdmissionDoesNotSkipAheadOfTheHead) {
  Harness h(Config(4, 6));
  ASSERT_OK(h.Add(1, Prompt(16, 1), Params(4)));
  ASSERT_OK(h.Add(2, Prompt(16, 2), Params(4)));  // does not fit beside 1
  ASSERT_OK(h.Add(3, Prompt(1, 3), Params(1)));   // would fit, but waits behind 2
  PlanView p = h.Step();
  while (h.sched.Contains(1)) {
    EXPECT_EQ(h.sched.GetSequence(2)->state, SequenceState::kWaiting);
    EXPECT_EQ(h.sched.GetSequence(3)->state, SequenceState::kWaiting);
    p = h.Step();
  }
  p = h.Step();  // 1 is gone: 2, then 3 beside it
  ASSERT_EQ(p.seqs.size(), 2u);
  EXPECT_EQ(p.seqs[0].seq_id, 2);
  EXPECT_EQ(p.seqs[1].seq_id, 3);
  h.RunToCompletion();
}

// --- Stopping -------------------------------------------------------------------------------

TEST(SchedulerTest, EosAndStopIdsEndWithStop) {
  // Sequence 1 meets EOS at its 3rd token, 2 ignores it, 3 meets stop id 555 at its 2nd token.
  auto model = [](int64_t seq, int64_t pos) -> int32_t {
    if ((seq == 1 || seq == 2) && pos == 12) return kEos;
    if (seq == 3 && pos == 11) return 555;
    return PlainModel(seq, pos);
  };
  Harness h(Config(4, 100), model);
  ASSERT_OK(h.Add(1, Prompt(10), Params(8)));
  SamplingParams ignore = Params(8);
  ignore.ignore_eos = true;
  ASSERT_OK(h.Add(2, Prompt(10), ignore));
  SamplingParams stop = Params(8);
  stop.stop_token_ids = {555};
  ASSERT_OK(h.Add(3, Prompt(10), stop));
  ASSERT_OK(h.Add(4, Prompt(10), Params(3)));
  h.RunToCompletion();
  EXPECT_EQ(h.ended[1], FinishReason::kStop);
  EXPECT_THAT(h.outputs[1], ElementsAre(PlainModel(1, 10), PlainModel(1, 11), kEos));
  EXPECT_EQ(h.ended[2], FinishReason::kLength);
  EXPECT_EQ(h.outputs[2].size(), 8u);
  EXPECT_EQ(h.outputs[2][2], kEos);
  EXPECT_EQ(h.ended[3], FinishReason::kStop);
  EXPECT_THAT(h.outputs[3], ElementsAre(PlainModel(3, 10), 555));
  EXPECT_EQ(h.ended[4], FinishReason::kLength);
  EXPECT_EQ(h.outputs[4], Expected(4, 10, 3));
}

TEST(SchedulerTest, EosAtMaxTokensIsStop) {
  auto model = [](int64_t seq, int64_t pos) -> int32_t { return pos == 12 ? kEos : 1; };
  Harness h(Config(4, 100), model);
  ASSERT_OK(h.Add(1, Prompt(10), Params(3)));
  h.RunToCompletion();
  EXPECT_EQ(h.ended[1], FinishReason::kStop);
  EXPECT_THAT(h.outputs[1], ElementsAre(1, 1, kEos));
}

// --- Abort and Finish -----------------------------------------------------------------------

TEST(SchedulerTest, AbortOfAWaitingSequenceNeverSeenIsSilent) {
  Harness h(Config(4, 100));
  ASSERT_OK(h.Add(1, Prompt(4), Params(4)));
  h.Abort(1);
  EXPECT_FALSE(h.sched.Contains(1));
  EXPECT_EQ(h.sched.num_waiting(), 0);
  EXPECT_FALSE(h.sched.HasWork());
  StepPlan p = h.sched.Schedule();
  EXPECT_THAT(p.seqs, IsEmpty());
  EXPECT_THAT(p.finished, IsEmpty());
  h.sched.Abort(1);   // unknown ids are ignored
  h.sched.Abort(42);
  // The id is free again.
  EXPECT_OK(h.Add(1, Prompt(4), Params(4)));
}

TEST(SchedulerTest, AbortOfARunningSequenceFreesBlocksAtOnce) {
  Harness h(Config(4, 100));
  ASSERT_OK(h.Add(1, Prompt(10), Params(8)));
  ASSERT_OK(h.Add(2, Prompt(10), Params(8)));
  h.Step();
  h.Step();
  EXPECT_EQ(h.sched.num_free_blocks(), 100 - 2 * 3);
  h.Abort(1);
  EXPECT_EQ(h.sched.num_free_blocks(), 100 - 3);
  EXPECT_EQ(h.sched.num_running(), 1);
  // Its id cannot be reused until the workers have been told.
  EXPECT_THAT(h.sched.Add(1, Prompt(3), Params(1)),
              StatusIs(absl::StatusCode::kAlreadyExists,
                       HasSubstr("sequence id 1 is already in use")));
  PlanView p = h.Step();
  EXPECT_THAT(p.finished, ElementsAre(1));
  ASSERT_EQ(p.seqs.size(), 1u);
  EXPECT_EQ(p.seqs[0].seq_id, 2);
  h.RunToCompletion();
  EXPECT_EQ(h.ended[1], FinishReason::kAborted);
  EXPECT_EQ(h.outputs[2], Expected(2, 10, 8));
}

TEST(SchedulerTest, AbortOfAPreemptedSequenceIsAnnounced) {
  Harness h(Config(4, 8));
  ASSERT_OK(h.Add(1, Prompt(8, 1), Params(16)));
  ASSERT_OK(h.Add(2, Prompt(8, 2), Params(16)));
  PlanView p = h.Step();
  while (p.preempted.empty() && h.sched.HasWork()) p = h.Step();
  ASSERT_THAT(p.preempted, ElementsAre(2));
  h.Abort(2);
  p = h.Step();
  EXPECT_THAT(p.finished, ElementsAre(2));
  h.RunToCompletion();
}

TEST(SchedulerTest, TokensForASequenceAbortedMeanwhileAreDropped) {
  Harness h(Config(4, 100));
  ASSERT_OK(h.Add(1, Prompt(10), Params(8)));
  ASSERT_OK(h.Add(2, Prompt(10), Params(8)));
  StepPlan p = h.sched.Schedule();
  StepResult r;
  h.worker.Run(p, &r);
  ASSERT_EQ(r.sampled.size(), 2u);
  h.sched.Abort(1);
  h.live.erase(1);
  std::vector<SequenceEvent> events = h.sched.Apply(r);
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].seq_id, 2);
  EXPECT_EQ(h.sched.num_free_blocks(), 100 - 3);
  EXPECT_THAT(h.Step().finished, ElementsAre(1));
  h.RunToCompletion();
}

TEST(SchedulerTest, FinishEndsARunningSequenceLikeAbort) {
  Harness h(Config(4, 100));
  ASSERT_OK(h.Add(1, Prompt(10), Params(8)));
  h.Step();
  EXPECT_EQ(h.sched.num_free_blocks(), 97);
  h.sched.Finish(1, FinishReason::kStop);  // e.g. a stop string
  h.live.erase(1);
  EXPECT_EQ(h.sched.num_free_blocks(), 100);
  EXPECT_EQ(h.sched.num_running(), 0);
  EXPECT_THAT(h.Step().finished, ElementsAre(1));
  h.RunToCompletion();
}

// --- Apply edge cases -----------------------------------------------------------------------

TEST(SchedulerTest, MissingOrBadTokensEndTheSequenceWithError) {
  Harness h(Config(4, 100));
  ASSERT_OK(h.Add(1, Prompt(10), Params(8)));
  ASSERT_OK(h.Add(2, Prompt(10), Params(8)));
  ASSERT_OK(h.Add(3, Prompt(10), Params(8)));
  StepPlan p = h.sched.Schedule();
  StepResult r;
  h.worker.Run(p, &r);
  ASSERT_EQ(r.sampled.size(), 3u);
  r.sampled[1].token = static_cast<int32_t>(kVocab);  // out of the vocabulary
  r.sampled.pop_back();                                // nothing for 3
  r.sampled.push_back(r.sampled[0]);                   // 1 twice: the second is dropped
  std::vector<SequenceEvent> events = h.sched.Apply(r);
  ASSERT_EQ(events.size(), 3u);
  EXPECT_EQ(events[0].seq_id, 1);
  EXPECT_FALSE(events[0].finished);
  EXPECT_EQ(events[1].seq_id, 2);
  EXPECT_EQ(events[1].token, -1);
  EXPECT_TRUE(events[1].finished);
  EXPECT_EQ(events[1].reason, FinishReason::kError);
  EXPECT_EQ(events[2].seq_id, 3);
  EXPECT_EQ(events[2].token, -1);
  EXPECT_EQ(events[2].reason, FinishReason::kError);
  EXPECT_EQ(h.sched.num_running(), 1);
  EXPECT_EQ(h.sched.num_free_blocks(), 100 - 3);
  EXPECT_EQ(h.sched.GetSequence(1)->num_generated, 1);
  // A stale or repeated result changes nothing.
  EXPECT_THAT(h.sched.Apply(r), IsEmpty());
  StepResult stale;
  stale.step_id = 12345;
  stale.sampled = {{1, 5}};
  EXPECT_THAT(h.sched.Apply(stale), IsEmpty());
  EXPECT_OK(h.sched.Validate());
}

TEST(SchedulerTest, ADecodeIsScheduledWhileItsTokenIsInFlight) {
  Harness h(Config(4, 100));
  ASSERT_OK(h.Add(1, Prompt(10), Params(8)));
  std::optional<PlanView> first = h.Submit();
  ASSERT_TRUE(first.has_value());
  ASSERT_EQ(first->seqs.size(), 1u);
  ASSERT_OK(h.Add(2, Prompt(10), Params(8)));
  // Before first's result is applied, 1 computes the token being sampled for it: the plan
  // carries no token for it, the worker feeds its own.
  StepPlan second = h.sched.Schedule();
  ASSERT_EQ(second.seqs.size(), 2u);
  EXPECT_EQ(second.seqs[0].seq_id, 1);
  EXPECT_EQ(second.seqs[0].num_computed_tokens, 10);
  EXPECT_EQ(second.seqs[0].num_scheduled_tokens, 1);
  EXPECT_THAT(second.seqs[0].new_token_ids, IsEmpty());
  EXPECT_TRUE(second.seqs[0].sample);
  EXPECT_FALSE(second.seqs[0].params.has_value());
  EXPECT_EQ(second.seqs[1].seq_id, 2);
  StepResult r2;
  const PlanView v = h.worker.Run(second, &r2);
  EXPECT_THAT(v.seqs[0].tokens, ElementsAre(PlainModel(1, 10)));
  h.ApplyOldest();
  ASSERT_EQ(h.last_events.size(), 1u);
  h.ApplyResult(r2);
  EXPECT_EQ(h.last_events.size(), 2u);
  EXPECT_EQ(h.outputs[1], Expected(1, 10, 2));
  h.RunToCompletion(100000, /*depth=*/2);
  EXPECT_EQ(h.outputs[1], Expected(1, 10, 8));
  EXPECT_EQ(h.outputs[2], Expected(2, 10, 8));
}

TEST(SchedulerTest, NoStepIsInFlightPastMaxTokens) {
  // The steps in flight already sample the last allowed token: nothing more is scheduled.
  Harness h(Config(4, 100));
  ASSERT_OK(h.Add(1, Prompt(6), Params(2)));
  ASSERT_TRUE(h.Submit().has_value());  // prefill, samples token 1
  ASSERT_TRUE(h.Submit().has_value());  // samples token 2 (the last)
  EXPECT_FALSE(h.Submit().has_value());
  h.ApplyOldest();
  h.ApplyOldest();
  EXPECT_EQ(h.ended[1], FinishReason::kLength);
  EXPECT_EQ(h.outputs[1], Expected(1, 6, 2));
  h.RunToCompletion();
}

TEST(SchedulerTest, AStopSeenOneStepLateDropsTheOverrunToken) {
  // The model stops sequence 1 at its second token; the step after it is already in flight.
  auto model = [](int64_t seq, int64_t pos) { return pos == 11 ? kEos : PlainModel(seq, pos); };
  Harness h(Config(4, 100), model);
  ASSERT_OK(h.Add(1, Prompt(10), Params(8)));
  h.RunToCompletion(100000, /*depth=*/2);
  EXPECT_EQ(h.ended[1], FinishReason::kStop);
  EXPECT_THAT(h.outputs[1], ElementsAre(PlainModel(1, 10), kEos));
}

TEST(SchedulerTest, WorkerFailedSequencesEndWithTheWorkersStatus) {
  Harness h(Config(4, 100));
  ASSERT_OK(h.Add(1, Prompt(10), Params(8)));
  ASSERT_OK(h.Add(2, Prompt(10), Params(8)));
  StepPlan p = h.sched.Schedule();
  StepResult r;
  h.worker.Run(p, &r);
  r.sampled.erase(r.sampled.begin());  // the worker left 1 out ...
  r.failed.push_back({1, absl::InvalidArgumentError("token id 5000 outside the vocabulary")});
  h.ApplyResult(r);
  ASSERT_EQ(h.last_events.size(), 2u);
  EXPECT_EQ(h.last_events[0].seq_id, 1);
  EXPECT_TRUE(h.last_events[0].finished);
  EXPECT_EQ(h.last_events[0].reason, FinishReason::kError);
  EXPECT_THAT(h.last_events[0].status,
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("token id 5000")));
  EXPECT_EQ(h.last_events[1].seq_id, 2);
  EXPECT_FALSE(h.last_events[1].finished);
  EXPECT_EQ(h.sched.num_running(), 1);
  h.RunToCompletion();
  EXPECT_EQ(h.outputs[2], Expected(2, 10, 8));
}

TEST(SchedulerTest, ADecodingSequencesStepMessageIsIndependentOfItsContext) {
  // The wire form of a decode step carries no block table and no token history.
  for (int64_t context : {100, 3000}) {
    Harness h(Config(16, 1000, 4096));
    ASSERT_OK(h.Add(1, Prompt(context), Params(40)));
    for (int i = 0; i < 20; ++i) h.Step();
    StepPlan p = h.sched.Schedule();
    ASSERT_EQ(p.seqs.size(), 1u);
    const ScheduledSequence& s = p.seqs[0];
    EXPECT_EQ(s.num_scheduled_tokens, 1);
    EXPECT_THAT(s.new_token_ids, IsEmpty());
    EXPECT_LE(s.new_block_ids.size(), 1u);  // at most the block the new token opens
    EXPECT_FALSE(s.params.has_value());
  }
}

// --- Validation -----------------------------------------------------------------------------

TEST(SchedulerTest, CreateRejectsBadConfigsNamingTheField) {
  using absl::StatusCode;
  SchedulerConfig eos = Config(16, 64);
  eos.eos_token_ids = {kEos, kVocab};  // one past the vocabulary (a bad config.json)
  EXPECT_THAT(Scheduler::Create(eos).status(),
              StatusIs(StatusCode::kInvalidArgument,
                       HasSubstr("eos token id 1000 outside the vocabulary [0, 1000)")));
  SchedulerConfig neg = Config(16, 64);
  neg.eos_token_ids = {-1};
  EXPECT_THAT(Scheduler::Create(neg).status(), StatusIs(StatusCode::kInvalidArgument,
                                                        HasSubstr("eos token id -1")));
  // block_size 0 used to reach KvBlockManager's CHECK before the config was validated.
  EXPECT_THAT(Scheduler::Create(Config(0, 64)).status(),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("block_size must be > 0, got 0")));
  EXPECT_THAT(Scheduler::Create(Config(16, 0)).status(),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("num_blocks must be > 0")));
  EXPECT_THAT(Scheduler::Create(Config(16, 64, /*budget=*/0)).status(),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("max_num_batched_tokens must be > 0")));
  SchedulerConfig vocab = Config(16, 64);
  vocab.vocab_size = 0;
  EXPECT_THAT(Scheduler::Create(vocab).status(),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("vocab_size must be > 0")));
  EXPECT_OK(Scheduler::Create(Config(16, 64)).status());
}

TEST(SchedulerTest, AddRejectsBadRequests) {
  SchedulerConfig c = Config(4, 100);
  c.max_model_len = 64;
  std::unique_ptr<Scheduler> owner = MakeScheduler(c);
  ASSERT_NE(owner, nullptr);
  Scheduler& s = *owner;
  using absl::StatusCode;
  EXPECT_THAT(s.Add(1, {}, Params(4)),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("empty prompt")));
  EXPECT_THAT(s.Add(1, {5, -1}, Params(4)),
              StatusIs(StatusCode::kInvalidArgument,
                       HasSubstr("prompt token id -1 at position 1 outside the vocabulary "
                                 "[0, 1000)")));
  EXPECT_THAT(s.Add(1, {1000}, Params(4)),
              StatusIs(StatusCode::kInvalidArgument,
                       HasSubstr("prompt token id 1000 at position 0")));
  EXPECT_THAT(s.Add(1, {5}, Params(0)),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("max_tokens must be >= 1, got 0")));
  SamplingParams hot = Params(4);
  hot.temperature = -1;
  EXPECT_THAT(s.Add(1, {5}, hot), StatusIs(StatusCode::kInvalidArgument, HasSubstr("temperature")));
  SamplingParams stop = Params(4);
  stop.stop_token_ids = {1000};
  EXPECT_THAT(s.Add(1, {5}, stop),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("stop_token_ids: id 1000 outside")));
  EXPECT_THAT(s.Add(1, Prompt(60), Params(5)),
              StatusIs(StatusCode::kInvalidArgument,
                       HasSubstr("prompt (60 tokens) + max_tokens (5) = 65 exceeds the maximum "
                                 "model length of 64 (max_model_len)")));
  EXPECT_EQ(s.num_waiting(), 0);
  EXPECT_OK(s.Add(1, Prompt(60), Params(4)));
  EXPECT_THAT(s.Add(1, Prompt(3), Params(4)),
              StatusIs(StatusCode::kAlreadyExists, HasSubstr("sequence id 1 is already in use")));
  EXPECT_EQ(s.num_waiting(), 1);
  EXPECT_OK(s.Validate());
}

TEST(SchedulerTest, MinTokensWithOnlyStopIdsAllowedIsRejected) {
  std::unique_ptr<Scheduler> s = MakeScheduler(Config(4, 100));
  ASSERT_NE(s, nullptr);
  SamplingParams p = Params(8);
  p.min_tokens = 4;
  p.allowed_token_ids = {kEos};
  EXPECT_THAT(s->Add(1, {5}, p),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("allowed_token_ids: every allowed id is an EOS or stop id")));
  p.allowed_token_ids = {7};
  p.stop_token_ids = {7};
  EXPECT_THAT(s->Add(1, {5}, p), StatusIs(absl::StatusCode::kInvalidArgument));
  p.allowed_token_ids = {7, 8};  // 8 can be sampled until min_tokens
  EXPECT_OK(s->Add(1, {5}, p));
  SamplingParams eos_ok = Params(8);
  eos_ok.min_tokens = 4;
  eos_ok.allowed_token_ids = {kEos};
  eos_ok.ignore_eos = true;  // EOS is not suppressed then
  EXPECT_OK(s->Add(2, {5}, eos_ok));
}

TEST(SchedulerTest, NeverFitCountsOnlyCachedTokens) {
  // 4 blocks of 4 = 16 slots; the last sampled token is never cached, so 10 + 7 tokens fit.
  std::unique_ptr<Scheduler> s = MakeScheduler(Config(4, 4));
  ASSERT_NE(s, nullptr);
  EXPECT_OK(s->Add(1, Prompt(10), Params(7)));
  EXPECT_THAT(s->Add(2, Prompt(10), Params(8)),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("needs 5 KV blocks for 17 cached tokens")));
}

TEST(SchedulerTest, ConfigValidation) {
  EXPECT_OK(Config(16, 10).Validate());
  SchedulerConfig c = Config(16, 10);
  c.num_blocks = 0;
  EXPECT_THAT(c.Validate(),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("num_blocks must be > 0, got 0")));
  c = Config(0, 10);
  EXPECT_THAT(c.Validate(), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("block_size")));
  c = Config(16, 10);
  c.max_num_batched_tokens = 0;
  EXPECT_THAT(c.Validate(),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("max_num_batched_tokens")));
  c = Config(16, 10);
  c.vocab_size = 0;
  EXPECT_THAT(c.Validate(), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("vocab_size")));
  c = Config(16, 10);
  c.eos_token_ids = {1000};
  EXPECT_THAT(c.Validate(),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("eos token id 1000")));
}

TEST(SchedulerTest, FinishReasonNames) {
  EXPECT_STREQ(FinishReasonName(FinishReason::kNone), "none");
  EXPECT_STREQ(FinishReasonName(FinishReason::kLength), "length");
  EXPECT_STREQ(FinishReasonName(FinishReason::kStop), "stop");
  EXPECT_STREQ(FinishReasonName(FinishReason::kAborted), "abort");
  EXPECT_STREQ(FinishReasonName(FinishReason::kError), "error");
}

}  // namespace
}  // namespace scheduler_test
}  // namespace lorc
