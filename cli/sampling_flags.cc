#include "cli/sampling_flags.h"

#include <cmath>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/defaults.h"
#include "common/status_macros.h"

namespace lorc::cli {
namespace {

// --name as a float in [lo, hi] (NaN rejected), or `def`. The error echoes the value as typed
// (six digits printed 2.0000001 as "2 is outside [-2, 2]").
absl::StatusOr<float> FloatInRange(const Args& args, const std::string& name, double def,
                                   double lo, double hi) {
  ASSIGN_OR_RETURN(double v, args.GetDouble(name, def));
  if (!(v >= lo && v <= hi)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--", name, ": ", args.Get(name, ""), " is outside [", lo, ", ", hi, "]"));
  }
  return static_cast<float>(v);
}

absl::StatusOr<int32_t> ParseId(const std::string& flag, absl::string_view text) {
  int32_t v;
  if (!absl::SimpleAtoi(text, &v)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--", flag, ": '", text, "' is not a token id (an integer)"));
  }
  return v;
}

}  // namespace

std::vector<FlagSpec> PromptAndSamplingFlags() {
  return {
      {"prompt", true, "prompt text (BOS is prepended when the model has one)", "TEXT"},
      {"prompt-ids", true, "prompt token ids, used as given (no BOS added)", "0,1,2"},
      {"max-tokens", true,
       absl::StrCat("tokens to generate at most (default ", defaults::kCliMaxTokens, ")"), "N"},
      {"n", true, absl::StrCat("completions of the prompt, sharing its KV cache (default 1, at most ",
                               defaults::kMaxNumCompletions, ")"), "N"},
      {"min-tokens", true, "EOS and stop ids suppressed until this many tokens (default 0)", "N"},
      {"temperature", true, "0 = greedy (default 0)", "T"},
      {"top-k", true, "keep the K most likely tokens (0 = off)", "K"},
      {"top-p", true, "nucleus sampling mass (1 = off)", "P"},
      {"min-p", true, "drop tokens below P x the top probability (0 = off)", "P"},
      {"repetition-penalty", true, "HF repetition penalty (1 = off)", "R"},
      {"presence-penalty", true, "OpenAI presence penalty in [-2, 2] (0 = off)", "P"},
      {"frequency-penalty", true, "OpenAI frequency penalty in [-2, 2] (0 = off)", "F"},
      {"logit-bias", true, "add BIAS in [-100, 100] to token ID's logit (repeatable)", "ID:BIAS"},
      {"allowed-token-id", true, "only these ids can be sampled (repeatable, or a list)", "ID[,ID..]"},
      {"seed", true, "sampling seed (reproducible output)", "S"},
      {"stop", true, "stop string (repeatable)", "TEXT"},
      {"stop-id", true, "stop token id (repeatable)", "ID"},
      {"include-stop-str", false, "keep the matched stop string in the text"},
      {"ignore-eos", false, "keep generating past EOS"},
      {"logprobs", true,
       absl::StrCat("log-probability of each generated token plus the N most likely (0..",
                    defaults::kMaxLogprobs, ")"), "N"},
      {"prompt-logprobs", true, "the same for the prompt's tokens", "N"},
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
  ASSIGN_OR_RETURN(p.max_tokens, args.GetInt32("max-tokens", defaults::kCliMaxTokens, 1));
  ASSIGN_OR_RETURN(p.n, args.GetInt32("n", 1, 1, defaults::kMaxNumCompletions));
  ASSIGN_OR_RETURN(p.min_tokens, args.GetInt32("min-tokens", 0, 0, p.max_tokens));
  ASSIGN_OR_RETURN(double temperature, args.GetDouble("temperature", 0.0));
  ASSIGN_OR_RETURN(p.top_k, args.GetInt32("top-k", 0, 0));
  ASSIGN_OR_RETURN(double top_p, args.GetDouble("top-p", 1.0));
  ASSIGN_OR_RETURN(double min_p, args.GetDouble("min-p", 0.0));
  ASSIGN_OR_RETURN(double rep, args.GetDouble("repetition-penalty", 1.0));
  p.temperature = static_cast<float>(temperature);
  p.top_p = static_cast<float>(top_p);
  p.min_p = static_cast<float>(min_p);
  p.repetition_penalty = static_cast<float>(rep);
  const double pmax = defaults::kMaxPresencePenalty;
  ASSIGN_OR_RETURN(p.presence_penalty, FloatInRange(args, "presence-penalty", 0.0, -pmax, pmax));
  ASSIGN_OR_RETURN(p.frequency_penalty, FloatInRange(args, "frequency-penalty", 0.0, -pmax, pmax));
  for (const std::string& item : args.GetAll("logit-bias")) {
    const std::vector<std::string> parts = absl::StrSplit(item, ':');
    double bias;
    if (parts.size() != 2 || !absl::SimpleAtod(parts[1], &bias)) {
      return absl::InvalidArgumentError(
          absl::StrCat("--logit-bias: '", item, "' is not ID:BIAS (e.g. 264:-100)"));
    }
    ASSIGN_OR_RETURN(int32_t id, ParseId("logit-bias", parts[0]));
    if (!(std::abs(bias) <= defaults::kMaxLogitBias)) {
      return absl::InvalidArgumentError(absl::StrCat("--logit-bias: bias ", parts[1], " of id ", id,
                                                     " is outside [", -defaults::kMaxLogitBias,
                                                     ", ", defaults::kMaxLogitBias, "]"));
    }
    for (const auto& [seen, b] : p.logit_bias) {
      if (seen == id) {
        return absl::InvalidArgumentError(absl::StrCat("--logit-bias: id ", id, " given twice"));
      }
    }
    p.logit_bias.emplace_back(id, static_cast<float>(bias));
  }
  for (const std::string& list : args.GetAll("allowed-token-id")) {
    // Every item an id: an empty one ("1,,2", ",") is an error, not "no restriction".
    for (absl::string_view id : absl::StrSplit(list, ',')) {
      ASSIGN_OR_RETURN(int32_t v, ParseId("allowed-token-id", absl::StripAsciiWhitespace(id)));
      p.allowed_token_ids.push_back(v);
    }
  }
  if (args.Has("seed")) {
    const std::string text = args.Get("seed", "");
    uint64_t seed = 0;
    if (text.empty() || text[0] == '-' || text[0] == '+' || !absl::SimpleAtoi(text, &seed)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--seed: '", text, "' is not an integer in [0, 18446744073709551615]"));
    }
    p.seed = seed;
  }
  p.stop_strings = args.GetAll("stop");
  for (const std::string& id : args.GetAll("stop-id")) {
    ASSIGN_OR_RETURN(int32_t v, ParseId("stop-id", id));
    p.stop_token_ids.push_back(v);
  }
  p.include_stop_str_in_output = args.Has("include-stop-str");
  p.ignore_eos = args.Has("ignore-eos");
  if (args.Has("logprobs")) {
    ASSIGN_OR_RETURN(p.logprobs, args.GetInt32("logprobs", 0, 0, defaults::kMaxLogprobs));
  }
  if (args.Has("prompt-logprobs")) {
    ASSIGN_OR_RETURN(p.prompt_logprobs,
                     args.GetInt32("prompt-logprobs", 0, 0, defaults::kMaxLogprobs));
  }
  return p;
}

nlohmann::json LogprobsJson(const TokenLogprobs& t) {
  nlohmann::json top = nlohmann::json::array();
  for (size_t i = 0; i < t.top_ids.size() && i < t.top_logprobs.size(); ++i) {
    top.push_back({{"id", t.top_ids[i]}, {"logprob", t.top_logprobs[i]}});
  }
  return {{"logprob", t.logprob}, {"rank", t.rank}, {"top", top}};
}

nlohmann::json CompletionJson(int index, const CompletionOutput& c, bool with_logprobs) {
  nlohmann::json j;
  j["index"] = index;
  j["output_ids"] = c.output_ids;
  j["text"] = c.text;
  j["finish_reason"] = FinishReasonName(c.finish);
  if (c.stop_reason.token_id >= 0) {
    j["stop_reason"] = {{"token_id", c.stop_reason.token_id}};
  } else if (!c.stop_reason.stop_string.empty()) {
    j["stop_reason"] = {{"stop_string", c.stop_reason.stop_string}};
  } else {
    j["stop_reason"] = nullptr;
  }
  if (with_logprobs) {
    nlohmann::json lp = nlohmann::json::array();
    for (const TokenLogprobs& t : c.logprobs) lp.push_back(LogprobsJson(t));
    j["logprobs"] = std::move(lp);
  }
  return j;
}

}  // namespace lorc::cli
