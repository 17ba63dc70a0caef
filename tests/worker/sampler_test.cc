#include "worker/sampler.h"

#include <cmath>
#include <cstdint>
#include <limits>
#include <map>
#include <random>
#include <vector>

#include "common/sampling_params.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/status_matchers.h"

namespace lorc {
namespace {

using ::lorc::testing::StatusIs;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

// Draws `n` tokens from `logits` (a fresh copy each time: Sample modifies its input).
std::vector<int32_t> Draw(Sampler& s, const std::vector<float>& logits, int n,
                          const std::vector<int32_t>& context = {}) {
  std::vector<int32_t> out;
  out.reserve(n);
  for (int i = 0; i < n; ++i) {
    std::vector<float> l = logits;
    out.push_back(s.Sample(absl::MakeSpan(l), context));
  }
  return out;
}

std::vector<int> Counts(const std::vector<int32_t>& draws, size_t vocab) {
  std::vector<int> c(vocab, 0);
  for (int32_t t : draws) {
    EXPECT_GE(t, 0);
    EXPECT_LT(static_cast<size_t>(t), vocab);
    if (t >= 0 && static_cast<size_t>(t) < vocab) ++c[t];
  }
  return c;
}

std::vector<double> Softmax(const std::vector<float>& logits, double temperature = 1.0) {
  double mx = -std::numeric_limits<double>::infinity();
  for (float l : logits) mx = std::max(mx, l / temperature);
  std::vector<double> p(logits.size());
  double sum = 0;
  for (size_t i = 0; i < logits.size(); ++i) sum += p[i] = std::exp(logits[i] / temperature - mx);
  for (double& x : p) x /= sum;
  return p;
}

// Pearson chi-square statistic of observed counts against expected probabilities.
double ChiSquare(const std::vector<int>& counts, const std::vector<double>& probs) {
  int total = 0;
  for (int c : counts) total += c;
  double chi2 = 0;
  for (size_t i = 0; i < counts.size(); ++i) {
    const double e = probs[i] * total;
    if (e == 0) {
      EXPECT_EQ(counts[i], 0) << "token " << i << " has probability 0";
      continue;
    }
    chi2 += (counts[i] - e) * (counts[i] - e) / e;
  }
  return chi2;
}

// The sampler's processed logits (backend/sampling.h steps 0-5) for `logits` after `context`,
// all of it prompt.
std::vector<double> ProcessedBy(Sampler& s, const std::vector<float>& logits,
                                const std::vector<int32_t>& context) {
  SampleScratch scratch;
  std::vector<double> x;
  ProcessLogits(logits, s.NextRow(context, context.size()), &scratch, &x);
  return x;
}

SamplingParams Seeded(float temperature, uint64_t seed = 1234) {
  SamplingParams p;
  p.temperature = temperature;
  p.seed = seed;
  return p;
}

// --- greedy -------------------------------------------------------------------------------------

TEST(ArgMaxTest, FirstIndexWinsTies) {
  EXPECT_EQ(ArgMax(std::vector<float>{1.0f, 3.0f, 3.0f, 2.0f}), 1);
  EXPECT_EQ(ArgMax(std::vector<float>{5.0f, 5.0f, 5.0f}), 0);
  EXPECT_EQ(ArgMax(std::vector<float>{-2.0f, -1.0f, -1.0f}), 1);
  EXPECT_EQ(ArgMax(std::vector<float>{0.5f}), 0);
  const float ninf = -std::numeric_limits<float>::infinity();
  EXPECT_EQ(ArgMax(std::vector<float>{ninf, ninf, -1e30f}), 2);
}

TEST(SamplerTest, GreedyIsArgMaxWithFirstIndexTieBreak) {
  Sampler s(SamplingParams{});  // temperature 0: greedy
  std::vector<float> l = {0.1f, 2.0f, -1.0f, 2.0f, 1.9f};
  EXPECT_EQ(s.Sample(absl::MakeSpan(l), {}), 1);

  std::mt19937 rng(5);
  std::normal_distribution<float> d(0.0f, 3.0f);
  for (int trial = 0; trial < 200; ++trial) {
    std::vector<float> logits(37);
    for (float& x : logits) x = d(rng);
    // Duplicate the maximum at a later index: the first one must win.
    const int32_t want = ArgMax(logits);
    logits[36] = logits[want];
    std::vector<float> copy = logits;
    EXPECT_EQ(s.Sample(absl::MakeSpan(copy), {}), std::min<int32_t>(want, 36));
  }
}

// --- reproducibility ----------------------------------------------------------------------------

TEST(SamplerTest, SameSeedSameDrawsDifferentSeedsDiffer) {
  std::vector<float> logits(50);
  for (size_t i = 0; i < logits.size(); ++i) logits[i] = 0.05f * static_cast<float>(i % 7);
  Sampler a(Seeded(1.0f, 42)), b(Seeded(1.0f, 42)), c(Seeded(1.0f, 43));
  const std::vector<int32_t> da = Draw(a, logits, 300);
  const std::vector<int32_t> db = Draw(b, logits, 300);
  const std::vector<int32_t> dc = Draw(c, logits, 300);
  EXPECT_EQ(da, db);
  EXPECT_NE(da, dc);
  // Not a constant sequence either.
  std::vector<int> counts = Counts(da, logits.size());
  int distinct = 0;
  for (int x : counts) distinct += x > 0;
  EXPECT_GT(distinct, 20);
}

TEST(SamplerTest, SeededDrawsIndependentOfOtherSamplers) {
  // Interleaving another sampler's draws does not disturb a seeded sequence.
  std::vector<float> logits = {0.0f, 0.3f, 0.7f, 1.0f, -0.5f};
  Sampler a(Seeded(0.8f, 9)), b(Seeded(0.8f, 9)), other(Seeded(0.8f, 10));
  std::vector<int32_t> da, db;
  for (int i = 0; i < 100; ++i) {
    da.push_back(Draw(a, logits, 1)[0]);
    Draw(other, logits, 3);
    db.push_back(Draw(b, logits, 1)[0]);
  }
  EXPECT_EQ(da, db);
}

// --- filters ------------------------------------------------------------------------------------

TEST(SamplerTest, TopKOneEqualsGreedyEvenWithTemperature) {
  std::mt19937 rng(11);
  std::normal_distribution<float> d(0.0f, 1.0f);
  SamplingParams p = Seeded(1.7f);
  p.top_k = 1;
  Sampler s(p);
  for (int trial = 0; trial < 300; ++trial) {
    std::vector<float> logits(23);
    for (float& x : logits) x = d(rng);
    const int32_t want = ArgMax(logits);
    EXPECT_EQ(Draw(s, logits, 1)[0], want);
  }
}

TEST(SamplerTest, TopKRestrictsToKMostLikely) {
  const std::vector<float> logits = {1.0f, 3.0f, 0.0f, 2.5f, 2.9f, -1.0f};
  SamplingParams p = Seeded(1.0f);
  p.top_k = 3;
  Sampler s(p);
  const std::vector<int> c = Counts(Draw(s, logits, 3000), logits.size());
  // Kept: tokens 1, 4, 3 (renormalised softmax over those three).
  std::vector<double> want(logits.size(), 0.0);
  const double z = std::exp(3.0) + std::exp(2.9) + std::exp(2.5);
  want[1] = std::exp(3.0) / z;
  want[4] = std::exp(2.9) / z;
  want[3] = std::exp(2.5) / z;
  EXPECT_EQ(c[0] + c[2] + c[5], 0);
  EXPECT_LT(ChiSquare(c, want), 20.0);  // 2 degrees of freedom; p ~ 5e-5
}

TEST(SamplerTest, TinyTopPKeepsOnlyTheTopToken) {
  std::mt19937 rng(3);
  std::normal_distribution<float> d(0.0f, 0.5f);
  SamplingParams p = Seeded(1.0f);
  p.top_p = 1e-6f;
  Sampler s(p);
  for (int trial = 0; trial < 300; ++trial) {
    std::vector<float> logits(31);
    for (float& x : logits) x = d(rng);
    EXPECT_EQ(Draw(s, logits, 1)[0], ArgMax(logits));
  }
}

TEST(SamplerTest, TopPKeepsSmallestPrefixReachingMass) {
  // Probabilities 0.5, 0.3, 0.15, 0.05 (token order shuffled). top_p 0.7: 0.5 < 0.7 <= 0.8, so
  // the two most likely tokens remain, renormalised to 5/8 and 3/8.
  const std::vector<double> probs = {0.15, 0.5, 0.05, 0.3};
  std::vector<float> logits;
  for (double q : probs) logits.push_back(static_cast<float>(std::log(q)));
  SamplingParams p = Seeded(1.0f);
  p.top_p = 0.7f;
  Sampler s(p);
  const std::vector<int> c = Counts(Draw(s, logits, 4000), logits.size());
  EXPECT_EQ(c[0] + c[2], 0);
  EXPECT_LT(ChiSquare(c, {0.0, 5.0 / 8, 0.0, 3.0 / 8}), 15.0);  // 1 dof; p ~ 1e-4
}

TEST(SamplerTest, MinPFiltersRelativeToMostLikelyToken) {
  // Probabilities 0.4, 0.3, 0.15, 0.1, 0.05 spread over the vocabulary. min_p 0.5 keeps tokens
  // with p >= 0.2: exactly the 0.4 and 0.3 ones, renormalised to 4/7 and 3/7.
  const std::vector<double> probs = {0.1, 0.05, 0.4, 0.15, 0.3};
  std::vector<float> logits;
  for (double q : probs) logits.push_back(static_cast<float>(std::log(q)));
  SamplingParams p = Seeded(1.0f, 777);
  p.min_p = 0.5f;
  Sampler s(p);
  const int n = 2000;
  const std::vector<int> c = Counts(Draw(s, logits, n), logits.size());
  EXPECT_EQ(c[2] + c[4], n) << "only the two tokens above the floor may appear";
  EXPECT_EQ(c[0] + c[1] + c[3], 0);
  const double p2 = 4.0 / 7.0;
  const double sigma = std::sqrt(n * p2 * (1 - p2));
  EXPECT_NEAR(c[2], n * p2, 5 * sigma);
  EXPECT_NEAR(c[4], n * (1 - p2), 5 * sigma);
}

TEST(SamplerTest, MaskedTokensAreNeverDrawn) {
  const float ninf = -std::numeric_limits<float>::infinity();
  const std::vector<float> logits = {ninf, 0.0f, ninf, 0.0f, ninf};
  Sampler s(Seeded(1.0f));
  const std::vector<int> c = Counts(Draw(s, logits, 1000), logits.size());
  EXPECT_EQ(c[0] + c[2] + c[4], 0);
  EXPECT_GT(c[1], 400);
  EXPECT_GT(c[3], 400);
}

// --- temperature --------------------------------------------------------------------------------

TEST(SamplerTest, TemperatureScalesTheDistribution) {
  const std::vector<float> logits = {0.0f, 1.0f, 2.0f, 0.5f};
  const int n = 20000;
  std::vector<double> freq0;  // empirical frequency of the least likely token, per temperature
  for (float t : {0.5f, 1.0f, 2.0f}) {
    SCOPED_TRACE(t);
    Sampler s(Seeded(t, 2024));
    const std::vector<int> c = Counts(Draw(s, logits, n), logits.size());
    const std::vector<double> want = Softmax(logits, t);
    // 3 degrees of freedom: P(chi2 > 25) ~ 1.6e-5. Seeded, so deterministic anyway.
    EXPECT_LT(ChiSquare(c, want), 25.0);
    // And the statistic is far from what the untempered distribution would give (t != 1).
    if (t != 1.0f) {
      EXPECT_GT(ChiSquare(c, Softmax(logits, 1.0)), 100.0);
    }
    freq0.push_back(static_cast<double>(c[0]) / n);
  }
  // Higher temperature flattens: the least likely token gains mass.
  EXPECT_LT(freq0[0], freq0[1]);
  EXPECT_LT(freq0[1], freq0[2]);
}

// --- repetition penalty -------------------------------------------------------------------------

TEST(SamplerTest, RepetitionPenaltyHuggingFaceSemantics) {
  SamplingParams p;  // greedy: Sample leaves the penalised logits in place
  p.repetition_penalty = 2.0f;
  Sampler s(p);
  std::vector<float> l = {2.0f, -1.0f, 0.5f, 3.0f, -2.0f, 0.0f};
  // Tokens 0, 1 (twice), 5 in context; 99 and -1 are outside the vocabulary and ignored.
  const std::vector<int32_t> ctx = {0, 1, 1, 5, 99, -1};
  EXPECT_EQ(s.Sample(l, ctx), 3);
  // Positive logits divided, negative multiplied, each token once however often it occurs;
  // tokens not in the context untouched.
  EXPECT_THAT(ProcessedBy(s, l, ctx), ElementsAre(1.0, -2.0, 0.5, 3.0, -2.0, 0.0));
}

TEST(SamplerTest, RepetitionPenaltyChangesTheGreedyChoice) {
  SamplingParams p;
  p.repetition_penalty = 2.0f;
  Sampler s(p);
  std::vector<float> l = {2.0f, 1.5f, -0.5f};
  EXPECT_EQ(s.Sample(absl::MakeSpan(l), std::vector<int32_t>{0}), 1);  // 2.0 -> 1.0 < 1.5
  std::vector<float> l2 = {2.0f, 1.5f, -0.5f};
  EXPECT_EQ(s.Sample(absl::MakeSpan(l2), std::vector<int32_t>{2}), 0);  // -0.5 -> -1.0
  EXPECT_DOUBLE_EQ(ProcessedBy(s, l2, {2})[2], -1.0);

  // A penalty below 1 rewards repetition.
  SamplingParams q;
  q.repetition_penalty = 0.5f;
  Sampler r(q);
  std::vector<float> l3 = {2.0f, 1.5f, -0.5f};
  EXPECT_EQ(r.Sample(absl::MakeSpan(l3), std::vector<int32_t>{1, 2}), 1);  // 1.5 -> 3.0
  EXPECT_THAT(ProcessedBy(r, l3, {1, 2}), ElementsAre(2.0, 3.0, -0.25));
}

TEST(SamplerTest, RepetitionPenaltyOneLeavesLogitsAlone) {
  Sampler s(SamplingParams{});
  EXPECT_THAT(ProcessedBy(s, {2.0f, -1.0f, 0.5f}, {0, 1, 2}), ElementsAre(2.0, -1.0, 0.5));
}

TEST(SamplerTest, RepetitionPenaltyAppliesBeforeTemperatureSampling) {
  // Token 0 dominates unless penalised; with a huge penalty on it, it is (almost) never drawn.
  SamplingParams p = Seeded(1.0f);
  p.repetition_penalty = 100.0f;
  Sampler s(p);
  const std::vector<float> logits = {8.0f, 0.0f, 0.0f};
  const std::vector<int> c = Counts(Draw(s, logits, 2000, {0}), logits.size());
  // Penalised logit 0.08: probability e^0.08 / (e^0.08 + 2) ~ 0.35.
  const double p0 = std::exp(0.08) / (std::exp(0.08) + 2.0);
  const double sigma = std::sqrt(2000 * p0 * (1 - p0));
  EXPECT_NEAR(c[0], 2000 * p0, 5 * sigma);
}

// --- min_tokens, logit_bias, allowed ids, OpenAI penalties ---------------------------------------

TEST(SamplerTest, MinTokensSuppressesEosAndStopIdsUntilReached) {
  const std::vector<float> logits = {0.0f, 9.0f, 8.0f, 7.0f, 1.0f};  // EOS 1, stop id 2
  SamplingParams p;
  p.min_tokens = 2;
  p.stop_token_ids = {2};
  const std::vector<int64_t> eos = {1};
  Sampler s(p, eos);
  const std::vector<int32_t> prompt_and_one = {4, 4, 0};  // prompt {4, 4}, 1 generated
  EXPECT_EQ(s.Sample(logits, prompt_and_one, 2), 3);
  const std::vector<int32_t> prompt_and_two = {4, 4, 0, 0};
  EXPECT_EQ(s.Sample(logits, prompt_and_two, 2), 1);
  // ignore_eos: EOS is never a stop, so it is not suppressed; the stop ids still are.
  p.ignore_eos = true;
  Sampler t(p, eos);
  EXPECT_EQ(t.Sample(logits, prompt_and_one, 2), 1);
  std::vector<float> no_eos = logits;
  no_eos[1] = -1.0f;
  EXPECT_EQ(t.Sample(no_eos, prompt_and_one, 2), 3);
}

TEST(SamplerTest, LogitBiasAndAllowedIdsReachTheRow) {
  const std::vector<float> logits = {1.0f, 2.0f, 3.0f, 0.0f};
  SamplingParams p;
  p.logit_bias = {{0, 2.5f}, {2, -100.0f}};
  Sampler s(p);
  EXPECT_EQ(s.Sample(logits, {}), 0);  // 3.5 > 2 > -97
  p.allowed_token_ids = {2, 3};
  Sampler a(p);
  EXPECT_EQ(a.Sample(logits, {}), 3);  // 0 and 1 masked; 2 biased down to -97
}

TEST(SamplerTest, FrequencyAndPresencePenaltiesCountOnlyGeneratedTokens) {
  SamplingParams p;
  p.frequency_penalty = 1.0f;
  p.presence_penalty = 0.5f;
  Sampler s(p);
  const std::vector<int32_t> ctx = {0, 0, 1, 1, 1};  // prompt {0, 0}; generated {1, 1, 1}
  SampleScratch scratch;
  std::vector<double> x;
  ProcessLogits(std::vector<float>{2.0f, 4.0f, 0.0f}, s.NextRow(ctx, 2), &scratch, &x);
  EXPECT_THAT(x, ElementsAre(2.0, 4.0 - 3.0 - 0.5, 0.0));
}

TEST(SamplerTest, RowCarriesLogprobsRequest) {
  SamplingParams p;
  Sampler off(p);
  EXPECT_EQ(off.NextRow({}, 0).logprobs, -1);
  p.logprobs = 0;
  EXPECT_EQ(Sampler(p).NextRow({}, 0).logprobs, 0);
  p.logprobs = 20;
  EXPECT_EQ(Sampler(p).NextRow({}, 0).logprobs, 20);
}

// --- SamplingParams::Validate -------------------------------------------------------------------

TEST(SamplingParamsTest, DefaultsAndBoundaryValuesAreValid) {
  SamplingParams p;
  EXPECT_OK(p.Validate(100));
  p.temperature = 0.0f;
  p.top_p = 1.0f;
  p.min_p = 1.0f;
  p.top_k = 0;
  p.max_tokens = 1;
  p.repetition_penalty = 0.01f;
  p.stop_token_ids = {0, 99};
  p.stop_strings = {"x", "\n\n"};
  EXPECT_OK(p.Validate(100));
  p.temperature = 5.0f;
  p.top_p = 1e-6f;
  p.min_p = 0.0f;
  p.top_k = 1000000;  // larger than the vocabulary is fine (no filtering)
  EXPECT_OK(p.Validate(100));
}

struct BadParamCase {
  const char* name;
  void (*mutate)(SamplingParams&);
  const char* field;
};

class SamplingParamsBadTest : public ::testing::TestWithParam<BadParamCase> {};

TEST_P(SamplingParamsBadTest, RejectedWithInvalidArgumentNamingTheField) {
  SamplingParams p;
  GetParam().mutate(p);
  EXPECT_THAT(p.Validate(/*vocab_size=*/100),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr(GetParam().field)));
}

INSTANTIATE_TEST_SUITE_P(
    Fields, SamplingParamsBadTest,
    ::testing::Values(
        BadParamCase{"TemperatureNegative", [](SamplingParams& p) { p.temperature = -1.0f; },
                     "temperature"},
        BadParamCase{"TemperatureNaN",
                     [](SamplingParams& p) { p.temperature = std::numeric_limits<float>::quiet_NaN(); },
                     "temperature"},
        BadParamCase{"TemperatureInf",
                     [](SamplingParams& p) { p.temperature = std::numeric_limits<float>::infinity(); },
                     "temperature"},
        BadParamCase{"TopPZero", [](SamplingParams& p) { p.top_p = 0.0f; }, "top_p"},
        BadParamCase{"TopPAboveOne", [](SamplingParams& p) { p.top_p = 1.5f; }, "top_p"},
        BadParamCase{"TopPNaN",
                     [](SamplingParams& p) { p.top_p = std::numeric_limits<float>::quiet_NaN(); },
                     "top_p"},
        BadParamCase{"MinPTwo", [](SamplingParams& p) { p.min_p = 2.0f; }, "min_p"},
        BadParamCase{"MinPNegative", [](SamplingParams& p) { p.min_p = -0.1f; }, "min_p"},
        BadParamCase{"TopKNegative", [](SamplingParams& p) { p.top_k = -1; }, "top_k"},
        BadParamCase{"RepetitionPenaltyZero", [](SamplingParams& p) { p.repetition_penalty = 0.0f; },
                     "repetition_penalty"},
        BadParamCase{"RepetitionPenaltyNegative",
                     [](SamplingParams& p) { p.repetition_penalty = -1.0f; }, "repetition_penalty"},
        BadParamCase{"MaxTokensZero", [](SamplingParams& p) { p.max_tokens = 0; }, "max_tokens"},
        BadParamCase{"StopIdEqualsVocab", [](SamplingParams& p) { p.stop_token_ids = {3, 100}; },
                     "stop_token_ids: id 100"},
        BadParamCase{"StopIdNegative", [](SamplingParams& p) { p.stop_token_ids = {-1}; },
                     "stop_token_ids: id -1"},
        BadParamCase{"EmptyStopString", [](SamplingParams& p) { p.stop_strings = {"ok", ""}; },
                     "stop strings"}),
    [](const ::testing::TestParamInfo<BadParamCase>& i) { return std::string(i.param.name); });

}  // namespace
}  // namespace lorc
