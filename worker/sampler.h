// Token sampling from a logit row, with Hugging Face semantics and order: repetition penalty,
// temperature, top-k, top-p, min-p, then a draw from the remaining distribution (argmax when
// greedy). Each sequence owns a Sampler so seeded requests are reproducible whatever else runs
// in the same batch.
#pragma once

#include <cstdint>
#include <random>
#include <vector>

#include "absl/types/span.h"
#include "common/sampling_params.h"

namespace lorc {

class Sampler {
 public:
  explicit Sampler(const SamplingParams& params);

  // Picks the next token. `logits` is modified (penalties, filtering). `context` holds the
  // prompt and the tokens generated so far (for the repetition penalty).
  int32_t Sample(absl::Span<float> logits, absl::Span<const int32_t> context);

 private:
  SamplingParams params_;
  std::mt19937_64 rng_;
  std::vector<int32_t> order_;
  std::vector<float> probs_;
};

// Index of the largest value, the first one on ties (as torch.argmax).
int32_t ArgMax(absl::Span<const float> v);

}  // namespace lorc
