// The forward pass against the reference outputs of tiny-llama-a (transformers, fp32).
#include "worker/model_runner.h"

#include <cmath>
#include <filesystem>
#include <fstream>

#include "common/check.h"
#include "common/json_util.h"
#include "coordinator/engine.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "eval/eval.h"
#include "tests/testing/fixture_model.h"
#include "tests/testing/fixtures.h"
#include "tests/testing/golden.h"
#include "tests/testing/status_matchers.h"
#include "worker/model_loader.h"
#include "worker/step_executor.h"

namespace lorc {
namespace {

using ::lorc::testing::Golden;
using ::lorc::testing::GoldenPrompts;

using ::lorc::testing::StatusIs;
using ::testing::HasSubstr;

class TinyLlamaTest : public ::lorc::testing::FixtureModelTest<> {
 protected:
  void SetUp() override {
    ASSERT_NO_FATAL_FAILURE(FixtureModelTest::SetUp());
    KvCacheOptions kv;
    kv.block_size = 16;
    kv.memory_bytes = 64ll << 20;
    ASSERT_OK(LoadFixtureModel(kv));
  }

  // Runs a whole prompt as one sequence (optionally in chunks) and returns the last logits.
  std::vector<float> LastLogits(const std::vector<int32_t>& ids, int chunk) {
    KvBlockManager blocks(model_.runner->kv_spec().block_size, model_.runner->kv_spec().num_blocks);
    CHECK_OK(blocks.AddSequence(1));
    std::vector<float> last;
    for (size_t pos = 0; pos < ids.size(); pos += chunk) {
      const size_t n = std::min<size_t>(chunk, ids.size() - pos);
      CHECK_OK(blocks.Reserve(1, static_cast<int64_t>(pos + n)).status());
      SequenceStep s;
      s.seq_id = 1;
      s.tokens.assign(ids.begin() + pos, ids.begin() + pos + n);
      s.num_computed_tokens = static_cast<int64_t>(pos);
      auto t = blocks.BlockTable(1);
      s.block_table.assign(t.begin(), t.end());
      auto out = model_.runner->Execute({s});
      CHECK_OK(out.status());
      last.assign(out->Row(0), out->Row(0) + out->vocab_size);
    }
    return last;
  }
};

TEST_F(TinyLlamaTest, LastPositionTop20LogitsMatchReference) {
  for (const Golden& g : GoldenPrompts()) {
    const std::vector<float> logits = LastLogits(g.prompt_ids, 1 << 20);
    ASSERT_EQ(logits.size(), 4096u);
    for (size_t i = 0; i < g.top_ids.size(); ++i) {
      EXPECT_NEAR(logits[g.top_ids[i]], g.top_values[i], 1e-2) << "rank " << i << " id " << g.top_ids[i];
    }
    EXPECT_EQ(std::max_element(logits.begin(), logits.end()) - logits.begin(), g.top_ids[0]);
  }
}

TEST_F(TinyLlamaTest, ChunkedPrefillMatchesSinglePass) {
  const Golden g = GoldenPrompts()[1];  // the longest prompt (12 tokens)
  const std::vector<float> whole = LastLogits(g.prompt_ids, 1 << 20);
  for (int chunk : {1, 5, 11}) {
    const std::vector<float> chunked = LastLogits(g.prompt_ids, chunk);
    for (size_t i = 0; i < whole.size(); ++i) ASSERT_NEAR(chunked[i], whole[i], 1e-3) << "chunk " << chunk;
  }
}

TEST_F(TinyLlamaTest, Greedy48TokensMatchReferenceBatchedAndAlone) {
  const std::vector<Golden> golden = GoldenPrompts();
  auto engine_or = Engine::Create(exec_.get(), model_.config, model_.runner->kv_spec(), nullptr, {});
  CHECK_OK(engine_or.status());
  Engine& engine = **engine_or;
  std::vector<GenerationRequest> reqs;
  for (const Golden& g : golden) {
    GenerationRequest r;
    r.prompt_ids = g.prompt_ids;
    r.params.max_tokens = 48;
    reqs.push_back(r);
  }
  auto batched = engine.Generate(reqs);
  ASSERT_OK(batched);
  for (size_t i = 0; i < golden.size(); ++i) {
    EXPECT_EQ((*batched)[i].first().output_ids, golden[i].greedy_ids) << "prompt " << i << " (batched)";
    EXPECT_EQ((*batched)[i].first().finish, FinishReason::kLength) << (*batched)[i].status;
    auto alone = engine.Generate({reqs[i]});
    ASSERT_OK(alone);
    EXPECT_EQ((*alone)[0].first().output_ids, golden[i].greedy_ids) << "prompt " << i << " (alone)";
  }
  EXPECT_EQ(engine.scheduler().num_free_blocks(), model_.runner->kv_spec().num_blocks);
}

TEST_F(TinyLlamaTest, RejectsMalformedSteps) {
  SequenceStep s;
  s.seq_id = 1;
  s.tokens = {0, 4096};
  s.block_table = {0};
  EXPECT_THAT(model_.runner->Execute({s}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("token id 4096")));
  s.tokens.assign(17, 5);  // 17 tokens need 2 blocks of 16
  EXPECT_THAT(model_.runner->Execute({s}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("block table has 1 blocks")));
  s.block_table = {0, 1 << 30};
  EXPECT_THAT(model_.runner->Execute({s}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("outside the cache")));
  s.tokens = {1};
  s.num_computed_tokens = 4096;
  s.block_table.assign(300, 0);
  EXPECT_THAT(model_.runner->Execute({s}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("exceed the model context")));
}

// Steps over the fixed step buffers' limits fail with InvalidArgument naming the limit; a model
// with small limits still computes steps within them.
using StepLimitsTest = ::lorc::testing::FixtureModelTest<>;

// A 16 MiB cache, max_num_seqs 2, max_num_batched_tokens 8, max_model_len 64.
KvCacheOptions SmallStepLimits() {
  KvCacheOptions kv;
  kv.memory_bytes = 16ll << 20;
  kv.max_num_seqs = 2;
  kv.max_num_batched_tokens = 8;
  kv.max_model_len = 64;
  return kv;
}

TEST_F(StepLimitsTest, ExecuteRejectsStepsOverTheLimits) {
  KvCacheOptions kv = SmallStepLimits();
  auto m = LoadModel({::lorc::testing::TinyLlamaDir()}, backend_.get(), 0, 1, nullptr, kv);
  ASSERT_OK(m);
  ModelRunner& runner = *m->runner;
  auto seq = [](int64_t id, int n, int32_t first_block) {
    SequenceStep s;
    s.seq_id = id;
    s.tokens.assign(n, 5);
    s.block_table = {first_block};
    return s;
  };
  EXPECT_OK(runner.Execute({seq(1, 4, 0), seq(2, 4, 1)}));
  EXPECT_THAT(runner.Execute({seq(1, 9, 0)}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("max_num_batched_tokens 8")));
  EXPECT_THAT(runner.Execute({seq(1, 1, 0), seq(2, 1, 1), seq(3, 1, 2)}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("max_num_seqs 2")));
  SequenceStep late = seq(1, 1, 0);
  late.num_computed_tokens = 64;
  late.block_table.assign(5, 0);
  EXPECT_THAT(runner.Execute({late}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("max_model_len")));

  // 8 logit rows with max_num_seqs 2: four LM-head passes, rows in step order, the same
  // logits as a runner with the default limits.
  auto ref = LoadModel({::lorc::testing::TinyLlamaDir()}, backend_.get(), 0, 1, nullptr, {});
  ASSERT_OK(ref);
  SequenceStep all = seq(1, 8, 0);
  all.tokens = {1, 17, 400, 9, 3000, 5, 5, 77};
  all.logits = SequenceStep::Logits::kAll;
  auto got = runner.Execute({all});
  auto want = ref->runner->Execute({all});
  ASSERT_OK(got);
  ASSERT_OK(want);
  ASSERT_EQ(got->logits.size(), want->logits.size());
  ASSERT_EQ(got->logits.size(), 8u * 4096);
  for (size_t i = 0; i < got->logits.size(); ++i) ASSERT_NEAR(got->logits[i], want->logits[i], 1e-4) << i;

  kv.max_model_len = 1 << 20;  // beyond the model's 4096-token context
  EXPECT_THAT(LoadModel({::lorc::testing::TinyLlamaDir()}, backend_.get(), 0, 1, nullptr, kv),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("max_model_len")));
}

// The residual stream's bookkeeping in Forward when the backend fuses the norms into the
// projections (BackendOptions::fused_norm_rows): on the CPU the base class then copies the stream
// into the runner's second buffer at every add, so every output must equal the in-place run's bit
// for bit. Steps of up to 8 tokens (all of them fused): an 8-token prompt whose logits of every
// position come back through the long-chunk path (more rows than max_num_seqs 2: the LM head
// reads the stream where the forward pass left it), then decode steps of two sequences.
TEST_F(StepLimitsTest, FusedNormStreamMatchesInPlaceBitForBit) {
  KvCacheOptions kv = SmallStepLimits();
  BackendOptions fused_options;
  fused_options.fused_norm_rows = 8;
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Backend> fused_backend, CreateBackend(fused_options));
  EXPECT_TRUE(fused_backend->FusesNormMatmul(8));
  EXPECT_FALSE(backend_->FusesNormMatmul(1));
  auto plain = LoadModel({::lorc::testing::TinyLlamaDir()}, backend_.get(), 0, 1, nullptr, kv);
  auto fused = LoadModel({::lorc::testing::TinyLlamaDir()}, fused_backend.get(), 0, 1, nullptr, kv);
  ASSERT_OK(plain);
  ASSERT_OK(fused);
  EXPECT_EQ(plain->runner->fused_norm_rows(), 0);
  EXPECT_EQ(fused->runner->fused_norm_rows(), 8);

  auto expect_same = [](const absl::StatusOr<StepOutput>& got, const absl::StatusOr<StepOutput>& want,
                        const char* what) {
    ASSERT_OK(got);
    ASSERT_OK(want);
    ASSERT_EQ(got->logits.size(), want->logits.size()) << what;
    ASSERT_FALSE(want->logits.empty()) << what;
    for (size_t i = 0; i < want->logits.size(); ++i) ASSERT_EQ(got->logits[i], want->logits[i]) << what << " " << i;
  };
  SequenceStep a;
  a.seq_id = 1;
  a.tokens = {1, 17, 400, 9, 3000, 5, 5, 77};
  a.block_table = {0, 1};
  a.logits = SequenceStep::Logits::kAll;
  expect_same(fused->runner->Execute({a}, true), plain->runner->Execute({a}, true), "8-token prompt, all logits");
  SequenceStep b;
  b.seq_id = 2;
  b.tokens = {3, 99, 1234};
  b.block_table = {2};
  expect_same(fused->runner->Execute({b}, true), plain->runner->Execute({b}, true), "3-token prompt");
  a.logits = SequenceStep::Logits::kLast;
  for (int step = 0; step < 4; ++step) {
    a.num_computed_tokens += static_cast<int64_t>(a.tokens.size());
    b.num_computed_tokens += static_cast<int64_t>(b.tokens.size());
    a.tokens = {100 + step};
    b.tokens = {200 + step};
    expect_same(fused->runner->Execute({a, b}, true), plain->runner->Execute({a, b}, true), "decode of two");
  }
}

TEST_F(TinyLlamaTest, StepBuffersKeepTheirAddressesAcrossStepSizes) {
  const std::vector<const void*> before = model_.runner->StepBufferAddresses();
  const std::vector<int32_t> prompt = GoldenPrompts()[1].prompt_ids;
  // A long prefill, chunked prefills of odd sizes and single-token decodes: the sizes that used
  // to grow the scratch.
  const std::vector<float> whole = LastLogits(prompt, 1 << 20);
  EXPECT_EQ(model_.runner->StepBufferAddresses(), before);
  const std::vector<float> chunked = LastLogits(prompt, 3);
  EXPECT_EQ(model_.runner->StepBufferAddresses(), before);
  for (size_t i = 0; i < whole.size(); ++i) ASSERT_NEAR(chunked[i], whole[i], 1e-3);
  // Every row's logits (scoring: prompt log-probabilities) go through the same buffers.
  auto created = Engine::Create(exec_.get(), model_.config, model_.runner->kv_spec(), nullptr, {});
  ASSERT_OK(created);
  Engine& engine = **created;
  ASSERT_OK(ScorePromptNll(engine, absl::MakeConstSpan(prompt).subspan(0, prompt.size() - 1),
                           absl::MakeConstSpan(prompt).subspan(1)));
  EXPECT_EQ(model_.runner->StepBufferAddresses(), before);
}

TEST_F(TinyLlamaTest, KvSpecComesFromKvstore) {
  const KvCacheSpec& spec = model_.runner->kv_spec();
  EXPECT_EQ(spec.num_layers(), model_.config.num_layers);
  EXPECT_EQ(spec.k_width[0], model_.config.num_kv_heads * model_.config.head_dim);
  EXPECT_EQ(spec.rope_at(0), KvRope::kBeforeCache);
  EXPECT_EQ(spec.CompressionName(), "none");
}

using KvCacheSizingTest = ::lorc::testing::FixtureModelTest<>;

TEST_F(KvCacheSizingTest, GpuMemoryUtilizationSizesFromMemoryInfo) {
  KvCacheOptions kv;
  kv.gpu_memory_utilization = 1e-12;  // less than what is already in use
  EXPECT_THAT(LoadModel({::lorc::testing::TinyLlamaDir()}, backend_.get(), 0, 1, nullptr, kv),
              StatusIs(absl::StatusCode::kResourceExhausted, HasSubstr("gpu_memory_utilization")));
  kv.gpu_memory_utilization = 1.5;
  EXPECT_THAT(LoadModel({::lorc::testing::TinyLlamaDir()}, backend_.get(), 0, 1, nullptr, kv),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("gpu_memory_utilization")));
}

TEST_F(TinyLlamaTest, RejectsBlockCopiesOutsideTheCache) {
  const int32_t n = model_.runner->kv_spec().num_blocks;
  EXPECT_OK(model_.runner->CopyBlocks({BlockCopy{0, 1}}));
  EXPECT_THAT(model_.runner->CopyBlocks({BlockCopy{0, 1}, BlockCopy{n, 2}}),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr(absl::StrCat("block copy 1: src block ", n, " outside the cache"))));
  EXPECT_THAT(model_.runner->CopyBlocks({BlockCopy{0, -1}}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("dst block -1")));
}

// A model directory with only a config.json, for --random-weights.
std::string WriteRandomModelDir(const std::string& name) {
  const std::string dir = (std::filesystem::temp_directory_path() / name).string();
  std::filesystem::create_directories(dir);
  std::ofstream(dir + "/config.json") << R"({
    "model_type": "llama", "vocab_size": 300, "hidden_size": 96, "intermediate_size": 200,
    "num_hidden_layers": 2, "num_attention_heads": 6, "num_key_value_heads": 2, "head_dim": 16,
    "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    "tie_word_embeddings": true, "bos_token_id": 0, "eos_token_id": [1, 2]})";
  return dir;
}

TEST(RandomWeightsTest, AnyConfigShapeRunsAndIsSeeded) {
  const std::string dir = WriteRandomModelDir("lorc_random_model_test");
  auto backend = CreateBackend({});
  ASSERT_OK(backend);
  // Teacher-forced NLLs of a fixed sequence: a function of the weights only.
  auto run = [&](uint64_t seed) {
    auto m = LoadModel({dir, true, seed}, backend->get(), 0, 1, nullptr, {});
    CHECK_OK(m.status());
    EXPECT_EQ(m->runner->kv_spec().k_width[0], 2 * 16);
    StepExecutor exec(m->runner.get());
    auto engine_or = Engine::Create(&exec, m->config, m->runner->kv_spec(), nullptr, {});
    CHECK_OK(engine_or.status());
    Engine& engine = **engine_or;
    GenerationRequest r;
    r.prompt_ids = {0, 5, 17, 42, 299};
    r.params.max_tokens = 12;
    r.params.ignore_eos = true;
    auto out = engine.Generate({r});
    CHECK_OK(out.status());
    EXPECT_EQ((*out)[0].first().output_ids.size(), 12u);
    auto nll = ScorePromptNll(engine, {0, 5, 17, 42, 299, 7}, {5, 17, 42, 299, 7, 9});
    CHECK_OK(nll.status());
    return *nll;
  };
  const auto a = run(7), b = run(7), c = run(8);
  EXPECT_EQ(a, b);
  EXPECT_NE(a, c);
}

}  // namespace
}  // namespace lorc
