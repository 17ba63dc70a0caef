// Adversarial tests of the KV policy state positions limit (coordinator/scheduler.h "KV policy
// state memory"): randomized and targeted scenarios mixing kv_policy_max_positions with prefix
// caching, sessions, parallel sampling, aborts, priorities, stop ids / EOS, two steps in flight,
// tiny limits, blocks binding too, and hand-built KV compaction reports. After every step: the
// scheduler validates, what the (fake) device holds stays within the limit, no livelock, outputs
// equal those of an unlimited run.
#include <map>
#include <random>
#include <set>

#include "kvpolicy/state_memory.h"
#include "tests/coordinator/scheduler_test_harness.h"

namespace lorc {
namespace scheduler_test {
namespace {

using kvpolicy::DeviceStateCapacity;
constexpr int64_t G = kvpolicy::kDeviceStateGranule;

// A model that sometimes emits EOS (deterministic in (sequence, position)).
int32_t EosModel(int64_t seq, int64_t pos) {
  if ((seq * 131 + pos * 7) % 89 == 0) return kEos;
  return PlainModel(seq, pos);
}

int64_t DevicePositions(const Harness& h) {
  int64_t total = 0;
  for (const auto& [id, tokens] : h.worker.kv()) total += DeviceStateCapacity(static_cast<int64_t>(tokens.size()));
  return total;
}

struct Req {
  int64_t prompt_len = 0;
  SamplingParams params;
  bool aborted = false;
};

// The full output of completion `id` of a request (unlimited run): stops at EOS / stop ids after
// min_tokens, or max_tokens.
std::vector<int32_t> Want(const FakeWorker::Model& model, int64_t id, const Req& r) {
  std::vector<int32_t> out;
  for (int32_t i = 0; i < r.params.max_tokens; ++i) {
    const int32_t t = model(id, r.prompt_len + i);
    out.push_back(t);
    const bool may_stop = static_cast<int32_t>(out.size()) > r.params.min_tokens;
    const bool eos = !r.params.ignore_eos && t == kEos;
    const bool stop = std::find(r.params.stop_token_ids.begin(), r.params.stop_token_ids.end(), t) !=
                      r.params.stop_token_ids.end();
    if (may_stop && (eos || stop)) break;
  }
  return out;
}

struct MixShape {
  int64_t max_positions = 4 * G;
  int32_t block_size = 16;
  int32_t num_blocks = 512;
  int32_t budget = 256;
  int32_t max_num_seqs = 8;
  size_t depth = 1;
  int num_requests = 40;
  bool sessions = true;
  int max_n = 4;
  int abort_one_in = 40;  // per step
  int max_prompt = 500;
  int max_tokens = 300;
  bool near_granule = false;
  int arrive_one_in = 3;
};

struct MixStats {
  int64_t preemptions = 0, most = 0, refused = 0, accepted = 0, steps = 0, hits = 0;
};

// One randomized run; returns stats. Fails (gtest) on any broken invariant.
MixStats RunMix(uint32_t seed, const MixShape& shape, const FakeWorker::Model& model = EosModel) {
  MixStats st;
  std::mt19937 rng(seed);
  auto uniform = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  SchedulerConfig c = Config(shape.block_size, shape.num_blocks, shape.budget);
  c.kv_policy_max_positions = shape.max_positions;
  c.max_num_seqs = shape.max_num_seqs;
  c.enable_prefix_caching = true;
  Harness h(c, model);
  std::map<int64_t, Req> reqs;  // every completion id (children included)
  int64_t next = 1;
  int64_t next_child = 100000;
  int added = 0;
  int steps = 0;
  const int kMaxSteps = 40000;
  while ((added < shape.num_requests || h.sched.HasWork() || !h.in_flight.empty()) && steps < kMaxSteps) {
    if (added < shape.num_requests && uniform(0, shape.arrive_one_in - 1) == 0) {
      ++added;
      const int family = uniform(0, 2);
      const int keep = uniform(1, std::min(300, shape.max_prompt));
      int len = uniform(1, shape.max_prompt);
      if (shape.near_granule && uniform(0, 1) == 0) {
        len = std::max<int>(1, static_cast<int>(G) * uniform(1, std::max(1, shape.max_prompt / static_cast<int>(G))) - uniform(1, 8));
      }
      std::vector<int32_t> prompt = Prompt(300, family);
      prompt.resize(std::min(keep, len));
      while (static_cast<int>(prompt.size()) < len) prompt.push_back(700 + uniform(0, 50));
      Req r;
      r.prompt_len = len;
      r.params = Params(uniform(1, shape.max_tokens));
      const int n = uniform(0, 2) == 0 ? uniform(2, shape.max_n) : 1;
      r.params.n = n;
      if (uniform(0, 3) == 0) {
        // A stop id the model produces somewhere in the output.
        r.params.stop_token_ids.push_back(model(next, len + uniform(0, r.params.max_tokens)));
      }
      if (uniform(0, 4) == 0) r.params.min_tokens = uniform(0, r.params.max_tokens);
      if (uniform(0, 5) == 0) r.params.ignore_eos = true;
      std::vector<int64_t> children;
      for (int i = 1; i < n; ++i) children.push_back(next_child++);
      PrefixOptions prefix;
      if (shape.sessions && uniform(0, 3) == 0) prefix.session_id = absl::StrCat("s", uniform(0, 2));
      const int32_t priority = uniform(0, 2);
      absl::Status s = h.Add(next, prompt, r.params, priority, children, prefix);
      const int64_t cached = len + r.params.max_tokens - 1;
      const int64_t need = n * DeviceStateCapacity(cached);
      if (s.ok()) {
        ++st.accepted;
        EXPECT_LE(need, shape.max_positions) << "Add accepted what can never fit, id " << next;
        reqs[next] = r;
        for (int64_t ch : children) reqs[ch] = r;
      } else {
        ++st.refused;
        EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
        // Refused for blocks or positions only.
        const int64_t shared = n > 1 ? len / shape.block_size : 0;
        const int64_t blocks = shared + n * (CeilDiv(cached, shape.block_size) - shared);
        EXPECT_TRUE(need > shape.max_positions || blocks > shape.num_blocks || n > shape.max_num_seqs) << s;
      }
      ++next;
    }
    if (shape.abort_one_in > 0 && uniform(0, shape.abort_one_in - 1) == 0 && !h.live.empty()) {
      const int64_t victim = *std::next(h.live.begin(), uniform(0, static_cast<int>(h.live.size()) - 1));
      if (h.sched.Contains(victim)) {
        h.Abort(victim);
        reqs[victim].aborted = true;
      }
    }
    h.PipelineStep(shape.depth);
    ++steps;
    const int64_t dev = DevicePositions(h);
    st.most = std::max(st.most, dev);
    EXPECT_LE(dev, shape.max_positions) << "device positions over the limit at step " << steps;
    EXPECT_LE(h.sched.num_kv_policy_positions(), shape.max_positions) << "step " << steps;
    if (dev > shape.max_positions || ::testing::Test::HasFailure()) {
      ADD_FAILURE() << "stopping seed " << seed << " at step " << steps;
      return st;
    }
  }
  st.steps = steps;
  EXPECT_LT(steps, kMaxSteps) << "livelock: work left after " << steps << " steps, " << h.sched.num_waiting()
                              << " waiting, " << h.sched.num_running() << " running";
  EXPECT_FALSE(h.sched.HasWork());
  // Outputs.
  for (const auto& [id, r] : reqs) {
    const std::vector<int32_t> want = Want(model, id, r);
    auto e = h.ended.find(id);
    const std::vector<int32_t>& got = h.outputs[id];
    if (e == h.ended.end()) {
      // Only an unforked child whose parent was aborted may be left.
      EXPECT_TRUE(h.unforked.contains(id) && !h.sched.Contains(id)) << "id " << id << " never ended";
      continue;
    }
    if (e->second == FinishReason::kAborted) {
      EXPECT_LE(got.size(), want.size()) << id;
      EXPECT_TRUE(std::equal(got.begin(), got.end(), want.begin())) << "aborted " << id << " output diverged";
      continue;
    }
    EXPECT_NE(e->second, FinishReason::kError) << id;
    EXPECT_EQ(got, want) << "id " << id << " prompt " << r.prompt_len << " max " << r.params.max_tokens;
  }
  st.preemptions = h.sched.num_preemptions();
  st.hits = h.worker.num_hits();
  return st;
}

void MixSweep(MixShape base, uint32_t seeds, bool vary) {
  MixStats total;
  for (uint32_t seed = 1; seed <= seeds; ++seed) {
    MixShape shape = base;
    std::mt19937 cfg(seed * 7919u);
    auto pick = [&](std::initializer_list<int64_t> v) { return *std::next(v.begin(), cfg() % v.size()); };
    if (vary) {
      shape.max_positions = pick({G, G + 37, 2 * G, 2 * G + 255, 3 * G, 4 * G, 5 * G + 10, 8 * G});
      shape.budget = static_cast<int32_t>(pick({16, 64, 256, 1024}));
      shape.max_num_seqs = static_cast<int32_t>(pick({2, 4, 8}));
      shape.depth = static_cast<size_t>(pick({1, 2}));
      // Blocks that bind as well: about the positions' worth of slots, or plenty.
      const int64_t slots = shape.max_positions * pick({1, 2, 100}) / 2;
      shape.num_blocks = static_cast<int32_t>(std::max<int64_t>(8, slots / shape.block_size));
      shape.max_prompt = static_cast<int>(std::min<int64_t>(500, shape.max_positions));
      shape.max_tokens = static_cast<int>(std::min<int64_t>(300, shape.max_positions));
      shape.near_granule = cfg() % 2 == 0;
      shape.arrive_one_in = static_cast<int>(pick({1, 3}));
    }
    SCOPED_TRACE(::testing::Message() << "seed " << seed << " max_positions " << shape.max_positions
                                      << " budget " << shape.budget << " max_num_seqs " << shape.max_num_seqs
                                      << " depth " << shape.depth << " num_blocks " << shape.num_blocks);
    MixStats st = RunMix(seed, shape);
    total.preemptions += st.preemptions;
    total.most = std::max(total.most, st.most);
    total.refused += st.refused;
    total.accepted += st.accepted;
    total.hits += st.hits;
    if (::testing::Test::HasFailure()) return;
  }
  std::printf("sweep: accepted %ld refused %ld preemptions %ld hits %ld most %ld\n", (long)total.accepted,
              (long)total.refused, (long)total.preemptions, (long)total.hits, (long)total.most);
  EXPECT_GT(total.preemptions, 0);
}

TEST(SchedulerKvPolicyPositionsAdversarialTest, RandomMixDepth1) {
  MixShape s;
  MixSweep(s, 8, false);
}

TEST(SchedulerKvPolicyPositionsAdversarialTest, RandomMixDepth2) {
  MixShape s;
  s.depth = 2;
  MixSweep(s, 8, false);
}

TEST(SchedulerKvPolicyPositionsAdversarialTest, RandomMixVariedConfigs) {
  MixShape s;
  MixSweep(s, 200, true);
}

TEST(SchedulerKvPolicyPositionsAdversarialTest, RandomMixGranuleCrossingPressure) {
  for (size_t depth : {1u, 2u}) {
    MixShape s;
    s.depth = depth;
    s.near_granule = true;
    s.arrive_one_in = 1;
    s.max_positions = 6 * G;
    s.max_num_seqs = 16;
    s.max_prompt = 600;
    s.max_tokens = 300;
    s.num_requests = 60;
    MixSweep(s, 10, false);
  }
}

TEST(SchedulerKvPolicyPositionsAdversarialTest, RandomMixNoAbortsTinyBudget) {
  MixShape s;
  s.abort_one_in = 0;
  s.budget = 16;
  s.depth = 2;
  s.max_positions = 3 * G;
  s.num_requests = 20;
  MixSweep(s, 6, false);
}

// Tiny limits: exactly what Add allows (the request alone at full length fills the limit).
void TinyExact(size_t depth, int n, int64_t limit, int64_t prompt, int32_t max_tokens, int count) {
  SchedulerConfig c = Config(16, 1024, 64);
  c.kv_policy_max_positions = limit;
  Harness h(c);
  int64_t child = 1000;
  std::map<int64_t, int64_t> ids;
  for (int64_t id = 1; id <= count; ++id) {
    std::vector<int64_t> children;
    for (int i = 1; i < n; ++i) children.push_back(child++);
    ASSERT_OK(h.Add(id, Prompt(prompt, static_cast<int32_t>(id)), ParamsN(max_tokens, n), 0, children));
    ids[id] = prompt;
    for (int64_t ch : children) ids[ch] = prompt;
  }
  // One more token is refused.
  std::vector<int64_t> children;
  for (int i = 1; i < n; ++i) children.push_back(child++);
  EXPECT_THAT(h.sched.Add(999, Prompt(prompt), ParamsN(max_tokens + 1, n), 0, children).code(),
              absl::StatusCode::kInvalidArgument);
  int steps = 0;
  while ((h.sched.HasWork() || !h.in_flight.empty()) && steps < 20000) {
    h.PipelineStep(depth);
    ++steps;
    ASSERT_LE(DevicePositions(h), limit) << "step " << steps;
  }
  EXPECT_FALSE(h.sched.HasWork()) << "livelock";
  for (const auto& [id, p] : ids) EXPECT_EQ(h.outputs[id], Expected(id, p, max_tokens)) << id;
}

TEST(SchedulerKvPolicyPositionsAdversarialTest, TinyLimitExactFitN1) {
  TinyExact(1, 1, G, 200, 57, 4);
  TinyExact(2, 1, G, 200, 57, 4);
  TinyExact(2, 1, G + 255, 1, 256, 3);  // limit not a granule multiple
  TinyExact(1, 1, 2 * G, 256, 257, 3);
}

TEST(SchedulerKvPolicyPositionsAdversarialTest, TinyLimitExactFitParallelSampling) {
  TinyExact(1, 2, 2 * G, 200, 57, 3);
  TinyExact(2, 2, 2 * G, 200, 57, 3);
  TinyExact(2, 3, 3 * G + 1, 255, 2, 3);
  TinyExact(2, 4, 4 * G, 100, 157, 3);
  TinyExact(1, 4, 8 * G, 300, 213, 2);
}

// Blocks and positions both bind: a few blocks and a few granules.
TEST(SchedulerKvPolicyPositionsAdversarialTest, BlocksAndPositionsBothBind) {
  for (size_t depth : {1u, 2u}) {
    SchedulerConfig c = Config(16, 40, 128);  // 640 slots
    c.kv_policy_max_positions = 3 * G;
    Harness h(c);
    std::map<int64_t, std::pair<int64_t, int32_t>> want;
    for (int64_t id = 1; id <= 12; ++id) {
      const int64_t p = 50 + 37 * id % 300;
      const int32_t m = static_cast<int32_t>(20 + 53 * id % 200);
      if (h.Add(id, Prompt(p, static_cast<int32_t>(id)), Params(m), static_cast<int32_t>(id % 3)).ok()) {
        want[id] = {p, m};
      }
    }
    int steps = 0;
    while ((h.sched.HasWork() || !h.in_flight.empty()) && steps < 20000) {
      h.PipelineStep(depth);
      ++steps;
      ASSERT_LE(DevicePositions(h), 3 * G);
    }
    EXPECT_FALSE(h.sched.HasWork());
    for (const auto& [id, e] : want) EXPECT_EQ(h.outputs[id], Expected(id, e.first, e.second)) << id;
    std::printf("both bind depth %zu: %zu requests, %ld preemptions, %d steps\n", depth, want.size(),
                (long)h.sched.num_preemptions(), steps);
  }
}

// Prefix hits: a long shared prefix cached; a hit starts with the prefix's positions.
TEST(SchedulerKvPolicyPositionsAdversarialTest, PrefixHitsAndSessionsAtTheLimit) {
  for (size_t depth : {1u, 2u}) {
    SchedulerConfig c = Config(16, 512, 64);
    c.kv_policy_max_positions = 6 * G;
    Harness h(c);
    // A session's conversation grows: prompt = previous prompt + its output.
    std::vector<int32_t> conv = Prompt(240, 5);
    int64_t id = 1;
    for (int turn = 0; turn < 4; ++turn) {
      ASSERT_OK(h.Add(id, conv, Params(10), 0, {}, {"", "sess"}));
      // Siblings sharing the prefix.
      ASSERT_OK(h.Add(id + 1, WithTail(conv, conv.size(), 5, 600), ParamsN(15, 2), 1, {id + 100}));
      int steps = 0;
      while ((h.sched.HasWork() || !h.in_flight.empty()) && steps < 5000) {
        h.PipelineStep(depth);
        ++steps;
        ASSERT_LE(DevicePositions(h), 6 * G);
      }
      EXPECT_FALSE(h.sched.HasWork());
      EXPECT_EQ(h.outputs[id], Expected(id, static_cast<int64_t>(conv.size()), 10));
      conv.insert(conv.end(), h.outputs[id].begin(), h.outputs[id].end());
      id += 2;
    }
    EXPECT_GT(h.worker.num_hits(), 0);
  }
}

// Priorities with steps in flight: a high-priority sequence that needs a granule while the
// low-priority one has a token in flight.
TEST(SchedulerKvPolicyPositionsAdversarialTest, HighPriorityIsNotPreemptedForALowerOne) {
  for (size_t depth : {1u, 2u}) {
    SCOPED_TRACE(::testing::Message() << "depth " << depth);
    SchedulerConfig c = Config(16, 512, 512);
    c.kv_policy_max_positions = 3 * G;
    Harness h(c);
    ASSERT_OK(h.Add(1, Prompt(200, 1), Params(100), /*priority=*/5));  // high: crosses 256 later
    ASSERT_OK(h.Add(2, Prompt(250, 2), Params(100), /*priority=*/0));  // low: crosses 256 first
    int steps = 0;
    int32_t high_preempted_while_low_ran = 0;
    while ((h.sched.HasWork() || !h.in_flight.empty()) && steps < 5000) {
      const int32_t before = h.sched.GetSequence(1) ? h.sched.GetSequence(1)->num_preemptions : -1;
      h.PipelineStep(depth);
      ++steps;
      ASSERT_LE(DevicePositions(h), 3 * G);
      auto hi = h.sched.GetSequence(1);
      auto lo = h.sched.GetSequence(2);
      if (hi && hi->num_preemptions > before && lo && lo->state == SequenceState::kRunning) {
        ++high_preempted_while_low_ran;
        std::printf("depth %zu step %d: priority 5 seq preempted (computed->0) while priority 0 seq runs "
                    "(computed %ld)\n",
                    depth, steps, (long)lo->num_computed);
      }
    }
    EXPECT_EQ(h.outputs[1], Expected(1, 200, 100));
    EXPECT_EQ(h.outputs[2], Expected(2, 250, 100));
    EXPECT_EQ(high_preempted_while_low_ran, 0) << "priority inversion";
  }
}

// Preemption of a sequence whose prefill chunk is in flight (no token sampled: not protected).
TEST(SchedulerKvPolicyPositionsAdversarialTest, PreemptingAPrefillChunkInFlight) {
  SchedulerConfig c = Config(16, 512, 64);
  c.kv_policy_max_positions = 3 * G;
  Harness h(c);
  ASSERT_OK(h.Add(1, Prompt(250, 1), Params(200), 1));
  ASSERT_OK(h.Add(2, Prompt(250, 2), Params(30), 0));
  ASSERT_OK(h.Add(3, Prompt(10, 3), Params(240), 2));
  int steps = 0;
  while ((h.sched.HasWork() || !h.in_flight.empty()) && steps < 5000) {
    h.PipelineStep(2);
    ++steps;
    ASSERT_LE(DevicePositions(h), 3 * G);
  }
  EXPECT_FALSE(h.sched.HasWork());
  EXPECT_EQ(h.outputs[1], Expected(1, 250, 200));
  EXPECT_EQ(h.outputs[2], Expected(2, 250, 30));
  EXPECT_EQ(h.outputs[3], Expected(3, 10, 240));
}

// A parent forks in the step that its last prompt chunk is computed: children cloned at fork
// must already be counted (never transiently above the limit), including with chunked prefill
// and another sequence decoding across a granule at the same time.
TEST(SchedulerKvPolicyPositionsAdversarialTest, ForkAtTheLimitWithAGranuleCrossing) {
  for (size_t depth : {1u, 2u}) {
    for (int32_t budget : {8, 33, 512}) {
      SchedulerConfig c = Config(16, 512, budget);
      c.kv_policy_max_positions = 4 * G;
      Harness h(c);
      ASSERT_OK(h.Add(1, Prompt(250, 1), Params(40)));                 // crosses 256 soon
      ASSERT_OK(h.Add(2, Prompt(100, 2), ParamsN(20, 2), 0, {21}));    // 2 granules
      ASSERT_OK(h.Add(3, Prompt(200, 3), ParamsN(56, 4), 0, {31, 32, 33}));  // 4 granules: alone
      int steps = 0;
      while ((h.sched.HasWork() || !h.in_flight.empty()) && steps < 5000) {
        h.PipelineStep(depth);
        ++steps;
        ASSERT_LE(DevicePositions(h), 4 * G) << "depth " << depth << " budget " << budget << " step " << steps;
      }
      EXPECT_FALSE(h.sched.HasWork());
      EXPECT_EQ(h.outputs[1], Expected(1, 250, 40));
      for (int64_t id : {2, 21}) EXPECT_EQ(h.outputs[id], Expected(id, 100, 20)) << id;
      for (int64_t id : {3, 31, 32, 33}) EXPECT_EQ(h.outputs[id], Expected(id, 200, 56)) << id;
    }
  }
}

// Starvation: a stream of small high-priority requests arriving; a big low-priority one must still
// finish once the stream stops (and a big same-priority one is not bypassed forever).
TEST(SchedulerKvPolicyPositionsAdversarialTest, BigRequestIsNotStarvedBySmallOnes) {
  for (size_t depth : {1u, 2u}) {
    SchedulerConfig c = Config(16, 512, 256);
    c.kv_policy_max_positions = 4 * G;
    Harness h(c);
    ASSERT_OK(h.Add(1, Prompt(10, 1), Params(20)));
    h.PipelineStep(depth);
    ASSERT_OK(h.Add(2, Prompt(700, 2), Params(300)));  // 4 granules: needs everything
    int64_t next = 3;
    int steps = 0;
    int64_t done_at = -1;
    while ((h.sched.HasWork() || !h.in_flight.empty()) && steps < 20000) {
      if (steps < 3000 && steps % 3 == 0) {
        ASSERT_OK(h.Add(next, Prompt(30, static_cast<int32_t>(next)), Params(20)));
        ++next;
      }
      h.PipelineStep(depth);
      ++steps;
      ASSERT_LE(DevicePositions(h), 4 * G);
      if (done_at < 0 && h.ended.contains(2)) done_at = steps;
    }
    EXPECT_FALSE(h.sched.HasWork());
    EXPECT_EQ(h.outputs[2], Expected(2, 700, 300));
    std::printf("depth %zu: big request done at step %ld of %d (stream until 3000)\n", depth, (long)done_at, steps);
    EXPECT_LT(done_at, 3000) << "the big same-priority request waited for the stream to end";
  }
}

// --- KV compaction (hand-built results; the fake worker knows no policy) ---

// A device that tracks each sequence's computed positions and history from the plans (what a
// policy state would hold: all computed positions, compacted or not) and samples with EosModel.
class PositionsDevice {
 public:
  explicit PositionsDevice(int32_t block_size) : bs_(block_size) {}
  StepResult Run(const StepPlan& plan, std::mt19937& rng) {
    StepResult r;
    r.step_id = plan.step_id;
    for (int64_t id : plan.finished) {
      computed_.erase(id);
      len_.erase(id);
    }
    for (int64_t id : plan.preempted) {
      EXPECT_TRUE(computed_.contains(id)) << "preempted " << id << " not held";
      computed_.erase(id);
      len_[id] = 0;
    }
    for (const KvCompaction& k : plan.kv_compactions) EXPECT_TRUE(computed_.contains(k.seq_id));
    for (const ScheduledSequence& s : plan.seqs) {
      if (!s.new_token_ids.empty()) {
        EXPECT_FALSE(computed_.contains(s.seq_id)) << s.seq_id;
        len_[s.seq_id] = static_cast<int64_t>(s.new_token_ids.size());
        computed_[s.seq_id] = s.num_computed_tokens;
      }
      EXPECT_TRUE(computed_.contains(s.seq_id)) << s.seq_id;
      EXPECT_EQ(computed_[s.seq_id], s.num_computed_tokens) << s.seq_id;
      int64_t& comp = computed_[s.seq_id];
      comp += s.num_scheduled_tokens;
      EXPECT_LE(comp, len_[s.seq_id]) << s.seq_id;
      if (s.sample) {
        EXPECT_EQ(comp, len_[s.seq_id]) << s.seq_id;
        const int64_t pos = comp;
        r.sampled.push_back({s.seq_id, EosModel(s.seq_id, pos), std::nullopt});
        ++len_[s.seq_id];
        for (int64_t ch : s.fork_child_ids) {
          EXPECT_FALSE(computed_.contains(ch));
          computed_[ch] = comp;
          len_[ch] = len_[s.seq_id];
          r.sampled.push_back({ch, EosModel(ch, pos), std::nullopt});
        }
      }
      // A slot report: a policy that keeps a random share past a block boundary.
      if (rng() % 2 == 0) {
        const int64_t from = static_cast<int64_t>(rng() % (comp / bs_ + 1)) * bs_;
        const int64_t kept = from + static_cast<int64_t>(rng() % (comp - from + 1));
        r.kv_slots.push_back({s.seq_id, comp, from, kept, static_cast<int64_t>(rng() % (2 * bs_))});
      }
    }
    return r;
  }
  int64_t Positions() const {
    int64_t t = 0;
    for (const auto& [id, c] : computed_) t += DeviceStateCapacity(c);
    return t;
  }

 private:
  int32_t bs_;
  std::map<int64_t, int64_t> computed_;
  std::map<int64_t, int64_t> len_;
};

void CompactionMix(uint32_t seed, size_t depth, int64_t limit, int32_t num_blocks, int32_t budget) {
  SCOPED_TRACE(::testing::Message() << "seed " << seed << " depth " << depth << " limit " << limit << " blocks "
                                    << num_blocks << " budget " << budget);
  std::mt19937 rng(seed);
  auto uniform = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  SchedulerConfig c = Config(16, num_blocks, budget);
  c.kv_compaction = true;
  c.kv_policy_max_positions = limit;
  c.max_num_seqs = 6;
  auto sched = MakeScheduler(c);
  PositionsDevice dev(16);
  std::map<int64_t, Req> reqs;
  std::map<int64_t, std::vector<int32_t>> out;
  std::map<int64_t, FinishReason> ended;
  std::deque<StepResult> flight;
  int64_t next = 1, next_child = 10000;
  int steps = 0;
  while ((next <= 30 || sched->HasWork() || !flight.empty()) && steps < 30000) {
    if (next <= 30 && uniform(0, 2) == 0) {
      Req r;
      r.prompt_len = uniform(1, static_cast<int>(std::min<int64_t>(limit, 500)));
      r.params = Params(uniform(1, 250));
      const int n = uniform(0, 3) == 0 ? uniform(2, 3) : 1;
      r.params.n = n;
      std::vector<int64_t> ch;
      for (int i = 1; i < n; ++i) ch.push_back(next_child++);
      if (sched->Add(next, Prompt(r.prompt_len, static_cast<int32_t>(next % 3)), r.params, uniform(0, 2), ch).ok()) {
        reqs[next] = r;
        for (int64_t x : ch) reqs[x] = r;
      }
      ++next;
    }
    if (uniform(0, 60) == 0 && !reqs.empty()) {
      auto it = std::next(reqs.begin(), uniform(0, static_cast<int>(reqs.size()) - 1));
      if (sched->Contains(it->first) && !ended.contains(it->first)) {
        sched->Abort(it->first);
        ended[it->first] = FinishReason::kAborted;
        it->second.aborted = true;
      }
    }
    StepPlan plan = sched->Schedule();
    if (!plan.empty()) {
      flight.push_back(dev.Run(plan, rng));
      EXPECT_LE(dev.Positions(), limit) << "step " << steps;
    }
    if (!flight.empty() && (flight.size() >= depth || plan.empty())) {
      for (const SequenceEvent& e : sched->Apply(flight.front())) {
        if (e.token >= 0) out[e.seq_id].push_back(e.token);
        if (e.finished) {
          EXPECT_TRUE(ended.emplace(e.seq_id, e.reason).second) << e.seq_id;
        }
      }
      flight.pop_front();
    }
    ASSERT_OK(sched->Validate()) << "step " << steps;
    ASSERT_LE(sched->num_kv_policy_positions(), limit);
    ASSERT_LE(dev.Positions(), limit) << "step " << steps;
    ++steps;
  }
  EXPECT_FALSE(sched->HasWork()) << "livelock after " << steps;
  for (const auto& [id, r] : reqs) {
    const std::vector<int32_t> want = Want(EosModel, id, r);
    auto e = ended.find(id);
    if (e == ended.end()) {
      EXPECT_TRUE(id >= 10000 && !sched->Contains(id)) << "never ended " << id;  // parent aborted
      continue;
    }
    if (e->second == FinishReason::kAborted) continue;
    EXPECT_EQ(out[id], want) << id;
  }
  std::printf("compaction seed %u: %ld compactions, %ld preemptions, %d steps\n", seed,
              (long)sched->num_kv_compactions(), (long)sched->num_preemptions(), steps);
}

TEST(SchedulerKvPolicyPositionsAdversarialTest, CompactionReportsWithThePositionsLimit) {
  for (uint32_t seed = 1; seed <= 12; ++seed) {
    CompactionMix(seed, 1 + seed % 2, (2 + seed % 4) * G, seed % 3 == 0 ? 48 : 512, seed % 2 ? 64 : 512);
    if (::testing::Test::HasFailure()) return;
  }
}

}  // namespace
}  // namespace scheduler_test
}  // namespace lorc
