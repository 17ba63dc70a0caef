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
  // Greedy tokens of every golden prompt (max_tokens 64, one batch); the scheduler's compactions
  // and freed blocks.
  // With n > 1 every completion's tokens, request after request.
  std::vector<std::vector<int32_t>> Run(bool compaction, int64_t* compactions, int64_t* freed, int n = 1) {
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
    EXPECT_OK(LoadFixtureModel(kv));
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

INSTANTIATE_TEST_SUITE_P(
    Policies, EngineKvCompactionTest,
    ::testing::Values(Case{"corm30", kvpolicy::KvPolicyKind::kCorm, 0.3, 4, KvCacheDtype::kAuto},
                      Case{"mikv_int2", kvpolicy::KvPolicyKind::kMikv, 0.3, 2, KvCacheDtype::kAuto},
                      Case{"corm_free_int4_cache", kvpolicy::KvPolicyKind::kCorm, 0.0, 4, KvCacheDtype::kInt4}),
    [](const ::testing::TestParamInfo<Case>& i) { return i.param.name; });

}  // namespace
}  // namespace lorc
