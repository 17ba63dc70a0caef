#include "eval/eval.h"

#include <chrono>
#include <cmath>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/json_util.h"
#include "common/status_macros.h"
#include "nlohmann/json.hpp"

namespace lorc {

absl::StatusOr<std::vector<double>> ScorePromptNll(Engine& engine, absl::Span<const int32_t> ids,
                                                   absl::Span<const int32_t> targets) {
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

absl::StatusOr<PplResult> EvalPerplexity(Engine& engine, const std::string& path, int64_t limit) {
  ASSIGN_OR_RETURN(std::vector<nlohmann::json> rows, ReadJsonLines(path));
  const auto t0 = std::chrono::steady_clock::now();
  PplResult r;
  double sum = 0;
  for (const nlohmann::json& row : rows) {
    if (limit > 0 && r.windows >= limit) break;
    const std::string where = absl::StrCat(path, ":", row["__line"].get<int>());
    ASSIGN_OR_RETURN(std::vector<int32_t> ids, GetInt32List(row, "ids", where));
    ASSIGN_OR_RETURN(std::vector<int32_t> targets, GetInt32List(row, "targets", where));
    absl::StatusOr<std::vector<double>> nll = ScorePromptNll(engine, ids, targets);
    if (!nll.ok()) return absl::Status(nll.status().code(), absl::StrCat(where, ": ", nll.status().message()));
    for (double x : *nll) sum += x;
    r.tokens += static_cast<int64_t>(nll->size());
    ++r.windows;
  }
  if (r.tokens == 0) return absl::InvalidArgumentError(absl::StrCat(path, ": no windows"));
  r.ppl = std::exp(sum / static_cast<double>(r.tokens));
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return r;
}

absl::StatusOr<PasskeyResult> EvalPasskey(Engine& engine, const std::string& path, int64_t limit) {
  ASSIGN_OR_RETURN(std::vector<nlohmann::json> rows, ReadJsonLines(path));
  std::vector<GenerationRequest> reqs;
  struct Meta {
    int64_t filler = 0;
    std::string answer;
    std::string where;  // path:line, for the errors of its request
  };
  std::vector<Meta> meta;
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
    GenerationRequest req;
    ASSIGN_OR_RETURN(req.prompt_ids, GetInt32List(row, "prompt_ids", where));
    req.params.max_tokens = 6;
    reqs.push_back(std::move(req));
    meta.push_back({filler, row["answer"].get<std::string>(), where});
  }
  if (rows.empty()) return absl::InvalidArgumentError(absl::StrCat(path, ": no prompts"));
  const auto t0 = std::chrono::steady_clock::now();
  ASSIGN_OR_RETURN(std::vector<GenerationResult> out, engine.Generate(reqs));
  PasskeyResult r;
  for (size_t i = 0; i < out.size(); ++i) {
    if (!out[i].status.ok()) {
      return absl::Status(out[i].status.code(), absl::StrCat(meta[i].where, ": ", out[i].status.message()));
    }
    auto& [correct, total] = r.by_length[meta[i].filler];
    ++total;
    if (absl::StartsWith(out[i].first().text, meta[i].answer)) ++correct;
  }
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return r;
}

}  // namespace lorc
