#include "backend/sampling.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "absl/container/flat_hash_set.h"

namespace lorc {
namespace {

uint64_t SplitMix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

}  // namespace

double CounterUniform(uint64_t seed, uint64_t offset) {
  const uint64_t bits = SplitMix64(SplitMix64(seed) ^ offset);
  return static_cast<double>(bits >> 11) * (1.0 / 9007199254740992.0);  // / 2^53
}

int32_t ArgMax(absl::Span<const float> v) {
  int32_t best = 0;
  for (size_t i = 1; i < v.size(); ++i) {
    if (v[i] > v[best]) best = static_cast<int32_t>(i);
  }
  return best;
}

int32_t SampleRow(absl::Span<float> logits, const SamplingRow& row, SampleScratch* scratch) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  if (row.repetition_penalty != 1.0f && row.num_penalty_tokens > 0) {
    absl::flat_hash_set<int32_t> seen(row.penalty_tokens, row.penalty_tokens + row.num_penalty_tokens);
    for (int32_t t : seen) {
      if (t < 0 || t >= static_cast<int32_t>(logits.size())) continue;
      float& l = logits[t];
      l = l > 0 ? l / row.repetition_penalty : l * row.repetition_penalty;
    }
  }
  if (row.temperature == 0.0f) return ArgMax(logits);

  const int32_t n = static_cast<int32_t>(logits.size());
  for (float& l : logits) l /= row.temperature;

  // Candidates sorted by logit, highest first (ties by id), truncated to top-k.
  std::vector<int32_t>& order = scratch->order;
  std::vector<float>& probs = scratch->probs;
  order.resize(n);
  std::iota(order.begin(), order.end(), 0);
  const int32_t k = row.top_k > 0 ? std::min(row.top_k, n) : n;
  auto by_logit = [&](int32_t a, int32_t b) {
    return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
  };
  if (k < n) {
    std::partial_sort(order.begin(), order.begin() + k, order.end(), by_logit);
    order.resize(k);
  } else {
    std::sort(order.begin(), order.end(), by_logit);
  }
  // Softmax over the candidates.
  probs.resize(order.size());
  const float mx = logits[order[0]];
  double sum = 0;
  for (size_t i = 0; i < order.size(); ++i) {
    const float l = logits[order[i]];
    probs[i] = l == neg_inf ? 0.0f : std::exp(l - mx);
    sum += probs[i];
  }
  for (float& p : probs) p = static_cast<float>(p / sum);
  // Top-p: the smallest prefix whose mass reaches top_p (at least one token).
  size_t keep = probs.size();
  if (row.top_p < 1.0f) {
    double cum = 0;
    for (size_t i = 0; i < probs.size(); ++i) {
      cum += probs[i];
      if (cum >= row.top_p) {
        keep = i + 1;
        break;
      }
    }
  }
  // Min-p: drop tokens below min_p times the most likely one.
  if (row.min_p > 0.0f) {
    const float floor = row.min_p * probs[0];
    size_t m = 1;
    while (m < keep && probs[m] >= floor) ++m;
    keep = m;
  }
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

}  // namespace lorc
