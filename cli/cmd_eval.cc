// lorcserve eval: perplexity over held-out windows and pass-key retrieval accuracy.
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <optional>
#include <map>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "cli/commands.h"
#include "cli/session.h"
#include "common/json_util.h"
#include "common/status_macros.h"
#include "nlohmann/json.hpp"

namespace lorc::cli {
namespace {

std::vector<FlagSpec> Flags() {
  std::vector<FlagSpec> f = EngineFlags();
  const std::vector<FlagSpec> own = {
      {"ppl", true, "eval_ppl_windows.jsonl (default: the model directory's, if present)", "FILE"},
      {"passkey", true, "eval_passkey.jsonl (default: the model directory's, if present)", "FILE"},
      {"limit", true, "perplexity: first N windows; pass-key: first N prompts per length", "N"},
      {"json", false, "print one JSON object"},
      {"help", false, "show this help"},
  };
  f.insert(f.end(), own.begin(), own.end());
  return f;
}

// Reads a JSON-lines file; errors name the file and line.
absl::StatusOr<std::vector<nlohmann::json>> ReadJsonLines(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat(path, ": cannot open"));
  std::vector<nlohmann::json> out;
  std::string line;
  for (int n = 1; std::getline(in, line); ++n) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    ASSIGN_OR_RETURN(nlohmann::json j, ParseJson(line, absl::StrCat(path, ":", n)));
    if (!j.is_object()) return absl::InvalidArgumentError(absl::StrCat(path, ":", n, ": not a JSON object"));
    j["__line"] = n;
    out.push_back(std::move(j));
  }
  return out;
}

absl::StatusOr<std::vector<int32_t>> IdList(const nlohmann::json& j, const char* field,
                                            const std::string& where) {
  auto it = j.find(field);
  if (it == j.end() || !it->is_array()) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": '", field, "' must be a list of ints"));
  }
  std::vector<int32_t> v;
  for (const auto& x : *it) {
    if (!x.is_number_integer()) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": '", field, "' must be a list of ints"));
    }
    v.push_back(x.get<int32_t>());
  }
  return v;
}

struct PplResult {
  double ppl = 0;
  int64_t windows = 0, tokens = 0;
  double seconds = 0;
};

absl::StatusOr<PplResult> EvalPerplexity(Engine& engine,
                                          const std::string& path, int64_t limit) {
  ASSIGN_OR_RETURN(std::vector<nlohmann::json> rows, ReadJsonLines(path));
  const auto t0 = std::chrono::steady_clock::now();
  PplResult r;
  double sum = 0;
  for (const nlohmann::json& row : rows) {
    if (limit > 0 && r.windows >= limit) break;
    const std::string where = absl::StrCat(path, ":", row["__line"].get<int>());
    ASSIGN_OR_RETURN(std::vector<int32_t> ids, IdList(row, "ids", where));
    ASSIGN_OR_RETURN(std::vector<int32_t> targets, IdList(row, "targets", where));
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

struct PasskeyResult {
  std::map<int64_t, std::pair<int64_t, int64_t>> by_length;  // filler -> (correct, total)
  double seconds = 0;
};

absl::StatusOr<PasskeyResult> EvalPasskey(Engine& engine, const std::string& path, int64_t limit) {
  ASSIGN_OR_RETURN(std::vector<nlohmann::json> rows, ReadJsonLines(path));
  std::vector<GenerationRequest> reqs;
  std::vector<std::pair<int64_t, std::string>> meta;  // filler, answer
  std::map<int64_t, int64_t> taken;
  for (const nlohmann::json& row : rows) {
    const std::string where = absl::StrCat(path, ":", row["__line"].get<int>());
    if (!row.contains("filler_tokens") || !row["filler_tokens"].is_number_integer() ||
        !row.contains("answer") || !row["answer"].is_string()) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": needs integer 'filler_tokens' and string 'answer'"));
    }
    const int64_t filler = row["filler_tokens"].get<int64_t>();
    if (limit > 0 && taken[filler] >= limit) continue;
    ++taken[filler];
    GenerationRequest req;
    ASSIGN_OR_RETURN(req.prompt_ids, IdList(row, "prompt_ids", where));
    req.params.max_tokens = 6;
    reqs.push_back(std::move(req));
    meta.emplace_back(filler, row["answer"].get<std::string>());
  }
  const auto t0 = std::chrono::steady_clock::now();
  ASSIGN_OR_RETURN(std::vector<GenerationResult> out, engine.Generate(reqs));
  PasskeyResult r;
  for (size_t i = 0; i < out.size(); ++i) {
    if (!out[i].status.ok()) return out[i].status;
    auto& [correct, total] = r.by_length[meta[i].first];
    ++total;
    if (absl::StartsWith(out[i].text, meta[i].second)) ++correct;
  }
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return r;
}

std::string DefaultFile(const Args& args, const char* flag, const char* name) {
  if (args.Has(flag)) return args.Get(flag);
  const std::filesystem::path p = std::filesystem::path(args.Get("model")) / name;
  return std::filesystem::exists(p) ? p.string() : "";
}

}  // namespace

int RunEval(int argc, char** argv) {
  const std::vector<FlagSpec> flags = Flags();
  const char* synopsis = "--model DIR [--ppl FILE] [--passkey FILE] [--limit N] [--json]";
  int exit_code = 0;
  const std::optional<Args> args = ParseCommand("eval", synopsis, flags, argc, argv, &exit_code);
  if (!args.has_value()) return exit_code;
  absl::StatusOr<int64_t> limit = args->GetInt("limit", 0);
  if (!limit.ok()) return Fail("eval", limit.status());
  const std::string ppl_file = DefaultFile(*args, "ppl", "eval_ppl_windows.jsonl");
  const std::string passkey_file = DefaultFile(*args, "passkey", "eval_passkey.jsonl");
  if (ppl_file.empty() && passkey_file.empty()) {
    return Fail("eval", absl::InvalidArgumentError("nothing to evaluate: give --ppl and/or --passkey"));
  }
  absl::StatusOr<std::unique_ptr<Session>> s = OpenSession(*args);
  if (!s.ok()) return Fail("eval", s.status());
  Engine& engine = *(*s)->engine;

  nlohmann::json j;
  j["model"] = args->Get("model");
  j["backend"] = (*s)->backend->name();
  const KvCacheSpec& kv = (*s)->model.runner->kv_spec();
  j["kv_bytes_per_token"] = kv.BytesPerToken();
  j["kv_dtype"] = DTypeName(kv.dtype);
  j["load_time_s"] = (*s)->model.load_seconds;
  if (!ppl_file.empty()) {
    absl::StatusOr<PplResult> p = EvalPerplexity(*(*s)->engine, ppl_file, *limit);
    if (!p.ok()) return Fail("eval", p.status());
    j["ppl"] = p->ppl;
    j["ppl_windows"] = p->windows;
    j["ppl_tokens"] = p->tokens;
    j["ppl_time_s"] = p->seconds;
  }
  if (!passkey_file.empty()) {
    absl::StatusOr<PasskeyResult> p = EvalPasskey(engine, passkey_file, *limit);
    if (!p.ok()) return Fail("eval", p.status());
    for (const auto& [filler, ct] : p->by_length) {
      j["passkey_acc"][std::to_string(filler)] = static_cast<double>(ct.first) / ct.second;
      j["passkey_n"][std::to_string(filler)] = ct.second;
    }
    j["passkey_time_s"] = p->seconds;
  }
  if (engine.scheduler().num_free_blocks() != kv.num_blocks) {
    return Fail("eval", absl::InternalError("KV blocks leaked after evaluation"));
  }
  if (args->Has("json")) {
    std::cout << j.dump() << "\n";
    return 0;
  }
  if (j.contains("ppl")) {
    std::cout << absl::StrFormat("perplexity   %.4f over %d windows, %d tokens (%.1f s)\n",
                                 j["ppl"].get<double>(), j["ppl_windows"].get<int64_t>(),
                                 j["ppl_tokens"].get<int64_t>(), j["ppl_time_s"].get<double>());
  }
  if (j.contains("passkey_acc")) {
    for (const auto& [len, acc] : j["passkey_acc"].items()) {
      std::cout << absl::StrFormat("pass-key     %5s filler tokens: %.2f (n=%d)\n", len,
                                   acc.get<double>(), j["passkey_n"][len].get<int64_t>());
    }
    std::cout << absl::StrFormat("pass-key     %.1f s\n", j["passkey_time_s"].get<double>());
  }
  std::cout << absl::StrFormat("kv bytes/token %d (%s)\n", j["kv_bytes_per_token"].get<int64_t>(),
                               j["kv_dtype"].get<std::string>());
  return 0;
}

}  // namespace lorc::cli
