// A request's sampling stream: its options (as the flat lists a SamplingRow points into), its
// seed (the request's, or drawn at random when it gave none) and how many draws it has made.
// The draws themselves follow the backend sampling contract (backend/sampling.h:
// Backend::Sample, counter-based), so a seeded request is reproducible whatever else runs in the
// same batch, across preemptions and on every backend.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/types/span.h"
#include "backend/sampling.h"
#include "common/sampling_params.h"

namespace lorc {

class Sampler {
 public:
  // `eos_token_ids`: the model's (ModelConfig::eos_token_ids); with the params' stop_token_ids
  // they are suppressed while fewer than min_tokens tokens were generated (EOS ids not when
  // ignore_eos). `params` must be valid (SamplingParams::Validate).
  explicit Sampler(const SamplingParams& params, absl::Span<const int64_t> eos_token_ids = {});

  // The row for this request's next draw (advances the draw counter). `context`: the request's
  // tokens, of which the first `num_prompt_tokens` are the prompt and the rest were generated.
  // The row points into `context` and into this sampler: both must stay valid and unchanged
  // while the row is used.
  SamplingRow NextRow(absl::Span<const int32_t> context, size_t num_prompt_tokens,
                      int32_t logits_row = 0);

  // NextRow + the CPU reference (backend/sampling.h) on one logit row [vocab].
  int32_t Sample(absl::Span<const float> logits, absl::Span<const int32_t> context,
                 size_t num_prompt_tokens = 0);

  const SamplingParams& params() const { return params_; }

 private:
  SamplingParams params_;
  std::vector<int32_t> stop_ids_;  // suppressed before min_tokens: EOS (unless ignore_eos) + stop ids
  std::vector<int32_t> bias_ids_;
  std::vector<float> bias_values_;
  uint64_t seed_;
  uint64_t offset_ = 0;
  SampleScratch scratch_;
};

}  // namespace lorc
