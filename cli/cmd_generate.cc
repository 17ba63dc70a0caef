// lorcserve generate: one prompt through the in-process engine, printed as text or JSON.
#include <iostream>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "cli/commands.h"
#include "cli/session.h"
#include "common/status_macros.h"
#include "nlohmann/json.hpp"

namespace lorc::cli {
namespace {

std::vector<FlagSpec> Flags() {
  std::vector<FlagSpec> f = EngineFlags();
  const std::vector<FlagSpec> own = {
      {"prompt", true, "prompt text (BOS is prepended when the model has one)", "TEXT"},
      {"prompt-ids", true, "prompt token ids, used as given (no BOS added)", "0,1,2"},
      {"max-tokens", true, "tokens to generate at most (default 64)", "N"},
      {"temperature", true, "0 = greedy (default 0)", "T"},
      {"top-k", true, "keep the K most likely tokens (0 = off)", "K"},
      {"top-p", true, "nucleus sampling mass (1 = off)", "P"},
      {"min-p", true, "drop tokens below P x the top probability (0 = off)", "P"},
      {"repetition-penalty", true, "HF repetition penalty (1 = off)", "R"},
      {"seed", true, "sampling seed (reproducible output)", "S"},
      {"stop", true, "stop string (repeatable)", "TEXT"},
      {"stop-id", true, "stop token id (repeatable)", "ID"},
      {"ignore-eos", false, "keep generating past EOS"},
      {"json", false, "print one JSON object"},
      {"help", false, "show this help"},
  };
  f.insert(f.end(), own.begin(), own.end());
  return f;
}

absl::StatusOr<GenerationRequest> BuildRequest(const Args& args, const Session& s) {
  GenerationRequest r;
  if (args.Has("prompt") == args.Has("prompt-ids")) {
    return absl::InvalidArgumentError("give exactly one of --prompt and --prompt-ids");
  }
  if (args.Has("prompt-ids")) {
    ASSIGN_OR_RETURN(r.prompt_ids, args.GetIntList("prompt-ids"));
  } else {
    if (s.tokenizer == nullptr) {
      return absl::FailedPreconditionError("the model directory has no tokenizer.json: use --prompt-ids");
    }
    ASSIGN_OR_RETURN(r.prompt_ids, s.tokenizer->Encode(args.Get("prompt"), /*add_special_tokens=*/true));
    const int64_t bos = s.model.config.bos_token_id;
    if (bos >= 0 && (r.prompt_ids.empty() || r.prompt_ids.front() != bos)) {
      r.prompt_ids.insert(r.prompt_ids.begin(), static_cast<int32_t>(bos));
    }
  }
  SamplingParams& p = r.params;
  ASSIGN_OR_RETURN(int64_t max_tokens, args.GetInt("max-tokens", 64));
  ASSIGN_OR_RETURN(double temperature, args.GetDouble("temperature", 0.0));
  ASSIGN_OR_RETURN(int64_t top_k, args.GetInt("top-k", 0));
  ASSIGN_OR_RETURN(double top_p, args.GetDouble("top-p", 1.0));
  ASSIGN_OR_RETURN(double min_p, args.GetDouble("min-p", 0.0));
  ASSIGN_OR_RETURN(double rep, args.GetDouble("repetition-penalty", 1.0));
  p.max_tokens = static_cast<int32_t>(max_tokens);
  p.temperature = static_cast<float>(temperature);
  p.top_k = static_cast<int32_t>(top_k);
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
    if (!absl::SimpleAtoi(id, &v)) return absl::InvalidArgumentError(absl::StrCat("--stop-id: '", id, "' is not an integer"));
    p.stop_token_ids.push_back(v);
  }
  p.ignore_eos = args.Has("ignore-eos");
  return r;
}

}  // namespace

int RunGenerate(int argc, char** argv) {
  const std::vector<FlagSpec> flags = Flags();
  absl::StatusOr<Args> args = Args::Parse(argc, argv, 2, flags);
  if (!args.ok()) {
    std::cerr << Usage("generate", "--model DIR (--prompt TEXT | --prompt-ids IDS) [flags]", flags);
    return Fail("generate", args.status());
  }
  if (args->Has("help")) {
    std::cout << Usage("generate", "--model DIR (--prompt TEXT | --prompt-ids IDS) [flags]", flags);
    return 0;
  }
  absl::StatusOr<std::unique_ptr<Session>> s = OpenSession(*args);
  if (!s.ok()) return Fail("generate", s.status());
  absl::StatusOr<GenerationRequest> req = BuildRequest(*args, **s);
  if (!req.ok()) return Fail("generate", req.status());
  absl::StatusOr<std::vector<GenerationResult>> out = (*s)->engine->Generate({*req});
  if (!out.ok()) return Fail("generate", out.status());
  const GenerationResult& r = (*out)[0];
  if (!r.status.ok()) return Fail("generate", r.status);
  const double decode_s = r.total_time_s - r.time_to_first_token_s;
  const size_t n = r.output_ids.size();
  if (args->Has("json")) {
    nlohmann::json j;
    j["prompt_ids"] = req->prompt_ids;
    j["output_ids"] = r.output_ids;
    j["text"] = r.text;
    j["finish_reason"] = FinishReasonName(r.finish);
    j["prompt_tokens"] = r.prompt_tokens;
    j["completion_tokens"] = n;
    j["time_to_first_token_s"] = r.time_to_first_token_s;
    j["total_time_s"] = r.total_time_s;
    j["decode_tokens_per_s"] = n > 1 && decode_s > 0 ? (n - 1) / decode_s : 0.0;
    j["backend"] = (*s)->backend->name();
    std::cout << j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) << "\n";
  } else {
    std::cout << r.text << "\n";
    std::cerr << absl::StrCat("[", r.prompt_tokens, " prompt tokens, ", n, " generated (",
                              FinishReasonName(r.finish), "), first token ",
                              static_cast<int>(r.time_to_first_token_s * 1000), " ms, ",
                              n > 1 && decode_s > 0 ? static_cast<int>((n - 1) / decode_s) : 0,
                              " tokens/s on ", (*s)->backend->name(), "]\n");
  }
  return 0;
}

}  // namespace lorc::cli
