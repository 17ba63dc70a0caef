#include "worker/sampler.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "absl/container/flat_hash_set.h"

namespace lorc {

int32_t ArgMax(absl::Span<const float> v) {
  int32_t best = 0;
  for (size_t i = 1; i < v.size(); ++i) {
    if (v[i] > v[best]) best = static_cast<int32_t>(i);
  }
  return best;
}

Sampler::Sampler(const SamplingParams& params)
    : params_(params), rng_(params.seed.has_value() ? *params.seed : std::random_device{}()) {}

int32_t Sampler::Sample(absl::Span<float> logits, absl::Span<const int32_t> context) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  if (params_.repetition_penalty != 1.0f) {
    absl::flat_hash_set<int32_t> seen(context.begin(), context.end());
    for (int32_t t : seen) {
      if (t < 0 || t >= static_cast<int32_t>(logits.size())) continue;
      float& l = logits[t];
      l = l > 0 ? l / params_.repetition_penalty : l * params_.repetition_penalty;
    }
  }
  if (params_.greedy()) return ArgMax(logits);

  const int32_t n = static_cast<int32_t>(logits.size());
  for (float& l : logits) l /= params_.temperature;

  // Candidates sorted by logit, highest first (ties by id), truncated to top-k.
  order_.resize(n);
  std::iota(order_.begin(), order_.end(), 0);
  const int32_t k = params_.top_k > 0 ? std::min(params_.top_k, n) : n;
  auto by_logit = [&](int32_t a, int32_t b) {
    return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
  };
  if (k < n) {
    std::partial_sort(order_.begin(), order_.begin() + k, order_.end(), by_logit);
    order_.resize(k);
  } else {
    std::sort(order_.begin(), order_.end(), by_logit);
  }
  // Softmax over the candidates.
  probs_.resize(order_.size());
  const float mx = logits[order_[0]];
  double sum = 0;
  for (size_t i = 0; i < order_.size(); ++i) {
    const float l = logits[order_[i]];
    probs_[i] = l == neg_inf ? 0.0f : std::exp(l - mx);
    sum += probs_[i];
  }
  for (float& p : probs_) p = static_cast<float>(p / sum);
  // Top-p: the smallest prefix whose mass reaches top_p (at least one token).
  size_t keep = probs_.size();
  if (params_.top_p < 1.0f) {
    double cum = 0;
    for (size_t i = 0; i < probs_.size(); ++i) {
      cum += probs_[i];
      if (cum >= params_.top_p) {
        keep = i + 1;
        break;
      }
    }
  }
  // Min-p: drop tokens below min_p times the most likely one.
  if (params_.min_p > 0.0f) {
    const float floor = params_.min_p * probs_[0];
    size_t m = 1;
    while (m < keep && probs_[m] >= floor) ++m;
    keep = m;
  }
  double mass = 0;
  for (size_t i = 0; i < keep; ++i) mass += probs_[i];
  std::uniform_real_distribution<double> u(0.0, mass);
  const double r = u(rng_);
  double cum = 0;
  for (size_t i = 0; i < keep; ++i) {
    cum += probs_[i];
    if (r < cum) return order_[i];
  }
  return order_[keep - 1];
}

}  // namespace lorc
