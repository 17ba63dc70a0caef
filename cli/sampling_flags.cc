#include "cli/sampling_flags.h"

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/defaults.h"
#include "common/status_macros.h"

namespace lorc::cli {

std::vector<FlagSpec> PromptAndSamplingFlags() {
  return {
      {"prompt", true, "prompt text (BOS is prepended when the model has one)", "TEXT"},
      {"prompt-ids", true, "prompt token ids, used as given (no BOS added)", "0,1,2"},
      {"max-tokens", true,
       absl::StrCat("tokens to generate at most (default ", defaults::kCliMaxTokens, ")"), "N"},
      {"temperature", true, "0 = greedy (default 0)", "T"},
      {"top-k", true, "keep the K most likely tokens (0 = off)", "K"},
      {"top-p", true, "nucleus sampling mass (1 = off)", "P"},
      {"min-p", true, "drop tokens below P x the top probability (0 = off)", "P"},
      {"repetition-penalty", true, "HF repetition penalty (1 = off)", "R"},
      {"seed", true, "sampling seed (reproducible output)", "S"},
      {"stop", true, "stop string (repeatable)", "TEXT"},
      {"stop-id", true, "stop token id (repeatable)", "ID"},
      {"ignore-eos", false, "keep generating past EOS"},
  };
}

absl::Status CheckOnePrompt(const Args& args) {
  if (args.Has("prompt") == args.Has("prompt-ids")) {
    return absl::InvalidArgumentError("give exactly one of --prompt and --prompt-ids");
  }
  return absl::OkStatus();
}

absl::StatusOr<SamplingParams> ParseSampling(const Args& args) {
  SamplingParams p;
  ASSIGN_OR_RETURN(p.max_tokens, args.GetInt32("max-tokens", defaults::kCliMaxTokens));
  ASSIGN_OR_RETURN(double temperature, args.GetDouble("temperature", 0.0));
  ASSIGN_OR_RETURN(p.top_k, args.GetInt32("top-k", 0, 0));
  ASSIGN_OR_RETURN(double top_p, args.GetDouble("top-p", 1.0));
  ASSIGN_OR_RETURN(double min_p, args.GetDouble("min-p", 0.0));
  ASSIGN_OR_RETURN(double rep, args.GetDouble("repetition-penalty", 1.0));
  p.temperature = static_cast<float>(temperature);
  p.top_p = static_cast<float>(top_p);
  p.min_p = static_cast<float>(min_p);
  p.repetition_penalty = static_cast<float>(rep);
  if (args.Has("seed")) {
    ASSIGN_OR_RETURN(int64_t seed, args.GetInt("seed", 0));
    p.seed = static_cast<uint64_t>(seed);
  }
  p.stop_strings = args.GetAll("stop");
  for (const std::string& id : args.GetAll("stop-id")) {
    int32_t v;
    if (!absl::SimpleAtoi(id, &v)) {
      return absl::InvalidArgumentError(absl::StrCat("--stop-id: '", id, "' is not an integer"));
    }
    p.stop_token_ids.push_back(v);
  }
  p.ignore_eos = args.Has("ignore-eos");
  return p;
}

}  // namespace lorc::cli
