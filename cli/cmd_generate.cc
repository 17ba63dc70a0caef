// lorcserve generate: one prompt through the in-process engine, printed as text or JSON.
#include <iostream>
#include <optional>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "cli/commands.h"
#include "cli/sampling_flags.h"
#include "cli/session.h"
#include "common/status_macros.h"
#include "tokenizer/prompt.h"
#include "nlohmann/json.hpp"

namespace lorc::cli {
namespace {

std::vector<FlagSpec> Flags() {
  std::vector<FlagSpec> f = EngineFlags();
  const std::vector<FlagSpec> sampling = PromptAndSamplingFlags();
  f.insert(f.end(), sampling.begin(), sampling.end());
  f.push_back({"json", false, "print one JSON object"});
  f.push_back({"help", false, "show this help"});
  return f;
}

// The request's flags, checked before the model loads (a bad flag must not wait for a 70B load):
// the prompt choice, --prompt-ids and every sampling flag. A --prompt is tokenized by FinishRequest.
absl::StatusOr<GenerationRequest> ParseRequest(const Args& args) {
  GenerationRequest r;
  RETURN_IF_ERROR(CheckOnePrompt(args));
  if (args.Has("prompt-ids")) {
    ASSIGN_OR_RETURN(r.prompt_ids, args.GetIntList("prompt-ids"));
  }
  ASSIGN_OR_RETURN(r.params, ParseSampling(args));
  return r;
}

absl::Status FinishRequest(const Args& args, const Session& s, GenerationRequest& r) {
  if (args.Has("prompt-ids")) return absl::OkStatus();
  if (s.tokenizer == nullptr) {
    return absl::FailedPreconditionError("the model directory has no tokenizer.json: use --prompt-ids");
  }
  ASSIGN_OR_RETURN(r.prompt_ids,
                   PromptToIds(*s.tokenizer, args.Get("prompt"), s.model.config.bos_token_id));
  return absl::OkStatus();
}

}  // namespace

int RunGenerate(int argc, char** argv) {
  const std::vector<FlagSpec> flags = Flags();
  int exit_code = 0;
  const char* synopsis = "--model DIR (--prompt TEXT | --prompt-ids IDS) [flags]";
  const std::optional<Args> args = ParseCommand("generate", synopsis, flags, argc, argv, &exit_code);
  if (!args.has_value()) return exit_code;
  absl::StatusOr<GenerationRequest> req = ParseRequest(*args);
  if (!req.ok()) return Fail("generate", req.status());
  absl::StatusOr<std::unique_ptr<Session>> s = OpenSession(*args);
  if (!s.ok()) return Fail("generate", s.status());
  if (absl::Status st = FinishRequest(*args, **s, *req); !st.ok()) return Fail("generate", st);
  absl::StatusOr<std::vector<GenerationResult>> out = (*s)->engine->Generate({*req});
  if (!out.ok()) return Fail("generate", out.status());
  const GenerationResult& g = (*out)[0];
  if (!g.status.ok()) return Fail("generate", g.status);
  const CompletionOutput& r = g.first();
  const double decode_s = g.total_time_s - g.time_to_first_token_s;
  const size_t n = r.output_ids.size();
  if (args->Has("json")) {
    const bool with_logprobs = req->params.logprobs.has_value();
    // Completion 0 at the top level (as before n existed), every completion in "completions".
    nlohmann::json j = CompletionJson(0, r, with_logprobs);
    j.erase("index");
    j["prompt_ids"] = req->prompt_ids;
    j["n"] = g.completions.size();
    nlohmann::json all = nlohmann::json::array();
    for (size_t i = 0; i < g.completions.size(); ++i) {
      all.push_back(CompletionJson(static_cast<int>(i), g.completions[i], with_logprobs));
    }
    j["completions"] = std::move(all);
    if (req->params.prompt_logprobs.has_value()) {
      nlohmann::json lp = nlohmann::json::array();
      for (const TokenLogprobs& t : g.prompt_logprobs) lp.push_back(LogprobsJson(t));
      j["prompt_logprobs"] = std::move(lp);
    }
    j["prompt_tokens"] = g.prompt_tokens;
    j["completion_tokens"] = n;
    j["time_to_first_token_s"] = g.time_to_first_token_s;
    j["total_time_s"] = g.total_time_s;
    j["decode_tokens_per_s"] = n > 1 && decode_s > 0 ? (n - 1) / decode_s : 0.0;
    j["backend"] = (*s)->backend->name();
    std::cout << j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) << "\n";
  } else {
    // Without a tokenizer there is no text: the generated ids instead (an empty line was all a
    // tester got).
    auto shown = [&](const CompletionOutput& c) {
      return (*s)->tokenizer != nullptr ? c.text : absl::StrCat("ids: ", absl::StrJoin(c.output_ids, " "));
    };
    if (g.completions.size() == 1) {
      std::cout << shown(r) << "\n";
    } else {
      for (size_t i = 0; i < g.completions.size(); ++i) {
        std::cout << "[" << i << "] " << shown(g.completions[i]) << "\n";
      }
    }
    std::cerr << absl::StrCat("[", g.prompt_tokens, " prompt tokens, ", n, " generated (",
                              FinishReasonName(r.finish), "), first token ",
                              static_cast<int>(g.time_to_first_token_s * 1000), " ms, ",
                              n > 1 && decode_s > 0 ? static_cast<int>((n - 1) / decode_s) : 0,
                              " tokens/s on ", (*s)->backend->name(), "]\n");
  }
  return 0;
}

}  // namespace lorc::cli
