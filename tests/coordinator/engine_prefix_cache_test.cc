// Prefix caching end to end in the engine with the fixture model on the CPU backend: greedy
// outputs are the same with and without the store (full KV, an int8 cache and LoRC latents),
// requests run one after another and concurrently; sessions carry a conversation's blocks;
// usage reports cached prompt tokens; a failed runner drops the index.
#include <filesystem>

#include "common/check.h"
#include "coordinator/engine.h"
#include "eval/eval.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/fixture_model.h"
#include "tests/testing/fixtures.h"
#include "tests/testing/golden.h"
#include "tests/testing/run_lorcserve.h"
#include "tests/testing/scratch_dir.h"
#include "tests/testing/status_matchers.h"
#include "worker/model_loader.h"
#include "worker/step_executor.h"

namespace lorc {
namespace {

namespace fs = std::filesystem;
using ::lorc::testing::StatusIs;
using ::testing::HasSubstr;

constexpr char kScratch[] = "lorc_engine_prefix_cache";
const auto* const kCleanup =
    ::testing::AddGlobalTestEnvironment(new ::lorc::testing::ScratchCleanup(kScratch));

struct Format {
  const char* name;
  KvCacheDtype dtype;
  bool lorc;  // a LoRC-compressed copy of the fixture (lorcserve compress --ranks 64:64)
  friend void PrintTo(const Format& f, std::ostream* os) { *os << f.name; }
};

fs::path LorcDir() {
  static const fs::path dir = [] {
    const fs::path out = ::lorc::testing::MakeScratchDir(kScratch, "lorc");
    const ::lorc::testing::RunResult r = ::lorc::testing::RunLorcserve(
        {"compress", "--model", ::lorc::testing::TinyLlamaDir(), "--out", out.string(), "--force",
         "--ranks", "64:64"});
    EXPECT_EQ(r.exit_code, 0) << r;
    return r.exit_code == 0 ? out : fs::path();
  }();
  return dir;
}

class EnginePrefixCacheTest
    : public ::lorc::testing::FixtureModelTest<::testing::TestWithParam<Format>> {
 protected:
  void SetUp() override {
    ASSERT_NO_FATAL_FAILURE(FixtureModelTest::SetUp());
    const std::string dir = GetParam().lorc ? LorcDir().string() : ::lorc::testing::TinyLlamaDir();
    ASSERT_FALSE(dir.empty());
    KvCacheOptions kv;
    kv.block_size = 16;
    kv.num_blocks = 512;
    kv.kv_cache_dtype = GetParam().dtype;
    ASSERT_OK(LoadFixtureModel(kv, dir));
    // A shared context (the golden prompts one after another, ~90 tokens) and four questions.
    const auto& golden = ::lorc::testing::GoldenPrompts();
    for (const auto& g : golden) shared_.insert(shared_.end(), g.prompt_ids.begin(), g.prompt_ids.end());
    for (const auto& g : golden) {
      std::vector<int32_t> p = shared_;
      p.insert(p.end(), g.prompt_ids.begin() + 1, g.prompt_ids.end());  // without its BOS
      prompts_.push_back(std::move(p));
    }
  }

  // Each engine gets its own executor (step ids start at 1); they share the model's KV cache,
  // so engines must not interleave.
  std::unique_ptr<Engine> MakeEngine(bool caching, EngineOptions eo = {}) {
    eo.enable_prefix_caching = caching;
    execs_.push_back(std::make_unique<StepExecutor>(model_.runner.get()));
    auto e = Engine::Create(execs_.back().get(), model_.config, model_.runner->kv_spec(), nullptr, eo);
    CHECK_OK(e.status());
    return *std::move(e);
  }

  GenerationRequest Greedy(const std::vector<int32_t>& prompt, int max_tokens = 12) {
    GenerationRequest r;
    r.prompt_ids = prompt;
    r.params.max_tokens = max_tokens;
    r.params.ignore_eos = true;
    return r;
  }

  std::vector<std::vector<int32_t>> Ids(const std::vector<GenerationResult>& rs) {
    std::vector<std::vector<int32_t>> out;
    for (const GenerationResult& r : rs) {
      EXPECT_OK(r.status);
      out.push_back(r.first().output_ids);
    }
    return out;
  }

  std::vector<std::unique_ptr<StepExecutor>> execs_;
  std::vector<int32_t> shared_;
  std::vector<std::vector<int32_t>> prompts_;
};

TEST_P(EnginePrefixCacheTest, GreedyOutputsAreTheSameWithAndWithoutTheStore) {
  std::vector<GenerationRequest> reqs;
  for (const auto& p : prompts_) reqs.push_back(Greedy(p));
  std::vector<std::vector<int32_t>> want;
  {
    std::unique_ptr<Engine> off = MakeEngine(false);
    for (const GenerationRequest& r : reqs) {  // alone, no cache
      auto out = off->Generate({r});
      ASSERT_OK(out);
      want.push_back((*out)[0].first().output_ids);
      EXPECT_EQ((*out)[0].cached_prompt_tokens, 0);
    }
  }
  const int64_t shared_blocks_tokens = static_cast<int64_t>(shared_.size()) / 16 * 16;
  {
    // One after another: every request after the first finds the shared context.
    std::unique_ptr<Engine> on = MakeEngine(true);
    for (size_t i = 0; i < reqs.size(); ++i) {  // (the off engine is done: no interleaving)
      auto out = on->Generate({reqs[i]});
      ASSERT_OK(out);
      EXPECT_EQ((*out)[0].first().output_ids, want[i]) << "prompt " << i;
      if (i == 0) {
        EXPECT_EQ((*out)[0].cached_prompt_tokens, 0);
      } else {
        EXPECT_GE((*out)[0].cached_prompt_tokens, shared_blocks_tokens) << "prompt " << i;
      }
    }
    // Concurrently, all cached now (and the same prompts again: all but the last block).
    auto out = on->Generate(reqs);
    ASSERT_OK(out);
    EXPECT_EQ(Ids(*out), want);
    for (const GenerationResult& r : *out) {
      EXPECT_EQ(r.cached_prompt_tokens, (r.prompt_tokens - 1) / 16 * 16);
    }
    EXPECT_EQ(on->scheduler().num_free_blocks(), on->scheduler().num_blocks());
  }
  {
    // Concurrently on a cold cache, with small steps so later admissions see earlier prefills.
    EngineOptions eo;
    eo.max_num_batched_tokens = 64;
    std::unique_ptr<Engine> e = MakeEngine(true, eo);
    auto out = e->Generate(reqs);
    ASSERT_OK(out);
    EXPECT_EQ(Ids(*out), want);
  }
}

TEST_P(EnginePrefixCacheTest, ASessionsNextTurnPrefillsOnlyItsNewTokens) {
  std::vector<GenerationRequest> turns;
  std::vector<std::vector<int32_t>> got;
  {
    std::unique_ptr<Engine> on = MakeEngine(true);
    std::vector<int32_t> conversation = prompts_[0];
    for (int turn = 0; turn < 3; ++turn) {
      GenerationRequest r = Greedy(conversation, 10);
      r.session_id = "chat";
      auto out = on->Generate({r});
      ASSERT_OK(out);
      ASSERT_OK((*out)[0].status);
      if (turn > 0) {
        // All of the conversation so far but the previous turn's last output token (never
        // computed) and what is past the last full block.
        EXPECT_GE((*out)[0].cached_prompt_tokens, static_cast<int64_t>(conversation.size()) - 6 - 16)
            << "turn " << turn;
      }
      EXPECT_EQ(on->scheduler().prefix_cache_report().sessions, 1);
      turns.push_back(r);
      got.push_back((*out)[0].first().output_ids);
      conversation.insert(conversation.end(), got.back().begin(), got.back().end());
      conversation.insert(conversation.end(), prompts_[turn + 1].end() - 6, prompts_[turn + 1].end());
    }
    EXPECT_LT(on->scheduler().num_free_blocks(), on->scheduler().num_blocks());
    EXPECT_OK(on->CloseSession("", "chat"));
    EXPECT_EQ(on->scheduler().num_free_blocks(), on->scheduler().num_blocks());
    EXPECT_THAT(on->CloseSession("", "chat"), StatusIs(absl::StatusCode::kNotFound));
  }
  std::unique_ptr<Engine> off = MakeEngine(false);
  // Without the prefix cache there are no sessions: CloseSession says so (not "no such session").
  EXPECT_THAT(off->CloseSession("", "chat"),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("--no-enable-prefix-caching")));
  for (size_t i = 0; i < turns.size(); ++i) {
    turns[i].session_id.clear();
    auto want = off->Generate({turns[i]});
    ASSERT_OK(want);
    EXPECT_EQ(got[i], (*want)[0].first().output_ids) << "turn " << i;
  }
}

// The SCBench-style check: a ~1,600-token shared context with four pass-key facts, four
// turns in one session each asking another fact: per-turn accuracy with the store equals the
// accuracy without it, and turns 2-4 find the conversation so far in the cache.
TEST_P(EnginePrefixCacheTest, MultiTurnPassKeyAccuracyIsTheSameWithTheStore) {
  auto tok = Tokenizer::FromModelDir(::lorc::testing::TinyLlamaDir());
  ASSERT_OK(tok);
  const std::string file = ::lorc::testing::TinyLlamaDir() + "/eval_passkey.jsonl";
  constexpr int64_t kConversations = 2;
  std::unique_ptr<Engine> on = MakeEngine(true);
  auto with = EvalMultiTurnPasskey(*on, **tok, file, 1536, kConversations);
  ASSERT_OK(with);
  EXPECT_EQ(on->scheduler().prefix_cache_report().sessions, 0);  // closed at the end
  EXPECT_EQ(on->scheduler().num_free_blocks(), on->scheduler().num_blocks());
  std::unique_ptr<Engine> off = MakeEngine(false);
  auto without = EvalMultiTurnPasskey(*off, **tok, file, 1536, kConversations);
  ASSERT_OK(without);
  ASSERT_EQ(with->turns.size(), 4u);
  ASSERT_EQ(without->turns.size(), 4u);
  EXPECT_GT(with->context_tokens, 1500);
  for (int t = 0; t < 4; ++t) {
    SCOPED_TRACE(t + 1);
    const MultiTurnResult::Turn& a = with->turns[t];
    const MultiTurnResult::Turn& b = without->turns[t];
    std::cerr << "[multi-turn] " << GetParam().name << " turn " << t + 1 << ": accuracy "
              << a.correct << "/" << a.total << " with the store, " << b.correct << "/" << b.total
              << " without; prompt tokens " << a.prompt_tokens << ", cached " << a.cached_prompt_tokens
              << "\n";
    EXPECT_EQ(a.correct, b.correct);
    EXPECT_GT(b.correct, 0) << "the check measures nothing when no turn is right";
    EXPECT_EQ(a.total, kConversations);
    EXPECT_EQ(b.cached_prompt_tokens, 0);
    if (t > 0) {
      // All but the new question, the previous answer's last token and a partial block.
      EXPECT_GE(a.cached_prompt_tokens, a.prompt_tokens - kConversations * (32 + 16));
    }
  }
}

TEST_P(EnginePrefixCacheTest, AHostTierServesPrefixesThatDoNotFitTheDevicePool) {
  // Six contexts of 96 tokens (BOS + 95 ids, different from the first block on), each asked two
  // questions (golden prompts without BOS) one after another, in two rounds. A device pool of
  // 20 blocks of 16 tokens holds about two requests, so by round 2 the early contexts are
  // evicted: without a host tier they are recomputed, with one they are loaded back. Greedy
  // outputs must not change (the CPU backend's offload / load are memcpy of the block's bytes).
  const auto& golden = ::lorc::testing::GoldenPrompts();
  const size_t n = golden.size();
  const int64_t vocab = model_.config.vocab_size;
  std::vector<GenerationRequest> reqs;
  for (int round = 0; round < 2; ++round) {
    for (int64_t f = 0; f < 6; ++f) {
      std::vector<int32_t> p = {golden[0].prompt_ids[0]};  // BOS
      for (int64_t k = 1; k < 96; ++k) {
        p.push_back(static_cast<int32_t>(100 + (f * 131 + k * 17 + k * k * 3) % (vocab - 200)));
      }
      const auto& q = golden[(static_cast<size_t>(f) + 1 + round) % n].prompt_ids;
      p.insert(p.end(), q.begin() + 1, q.end());
      reqs.push_back(Greedy(p, 6));
    }
  }
  std::vector<std::vector<int32_t>> want;
  {
    std::unique_ptr<Engine> off = MakeEngine(false);
    for (const GenerationRequest& r : reqs) {
      auto out = off->Generate({r});
      ASSERT_OK(out);
      want.push_back((*out)[0].first().output_ids);
    }
  }
  auto run = [&](int64_t offloading_blocks, int64_t* round2_cached,
                 PrefixCacheReport* report) {
    KvCacheOptions kv;
    kv.block_size = 16;
    kv.num_blocks = 20;
    kv.kv_cache_dtype = GetParam().dtype;
    const std::string dir = GetParam().lorc ? LorcDir().string() : ::lorc::testing::TinyLlamaDir();
    KvCacheSpec probe = model_.runner->kv_spec();
    kv.kv_offloading_bytes = offloading_blocks * probe.BytesPerBlock();
    auto m = LoadModel({dir}, backend_.get(), 0, 1, nullptr, kv);
    ASSERT_OK(m.status());
    ASSERT_EQ(m->runner->num_host_blocks(), offloading_blocks);
    StepExecutor exec(m->runner.get());
    EngineOptions eo;
    eo.enable_prefix_caching = true;
    eo.num_host_blocks = m->runner->num_host_blocks();
    auto e = Engine::Create(&exec, m->config, m->runner->kv_spec(), nullptr, eo);
    ASSERT_OK(e.status());
    *round2_cached = 0;
    for (size_t i = 0; i < reqs.size(); ++i) {
      auto out = (*e)->Generate({reqs[i]});
      ASSERT_OK(out);
      EXPECT_EQ((*out)[0].first().output_ids, want[i]) << "request " << i;
      if (i >= 6) *round2_cached += (*out)[0].cached_prompt_tokens;
    }
    *report = (*e)->scheduler().prefix_cache_report();
  };
  int64_t cached_without = 0, cached_with = 0;
  PrefixCacheReport without, with;
  run(0, &cached_without, &without);
  run(64, &cached_with, &with);
  EXPECT_EQ(without.stats.host_hit_tokens, 0);
  EXPECT_EQ(without.host_blocks_total, 0);
  EXPECT_GT(with.stats.host_offloads, 0);
  EXPECT_GT(with.stats.host_loads, 0);
  EXPECT_EQ(with.stats.host_hit_tokens, with.stats.host_loads * 16);
  EXPECT_GT(with.host_blocks_used, 0);
  // Every round-2 context's six full blocks (96 tokens) are found, on the device or the host.
  EXPECT_EQ(cached_with, 6 * 96);
  EXPECT_LT(cached_without, cached_with);
}

INSTANTIATE_TEST_SUITE_P(Formats, EnginePrefixCacheTest,
                         ::testing::Values(Format{"full", KvCacheDtype::kAuto, false},
                                           Format{"int8", KvCacheDtype::kInt8, false},
                                           Format{"lorc", KvCacheDtype::kAuto, true}),
                         [](const auto& info) { return std::string(info.param.name); });

// A runner that fails every step after the first `ok` ones (a lost worker).
class FailingRunner : public StepRunner {
 public:
  FailingRunner(StepRunner* inner, int ok) : inner_(inner), ok_(ok) {}
  absl::Status Submit(const StepPlan& plan) override {
    if (ok_-- > 0) return inner_->Submit(plan);
    return absl::UnavailableError("worker 0 is gone");
  }
  absl::StatusOr<StepResult> Await() override { return inner_->Await(); }
  int max_in_flight() const override { return 1; }

 private:
  StepRunner* inner_;
  int ok_;
};

using EnginePrefixCacheResetTest = ::lorc::testing::FixtureModelTest<>;

TEST_F(EnginePrefixCacheResetTest, ARunnerFailureDropsTheIndexAndTheSessions) {
  KvCacheOptions kv;
  kv.num_blocks = 64;
  ASSERT_OK(LoadFixtureModel(kv));
  FailingRunner runner(exec_.get(), 1000);
  auto e = Engine::Create(&runner, model_.config, model_.runner->kv_spec(), nullptr, {});
  ASSERT_OK(e);
  Engine& engine = **e;
  GenerationRequest r;
  for (const auto& g : ::lorc::testing::GoldenPrompts()) {
    r.prompt_ids.insert(r.prompt_ids.end(), g.prompt_ids.begin(), g.prompt_ids.end());
  }
  r.params.max_tokens = 4;
  r.session_id = "s";
  auto first = engine.Generate({r});
  ASSERT_OK(first);
  ASSERT_OK((*first)[0].status);
  EXPECT_GT(engine.scheduler().prefix_cache_report().cached_blocks, 0);
  EXPECT_EQ(engine.scheduler().prefix_cache_report().sessions, 1);
  runner = FailingRunner(exec_.get(), 0);
  EXPECT_THAT(engine.Generate({r}).status(), StatusIs(absl::StatusCode::kUnavailable));
  EXPECT_EQ(engine.scheduler().prefix_cache_report().cached_blocks, 0);
  EXPECT_EQ(engine.scheduler().prefix_cache_report().sessions, 0);
  EXPECT_EQ(engine.scheduler().num_free_blocks(), engine.scheduler().num_blocks());
}

}  // namespace
}  // namespace lorc
