// The prompt and sampling flags shared by `generate` (in-process) and `client` (over gRPC), and
// the JSON both print for a request's completions (`--json`).
#pragma once

#include <vector>

#include "absl/status/statusor.h"
#include "cli/args.h"
#include "common/sampling_params.h"
#include "coordinator/engine.h"
#include "nlohmann/json.hpp"

namespace lorc::cli {

// --prompt, --prompt-ids, --max-tokens, --n, --min-tokens, --temperature, --top-k, --top-p,
// --min-p, --repetition-penalty, --presence-penalty, --frequency-penalty, --logit-bias,
// --allowed-token-id, --seed, --stop, --stop-id, --include-stop-str, --ignore-eos, --logprobs,
// --prompt-logprobs.
std::vector<FlagSpec> PromptAndSamplingFlags();

// The sampling flags as SamplingParams. Malformed values and values outside the ranges of
// SamplingParams::Validate are InvalidArgument naming the flag ("--logprobs: 21 is outside
// [0, 20]"); token ids are checked against the vocabulary later (the engine does that).
absl::StatusOr<SamplingParams> ParseSampling(const Args& args);

// Checks that exactly one of --prompt and --prompt-ids is given.
absl::Status CheckOnePrompt(const Args& args);

// JSON of one position's log-probabilities: {"logprob": f, "rank": r, "top": [{"id", "logprob"}]}.
nlohmann::json LogprobsJson(const TokenLogprobs& t);

// JSON of one completion: {"index", "output_ids", "text", "finish_reason", "stop_reason"
// ({"token_id": id} or {"stop_string": s}, null when none), "logprobs" (when asked for)}.
nlohmann::json CompletionJson(int index, const CompletionOutput& c, bool with_logprobs);

}  // namespace lorc::cli
