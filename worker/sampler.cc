#include "worker/sampler.h"

#include <random>

namespace lorc {

Sampler::Sampler(const SamplingParams& params)
    : params_(params),
      seed_(params.seed.has_value()
                ? *params.seed
                : (static_cast<uint64_t>(std::random_device{}()) << 32) ^ std::random_device{}()) {}

SamplingRow Sampler::NextRow(absl::Span<const int32_t> context, int32_t logits_row) {
  SamplingRow r;
  r.logits_row = logits_row;
  r.temperature = params_.temperature;
  r.top_k = params_.top_k;
  r.top_p = params_.top_p;
  r.min_p = params_.min_p;
  r.repetition_penalty = params_.repetition_penalty;
  r.penalty_tokens = context.data();
  r.num_penalty_tokens = static_cast<int64_t>(context.size());
  r.seed = seed_;
  r.offset = offset_++;
  return r;
}

int32_t Sampler::Sample(absl::Span<float> logits, absl::Span<const int32_t> context) {
  return SampleRow(logits, NextRow(context), &scratch_);
}

}  // namespace lorc
