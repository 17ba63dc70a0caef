// The fixture model served on the CUDA backend (BF16 weights, activations and KV cache, F32
// logits, sampling on the device) against the CPU backend (F32), the reference: greedy tokens of
// every golden prompt, prompt log-probabilities, and tensor parallelism 2 over NCCL with decode
// graphs (with and without a sharded LM head; disabled, see below). The CUDA cases skip without enough devices.
// CPU cases check the backend-independent parts: the sharded LM head's row interleave (two
// ranks over Gloo) and sampling from rows that took several LM-head passes.
#include <cstdlib>
#include <condition_variable>
#include <deque>
#include <iostream>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "backend/cuda_backend.h"
#include "backend/cuda_gemv.h"
#include "common/status_macros.h"
#include "coordinator/engine.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/fixtures.h"
#include "tests/testing/golden.h"
#include "tests/testing/status_matchers.h"
#include "worker/comm/communicator.h"
#include "worker/comm/rendezvous.h"
#include "worker/model_loader.h"
#include "worker/step_executor.h"

namespace lorc {
namespace {

constexpr int kGreedyTokens = 32;  // compared token for token with the CPU reference
// BF16 activations against the F32 reference: greedy may take the reference's second choice where
// its top two log-probabilities are this close (nats); the sequences part there.
constexpr float kBf16NearTie = 0.15f;

// In-process tensor parallelism drives two GPUs from two threads. With CUDA's lazy module loading
// a thread's first launch of a kernel loads it under a driver lock and waits for queued work,
// which can be an NCCL kernel waiting for the other thread: a deadlock. Load every module when
// the context is made instead (before main, so before the first CUDA call).
const bool kEagerModuleLoading = [] {
  setenv("CUDA_MODULE_LOADING", "EAGER", /*overwrite=*/0);
  return true;
}();

bool HaveCudaDevices(size_t n) {
  absl::StatusOr<std::vector<CudaDeviceInfo>> d = ListCudaDevices();
  return d.ok() && d->size() >= n;
}

KvCacheOptions SmallCache() {
  KvCacheOptions kv;
  kv.block_size = 16;
  kv.num_blocks = 512;
  kv.max_num_seqs = 16;
  kv.max_num_batched_tokens = 256;
  return kv;
}

std::vector<GenerationRequest> GreedyRequests(int32_t prompt_logprobs = -1) {
  std::vector<GenerationRequest> reqs;
  for (const ::lorc::testing::Golden& g : ::lorc::testing::GoldenPrompts()) {
    GenerationRequest r;
    r.prompt_ids = g.prompt_ids;
    r.params.max_tokens = kGreedyTokens;
    r.params.logprobs = 2;  // the reference's top two, to tell a near-tie from a wrong token
    if (prompt_logprobs >= 0) r.params.prompt_logprobs = prompt_logprobs;
    reqs.push_back(r);
  }
  return reqs;
}

// All golden prompts batched through one engine over `runner`.
std::vector<GenerationResult> Generate(StepRunner* runner, const LoadedModel& m,
                                       const std::vector<GenerationRequest>& reqs) {
  EngineOptions eo;
  eo.max_num_seqs = m.runner->limits().max_num_seqs;
  eo.max_num_batched_tokens = m.runner->limits().max_num_batched_tokens;
  auto engine = Engine::Create(runner, m.config, m.runner->kv_spec(), nullptr, eo);
  EXPECT_OK(engine);
  if (!engine.ok()) return {};
  auto out = (*engine)->Generate(reqs);
  EXPECT_OK(out);
  return out.ok() ? *std::move(out) : std::vector<GenerationResult>{};
}

// fused_norm_rows: BackendOptions::fused_norm_rows (-1: the backend's default); when > 0 the
// runner must have taken it. fold_rows >= 0: the runner's ModelRunner::fold_rows() must be it.
std::vector<GenerationResult> GenerateOn(BackendKind kind, const std::vector<GenerationRequest>& reqs,
                                         int64_t fused_norm_rows = -1, int64_t fold_rows = -1) {
  BackendOptions bo{kind};
  bo.fused_norm_rows = fused_norm_rows;
  auto backend = CreateBackend(bo);
  EXPECT_OK(backend);
  if (!backend.ok()) return {};
  auto m = LoadModel({::lorc::testing::TinyLlamaDir()}, backend->get(), 0, 1, nullptr, SmallCache());
  EXPECT_OK(m);
  if (!m.ok()) return {};
  if (kind == BackendKind::kCuda) {
    EXPECT_EQ(m->runner->kv_spec().dtype, DType::kBF16);
  }
  if (fused_norm_rows > 0) {
    EXPECT_EQ(m->runner->fused_norm_rows(), fused_norm_rows);
  }
  if (fold_rows >= 0) {
    EXPECT_EQ(m->runner->fold_rows(), fold_rows);
  }
  StepExecutor exec(m->runner.get());
  return Generate(&exec, *m, reqs);
}

// `got` equals `want` token for token, except that it may part from it at a position where the
// reference's top two log-probabilities are within `near_tie` and `got` took the second.
void ExpectSameGreedy(const std::vector<GenerationResult>& got,
                      const std::vector<GenerationResult>& want, const char* what,
                      float near_tie = 0.0f) {
  ASSERT_EQ(got.size(), want.size()) << what;
  for (size_t i = 0; i < got.size(); ++i) {
    const CompletionOutput& g = got[i].first();
    const CompletionOutput& w = want[i].first();
    size_t k = 0;
    while (k < g.output_ids.size() && k < w.output_ids.size() && g.output_ids[k] == w.output_ids[k]) ++k;
    if (k == g.output_ids.size() && k == w.output_ids.size()) continue;
    ASSERT_LT(k, g.output_ids.size()) << what << ", prompt " << i << ": stops early";
    ASSERT_LT(k, w.logprobs.size()) << what << ", prompt " << i;
    const TokenLogprobs& lp = w.logprobs[k];
    ASSERT_EQ(lp.top_ids.size(), 2u);
    const float gap = lp.top_logprobs[0] - lp.top_logprobs[1];
    EXPECT_TRUE(g.output_ids[k] == lp.top_ids[1] && gap < near_tie)
        << what << ", prompt " << i << ": token " << k << " is " << g.output_ids[k]
        << ", the reference's top two are " << lp.top_ids[0] << " and " << lp.top_ids[1]
        << " (gap " << gap << " nats, near-tie below " << near_tie << ")\n"
        << ::testing::PrintToString(g.output_ids) << "\nvs the reference\n"
        << ::testing::PrintToString(w.output_ids);
    std::cout << what << ", prompt " << i << ": same first " << k << " tokens, then the reference's "
              << "second choice at a near-tie (" << gap << " nats)\n";
  }
}

TEST(CudaModelRunnerTest, GreedyMatchesCpuReferenceOnEveryGoldenPrompt) {
  REQUIRE_TINY_LLAMA();
  if (!HaveCudaDevices(1)) GTEST_SKIP() << "no CUDA device";
  const auto cpu = GenerateOn(BackendKind::kCpu, GreedyRequests());
  const auto cuda = GenerateOn(BackendKind::kCuda, GreedyRequests());
  ASSERT_EQ(cpu.size(), ::lorc::testing::GoldenPrompts().size());
  for (const GenerationResult& r : cpu) ASSERT_EQ(r.first().output_ids.size(), size_t{kGreedyTokens});
  ExpectSameGreedy(cuda, cpu, "cuda vs cpu", kBf16NearTie);
}

// Launch-ahead on the GPU (StepExecutor::Submit; the engine keeps two plans in flight): the next
// step's forward pass launched before the host has the last draw, its input ids taken from that
// draw on the device, gives the tokens of steps launched one after the other, greedy and seeded
// sampling with penalties alike (one model for both runs, so one set of timed matmul choices).
TEST(CudaModelRunnerTest, LaunchAheadDrawsWhatStepsOneAfterTheOtherDraw) {
  REQUIRE_TINY_LLAMA();
  if (!HaveCudaDevices(1)) GTEST_SKIP() << "no CUDA device";
  auto backend = CreateBackend(BackendOptions{BackendKind::kCuda});
  ASSERT_OK(backend);
  auto m = LoadModel({::lorc::testing::TinyLlamaDir()}, backend->get(), 0, 1, nullptr, SmallCache());
  ASSERT_OK(m);
  std::vector<GenerationRequest> reqs = GreedyRequests();
  const size_t golden = reqs.size();
  for (size_t i = 0; i < golden; ++i) {
    GenerationRequest r = reqs[i];
    r.params.temperature = 0.8f;
    r.params.top_p = 0.9f;
    r.params.repetition_penalty = 1.2f;
    r.params.seed = 11 + i;
    reqs.push_back(r);
  }
  StepExecutor ahead(m->runner.get());
  const std::vector<GenerationResult> got = Generate(&ahead, *m, reqs);
  EXPECT_GT(ahead.num_launched_ahead(), kGreedyTokens / 2);
  setenv("LORC_DISABLE_LAUNCH_AHEAD", "1", 1);
  StepExecutor plain(m->runner.get());
  unsetenv("LORC_DISABLE_LAUNCH_AHEAD");
  const std::vector<GenerationResult> want = Generate(&plain, *m, reqs);
  EXPECT_EQ(plain.num_launched_ahead(), 0);
  ASSERT_EQ(got.size(), reqs.size());
  ASSERT_EQ(want.size(), reqs.size());
  for (size_t i = 0; i < reqs.size(); ++i) {
    EXPECT_EQ(got[i].first().output_ids, want[i].first().output_ids) << "request " << i;
    EXPECT_EQ(got[i].first().output_ids.size(), size_t{kGreedyTokens}) << "request " << i;
  }
}

// The same with every residual add + RMSNorm of decode steps (the engine batches the golden
// prompts: 4 sequences) run inside the projection after it (BackendOptions::fused_norm_rows; off
// by default: measured slower, backend/cuda_gemv.h). The fused kernels round the normed input in
// another order (kernels/gemv.cuh), so the same near-tie allowance as the unfused path.
TEST(CudaModelRunnerTest, GreedyWithNormsFusedIntoTheGemvsMatchesCpuReference) {
  REQUIRE_TINY_LLAMA();
  if (!HaveCudaDevices(1)) GTEST_SKIP() << "no CUDA device";
  const auto cpu = GenerateOn(BackendKind::kCpu, GreedyRequests());
  {
    BackendOptions bo{BackendKind::kCuda};
    bo.fused_norm_rows = 8;
    auto backend = CreateBackend(bo);
    ASSERT_OK(backend);
    EXPECT_TRUE((*backend)->FusesNormMatmul(1));
    EXPECT_TRUE((*backend)->FusesNormMatmul(8));
    EXPECT_FALSE((*backend)->FusesNormMatmul(9));
  }
  const auto cuda = GenerateOn(BackendKind::kCuda, GreedyRequests(), /*fused_norm_rows=*/8);
  ASSERT_EQ(cpu.size(), ::lorc::testing::GoldenPrompts().size());
  ExpectSameGreedy(cuda, cpu, "cuda (fused norms) vs cpu", kBf16NearTie);
}

// The same with the RMSNorm weights folded into the qkv and gate_up projections (folded norms,
// backend/cuda_gemv.h SetCudaFoldedNorms; off by default): decode steps of up to 8 tokens take
// each row's rms from the o / down GEMVs' partial sums of squares, every other norm runs with a
// unit weight over the folded weights (prefill included). The folded weights are rounded once
// (W diag(g)) where the reference rounds the normed input: the same near-tie allowance.
TEST(CudaModelRunnerTest, GreedyWithFoldedNormsMatchesCpuReference) {
  REQUIRE_TINY_LLAMA();
  if (!HaveCudaDevices(1)) GTEST_SKIP() << "no CUDA device";
  const auto cpu = GenerateOn(BackendKind::kCpu, GreedyRequests());
  const bool saved = GetCudaFoldedNorms();
  SetCudaFoldedNorms(true);
  const auto cuda = GenerateOn(BackendKind::kCuda, GreedyRequests(), -1, /*fold_rows=*/8);
  SetCudaFoldedNorms(saved);
  ASSERT_EQ(cpu.size(), ::lorc::testing::GoldenPrompts().size());
  ExpectSameGreedy(cuda, cpu, "cuda (folded norms) vs cpu", kBf16NearTie);
}

TEST(CudaModelRunnerTest, PromptLogprobsComeBackFromTheDevice) {
  REQUIRE_TINY_LLAMA();
  if (!HaveCudaDevices(1)) GTEST_SKIP() << "no CUDA device";
  const auto cpu = GenerateOn(BackendKind::kCpu, GreedyRequests(/*prompt_logprobs=*/1));
  const auto cuda = GenerateOn(BackendKind::kCuda, GreedyRequests(/*prompt_logprobs=*/1));
  // The first step's 42 all-token rows take three LM-head passes of 16 (SmallCache): the sampler
  // reads each sequence's last row brought back to the device.
  ExpectSameGreedy(cuda, cpu, "cuda vs cpu, with prompt logprobs", kBf16NearTie);
  for (size_t i = 0; i < cpu.size(); ++i) {
    ASSERT_EQ(cuda[i].prompt_logprobs.size(), cpu[i].prompt_logprobs.size()) << i;
    ASSERT_EQ(cpu[i].prompt_logprobs.size(), cpu[i].prompt_tokens - 1) << i;
    for (size_t j = 0; j < cpu[i].prompt_logprobs.size(); ++j) {
      // BF16 activations against F32: log-probabilities agree to a few hundredths.
      EXPECT_NEAR(cuda[i].prompt_logprobs[j].logprob, cpu[i].prompt_logprobs[j].logprob, 0.25)
          << "prompt " << i << " position " << j + 1;
    }
  }
}

// Tensor parallelism 2 in one process: rank 1 sets up its backend, communicator and model on its
// own thread (the CUDA backend is used by the thread that made it) and executes every plan rank 0
// submits, at the same time (their collectives pair up).
class TwoRanks final : public StepRunner {
 public:
  TwoRanks(BackendKind kind, bool shard_lm_head) : kind_(kind), shard_(shard_lm_head) {
    rank1_ = std::thread([this] { RankOne(); });
    setup_status_ = SetUp(0, &backend0_, &comm0_, &model0_);
    if (setup_status_.ok()) exec0_ = std::make_unique<StepExecutor>(model0_.runner.get(), comm0_.get());
  }
  ~TwoRanks() override {
    Stop();
    exec0_.reset();
    model0_ = LoadedModel();
    comm0_.reset();
  }
  const absl::Status& setup_status() const { return setup_status_; }
  const LoadedModel& model() const { return model0_; }
  absl::Status rank1_status() {
    std::lock_guard<std::mutex> l(mu_);
    return rank1_status_;
  }
  // Rank 1's decode steps replayed from CUDA graphs (set when the rank's thread ends).
  int64_t rank1_graph_steps() {
    std::lock_guard<std::mutex> l(mu_);
    return rank1_graph_steps_;
  }
  void Stop() {
    {
      std::lock_guard<std::mutex> l(mu_);
      if (done_) return;
      done_ = true;
    }
    cv_.notify_all();
    rank1_.join();
  }

  absl::Status Submit(const StepPlan& plan) override {
    {
      std::lock_guard<std::mutex> l(mu_);
      plans_.push_back(plan);
    }
    cv_.notify_all();
    results_.push_back(exec0_->Execute(plan));
    return absl::OkStatus();
  }
  absl::StatusOr<StepResult> Await() override {
    if (results_.empty()) return absl::FailedPreconditionError("no step in flight");
    absl::StatusOr<StepResult> r = std::move(results_.front());
    results_.pop_front();
    return r;
  }
  int max_in_flight() const override { return 1; }

 private:
  absl::Status SetUp(int rank, std::unique_ptr<Backend>* backend, std::unique_ptr<Communicator>* comm,
                     LoadedModel* model) {
    BackendOptions bo;
    bo.kind = kind_;
    bo.device = kind_ == BackendKind::kCuda ? rank : 0;
    ASSIGN_OR_RETURN(*backend, CreateBackend(bo));
    CommOptions o;
    o.group = "tp";
    o.hostname_or_iface = "127.0.0.1";
    o.join_timeout = absl::Seconds(60);
    o.op_timeout = absl::Seconds(120);
    if (kind_ == BackendKind::kCuda) {
      ASSIGN_OR_RETURN(*comm, CreateNcclCommunicator({rank, 2}, &store_, rank, (*backend)->stream_handle(), o));
    } else {
      ASSIGN_OR_RETURN(*comm, CreateGlooCommunicator({rank, 2}, &store_, o));
    }
    ModelSource src{::lorc::testing::TinyLlamaDir()};
    src.shard_lm_head = shard_;
    ASSIGN_OR_RETURN(*model, LoadModel(src, backend->get(), rank, 2, comm->get(), SmallCache()));
    return absl::OkStatus();
  }

  void RankOne() {
    std::unique_ptr<Backend> backend;
    std::unique_ptr<Communicator> comm;
    LoadedModel model;
    absl::Status s = SetUp(1, &backend, &comm, &model);
    std::unique_ptr<StepExecutor> exec;
    if (s.ok()) exec = std::make_unique<StepExecutor>(model.runner.get(), comm.get());
    for (;;) {
      StepPlan plan;
      {
        std::unique_lock<std::mutex> l(mu_);
        if (rank1_status_.ok()) rank1_status_ = s;  // set-up or the previous plan
        cv_.wait(l, [&] { return done_ || !plans_.empty(); });
        if (plans_.empty()) break;
        plan = std::move(plans_.front());
        plans_.pop_front();
      }
      if (s.ok()) s = exec->Execute(plan).status();
      std::lock_guard<std::mutex> l(mu_);
      if (rank1_status_.ok()) rank1_status_ = s;
    }
    {
      std::lock_guard<std::mutex> l(mu_);
      rank1_graph_steps_ = model.runner != nullptr ? model.runner->num_graph_steps() : 0;
    }
    exec.reset();
    model = LoadedModel();
    comm.reset();
  }

  BackendKind kind_;
  bool shard_;
  InProcessStore store_;
  std::unique_ptr<Backend> backend0_;
  std::unique_ptr<Communicator> comm0_;
  LoadedModel model0_;
  std::unique_ptr<StepExecutor> exec0_;
  absl::Status setup_status_;
  std::deque<absl::StatusOr<StepResult>> results_;
  std::thread rank1_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<StepPlan> plans_;  // guarded by mu_
  bool done_ = false;           // guarded by mu_
  absl::Status rank1_status_;   // guarded by mu_
  int64_t rank1_graph_steps_ = 0;  // guarded by mu_
};

void ExpectTwoRanksMatch(BackendKind kind, bool shard_lm_head,
                         const std::vector<GenerationRequest>& reqs,
                         const std::vector<GenerationResult>& want, float near_tie) {
  TwoRanks tp(kind, shard_lm_head);
  ASSERT_OK(tp.setup_status());
  const auto got = Generate(&tp, tp.model(), reqs);
  EXPECT_OK(tp.rank1_status());
  ExpectSameGreedy(got, want, shard_lm_head ? "tp=2, sharded LM head" : "tp=2", near_tie);
  if (kind == BackendKind::kCuda) {
    // Both ranks replayed decode graphs, the same steps (rank 1 samples nothing: its steps ask
    // for no logits, yet it must take the graph rank 0 takes, or their all-reduces differ).
    tp.Stop();
    const int64_t rank0 = tp.model().runner->num_graph_steps();
    EXPECT_GT(rank0, 0);
    EXPECT_EQ(tp.rank1_graph_steps(), rank0);
  }
}

// Prompt log-probabilities make the first step's 42 all-token rows take three LM-head passes of
// 16 rows (SmallCache's max_num_seqs); the sampler then reads each sequence's last row brought
// back to backend memory. Greedy tokens must equal those of one-pass steps exactly.
TEST(ModelRunnerLogitsTest, CpuSamplingAfterSeveralLmHeadPassesMatchesOnePass) {
  REQUIRE_TINY_LLAMA();
  const auto one_pass = GenerateOn(BackendKind::kCpu, GreedyRequests());
  const auto passes = GenerateOn(BackendKind::kCpu, GreedyRequests(/*prompt_logprobs=*/1));
  ASSERT_EQ(passes.size(), 4u);
  EXPECT_EQ(passes[2].prompt_logprobs.size(), 16u);  // the 17-token prompt
  ExpectSameGreedy(passes, one_pass, "several LM-head passes vs one");
}

TEST(TensorParallelModelTest, CpuTwoRanksMatchOneIncludingShardedLmHead) {
  REQUIRE_TINY_LLAMA();
  const auto want = GenerateOn(BackendKind::kCpu, GreedyRequests());
  ExpectTwoRanksMatch(BackendKind::kCpu, /*shard_lm_head=*/true, GreedyRequests(), want, /*near_tie=*/0.0f);
}

// Two GPUs from one process, decode steps as CUDA graphs with the all-reduces captured. Five
// sequences (one stops early): decode batches of 5 and 4, so rank 0 replays the padded graph of 8
// rows while rank 1, which samples nothing, must replay it too (it once ran 5 rows eagerly and the
// two ranks' all-reduces never matched: the TP = 2 hang under load, now fixed in
// DecodeGraphIndex and tested on the CPU by DecodeGraphIndexTest).
// DISABLED: two GPUs driven from one process still hang on 2 x H200 (2026-12-01, with the
// sampler's buffers reserved up front and never freed while serving, CUDA_MODULE_LOADING=EAGER),
// while the same TP = 2 model serves from one process per GPU, the supported layout
// (scripts/gpu/check.sh, phase serve). The remaining suspect: a thread's pinned or device
// allocation (step buffers at load, CUB temporaries) synchronising with the other thread's GPU
// while that GPU spins in a collective waiting for this thread. Run with
// --gtest_also_run_disabled_tests and a timeout.
TEST(TensorParallelModelTest, DISABLED_CudaTwoRanksOverNcclMatchCpuReference) {
  REQUIRE_TINY_LLAMA();
  if (!HaveCudaDevices(2)) GTEST_SKIP() << "fewer than 2 CUDA devices";
  std::vector<GenerationRequest> reqs = GreedyRequests();
  GenerationRequest extra = reqs[1];
  extra.params.max_tokens = kGreedyTokens / 2;
  reqs.push_back(extra);
  const auto want = GenerateOn(BackendKind::kCpu, reqs);
  for (bool shard : {false, true}) ExpectTwoRanksMatch(BackendKind::kCuda, shard, reqs, want, kBf16NearTie);
}

}  // namespace
}  // namespace lorc
