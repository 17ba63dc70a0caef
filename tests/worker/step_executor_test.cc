// StepExecutor with hand-built plans over the fixture model: parallel sampling (forks sharing the
// prompt's blocks, copy-on-write), log-probabilities in the step result, the extreme sampling
// values of issue #7, per-request validation of the fork fields, and forking under tensor
// parallelism.
#include "worker/step_executor.h"

#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <memory>
#include <set>
#include <thread>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "common/check.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/fixture_model.h"
#include "tests/testing/fixtures.h"
#include "tests/testing/golden.h"
#include "tests/testing/status_matchers.h"
#include "worker/comm/communicator.h"
#include "worker/comm/rendezvous.h"
#include "worker/model_loader.h"
#include "model/safetensors.h"
#include "model/safetensors_writer.h"
#include "tests/testing/scratch_dir.h"

namespace lorc {
namespace {

using ::lorc::testing::GoldenPrompts;
using ::lorc::testing::StatusIs;
using ::testing::AllOf;
using ::testing::HasSubstr;

constexpr int32_t kBlockSize = 16;

// Builds plans the way a scheduler would (block ids from a counter), independent of any
// executor, so that the same plans can run on every tensor-parallel rank.
class PlanBuilder {
 public:
  // First sight: the whole prompt, its blocks, sample; `children` fork from it (params.n must be
  // children + 1 for a valid plan).
  ScheduledSequence Prefill(int64_t id, const std::vector<int32_t>& prompt, SamplingParams params,
                            std::vector<int64_t> children = {}) {
    ScheduledSequence s;
    s.seq_id = id;
    s.new_token_ids = prompt;
    s.num_scheduled_tokens = static_cast<int32_t>(prompt.size());
    s.sample = true;
    s.params = std::move(params);
    s.fork_child_ids = children;
    Seq& q = seqs_[id];
    while (static_cast<int64_t>(q.table.size()) * kBlockSize < static_cast<int64_t>(prompt.size())) {
      q.table.push_back(next_block_);
      s.new_block_ids.push_back(next_block_++);
    }
    q.computed = static_cast<int64_t>(prompt.size());
    // Shared blocks. A copy first: inserting a child may rehash the map under a reference to q.
    const Seq parent = q;
    for (int64_t c : children) seqs_[c] = parent;
    return s;
  }
  // One decode token; `cow`: copy the (shared) last block into a fresh one first.
  ScheduledSequence Decode(int64_t id, StepPlan* plan, bool cow = false) {
    Seq& q = seqs_[id];
    ScheduledSequence s;
    s.seq_id = id;
    s.num_computed_tokens = q.computed;
    s.num_scheduled_tokens = 1;
    s.sample = true;
    if (cow) {
      plan->copies.push_back({q.table.back(), next_block_});
      s.replace_last_block = next_block_;
      q.table.back() = next_block_++;
    }
    if (q.computed + 1 > static_cast<int64_t>(q.table.size()) * kBlockSize) {
      q.table.push_back(next_block_);
      s.new_block_ids.push_back(next_block_++);
    }
    ++q.computed;
    return s;
  }
  StepPlan NewPlan() {
    StepPlan p;
    p.step_id = ++step_id_;
    return p;
  }

 private:
  struct Seq {
    int64_t computed = 0;
    std::vector<int32_t> table;
  };
  absl::flat_hash_map<int64_t, Seq> seqs_;
  int32_t next_block_ = 0;
  uint64_t step_id_ = 0;
};

// The plans of: every request of `prefills` (one step), then `decode_steps` decode steps of every
// request and fork child; children copy their shared last block on their first decode.
std::vector<StepPlan> PrefillThenDecode(PlanBuilder& b, std::vector<ScheduledSequence> prefills,
                                        int decode_steps) {
  std::vector<StepPlan> plans(1, b.NewPlan());
  std::vector<int64_t> ids, children;
  for (ScheduledSequence& s : prefills) {
    ids.push_back(s.seq_id);
    children.insert(children.end(), s.fork_child_ids.begin(), s.fork_child_ids.end());
    plans[0].seqs.push_back(std::move(s));
  }
  for (int step = 0; step < decode_steps; ++step) {
    StepPlan p = b.NewPlan();
    for (int64_t id : ids) p.seqs.push_back(b.Decode(id, &p));
    for (int64_t id : children) p.seqs.push_back(b.Decode(id, &p, /*cow=*/step == 0));
    plans.push_back(std::move(p));
  }
  return plans;
}

SamplingParams Params(float temperature, std::optional<uint64_t> seed = std::nullopt, int32_t n = 1) {
  SamplingParams p;
  p.temperature = temperature;
  p.seed = seed;
  p.n = n;
  p.max_tokens = 64;
  return p;
}

constexpr char kScratch[] = "lorc_step_executor";
const auto* const kCleanup =
    ::testing::AddGlobalTestEnvironment(new ::lorc::testing::ScratchCleanup(kScratch));

// A copy of the fixture model whose embedding row `token` is NaN: a sequence with that token
// gets NaN logits from then on (attention spreads it to every later position), the others are
// untouched (the LM head is a separate tensor).
std::string PoisonedFixture(int32_t token) {
  const std::filesystem::path dir = ::lorc::testing::MakeScratchDir(kScratch, "nan-embedding");
  const std::string src_dir = ::lorc::testing::TinyLlamaDir();
  std::filesystem::copy_file(src_dir + "/config.json", dir / "config.json");
  auto src = CheckpointReader::Open(src_dir);
  CHECK_OK(src.status());
  std::vector<TensorToWrite> tensors;
  for (const std::string& name : (*src)->TensorNames()) {
    auto info = (*src)->Find(name);
    CHECK_OK(info.status());
    std::vector<float> v(static_cast<size_t>((*info)->numel()));
    CHECK_OK((*src)->ReadF32(name, (*info)->shape, absl::MakeSpan(v)));
    if (name == "model.embed_tokens.weight") {
      const int64_t hidden = (*info)->shape[1];
      for (int64_t c = 0; c < hidden; ++c) v[token * hidden + c] = std::numeric_limits<float>::quiet_NaN();
    }
    TensorToWrite t{name, DType::kBF16, (*info)->shape, {}};
    CHECK_OK(EncodeF32(v, DType::kBF16, &t.bytes));
    tensors.push_back(std::move(t));
  }
  CHECK_OK(WriteSafetensors((dir / "model.safetensors").string(), tensors));
  return dir.string();
}

KvCacheOptions SmallCache() {
  KvCacheOptions kv;
  kv.block_size = kBlockSize;
  kv.memory_bytes = 64ll << 20;
  return kv;
}

class StepExecutorTest : public ::lorc::testing::FixtureModelTest<> {
 protected:
  void SetUp() override {
    ASSERT_NO_FATAL_FAILURE(FixtureModelTest::SetUp());
    ASSERT_OK(LoadFixtureModel(SmallCache()));
    prompt_ = GoldenPrompts()[1].prompt_ids;  // 12 tokens: the last block is shared, partly full
    greedy_ = GoldenPrompts()[1].greedy_ids;
  }

  std::vector<StepResult> RunAll(const std::vector<StepPlan>& plans) {
    std::vector<StepResult> results;
    for (const StepPlan& p : plans) {
      auto r = exec_->Execute(p);
      EXPECT_OK(r);
      if (!r.ok()) break;
      EXPECT_TRUE(r->failed.empty()) << r->failed[0].status;
      results.push_back(*std::move(r));
    }
    return results;
  }

  // What `id` generated after the prompt.
  std::vector<int32_t> Generated(int64_t id) {
    std::vector<int32_t> t = exec_->Tokens(id);
    return {t.begin() + static_cast<ptrdiff_t>(std::min(t.size(), prompt_.size())), t.end()};
  }

  std::vector<int32_t> prompt_, greedy_;
};

TEST_F(StepExecutorTest, ForkedGreedyChildrenDecodeLikeThePlainRequest) {
  PlanBuilder b;
  const auto plans = PrefillThenDecode(b, {b.Prefill(10, prompt_, Params(0.0f, {}, 3), {11, 12})},
                                       /*decode_steps=*/8);
  ASSERT_EQ(plans[1].copies.size(), 2u);  // both children copy the shared block on write
  const std::vector<StepResult> results = RunAll(plans);
  ASSERT_EQ(results.size(), plans.size());
  // The forking step samples the parent, then its children, from the same row.
  ASSERT_EQ(results[0].sampled.size(), 3u);
  EXPECT_EQ(results[0].sampled[0].seq_id, 10);
  EXPECT_EQ(results[0].sampled[1].seq_id, 11);
  EXPECT_EQ(results[0].sampled[2].seq_id, 12);
  const std::vector<int32_t> want(greedy_.begin(), greedy_.begin() + 9);
  for (int64_t id : {10, 11, 12}) EXPECT_EQ(Generated(id), want) << "sequence " << id;
  EXPECT_EQ(exec_->num_sequences(), 3u);
}

TEST_F(StepExecutorTest, SeededChildrenFollowSeedPlusIndexAndDiffer) {
  // Completion i of a fork samples as a plain request seeded with seed + i would.
  PlanBuilder b;
  std::vector<ScheduledSequence> prefills = {b.Prefill(20, prompt_, Params(1.0f, 5, 4), {21, 22, 23})};
  for (int i = 0; i < 4; ++i) prefills.push_back(b.Prefill(30 + i, prompt_, Params(1.0f, 5 + i)));
  RunAll(PrefillThenDecode(b, std::move(prefills), /*decode_steps=*/10));
  std::set<std::vector<int32_t>> distinct;
  for (int i = 0; i < 4; ++i) {
    const std::vector<int32_t> got = Generated(20 + i);
    ASSERT_EQ(got.size(), 11u);
    EXPECT_EQ(got, Generated(30 + i)) << "completion " << i;
    distinct.insert(got);
  }
  EXPECT_GE(distinct.size(), 3u) << "seeded children should not repeat each other";
}

// Launch-ahead (StepExecutor::Submit): the same plans submitted two at a time, each step's forward
// pass launched before the step before has finished its draw, give the results of one step at a
// time: greedy, seeded sampling with penalties (which read the whole history) and a fork (the
// step of its children's first decode copies blocks and names children not yet made: that one is
// not launched ahead).
TEST_F(StepExecutorTest, LaunchAheadGivesTheResultsOfOneStepAtATime) {
  SamplingParams penalized = Params(0.9f, 17);
  penalized.top_p = 0.9f;
  penalized.repetition_penalty = 1.3f;
  penalized.presence_penalty = 0.5f;
  PlanBuilder b;
  const std::vector<StepPlan> plans = PrefillThenDecode(
      b, {b.Prefill(1, prompt_, Params(0.0f)), b.Prefill(2, prompt_, penalized), b.Prefill(3, prompt_, Params(1.0f, 5, 2), {4})},
      /*decode_steps=*/12);
  const std::vector<StepResult> want = RunAll(plans);
  ASSERT_EQ(want.size(), plans.size());
  std::vector<std::vector<int32_t>> want_tokens;
  for (int64_t id = 1; id <= 4; ++id) want_tokens.push_back(exec_->Tokens(id));

  StepExecutor ahead(model_.runner.get(), nullptr, /*max_in_flight=*/2);
  std::vector<StepResult> got;
  ASSERT_OK(ahead.Submit(plans[0]));
  for (size_t i = 1; i <= plans.size(); ++i) {
    if (i < plans.size()) {
      ASSERT_OK(ahead.Submit(plans[i]));
    }
    absl::StatusOr<StepResult> r = ahead.Await();
    ASSERT_OK(r);
    got.push_back(*std::move(r));
  }
  EXPECT_EQ(ahead.num_launched_ahead(), static_cast<int64_t>(plans.size()) - 2);
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i) {
    EXPECT_EQ(got[i].step_id, want[i].step_id);
    EXPECT_TRUE(got[i].failed.empty()) << "step " << i << ": " << got[i].failed[0].status;
    ASSERT_EQ(got[i].sampled.size(), want[i].sampled.size()) << "step " << i;
    for (size_t j = 0; j < got[i].sampled.size(); ++j) {
      EXPECT_EQ(got[i].sampled[j].seq_id, want[i].sampled[j].seq_id) << "step " << i;
      EXPECT_EQ(got[i].sampled[j].token, want[i].sampled[j].token) << "step " << i << ", draw " << j;
    }
  }
  for (int64_t id = 1; id <= 4; ++id) EXPECT_EQ(ahead.Tokens(id), want_tokens[id - 1]) << "sequence " << id;
  // Execute refuses while a submitted step is not awaited.
  ASSERT_OK(ahead.Submit(b.NewPlan()));
  EXPECT_THAT(ahead.Execute(b.NewPlan()), StatusIs(absl::StatusCode::kFailedPrecondition));
}

// A fork's children are made when its draw finishes, from the parent's state: a plan that
// schedules the parent alone while that draw is pending is not launched ahead (it would commit
// the parent's next token before the children copy it), so the children start where the plans
// say (a prompt of whole blocks: the parent's next token takes a new block, no copy-on-write).
TEST_F(StepExecutorTest, APlanWithTheParentAloneDoesNotRunAheadOfItsFork) {
  std::vector<int32_t> prompt16 = prompt_;
  prompt16.resize(16, prompt_.back());
  PlanBuilder b;
  StepPlan p0 = b.NewPlan();
  p0.seqs.push_back(b.Prefill(10, prompt16, Params(0.0f, {}, 3), {11, 12}));
  StepPlan p1 = b.NewPlan();
  p1.seqs.push_back(b.Decode(10, &p1));
  ASSERT_TRUE(p1.copies.empty());
  StepPlan p2 = b.NewPlan();
  for (int64_t id : {10, 11, 12}) p2.seqs.push_back(b.Decode(id, &p2));
  ASSERT_OK(exec_->Submit(p0));
  ASSERT_OK(exec_->Submit(p1));
  EXPECT_EQ(exec_->num_launched_ahead(), 0);
  absl::StatusOr<StepResult> r = exec_->Await();
  ASSERT_OK(r);
  EXPECT_TRUE(r->failed.empty()) << r->failed[0].status;
  ASSERT_OK(exec_->Submit(p2));
  r = exec_->Await();
  ASSERT_OK(r);
  EXPECT_TRUE(r->failed.empty()) << r->failed[0].status;
  r = exec_->Await();
  ASSERT_OK(r);
  EXPECT_TRUE(r->failed.empty()) << r->failed[0].status;
  EXPECT_EQ(r->sampled.size(), 3u);
  EXPECT_EQ(exec_->Tokens(10).size(), 16u + 3);
  for (int64_t id : {11, 12}) EXPECT_EQ(exec_->Tokens(id).size(), 16u + 2) << "sequence " << id;
}

TEST_F(StepExecutorTest, ExtremeTemperaturesOfIssue7AreGreedy) {
  // `generate --temperature 1e-38 --seed 1` returned ids 4095, 4093, ... (logits / T overflowed).
  PlanBuilder b;
  SamplingParams tiny = Params(1e-38f, 1);
  SamplingParams tiny_k1 = tiny;
  tiny_k1.top_k = 1;
  SamplingParams hot_k1 = Params(3e38f, 1);
  hot_k1.top_k = 1;
  SamplingParams hot_p = Params(1.0f, 1);
  hot_p.top_p = 1e-38f;
  hot_p.repetition_penalty = 3e38f;  // the penalised tokens drop out; still finite
  RunAll(PrefillThenDecode(b, {b.Prefill(1, prompt_, tiny), b.Prefill(2, prompt_, tiny_k1),
                               b.Prefill(3, prompt_, hot_k1), b.Prefill(4, prompt_, Params(3e38f, 1)),
                               b.Prefill(5, prompt_, hot_p)},
                           /*decode_steps=*/7));
  const std::vector<int32_t> want(greedy_.begin(), greedy_.begin() + 8);
  for (int64_t id : {1, 2, 3}) EXPECT_EQ(Generated(id), want) << "sequence " << id;
  for (int64_t id : {4, 5}) {
    for (int32_t t : Generated(id)) {
      EXPECT_GE(t, 0);
      EXPECT_LT(t, model_.config.vocab_size);
    }
  }
}

TEST_F(StepExecutorTest, MinTokensSuppressesTheModelsEosAndStopIds) {
  // The fixture's EOS id is 1 (config.json). Bias it (request 1) or stop id 264 (request 3) so
  // that greedy picks it whenever it is allowed.
  ASSERT_EQ(model_.config.eos_token_ids, std::vector<int64_t>{1});
  SamplingParams eos = Params(0.0f);
  eos.min_tokens = 3;
  eos.stop_token_ids = {264};
  eos.logit_bias = {{1, 100.0f}};
  SamplingParams ignore = eos;
  ignore.ignore_eos = true;
  SamplingParams stop = eos;
  stop.logit_bias = {{264, 100.0f}};
  PlanBuilder b;
  RunAll(PrefillThenDecode(
      b, {b.Prefill(1, prompt_, eos), b.Prefill(2, prompt_, ignore), b.Prefill(3, prompt_, stop)}, 3));
  for (int64_t id : {1, 3}) {
    const int32_t held = id == 1 ? 1 : 264;
    const std::vector<int32_t> got = Generated(id);
    ASSERT_EQ(got.size(), 4u);
    for (int i = 0; i < 3; ++i) EXPECT_NE(got[i], held) << "sequence " << id << " token " << i;
    EXPECT_EQ(got[3], held) << "sequence " << id;
  }
  // ignore_eos: EOS is no stop, so nothing holds it back.
  EXPECT_EQ(Generated(2), (std::vector<int32_t>{1, 1, 1, 1}));
}

TEST_F(StepExecutorTest, SampledAndPromptLogprobsWithRankAndTopN) {
  PlanBuilder b;
  SamplingParams p = Params(0.0f);
  p.logprobs = 5;
  p.prompt_logprobs = 3;
  SamplingParams own = Params(0.0f);
  own.logprobs = 0;
  const auto results = RunAll(PrefillThenDecode(
      b, {b.Prefill(1, prompt_, p), b.Prefill(2, prompt_, own), b.Prefill(3, prompt_, Params(0.0f))},
      1));
  ASSERT_EQ(results.size(), 2u);
  for (const StepResult& r : results) {
    ASSERT_EQ(r.sampled.size(), 3u);
    const SampledToken& t = r.sampled[0];
    ASSERT_TRUE(t.logprobs.has_value());
    EXPECT_EQ(t.logprobs->rank, 1);  // greedy: the most likely token
    ASSERT_EQ(t.logprobs->top_ids.size(), 5u);
    ASSERT_EQ(t.logprobs->top_logprobs.size(), 5u);
    EXPECT_EQ(t.logprobs->top_ids[0], t.token);
    EXPECT_EQ(t.logprobs->top_logprobs[0], t.logprobs->logprob);
    for (size_t j = 1; j < 5; ++j) {
      EXPECT_GE(t.logprobs->top_logprobs[j - 1], t.logprobs->top_logprobs[j]);
    }
    EXPECT_LT(t.logprobs->logprob, 0.0f);
    ASSERT_TRUE(r.sampled[1].logprobs.has_value());
    EXPECT_TRUE(r.sampled[1].logprobs->top_ids.empty());
    // Same prompt, another row of the batch: a threaded OpenBLAS may split the rows' GEMM work
    // differently (last bits only), so equal within 1e-5 nats rather than bit for bit.
    EXPECT_NEAR(r.sampled[1].logprobs->logprob, t.logprobs->logprob, 1e-5f);
    EXPECT_FALSE(r.sampled[2].logprobs.has_value());
  }
  ASSERT_EQ(results[0].prompt_logprobs.size(), 1u);
  const PromptLogprobs& pl = results[0].prompt_logprobs[0];
  EXPECT_EQ(pl.first_position, 1);
  ASSERT_EQ(pl.logprobs.size(), prompt_.size() - 1);
  for (size_t i = 0; i < pl.logprobs.size(); ++i) {
    const TokenLogprobs& t = pl.logprobs[i];
    ASSERT_EQ(t.top_ids.size(), 3u);
    EXPECT_GE(t.rank, 1);
    EXPECT_LE(t.logprob, t.top_logprobs[0]);
    if (t.rank == 1) {
      EXPECT_EQ(t.top_ids[0], prompt_[i + 1]);
    }
    if (t.rank <= 3) {
      EXPECT_EQ(t.top_ids[t.rank - 1], prompt_[i + 1]) << i;
    }
  }
  EXPECT_TRUE(results[1].prompt_logprobs.empty());
}

TEST_F(StepExecutorTest, BadForksAndCopyOnWriteFieldsFailTheirRequestAlone) {
  PlanBuilder b;
  StepPlan p = b.NewPlan();
  p.seqs.push_back(b.Prefill(1, prompt_, Params(0.0f, {}, 2), {2}));      // valid
  p.seqs.push_back(b.Prefill(5, prompt_, Params(0.0f, {}, 3), {6}));      // n = 3, one child
  p.seqs.push_back(b.Prefill(7, prompt_, Params(0.0f, {}, 2), {1}));      // child 1 is a request
  ScheduledSequence no_sample = b.Prefill(8, prompt_, Params(0.0f, {}, 2), {9});
  no_sample.sample = false;
  p.seqs.push_back(no_sample);
  ScheduledSequence cow_empty = b.Prefill(12, prompt_, Params(0.0f));
  cow_empty.replace_last_block = 100;  // a first sight has no table to replace in
  p.seqs.push_back(cow_empty);
  auto r = exec_->Execute(p);
  ASSERT_OK(r);
  absl::flat_hash_map<int64_t, std::string> failed;
  for (const FailedSequence& f : r->failed) failed[f.seq_id] = std::string(f.status.message());
  ASSERT_EQ(failed.size(), 4u);
  EXPECT_THAT(failed[5], HasSubstr("forks 1 children but its n is 3"));
  EXPECT_THAT(failed[7], HasSubstr("fork child 1 occurs 2 times"));
  EXPECT_THAT(failed[8], HasSubstr("forks only on the step that samples"));
  EXPECT_THAT(failed[12], HasSubstr("replace_last_block 100 but its block table is empty"));
  ASSERT_EQ(r->sampled.size(), 2u);
  EXPECT_EQ(r->sampled[1].seq_id, 2);
  EXPECT_EQ(exec_->num_sequences(), 2u);  // 1 and its child 2

  // A child id this worker already holds.
  StepPlan q = b.NewPlan();
  q.seqs.push_back(b.Prefill(20, prompt_, Params(0.0f, {}, 2), {2}));
  r = exec_->Execute(q);
  ASSERT_OK(r);
  ASSERT_EQ(r->failed.size(), 1u);
  EXPECT_THAT(r->failed[0].status.message(), HasSubstr("fork child 2 is already known"));
  EXPECT_EQ(r->failed[0].status.code(), absl::StatusCode::kFailedPrecondition);
}

// NaN weights used to give token 0 with log-probability 0 (NaN counted as -inf everywhere):
// now the request whose logits are broken fails alone, naming the position, its fork children
// unmade; the others in the same step sample as before.
TEST_F(StepExecutorTest, NonFiniteLogitsFailTheirRequestAlone) {
  constexpr int32_t kPoison = 7;
  ASSERT_EQ(std::count(prompt_.begin(), prompt_.end(), kPoison), 0);
  ASSERT_OK(LoadFixtureModel(SmallCache(), PoisonedFixture(kPoison)));
  std::vector<int32_t> broken = prompt_;
  broken.insert(broken.begin() + 3, kPoison);  // NaN from position 3 on
  PlanBuilder b;
  StepPlan p = b.NewPlan();
  SamplingParams lp = Params(0.0f);
  lp.logprobs = 2;
  p.seqs.push_back(b.Prefill(1, prompt_, lp));
  p.seqs.push_back(b.Prefill(2, broken, lp));
  p.seqs.push_back(b.Prefill(3, broken, Params(1.0f, 9, 3), {4, 5}));  // sampled, forked
  auto r = exec_->Execute(p);
  ASSERT_OK(r);
  absl::flat_hash_map<int64_t, absl::Status> failed;
  for (const FailedSequence& f : r->failed) failed[f.seq_id] = f.status;
  ASSERT_EQ(failed.size(), 2u);
  for (int64_t id : {2, 3}) {
    EXPECT_THAT(failed[id], StatusIs(absl::StatusCode::kInternal,
                                     AllOf(HasSubstr("at position 13"), HasSubstr("NaN or infinite"))))
        << "sequence " << id;
  }
  ASSERT_EQ(r->sampled.size(), 1u);
  EXPECT_EQ(r->sampled[0].seq_id, 1);
  EXPECT_EQ(r->sampled[0].token, greedy_[0]);
  ASSERT_TRUE(r->sampled[0].logprobs.has_value());
  EXPECT_TRUE(std::isfinite(r->sampled[0].logprobs->logprob));
  EXPECT_LT(r->sampled[0].logprobs->logprob, 0.0f);
  EXPECT_EQ(exec_->num_sequences(), 1u);  // 2, 3 dropped; 4 and 5 never made
  // The next step: the clean request goes on; the dropped one, if scheduled, fails as unknown.
  StepPlan q = b.NewPlan();
  q.seqs.push_back(b.Decode(1, &q));
  q.seqs.push_back(b.Decode(2, &q));
  r = exec_->Execute(q);
  ASSERT_OK(r);
  ASSERT_EQ(r->sampled.size(), 1u);
  EXPECT_EQ(r->sampled[0].token, greedy_[1]);
  ASSERT_EQ(r->failed.size(), 1u);
  EXPECT_EQ(r->failed[0].seq_id, 2);
}

// A draw that fails (non-finite logits) while the next step was launched ahead of it: the request
// fails once, in its own step; the step launched ahead drops it (its row ran on a stand-in id);
// the other request is untouched.
TEST_F(StepExecutorTest, ADrawThatFailsUnderALaunchedAheadStepFailsItsRequestOnce) {
  constexpr int32_t kPoison = 7;
  ASSERT_OK(LoadFixtureModel(SmallCache(), PoisonedFixture(kPoison)));
  std::vector<int32_t> broken = prompt_;
  broken.insert(broken.begin() + 3, kPoison);
  PlanBuilder b;
  StepPlan p = b.NewPlan();
  p.seqs.push_back(b.Prefill(1, prompt_, Params(0.0f)));
  p.seqs.push_back(b.Prefill(2, broken, Params(0.0f)));
  StepPlan q = b.NewPlan();
  q.seqs.push_back(b.Decode(1, &q));
  q.seqs.push_back(b.Decode(2, &q));
  ASSERT_OK(exec_->Submit(p));
  ASSERT_OK(exec_->Submit(q));
  EXPECT_EQ(exec_->num_launched_ahead(), 1);
  absl::StatusOr<StepResult> r = exec_->Await();
  ASSERT_OK(r);
  ASSERT_EQ(r->failed.size(), 1u);
  EXPECT_EQ(r->failed[0].seq_id, 2);
  EXPECT_THAT(r->failed[0].status, StatusIs(absl::StatusCode::kInternal, HasSubstr("at position 13")));
  ASSERT_EQ(r->sampled.size(), 1u);
  EXPECT_EQ(r->sampled[0].token, greedy_[0]);
  r = exec_->Await();
  ASSERT_OK(r);
  EXPECT_TRUE(r->failed.empty());
  ASSERT_EQ(r->sampled.size(), 1u);
  EXPECT_EQ(r->sampled[0].seq_id, 1);
  EXPECT_EQ(r->sampled[0].token, greedy_[1]);
  EXPECT_EQ(exec_->num_sequences(), 1u);
  const std::vector<int32_t> want(greedy_.begin(), greedy_.begin() + 2);
  EXPECT_EQ(Generated(1), want);
}

// Prompt log-probabilities from a broken row (a tester: `eval --ppl` printed "perplexity inf",
// exit 0, and --prompt-logprobs returned nulls) fail the request too, at its draw, naming the
// first broken prompt position, also when that row was in an earlier chunk.
TEST_F(StepExecutorTest, BrokenPromptLogprobRowsFailTheRequestAtItsDraw) {
  constexpr int32_t kPoison = 7;
  ASSERT_OK(LoadFixtureModel(SmallCache(), PoisonedFixture(kPoison)));
  std::vector<int32_t> broken = prompt_;
  broken.insert(broken.begin() + 3, kPoison);
  SamplingParams lp = Params(0.0f);
  lp.prompt_logprobs = 1;
  StepPlan first;
  first.step_id = 1;
  ScheduledSequence chunk;
  chunk.seq_id = 1;
  chunk.new_token_ids = broken;
  chunk.num_scheduled_tokens = 8;
  chunk.sample = false;
  chunk.params = lp;
  chunk.new_block_ids = {0};
  first.seqs.push_back(chunk);
  auto r = exec_->Execute(first);
  ASSERT_OK(r);
  EXPECT_TRUE(r->failed.empty());
  ASSERT_EQ(r->prompt_logprobs.size(), 1u);  // reported as computed: the failure comes with the draw
  StepPlan second;
  second.step_id = 2;
  ScheduledSequence rest;
  rest.seq_id = 1;
  rest.num_computed_tokens = 8;
  rest.num_scheduled_tokens = static_cast<int32_t>(broken.size()) - 8;
  rest.sample = true;
  second.seqs.push_back(rest);
  r = exec_->Execute(second);
  ASSERT_OK(r);
  ASSERT_EQ(r->failed.size(), 1u);
  EXPECT_THAT(r->failed[0].status, StatusIs(absl::StatusCode::kInternal, HasSubstr("NaN or infinite")));
  // A prompt position of the first chunk, not the draw's 13. (Which one: the CPU attention's
  // masked products 0 x NaN reach the rows before the poisoned token as well, so every row of the
  // chunk is broken and the first, position 1, is named.)
  const std::string message(r->failed[0].status.message());
  const size_t at = message.find("position ");
  ASSERT_NE(at, std::string::npos) << message;
  EXPECT_LE(std::stoi(message.substr(at + 9)), 8) << message;
  EXPECT_TRUE(r->sampled.empty());
  EXPECT_EQ(exec_->num_sequences(), 0u);
}

// Found by fuzz/step_plan_fuzz (fuzz/corpus/step_plan_fuzz/crash-computed-overflow): on first
// sight num_computed_tokens may be any prefix-cache hit >= 0, and INT64_MAX + num_scheduled_tokens
// overflowed (signed) in the check meant to catch it.
TEST_F(StepExecutorTest, AComputedCountNearInt64MaxFailsItsRequestAlone) {
  PlanBuilder b;
  StepPlan p = b.NewPlan();
  ScheduledSequence bad = b.Prefill(1, prompt_, Params(0.0f));
  bad.num_computed_tokens = INT64_MAX;
  bad.num_scheduled_tokens = 1;
  p.seqs.push_back(bad);
  p.seqs.push_back(b.Prefill(2, prompt_, Params(0.0f)));
  auto r = exec_->Execute(p);
  ASSERT_OK(r);
  ASSERT_EQ(r->failed.size(), 1u);
  EXPECT_EQ(r->failed[0].seq_id, 1);
  EXPECT_EQ(r->failed[0].status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(r->failed[0].status.message(),
              HasSubstr("1 tokens scheduled after 9223372036854775807 computed, but 12 are known"));
  ASSERT_EQ(r->sampled.size(), 1u);
  EXPECT_EQ(r->sampled[0].seq_id, 2);
  EXPECT_EQ(r->sampled[0].token, greedy_[0]);
}

// Found by fuzz/step_plan_fuzz (fuzz/corpus/step_plan_fuzz/crash-unscheduled-token): a token
// sent but not computed in this step was not checked, and with prompt_logprobs the logit of the
// token after the chunk was read at that id, past the end of the logit row.
TEST_F(StepExecutorTest, ATokenOutsideTheVocabularyFailsOnArrivalEvenIfNotScheduled) {
  PlanBuilder b;
  StepPlan p = b.NewPlan();
  SamplingParams params = Params(0.0f);
  params.prompt_logprobs = 2;
  ScheduledSequence bad = b.Prefill(1, prompt_, params);
  bad.new_token_ids.push_back(5000);  // sent, not scheduled (num_scheduled_tokens stays 12)
  p.seqs.push_back(bad);
  p.seqs.push_back(b.Prefill(2, prompt_, Params(0.0f)));
  auto r = exec_->Execute(p);
  ASSERT_OK(r);
  ASSERT_EQ(r->failed.size(), 1u);
  EXPECT_EQ(r->failed[0].seq_id, 1);
  EXPECT_THAT(r->failed[0].status,
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("sequence 1: new_token_ids[12]: token id 5000 outside the "
                                 "vocabulary [0, 4096)")));
  ASSERT_EQ(r->sampled.size(), 1u);
  EXPECT_EQ(r->sampled[0].token, greedy_[0]);
  EXPECT_TRUE(r->prompt_logprobs.empty());
}

// --kv-policy-prefill (kvpolicy/kv_policy_config.h KvPolicyPrefill) through the executor, which
// marks the step that computes a prompt's last token (SequenceStep::prompt_done). CORM with a
// small window over an 84-token prompt: chunked in 16s, after-prompt keeps every entry until the
// last chunk and then makes the choice one-step prefill makes (the same states, the same greedy
// tokens after); every-chunk has evicted before the prompt's end.
class KvPolicyPrefillTest : public ::testing::TestWithParam<kvpolicy::KvPolicyPrefill> {
 protected:
  void SetUp() override {
    REQUIRE_TINY_LLAMA();
    auto b = CreateBackend({});
    ASSERT_OK(b);
    backend_ = *std::move(b);
    KvCacheOptions kv = SmallCache();
    kv.kv_policy.kind = kvpolicy::KvPolicyKind::kCorm;
    kv.kv_policy.window = 4;
    kv.kv_policy.recent = 4;
    kv.kv_policy.sinks = 2;
    kv.kv_policy.prefill = GetParam();
    auto m = LoadModel({::lorc::testing::TinyLlamaDir()}, backend_.get(), 0, 1, nullptr, kv);
    ASSERT_OK(m);
    model_ = *std::move(m);
    exec_ = std::make_unique<StepExecutor>(model_.runner.get());
    for (int rep = 0; rep < 2; ++rep) {  // 84 tokens: 6 chunks of 16
      for (const auto& g : GoldenPrompts()) {
        prompt_.insert(prompt_.end(), g.prompt_ids.begin(), g.prompt_ids.end());
      }
    }
  }

  // Plans of request `id`: its prompt in chunks of `chunk` tokens (blocks from `first_block`),
  // sampling after the last, then `decode` decode steps.
  std::vector<ScheduledSequence> Steps(int64_t id, int32_t chunk, int32_t first_block, int decode) {
    const int64_t n = static_cast<int64_t>(prompt_.size());
    std::vector<ScheduledSequence> out;
    int32_t next = first_block;
    int64_t done = 0, blocks = 0;
    while (done < n + decode) {
      ScheduledSequence s;
      s.seq_id = id;
      s.num_computed_tokens = done;
      s.num_scheduled_tokens = static_cast<int32_t>(done < n ? std::min<int64_t>(chunk, n - done) : 1);
      if (done == 0) {
        s.new_token_ids = prompt_;
        s.params = Params(0.0f);
      }
      s.sample = done + s.num_scheduled_tokens >= n;
      done += s.num_scheduled_tokens;
      while (blocks * kBlockSize < done) {
        s.new_block_ids.push_back(next++);
        ++blocks;
      }
      out.push_back(std::move(s));
    }
    return out;
  }

  const kvpolicy::SequenceKvPolicy* State(int64_t id) { return model_.runner->kv_policy()->Find(id); }
  int64_t Full(int64_t id) {
    int64_t full = 0;
    const kvpolicy::SequenceKvPolicy* s = State(id);
    for (int l = 0; l < model_.runner->config().num_layers; ++l) {
      for (int g = 0; g < model_.runner->shard().num_kv_heads; ++g) full += s->Counts(l, g).full;
    }
    return full;
  }

  std::unique_ptr<Backend> backend_;
  LoadedModel model_;
  std::unique_ptr<StepExecutor> exec_;
  std::vector<int32_t> prompt_;
  uint64_t step_id_ = 0;
};

TEST_P(KvPolicyPrefillTest, ChoosesAfterThePromptOrEveryChunk) {
  const bool after_prompt = GetParam() == kvpolicy::KvPolicyPrefill::kAfterPrompt;
  ASSERT_GT(prompt_.size(), 48u);
  const int decode = 4;
  const std::vector<ScheduledSequence> chunked = Steps(1, 16, 0, decode);
  const std::vector<ScheduledSequence> whole = Steps(2, 1 << 20, 100, decode);
  const int prompt_steps = static_cast<int>(chunked.size()) - decode;
  ASSERT_GE(prompt_steps, 4);
  const int64_t heads = model_.runner->config().num_layers * model_.runner->shard().num_kv_heads;
  for (int i = 0; i < prompt_steps; ++i) {
    StepPlan p;
    p.step_id = ++step_id_;
    p.seqs.push_back(chunked[i]);
    auto r = exec_->Execute(p);
    ASSERT_OK(r);
    ASSERT_TRUE(r->failed.empty()) << r->failed[0].status;
    const int64_t len = chunked[i].num_computed_tokens + chunked[i].num_scheduled_tokens;
    if (i + 1 < prompt_steps) {
      if (after_prompt) {
        EXPECT_EQ(Full(1), heads * len) << "chunk " << i << ": chosen before the prompt's end";
      } else if (i > 0) {
        EXPECT_LT(Full(1), heads * len) << "chunk " << i << ": every-chunk did not choose";
      }
    }
  }
  StepPlan p;
  p.step_id = ++step_id_;
  p.seqs.push_back(whole[0]);
  auto r = exec_->Execute(p);
  ASSERT_OK(r);
  ASSERT_TRUE(r->failed.empty()) << r->failed[0].status;
  EXPECT_LT(Full(1), heads * static_cast<int64_t>(prompt_.size()));  // chosen after the prompt
  if (after_prompt) {
    // The same choice, position by position, as one step over the whole prompt.
    for (int l = 0; l < model_.runner->config().num_layers; ++l) {
      for (int g = 0; g < model_.runner->shard().num_kv_heads; ++g) {
        for (int64_t pos = 0; pos < static_cast<int64_t>(prompt_.size()); ++pos) {
          ASSERT_EQ(State(1)->state(l, g, pos), State(2)->state(l, g, pos))
              << "layer " << l << " head " << g << " position " << pos;
        }
      }
    }
  }
  for (int i = 0; i < decode; ++i) {
    StepPlan d;
    d.step_id = ++step_id_;
    d.seqs.push_back(chunked[prompt_steps + i]);
    d.seqs.push_back(whole[1 + i]);
    auto rd = exec_->Execute(d);
    ASSERT_OK(rd);
    ASSERT_TRUE(rd->failed.empty()) << rd->failed[0].status;
  }
  EXPECT_EQ(exec_->Tokens(1).size(), prompt_.size() + decode + 1);
  if (after_prompt) {
    EXPECT_EQ(exec_->Tokens(1), exec_->Tokens(2));
  }
}

// KV policy compaction on one rank (step/step.h KvCompaction): after the prompt each step reports
// the slots a compaction would leave; a compaction to fewer fails the step as a whole naming the
// entry and changes nothing; one to exactly that many keeps every later token equal to the
// uncompacted run of the same prompt beside it, while its table holds fewer blocks.
TEST_P(KvPolicyPrefillTest, CompactionKeepsTheTokensAndNamesABadEntry) {
  const int decode = 6;
  const std::vector<ScheduledSequence> a = Steps(1, 1 << 20, 0, decode);
  const std::vector<ScheduledSequence> b = Steps(2, 1 << 20, 100, decode);
  StepPlan p;
  p.step_id = ++step_id_;
  p.seqs = {a[0], b[0]};
  auto r = exec_->Execute(p);
  ASSERT_OK(r);
  ASSERT_EQ(r->kv_slots.size(), 2u);
  const KvSlotReport rep = r->kv_slots[0];
  EXPECT_EQ(rep.seq_id, 1);
  EXPECT_EQ(rep.num_computed_tokens, static_cast<int64_t>(prompt_.size()));
  EXPECT_EQ(rep.compact_from, 0);
  ASSERT_LT(rep.slots_needed, static_cast<int64_t>(prompt_.size()) - kBlockSize);
  // Too few slots: the step fails as a whole, nothing moved, nothing computed.
  StepPlan bad;
  bad.step_id = step_id_ + 1;
  bad.kv_compactions = {{1, rep.slots_needed - 1}};
  bad.seqs = {a[1], b[1]};
  EXPECT_THAT(exec_->Execute(bad), StatusIs(absl::StatusCode::kFailedPrecondition,
                                            HasSubstr("kv_compactions[0] (sequence 1")));
  bad.kv_compactions = {{77, 10}};
  EXPECT_THAT(exec_->Execute(bad), StatusIs(absl::StatusCode::kFailedPrecondition,
                                            HasSubstr("not running on this worker")));
  // Exactly what is needed: the table keeps ceil(slots / block_size) blocks; the next tokens go
  // to the slots after them (new blocks from the plan only once those fill).
  const int64_t slots = rep.slots_needed;
  const size_t kept_blocks = static_cast<size_t>((slots + kBlockSize - 1) / kBlockSize);
  int32_t next_block = 50;
  for (int i = 1; i <= decode; ++i) {
    StepPlan d;
    d.step_id = ++step_id_;
    if (i == 1) d.kv_compactions = {{1, slots}};
    ScheduledSequence sa = a[i];
    sa.new_block_ids.clear();
    const int64_t used = slots + i;  // slots after this step's token
    const size_t have = kept_blocks + static_cast<size_t>(next_block - 50);
    if (static_cast<size_t>((used + kBlockSize - 1) / kBlockSize) > have) sa.new_block_ids = {next_block++};
    d.seqs = {sa, b[i]};
    auto rd = exec_->Execute(d);
    ASSERT_OK(rd);
    ASSERT_TRUE(rd->failed.empty()) << rd->failed[0].status;
    EXPECT_EQ(State(1)->slot_offset(), static_cast<int64_t>(prompt_.size()) - slots);
  }
  EXPECT_EQ(exec_->Tokens(1), exec_->Tokens(2));
  EXPECT_EQ(exec_->Tokens(1).size(), prompt_.size() + decode + 1);
}

INSTANTIATE_TEST_SUITE_P(Modes, KvPolicyPrefillTest,
                         ::testing::Values(kvpolicy::KvPolicyPrefill::kAfterPrompt,
                                           kvpolicy::KvPolicyPrefill::kEveryChunk),
                         [](const ::testing::TestParamInfo<kvpolicy::KvPolicyPrefill>& i) {
                           return i.param == kvpolicy::KvPolicyPrefill::kAfterPrompt
                                      ? std::string("AfterPrompt")
                                      : std::string("EveryChunk");
                         });

// MiKV's low entries live in the cache slots they replace (kvpolicy/README.md "Low entries in the
// paged cache"): int4 entries (64 code bytes + 4 per KV head) over an int4 cache (64 bytes) would
// take more memory than they free, so the load is refused naming the flags; int2 loads.
TEST(KvPolicyLoadTest, MikvLowEntriesLargerThanTheCacheEntriesAreRefused) {
  REQUIRE_TINY_LLAMA();
  auto b = CreateBackend({});
  ASSERT_OK(b);
  KvCacheOptions kv = SmallCache();
  kv.kv_cache_dtype = KvCacheDtype::kInt4;
  kv.kv_policy.kind = kvpolicy::KvPolicyKind::kMikv;
  kv.kv_policy.low_bits = 4;
  EXPECT_THAT(LoadModel({::lorc::testing::TinyLlamaDir()}, b->get(), 0, 1, nullptr, kv).status(),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       AllOf(HasSubstr("--kv-policy-low-bits 4"), HasSubstr("--kv-cache-dtype int4"),
                             HasSubstr("68 / 68 bytes"),
                             // int2 fits here; at 2 bits the hint names the cache dtype or CORM
                             HasSubstr("(use --kv-policy-low-bits 2, a wider --kv-cache-dtype or --kv-policy corm)"))));
  kv.kv_policy.low_bits = 2;
  EXPECT_OK(LoadModel({::lorc::testing::TinyLlamaDir()}, b->get(), 0, 1, nullptr, kv).status());
}

// Gloo over loopback for the in-process tensor-parallel tests.
CommOptions LoopbackComm() {
  CommOptions o;
  o.hostname_or_iface = "127.0.0.1";
  o.join_timeout = absl::Seconds(30);
  o.op_timeout = absl::Seconds(60);
  return o;
}

TEST(StepExecutorTensorParallelTest, EveryRankForksIdentically) {
  REQUIRE_TINY_LLAMA();
  PlanBuilder b;
  const std::vector<int32_t> prompt = GoldenPrompts()[1].prompt_ids;
  const auto plans =
      PrefillThenDecode(b, {b.Prefill(1, prompt, Params(1.0f, 3, 3), {2, 3})}, /*decode_steps=*/4);
  InProcessStore store;
  std::vector<std::vector<std::vector<int32_t>>> tokens(2);  // [rank][seq 1..3]
  std::vector<size_t> sampled(2, 0);
  auto rank_main = [&](int rank) {
    auto backend = CreateBackend({});
    ASSERT_OK(backend);
    auto comm = CreateGlooCommunicator({rank, 2}, &store, LoopbackComm());
    ASSERT_OK(comm);
    auto m = LoadModel({::lorc::testing::TinyLlamaDir()}, backend->get(), rank, 2, comm->get(),
                       SmallCache());
    ASSERT_OK(m);
    StepExecutor exec(m->runner.get(), comm->get());
    for (const StepPlan& p : plans) {
      auto r = exec.Execute(p);
      ASSERT_OK(r);
      ASSERT_TRUE(r->failed.empty());
      sampled[rank] += r->sampled.size();
    }
    for (int64_t id : {1, 2, 3}) tokens[rank].push_back(exec.Tokens(id));
  };
  std::thread r1(rank_main, 1);
  rank_main(0);
  r1.join();
  ASSERT_EQ(tokens[0].size(), 3u);
  EXPECT_EQ(tokens[0], tokens[1]);
  for (const auto& t : tokens[0]) EXPECT_EQ(t.size(), prompt.size() + 5);
  EXPECT_EQ(sampled[0], 3u * 5u);
  EXPECT_EQ(sampled[1], 0u);  // only rank 0 reports sampled tokens
}

// Rank 0 alone sees the logits; the broadcast carries its verdict, so both ranks drop the
// broken request in the same step and keep the same state for the other.
TEST(StepExecutorTensorParallelTest, EveryRankDropsARequestWithNonFiniteLogits) {
  REQUIRE_TINY_LLAMA();
  constexpr int32_t kPoison = 7;
  const std::vector<int32_t> prompt = GoldenPrompts()[1].prompt_ids;
  std::vector<int32_t> broken = prompt;
  broken.push_back(kPoison);
  const std::string dir = PoisonedFixture(kPoison);
  PlanBuilder b;
  std::vector<StepPlan> plans = PrefillThenDecode(b, {b.Prefill(1, prompt, Params(0.0f))}, /*decode_steps=*/2);
  plans[0].seqs.push_back(b.Prefill(2, broken, Params(0.0f)));
  InProcessStore store;
  std::vector<std::vector<int64_t>> failed(2);  // [rank]: failed ids, in step order
  std::vector<std::vector<int32_t>> tokens(2);  // [rank]: sequence 1's tokens
  auto rank_main = [&](int rank) {
    auto backend = CreateBackend({});
    ASSERT_OK(backend);
    auto comm = CreateGlooCommunicator({rank, 2}, &store, LoopbackComm());
    ASSERT_OK(comm);
    auto m = LoadModel({dir}, backend->get(), rank, 2, comm->get(), SmallCache());
    ASSERT_OK(m);
    StepExecutor exec(m->runner.get(), comm->get());
    for (const StepPlan& p : plans) {
      auto r = exec.Execute(p);
      ASSERT_OK(r);
      for (const FailedSequence& f : r->failed) {
        failed[rank].push_back(f.seq_id);
        EXPECT_THAT(f.status.message(), HasSubstr("at position 13")) << "rank " << rank;
      }
    }
    EXPECT_EQ(exec.num_sequences(), 1u) << "rank " << rank;
    tokens[rank] = exec.Tokens(1);
  };
  std::thread r1(rank_main, 1);
  rank_main(0);
  r1.join();
  EXPECT_EQ(failed[0], std::vector<int64_t>{2});
  EXPECT_EQ(failed[1], std::vector<int64_t>{2});
  EXPECT_EQ(tokens[0], tokens[1]);
  ASSERT_EQ(tokens[0].size(), prompt.size() + 3);
  EXPECT_EQ(std::vector<int32_t>(tokens[0].begin() + static_cast<ptrdiff_t>(prompt.size()), tokens[0].end()),
            std::vector<int32_t>(GoldenPrompts()[1].greedy_ids.begin(), GoldenPrompts()[1].greedy_ids.begin() + 3));
}

}  // namespace
}  // namespace lorc
