// Per-request sampling and stopping options, shared by the coordinator (validation, stop
// strings) and the workers (sampling).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "common/defaults.h"

namespace lorc {

// Field names and semantics follow vLLM's SamplingParams (OpenAI's where vLLM follows it).
// The order in which a sampler applies them is the sampling contract (backend/sampling.h).
struct SamplingParams {
  // --- Output shape ---
  int32_t n = 1;                    // completions of the prompt, [1, kMaxNumCompletions]; they
                                    // share the prompt's KV blocks (copy-on-write), each with its
                                    // own random stream (seed + index when seeded)
  int32_t max_tokens = defaults::kMaxTokens;  // generated tokens at most, >= 1
  int32_t min_tokens = 0;           // EOS and stop ids suppressed until this many, [0, max_tokens]
  // --- Sampling (backend/sampling.h applies them in this order) ---
  std::vector<int32_t> allowed_token_ids;  // empty: all; else only these can be sampled
  // (token id, bias) added to the raw logit; ids unique and in the vocabulary, bias in
  // [-kMaxLogitBias, kMaxLogitBias] (OpenAI's range).
  std::vector<std::pair<int32_t, float>> logit_bias;
  float repetition_penalty = 1.0f;  // 1: off; > 0 (HF semantics: over prompt and generated tokens)
  float presence_penalty = 0.0f;    // 0: off; [-2, 2] (OpenAI semantics: over generated tokens)
  float frequency_penalty = 0.0f;   // 0: off; [-2, 2] (OpenAI semantics: over generated tokens)
  float temperature = 0.0f;         // 0: greedy (argmax); below kGreedyTemperature also greedy
  int32_t top_k = 0;                // 0: off
  float top_p = 1.0f;               // 1: off; (0, 1]
  float min_p = 0.0f;               // 0: off; [0, 1]
  std::optional<uint64_t> seed;     // unset: nondeterministic
  // --- Stopping ---
  std::vector<int32_t> stop_token_ids;   // in addition to the model's EOS ids
  std::vector<std::string> stop_strings; // output text is cut before the first match
  bool include_stop_str_in_output = false;  // keep the matched stop string (or stop id's text) in the text
  bool ignore_eos = false;
  // --- Log-probabilities (of the model's raw distribution: log_softmax of the logits, before
  // any of the sampling options above; as vLLM's default "raw_logprobs") ---
  // Of each sampled token: unset: off; 0: the token's own; N in [1, kMaxLogprobs]: plus the
  // N most likely tokens.
  std::optional<int32_t> logprobs;
  // Of the prompt's own tokens (each given the tokens before it), same values as `logprobs`.
  std::optional<int32_t> prompt_logprobs;

  bool greedy() const { return temperature < defaults::kGreedyTemperature; }
  // InvalidArgument naming the field for any out-of-range value.
  absl::Status Validate(int64_t vocab_size) const;
};

}  // namespace lorc
