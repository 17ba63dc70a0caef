#include "backend/sampling.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

namespace lorc {
namespace {

constexpr double kNegInf = -std::numeric_limits<double>::infinity();

uint64_t SplitMix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

double Clean(float v) { return std::isnan(v) ? kNegInf : static_cast<double>(v); }

template <typename T>
int32_t ArgMaxOf(absl::Span<const T> v) {
  int32_t best = 0;
  T best_v = -std::numeric_limits<T>::infinity();
  for (size_t i = 0; i < v.size(); ++i) {
    if (v[i] > best_v) {  // false for NaN: it never wins
      best_v = v[i];
      best = static_cast<int32_t>(i);
    }
  }
  return best;
}

}  // namespace

void SampleOutput::Resize(size_t rows) {
  tokens.assign(rows, 0);
  logprobs.assign(rows, 0.0f);
  ranks.assign(rows, 0);
  top_ids.assign(rows * kStride, 0);
  top_logprobs.assign(rows * kStride, 0.0f);
  non_finite.assign(rows, 0);
}

bool RowIsFinite(absl::Span<const float> logits) {
  for (float v : logits) {
    if (!std::isfinite(v)) return false;
  }
  return true;
}

double CounterUniform(uint64_t seed, uint64_t offset) {
  const uint64_t bits = SplitMix64(SplitMix64(seed) ^ offset);
  return static_cast<double>(bits >> 11) * (1.0 / 9007199254740992.0);  // / 2^53
}

int32_t ArgMax(absl::Span<const float> v) { return ArgMaxOf(v); }
int32_t ArgMax(absl::Span<const double> v) { return ArgMaxOf(v); }

void ProcessLogits(absl::Span<const float> logits, const SamplingRow& row, SampleScratch* scratch,
                   std::vector<double>* x) {
  const int64_t vocab = static_cast<int64_t>(logits.size());
  auto in_vocab = [vocab](int32_t id) { return id >= 0 && id < vocab; };
  x->resize(logits.size());
  for (size_t i = 0; i < logits.size(); ++i) (*x)[i] = Clean(logits[i]);
  // 1. allowed_token_ids.
  if (row.num_allowed_token_ids > 0) {
    std::vector<uint8_t>& allowed = scratch->flags;
    allowed.assign(logits.size(), 0);
    for (int64_t j = 0; j < row.num_allowed_token_ids; ++j) {
      if (in_vocab(row.allowed_token_ids[j])) allowed[row.allowed_token_ids[j]] = 1;
    }
    for (size_t i = 0; i < logits.size(); ++i) {
      if (!allowed[i]) (*x)[i] = kNegInf;
    }
  }
  // 2. min_tokens.
  if (row.num_output_tokens < row.min_tokens) {
    for (int64_t j = 0; j < row.num_stop_ids; ++j) {
      if (in_vocab(row.stop_ids[j])) (*x)[row.stop_ids[j]] = kNegInf;
    }
  }
  // 3. logit_bias.
  for (int64_t j = 0; j < row.num_logit_bias; ++j) {
    if (in_vocab(row.logit_bias_ids[j])) (*x)[row.logit_bias_ids[j]] += row.logit_bias_values[j];
  }
  // 4. Repetition penalty, each distinct id once.
  if (row.repetition_penalty != 1.0f && row.num_penalty_tokens > 0) {
    const double rp = row.repetition_penalty;
    std::vector<uint8_t>& seen = scratch->flags;
    seen.assign(logits.size(), 0);
    for (int64_t j = 0; j < row.num_penalty_tokens; ++j) {
      const int32_t t = row.penalty_tokens[j];
      if (!in_vocab(t) || seen[t]) continue;
      seen[t] = 1;
      double& l = (*x)[t];
      l = l > 0 ? l / rp : l * rp;
    }
  }
  // 5. Frequency and presence penalties over the generated tokens.
  if ((row.frequency_penalty != 0.0f || row.presence_penalty != 0.0f) &&
      row.num_output_tokens > 0) {
    std::vector<int32_t>& counts = scratch->counts;
    counts.assign(logits.size(), 0);
    for (int64_t j = 0; j < row.num_output_tokens; ++j) {
      if (in_vocab(row.output_tokens[j])) ++counts[row.output_tokens[j]];
    }
    for (size_t i = 0; i < logits.size(); ++i) {
      if (counts[i] > 0) {
        (*x)[i] -= static_cast<double>(row.frequency_penalty) * counts[i] + row.presence_penalty;
      }
    }
  }
}

int32_t SampleRow(absl::Span<const float> logits, const SamplingRow& row, SampleScratch* scratch) {
  std::vector<double>& x = scratch->x;
  ProcessLogits(logits, row, scratch, &x);
  // 6. Greedy.
  if (row.temperature < defaults::kGreedyTemperature || row.top_k == 1) {
    return ArgMax(absl::MakeConstSpan(x));
  }
  // 7. Candidates by x, highest first (ties by id); top-k.
  std::vector<int32_t>& order = scratch->order;
  order.clear();
  for (size_t i = 0; i < x.size(); ++i) {
    if (x[i] > kNegInf) order.push_back(static_cast<int32_t>(i));
  }
  if (order.empty()) return ArgMax(absl::MakeConstSpan(x));
  auto by_x = [&](int32_t a, int32_t b) { return x[a] > x[b] || (x[a] == x[b] && a < b); };
  const size_t k = row.top_k > 0 ? std::min<size_t>(row.top_k, order.size()) : order.size();
  std::partial_sort(order.begin(), order.begin() + k, order.end(), by_x);
  order.resize(k);
  // 8. Temperature and softmax over the candidates (the first one has weight exactly 1).
  std::vector<double>& probs = scratch->probs;  // first the scaled logits z, then p
  probs.resize(k);
  const double m = x[order[0]];
  const double t = row.temperature;
  for (size_t i = 0; i < k; ++i) {
    const double l = x[order[i]];
    probs[i] = l == m ? 0.0 : (l - m) / t;  // <= 0; -inf for an id far below
  }
  // Min-p's floor in log space: z >= log(min_p) (exact for min_p 1: only z == 0 stays).
  size_t min_p_keep = k;
  if (row.min_p > 0.0f) {
    const double log_floor = std::log(static_cast<double>(row.min_p));
    min_p_keep = 1;
    while (min_p_keep < k && probs[min_p_keep] >= log_floor) ++min_p_keep;
  }
  double sum = 0;
  for (double& p : probs) sum += p = std::exp(p);
  for (double& p : probs) p /= sum;
  // 9. Top-p, then min-p.
  size_t keep = k;
  if (row.top_p < 1.0f) {
    double cum = 0;
    for (size_t i = 0; i < k; ++i) {
      cum += probs[i];
      if (cum >= row.top_p) {
        keep = i + 1;
        break;
      }
    }
  }
  keep = std::min(keep, min_p_keep);
  // 10. One draw.
  double mass = 0;
  for (size_t i = 0; i < keep; ++i) mass += probs[i];
  const double r = CounterUniform(row.seed, row.offset) * mass;
  double cum = 0;
  for (size_t i = 0; i < keep; ++i) {
    cum += probs[i];
    if (r < cum) return order[i];
  }
  return order[keep - 1];
}

void ComputeLogprobs(absl::Span<const float> logits, int32_t token, int32_t top_n,
                     SampleScratch* scratch, float* logprob, int32_t* rank, int32_t* top_ids,
                     float* top_logprobs) {
  const size_t vocab = logits.size();
  double mx = kNegInf;
  for (float v : logits) mx = std::max(mx, Clean(v));
  double sum = 0;
  if (std::isfinite(mx)) {
    for (float v : logits) sum += std::exp(Clean(v) - mx);
  }
  // log-sum-exp; when nothing is finite every log-probability is -inf (or NaN-free 0 for +inf).
  const double lse = std::isfinite(mx) ? mx + std::log(sum) : mx;
  auto lp = [&](int32_t id) -> float {
    const double l = Clean(logits[id]);
    if (!std::isfinite(lse)) return l == lse ? 0.0f : -std::numeric_limits<float>::infinity();
    return static_cast<float>(l - lse);
  };
  const double lt = Clean(logits[token]);
  int32_t higher = 0;
  for (float v : logits) higher += Clean(v) > lt;
  *logprob = lp(token);
  *rank = 1 + higher;
  const size_t n = std::min<size_t>(std::max(top_n, 0), vocab);
  if (n == 0) return;
  std::vector<int32_t>& order = scratch->order;
  order.resize(vocab);
  std::iota(order.begin(), order.end(), 0);
  std::partial_sort(order.begin(), order.begin() + n, order.end(), [&](int32_t a, int32_t b) {
    const double la = Clean(logits[a]), lb = Clean(logits[b]);
    return la > lb || (la == lb && a < b);
  });
  for (size_t i = 0; i < n; ++i) {
    top_ids[i] = order[i];
    top_logprobs[i] = lp(order[i]);
  }
}

}  // namespace lorc
