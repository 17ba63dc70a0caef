// KV policy state memory in the scheduler (coordinator/scheduler.h "KV policy state memory"):
// with kv_policy_max_positions set, the positions the running sequences' device-resident policy
// states hold (kvpolicy::DeviceStateCapacity of each one's computed tokens, a parent's unforked
// children as copies) never pass it, whatever the blocks allow: requests that could never fit are
// refused, admission holds back, a decode that crosses a granule preempts, and the outputs stay
// those of an unlimited run. The fake worker of scheduler_test_harness.h holds each sequence's
// computed tokens, so what it holds after every plan is what the device's states would.
#include "kvpolicy/state_memory.h"
#include "tests/coordinator/scheduler_test_harness.h"

namespace lorc {
namespace scheduler_test {
namespace {

using kvpolicy::DeviceStateCapacity;
using kvpolicy::kDeviceStateGranule;

constexpr int64_t G = kDeviceStateGranule;

SchedulerConfig PositionsConfig(int64_t max_positions, int32_t num_blocks = 512) {
  SchedulerConfig c = Config(16, num_blocks, 4096);
  c.kv_compaction = true;
  c.kv_policy_max_positions = max_positions;
  return c;
}

// Positions the fake worker's states hold now (every sequence it holds tokens of).
int64_t WorkerPositions(const Harness& h) {
  int64_t total = 0;
  for (const auto& [id, tokens] : h.worker.kv()) total += DeviceStateCapacity(static_cast<int64_t>(tokens.size()));
  return total;
}

TEST(SchedulerKvPolicyPositionsTest, TheGranuleRule) {
  EXPECT_EQ(DeviceStateCapacity(0), 0);
  EXPECT_EQ(DeviceStateCapacity(1), G);
  EXPECT_EQ(DeviceStateCapacity(G), G);
  EXPECT_EQ(DeviceStateCapacity(G + 1), 2 * G);
  EXPECT_EQ(kvpolicy::PositionsWithin(2 * G + 5), 2 * G);
  EXPECT_EQ(kvpolicy::PositionsWithin(G - 1), 0);
  EXPECT_EQ(kvpolicy::PositionsWithin(-3), 0);
}

TEST(SchedulerKvPolicyPositionsTest, ConfigRejectsANegativeLimit) {
  SchedulerConfig c = PositionsConfig(-1);
  EXPECT_THAT(Scheduler::Create(c).status(),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("kv_policy_max_positions")));
}

TEST(SchedulerKvPolicyPositionsTest, AddRefusesRequestsWhoseStatesCouldNeverFit) {
  auto sched = MakeScheduler(PositionsConfig(2 * G));
  // 300 + 300 - 1 cached tokens: 3 granules.
  EXPECT_THAT(sched->Add(1, Prompt(300), Params(300)),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       AllOf(HasSubstr("KV policy state"), HasSubstr("positions"), HasSubstr("can never fit"))));
  // Two completions of one granule each fit; three do not.
  EXPECT_OK(sched->Add(2, Prompt(100), ParamsN(100, 2), 0, {20}));
  EXPECT_THAT(sched->Add(3, Prompt(100), ParamsN(100, 3), 0, {30, 31}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("3 completions")));
  // Without a limit the same request is fine.
  auto unlimited = MakeScheduler(PositionsConfig(0));
  EXPECT_OK(unlimited->Add(1, Prompt(300), Params(300)));
}

TEST(SchedulerKvPolicyPositionsTest, AdmissionHoldsBackWhatThePositionsCannotTake) {
  // Blocks for all five (512 x 16 slots); positions for one granule each of two sequences plus
  // the watermark.
  Harness h(PositionsConfig(4 * G));
  for (int64_t id = 1; id <= 5; ++id) ASSERT_OK(h.Add(id, Prompt(200, static_cast<int32_t>(id)), Params(20)));
  h.Step();
  // 1st: nothing running. 2nd: 1 + 1 (watermark) + 1 granules. 3rd: 2 + 2 + 1 > 4.
  EXPECT_EQ(h.sched.num_running(), 2);
  EXPECT_EQ(h.sched.num_waiting(), 3);
  EXPECT_EQ(h.sched.num_kv_policy_positions(), 2 * G);
  int steps = 0;
  while (h.sched.HasWork() && steps++ < 1000) {
    h.Step();
    EXPECT_LE(WorkerPositions(h), 4 * G);
    EXPECT_LE(h.sched.num_running(), 2);
  }
  for (int64_t id = 1; id <= 5; ++id) EXPECT_EQ(h.outputs[id], Expected(id, 200, 20)) << id;
  EXPECT_EQ(h.sched.num_preemptions(), 0);
}

TEST(SchedulerKvPolicyPositionsTest, ADecodeCrossingAGranulePreemptsTheNewest) {
  // Two sequences of 250 prompt tokens are admitted (1 + 1 + 1 granules); when each decode
  // crosses 256 positions both need 2 granules, 4 in all, over the 3 there are.
  Harness h(PositionsConfig(3 * G));
  ASSERT_OK(h.Add(1, Prompt(250, 1), Params(60)));
  ASSERT_OK(h.Add(2, Prompt(250, 2), Params(60)));
  h.Step();
  EXPECT_EQ(h.sched.num_running(), 2);
  int steps = 0;
  while (h.sched.HasWork() && steps++ < 1000) {
    h.Step();
    EXPECT_LE(WorkerPositions(h), 3 * G);
    EXPECT_LE(h.sched.num_kv_policy_positions(), 3 * G);
  }
  EXPECT_GE(h.sched.num_preemptions(), 1);
  // Recomputation is invisible in the outputs.
  EXPECT_EQ(h.outputs[1], Expected(1, 250, 60));
  EXPECT_EQ(h.outputs[2], Expected(2, 250, 60));
}

TEST(SchedulerKvPolicyPositionsTest, APrefillChunkShrinksToThePositionsLeft) {
  // One long prompt running (600 tokens: 3 granules) next to a short one: the long one's first
  // chunk stops at the granule boundary the limit allows.
  Harness h(PositionsConfig(3 * G));
  ASSERT_OK(h.Add(1, Prompt(100, 1), Params(200)));
  h.Step();
  ASSERT_OK(h.Add(2, Prompt(300, 2), Params(10)));
  // 2's whole prompt is 2 granules: 1 (running) + 1 (watermark) + 2 > 3, so it waits until 1
  // ends, and is then admitted alone.
  int steps = 0;
  while (h.sched.HasWork() && steps++ < 1000) {
    h.Step();
    EXPECT_LE(WorkerPositions(h), 3 * G);
    if (h.sched.GetSequence(1).has_value()) {
      EXPECT_EQ(h.sched.GetSequence(2)->state, SequenceState::kWaiting);
    }
  }
  EXPECT_EQ(h.outputs[1], Expected(1, 100, 200));
  EXPECT_EQ(h.outputs[2], Expected(2, 300, 10));
}

TEST(SchedulerKvPolicyPositionsTest, UnforkedChildrenCountAsCopiesOfTheirParent) {
  Harness h(PositionsConfig(4 * G));
  ASSERT_OK(h.Add(1, Prompt(100, 1), ParamsN(20, 3), 0, {11, 12}));
  ASSERT_OK(h.Add(2, Prompt(100, 2), Params(20)));
  h.Step();
  // The parent and its two children hold 3 granules once forked; the second request would need
  // 3 + 1 (watermark) + 1 > 4.
  EXPECT_EQ(h.sched.num_kv_policy_positions(), 3 * G);
  EXPECT_EQ(h.sched.GetSequence(2)->state, SequenceState::kWaiting);
  int steps = 0;
  while (h.sched.HasWork() && steps++ < 1000) {
    h.Step();
    EXPECT_LE(WorkerPositions(h), 4 * G);
  }
  EXPECT_EQ(h.outputs[1].size(), 20u);
  EXPECT_EQ(h.outputs[11].size(), 20u);
  EXPECT_EQ(h.outputs[12].size(), 20u);
  EXPECT_EQ(h.outputs[2], Expected(2, 100, 20));
}

// Random requests crossing granules, with one and two steps in flight: what the worker holds
// never passes the limit, every request completes with its unlimited outputs.
void PositionsSoak(size_t depth) {
  int64_t preemptions = 0, most = 0;
  for (uint32_t seed = 1; seed <= 6; ++seed) {
    SCOPED_TRACE(::testing::Message() << "seed " << seed << ", depth " << depth);
    std::mt19937 rng(seed);
    auto uniform = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
    SchedulerConfig c = PositionsConfig(6 * G, 256);
    c.max_model_len = 1024;
    c.max_num_batched_tokens = 512;
    c.max_num_seqs = 8;
    Harness h(c);
    std::map<int64_t, std::pair<int64_t, int32_t>> expected;
    int64_t next = 1;
    int steps = 0;
    while ((next <= 40 || h.sched.HasWork() || !h.in_flight.empty()) && steps < 20000) {
      if (next <= 40 && uniform(0, 2) == 0) {
        const int64_t prompt = uniform(1, 600);
        const int32_t max_tokens = uniform(1, 300);
        ASSERT_OK(h.Add(next, Prompt(prompt, static_cast<int32_t>(next)), Params(max_tokens)));
        expected[next] = {prompt, max_tokens};
        ++next;
      }
      h.PipelineStep(depth);
      EXPECT_LE(WorkerPositions(h), c.kv_policy_max_positions);
      most = std::max(most, WorkerPositions(h));
      ++steps;
    }
    EXPECT_FALSE(h.sched.HasWork());
    for (const auto& [id, e] : expected) EXPECT_EQ(h.outputs[id], Expected(id, e.first, e.second)) << id;
    preemptions += h.sched.num_preemptions();
  }
  // The limit did bind (the blocks, 4,096 slots, never do).
  EXPECT_GT(preemptions, 0);
  EXPECT_GT(most, 4 * G);
}

TEST(SchedulerKvPolicyPositionsTest, SoakStaysWithinThePositions) { PositionsSoak(1); }
TEST(SchedulerKvPolicyPositionsTest, SoakStaysWithinThePositionsWithTwoStepsInFlight) { PositionsSoak(2); }

}  // namespace
}  // namespace scheduler_test
}  // namespace lorc
