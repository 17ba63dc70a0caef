// The prompt and sampling flags shared by `generate` (in-process) and `client` (over gRPC).
#pragma once

#include <vector>

#include "absl/status/statusor.h"
#include "cli/args.h"
#include "common/sampling_params.h"

namespace lorc::cli {

// --prompt, --prompt-ids, --max-tokens, --temperature, --top-k, --top-p, --min-p,
// --repetition-penalty, --seed, --stop, --stop-id, --ignore-eos.
std::vector<FlagSpec> PromptAndSamplingFlags();

// The sampling flags as SamplingParams (not validated: the engine does that).
absl::StatusOr<SamplingParams> ParseSampling(const Args& args);

// Checks that exactly one of --prompt and --prompt-ids is given.
absl::Status CheckOnePrompt(const Args& args);

}  // namespace lorc::cli
