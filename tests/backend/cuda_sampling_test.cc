// Parity of CudaBackend::Sample with the CPU reference (backend/sampling.h): thousands of seeded
// random rows over every option and their combinations (greedy, temperatures down to 1e-38 and
// up to 3e38, top-k, top-p, min-p, repetition / frequency / presence penalties, logit bias with
// repeated and out-of-vocabulary ids, allowed ids, min_tokens stop masks, NaN / inf logits, ties,
// several rows per logits row), vocab 4096 and 128256. Tokens must be equal; log-probabilities
// within 1e-5 (absolute), ranks and top ids equal. Skipped without a CUDA device.
#include <cmath>
#include <cstdlib>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "tests/backend/cuda_parity_fixture.h"
#include "backend/backend.h"
#include "backend/cuda_backend.h"
#include "common/check.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/status_matchers.h"

namespace lorc {
namespace {

using ::lorc::testing::StatusIs;
using ::testing::HasSubstr;

constexpr float kInf = std::numeric_limits<float>::infinity();

// One random row and the lists its pointers refer to.
struct RowLists {
  std::vector<int32_t> allowed, stop, bias_ids, penalty, output;
  std::vector<float> bias_values;
};

class CudaSamplingTest : public CpuCudaPair<> {
 protected:
  template <typename T>
  T Pick(std::initializer_list<T> v) {
    return v.begin()[std::uniform_int_distribution<size_t>(0, v.size() - 1)(rng_)];
  }
  bool Coin(double p) { return std::uniform_real_distribution<double>(0, 1)(rng_) < p; }
  int32_t Id(int64_t vocab, bool allow_out = false) {
    if (allow_out && Coin(0.05)) return Pick<int32_t>({-1, static_cast<int32_t>(vocab), 1 << 30});
    return std::uniform_int_distribution<int32_t>(0, static_cast<int32_t>(vocab) - 1)(rng_);
  }

  // Logits rows: normal with a random scale; some rows coarse (many ties), some with NaN/inf.
  std::vector<float> Logits(int64_t rows, int64_t vocab) {
    std::vector<float> v(rows * vocab);
    for (int64_t r = 0; r < rows; ++r) {
      float* row = &v[r * vocab];
      const float scale = Pick<float>({0.05f, 1.f, 4.f, 30.f});
      std::normal_distribution<float> d(0.f, scale);
      const bool coarse = Coin(0.3);
      for (int64_t i = 0; i < vocab; ++i) {
        row[i] = d(rng_);
        if (coarse) row[i] = std::round(row[i] * 2) / 2;
      }
      const int kind = std::uniform_int_distribution<int>(0, 9)(rng_);
      if (kind == 0) {  // NaN and inf sprinkled
        for (int j = 0; j < 20; ++j) row[Id(vocab)] = Pick<float>({NAN, kInf, -kInf, -kInf});
      } else if (kind == 1) {
        for (int64_t i = 0; i < vocab; ++i) row[i] = Coin(0.5) ? NAN : -kInf;  // nothing finite
      } else if (kind == 2) {
        for (int64_t i = 0; i < vocab; ++i) {
          if (Coin(0.9)) row[i] = -kInf;  // few candidates
        }
      } else if (kind == 3) {
        for (int j = 0; j < 5; ++j) row[Id(vocab)] = row[0];  // ties with a top value
        row[Id(vocab)] = 1e30f;
        row[Id(vocab)] = 1e30f;
      }
    }
    return v;
  }

  SamplingRow RandomRow(int64_t vocab, int32_t logits_rows, RowLists* l) {
    SamplingRow r;
    r.logits_row = std::uniform_int_distribution<int32_t>(0, logits_rows - 1)(rng_);
    r.temperature = Pick<float>({0.f, 1e-38f, 1e-6f, 1e-5f, 0.05f, 0.8f, 1.f, 1.7f, 1e6f, 3e38f});
    r.top_k = Coin(0.4) ? Pick<int32_t>({1, 2, 5, 40, 1000, static_cast<int32_t>(vocab) + 7}) : 0;
    if (select_edges_ && Coin(0.3)) {  // the selection's edges: a full 1,024 and one below the vocabulary
      r.top_k = Pick<int32_t>({1024, static_cast<int32_t>(vocab) - 1});
    }
    r.top_p = Coin(0.5) ? Pick<float>({0.01f, 0.5f, 0.9f, 0.95f, 0.999f}) : 1.f;
    r.min_p = Coin(0.3) ? Pick<float>({0.001f, 0.05f, 0.5f, 1.f}) : 0.f;
    const int out_n = Coin(0.5) ? std::uniform_int_distribution<int>(0, 40)(rng_) : 0;
    for (int j = 0; j < out_n; ++j) l->output.push_back(Coin(0.3) ? Id(8) : Id(vocab, true));
    if (Coin(0.3)) {
      r.repetition_penalty = Pick<float>({0.7f, 1.1f, 1.5f});
      l->penalty = l->output;
      for (int j = 0; j < 60; ++j) l->penalty.push_back(Id(vocab, true));
    }
    if (Coin(0.3)) {
      r.frequency_penalty = Pick<float>({0.f, -1.3f, 0.7f, 2.f});
      r.presence_penalty = Pick<float>({0.f, 0.4f, -2.f});
    }
    if (Coin(0.3)) {
      const int nb = std::uniform_int_distribution<int>(1, 30)(rng_);
      for (int j = 0; j < nb; ++j) {
        l->bias_ids.push_back(Coin(0.2) && !l->bias_ids.empty() ? l->bias_ids[0] : Id(vocab, true));
        l->bias_values.push_back(Pick<float>({-100.f, -3.3f, 0.1f, 5.f, 100.f}));
      }
    }
    if (Coin(0.15)) {
      const int na = Pick<int>({1, 3, 50, 2000});
      for (int j = 0; j < na; ++j) l->allowed.push_back(Id(vocab, true));
    }
    if (Coin(0.3)) {
      r.min_tokens = Pick<int32_t>({0, 5, 100});
      for (int j = 0; j < 4; ++j) l->stop.push_back(Coin(0.5) ? 0 : Id(vocab, true));
    }
    r.seed = rng_();
    r.offset = rng_() % 1000;
    r.logprobs = Coin(0.3) ? Pick<int32_t>({0, 1, 5, 20}) : -1;
    return r;
  }

  static void Point(SamplingRow* r, const RowLists& l) {
    r->allowed_token_ids = l.allowed.data();
    r->num_allowed_token_ids = static_cast<int64_t>(l.allowed.size());
    r->stop_ids = l.stop.data();
    r->num_stop_ids = static_cast<int64_t>(l.stop.size());
    r->logit_bias_ids = l.bias_ids.data();
    r->logit_bias_values = l.bias_values.data();
    r->num_logit_bias = static_cast<int64_t>(l.bias_ids.size());
    r->penalty_tokens = l.penalty.data();
    r->num_penalty_tokens = static_cast<int64_t>(l.penalty.size());
    r->output_tokens = l.output.data();
    r->num_output_tokens = static_cast<int64_t>(l.output.size());
  }

  // Runs `batches` random batches of `rows` rows over `logits_rows` logits rows on both backends.
  void Parity(int64_t vocab, int batches, int rows, int logits_rows) {
    int64_t total = 0, sampled = 0, broken = 0;
    for (int b = 0; b < batches; ++b) {
      const std::vector<float> host = Logits(logits_rows, vocab);
      auto dev = cuda_->Allocate(host.size() * sizeof(float));
      ASSERT_OK(dev);
      ASSERT_OK(cuda_->CopyToDevice(dev->data(), host.data(), host.size() * sizeof(float)));
      std::vector<RowLists> lists(rows);
      std::vector<SamplingRow> rs(rows);
      for (int i = 0; i < rows; ++i) rs[i] = RandomRow(vocab, logits_rows, &lists[i]);
      for (int i = 0; i < rows; ++i) Point(&rs[i], lists[i]);
      Tensor2D cpu_t{const_cast<float*>(host.data()), DType::kF32, logits_rows, vocab};
      Tensor2D gpu_t{dev->data(), DType::kF32, logits_rows, vocab};
      SampleOutput want, got;
      ASSERT_OK(cpu_->Sample(cpu_t, rs, &want));
      ASSERT_OK(cuda_->Sample(gpu_t, rs, &got));
      for (int i = 0; i < rows; ++i) {
        const SamplingRow& r = rs[i];
        sampled += !(r.temperature < defaults::kGreedyTemperature || r.top_k == 1);
        ASSERT_EQ(got.tokens[i], want.tokens[i])
            << "vocab " << vocab << " batch " << b << " row " << i << ": temperature " << r.temperature
            << " top_k " << r.top_k << " top_p " << r.top_p << " min_p " << r.min_p << " rep "
            << r.repetition_penalty << " freq " << r.frequency_penalty << " pres " << r.presence_penalty
            << " bias " << r.num_logit_bias << " allowed " << r.num_allowed_token_ids << " min_tokens "
            << r.min_tokens;
        ASSERT_EQ(got.non_finite[i], want.non_finite[i]) << "row " << i;
        broken += want.non_finite[i];
        if (r.logprobs < 0) continue;
        auto near = [](float g, float w) { return g == w || std::abs(g - w) <= 1e-5f; };
        EXPECT_TRUE(near(got.logprobs[i], want.logprobs[i])) << got.logprobs[i] << " vs " << want.logprobs[i];
        EXPECT_EQ(got.ranks[i], want.ranks[i]);
        for (int j = 0; j < r.logprobs; ++j) {
          const size_t at = static_cast<size_t>(i) * SampleOutput::kStride + j;
          ASSERT_EQ(got.top_ids[at], want.top_ids[at]) << "row " << i << " top " << j;
          EXPECT_TRUE(near(got.top_logprobs[at], want.top_logprobs[at]));
        }
      }
      total += rows;
    }
    EXPECT_GT(broken, 0) << "no row with a NaN or an infinity was drawn";
    EXPECT_LT(broken, total);
    std::printf("vocab %lld: %lld rows (%lld sampled, %lld non-finite) token-exact\n",
                static_cast<long long>(vocab), static_cast<long long>(total), static_cast<long long>(sampled),
                static_cast<long long>(broken));
  }

  std::mt19937_64 rng_{20261130};
  bool select_edges_ = false;  // RandomRow also draws top_k 1024 and vocab - 1
};

TEST_F(CudaSamplingTest, TokenParityVocab4096) { Parity(4096, 60, 64, 24); }
TEST_F(CudaSamplingTest, TokenParityVocab4096Batch256) { Parity(4096, 4, 256, 256); }
TEST_F(CudaSamplingTest, TokenParityVocab128256) { Parity(128256, 8, 48, 16); }
TEST_F(CudaSamplingTest, TokenParityOddVocab) { Parity(1000, 20, 33, 7); }
// Few rows: the sampled ones sorted one by one (kernels::kSampleDeviceSortRows).
TEST_F(CudaSamplingTest, TokenParitySmallBatches) {
  Parity(128256, 12, 2, 2);
  Parity(4096, 40, 16, 3);  // about 2 / 3 of 16 rows sampled: batches on both sides of the limit
}

// Remakes the fixture's CUDA backend with LORC_SAMPLE_SELECT set to `value` (read when a
// backend makes its sampler, at creation), then restores the variable.
void RemakeWithSelect(std::unique_ptr<Backend>* cuda, const char* value) {
  const char* old = std::getenv("LORC_SAMPLE_SELECT");
  const std::string saved = old != nullptr ? old : "";
  if (value != nullptr) {
    setenv("LORC_SAMPLE_SELECT", value, 1);
  } else {
    unsetenv("LORC_SAMPLE_SELECT");
  }
  auto made = CreatePartialCudaBackend(BackendOptions{BackendKind::kCuda});
  if (old != nullptr) {
    setenv("LORC_SAMPLE_SELECT", saved.c_str(), 1);
  } else {
    unsetenv("LORC_SAMPLE_SELECT");
  }
  ASSERT_OK(made);
  *cuda = std::move(*made);
}

CudaSampleCounters Counters(const Backend& b) {
  auto c = GetCudaSampleCounters(b);
  CHECK(c.ok()) << c.status();
  return *c;
}

// Selected rows without the backoff (LORC_SAMPLE_SELECT=2; kernels/sampling_select.cu): top-k rows
// (2..1024 below the vocabulary) and prefix rows (no top-k cut) in every call, the prefix rows of
// flat logits (scale 0.05, high temperatures) sampled again sorted whole, those of peaked ones
// (scale 30, low temperatures) drawn from their prefix: the same tokens and log-probabilities as
// the CPU reference, with ties (coarse rows, repeated top values), rows of few finite candidates,
// top_k 1024 and vocab - 1, batches mixing selected, sorted and greedy rows, and batches of two
// rows (often nothing sorted whole). The counters show that each path ran.
TEST_F(CudaSamplingTest, TokenParitySelected) {
  RemakeWithSelect(&cuda_, "2");
  select_edges_ = true;
  Parity(128256, 8, 48, 16);
  Parity(128256, 12, 2, 2);  // often every sampled row selected: nothing sorted whole
  Parity(4096, 30, 64, 24);
  Parity(4096, 30, 16, 3);
  Parity(1000, 10, 33, 7);  // a vocabulary of at most 1,024: no prefix rows
  const CudaSampleCounters c = Counters(*cuda_);
  std::printf("sorted whole %lld, top-k selected %lld, prefix %lld (sampled again %lld)\n",
              static_cast<long long>(c.sorted_whole), static_cast<long long>(c.top_k_selected),
              static_cast<long long>(c.prefix), static_cast<long long>(c.redone));
  EXPECT_GT(c.top_k_selected, 100);
  EXPECT_GT(c.redone, 20);               // prefix rows sampled again, sorted whole
  EXPECT_GT(c.prefix - c.redone, 100);   // prefix rows drawn from their prefix
  EXPECT_GT(c.sorted_whole, c.redone);   // rows with top_k in (1024, vocab), vocabulary 1000
  EXPECT_EQ(c.backoffs, 0);
}

// Every sampled row sorted whole (LORC_SAMPLE_SELECT=0): the path prefix rows fall back to.
TEST_F(CudaSamplingTest, TokenParitySortedWhole) {
  RemakeWithSelect(&cuda_, "0");
  Parity(128256, 4, 48, 16);
  Parity(128256, 6, 2, 2);
  Parity(4096, 20, 64, 24);
  const CudaSampleCounters c = Counters(*cuda_);
  EXPECT_GT(c.sorted_whole, 300);
  EXPECT_EQ(c.top_k_selected + c.prefix + c.redone + c.backoffs, 0);
}

// The default (LORC_SAMPLE_SELECT unset): prefix rows that keep falling past their prefix (flat
// logits: top-p 0.9 over near-equal logits crosses at ~0.9 of the vocabulary) turn prefix rows
// off for the next calls, which sort those rows whole; peaked rows do not; the tokens stay the
// CPU's throughout.
TEST_F(CudaSamplingTest, PrefixRowsBackOffAfterFlatRows) {
  RemakeWithSelect(&cuda_, nullptr);
  const int64_t vocab = 4096;
  std::vector<float> host(2 * vocab);
  for (int64_t i = 0; i < vocab; ++i) {
    host[i] = 0.001f * static_cast<float>(i % 7);  // row 0: flat
    host[vocab + i] = i == 17 ? 40.f : 0.f;        // row 1: one id holds the mass
  }
  auto dev = cuda_->Allocate(host.size() * sizeof(float));
  ASSERT_OK(dev);
  ASSERT_OK(cuda_->CopyToDevice(dev->data(), host.data(), host.size() * sizeof(float)));
  Tensor2D cpu_t{host.data(), DType::kF32, 2, vocab};
  Tensor2D gpu_t{dev->data(), DType::kF32, 2, vocab};
  auto rows_of = [](int32_t logits_row, uint64_t offset) {
    std::vector<SamplingRow> rs(4);
    for (int i = 0; i < 4; ++i) {
      rs[i].logits_row = logits_row;
      rs[i].temperature = 1.f;
      rs[i].top_p = 0.9f;
      rs[i].seed = 77 + i;
      rs[i].offset = offset;
      rs[i].logprobs = i == 0 ? 3 : -1;
    }
    return rs;
  };
  auto check = [&](const std::vector<SamplingRow>& rs) {
    SampleOutput want, got;
    ASSERT_OK(cpu_->Sample(cpu_t, rs, &want));
    ASSERT_OK(cuda_->Sample(gpu_t, rs, &got));
    EXPECT_EQ(got.tokens, want.tokens);
    EXPECT_EQ(got.ranks, want.ranks);
    EXPECT_EQ(got.top_ids, want.top_ids);
  };
  for (int i = 0; i < 20; ++i) check(rows_of(1, i));  // peaked: drawn from the prefix
  CudaSampleCounters c = Counters(*cuda_);
  EXPECT_EQ(c.prefix, 80);
  EXPECT_EQ(c.redone, 0);
  EXPECT_EQ(c.backoffs, 0);
  int calls = 0;
  while (Counters(*cuda_).backoffs == 0 && calls < 30) check(rows_of(0, 100 + calls++));  // flat
  c = Counters(*cuda_);
  EXPECT_EQ(c.backoffs, 1) << "after " << calls << " calls of flat rows";
  EXPECT_EQ(c.redone, 4 * calls);  // every flat row sampled again
  EXPECT_GT(calls, 1);             // one call does not decide
  check(rows_of(1, 200));  // backing off: sorted whole although peaked
  const CudaSampleCounters d = Counters(*cuda_);
  EXPECT_EQ(d.prefix, c.prefix);
  EXPECT_EQ(d.sorted_whole, c.sorted_whole + 4);
}

TEST_F(CudaSamplingTest, SameRowsSameTokensAcrossCalls) {  // steady state: buffers reused
  const int64_t vocab = 4096;
  const std::vector<float> host = Logits(4, vocab);
  auto dev = cuda_->Allocate(host.size() * sizeof(float));
  ASSERT_OK(dev);
  ASSERT_OK(cuda_->CopyToDevice(dev->data(), host.data(), host.size() * sizeof(float)));
  std::vector<RowLists> lists(16);
  std::vector<SamplingRow> rs(16);
  for (int i = 0; i < 16; ++i) rs[i] = RandomRow(vocab, 4, &lists[i]);
  for (int i = 0; i < 16; ++i) Point(&rs[i], lists[i]);
  Tensor2D t{dev->data(), DType::kF32, 4, vocab};
  SampleOutput first, again;
  ASSERT_OK(cuda_->Sample(t, rs, &first));
  ASSERT_OK(cuda_->Sample(t, absl::MakeConstSpan(rs).subspan(0, 3), &again));
  ASSERT_OK(cuda_->Sample(t, rs, &again));
  EXPECT_EQ(first.tokens, again.tokens);
  EXPECT_EQ(first.top_ids, again.top_ids);
}

TEST_F(CudaSamplingTest, InvalidRowsAreInvalidArgument) {
  auto dev = cuda_->Allocate(2 * 16 * sizeof(float));
  ASSERT_OK(dev);
  Tensor2D t{dev->data(), DType::kF32, 2, 16};
  SamplingRow r;
  r.logits_row = 2;
  SampleOutput out;
  EXPECT_THAT(cuda_->Sample(t, {r}, &out),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("reads logits row 2 of 2")));
  r.logits_row = -1;
  EXPECT_THAT(cuda_->Sample(t, {r}, &out), StatusIs(absl::StatusCode::kInvalidArgument));
  r.logits_row = 0;
  r.logprobs = SampleOutput::kStride + 1;
  EXPECT_THAT(cuda_->Sample(t, {r}, &out),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("logprobs")));
  r.logprobs = -2;
  EXPECT_THAT(cuda_->Sample(t, {r}, &out), StatusIs(absl::StatusCode::kInvalidArgument));
  Tensor2D bf16 = t;
  bf16.dtype = DType::kBF16;
  r.logprobs = -1;
  EXPECT_THAT(cuda_->Sample(bf16, {r}, &out), StatusIs(absl::StatusCode::kUnimplemented));
  ASSERT_OK(cuda_->Sample(t, {}, &out));
  EXPECT_TRUE(out.tokens.empty());
}

}  // namespace
}  // namespace lorc
