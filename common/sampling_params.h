// Per-request sampling and stopping options, shared by the coordinator (validation, stop
// strings) and the workers (sampling).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "common/defaults.h"

namespace lorc {

struct SamplingParams {
  float temperature = 0.0f;         // 0: greedy (argmax)
  int32_t top_k = 0;                // 0: off
  float top_p = 1.0f;               // 1: off
  float min_p = 0.0f;               // 0: off
  float repetition_penalty = 1.0f;  // 1: off (HF semantics: over prompt and generated tokens)
  std::optional<uint64_t> seed;     // unset: nondeterministic
  int32_t max_tokens = defaults::kMaxTokens;
  std::vector<int32_t> stop_token_ids;   // in addition to the model's EOS ids
  std::vector<std::string> stop_strings; // output text is cut before the first match
  bool ignore_eos = false;
  // Log-probabilities of the prompt's own tokens (each given the tokens before it), returned
  // with the request's result: unset: off; 0: on. Top-N alternatives (N > 0) are not offered
  // yet and are rejected.
  std::optional<int32_t> prompt_logprobs;

  bool greedy() const { return temperature == 0.0f; }
  // InvalidArgument naming the field for any out-of-range value.
  absl::Status Validate(int64_t vocab_size) const;
};

}  // namespace lorc
