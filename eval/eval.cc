#include "eval/eval.h"

#include <chrono>
#include <cmath>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/json_util.h"
#include "common/status_macros.h"
#include "nlohmann/json.hpp"

namespace lorc {

namespace {

// The window checks ScorePromptNll makes before it runs anything (ReadPplWindows makes them too).
absl::Status CheckWindow(absl::Span<const int32_t> ids, absl::Span<const int32_t> targets) {
  if (ids.empty() || ids.size() != targets.size()) {
    return absl::InvalidArgumentError(absl::StrCat("score: ", ids.size(), " ids and ",
                                                   targets.size(), " targets"));
  }
  for (size_t i = 0; i + 1 < ids.size(); ++i) {
    if (targets[i] != ids[i + 1]) {
      return absl::InvalidArgumentError(absl::StrCat(
          "score: target ", i, " (", targets[i], ") is not the next id (", ids[i + 1], ")"));
    }
  }
  return absl::OkStatus();
}

absl::Status WithWhere(const std::string& where, const absl::Status& st) {
  return absl::Status(st.code(), absl::StrCat(where, ": ", st.message()));
}

}  // namespace

absl::StatusOr<std::vector<double>> ScorePromptNll(Engine& engine, absl::Span<const int32_t> ids,
                                                   absl::Span<const int32_t> targets) {
  RETURN_IF_ERROR(CheckWindow(ids, targets));
  const int64_t max_len = engine.scheduler().config().max_model_len;
  if (static_cast<int64_t>(ids.size()) + 2 > max_len) {
    return absl::InvalidArgumentError(absl::StrCat(
        "score: a window of ", ids.size(), " ids needs ", ids.size() + 2,
        " positions (its ids, its last target and the one token the request generates), over the model's "
        "max_model_len of ", max_len, ": at most ", max_len - 2, " ids a window"));
  }
  GenerationRequest r;
  r.prompt_ids.assign(ids.begin(), ids.end());
  r.prompt_ids.push_back(targets.back());
  r.params.max_tokens = 1;
  r.params.prompt_logprobs = 0;
  ASSIGN_OR_RETURN(std::vector<GenerationResult> out, engine.Generate({r}));
  RETURN_IF_ERROR(out[0].status);
  if (out[0].prompt_logprobs.size() != ids.size()) {
    return absl::InternalError(absl::StrCat("score: ", out[0].prompt_logprobs.size(),
                                            " log-probabilities for ", ids.size(), " targets"));
  }
  std::vector<double> nll;
  nll.reserve(ids.size());
  for (const TokenLogprobs& lp : out[0].prompt_logprobs) nll.push_back(-static_cast<double>(lp.logprob));
  return nll;
}

absl::StatusOr<std::vector<PplWindow>> ReadPplWindows(const std::string& path, int64_t limit) {
  ASSIGN_OR_RETURN(std::vector<nlohmann::json> rows, ReadJsonLines(path));
  std::vector<PplWindow> windows;
  for (const nlohmann::json& row : rows) {
    if (limit > 0 && static_cast<int64_t>(windows.size()) >= limit) break;
    PplWindow w;
    w.where = absl::StrCat(path, ":", row["__line"].get<int>());
    ASSIGN_OR_RETURN(w.ids, GetInt32List(row, "ids", w.where));
    ASSIGN_OR_RETURN(w.targets, GetInt32List(row, "targets", w.where));
    if (absl::Status st = CheckWindow(w.ids, w.targets); !st.ok()) return WithWhere(w.where, st);
    windows.push_back(std::move(w));
  }
  if (windows.empty()) return absl::InvalidArgumentError(absl::StrCat(path, ": no windows"));
  return windows;
}

absl::StatusOr<PplResult> EvalPerplexity(Engine& engine, absl::Span<const PplWindow> windows) {
  const auto t0 = std::chrono::steady_clock::now();
  PplResult r;
  double sum = 0;
  for (const PplWindow& w : windows) {
    absl::StatusOr<std::vector<double>> nll = ScorePromptNll(engine, w.ids, w.targets);
    if (!nll.ok()) return WithWhere(w.where, nll.status());
    for (double x : *nll) sum += x;
    r.tokens += static_cast<int64_t>(nll->size());
    ++r.windows;
  }
  if (r.tokens == 0) return absl::InvalidArgumentError("perplexity: no windows");
  r.ppl = std::exp(sum / static_cast<double>(r.tokens));
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return r;
}

absl::StatusOr<PplResult> EvalPerplexity(Engine& engine, const std::string& path, int64_t limit) {
  ASSIGN_OR_RETURN(std::vector<PplWindow> windows, ReadPplWindows(path, limit));
  return EvalPerplexity(engine, windows);
}

absl::StatusOr<std::vector<PasskeyPrompt>> ReadPasskeyPrompts(const std::string& path, int64_t limit) {
  ASSIGN_OR_RETURN(std::vector<nlohmann::json> rows, ReadJsonLines(path));
  std::vector<PasskeyPrompt> prompts;
  std::map<int64_t, int64_t> taken;
  for (const nlohmann::json& row : rows) {
    const std::string where = absl::StrCat(path, ":", row["__line"].get<int>());
    if (!row.contains("filler_tokens") || !row["filler_tokens"].is_number_integer() ||
        !row.contains("answer") || !row["answer"].is_string()) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": needs integer 'filler_tokens' and string 'answer'"));
    }
    const int64_t filler = row["filler_tokens"].get<int64_t>();
    if (filler < 0) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": 'filler_tokens' must be >= 0, got ", filler));
    }
    if (row["answer"].get<std::string>().empty()) {
      // Every output starts with "": an empty answer would score as found.
      return absl::InvalidArgumentError(absl::StrCat(where, ": 'answer' is empty"));
    }
    if (limit > 0 && taken[filler] >= limit) continue;
    ++taken[filler];
    PasskeyPrompt p;
    ASSIGN_OR_RETURN(p.prompt_ids, GetInt32List(row, "prompt_ids", where));
    p.filler = filler;
    p.answer = row["answer"].get<std::string>();
    p.where = where;
    prompts.push_back(std::move(p));
  }
  if (prompts.empty()) return absl::InvalidArgumentError(absl::StrCat(path, ": no prompts"));
  return prompts;
}

absl::StatusOr<PasskeyResult> EvalPasskey(Engine& engine, absl::Span<const PasskeyPrompt> prompts) {
  std::vector<GenerationRequest> reqs;
  for (const PasskeyPrompt& p : prompts) {
    GenerationRequest req;
    req.prompt_ids = p.prompt_ids;
    req.params.max_tokens = 6;
    reqs.push_back(std::move(req));
  }
  if (reqs.empty()) return absl::InvalidArgumentError("pass-key: no prompts");
  const auto t0 = std::chrono::steady_clock::now();
  ASSIGN_OR_RETURN(std::vector<GenerationResult> out, engine.Generate(reqs));
  PasskeyResult r;
  for (size_t i = 0; i < out.size(); ++i) {
    if (!out[i].status.ok()) return WithWhere(prompts[i].where, out[i].status);
    auto& [correct, total] = r.by_length[prompts[i].filler];
    ++total;
    if (absl::StartsWith(out[i].first().text, prompts[i].answer)) ++correct;
  }
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return r;
}

absl::StatusOr<PasskeyResult> EvalPasskey(Engine& engine, const std::string& path, int64_t limit) {
  ASSIGN_OR_RETURN(std::vector<PasskeyPrompt> prompts, ReadPasskeyPrompts(path, limit));
  return EvalPasskey(engine, prompts);
}

}  // namespace lorc
