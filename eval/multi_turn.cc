#include <chrono>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/json_util.h"
#include "common/status_macros.h"
#include "eval/eval.h"
#include "nlohmann/json.hpp"
#include "tokenizer/tokenizer_regex.h"

namespace lorc {

absl::StatusOr<MultiTurnResult> EvalMultiTurnPasskey(Engine& engine, const Tokenizer& tokenizer,
                                                     const std::string& path, int64_t filler,
                                                     int64_t limit) {
  ASSIGN_OR_RETURN(std::vector<nlohmann::json> rows, ReadJsonLines(path));
  struct Conversation {
    std::vector<int32_t> ids;  // the shared context, then each turn's question and answer
    std::vector<std::pair<std::string, std::string>> facts;  // (name, " 12345")
  };
  std::vector<Conversation> convs;
  // ASCII classes: what std::regex's \w and \d were (the wrapper's \w is Unicode).
  ASSIGN_OR_RETURN(const std::unique_ptr<tokenizer_internal::Regex> fact,
                   tokenizer_internal::Regex::FromOniguruma(
                       R"(The pass key of ([A-Za-z0-9_]+) is ([0-9]+)\.)", "pass-key fact"));
  for (const nlohmann::json& row : rows) {
    const std::string where = absl::StrCat(path, ":", row["__line"].get<int>());
    if (!row.contains("filler_tokens") || !row["filler_tokens"].is_number_integer() ||
        !row.contains("prompt") || !row["prompt"].is_string()) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": needs integer 'filler_tokens' and string 'prompt'"));
    }
    if (row["filler_tokens"].get<int64_t>() != filler) continue;
    if (limit > 0 && static_cast<int64_t>(convs.size()) >= limit) break;
    const std::string prompt = row["prompt"].get<std::string>();
    const size_t q = prompt.rfind("\nQuestion:");
    if (q == std::string::npos) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": prompt has no \"\\nQuestion:\""));
    }
    Conversation c;
    const std::string context = prompt.substr(0, q);
    // The prompt is valid UTF-8 (nlohmann's parser checks it), as FindAllGroups needs.
    std::vector<std::vector<tokenizer_internal::Regex::Match>> facts;
    RETURN_IF_ERROR(fact->FindAllGroups(context, &facts));
    auto group = [&context](const tokenizer_internal::Regex::Match& g) {
      return context.substr(g.first, g.second - g.first);
    };
    for (const auto& f : facts) c.facts.emplace_back(group(f[1]), absl::StrCat(" ", group(f[2])));
    if (c.facts.size() != 4) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": ", c.facts.size(), " pass-key facts in the context, want 4"));
    }
    ASSIGN_OR_RETURN(std::vector<int32_t> given, GetInt32List(row, "prompt_ids", where));
    if (given.empty()) return absl::InvalidArgumentError(absl::StrCat(where, ": empty prompt_ids"));
    c.ids = {given[0]};  // its BOS
    ASSIGN_OR_RETURN(std::vector<int32_t> ctx, tokenizer.Encode(context, false));
    c.ids.insert(c.ids.end(), ctx.begin(), ctx.end());
    convs.push_back(std::move(c));
  }
  if (convs.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": no prompt with ", filler, " filler tokens"));
  }
  MultiTurnResult r;
  r.conversations = static_cast<int64_t>(convs.size());
  r.context_tokens = static_cast<int64_t>(convs[0].ids.size());
  const auto t0 = std::chrono::steady_clock::now();
  for (int turn = 0; turn < 4; ++turn) {
    std::vector<GenerationRequest> reqs;
    for (size_t i = 0; i < convs.size(); ++i) {
      const std::string& name = convs[i].facts[turn].first;
      ASSIGN_OR_RETURN(std::vector<int32_t> question,
                       tokenizer.Encode(absl::StrCat("\nQuestion: what is the pass key of ", name,
                                                     "? Answer: the pass key of ", name, " is"),
                                        false));
      convs[i].ids.insert(convs[i].ids.end(), question.begin(), question.end());
      GenerationRequest req;
      req.prompt_ids = convs[i].ids;
      req.params.max_tokens = 6;
      req.session_id = engine.scheduler().config().enable_prefix_caching
                           ? absl::StrCat("multi-turn-", i)
                           : "";
      reqs.push_back(std::move(req));
    }
    ASSIGN_OR_RETURN(std::vector<GenerationResult> out, engine.Generate(reqs));
    MultiTurnResult::Turn t;
    for (size_t i = 0; i < out.size(); ++i) {
      if (!out[i].status.ok()) return out[i].status;
      ++t.total;
      // Decoded here: the engine may have no tokenizer (no text).
      ASSIGN_OR_RETURN(std::string text, tokenizer.Decode(out[i].first().output_ids));
      if (absl::StartsWith(text, convs[i].facts[turn].second)) ++t.correct;
      t.prompt_tokens += out[i].prompt_tokens;
      t.cached_prompt_tokens += out[i].cached_prompt_tokens;
      const std::vector<int32_t>& ids = out[i].first().output_ids;
      convs[i].ids.insert(convs[i].ids.end(), ids.begin(), ids.end());
    }
    r.turns.push_back(t);
  }
  for (size_t i = 0; i < convs.size(); ++i) {
    (void)engine.CloseSession("", absl::StrCat("multi-turn-", i));  // NOT_FOUND when caching is off
  }
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return r;
}

}  // namespace lorc
