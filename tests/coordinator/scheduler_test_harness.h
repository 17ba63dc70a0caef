// The scheduler tests' harness (scheduler_test.cc, scheduler_parallel_sampling_test.cc,
// scheduler_soak_test.cc): a fake worker that checks every plan against the step.h contract and
// a fake "model" whose token is a pure function of (sequence, position), so that recomputation
// after a preemption must be invisible in the outputs.
#pragma once

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
namespace scheduler_test {

using ::lorc::testing::StatusIs;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::IsEmpty;

constexpr int64_t kVocab = 1000;
constexpr int32_t kEos = 999;

inline SchedulerConfig Config(int32_t block_size, int32_t num_blocks, int32_t budget = 2048) {
  SchedulerConfig c;
  c.block_size = block_size;
  c.num_blocks = num_blocks;
  c.max_num_batched_tokens = budget;
  c.max_model_len = 8192;
  c.vocab_size = kVocab;
  c.eos_token_ids = {kEos};
  return c;
}

inline SchedulerConfig NoPrefixCaching(SchedulerConfig c) {
  c.enable_prefix_caching = false;
  return c;
}

inline SamplingParams Params(int32_t max_tokens) {
  SamplingParams p;
  p.max_tokens = max_tokens;
  return p;
}

// n > 1: completions sharing the prompt's blocks.
inline SamplingParams ParamsN(int32_t max_tokens, int32_t n) {
  SamplingParams p = Params(max_tokens);
  p.n = n;
  return p;
}

inline std::vector<int32_t> Prompt(int64_t n, int32_t salt = 0) {
  std::vector<int32_t> p(n);
  for (int64_t i = 0; i < n; ++i) p[i] = static_cast<int32_t>((i * 13 + salt) % 900 + 1);
  return p;
}

// Never EOS (999): values in [0, 997).
inline int32_t PlainModel(int64_t seq, int64_t pos) { return static_cast<int32_t>((seq * 7 + pos) % 997); }

inline int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Scheduler::Create for configs the test knows are valid.
inline std::unique_ptr<Scheduler> MakeScheduler(const SchedulerConfig& config) {
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
  bool session = false;
};

struct PlanView {
  uint64_t step_id = 0;
  std::vector<SeqView> seqs;
  std::vector<BlockCopy> copies;
  std::vector<int64_t> finished;
  std::vector<int64_t> preempted;
  std::vector<HostBlockCopy> kv_offloads, kv_loads;
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
    // Host tier (step.h): offloads, then loads, before the copies and the forward pass. The
    // host slots hold what the device block held, so a load restores exactly what was saved (a
    // wrong slot, a stale one, or one an offload of the same plan overwrote with another block
    // shows as wrong K/V below; an offload then a load of the same block through one slot in
    // one plan is fine).
    v.kv_offloads = plan.kv_offloads;
    v.kv_loads = plan.kv_loads;
    std::set<int32_t> in_use;  // blocks of the requests still running here
    for (const auto& [id, st] : state_) {
      if (kv_.contains(id)) in_use.insert(st.table.begin(), st.table.end());
    }
    for (const HostBlockCopy& c : plan.kv_offloads) {
      EXPECT_FALSE(in_use.contains(c.block)) << "offload of block " << c.block << " in use";
      EXPECT_TRUE(slots_.contains(c.block)) << "offload of never written block " << c.block;
      host_[c.slot] = slots_[c.block];
      ++num_offloads_;
    }
    for (const HostBlockCopy& c : plan.kv_loads) {
      EXPECT_TRUE(host_.contains(c.slot)) << "load of empty host slot " << c.slot;
      EXPECT_FALSE(in_use.contains(c.block)) << "load into block " << c.block << " in use";
      slots_[c.block] = host_[c.slot];
      ++num_loads_;
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
      if (!s.new_token_ids.empty() && st.history.empty() && st.computed == 0) {
        // (Re)admission: a prefix-cache hit starts at num_computed_tokens, whole blocks whose
        // slots must already hold the tokens (checked through kv() below).
        EXPECT_EQ(s.num_computed_tokens % block_size_, 0) << "sequence " << s.seq_id;
        EXPECT_LT(s.num_computed_tokens, static_cast<int64_t>(s.new_token_ids.size()))
            << "sequence " << s.seq_id << ": the last token must be computed";
        st.computed = s.num_computed_tokens;
        ++num_hits_;
      }
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
      q.session = s.session;
      EXPECT_TRUE(s.params.has_value() || !s.session) << "session after first sight " << s.seq_id;
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

  // Admissions that started at a prefix-cache hit.
  int64_t num_hits() const { return num_hits_; }
  // Host tier copies performed (blocks).
  int64_t num_offloads() const { return num_offloads_; }
  int64_t num_loads() const { return num_loads_; }
  // A restarted worker: its host memory is new (device contents are dropped by the caller).
  void ClearHost() { host_.clear(); }
  // The token written at each slot of `block` (-1: none yet).
  std::vector<int32_t> Slots(int32_t block) const {
    auto it = slots_.find(block);
    return it == slots_.end() ? std::vector<int32_t>() : it->second;
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
  int64_t num_hits_ = 0;
  int64_t num_offloads_ = 0, num_loads_ = 0;
  std::map<int32_t, std::vector<int32_t>> host_;  // host slot -> the tokens of the saved block
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
                   int32_t priority = 0, std::vector<int64_t> child_ids = {},
                   const PrefixOptions& prefix = {}) {
    absl::Status s = sched.Add(id, prompt, params, priority, child_ids, prefix);
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
    for (int32_t b : sched.sessions().AllPinnedBlocks()) held.insert(b);
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

inline std::vector<int32_t> Expected(int64_t seq, int64_t prompt_len, int32_t n) {
  std::vector<int32_t> out;
  for (int32_t i = 0; i < n; ++i) out.push_back(PlainModel(seq, prompt_len + i));
  return out;
}

// `p`'s first `keep` tokens followed by n tokens first, first + 1, ...
inline std::vector<int32_t> WithTail(std::vector<int32_t> p, size_t keep, int n, int32_t first) {
  p.resize(keep);
  for (int i = 0; i < n; ++i) p.push_back(first + i);
  return p;
}

// A random workload of shared prefixes for the prefix-cache soaks: `iters` pipelined steps; now
// and then a request whose prompt is the start (4 + [0, keep_range) tokens) of one of `families`
// prompts of `family_len` tokens, padded with random tokens to 6 + [0, len_range), max_tokens in
// [1, 12], with probability 1/5 another cache salt (when `salts`); sometimes an abort. Checks the
// invariants after every step when `check`. Returns id -> (prompt_len, max_tokens) of the
// requests not aborted.
struct SoakShape {
  int32_t families = 3;
  int64_t family_len = 40;
  uint32_t keep_range = 20;
  uint32_t len_range = 30;
  bool salts = true;
  bool check = false;
};
inline std::map<int64_t, std::pair<int64_t, int32_t>> SoakSharedPrefixes(
    Harness& h, std::mt19937& rng, int iters, size_t depth, const SoakShape& shape) {
  std::map<int64_t, std::pair<int64_t, int32_t>> want;
  int64_t next = 1;
  for (int iter = 0; iter < iters; ++iter) {
    if (rng() % 3 == 0 && h.sched.num_waiting() < 6) {
      const int32_t family = static_cast<int32_t>(rng() % shape.families);
      const int len = 6 + static_cast<int>(rng() % shape.len_range);
      std::vector<int32_t> prompt =
          WithTail(Prompt(shape.family_len, family), 4 + rng() % shape.keep_range, 0, 0);
      while (static_cast<int>(prompt.size()) < len) prompt.push_back(700 + rng() % 50);
      const int32_t max_tokens = 1 + static_cast<int32_t>(rng() % 12);
      const std::string salt = shape.salts && rng() % 5 == 0 ? "other" : "";
      if (h.Add(next, prompt, Params(max_tokens), 0, {}, {salt, ""}).ok()) {
        want[next] = {static_cast<int64_t>(prompt.size()), max_tokens};
      }
      ++next;
    }
    if (rng() % 40 == 0 && !h.live.empty()) {
      const int64_t victim = *std::next(h.live.begin(), rng() % h.live.size());
      h.Abort(victim);
      want.erase(victim);
    }
    h.PipelineStep(depth);
    if (shape.check) h.CheckInvariants();
  }
  return want;
}

}  // namespace scheduler_test
}  // namespace lorc
