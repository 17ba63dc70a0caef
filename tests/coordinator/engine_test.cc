// The in-process engine: stop conditions, seeds, per-request errors, KV pressure.
#include "coordinator/engine.h"

#include <map>

#include "common/check.h"
#include "common/json_util.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/fixtures.h"
#include "tests/testing/status_matchers.h"
#include "worker/model_loader.h"
#include "worker/step_executor.h"

namespace lorc {
namespace {

using ::lorc::testing::StatusIs;
using ::testing::HasSubstr;

class EngineTest : public ::testing::Test {
 protected:
  void SetUp() override {
    REQUIRE_TINY_LLAMA();
    auto b = CreateBackend({});
    ASSERT_OK(b);
    backend_ = *std::move(b);
    auto tok = Tokenizer::FromModelDir(::lorc::testing::TinyLlamaDir());
    ASSERT_OK(tok);
    tokenizer_ = *std::move(tok);
    auto j = ReadJsonFile(::lorc::testing::TinyLlamaDir() + "/golden_fp32.json");
    ASSERT_OK(j);
    for (const auto& g : *j) {
      prompts_.push_back(g["prompt_ids"].get<std::vector<int32_t>>());
      greedy_.push_back(g["greedy_48_ids"].get<std::vector<int32_t>>());
      greedy_text_.push_back(g["greedy_48_text"].get<std::string>());
    }
  }

  void Load(int32_t num_blocks) {
    KvCacheOptions kv;
    kv.block_size = 16;
    kv.num_blocks = num_blocks;
    auto m = LoadModel({::lorc::testing::TinyLlamaDir()}, backend_.get(), 0, 1, nullptr, kv);
    CHECK_OK(m.status());
    model_ = *std::move(m);
    exec_ = std::make_unique<StepExecutor>(model_.runner.get(), true);
  }

  std::unique_ptr<Engine> MakeEngine(EngineOptions eo = {}) {
    return *Engine::Create(exec_.get(), model_.config, model_.runner->kv_spec(),
                                    tokenizer_.get(), eo);
  }

  GenerationRequest Greedy(int i, int max_tokens) {
    GenerationRequest r;
    r.prompt_ids = prompts_[i];
    r.params.max_tokens = max_tokens;
    return r;
  }

  std::unique_ptr<Backend> backend_;
  std::unique_ptr<Tokenizer> tokenizer_;
  LoadedModel model_;
  std::unique_ptr<StepExecutor> exec_;
  std::vector<std::vector<int32_t>> prompts_, greedy_;
  std::vector<std::string> greedy_text_;
};

TEST_F(EngineTest, TextMatchesReferenceAndStopStringsCutIt) {
  Load(256);
  auto engine_ptr = MakeEngine();
  Engine& engine = *engine_ptr;
  auto out = engine.Generate({Greedy(0, 48)});
  ASSERT_OK(out);
  EXPECT_EQ((*out)[0].text, greedy_text_[0]);

  GenerationRequest r = Greedy(0, 48);
  r.params.stop_strings = {"verb"};
  out = engine.Generate({r});
  ASSERT_OK(out);
  const std::string cut = greedy_text_[0].substr(0, greedy_text_[0].find("verb"));
  EXPECT_EQ((*out)[0].text, cut);
  EXPECT_EQ((*out)[0].finish, FinishReason::kStop);
  EXPECT_LT((*out)[0].output_ids.size(), 48u);
}

TEST_F(EngineTest, StopTokenIdEndsGenerationIncludingTheToken) {
  Load(256);
  auto engine_ptr = MakeEngine();
  Engine& engine = *engine_ptr;
  GenerationRequest r = Greedy(3, 48);
  r.params.stop_token_ids = {greedy_[3][5]};
  auto out = engine.Generate({r});
  ASSERT_OK(out);
  const auto& ids = (*out)[0].output_ids;
  ASSERT_FALSE(ids.empty());
  EXPECT_EQ(ids.back(), greedy_[3][5]);
  EXPECT_LE(ids.size(), 6u);
  EXPECT_EQ((*out)[0].finish, FinishReason::kStop);
}

TEST_F(EngineTest, SeededSamplingIsReproducible) {
  Load(256);
  auto engine_ptr = MakeEngine();
  Engine& engine = *engine_ptr;
  auto sample = [&](uint64_t seed) {
    GenerationRequest r = Greedy(0, 24);
    r.params.temperature = 1.0f;
    r.params.top_p = 0.95f;
    r.params.seed = seed;
    auto out = engine.Generate({r, Greedy(1, 8)});  // batched with another request
    CHECK_OK(out.status());
    return (*out)[0].output_ids;
  };
  EXPECT_EQ(sample(1), sample(1));
  EXPECT_NE(sample(1), sample(2));
}

TEST_F(EngineTest, BadRequestFailsAloneOthersComplete) {
  Load(256);
  auto engine_ptr = MakeEngine();
  Engine& engine = *engine_ptr;
  GenerationRequest empty;
  GenerationRequest too_long = Greedy(0, 4091);  // 6 + 4091 > 4096
  GenerationRequest bad_id = Greedy(0, 4);
  bad_id.prompt_ids.push_back(5000);
  GenerationRequest bad_temp = Greedy(0, 4);
  bad_temp.params.temperature = -1;
  auto out = engine.Generate({empty, Greedy(2, 48), too_long, bad_id, bad_temp});
  ASSERT_OK(out);
  EXPECT_THAT((*out)[0].status, StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("empty prompt")));
  EXPECT_EQ((*out)[1].output_ids, greedy_[2]);
  EXPECT_THAT((*out)[2].status, StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("exceeds the maximum model length")));
  EXPECT_THAT((*out)[3].status, StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("5000")));
  EXPECT_THAT((*out)[4].status, StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("temperature")));
  EXPECT_EQ(engine.scheduler().num_free_blocks(), 256);
}

TEST_F(EngineTest, TightCacheQueuesAndPreemptsWithoutChangingOutputs) {
  // 4 requests of up to 12 + 48 tokens need 4 blocks each; 9 blocks force waiting and preemption.
  Load(9);
  auto engine_ptr = MakeEngine();
  Engine& engine = *engine_ptr;
  std::vector<GenerationRequest> reqs;
  for (int i = 0; i < 4; ++i) reqs.push_back(Greedy(i, 48));
  auto out = engine.Generate(reqs);
  ASSERT_OK(out);
  for (int i = 0; i < 4; ++i) EXPECT_EQ((*out)[i].output_ids, greedy_[i]) << "request " << i;
  EXPECT_EQ(engine.scheduler().num_free_blocks(), 9);

  GenerationRequest huge = Greedy(0, 200);  // needs 14 blocks, more than the cache has
  out = engine.Generate({huge});
  ASSERT_OK(out);
  EXPECT_THAT((*out)[0].status, StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("KV blocks")));
}

TEST_F(EngineTest, ScoreNllIsTeacherForcedCrossEntropy) {
  Load(256);
  const std::vector<int32_t>& p = prompts_[1];
  std::vector<int32_t> ids(p.begin(), p.end() - 1), targets(p.begin() + 1, p.end());
  auto nll = ScorePromptNll(*model_.runner, ids, targets);
  ASSERT_OK(nll);
  ASSERT_EQ(nll->size(), ids.size());
  for (double x : *nll) EXPECT_GE(x, 0.0);
  // Same result when scored in chunks of 3 tokens.
  auto nll2 = ScorePromptNll(*model_.runner, ids, targets, /*max_step_tokens=*/3);
  ASSERT_OK(nll2);
  for (size_t i = 0; i < nll->size(); ++i) EXPECT_NEAR((*nll)[i], (*nll2)[i], 1e-3);
  EXPECT_THAT(ScorePromptNll(*model_.runner, ids, {1, 2}), StatusIs(absl::StatusCode::kInvalidArgument));
}

}  // namespace
}  // namespace lorc

namespace lorc {
namespace {

// Forwards to the real executor and records what each sequence was given per step.
class CountingRunner : public StepRunner {
 public:
  explicit CountingRunner(StepRunner* inner) : inner_(inner) {}
  absl::StatusOr<StepResult> Run(const StepPlan& plan) override {
    for (const ScheduledSequence& s : plan.seqs) {
      ++steps[s.seq_id];
      tokens[s.seq_id] += static_cast<int64_t>(s.tokens.size());
    }
    return inner_->Run(plan);
  }
  std::map<int64_t, int> steps;
  std::map<int64_t, int64_t> tokens;

 private:
  StepRunner* inner_;
};

// A step is bounded by the token budget, so a long prefill is chunked, and a cancel between
// steps stops it after the chunk in flight: no further step computes anything for it, and its
// blocks are free at once.
TEST_F(EngineTest, CancelledLongPrefillStopsWithinOneChunk) {
  Load(256);
  CountingRunner runner(exec_.get());
  EngineOptions eo;
  eo.max_step_tokens = 32;
  auto engine_or = Engine::Create(&runner, model_.config, model_.runner->kv_spec(), tokenizer_.get(), eo);
  ASSERT_OK(engine_or.status());
  Engine& engine = **engine_or;
  constexpr int64_t kId = 7;
  GenerationRequest long_prompt;
  for (int i = 0; i < 1000; ++i) long_prompt.prompt_ids.push_back(prompts_[0][i % prompts_[0].size()]);
  long_prompt.params.max_tokens = 4;
  std::vector<RequestUpdate> updates;
  ASSERT_OK(engine.Add(kId, long_prompt, [&](const RequestUpdate& u) { updates.push_back(u); }));

  ASSERT_OK(engine.Step());
  EXPECT_EQ(runner.steps[kId], 1);
  EXPECT_EQ(runner.tokens[kId], 32);  // the first chunk only
  ASSERT_TRUE(engine.scheduler().GetSequence(kId).has_value());
  EXPECT_EQ(engine.scheduler().GetSequence(kId)->num_computed, 32);
  EXPECT_GT(engine.scheduler().num_free_blocks(), 0);
  EXPECT_LT(engine.scheduler().num_free_blocks(), engine.scheduler().num_blocks());

  engine.Abort(kId);
  ASSERT_EQ(updates.size(), 1u);
  EXPECT_TRUE(updates[0].finished);
  EXPECT_THAT(updates[0].status, StatusIs(absl::StatusCode::kCancelled));
  EXPECT_TRUE(updates[0].new_ids.empty());
  EXPECT_EQ(engine.scheduler().num_free_blocks(), engine.scheduler().num_blocks());
  for (int i = 0; i < 10 && engine.HasWork(); ++i) ASSERT_OK(engine.Step());  // announces the end
  EXPECT_FALSE(engine.HasWork());
  EXPECT_EQ(runner.steps[kId], 1) << "a step computed tokens for the cancelled request";
  EXPECT_EQ(runner.tokens[kId], 32);
  EXPECT_EQ(engine.num_requests(), 0u);
}

}  // namespace
}  // namespace lorc
