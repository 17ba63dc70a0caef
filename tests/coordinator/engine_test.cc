// The in-process engine: stop conditions, seeds, per-request errors, KV pressure.
#include "coordinator/engine.h"

#include <functional>
#include <map>

#include "common/check.h"
#include "common/json_util.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "eval/eval.h"
#include "tests/testing/fixture_model.h"
#include "tests/testing/fixtures.h"
#include "tests/testing/golden.h"
#include "tests/testing/status_matchers.h"
#include "tokenizer/prompt.h"
#include "worker/model_loader.h"
#include "worker/step_executor.h"

namespace lorc {
namespace {

using ::lorc::testing::StatusIs;
using ::testing::HasSubstr;

class EngineTest : public ::lorc::testing::FixtureModelTest<> {
 protected:
  void SetUp() override {
    ASSERT_NO_FATAL_FAILURE(FixtureModelTest::SetUp());
    auto tok = Tokenizer::FromModelDir(::lorc::testing::TinyLlamaDir());
    ASSERT_OK(tok);
    tokenizer_ = *std::move(tok);
    for (const ::lorc::testing::Golden& g : ::lorc::testing::GoldenPrompts()) {
      prompts_.push_back(g.prompt_ids);
      greedy_.push_back(g.greedy_ids);
      greedy_text_.push_back(g.greedy_text);
    }
  }

  void Load(int32_t num_blocks) {
    KvCacheOptions kv;
    kv.block_size = 16;
    kv.num_blocks = num_blocks;
    CHECK_OK(LoadFixtureModel(kv));
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

  std::unique_ptr<Tokenizer> tokenizer_;
  std::vector<std::vector<int32_t>> prompts_, greedy_;
  std::vector<std::string> greedy_text_;
};

TEST_F(EngineTest, TextMatchesReferenceAndStopStringsCutIt) {
  Load(256);
  auto engine_ptr = MakeEngine();
  Engine& engine = *engine_ptr;
  auto out = engine.Generate({Greedy(0, 48)});
  ASSERT_OK(out);
  EXPECT_EQ((*out)[0].first().text, greedy_text_[0]);

  GenerationRequest r = Greedy(0, 48);
  r.params.stop_strings = {"verb"};
  out = engine.Generate({r});
  ASSERT_OK(out);
  const std::string cut = greedy_text_[0].substr(0, greedy_text_[0].find("verb"));
  EXPECT_EQ((*out)[0].first().text, cut);
  EXPECT_EQ((*out)[0].first().finish, FinishReason::kStop);
  EXPECT_LT((*out)[0].first().output_ids.size(), 48u);

  // A stop string that is not UTF-8 can never match decoded text: rejected, naming it.
  GenerationRequest bad = Greedy(0, 4);
  bad.params.stop_strings = {"ok", std::string("a\xac")};
  EXPECT_THAT(engine.Add(77, bad, [](const RequestUpdate&) {}),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("sampling.stop[1] is not valid UTF-8 at byte offset 1 (byte 0xAC)")));
  EXPECT_EQ(engine.num_requests(), 0u);
}

TEST_F(EngineTest, StopTokenIdEndsGenerationIncludingTheToken) {
  Load(256);
  auto engine_ptr = MakeEngine();
  Engine& engine = *engine_ptr;
  GenerationRequest r = Greedy(3, 48);
  r.params.stop_token_ids = {greedy_[3][5]};
  auto out = engine.Generate({r});
  ASSERT_OK(out);
  const auto& ids = (*out)[0].first().output_ids;
  ASSERT_FALSE(ids.empty());
  EXPECT_EQ(ids.back(), greedy_[3][5]);
  EXPECT_LE(ids.size(), 6u);
  EXPECT_EQ((*out)[0].first().finish, FinishReason::kStop);
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
    return (*out)[0].first().output_ids;
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
  EXPECT_EQ((*out)[1].first().output_ids, greedy_[2]);
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
  for (int i = 0; i < 4; ++i) EXPECT_EQ((*out)[i].first().output_ids, greedy_[i]) << "request " << i;
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
  auto engine = MakeEngine();
  auto nll = ScorePromptNll(*engine, ids, targets);
  ASSERT_OK(nll);
  ASSERT_EQ(nll->size(), ids.size());
  for (double x : *nll) EXPECT_GE(x, 0.0);
  EXPECT_THAT(ScorePromptNll(*engine, ids, {1, 2}), StatusIs(absl::StatusCode::kInvalidArgument));
  std::vector<int32_t> shifted_wrong = targets;
  shifted_wrong[0] ^= 1;
  EXPECT_THAT(ScorePromptNll(*engine, ids, shifted_wrong),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("is not the next id")));
  engine.reset();
  // Same result when scored in chunks of 3 tokens; every block is back afterwards (scoring uses
  // the engine's own allocator).
  Load(256);  // a fresh executor: one engine drives one (steps are numbered per engine)
  EngineOptions small;
  small.max_num_batched_tokens = 3;
  auto chunked = MakeEngine(small);
  auto nll2 = ScorePromptNll(*chunked, ids, targets);
  ASSERT_OK(nll2);
  for (size_t i = 0; i < nll->size(); ++i) EXPECT_NEAR((*nll)[i], (*nll2)[i], 1e-3);
  EXPECT_EQ(chunked->scheduler().num_free_blocks(), model_.runner->kv_spec().num_blocks);
}

TEST_F(EngineTest, PromptLogprobsSurviveAPreemption) {
  // A cache so small that the two requests preempt each other: the recomputed positions are
  // not reported twice and the values do not change.
  Load(256);
  GenerationRequest a = Greedy(0, 1), b = Greedy(1, 1);
  a.params.prompt_logprobs = 0;
  b.params.prompt_logprobs = 0;
  auto ref = MakeEngine()->Generate({a, b});
  ASSERT_OK(ref);
  Load(3);
  a.params.max_tokens = 20;
  b.params.max_tokens = 20;
  auto tight = MakeEngine();
  auto out = tight->Generate({a, b});
  ASSERT_OK(out);
  EXPECT_GT(tight->scheduler().num_preemptions(), 0);
  for (int i = 0; i < 2; ++i) {
    ASSERT_OK((*out)[i].status);
    ASSERT_EQ((*out)[i].prompt_logprobs.size(), prompts_[i].size() - 1);
    for (size_t j = 0; j < prompts_[i].size() - 1; ++j) {
      EXPECT_NEAR((*out)[i].prompt_logprobs[j].logprob, (*ref)[i].prompt_logprobs[j].logprob, 1e-3) << i << " " << j;
    }
  }
}

}  // namespace
}  // namespace lorc

namespace lorc {
namespace {

// A StepRunner between the engine and the executor that corrupts what the plans say about one
// request (recognised by its prompt), as a bug or a bad client value that got past the
// coordinator's validation would: the worker must fail that request alone.
class TamperingRunner final : public StepRunner {
 public:
  using Tamper = std::function<void(ScheduledSequence&)>;
  TamperingRunner(StepRunner* inner, std::vector<int32_t> marker, Tamper tamper)
      : inner_(inner), marker_(std::move(marker)), tamper_(std::move(tamper)) {}
  absl::Status Submit(const StepPlan& plan) override {
    StepPlan p = plan;
    for (ScheduledSequence& s : p.seqs) {
      if (s.new_token_ids == marker_) tamper_(s);
    }
    return inner_->Submit(p);
  }
  absl::StatusOr<StepResult> Await() override { return inner_->Await(); }
  int max_in_flight() const override { return inner_->max_in_flight(); }

 private:
  StepRunner* inner_;
  std::vector<int32_t> marker_;
  Tamper tamper_;
};

TEST_F(EngineTest, ABadSequenceReachingTheWorkerFailsAloneAndTheBatchIsGolden) {
  const std::vector<int32_t> marker = {0, 611, 3310, 42, 42, 42};
  struct Case {
    const char* what;
    TamperingRunner::Tamper tamper;
    absl::StatusCode code;
    const char* message;
  };
  const Case cases[] = {
      {"token id", [](ScheduledSequence& s) { s.new_token_ids[2] = 5000; },
       absl::StatusCode::kInvalidArgument, "token id 5000 outside the vocabulary"},
      {"block id", [](ScheduledSequence& s) { s.new_block_ids[0] = 1 << 20; },
       absl::StatusCode::kInvalidArgument, "block id 1048576 outside the cache"},
      {"params", [](ScheduledSequence& s) { s.params->top_p = 2.0f; },
       absl::StatusCode::kInvalidArgument, "top_p must be in (0, 1]"},
      // On admission num_computed_tokens may be a prefix-cache hit (step.h), but never one that
      // leaves fewer tokens than scheduled.
      {"computed", [](ScheduledSequence& s) { s.num_computed_tokens = 3; },
       absl::StatusCode::kInvalidArgument, "6 tokens scheduled after 3 computed, but 6 are known"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    Load(256);
    TamperingRunner runner(exec_.get(), marker, c.tamper);
    auto created = Engine::Create(&runner, model_.config, model_.runner->kv_spec(), tokenizer_.get(), {});
    ASSERT_OK(created);
    Engine& engine = **created;
    std::vector<GenerationRequest> reqs;
    for (int i = 0; i < 4; ++i) reqs.push_back(Greedy(i, 48));
    GenerationRequest bad = Greedy(0, 48);
    bad.prompt_ids = marker;
    reqs.insert(reqs.begin() + 2, bad);  // in the middle of the batch
    auto out = engine.Generate(reqs);
    ASSERT_OK(out);
    const GenerationResult& failed = (*out)[2];
    EXPECT_EQ(failed.first().finish, FinishReason::kError);
    EXPECT_THAT(failed.status, StatusIs(c.code, HasSubstr(c.message)));
    for (int i = 0; i < 4; ++i) {
      const GenerationResult& r = (*out)[i < 2 ? i : i + 1];
      EXPECT_OK(r.status);
      EXPECT_EQ(r.first().output_ids, greedy_[i]) << "prompt " << i;
    }
    EXPECT_EQ(engine.scheduler().num_free_blocks(), model_.runner->kv_spec().num_blocks);
    EXPECT_EQ(exec_->num_sequences(), 0u) << "the workers still hold state";
  }
}

TEST_F(EngineTest, AStepOutOfOrderFailsAsAWholeAndChangesNothing) {
  Load(64);
  StepPlan plan;
  plan.step_id = 1;
  ScheduledSequence s;
  s.seq_id = 7;
  s.new_token_ids = prompts_[0];
  s.num_scheduled_tokens = static_cast<int32_t>(prompts_[0].size());
  s.new_block_ids = {0};
  s.sample = true;
  s.params = SamplingParams();
  plan.seqs.push_back(s);
  ASSERT_OK(exec_->Execute(plan));
  StepPlan skipped;
  skipped.step_id = 3;
  skipped.finished = {7};
  EXPECT_THAT(exec_->Execute(skipped),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("step_id 3 follows step_id 1")));
  EXPECT_EQ(exec_->num_sequences(), 1u);
  // The worker's history ends with the token it sampled; the next plan need not carry it.
  EXPECT_EQ(exec_->Tokens(7).size(), prompts_[0].size() + 1);
  EXPECT_EQ(exec_->Tokens(7).back(), greedy_[0][0]);
  // A plan that re-sends the tokens (or the params) of a running sequence fails it alone.
  StepPlan resent;
  resent.step_id = 2;
  ScheduledSequence again;
  again.seq_id = 7;
  again.new_token_ids = {5};
  again.num_computed_tokens = static_cast<int64_t>(prompts_[0].size());
  again.num_scheduled_tokens = 1;
  again.sample = true;
  resent.seqs.push_back(again);
  auto r = exec_->Execute(resent);
  ASSERT_OK(r);
  ASSERT_EQ(r->failed.size(), 1u);
  EXPECT_THAT(r->failed[0].status, StatusIs(absl::StatusCode::kFailedPrecondition,
                                            HasSubstr("tokens re-sent")));
  EXPECT_EQ(exec_->num_sequences(), 0u);
}

}  // namespace
}  // namespace lorc

namespace lorc {
namespace {

// Forwards to the real executor and records what each sequence was given per step.
class CountingRunner : public StepRunner {
 public:
  explicit CountingRunner(StepRunner* inner) : inner_(inner) {}
  absl::Status Submit(const StepPlan& plan) override {
    for (const ScheduledSequence& s : plan.seqs) {
      ++steps[s.seq_id];
      tokens[s.seq_id] += s.num_scheduled_tokens;
    }
    return inner_->Submit(plan);
  }
  absl::StatusOr<StepResult> Await() override { return inner_->Await(); }
  int max_in_flight() const override { return inner_->max_in_flight(); }
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
  eo.max_num_batched_tokens = 32;
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

// --- Request semantics (#7) -----------------------------------------------------------------

// Issue #7 fault 3: a stop string that completes on the last allowed token is a stop.
TEST_F(EngineTest, AStopStringOnTheLastAllowedTokenIsAStop) {
  Load(256);
  auto engine_ptr = MakeEngine();
  Engine& engine = *engine_ptr;
  GenerationRequest r;
  r.prompt_ids = *PromptToIds(*tokenizer_, "The pass key of", model_.config.bos_token_id);
  r.params.max_tokens = 3;
  r.params.stop_strings = {" Header"};
  auto out = engine.Generate({r});
  ASSERT_OK(out);
  const CompletionOutput& c = (*out)[0].first();
  EXPECT_EQ(c.output_ids.size(), 3u);
  EXPECT_EQ(c.text, "");
  EXPECT_EQ(c.finish, FinishReason::kStop);
  EXPECT_EQ(c.stop_reason.stop_string, " Header");
  EXPECT_EQ(c.stop_reason.token_id, -1);

  // The whole kind: whatever the 3rd token's text, as the stop string of a 3-token request,
  // ends with stop, cut before it (or keeping it with include_stop_str_in_output).
  const std::string two = *tokenizer_->Decode(absl::MakeConstSpan(greedy_[0]).subspan(0, 2));
  const std::string three = *tokenizer_->Decode(absl::MakeConstSpan(greedy_[0]).subspan(0, 3));
  const std::string stop = three.substr(two.size());
  ASSERT_FALSE(stop.empty());
  ASSERT_EQ(three.find(stop), two.size());
  GenerationRequest cut = Greedy(0, 3);
  cut.params.stop_strings = {stop};
  GenerationRequest keep = cut;
  keep.params.include_stop_str_in_output = true;
  out = engine.Generate({cut, keep});
  ASSERT_OK(out);
  EXPECT_EQ((*out)[0].first().finish, FinishReason::kStop);
  EXPECT_EQ((*out)[0].first().text, two);
  EXPECT_EQ((*out)[0].first().stop_reason.stop_string, stop);
  EXPECT_EQ((*out)[1].first().finish, FinishReason::kStop);
  EXPECT_EQ((*out)[1].first().text, three);
}

TEST_F(EngineTest, StopReasonNamesTheIdAndMinTokensDefersStops) {
  Load(256);
  auto engine_ptr = MakeEngine();
  Engine& engine = *engine_ptr;
  GenerationRequest id_stop = Greedy(3, 48);
  id_stop.params.stop_token_ids = {greedy_[3][1]};
  // The same stop id and a stop string that the greedy text meets at once, deferred past 3.
  GenerationRequest deferred = id_stop;
  deferred.params.min_tokens = 3;
  deferred.params.stop_strings = {greedy_text_[3].substr(0, 1)};
  auto out = engine.Generate({id_stop, deferred});
  ASSERT_OK(out);
  const CompletionOutput& a = (*out)[0].first();
  EXPECT_EQ(a.finish, FinishReason::kStop);
  EXPECT_EQ(a.output_ids.size(), 2u);
  EXPECT_EQ(a.stop_reason.token_id, greedy_[3][1]);
  EXPECT_TRUE(a.stop_reason.stop_string.empty());
  const CompletionOutput& b = (*out)[1].first();
  EXPECT_GT(b.output_ids.size(), 3u) << "a stop before min_tokens tokens";
  if (b.finish == FinishReason::kStop && b.stop_reason.token_id >= 0) {
    EXPECT_EQ(b.output_ids.back(), b.stop_reason.token_id);
  }
  EXPECT_EQ(engine.scheduler().num_free_blocks(), 256);
}

// include_stop_str_in_output also keeps a stop id's text (vLLM's detokenizer does; a tester
// found it dropped, 2026-12-05): the text ends with the stop token's text with the flag, before
// it without; EOS decodes to nothing either way.
TEST_F(EngineTest, IncludeStopStrKeepsAStopIdsText) {
  Load(256);
  auto engine_ptr = MakeEngine();
  Engine& engine = *engine_ptr;
  GenerationRequest cut = Greedy(3, 48);
  cut.params.stop_token_ids = {greedy_[3][2]};
  GenerationRequest keep = cut;
  keep.params.include_stop_str_in_output = true;
  auto out = engine.Generate({cut, keep});
  ASSERT_OK(out);
  const std::string two = *tokenizer_->Decode(absl::MakeConstSpan(greedy_[3]).subspan(0, 2));
  const std::string three = *tokenizer_->Decode(absl::MakeConstSpan(greedy_[3]).subspan(0, 3));
  ASSERT_GT(three.size(), two.size()) << "the stop token must have text for this test";
  for (int i = 0; i < 2; ++i) {
    const CompletionOutput& c = (*out)[i].first();
    EXPECT_EQ(c.finish, FinishReason::kStop);
    EXPECT_EQ(c.stop_reason.token_id, greedy_[3][2]);
    EXPECT_EQ(c.output_ids.size(), 3u);
    EXPECT_EQ(c.text, i == 0 ? two : three);
  }
  // EOS (special: no text) with the flag: the text is the tokens before it.
  GenerationRequest eos = Greedy(3, 48);
  eos.params.stop_token_ids = {};
  eos.params.include_stop_str_in_output = true;
  eos.params.logit_bias = {{static_cast<int32_t>(model_.config.eos_token_ids[0]), 100.f}};
  eos.params.min_tokens = 2;
  out = engine.Generate({eos});
  ASSERT_OK(out);
  const CompletionOutput& e = (*out)[0].first();
  EXPECT_EQ(e.finish, FinishReason::kStop);
  ASSERT_EQ(e.output_ids.size(), 3u);
  EXPECT_EQ(e.text, *tokenizer_->Decode(absl::MakeConstSpan(e.output_ids).subspan(0, 2)));
  EXPECT_EQ(engine.scheduler().num_free_blocks(), 256);
}

TEST_F(EngineTest, LogprobsComeWithEveryTokenIncludingAStopId) {
  Load(256);
  auto engine_ptr = MakeEngine();
  Engine& engine = *engine_ptr;
  GenerationRequest r = Greedy(3, 8);
  r.params.logprobs = 2;
  r.params.prompt_logprobs = 1;
  r.params.stop_token_ids = {greedy_[3][4]};
  auto out = engine.Generate({r});
  ASSERT_OK(out);
  ASSERT_OK((*out)[0].status);
  const CompletionOutput& c = (*out)[0].first();
  ASSERT_EQ(c.output_ids.size(), 5u);
  ASSERT_EQ(c.logprobs.size(), c.output_ids.size());
  for (const TokenLogprobs& t : c.logprobs) {
    EXPECT_EQ(t.rank, 1);  // greedy: the most likely token
    ASSERT_EQ(t.top_ids.size(), 2u);
    EXPECT_EQ(t.top_logprobs[0], t.logprob);
  }
  EXPECT_EQ((*out)[0].prompt_logprobs.size(), prompts_[3].size() - 1);
}

// The engine's side of logprobs alone (the worker's values are the worker tests'): a runner that
// stamps each sampled token with logprob = -token.
class StampingRunner : public StepRunner {
 public:
  explicit StampingRunner(StepRunner* inner) : inner_(inner) {}
  absl::Status Submit(const StepPlan& plan) override { return inner_->Submit(plan); }
  absl::StatusOr<StepResult> Await() override {
    absl::StatusOr<StepResult> r = inner_->Await();
    if (r.ok()) {
      for (SampledToken& t : r->sampled) {
        TokenLogprobs lp;
        lp.logprob = -static_cast<float>(t.token);
        lp.rank = 1;
        t.logprobs = lp;
      }
    }
    return r;
  }
  int max_in_flight() const override { return inner_->max_in_flight(); }

 private:
  StepRunner* inner_;
};

TEST_F(EngineTest, TokenLogprobsReachTheUpdatesParallelToTheIdsStopIdIncluded) {
  Load(256);
  StampingRunner runner(exec_.get());
  auto engine_or = Engine::Create(&runner, model_.config, model_.runner->kv_spec(),
                                  tokenizer_.get(), {});
  ASSERT_OK(engine_or.status());
  GenerationRequest r = Greedy(3, 8);
  r.params.logprobs = 0;
  r.params.stop_token_ids = {greedy_[3][4]};
  GenerationRequest plain = Greedy(3, 8);
  auto out = (*engine_or)->Generate({r, plain});
  ASSERT_OK(out);
  const CompletionOutput& c = (*out)[0].first();
  EXPECT_EQ(c.finish, FinishReason::kStop);
  ASSERT_EQ(c.output_ids.size(), 5u);
  ASSERT_EQ(c.logprobs.size(), 5u);
  for (size_t i = 0; i < 5; ++i) EXPECT_EQ(c.logprobs[i].logprob, -c.output_ids[i]);
  EXPECT_TRUE((*out)[1].first().logprobs.empty());  // not asked for
}

// Parallel sampling. These need the worker side of #7 (sampling children on the fork step).
TEST_F(EngineTest, ThreeGreedyCompletionsEachEqualTheGreedyOutput) {
  Load(256);
  auto engine_ptr = MakeEngine();
  Engine& engine = *engine_ptr;
  GenerationRequest r = Greedy(0, 48);
  r.params.n = 3;
  auto out = engine.Generate({r, Greedy(1, 48)});
  ASSERT_OK(out);
  ASSERT_OK((*out)[0].status);
  ASSERT_EQ((*out)[0].completions.size(), 3u);
  for (const CompletionOutput& c : (*out)[0].completions) {
    EXPECT_EQ(c.output_ids, greedy_[0]);
    EXPECT_EQ(c.text, greedy_text_[0]);
    EXPECT_EQ(c.finish, FinishReason::kLength);
  }
  EXPECT_EQ((*out)[1].first().output_ids, greedy_[1]);
  EXPECT_EQ(engine.scheduler().num_free_blocks(), 256);
  EXPECT_EQ(engine.num_requests(), 0u);
}

TEST_F(EngineTest, SeededCompletionsAreTheSeedPlusIndexStreams) {
  Load(256);
  auto engine_ptr = MakeEngine();
  Engine& engine = *engine_ptr;
  auto sampled = [&](int32_t n, uint64_t seed) {
    GenerationRequest r = Greedy(0, 24);
    r.params.temperature = 1.0f;
    r.params.seed = seed;
    r.params.n = n;
    auto out = engine.Generate({r});
    CHECK_OK(out.status());
    EXPECT_OK((*out)[0].status);
    return (*out)[0].completions;
  };
  const std::vector<CompletionOutput> three = sampled(3, 5);
  ASSERT_EQ(three.size(), 3u);
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(three[i].output_ids, sampled(1, 5 + i)[0].output_ids) << "completion " << i;
  }
  EXPECT_NE(three[0].output_ids, three[1].output_ids);
  EXPECT_EQ(engine.scheduler().num_free_blocks(), 256);
}

TEST_F(EngineTest, ParallelCompletionsUnderATightCacheStayGreedy) {
  // 3 completions of 6 + 48 tokens share the prompt's partial block (copy-on-write on the
  // workers) and need 12 blocks together; beside another request, 12 blocks force preemptions.
  Load(12);
  auto engine_ptr = MakeEngine();
  Engine& engine = *engine_ptr;
  GenerationRequest r = Greedy(0, 48);
  r.params.n = 3;
  auto out = engine.Generate({Greedy(3, 48), r});
  ASSERT_OK(out);
  ASSERT_OK((*out)[1].status);
  EXPECT_EQ((*out)[0].first().output_ids, greedy_[3]);
  for (const CompletionOutput& c : (*out)[1].completions) EXPECT_EQ(c.output_ids, greedy_[0]);
  EXPECT_GT(engine.scheduler().num_preemptions(), 0);
  EXPECT_EQ(engine.scheduler().num_free_blocks(), 12);
}

TEST_F(EngineTest, CancellingAParallelRequestEndsEveryCompletion) {
  Load(256);
  auto engine_ptr = MakeEngine();
  Engine& engine = *engine_ptr;
  GenerationRequest r = Greedy(2, 40);
  r.params.n = 3;
  std::vector<RequestUpdate> finals;
  ASSERT_OK(engine.Add(1, r, [&](const RequestUpdate& u) {
    if (u.finished) finals.push_back(u);
  }));
  ASSERT_OK(engine.Step());  // the prompt (and the fork) submitted
  EXPECT_THAT(engine.Add(1, Greedy(0, 4), [](const RequestUpdate&) {}),
              StatusIs(absl::StatusCode::kAlreadyExists));
  engine.Abort(1);
  ASSERT_EQ(finals.size(), 3u);
  for (int32_t i = 0; i < 3; ++i) {
    EXPECT_EQ(finals[i].index, i);
    EXPECT_THAT(finals[i].status, StatusIs(absl::StatusCode::kCancelled));
  }
  EXPECT_EQ(engine.scheduler().num_free_blocks(), 256);
  EXPECT_EQ(engine.num_requests(), 0u);
  while (engine.HasWork()) ASSERT_OK(engine.Step());
  EXPECT_EQ(finals.size(), 3u);
}

}  // namespace
}  // namespace lorc
