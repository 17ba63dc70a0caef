// The server's engine thread (EngineLoop) over an in-process executor and the fixture model:
// requests submitted from other threads complete with the golden tokens on their channels, a
// cancellation ends its request at once with its blocks free, and a failure ends every live and
// later request with its status. Waits are on the channels' updates (and one poll for the loop to
// settle its counters), never on fixed sleeps.
#include "coordinator/engine_loop.h"

#include <map>
#include <string>

#include "absl/time/clock.h"
#include "common/json_util.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/fixture_model.h"
#include "tests/testing/fixtures.h"
#include "tests/testing/http_get.h"
#include "tests/testing/golden.h"
#include "tests/testing/status_matchers.h"
#include "worker/model_loader.h"
#include "worker/step_executor.h"

namespace lorc {
namespace {

using ::lorc::testing::StatusIs;
using ::testing::HasSubstr;

// Everything a request's channel delivered, up to its final update.
struct Collected {
  std::vector<int32_t> ids;
  RequestUpdate final;
};

// Bounded: a request that never ends fails the test instead of hanging it.
constexpr int kMaxWaitSeconds = 120;

Collected Drain(RequestChannel& ch) {
  Collected c;
  for (int waited = 0; waited < kMaxWaitSeconds; ++waited) {
    for (RequestUpdate& u : ch.Take(absl::Seconds(1))) {
      c.ids.insert(c.ids.end(), u.new_ids.begin(), u.new_ids.end());
      if (u.finished) {
        c.final = std::move(u);
        return c;
      }
    }
  }
  ADD_FAILURE() << "no final update within " << kMaxWaitSeconds << " s";
  return c;
}

// The first updates of a request that is running (at least one token).
std::vector<RequestUpdate> FirstUpdates(RequestChannel& ch) {
  for (int waited = 0; waited < kMaxWaitSeconds; ++waited) {
    std::deque<RequestUpdate> got = ch.Take(absl::Seconds(1));
    if (!got.empty()) return {std::make_move_iterator(got.begin()), std::make_move_iterator(got.end())};
  }
  ADD_FAILURE() << "no update within " << kMaxWaitSeconds << " s";
  return {};
}

class EngineLoopTest : public ::lorc::testing::FixtureModelTest<> {
 protected:
  void SetUp() override {
    ASSERT_NO_FATAL_FAILURE(FixtureModelTest::SetUp());
    KvCacheOptions kv;
    kv.num_blocks = 256;
    ASSERT_OK(LoadFixtureModel(kv));
    for (const ::lorc::testing::Golden& g : ::lorc::testing::GoldenPrompts()) {
      prompts_.push_back(g.prompt_ids);
      greedy_.push_back(g.greedy_ids);
    }
    auto engine = Engine::Create(exec_.get(), model_.config, model_.runner->kv_spec(), nullptr,
                                 EngineOptions());
    ASSERT_OK(engine);
    loop_ = std::make_unique<EngineLoop>(*std::move(engine));
  }
  void TearDown() override { loop_.reset(); }

  GenerationRequest Greedy(int i, int max_tokens) {
    GenerationRequest r;
    r.prompt_ids = prompts_[i];
    r.params.max_tokens = max_tokens;
    return r;
  }

  std::vector<std::vector<int32_t>> prompts_, greedy_;
  std::unique_ptr<EngineLoop> loop_;
};

TEST_F(EngineLoopTest, RequestsFromManyThreadsCompleteWithGoldenTokens) {
  std::vector<std::shared_ptr<RequestChannel>> channels;
  for (int i = 0; i < 4; ++i) channels.push_back(std::make_shared<RequestChannel>());
  std::vector<std::thread> clients;
  for (int i = 0; i < 4; ++i) {
    clients.emplace_back([&, i] { loop_->Submit(100 + i, Greedy(i, 48), channels[i]); });
  }
  for (std::thread& t : clients) t.join();
  for (int i = 0; i < 4; ++i) {
    Collected c = Drain(*channels[i]);
    EXPECT_OK(c.final.status);
    EXPECT_EQ(c.final.reason, FinishReason::kLength);
    EXPECT_EQ(c.ids, greedy_[i]) << "prompt " << i;
    EXPECT_EQ(c.final.completion_tokens, 48);
  }
  // The stats a client sees after its final update already show its blocks free.
  EXPECT_EQ(loop_->stats().kv_free_blocks, 256);
  EXPECT_EQ(loop_->stats().num_running, 0);
  EXPECT_GT(loop_->stats().engine.steps, 0);
}

TEST_F(EngineLoopTest, ACancelEndsTheRequestAndFreesItsBlocks) {
  auto keep = std::make_shared<RequestChannel>();
  auto cancel = std::make_shared<RequestChannel>();
  GenerationRequest endless = Greedy(1, 2000);
  endless.params.ignore_eos = true;
  loop_->Submit(1, endless, cancel);
  loop_->Submit(2, Greedy(0, 48), keep);
  // Wait until the endless request produced a token, then cancel it.
  std::vector<RequestUpdate> first = FirstUpdates(*cancel);
  ASSERT_FALSE(first.empty());
  ASSERT_FALSE(first.front().finished);
  // No KV policy, no device-resident policy states: none reported while it runs (a tester saw
  // the scheduler's count of what such states would hold: 1,280 used of capacity 0).
  for (int waited_ms = 0; loop_->stats().num_running == 0 && waited_ms < 1000 * kMaxWaitSeconds; waited_ms += 10) {
    absl::SleepFor(absl::Milliseconds(10));  // the stats are published after the step's tokens
  }
  EXPECT_GT(loop_->stats().num_running, 0);
  EXPECT_EQ(loop_->stats().kv_policy_positions, 0);
  loop_->Cancel(1, absl::CancelledError("client went away"));
  Collected c = Drain(*cancel);
  EXPECT_THAT(c.final.status, StatusIs(absl::StatusCode::kCancelled, HasSubstr("client went away")));
  EXPECT_EQ(c.final.reason, FinishReason::kAborted);
  Collected other = Drain(*keep);
  EXPECT_EQ(other.ids, greedy_[0]);
  EXPECT_EQ(loop_->stats().kv_free_blocks, 256);
}

TEST_F(EngineLoopTest, AFailureEndsLiveAndLaterRequestsWithItsStatus) {
  auto live = std::make_shared<RequestChannel>();
  GenerationRequest endless = Greedy(2, 2000);
  endless.params.ignore_eos = true;
  loop_->Submit(1, endless, live);
  ASSERT_FALSE(FirstUpdates(*live).empty());
  loop_->Fail(absl::UnavailableError("worker 1 (pid 42) was killed"));
  Collected c = Drain(*live);
  EXPECT_THAT(c.final.status, StatusIs(absl::StatusCode::kUnavailable, HasSubstr("worker 1")));
  auto later = std::make_shared<RequestChannel>();
  loop_->Submit(2, Greedy(0, 4), later);
  EXPECT_THAT(Drain(*later).final.status, StatusIs(absl::StatusCode::kUnavailable));
  EXPECT_THAT(loop_->failure(), StatusIs(absl::StatusCode::kUnavailable));
}

// The metrics the engine thread keeps: tokens, latencies (per request, per completion), step
// phases and scheduler counters; a second loop over a new engine (a recovery) adds to them.
TEST_F(EngineLoopTest, MetricsCountEveryTokenAndKeepCountingOverANewLoop) {
  ServingMetrics metrics;
  auto make_loop = [&](StepRunner* runner, const LoadedModel& model) {
    auto engine = Engine::Create(runner, model.config, model.runner->kv_spec(), nullptr,
                                 EngineOptions());
    EXPECT_OK(engine);
    return std::make_unique<EngineLoop>(*std::move(engine), &metrics);
  };
  loop_.reset();
  loop_ = make_loop(exec_.get(), model_);
  // Two requests: one with two completions (each its own inter-token gaps).
  GenerationRequest two = Greedy(0, 10);
  two.params.n = 2;
  auto ch_two = std::make_shared<RequestChannel>();
  auto ch_one = std::make_shared<RequestChannel>();
  loop_->Submit(1, two, ch_two);
  loop_->Submit(2, Greedy(1, 7), ch_one);
  int64_t generated = 0;
  for (auto [ch, finals] : {std::pair{ch_two, 2}, std::pair{ch_one, 1}}) {
    for (int waited = 0; finals > 0 && waited < kMaxWaitSeconds; ++waited) {
      for (RequestUpdate& u : ch->Take(absl::Seconds(1))) {
        generated += static_cast<int64_t>(u.new_ids.size());
        finals -= u.finished;
      }
    }
    ASSERT_EQ(finals, 0);
  }
  ASSERT_EQ(generated, 10 + 10 + 7);
  // The last tokens reach their channel before the loop has closed the step that made them (its
  // step counter and KV gauges come after): wait for the loop to settle before comparing (seen
  // under ASan, 10 steps counted against 11).
  std::map<std::string, double> s;
  for (int waited_ms = 0; waited_ms < 1000 * kMaxWaitSeconds; waited_ms += 50) {
    s = ::lorc::testing::ParseExposition(metrics.Serialize());
    if (s.at("lorcserve_engine_steps_total") == loop_->stats().engine.steps &&
        s.at("lorcserve_kv_blocks_used") == 0) {
      break;
    }
    absl::SleepFor(absl::Milliseconds(50));
  }
  EXPECT_EQ(s.at("lorcserve_generation_tokens_total"), 27);
  EXPECT_EQ(s.at("lorcserve_prompt_tokens_total"), prompts_[0].size() + prompts_[1].size());
  EXPECT_EQ(s.at("lorcserve_time_to_first_token_seconds_count"), 2);  // per request
  EXPECT_EQ(s.at("lorcserve_inter_token_latency_seconds_count"), 9 + 9 + 6);  // per completion
  EXPECT_EQ(s.at("lorcserve_e2e_request_latency_seconds_count"), 2);
  EXPECT_EQ(s.at("lorcserve_step_duration_seconds_count{phase=\"apply\"}"),
            s.at("lorcserve_engine_steps_total"));
  EXPECT_EQ(s.at("lorcserve_engine_steps_total"), loop_->stats().engine.steps);
  EXPECT_EQ(s.at("lorcserve_prefix_cache_queries_total"), 2);
  EXPECT_EQ(s.at("lorcserve_kv_blocks_capacity"), 256);
  EXPECT_EQ(s.at("lorcserve_kv_blocks_used"), 0);

  // A new engine and loop (as after a worker recovery): its counters start at 0, the metrics'
  // do not.
  // (new workers: a fresh model and executor, as a re-joined group loads).
  loop_.reset();
  KvCacheOptions kv;
  kv.num_blocks = 256;
  ASSERT_OK(LoadFixtureModel(kv));
  loop_ = make_loop(exec_.get(), model_);
  auto ch = std::make_shared<RequestChannel>();
  loop_->Submit(3, Greedy(2, 5), ch);
  Collected c = Drain(*ch);
  EXPECT_OK(c.final.status);
  s = ::lorc::testing::ParseExposition(metrics.Serialize());
  EXPECT_EQ(s.at("lorcserve_generation_tokens_total"), 27 + 5);
  EXPECT_EQ(s.at("lorcserve_prefix_cache_queries_total"), 3);
  EXPECT_EQ(s.at("lorcserve_time_to_first_token_seconds_count"), 3);
  loop_.reset();  // before the executor and model it steps
}

}  // namespace
}  // namespace lorc
