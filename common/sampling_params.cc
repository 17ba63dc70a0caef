#include "common/sampling_params.h"

#include <charconv>
#include <cmath>
#include <string>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"

namespace lorc {
namespace {

// The shortest text that reads back as v (StrCat's six digits printed 100.0001 as "100", in the
// error that refused it for exceeding 100), in plain decimals for everyday magnitudes
// ("-0.0001", not "-1e-04").
std::string Num(float v) {
  char buf[64];
  const float a = std::fabs(v);
  const bool plain = a == 0.0f || (a >= 1e-6f && a < 1e9f);
  const std::to_chars_result r = plain ? std::to_chars(buf, buf + sizeof(buf), v, std::chars_format::fixed)
                                       : std::to_chars(buf, buf + sizeof(buf), v);
  return r.ec == std::errc() ? std::string(buf, r.ptr) : absl::StrCat(v);
}

}  // namespace

absl::Status SamplingParams::Validate(int64_t vocab_size) const {
  auto bad = [](auto&&... parts) { return absl::InvalidArgumentError(absl::StrCat(parts...)); };
  auto in_vocab = [&](int32_t id) { return id >= 0 && id < vocab_size; };
  if (n < 1 || n > defaults::kMaxNumCompletions) {
    return bad("n must be in [1, ", defaults::kMaxNumCompletions, "], got ", n);
  }
  if (max_tokens < 1) return bad("max_tokens must be >= 1, got ", max_tokens);
  if (min_tokens < 0 || min_tokens > max_tokens) {
    return bad("min_tokens must be in [0, max_tokens = ", max_tokens, "], got ", min_tokens);
  }
  if (!std::isfinite(temperature) || temperature < 0.0f) {
    return bad("temperature must be a finite value >= 0, got ", Num(temperature));
  }
  if (top_k < 0) return bad("top_k must be >= 0 (0: off), got ", top_k);
  if (!(top_p > 0.0f && top_p <= 1.0f)) return bad("top_p must be in (0, 1], got ", Num(top_p));
  if (!(min_p >= 0.0f && min_p <= 1.0f)) return bad("min_p must be in [0, 1], got ", Num(min_p));
  if (!(repetition_penalty > 0.0f) || !std::isfinite(repetition_penalty)) {
    return bad("repetition_penalty must be a finite value > 0, got ", Num(repetition_penalty));
  }
  const float pmax = defaults::kMaxPresencePenalty;
  if (!(presence_penalty >= -pmax && presence_penalty <= pmax)) {
    return bad("presence_penalty must be in [", -pmax, ", ", pmax, "], got ", Num(presence_penalty));
  }
  if (!(frequency_penalty >= -pmax && frequency_penalty <= pmax)) {
    return bad("frequency_penalty must be in [", -pmax, ", ", pmax, "], got ", Num(frequency_penalty));
  }
  absl::flat_hash_set<int32_t> seen;
  for (int32_t id : allowed_token_ids) {
    if (!in_vocab(id)) {
      return bad("allowed_token_ids: id ", id, " outside the vocabulary [0, ", vocab_size, ")");
    }
  }
  for (const auto& [id, bias] : logit_bias) {
    if (!in_vocab(id)) {
      return bad("logit_bias: id ", id, " outside the vocabulary [0, ", vocab_size, ")");
    }
    if (!seen.insert(id).second) return bad("logit_bias: id ", id, " given twice");
    if (!(bias >= -defaults::kMaxLogitBias && bias <= defaults::kMaxLogitBias)) {
      return bad("logit_bias: bias of id ", id, " must be in [", -defaults::kMaxLogitBias, ", ",
                 defaults::kMaxLogitBias, "], got ", Num(bias));
    }
  }
  for (int32_t id : stop_token_ids) {
    if (!in_vocab(id)) {
      return bad("stop_token_ids: id ", id, " outside the vocabulary [0, ", vocab_size, ")");
    }
  }
  for (size_t i = 0; i < stop_strings.size(); ++i) {
    if (stop_strings[i].empty()) return bad("stop[", i, "]: stop strings must not be empty");
  }
  for (const auto& [name, v] : {std::pair{"logprobs", logprobs},
                                std::pair{"prompt_logprobs", prompt_logprobs}}) {
    if (v.has_value() && (*v < 0 || *v > defaults::kMaxLogprobs)) {
      return bad(name, " must be in [0, ", defaults::kMaxLogprobs,
                 "] (0: the token's own; N: plus the N most likely), got ", *v);
    }
  }
  return absl::OkStatus();
}

}  // namespace lorc
