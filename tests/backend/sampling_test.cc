// The sampling contract (backend/sampling.h): its CPU reference over the whole accepted range of
// every option, the processing order, raw log-probabilities, and CpuBackend::Sample.
#include "backend/sampling.h"

#include <cmath>
#include <limits>
#include <random>
#include <set>
#include <vector>

#include "backend/backend.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/status_matchers.h"

namespace lorc {
namespace {

using ::lorc::testing::StatusIs;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr double kNegInfD = -std::numeric_limits<double>::infinity();

// A model-like row: 4096 logits, mostly N(0, 2), a handful of clear favourites.
std::vector<float> RealishLogits(uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d(0.0f, 2.0f);
  std::vector<float> l(4096);
  for (float& x : l) x = d(rng);
  for (int j = 0; j < 5; ++j) l[rng() % l.size()] = 12.0f + static_cast<float>(j) * 0.7f;
  return l;
}

std::vector<double> Processed(const std::vector<float>& logits, const SamplingRow& row) {
  SampleScratch scratch;
  std::vector<double> x;
  ProcessLogits(logits, row, &scratch, &x);
  return x;
}

int32_t Sample(const std::vector<float>& logits, const SamplingRow& row) {
  SampleScratch scratch;
  return SampleRow(logits, row, &scratch);
}

// --- fault 1: extreme values ----------------------------------------------------------------------

TEST(SamplingContractTest, ExtremeValuesGiveValidIdsAndGreedyWhereGreedyEquivalent) {
  const std::vector<int32_t> context = {3, 17, 17, 4000, 12};
  int checked_greedy = 0;
  for (uint32_t trial = 0; trial < 4; ++trial) {
    const std::vector<float> logits = RealishLogits(100 + trial);
    for (float temperature : {1e-38f, 1e-30f, 1e-6f, 1e-5f, 0.7f, 1e5f, 3e38f}) {
      for (float rp : {1.0f, 1e-38f, 3e38f}) {
        for (float top_p : {1.0f, 0.5f, 1e-38f}) {
          for (float min_p : {0.0f, 0.3f, 1.0f}) {
            for (int32_t top_k : {0, 1, 7}) {
              SamplingRow row;
              row.temperature = temperature;
              row.repetition_penalty = rp;
              row.top_p = top_p;
              row.min_p = min_p;
              row.top_k = top_k;
              row.penalty_tokens = context.data();
              row.num_penalty_tokens = static_cast<int64_t>(context.size());
              row.seed = 1;
              row.offset = trial;
              SCOPED_TRACE(::testing::Message() << "T " << temperature << " rp " << rp << " top_p "
                                                << top_p << " min_p " << min_p << " top_k " << top_k);
              const std::vector<double> x = Processed(logits, row);
              for (double v : x) ASSERT_FALSE(std::isnan(v));
              const int32_t token = Sample(logits, row);
              ASSERT_GE(token, 0);
              ASSERT_LT(token, 4096);
              ASSERT_GT(x[token], kNegInfD);
              // Greedy-equivalent: tiny temperature, top-k 1, a tiny top-p, min-p 1 (no ties in
              // these rows), and temperature 1e-5 when the top two differ by far more than it.
              std::vector<double> sorted = x;
              std::sort(sorted.rbegin(), sorted.rend());
              const bool greedy = temperature < 1e-5f || top_k == 1 || top_p < 1e-30f ||
                                  min_p == 1.0f ||
                                  (temperature <= 1e-5f && sorted[0] - sorted[1] > 1e-2);
              if (greedy) {
                ASSERT_EQ(token, ArgMax(absl::MakeConstSpan(x)));
                ++checked_greedy;
              }
            }
          }
        }
      }
    }
  }
  EXPECT_GT(checked_greedy, 1000);
}

TEST(SamplingContractTest, IssueSevenTemperature1e38IsGreedyWithAndWithoutTopK1) {
  // The reported fault: logits / 1e-38 overflowed to inf and inf - inf gave NaN, so the draw
  // fell through to the last candidate (ids 4095, 4093, ...).
  for (uint32_t trial = 0; trial < 20; ++trial) {
    const std::vector<float> logits = RealishLogits(trial);
    for (int32_t top_k : {0, 1}) {
      SamplingRow row;
      row.temperature = 1e-38f;
      row.top_k = top_k;
      row.seed = 1;
      row.offset = trial;
      EXPECT_EQ(Sample(logits, row), ArgMax(logits));
    }
  }
}

TEST(SamplingContractTest, HugeTemperatureIsUniformOverTheCandidates) {
  const std::vector<float> logits = RealishLogits(7);
  std::set<int32_t> seen;
  SamplingRow row;
  row.temperature = 3e38f;
  row.seed = 5;
  for (uint64_t i = 0; i < 400; ++i) {
    row.offset = i;
    seen.insert(Sample(logits, row));
  }
  EXPECT_GT(seen.size(), 350u);  // 400 draws from 4096 equally likely ids: ~380 distinct
  row.top_k = 3;                 // but the filters still apply
  std::set<int32_t> top3;
  for (uint64_t i = 0; i < 100; ++i) {
    row.offset = i;
    top3.insert(Sample(logits, row));
  }
  EXPECT_EQ(top3.size(), 3u);
}

TEST(SamplingContractTest, ReproducibleBySeedAndOffsetAtEveryTemperature) {
  const std::vector<float> logits = RealishLogits(9);
  for (float t : {1e-5f, 0.5f, 1.0f, 1e5f, 3e38f}) {
    SamplingRow a, b, c;
    a.temperature = b.temperature = c.temperature = t;
    a.seed = b.seed = 77;
    c.seed = 78;
    std::vector<int32_t> da, db, dc;
    for (uint64_t i = 0; i < 64; ++i) {
      a.offset = b.offset = c.offset = i;
      da.push_back(Sample(logits, a));
      db.push_back(Sample(logits, b));
      dc.push_back(Sample(logits, c));
    }
    EXPECT_EQ(da, db) << t;
    if (t >= 1e5f) {
      EXPECT_NE(da, dc) << t;
    }
  }
}

TEST(SamplingContractTest, NaNCountsAsMinusInfinity) {
  std::vector<float> l = {kNaN, 1.0f, kNaN, 0.5f};
  EXPECT_EQ(ArgMax(l), 1);
  SamplingRow row;
  row.temperature = 1.0f;
  for (uint64_t i = 0; i < 200; ++i) {
    row.offset = i;
    const int32_t t = Sample(l, row);
    EXPECT_TRUE(t == 1 || t == 3) << t;
  }
  // Nothing with finite mass: ArgMax of the processed logits (0: every one is -inf).
  std::vector<float> none = {kNaN, -kInf, kNaN};
  EXPECT_EQ(Sample(none, row), 0);
  row.temperature = 0.0f;
  EXPECT_EQ(Sample(none, row), 0);
  // +inf logits take all the mass (no inf - inf).
  std::vector<float> inf = {0.0f, kInf, 3.0f, kInf};
  row.temperature = 2.0f;
  for (uint64_t i = 0; i < 50; ++i) {
    row.offset = i;
    const int32_t t = Sample(inf, row);
    EXPECT_TRUE(t == 1 || t == 3) << t;
  }
}

// A row with a NaN or an infinity anywhere is reported (the worker fails its request); the token
// is still the contract's (NaN as -inf).
TEST(SamplingContractTest, CpuBackendReportsRowsWithNonFiniteLogits) {
  EXPECT_TRUE(RowIsFinite(std::vector<float>{0.0f, -3e38f, 3e38f}));
  EXPECT_TRUE(RowIsFinite(std::vector<float>{}));
  for (float bad : {kNaN, kInf, -kInf}) {
    EXPECT_FALSE(RowIsFinite(std::vector<float>{1.0f, bad, 2.0f})) << bad;
  }
  auto backend = CreateBackend({});
  ASSERT_OK(backend);
  std::vector<float> data = {0.5f, 2.0f, 1.0f, 0.0f,   // finite
                             0.5f, kNaN, 1.0f, 0.0f,   // one NaN
                             kNaN, kNaN, kNaN, kNaN,   // NaN weights
                             0.5f, 2.0f, -kInf, 0.0f};  // -inf
  const Tensor2D logits{data.data(), DType::kF32, 4, 4, 4};
  std::vector<SamplingRow> rows(5);
  for (int i = 0; i < 4; ++i) rows[i].logits_row = i;
  rows[4].logits_row = 2;
  rows[4].temperature = 1.0f;
  rows[4].logprobs = 2;
  SampleOutput out;
  ASSERT_OK((*backend)->Sample(logits, rows, &out));
  EXPECT_EQ(out.non_finite, (std::vector<uint8_t>{0, 1, 1, 1, 1}));
  EXPECT_EQ(out.tokens[0], 1);
  EXPECT_EQ(out.tokens[1], 2);  // NaN as -inf
  EXPECT_EQ(out.tokens[2], 0);  // nothing finite
  EXPECT_EQ(out.tokens[4], 0);
}

// --- the processing order -------------------------------------------------------------------------

TEST(SamplingContractTest, AllowedTokenIdsMaskEverythingElse) {
  const std::vector<float> logits = RealishLogits(3);
  const std::vector<int32_t> allowed = {5, 900, 4095, -3, 5000};  // out-of-range ids ignored
  SamplingRow row;
  row.allowed_token_ids = allowed.data();
  row.num_allowed_token_ids = static_cast<int64_t>(allowed.size());
  row.temperature = 1.0f;
  std::set<int32_t> seen;
  for (uint64_t i = 0; i < 300; ++i) {
    row.offset = i;
    seen.insert(Sample(logits, row));
  }
  EXPECT_THAT(seen, ::testing::IsSubsetOf({5, 900, 4095}));
  row.temperature = 0.0f;
  const int32_t want = logits[5] >= logits[900] && logits[5] >= logits[4095]
                           ? 5
                           : (logits[900] >= logits[4095] ? 900 : 4095);
  EXPECT_EQ(Sample(logits, row), want);
}

TEST(SamplingContractTest, MinTokensSuppressesStopIdsUntilEnoughWereGenerated) {
  const std::vector<float> logits = {0.0f, 5.0f, 4.0f, 1.0f};  // 1: EOS, 2: a stop id
  const std::vector<int32_t> stop = {1, 2};
  const std::vector<int32_t> out = {3, 3};
  SamplingRow row;
  row.min_tokens = 3;
  row.stop_ids = stop.data();
  row.num_stop_ids = 2;
  row.output_tokens = out.data();
  row.num_output_tokens = 2;  // 2 < 3: suppressed
  EXPECT_EQ(Sample(logits, row), 3);
  row.num_output_tokens = 0;
  EXPECT_EQ(Sample(logits, row), 3);
  row.min_tokens = 2;
  row.num_output_tokens = 2;  // reached
  EXPECT_EQ(Sample(logits, row), 1);
}

TEST(SamplingContractTest, OrderIsBiasThenRepetitionThenFrequencyAndPresence) {
  const std::vector<float> logits = {1.0f, 2.0f, -1.0f, 0.5f, 3.0f};
  const std::vector<int32_t> bias_ids = {0, 2};
  const std::vector<float> bias = {-2.0f, 4.0f};
  const std::vector<int32_t> history = {7, 0, 2, 4, 4, 4};  // prompt {7, 0}; generated {2, 4, 4, 4}
  SamplingRow row;
  row.logit_bias_ids = bias_ids.data();
  row.logit_bias_values = bias.data();
  row.num_logit_bias = 2;
  row.repetition_penalty = 2.0f;
  row.penalty_tokens = history.data();
  row.num_penalty_tokens = 6;
  row.frequency_penalty = 0.5f;
  row.presence_penalty = 0.25f;
  row.output_tokens = history.data() + 2;
  row.num_output_tokens = 4;
  // 0: 1 - 2 = -1 (bias), * 2 = -2 (repetition: in the prompt), not generated.
  // 1: untouched. 2: -1 + 4 = 3, / 2 = 1.5, - 0.5 - 0.25 = 0.75. 3: untouched.
  // 4: 3 / 2 = 1.5, - 0.5 * 3 - 0.25 = -0.25.
  EXPECT_THAT(Processed(logits, row), ElementsAre(-2.0, 2.0, 0.75, 0.5, -0.25));
  EXPECT_EQ(Sample(logits, row), 1);
  // Negative penalties reward repetition.
  row.frequency_penalty = -2.0f;
  row.presence_penalty = -2.0f;
  EXPECT_THAT(Processed(logits, row), ElementsAre(-2.0, 2.0, 5.5, 0.5, 9.5));
  EXPECT_EQ(Sample(logits, row), 4);
}

TEST(SamplingContractTest, RepetitionPenaltyExtremesStayFinite) {
  const std::vector<float> logits = {3e38f, -3e38f, 1.0f, -1.0f};
  const std::vector<int32_t> ctx = {0, 1, 2, 3};
  for (float rp : {1e-38f, 3e38f}) {
    SamplingRow row;
    row.repetition_penalty = rp;
    row.penalty_tokens = ctx.data();
    row.num_penalty_tokens = 4;
    for (double v : Processed(logits, row)) EXPECT_TRUE(std::isfinite(v)) << rp << " " << v;
    row.temperature = 1.0f;
    const int32_t t = Sample(logits, row);
    EXPECT_GE(t, 0);
    EXPECT_LT(t, 4);
  }
}

// --- log-probabilities ----------------------------------------------------------------------------

TEST(SamplingContractTest, LogprobsOfTheRawDistributionRankAndTopN) {
  const std::vector<float> logits = {1.0f, 3.0f, 3.0f, -2.0f, 0.5f, kNaN};
  double z = 0;
  for (float l : logits) z += std::isnan(l) ? 0.0 : std::exp(static_cast<double>(l));
  SampleScratch scratch;
  float lp = 0;
  int32_t rank = 0;
  std::vector<int32_t> ids(4);
  std::vector<float> lps(4);
  ComputeLogprobs(logits, 4, 4, &scratch, &lp, &rank, ids.data(), lps.data());
  EXPECT_NEAR(lp, 0.5 - std::log(z), 1e-6);
  EXPECT_EQ(rank, 4);  // 1, 2 and 0 are higher
  EXPECT_THAT(ids, ElementsAre(1, 2, 0, 4));  // ties by id
  EXPECT_NEAR(lps[0], 3.0 - std::log(z), 1e-6);
  EXPECT_FLOAT_EQ(lps[0], lps[1]);
  ComputeLogprobs(logits, 2, 0, &scratch, &lp, &rank, nullptr, nullptr);
  EXPECT_EQ(rank, 1);  // a tie is not strictly higher
  ComputeLogprobs(logits, 5, 0, &scratch, &lp, &rank, nullptr, nullptr);
  EXPECT_EQ(lp, -kInf);
  EXPECT_EQ(rank, 6);
}

TEST(SamplingContractTest, CpuBackendSampleReturnsTokensAndRawLogprobsWithoutTouchingLogits) {
  auto backend = CreateBackend({});
  ASSERT_OK(backend);
  std::vector<float> data = RealishLogits(11);
  data.resize(2 * 4096);
  for (size_t i = 0; i < 4096; ++i) data[4096 + i] = -data[i];
  const std::vector<float> before = data;
  const Tensor2D logits{data.data(), DType::kF32, 2, 4096, 4096};
  const std::vector<int32_t> ctx = {ArgMax(absl::MakeConstSpan(data).subspan(0, 4096))};
  std::vector<SamplingRow> rows(3);
  rows[0].logits_row = 0;             // greedy, logprobs 0
  rows[0].logprobs = 0;
  rows[1].logits_row = 0;             // the same row, penalised and hot: raw logprobs all the same
  rows[1].repetition_penalty = 3e38f;
  rows[1].penalty_tokens = ctx.data();
  rows[1].num_penalty_tokens = 1;
  rows[1].temperature = 2.0f;
  rows[1].logprobs = 20;
  rows[2].logits_row = 1;             // no logprobs
  SampleOutput out;
  ASSERT_OK((*backend)->Sample(logits, rows, &out));
  EXPECT_EQ(data, before);
  ASSERT_EQ(out.tokens.size(), 3u);
  EXPECT_EQ(out.tokens[0], ctx[0]);
  EXPECT_NE(out.tokens[1], ctx[0]);
  EXPECT_EQ(out.tokens[2], ArgMax(absl::MakeConstSpan(data).subspan(4096)));
  EXPECT_EQ(out.ranks[0], 1);
  EXPECT_GT(out.ranks[1], 1);
  EXPECT_EQ(out.ranks[2], 0);  // not asked
  const int32_t at = SampleOutput::kStride;
  EXPECT_EQ(out.top_ids[at], ctx[0]);
  for (int32_t j = 1; j < 20; ++j) {
    EXPECT_GE(out.top_logprobs[at + j - 1], out.top_logprobs[at + j]);
  }
  SampleScratch scratch;
  float lp;
  int32_t rank;
  ComputeLogprobs(absl::MakeConstSpan(data).subspan(0, 4096), out.tokens[1], 0, &scratch, &lp,
                  &rank, nullptr, nullptr);
  EXPECT_EQ(out.logprobs[1], lp);
  EXPECT_EQ(out.ranks[1], rank);

  rows[2].logits_row = 2;
  EXPECT_THAT((*backend)->Sample(logits, rows, &out),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("logits row 2 of 2")));
  rows[2].logits_row = 1;
  rows[2].logprobs = 21;
  EXPECT_THAT((*backend)->Sample(logits, rows, &out),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("21 logprobs")));
}

}  // namespace
}  // namespace lorc
