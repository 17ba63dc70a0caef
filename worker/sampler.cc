#include "worker/sampler.h"

#include <algorithm>
#include <random>

namespace lorc {

Sampler::Sampler(const SamplingParams& params, absl::Span<const int64_t> eos_token_ids)
    : params_(params),
      seed_(params.seed.has_value()
                ? *params.seed
                : (static_cast<uint64_t>(std::random_device{}()) << 32) ^ std::random_device{}()) {
  if (!params_.ignore_eos) {
    for (int64_t id : eos_token_ids) stop_ids_.push_back(static_cast<int32_t>(id));
  }
  stop_ids_.insert(stop_ids_.end(), params_.stop_token_ids.begin(), params_.stop_token_ids.end());
  for (const auto& [id, bias] : params_.logit_bias) {
    bias_ids_.push_back(id);
    bias_values_.push_back(bias);
  }
}

SamplingRow Sampler::NextRow(absl::Span<const int32_t> context, size_t num_prompt_tokens,
                             int32_t logits_row) {
  num_prompt_tokens = std::min(num_prompt_tokens, context.size());
  SamplingRow r;
  r.logits_row = logits_row;
  r.allowed_token_ids = params_.allowed_token_ids.data();
  r.num_allowed_token_ids = static_cast<int64_t>(params_.allowed_token_ids.size());
  r.min_tokens = params_.min_tokens;
  r.stop_ids = stop_ids_.data();
  r.num_stop_ids = static_cast<int64_t>(stop_ids_.size());
  r.logit_bias_ids = bias_ids_.data();
  r.logit_bias_values = bias_values_.data();
  r.num_logit_bias = static_cast<int64_t>(bias_ids_.size());
  r.repetition_penalty = params_.repetition_penalty;
  r.penalty_tokens = context.data();
  r.num_penalty_tokens = static_cast<int64_t>(context.size());
  r.frequency_penalty = params_.frequency_penalty;
  r.presence_penalty = params_.presence_penalty;
  r.output_tokens = context.data() + num_prompt_tokens;
  r.num_output_tokens = static_cast<int64_t>(context.size() - num_prompt_tokens);
  r.temperature = params_.temperature;
  r.top_k = params_.top_k;
  r.top_p = params_.top_p;
  r.min_p = params_.min_p;
  r.seed = seed_;
  r.offset = offset_++;
  r.logprobs = params_.logprobs.value_or(-1);
  return r;
}

int32_t Sampler::Sample(absl::Span<const float> logits, absl::Span<const int32_t> context,
                        size_t num_prompt_tokens) {
  return SampleRow(logits, NextRow(context, num_prompt_tokens), &scratch_);
}

}  // namespace lorc
