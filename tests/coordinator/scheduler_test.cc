// The request scheduler, driven by a fake worker that checks every plan against the step.h
// contract and a fake "model" whose token is a pure function of (sequence, position), so that
// recomputation after a preemption must be invisible in the outputs.
#include "coordinator/scheduler.h"

#include <algorithm>
#include <deque>
#include <optional>
#include <functional>
#include <map>
#include <random>
#include <set>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/status_matchers.h"

namespace lorc {
namespace {

using ::lorc::testing::StatusIs;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::IsEmpty;

constexpr int64_t kVocab = 1000;
constexpr int32_t kEos = 999;

SchedulerConfig Config(int32_t block_size, int32_t num_blocks, int32_t budget = 2048) {
  SchedulerConfig c;
  c.block_size = block_size;
  c.num_blocks = num_blocks;
  c.max_num_batched_tokens = budget;
  c.max_model_len = 8192;
  c.vocab_size = kVocab;
  c.eos_token_ids = {kEos};
  return c;
}

SamplingParams Params(int32_t max_tokens) {
  SamplingParams p;
  p.max_tokens = max_tokens;
  return p;
}

std::vector<int32_t> Prompt(int64_t n, int32_t salt = 0) {
  std::vector<int32_t> p(n);
  for (int64_t i = 0; i < n; ++i) p[i] = static_cast<int32_t>((i * 13 + salt) % 900 + 1);
  return p;
}

// Never EOS (999): values in [0, 997).
int32_t PlainModel(int64_t seq, int64_t pos) { return static_cast<int32_t>((seq * 7 + pos) % 997); }

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Scheduler::Create for configs the test knows are valid.
std::unique_ptr<Scheduler> MakeScheduler(const SchedulerConfig& config) {
  absl::StatusOr<std::unique_ptr<Scheduler>> s = Scheduler::Create(config);
  EXPECT_OK(s.status());
  return s.ok() ? std::move(*s) : nullptr;
}

// What one request computes in a step, as a worker reconstructs it from the incremental plan
// (step/step.h) and its own state: the tokens, the full block table.
struct SeqView {
  int64_t seq_id = 0;
  std::vector<int32_t> tokens;       // computed this step
  int64_t num_cached = 0;            // computed before this step
  std::vector<int32_t> block_table;  // the whole table after this step's appends
  bool sample = false;
  std::optional<SamplingParams> params;
  std::vector<int32_t> new_token_ids;
  std::vector<int32_t> new_block_ids;
  std::vector<int64_t> fork_child_ids;
  int32_t replace_last_block = -1;
};

struct PlanView {
  uint64_t step_id = 0;
  std::vector<SeqView> seqs;
  std::vector<BlockCopy> copies;
  std::vector<int64_t> finished;
  std::vector<int64_t> preempted;
};

// A tensor-parallel worker as far as the contract goes: each request's token history, block table
// and computed count, kept between steps as the real worker (StepExecutor) does; the sampled
// token is appended to the history by the worker itself; forks (fork_child_ids) and
// copy-on-write (copies, replace_last_block) as step.h says. It keeps the "K/V" of every block
// slot (the token written there), so that a wrong block table, a missing copy or a write into a
// shared block shows as wrong K/V. It checks each plan against step.h.
class FakeWorker {
 public:
  using Model = std::function<int32_t(int64_t seq, int64_t pos)>;
  FakeWorker(int32_t block_size, Model model) : block_size_(block_size), model_(std::move(model)) {}

  PlanView Run(const StepPlan& plan, StepResult* r) {
    PlanView v;
    v.step_id = plan.step_id;
    v.copies = plan.copies;
    v.finished = plan.finished;
    v.preempted = plan.preempted;
    EXPECT_FALSE(plan.empty()) << "an empty plan was sent";
    EXPECT_EQ(plan.step_id, last_step_id_ + 1) << "step ids must be consecutive";
    last_step_id_ = plan.step_id;
    r->step_id = plan.step_id;
    for (int64_t id : plan.finished) {
      EXPECT_TRUE(state_.contains(id)) << "finished " << id << " was never sent";
      state_.erase(id);
      kv_.erase(id);
    }
    for (int64_t id : plan.preempted) {
      EXPECT_TRUE(kv_.contains(id)) << "preempted " << id << " is not running here";
      kv_.erase(id);  // keeps the sampler state (state_)
      State& st = state_[id];
      st.history.clear();
      st.table.clear();
      st.computed = 0;
    }
    for (const BlockCopy& c : plan.copies) {  // before the forward pass
      EXPECT_NE(c.src, c.dst);
      slots_[c.dst] = slots_[c.src];
    }
    std::vector<std::pair<int64_t, int32_t>> written;  // (sequence, block) written this step
    std::map<int64_t, int64_t> forked;  // child -> parent, forked in this step after the write
    for (const ScheduledSequence& s : plan.seqs) {
      if (s.params.has_value()) {
        EXPECT_FALSE(state_.contains(s.seq_id)) << "params again for " << s.seq_id;
      } else {
        EXPECT_TRUE(state_.contains(s.seq_id)) << "no params for new sequence " << s.seq_id;
      }
      State& st = state_[s.seq_id];
      EXPECT_EQ(s.num_computed_tokens, st.computed) << "sequence " << s.seq_id;
      if (!s.new_token_ids.empty()) {
        EXPECT_TRUE(st.history.empty()) << "tokens re-sent for running " << s.seq_id;
        st.history = s.new_token_ids;
      }
      if (s.replace_last_block >= 0) {
        EXPECT_FALSE(st.table.empty()) << "replace_last_block for an empty table of " << s.seq_id;
        if (!st.table.empty()) st.table.back() = s.replace_last_block;
      }
      st.table.insert(st.table.end(), s.new_block_ids.begin(), s.new_block_ids.end());
      EXPECT_GT(s.num_scheduled_tokens, 0);
      EXPECT_LE(st.computed + s.num_scheduled_tokens, static_cast<int64_t>(st.history.size()))
          << "sequence " << s.seq_id << " computes tokens the worker does not have";
      SeqView q;
      q.seq_id = s.seq_id;
      q.num_cached = st.computed;
      const int64_t end = std::min<int64_t>(st.computed + s.num_scheduled_tokens, st.history.size());
      q.tokens.assign(st.history.begin() + st.computed, st.history.begin() + end);
      EXPECT_EQ(static_cast<int64_t>(st.table.size()), CeilDiv(end, block_size_))
          << "sequence " << s.seq_id;
      for (int64_t pos = st.computed; pos < end; ++pos) {
        const size_t i = static_cast<size_t>(pos / block_size_);
        if (i >= st.table.size()) break;
        std::vector<int32_t>& slots = slots_[st.table[i]];
        slots.resize(block_size_, -1);
        slots[pos % block_size_] = st.history[pos];
        if (written.empty() || written.back() != std::make_pair(s.seq_id, st.table[i])) {
          written.emplace_back(s.seq_id, st.table[i]);
        }
      }
      st.computed = end;
      kv_[s.seq_id];
      q.block_table = st.table;
      q.sample = s.sample;
      q.params = s.params;
      q.new_token_ids = s.new_token_ids;
      q.new_block_ids = s.new_block_ids;
      q.fork_child_ids = s.fork_child_ids;
      q.replace_last_block = s.replace_last_block;
      EXPECT_TRUE(s.sample || s.fork_child_ids.empty()) << "fork without sampling " << s.seq_id;
      if (s.sample) {
        EXPECT_EQ(st.computed, static_cast<int64_t>(st.history.size()));
        const State parent = st;  // before its token: what the children start from
        const int32_t token = model_(s.seq_id, st.computed);
        st.history.push_back(token);
        r->sampled.push_back({s.seq_id, token});
        for (int64_t c : s.fork_child_ids) {
          EXPECT_FALSE(state_.contains(c)) << "fork into known sequence " << c;
          forked[c] = s.seq_id;
          State& child = state_[c];
          child = parent;
          const int32_t t = model_(c, child.computed);
          child.history.push_back(t);
          r->sampled.push_back({c, t});
          kv_[c];
        }
      }
      v.seqs.push_back(std::move(q));
    }
    // A block written this step belongs to that sequence alone (copy-on-write before sharing).
    for (const auto& [id, b] : written) {
      for (const auto& [other, st] : state_) {
        if (other == id || !kv_.contains(other)) continue;
        if (auto f = forked.find(other); f != forked.end() && f->second == id) continue;
        EXPECT_FALSE(std::count(st.table.begin(), st.table.end(), b))
            << "sequence " << id << " wrote block " << b << ", shared with " << other;
      }
    }
    // What the blocks now hold for each running sequence.
    for (auto& [id, kv] : kv_) {
      const State& st = state_[id];
      kv.clear();
      for (int64_t pos = 0; pos < st.computed; ++pos) {
        const std::vector<int32_t>& slots = slots_[st.table[pos / block_size_]];
        kv.push_back(static_cast<size_t>(pos % block_size_) < slots.size()
                         ? slots[pos % block_size_]
                         : -1);
      }
    }
    return v;
  }

  // Per request, the tokens whose K/V this worker holds.
  const std::map<int64_t, std::vector<int32_t>>& kv() const { return kv_; }
  // Requests whose state (sampler) this worker keeps.
  std::set<int64_t> known() const {
    std::set<int64_t> ids;
    for (const auto& [id, st] : state_) ids.insert(id);
    return ids;
  }

 private:
  struct State {
    std::vector<int32_t> history;
    std::vector<int32_t> table;
    int64_t computed = 0;
  };
  int32_t block_size_;
  Model model_;
  uint64_t last_step_id_ = 0;
  std::map<int64_t, State> state_;
  std::map<int64_t, std::vector<int32_t>> kv_;
  std::map<int32_t, std::vector<int32_t>> slots_;  // block -> the token written at each slot
};

// Scheduler + worker + bookkeeping of what each request produced.
class Harness {
 public:
  explicit Harness(const SchedulerConfig& config, FakeWorker::Model model = PlainModel)
      : sched_owner(MakeScheduler(config)), sched(*sched_owner), worker(config.block_size, std::move(model)) {}

  absl::Status Add(int64_t id, std::vector<int32_t> prompt, const SamplingParams& params,
                   int32_t priority = 0, std::vector<int64_t> child_ids = {}) {
    absl::Status s = sched.Add(id, prompt, params, priority, child_ids);
    if (s.ok()) {
      live.insert(id);
      for (int64_t c : child_ids) {
        live.insert(c);
        unforked.insert(c);
        prompts[c] = prompt;
      }
      prompts[id] = std::move(prompt);
    }
    return s;
  }
  void Abort(int64_t id) {
    if (sched.Contains(id) || unforked.contains(id)) MarkEnded(id, FinishReason::kAborted);
    sched.Abort(id);
  }

  // Invariants through the public API: every live request is known in one state, blocks held +
  // free = total, block tables cover exactly the computed tokens, and the worker holds exactly
  // those tokens.
  void CheckInvariants() {
    EXPECT_OK(sched.Validate());
    std::set<int32_t> held;  // a block shared by forked sequences counts once
    int32_t waiting = 0, running = 0;
    for (int64_t id : live) {
      std::optional<SequenceInfo> info = sched.GetSequence(id);
      if (!info.has_value()) {
        if (!unforked.contains(id)) {
          ADD_FAILURE() << "live sequence " << id << " unknown to the scheduler";
        }
        continue;
      }
      unforked.erase(id);
      if (info->state == SequenceState::kRunning) {
        for (int32_t b : sched.blocks().BlockTable(id)) held.insert(b);
      }
      if (info->state == SequenceState::kWaiting) {
        ++waiting;
        EXPECT_EQ(info->num_blocks, 0);
        EXPECT_EQ(info->num_computed, 0);
      } else {
        ++running;
        EXPECT_EQ(info->num_blocks, CeilDiv(info->num_computed, sched.config().block_size));
        auto kv = worker.kv().find(id);
        EXPECT_TRUE(kv != worker.kv().end()) << "running " << id << " unknown to the worker";
        if (kv != worker.kv().end()) {
          // With steps in flight the worker may hold K/V of tokens not yet applied here.
          absl::Span<const int32_t> tokens = sched.Tokens(id);
          EXPECT_EQ(static_cast<int64_t>(kv->second.size()), info->num_computed);
          const size_t n = std::min(kv->second.size(), tokens.size());
          EXPECT_TRUE(std::equal(kv->second.begin(), kv->second.begin() + n, tokens.begin()))
              << "worker K/V of " << id << " differs from its tokens";
        }
      }
      EXPECT_EQ(info->num_tokens, info->prompt_len + info->num_generated);
    }
    EXPECT_EQ(waiting, sched.num_waiting());
    EXPECT_EQ(running, sched.num_running());
    EXPECT_EQ(static_cast<int64_t>(held.size()) + sched.num_free_blocks(), sched.num_blocks());
  }

  // Schedule, check and run the next plan; its result waits in `in_flight` for ApplyOldest.
  // Returns the plan as the worker saw it, or nothing when there was no plan to send.
  std::optional<PlanView> Submit() {
    StepPlan plan = sched.Schedule();
    if (plan.empty()) {
      EXPECT_EQ(plan.step_id, 0u);
      return std::nullopt;
    }
    int64_t tokens = 0;
    std::set<int64_t> ids;
    for (const ScheduledSequence& s : plan.seqs) {
      tokens += s.num_scheduled_tokens;
      EXPECT_TRUE(ids.insert(s.seq_id).second) << "sequence " << s.seq_id << " twice in a plan";
      if (s.params.has_value()) first_step.try_emplace(s.seq_id, plan.step_id);
    }
    EXPECT_LE(tokens, sched.config().max_num_batched_tokens);
    for (int64_t id : plan.preempted) EXPECT_FALSE(ids.contains(id));
    for (int64_t id : plan.finished) EXPECT_FALSE(ids.contains(id));
    StepResult result;
    PlanView v = worker.Run(plan, &result);
    in_flight.push_back(std::move(result));
    return v;
  }

  void ApplyOldest() {
    ASSERT_FALSE(in_flight.empty());
    StepResult r = std::move(in_flight.front());
    in_flight.pop_front();
    ApplyResult(r);
  }

  void ApplyResult(const StepResult& result) {
    last_events = sched.Apply(result);
    for (const SequenceEvent& e : last_events) {
      EXPECT_TRUE(live.contains(e.seq_id)) << "event for ended sequence " << e.seq_id;
      if (e.token >= 0) outputs[e.seq_id].push_back(e.token);
      if (e.finished) MarkEnded(e.seq_id, e.reason);
    }
    CheckInvariants();
  }

  // One synchronous engine iteration: Schedule, run, Apply, check. Returns the plan as the
  // worker saw it (empty when nothing was sent).
  PlanView Step() { return PipelineStep(1); }

  // One iteration of an engine that keeps up to `depth` plans in flight (async scheduling, as
  // coordinator/engine.cc): submit the next plan, and apply the oldest result once `depth` are in
  // flight or nothing new could be sent.
  PlanView PipelineStep(size_t depth) {
    last_events.clear();
    std::optional<PlanView> v = Submit();
    if (!in_flight.empty() && (in_flight.size() >= depth || !v.has_value())) ApplyOldest();
    if (!v.has_value()) CheckInvariants();
    return v.value_or(PlanView());
  }

  // Steps until the scheduler has nothing left; returns the number of steps.
  int RunToCompletion(int max_steps = 100000, size_t depth = 1) {
    int steps = 0;
    while ((sched.HasWork() || !in_flight.empty()) && steps < max_steps) {
      PipelineStep(depth);
      ++steps;
    }
    EXPECT_THAT(in_flight, IsEmpty());
    EXPECT_FALSE(sched.HasWork()) << "no completion after " << max_steps << " steps";
    EXPECT_EQ(sched.num_waiting(), 0);
    EXPECT_EQ(sched.num_running(), 0);
    EXPECT_EQ(sched.num_free_blocks(), sched.num_blocks());
    EXPECT_THAT(worker.kv(), IsEmpty());
    EXPECT_THAT(worker.known(), IsEmpty()) << "a finished id never reached the workers";
    return steps;
  }

  std::unique_ptr<Scheduler> sched_owner;
  Scheduler& sched;
  FakeWorker worker;
  std::set<int64_t> live;
  std::set<int64_t> unforked;  // live child ids the scheduler has not forked yet
  std::map<int64_t, std::vector<int32_t>> prompts;
  std::map<int64_t, std::vector<int32_t>> outputs;
  std::map<int64_t, FinishReason> ended;
  std::map<int64_t, uint64_t> first_step;  // step of each sequence's first chunk
  std::vector<SequenceEvent> last_events;
  std::deque<StepResult> in_flight;

 private:
  void MarkEnded(int64_t id, FinishReason reason) {
    EXPECT_TRUE(ended.emplace(id, reason).second) << "sequence " << id << " ended twice";
    live.erase(id);
    unforked.erase(id);
  }
};

std::vector<int32_t> Expected(int64_t seq, int64_t prompt_len, int32_t n) {
  std::vector<int32_t> out;
  for (int32_t i = 0; i < n; ++i) out.push_back(PlainModel(seq, prompt_len + i));
  return out;
}

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
  Harness h(Config(4, 1000, 64));
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
  Harness h(Config(4, 8));
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

// --- Parallel sampling (n > 1) --------------------------------------------------------------

SamplingParams ParamsN(int32_t max_tokens, int32_t n) {
  SamplingParams p = Params(max_tokens);
  p.n = n;
  return p;
}

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
    if (h.sched.Contains(1)) EXPECT_EQ(h.sched.GetSequence(2)->state, SequenceState::kWaiting);
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
  EXPECT_EQ(once.sched.GetSequence(2)->state, SequenceState::kRunning);
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

// --- Soak -----------------------------------------------------------------------------------

// The soak's model: EOS now and then, as a pure function of (sequence, position).
int32_t SoakModel(int64_t seq, int64_t pos) {
  const uint64_t h = static_cast<uint64_t>(seq) * 0x9E3779B97F4A7C15ull ^
                     static_cast<uint64_t>(pos) * 0xC2B2AE3D27D4EB4Full;
  const uint64_t m = (h ^ (h >> 29)) % 1000;
  return m < 15 ? kEos : static_cast<int32_t>(m % 997);
}

// Random arrivals, priorities, cancellations, stop strings, EOS and parallel sampling (n = 2, 3)
// over a cache small enough to force preemptions; `depth` plans in flight at a time (1:
// synchronous, 2: async scheduling).
void RandomSoak(size_t depth) {
  for (uint32_t seed = 1; seed <= 10; ++seed) {
    SCOPED_TRACE(::testing::Message() << "seed " << seed);
    std::mt19937 rng(seed);
    auto uniform = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
    SchedulerConfig c = Config(4, 32, 48);
    c.max_num_seqs = 8;
    c.max_waiting = 40;
    c.max_model_len = 128;
    Harness h(c, SoakModel);
    struct Request {
      int64_t id;
      std::vector<int32_t> prompt;
      SamplingParams params;
      int32_t priority;
      std::vector<int64_t> children;
    };
    std::vector<Request> pending;
    std::map<int64_t, SamplingParams> params;
    std::map<int64_t, std::vector<int64_t>> group;  // every id of a request -> all its ids
    size_t num_ids = 0;
    for (int64_t id = 1; id <= 200; ++id) {
      Request r{id, Prompt(uniform(1, 60), static_cast<int32_t>(id)), Params(uniform(1, 40)),
                uniform(0, 2), {}};
      if (uniform(0, 3) == 0) {  // small enough for 3 completions to fit the cache together
        r.prompt.resize(uniform(1, 24));
        r.params = ParamsN(uniform(1, 12), uniform(2, 3));
        for (int k = 1; k < r.params.n; ++k) r.children.push_back(1000 + id * 10 + k);
      }
      if (uniform(0, 9) == 0) r.params.ignore_eos = true;
      if (uniform(0, 4) == 0) r.params.stop_token_ids = {static_cast<int32_t>(uniform(0, 996))};
      std::vector<int64_t> ids = r.children;
      ids.push_back(id);
      for (int64_t x : ids) {
        params[x] = r.params;
        group[x] = ids;
      }
      num_ids += ids.size();
      pending.push_back(std::move(r));
    }
    size_t next = 0;
    int queue_full = 0, steps = 0, forks = 0, copies = 0;
    while ((next < pending.size() || h.sched.HasWork()) && steps < 20000) {
      for (int k = uniform(0, 3); k > 0 && next < pending.size(); --k) {
        const Request& r = pending[next];
        absl::Status s = h.Add(r.id, r.prompt, r.params, r.priority, r.children);
        if (absl::IsResourceExhausted(s)) {
          EXPECT_THAT(s, StatusIs(absl::StatusCode::kResourceExhausted, HasSubstr("queue full")));
          ++queue_full;
          break;  // retry later
        }
        ASSERT_OK(s);
        ++next;
      }
      if (uniform(0, 99) < 4 && !h.live.empty()) {  // cancel a random live request: all its ids
        auto it = h.live.begin();
        std::advance(it, uniform(0, static_cast<int>(h.live.size()) - 1));
        for (int64_t id : group[*it]) {
          if (h.live.contains(id)) h.Abort(id);
        }
      }
      if (uniform(0, 99) < 2 && !h.live.empty()) {  // a stop string matched
        const int64_t id = *h.live.begin();
        std::optional<SequenceInfo> info = h.sched.GetSequence(id);
        if (info.has_value() && info->num_generated > 0) {
          h.live.erase(id);
          h.ended.emplace(id, FinishReason::kStop);
          h.sched.Finish(id, FinishReason::kStop);
        }
      }
      h.CheckInvariants();
      const PlanView v = h.PipelineStep(depth);
      copies += static_cast<int>(v.copies.size());
      for (const SeqView& q : v.seqs) forks += q.fork_child_ids.empty() ? 0 : 1;
      ++steps;
      if (::testing::Test::HasFailure()) return;
    }
    ASSERT_EQ(next, pending.size());
    h.RunToCompletion(100000, depth);

    // Every request ended exactly once (the harness fails on a second end or a late event).
    EXPECT_EQ(h.ended.size(), num_ids);
    EXPECT_THAT(h.live, IsEmpty());
    // Outputs follow the model exactly, whatever the preemptions, and end for the right reason.
    int by_reason[5] = {};
    for (const auto& [id, reason] : h.ended) {
      ++by_reason[static_cast<int>(reason)];
      const std::vector<int32_t>& out = h.outputs[id];
      const SamplingParams& p = params[id];
      const int64_t prompt_len = static_cast<int64_t>(h.prompts[id].size());
      for (size_t i = 0; i < out.size(); ++i) {
        ASSERT_EQ(out[i], SoakModel(id, prompt_len + static_cast<int64_t>(i))) << "sequence " << id;
        const bool stops = (!p.ignore_eos && out[i] == kEos) ||
                           std::count(p.stop_token_ids.begin(), p.stop_token_ids.end(), out[i]);
        if (i + 1 < out.size()) {
          EXPECT_FALSE(stops) << "sequence " << id << " ran past a stop";
        }
      }
      EXPECT_LE(out.size(), static_cast<size_t>(p.max_tokens));
      if (reason == FinishReason::kLength) {
        EXPECT_EQ(out.size(), static_cast<size_t>(p.max_tokens));
      }
    }
    EXPECT_GT(h.sched.num_preemptions(), 0);
    EXPECT_GT(forks, 10);
    EXPECT_GT(copies, 0);
    EXPECT_GT(by_reason[static_cast<int>(FinishReason::kLength)], 0);
    EXPECT_GT(by_reason[static_cast<int>(FinishReason::kStop)], 0);
    EXPECT_GT(by_reason[static_cast<int>(FinishReason::kAborted)], 0);
    EXPECT_EQ(by_reason[static_cast<int>(FinishReason::kError)], 0);
    ::testing::Test::RecordProperty("preemptions", static_cast<int>(h.sched.num_preemptions()));
    ::testing::Test::RecordProperty("steps", steps);
    ::testing::Test::RecordProperty("queue_full", queue_full);
  }
}

TEST(SchedulerTest, RandomSoakWithATinyCache) { RandomSoak(1); }
TEST(SchedulerTest, RandomSoakWithATinyCacheAndTwoStepsInFlight) { RandomSoak(2); }

}  // namespace
}  // namespace lorc
