// The scheduler under a random soak: hundreds of requests through a tiny cache with preemptions,
// cancels, EOS and stop ids, with one and with two steps in flight. Harness:
// scheduler_test_harness.h.
#include "tests/coordinator/scheduler_test_harness.h"

namespace lorc {
namespace scheduler_test {
namespace {

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
}  // namespace scheduler_test
}  // namespace lorc
