// The scheduler's parallel sampling (n > 1: forks sharing blocks, copy-on-write, children through
// preemption, aborts and failures, admission counting them) and the per-token semantics that
// travel with the plans (min_tokens, stop reasons, logprobs). Harness: scheduler_test_harness.h.
#include <optional>

#include "tests/coordinator/scheduler_test_harness.h"

namespace lorc {
namespace scheduler_test {
namespace {

// --- Parallel sampling (n > 1) --------------------------------------------------------------

TEST(SchedulerTest, TheForkStepSharesEveryBlockAndTheFirstWritesCopyOnWrite) {
  Harness h(Config(4, 100));
  ASSERT_OK(h.Add(1, Prompt(10), ParamsN(5, 3), 0, {101, 102}));
  EXPECT_EQ(h.sched.num_waiting(), 1);  // the children are not sequences yet
  EXPECT_FALSE(h.sched.Contains(101));

  PlanView p = h.Step();
  ASSERT_EQ(p.seqs.size(), 1u);
  EXPECT_EQ(p.seqs[0].seq_id, 1);
  EXPECT_TRUE(p.seqs[0].sample);
  EXPECT_THAT(p.seqs[0].fork_child_ids, ElementsAre(101, 102));
  EXPECT_THAT(p.copies, IsEmpty());
  // Parent's token, then the children's, in fork_child_ids order.
  ASSERT_EQ(h.last_events.size(), 3u);
  EXPECT_EQ(h.last_events[0].seq_id, 1);
  EXPECT_EQ(h.last_events[1].seq_id, 101);
  EXPECT_EQ(h.last_events[2].seq_id, 102);
  EXPECT_EQ(h.sched.num_running(), 3);
  // One set of blocks (10 tokens: 3 blocks, the last one partial), held by all three.
  EXPECT_EQ(h.sched.num_free_blocks(), 97);
  const std::vector<int32_t> shared(h.sched.blocks().BlockTable(1).begin(),
                                    h.sched.blocks().BlockTable(1).end());
  for (int64_t id : {101, 102}) {
    EXPECT_THAT(h.sched.blocks().BlockTable(id), ::testing::ElementsAreArray(shared));
    EXPECT_EQ(h.sched.GetSequence(id)->num_computed, 10);
    EXPECT_EQ(h.sched.GetSequence(id)->prompt_len, 10);
  }
  for (int32_t b : shared) EXPECT_EQ(h.sched.blocks().pool().RefCount(b), 3);

  // Position 10 goes into the shared partial block: the first two writers copy it, the last one
  // (then its only holder) writes in place.
  p = h.Step();
  ASSERT_EQ(p.seqs.size(), 3u);
  ASSERT_EQ(p.copies.size(), 2u);
  for (const BlockCopy& c : p.copies) EXPECT_EQ(c.src, shared[2]);
  EXPECT_EQ(p.seqs[0].replace_last_block, p.copies[0].dst);
  EXPECT_EQ(p.seqs[1].replace_last_block, p.copies[1].dst);
  EXPECT_EQ(p.seqs[2].replace_last_block, -1);
  for (const SeqView& s : p.seqs) {
    EXPECT_THAT(s.new_block_ids, IsEmpty());
    EXPECT_THAT(s.fork_child_ids, IsEmpty());
    EXPECT_FALSE(s.params.has_value());
    EXPECT_EQ(s.block_table[0], shared[0]);
    EXPECT_EQ(s.block_table[1], shared[1]);
  }
  EXPECT_EQ(p.seqs[2].block_table[2], shared[2]);
  EXPECT_EQ(h.sched.blocks().pool().RefCount(shared[0]), 3);
  EXPECT_EQ(h.sched.blocks().pool().RefCount(shared[2]), 1);
  EXPECT_EQ(h.sched.num_free_blocks(), 95);

  h.RunToCompletion();
  for (int64_t id : {1, 101, 102}) {
    EXPECT_EQ(h.outputs[id], Expected(id, 10, 5)) << "completion " << id;
    EXPECT_EQ(h.ended[id], FinishReason::kLength);
  }
}

TEST(SchedulerTest, APromptThatFillsItsBlocksForksWithoutCopies) {
  Harness h(Config(4, 100));
  ASSERT_OK(h.Add(1, Prompt(8), ParamsN(3, 2), 0, {7}));
  h.Step();
  PlanView p = h.Step();
  ASSERT_EQ(p.seqs.size(), 2u);
  EXPECT_THAT(p.copies, IsEmpty());
  EXPECT_EQ(p.seqs[0].new_block_ids.size(), 1u);
  EXPECT_EQ(p.seqs[1].new_block_ids.size(), 1u);
  EXPECT_NE(p.seqs[0].new_block_ids, p.seqs[1].new_block_ids);
  h.RunToCompletion();
  EXPECT_EQ(h.outputs[7], Expected(7, 8, 3));
}

TEST(SchedulerTest, ForkAfterChunkedPrefillWithTwoStepsInFlight) {
  Harness h(Config(4, 200, 16));
  ASSERT_OK(h.Add(1, Prompt(30), ParamsN(9, 3), 0, {11, 12}));
  ASSERT_OK(h.Add(2, Prompt(5), Params(12)));
  std::vector<PlanView> plans;
  while (h.sched.HasWork() || !h.in_flight.empty()) plans.push_back(h.PipelineStep(2));
  int forks = 0;
  for (const PlanView& p : plans) {
    for (const SeqView& s : p.seqs) {
      if (s.fork_child_ids.empty()) continue;
      ++forks;
      EXPECT_EQ(s.seq_id, 1);
      EXPECT_EQ(s.num_cached + static_cast<int64_t>(s.tokens.size()), 30);  // the last chunk
    }
  }
  EXPECT_EQ(forks, 1);
  for (int64_t id : {1, 11, 12}) EXPECT_EQ(h.outputs[id], Expected(id, 30, 9));
  EXPECT_EQ(h.outputs[2], Expected(2, 5, 12));
  EXPECT_EQ(h.sched.num_free_blocks(), 200);
}

TEST(SchedulerTest, APreemptedChildRecomputesFromItsOwnTokens) {
  // 2 (higher priority) and the group (n = 2) do not fit together to the end: the latest
  // admitted sequence of the lowest priority, a child, is the victim.
  Harness h(Config(4, 10));
  ASSERT_OK(h.Add(2, Prompt(8, 2), Params(12), /*priority=*/1));
  ASSERT_OK(h.Add(1, Prompt(8, 1), ParamsN(12, 2), 0, {11}));
  bool child_preempted = false;
  while (h.sched.HasWork()) {
    const int64_t generated = static_cast<int64_t>(h.outputs[11].size());
    PlanView p = h.Step();
    for (int64_t id : p.preempted) child_preempted |= id == 11;
    for (const SeqView& s : p.seqs) {
      if (s.seq_id == 11 && !s.new_token_ids.empty()) {  // re-admitted: its own history
        EXPECT_EQ(static_cast<int64_t>(s.new_token_ids.size()), 8 + generated);
        EXPECT_FALSE(s.params.has_value());  // the worker kept its sampler
      }
    }
  }
  EXPECT_TRUE(child_preempted);
  h.RunToCompletion();
  EXPECT_EQ(h.outputs[1], Expected(1, 8, 12));
  EXPECT_EQ(h.outputs[11], Expected(11, 8, 12));
  EXPECT_EQ(h.outputs[2], Expected(2, 8, 12));
}

TEST(SchedulerTest, AbortingEveryIdOfAGroupFreesEveryBlock) {
  // Before the fork: the reserved ids are released with the parent.
  {
    Harness h(Config(4, 100, 8));
    ASSERT_OK(h.Add(1, Prompt(20), ParamsN(5, 3), 0, {101, 102}));
    h.Step();  // the first chunk
    for (int64_t id : {1, 101, 102}) h.Abort(id);
    EXPECT_EQ(h.sched.num_free_blocks(), 100);
    EXPECT_OK(h.sched.Validate());
    EXPECT_THAT(h.Step().finished, ElementsAre(1));
    h.RunToCompletion();
    EXPECT_OK(h.sched.Add(101, Prompt(3), Params(1)));  // no longer reserved
  }
  // After the fork, with the children's first tokens in flight.
  {
    Harness h(Config(4, 100));
    ASSERT_OK(h.Add(1, Prompt(10), ParamsN(5, 3), 0, {101, 102}));
    h.PipelineStep(2);  // the fork step, in flight
    h.PipelineStep(2);  // the first decodes (copy-on-write), in flight too
    EXPECT_EQ(h.in_flight.size(), 1u);
    for (int64_t id : {1, 101, 102}) h.Abort(id);
    EXPECT_EQ(h.sched.num_free_blocks(), 100);
    EXPECT_OK(h.sched.Validate());
    h.RunToCompletion(100, 2);  // late tokens dropped; every id announced
    for (int64_t id : {1, 101, 102}) EXPECT_EQ(h.ended[id], FinishReason::kAborted);
  }
}

TEST(SchedulerTest, AParentFailedBeforeItsForkEndsItsChildrenWithTheSameStatus) {
  const absl::Status bad = absl::InvalidArgumentError("the worker could not run it");
  // Failed during prefill: the children were never forked.
  {
    Harness h(Config(4, 100, 8));
    ASSERT_OK(h.Add(1, Prompt(20), ParamsN(5, 3), 0, {101, 102}));
    StepPlan p = h.sched.Schedule();
    StepResult r;
    h.worker.Run(p, &r);
    r.failed.push_back({1, bad});
    h.ApplyResult(r);
    ASSERT_EQ(h.last_events.size(), 3u);
    for (size_t i = 0; i < 3; ++i) {
      EXPECT_EQ(h.last_events[i].seq_id, std::vector<int64_t>({1, 101, 102})[i]);
      EXPECT_EQ(h.last_events[i].reason, FinishReason::kError);
      EXPECT_EQ(h.last_events[i].status, bad);
      EXPECT_EQ(h.last_events[i].token, -1);
    }
    EXPECT_THAT(h.live, IsEmpty());
    h.RunToCompletion();
  }
  // Failed in an earlier step while the fork step is in flight: the forked children have no
  // token yet and end with it; their late tokens are dropped.
  {
    Harness h(Config(4, 100, 16));
    ASSERT_OK(h.Add(1, Prompt(20), ParamsN(5, 3), 0, {101, 102}));
    h.PipelineStep(2);  // chunk 1
    h.PipelineStep(2);  // chunk 2 + fork, both in flight
    ASSERT_TRUE(h.sched.Contains(101));
    StepResult first = std::move(h.in_flight.front());
    h.in_flight.pop_front();
    first.failed.push_back({1, bad});
    h.ApplyResult(first);
    ASSERT_EQ(h.last_events.size(), 3u);
    EXPECT_EQ(h.last_events[1].status, bad);
    EXPECT_EQ(h.last_events[2].status, bad);
    EXPECT_EQ(h.sched.num_free_blocks(), 100);
    h.RunToCompletion(100, 2);
    EXPECT_THAT(h.outputs, IsEmpty());
  }
}

TEST(SchedulerTest, AdmissionCountsTheChildren) {
  SchedulerConfig c = Config(4, 100);
  c.max_num_seqs = 3;
  Harness h(c);
  ASSERT_OK(h.Add(1, Prompt(8), Params(4)));
  h.Step();
  ASSERT_OK(h.Add(2, Prompt(8), ParamsN(4, 3), 0, {21, 22}));
  // 1 + 3 completions > max_num_seqs: the group waits for 1.
  while (h.sched.Contains(1)) {
    h.Step();
    if (h.sched.Contains(1)) {
      EXPECT_EQ(h.sched.GetSequence(2)->state, SequenceState::kWaiting);
    }
  }
  h.RunToCompletion();
  for (int64_t id : {2, 21, 22}) EXPECT_EQ(h.outputs[id], Expected(id, 8, 4));

  // Blocks: the group needs its prompt + 1 token and one block per child (3 + 2), + 1 spare
  // for the running 1: 6 > 5 free. Without the children (4 <= 5) it would be admitted and the
  // children's first tokens would force a preemption.
  Harness tight(Config(4, 6));
  ASSERT_OK(tight.Add(1, Prompt(2), Params(6)));                   // 2 blocks at the end
  ASSERT_OK(tight.Add(2, Prompt(8), ParamsN(2, 3), 0, {21, 22}));
  tight.Step();
  EXPECT_EQ(tight.sched.GetSequence(2)->state, SequenceState::kWaiting);
  tight.RunToCompletion();
  EXPECT_EQ(tight.sched.num_preemptions(), 0);
  for (int64_t id : {2, 21, 22}) EXPECT_EQ(tight.outputs[id], Expected(id, 8, 2));

  // With max_tokens 1 no completion ever writes a token: the group needs only its prompt's
  // blocks and is admitted beside 1 at once.
  Harness once(Config(4, 6));
  ASSERT_OK(once.Add(1, Prompt(2), Params(6)));
  ASSERT_OK(once.Add(2, Prompt(8), ParamsN(1, 3), 0, {21, 22}));
  once.Step();
  // Admitted in the first step: running, or (its one token written) already finished and gone.
  const std::optional<SequenceInfo> seq2 = once.sched.GetSequence(2);
  if (seq2.has_value()) {
    EXPECT_EQ(seq2->state, SequenceState::kRunning);
  } else {
    EXPECT_FALSE(once.outputs[2].empty());
  }
  once.RunToCompletion();
  EXPECT_EQ(once.sched.num_preemptions(), 0);
  for (int64_t id : {2, 21, 22}) EXPECT_EQ(once.outputs[id], Expected(id, 8, 1));
}

TEST(SchedulerTest, AddRejectsBadGroups) {
  std::unique_ptr<Scheduler> owner = MakeScheduler(Config(4, 10));
  Scheduler& s = *owner;
  using absl::StatusCode;
  EXPECT_THAT(s.Add(1, Prompt(4), ParamsN(4, 3), 0, {2}),
              StatusIs(StatusCode::kInvalidArgument,
                       HasSubstr("n = 3 completions need 2 child sequence ids, got 1")));
  EXPECT_THAT(s.Add(1, Prompt(4), Params(4), 0, {2}),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("need 0 child sequence ids")));
  EXPECT_THAT(s.Add(1, Prompt(4), ParamsN(4, 3), 0, {2, 2}),
              StatusIs(StatusCode::kAlreadyExists, HasSubstr("child sequence id 2")));
  EXPECT_THAT(s.Add(1, Prompt(4), ParamsN(4, 2), 0, {1}),
              StatusIs(StatusCode::kAlreadyExists, HasSubstr("child sequence id 1")));
  // 9 cached tokens each: 2 shared full prompt blocks + 3 x 1 own = 5 fit; 8 + 12 - 1 cached
  // tokens: 2 + 3 x 3.
  EXPECT_OK(s.Add(1, Prompt(8), ParamsN(2, 3), 0, {2, 3}));
  EXPECT_THAT(s.Add(4, Prompt(8), ParamsN(12, 3), 0, {5, 6}),
              StatusIs(StatusCode::kInvalidArgument,
                       HasSubstr("needs 11 KV blocks for n = 3 completions of 19 cached tokens "
                                 "(prompt + max_tokens - 1; the prompt's 2 full blocks shared), "
                                 "the whole cache has 10")));
  // Past the cache already at max_tokens = 1 (9 shared + 3 x 1 = 12 blocks): the field is n.
  EXPECT_THAT(s.Add(4, Prompt(37), ParamsN(1, 3), 0, {5, 6}),
              StatusIs(StatusCode::kInvalidArgument, ::testing::StartsWith("n: request needs 12 KV blocks")));
  EXPECT_THAT(s.Add(4, Prompt(3), Params(1), 0), StatusIs(StatusCode::kOk));
  EXPECT_THAT(s.Add(5, Prompt(3), ParamsN(2, 2), 0, {3}),
              StatusIs(StatusCode::kAlreadyExists, HasSubstr("child sequence id 3")));
  EXPECT_THAT(s.Add(3, Prompt(3), Params(1)),
              StatusIs(StatusCode::kAlreadyExists, HasSubstr("sequence id 3 is already in use")));
  SchedulerConfig few = Config(4, 100);
  few.max_num_seqs = 2;
  std::unique_ptr<Scheduler> small = MakeScheduler(few);
  EXPECT_THAT(small->Add(1, Prompt(4), ParamsN(4, 3), 0, {2, 3}),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("n (3) exceeds max_num_seqs (2)")));
  EXPECT_OK(s.Validate());
}

// --- min_tokens, stop reasons, logprobs -----------------------------------------------------

TEST(SchedulerTest, MinTokensDefersEosAndStopIds) {
  // The model says EOS (or stop id 555) everywhere; the worker would suppress them below
  // min_tokens, but the scheduler must not end on them either.
  auto model = [](int64_t seq, int64_t pos) { return seq == 1 ? kEos : 555; };
  Harness h(Config(4, 100), model);
  SamplingParams eos = Params(8);
  eos.min_tokens = 3;
  ASSERT_OK(h.Add(1, Prompt(10), eos));
  SamplingParams stop = Params(8);
  stop.min_tokens = 2;
  stop.stop_token_ids = {555};
  ASSERT_OK(h.Add(2, Prompt(10), stop));
  std::map<int64_t, SequenceEvent> last;
  while (h.sched.HasWork()) {
    h.Step();
    for (const SequenceEvent& e : h.last_events) last[e.seq_id] = e;
  }
  EXPECT_EQ(h.outputs[1].size(), 4u);  // tokens 1..3 cannot stop
  EXPECT_EQ(h.outputs[2].size(), 3u);
  EXPECT_EQ(last[1].reason, FinishReason::kStop);
  EXPECT_EQ(last[1].stop_reason.token_id, kEos);
  EXPECT_EQ(last[2].reason, FinishReason::kStop);
  EXPECT_EQ(last[2].stop_reason.token_id, 555);
  EXPECT_TRUE(last[2].stop_reason.stop_string.empty());
}

TEST(SchedulerTest, LogprobsTravelWithTheirTokensAndMissingOnesAreAnError) {
  Harness h(Config(4, 100));
  SamplingParams lp = Params(4);
  lp.logprobs = 1;
  ASSERT_OK(h.Add(1, Prompt(10), lp));
  ASSERT_OK(h.Add(2, Prompt(10), lp));
  ASSERT_OK(h.Add(3, Prompt(10), Params(4)));
  StepPlan p = h.sched.Schedule();
  StepResult r;
  h.worker.Run(p, &r);
  ASSERT_EQ(r.sampled.size(), 3u);
  TokenLogprobs t;
  t.logprob = -0.25f;
  t.rank = 2;
  t.top_ids = {7};
  t.top_logprobs = {-0.1f};
  r.sampled[0].logprobs = t;  // 2 gets none
  h.ApplyResult(r);
  ASSERT_EQ(h.last_events.size(), 3u);
  ASSERT_TRUE(h.last_events[0].logprobs.has_value());
  EXPECT_EQ(h.last_events[0].logprobs->logprob, -0.25f);
  EXPECT_EQ(h.last_events[0].logprobs->rank, 2);
  EXPECT_THAT(h.last_events[0].logprobs->top_ids, ElementsAre(7));
  EXPECT_TRUE(h.last_events[1].finished);
  EXPECT_THAT(h.last_events[1].status,
              StatusIs(absl::StatusCode::kInternal, HasSubstr("no logprobs")));
  EXPECT_FALSE(h.last_events[2].logprobs.has_value());
  EXPECT_FALSE(h.last_events[2].finished);
}

}  // namespace
}  // namespace scheduler_test
}  // namespace lorc
