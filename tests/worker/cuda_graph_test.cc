// Decode steps replayed from CUDA graphs (worker/model_runner_graphs.cc) against the same model
// run eagerly (--enforce-eager): greedy output equal token for token for the golden prompts
// batched, alone, and in batches whose size needs padding. The CUDA cases skip without a device;
// the CPU cases check that the CPU backend never captures and the padded sizes.
#include <memory>
#include <vector>

#include "backend/cuda_backend.h"
#include "coordinator/engine.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/fixtures.h"
#include "tests/testing/golden.h"
#include "tests/testing/status_matchers.h"
#include "worker/model_loader.h"
#include "worker/step_executor.h"

namespace lorc {
namespace {

using ::testing::ElementsAre;
using ::testing::IsEmpty;

constexpr int kTokens = 32;

bool HaveCudaDevice() {
  absl::StatusOr<std::vector<CudaDeviceInfo>> d = ListCudaDevices();
  return d.ok() && !d->empty();
}

struct GenRun {
  std::vector<std::vector<int32_t>> outputs;  // per request, the greedy tokens
  int64_t graph_steps = 0, eager_steps = 0;
  std::vector<int32_t> sizes;
};

// Loads the fixture model on `backend` (graphs unless `eager`) and generates `prompts` as one batch.
GenRun GenerateBatch(Backend* backend, bool eager, const std::vector<std::vector<int32_t>>& prompts) {
  GenRun run;
  KvCacheOptions kv;
  kv.block_size = 16;
  kv.num_blocks = 512;
  kv.max_num_seqs = 16;
  kv.max_num_batched_tokens = 256;
  kv.enforce_eager = eager;
  auto m = LoadModel({::lorc::testing::TinyLlamaDir()}, backend, 0, 1, nullptr, kv);
  EXPECT_OK(m);
  if (!m.ok()) return run;
  StepExecutor exec(m->runner.get());
  EngineOptions eo;
  eo.max_num_seqs = kv.max_num_seqs;
  eo.max_num_batched_tokens = kv.max_num_batched_tokens;
  auto engine = Engine::Create(&exec, m->config, m->runner->kv_spec(), nullptr, eo);
  EXPECT_OK(engine);
  if (!engine.ok()) return run;
  std::vector<GenerationRequest> reqs;
  for (const std::vector<int32_t>& p : prompts) {
    GenerationRequest r;
    r.prompt_ids = p;
    r.params.max_tokens = kTokens;
    reqs.push_back(r);
  }
  auto out = (*engine)->Generate(reqs);
  EXPECT_OK(out);
  if (!out.ok()) return run;
  for (const GenerationResult& r : *out) run.outputs.push_back(r.first().output_ids);
  run.graph_steps = m->runner->num_graph_steps();
  run.eager_steps = m->runner->num_eager_steps();
  run.sizes = m->runner->decode_graph_sizes();
  return run;
}

std::vector<std::vector<int32_t>> GoldenIds(std::vector<size_t> which) {
  std::vector<std::vector<int32_t>> p;
  for (size_t i : which) p.push_back(::lorc::testing::GoldenPrompts()[i].prompt_ids);
  return p;
}

TEST(DecodeGraphSizesTest, PowersOfTwoThenMultiplesOfEightAndTheLimit) {
  EXPECT_THAT(DecodeGraphSizes(1), ElementsAre(1));
  EXPECT_THAT(DecodeGraphSizes(3), ElementsAre(1, 2, 3));
  EXPECT_THAT(DecodeGraphSizes(16), ElementsAre(1, 2, 4, 8, 16));
  EXPECT_THAT(DecodeGraphSizes(30), ElementsAre(1, 2, 4, 8, 16, 24, 30));
}

// Largest first, so that each power-of-two token-count bucket of the CUDA matmul tuning is first
// timed at its largest reachable count (the decode limit where it falls inside a bucket).
TEST(MatmulWarmUpSizesTest, DescendingPowersOfTwoWithBothLimits) {
  EXPECT_THAT(MatmulWarmUpSizes(2048, 256), ElementsAre(2048, 1024, 512, 256, 128, 64, 32, 16, 8, 4, 2, 1));
  EXPECT_THAT(MatmulWarmUpSizes(3000, 100), ElementsAre(3000, 2048, 1024, 512, 256, 128, 100, 64, 32, 16, 8, 4, 2, 1));
  EXPECT_THAT(MatmulWarmUpSizes(1, 1), ElementsAre(1));
  EXPECT_THAT(MatmulWarmUpSizes(5, 5), ElementsAre(5, 4, 2, 1));
}

SequenceStep OneStep(size_t tokens, SequenceStep::Logits logits) {
  SequenceStep s;
  s.tokens.assign(tokens, 5);
  s.logits = logits;
  return s;
}

// The graph choice must be the same on every tensor-parallel rank: it may depend on token counts
// only, not on the logits a rank asks for (rank 0 samples: kLast, or kAll for a one-token prompt
// chunk with prompt log-probabilities; the other ranks: kNone).
TEST(DecodeGraphIndexTest, DependsOnTokenCountsNotOnTheLogitsARankWants) {
  using L = SequenceStep::Logits;
  const std::vector<int32_t> sizes = {1, 2, 4, 8};
  for (L logits : {L::kNone, L::kLast, L::kAll}) {
    std::vector<SequenceStep> steps(3, OneStep(1, L::kLast));
    steps[1].logits = logits;
    EXPECT_EQ(DecodeGraphIndex(steps, sizes), 2) << static_cast<int>(logits);  // 3 rows -> 4
    for (SequenceStep& s : steps) s.logits = logits;
    EXPECT_EQ(DecodeGraphIndex(steps, sizes), 2) << static_cast<int>(logits);
  }
  EXPECT_EQ(DecodeGraphIndex(std::vector<SequenceStep>(1, OneStep(1, L::kNone)), sizes), 0);
  EXPECT_EQ(DecodeGraphIndex(std::vector<SequenceStep>(8, OneStep(1, L::kLast)), sizes), 3);
  EXPECT_EQ(DecodeGraphIndex(std::vector<SequenceStep>(9, OneStep(1, L::kLast)), sizes), -1);
  std::vector<SequenceStep> mixed(2, OneStep(1, L::kLast));
  mixed[0] = OneStep(2, L::kLast);  // a prefill chunk makes the step eager
  EXPECT_EQ(DecodeGraphIndex(mixed, sizes), -1);
  EXPECT_EQ(DecodeGraphIndex({}, sizes), -1);
  EXPECT_EQ(DecodeGraphIndex(std::vector<SequenceStep>(1, OneStep(1, L::kLast)), {}), -1);
}

TEST(CudaGraphTest, CpuBackendRunsEagerly) {
  REQUIRE_TINY_LLAMA();
  auto cpu = CreateBackend({BackendKind::kCpu});
  ASSERT_OK(cpu);
  const GenRun run = GenerateBatch(cpu->get(), /*eager=*/false, GoldenIds({0, 1}));
  ASSERT_EQ(run.outputs.size(), 2u);
  EXPECT_THAT(run.sizes, IsEmpty());
  EXPECT_EQ(run.graph_steps, 0);
  EXPECT_GT(run.eager_steps, 0);
}

TEST(CudaGraphTest, GreedyWithGraphsEqualsEagerBatchedAloneAndPadded) {
  REQUIRE_TINY_LLAMA();
  if (!HaveCudaDevice()) GTEST_SKIP() << "no CUDA device";
  const size_t n = ::lorc::testing::GoldenPrompts().size();
  std::vector<std::vector<size_t>> batches = {{0, 1, 2, 3}, {0, 1, 2}, {3, 2, 1, 0, 0, 1}};
  for (size_t i = 0; i < n; ++i) batches.push_back({i});
  // One backend for both paths: the same matmul kernel choices (timed once per shape), so the
  // graphs must replay exactly the eager computation.
  auto cuda = CreateBackend({BackendKind::kCuda});
  ASSERT_OK(cuda);
  for (const std::vector<size_t>& b : batches) {
    const auto prompts = GoldenIds(b);
    const GenRun eager = GenerateBatch(cuda->get(), /*eager=*/true, prompts);
    const GenRun graphs = GenerateBatch(cuda->get(), /*eager=*/false, prompts);
    EXPECT_THAT(eager.sizes, IsEmpty());
    EXPECT_EQ(eager.graph_steps, 0);
    EXPECT_THAT(graphs.sizes, ElementsAre(1, 2, 4, 8, 16));
    // The same steps, the decode ones replayed.
    EXPECT_GE(graphs.graph_steps, kTokens / 2) << b.size() << " prompts";
    EXPECT_EQ(graphs.graph_steps + graphs.eager_steps, eager.eager_steps) << b.size() << " prompts";
    ASSERT_EQ(eager.outputs.size(), b.size());
    ASSERT_EQ(graphs.outputs.size(), b.size());
    for (size_t i = 0; i < b.size(); ++i) {
      EXPECT_EQ(eager.outputs[i].size(), size_t{kTokens});
      EXPECT_EQ(graphs.outputs[i], eager.outputs[i]) << "batch of " << b.size() << ", request " << i;
    }
  }
}

}  // namespace
}  // namespace lorc
