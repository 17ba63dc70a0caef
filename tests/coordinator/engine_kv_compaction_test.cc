// KV policy compaction end to end in process (kvpolicy/README.md "Compaction"): the fixture
// model's golden prompts, greedy, batched, under CORM (30 % budget, and budget-free over an int4
// cache: the quantized move) and MiKV int2, give exactly the same tokens with compaction as
// without it, while the scheduler compacts and hands blocks back. Compaction only moves what the
// policy keeps: any slot bookkeeping error (a key read from a moved-away slot, a new token
// written over a kept one, a block freed while still read) changes the tokens.
#include <ostream>
#include <string>
#include <vector>

#include "coordinator/engine.h"
#include "gtest/gtest.h"
#include "tests/testing/fixture_model.h"
#include "tests/testing/golden.h"
#include "tests/testing/status_matchers.h"
#include "worker/model_loader.h"
#include "worker/step_executor.h"

namespace lorc {
namespace {

struct Case {
  std::string name;
  kvpolicy::KvPolicyKind kind;
  double budget_fraction;  // 0: budget-free
  int32_t low_bits;
  KvCacheDtype dtype;
};

void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }

class EngineKvCompactionTest : public ::lorc::testing::FixtureModelTest<::testing::TestWithParam<Case>> {
 protected:
  // The case's cache and policy (blocks of 8, w = r = 4, one sink).
  static KvCacheOptions CaseKv() {
    const Case& c = GetParam();
    KvCacheOptions kv;
    kv.block_size = 8;
    kv.num_blocks = 256;
    kv.kv_cache_dtype = c.dtype;
    kv.kv_policy.kind = c.kind;
    kv.kv_policy.window = 4;
    kv.kv_policy.recent = 4;
    kv.kv_policy.sinks = 1;
    kv.kv_policy.budget_fraction = c.budget_fraction;
    if (c.kind == kvpolicy::KvPolicyKind::kMikv) kv.kv_policy.low_bits = c.low_bits;
    return kv;
  }

  // Greedy tokens of every golden prompt (max_tokens 64, one batch); the scheduler's compactions
  // and freed blocks.
  // With n > 1 every completion's tokens, request after request.
  std::vector<std::vector<int32_t>> Run(bool compaction, int64_t* compactions, int64_t* freed, int n = 1) {
    EXPECT_OK(LoadFixtureModel(CaseKv()));
    EngineOptions eo;
    eo.kv_compaction = compaction;
    absl::StatusOr<std::unique_ptr<Engine>> engine =
        Engine::Create(exec_.get(), model_.config, model_.runner->kv_spec(), nullptr, eo);
    EXPECT_OK(engine.status());
    std::vector<GenerationRequest> reqs;
    for (const ::lorc::testing::Golden& g : ::lorc::testing::GoldenPrompts()) {
      GenerationRequest r;
      r.prompt_ids = g.prompt_ids;
      r.params.max_tokens = 64;
      r.params.ignore_eos = true;
      r.params.n = n;
      reqs.push_back(r);
    }
    std::vector<std::vector<int32_t>> out;
    absl::StatusOr<std::vector<GenerationResult>> res = (*engine)->Generate(reqs);
    EXPECT_OK(res.status());
    if (res.ok()) {
      for (const GenerationResult& r : *res) {
        for (const CompletionOutput& c : r.completions) out.push_back(c.output_ids);
      }
    }
    *compactions = (*engine)->scheduler().num_kv_compactions();
    *freed = (*engine)->scheduler().num_kv_compaction_freed_blocks();
    EXPECT_OK((*engine)->scheduler().Validate());
    return out;
  }
};

TEST_P(EngineKvCompactionTest, CompactionChangesMemoryNotTokens) {
  int64_t compactions = 0, freed = 0;
  const std::vector<std::vector<int32_t>> plain = Run(false, &compactions, &freed);
  EXPECT_EQ(compactions, 0);
  const std::vector<std::vector<int32_t>> compacted = Run(true, &compactions, &freed);
  ASSERT_EQ(plain.size(), ::lorc::testing::GoldenPrompts().size());
  EXPECT_EQ(compacted, plain);
  // Each golden request ends at ~64 + its prompt tokens (9-10 blocks of 8); the policy keeps
  // about 30 % (or w + r + sinks) per head, so every request compacts, repeatedly as it grows,
  // and each compaction the freed-blocks rule starts frees at least one block; MiKV also
  // compacts to pack a block's worth of keys demoted in their slots, which may free none.
  EXPECT_GE(compactions, 2 * static_cast<int64_t>(plain.size()));
  if (GetParam().kind == kvpolicy::KvPolicyKind::kMikv) {
    EXPECT_GE(freed, static_cast<int64_t>(plain.size()));
  } else {
    EXPECT_GE(freed, compactions);
  }
}

// Parallel sampling under a policy: a fork child continues its parent's state (KvPolicyStore::
// Fork), so the three greedy completions of a request are its one greedy completion, compacted
// or not (a child's blocks past the shared prompt are its own; the prompt's are compacted only
// once no sibling holds them).
TEST_P(EngineKvCompactionTest, GreedyParallelCompletionsAreTheGreedyCompletion) {
  int64_t compactions = 0, freed = 0;
  const std::vector<std::vector<int32_t>> one = Run(true, &compactions, &freed);
  const std::vector<std::vector<int32_t>> three = Run(true, &compactions, &freed, 3);
  ASSERT_EQ(three.size(), 3 * one.size());
  for (size_t i = 0; i < three.size(); ++i) EXPECT_EQ(three[i], one[i / 3]) << "completion " << i % 3 << " of request " << i / 3;
  EXPECT_GT(compactions, 0);
}

// --kv-policy-prefill every-chunk in a server: the prompts' chunks are cut where the step budget
// runs out, which depends on the other requests of the step, so choosing after every chunk made a
// greedy answer depend on its neighbours (a tester: 3 of 8 pass-key prompts differed at their
// first token between alone and batched). The scheduler now ends a prompt's chunks at multiples
// of the budget and the policy chooses only there and at the prompt's end: every golden prompt
// alone gives the tokens it gives batched with the others (budget 8 tokens a step: the batch's
// chunks are cut short by its neighbours). Choosing after every chunk (interval 0) differs.
TEST_P(EngineKvCompactionTest, EveryChunkChoicesDoNotDependOnTheNeighbours) {
  auto generate = [&](int64_t interval, const std::vector<size_t>& prompts) {
    KvCacheOptions kv = CaseKv();
    kv.max_num_batched_tokens = 8;
    kv.kv_policy.prefill = kvpolicy::KvPolicyPrefill::kEveryChunk;
    kv.kv_policy.prefill_interval = interval;
    EXPECT_OK(LoadFixtureModel(kv));
    EngineOptions eo;
    eo.kv_compaction = true;
    eo.max_num_batched_tokens = 8;
    eo.kv_policy_prefill_interval = interval;
    absl::StatusOr<std::unique_ptr<Engine>> engine =
        Engine::Create(exec_.get(), model_.config, model_.runner->kv_spec(), nullptr, eo);
    EXPECT_OK(engine.status());
    std::vector<GenerationRequest> reqs;
    for (size_t i : prompts) {
      GenerationRequest r;
      r.prompt_ids = ::lorc::testing::GoldenPrompts()[i].prompt_ids;
      r.params.max_tokens = 32;
      r.params.ignore_eos = true;
      reqs.push_back(r);
    }
    std::vector<std::vector<int32_t>> out;
    absl::StatusOr<std::vector<GenerationResult>> res = (*engine)->Generate(reqs);
    EXPECT_OK(res.status());
    if (res.ok()) {
      for (const GenerationResult& r : *res) out.push_back(r.completions.at(0).output_ids);
    }
    return out;
  };
  const size_t num = ::lorc::testing::GoldenPrompts().size();
  std::vector<size_t> all(num);
  for (size_t i = 0; i < num; ++i) all[i] = i;
  int differ_per_chunk = 0;
  for (const int64_t interval : {int64_t{8}, int64_t{0}}) {
    const std::vector<std::vector<int32_t>> batched = generate(interval, all);
    ASSERT_EQ(batched.size(), num);
    for (size_t i = 0; i < num; ++i) {
      const std::vector<std::vector<int32_t>> alone = generate(interval, {i});
      ASSERT_EQ(alone.size(), 1u);
      if (interval > 0) {
        EXPECT_EQ(alone[0], batched[i]) << "golden prompt " << i;
      } else {
        differ_per_chunk += alone[0] != batched[i];
      }
    }
  }
  EXPECT_GT(differ_per_chunk, 0) << "the case no longer shows what choosing after every chunk did";
}

INSTANTIATE_TEST_SUITE_P(
    Policies, EngineKvCompactionTest,
    ::testing::Values(Case{"corm30", kvpolicy::KvPolicyKind::kCorm, 0.3, 4, KvCacheDtype::kAuto},
                      Case{"mikv_int2", kvpolicy::KvPolicyKind::kMikv, 0.3, 2, KvCacheDtype::kAuto},
                      Case{"corm_free_int4_cache", kvpolicy::KvPolicyKind::kCorm, 0.0, 4, KvCacheDtype::kInt4}),
    [](const ::testing::TestParamInfo<Case>& i) { return i.param.name; });

}  // namespace
}  // namespace lorc
