// lorcserve eval: perplexity over held-out windows and pass-key retrieval accuracy.
#include <algorithm>
#include <filesystem>
#include <iostream>
#include <limits>
#include <optional>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "cli/commands.h"
#include "cli/session.h"
#include "common/json_util.h"
#include "eval/eval.h"
#include "common/status_macros.h"
#include "nlohmann/json.hpp"

namespace lorc::cli {
namespace {

std::vector<FlagSpec> Flags() {
  std::vector<FlagSpec> f = EngineFlags();
  const std::vector<FlagSpec> own = {
      {"ppl", true, "eval_ppl_windows.jsonl, or none to skip (default: the model directory's, if present)", "FILE"},
      {"passkey", true, "eval_passkey.jsonl, or none to skip (default: the model directory's, if present)", "FILE"},
      {"limit", true, "perplexity: first N windows; pass-key: first N prompts per length", "N"},
      {"multi-turn", false,
       "instead: the SCBench-style multi-turn check (eval/eval.h EvalMultiTurnPasskey): the "
       "contexts of the 1536-filler pass-key prompts, four turns each asking another fact, one "
       "session per conversation when prefix caching is on (--limit N: N conversations); "
       "accuracy and cached prompt tokens per turn"},
      {"json", false, "print one JSON object"},
      {"help", false, "show this help"},
  };
  f.insert(f.end(), own.begin(), own.end());
  return f;
}

std::string DefaultFile(const Args& args, const char* flag, const char* name) {
  if (args.Has(flag)) return args.Get(flag) == "none" ? "" : args.Get(flag);
  const std::filesystem::path p = std::filesystem::path(args.Get("model")) / name;
  return std::filesystem::exists(p) ? p.string() : "";
}

}  // namespace

int RunEval(int argc, char** argv) {
  const std::vector<FlagSpec> flags = Flags();
  const char* synopsis =
      "--model DIR [--ppl FILE] [--passkey FILE] [--multi-turn] [--limit N] [--json]";
  int exit_code = 0;
  const std::optional<Args> args = ParseCommand("eval", synopsis, flags, argc, argv, &exit_code);
  if (!args.has_value()) return exit_code;
  // 0 (the default): every window / prompt; a given --limit must be >= 1.
  absl::StatusOr<int64_t> limit =
      args->Has("limit") ? args->GetIntInRange("limit", 0, 1, std::numeric_limits<int64_t>::max())
                         : absl::StatusOr<int64_t>(0);
  if (!limit.ok()) return Fail("eval", limit.status());
  if (absl::Status m = CheckModelDirFlag(*args); !m.ok()) return Fail("eval", m);  // before its default files
  const bool multi_turn = args->Has("multi-turn");
  const std::string ppl_file =
      multi_turn ? "" : DefaultFile(*args, "ppl", "eval_ppl_windows.jsonl");
  const std::string passkey_file = DefaultFile(*args, "passkey", "eval_passkey.jsonl");
  if (ppl_file.empty() && passkey_file.empty()) {
    // Why each is off: given as none, or absent with no default file in the model directory.
    auto why = [&](const char* flag, const char* file) {
      return args->Has(flag) ? absl::StrCat("--", flag, " none")
                             : absl::StrCat("no --", flag, " and no ", file, " in ", args->Get("model"));
    };
    return Fail("eval", absl::InvalidArgumentError(absl::StrCat(
                            "nothing to evaluate: ",
                            multi_turn ? "--multi-turn reads only --passkey" : why("ppl", "eval_ppl_windows.jsonl"),
                            ", ", why("passkey", "eval_passkey.jsonl"))));
  }
  // The files are read and checked before the model loads (a bad file must not wait for a 70B
  // load); the multi-turn check reads its own fields after (it needs the tokenizer).
  std::vector<PplWindow> windows;
  std::vector<PasskeyPrompt> passkeys;
  if (!ppl_file.empty()) {
    absl::StatusOr<std::vector<PplWindow>> w = ReadPplWindows(ppl_file, *limit);
    if (!w.ok()) return Fail("eval", NameFileFlag("ppl", w.status()));
    windows = *std::move(w);
  }
  if (!passkey_file.empty() && !multi_turn) {
    absl::StatusOr<std::vector<PasskeyPrompt>> p = ReadPasskeyPrompts(passkey_file, *limit);
    if (!p.ok()) return Fail("eval", NameFileFlag("passkey", p.status()));
    passkeys = *std::move(p);
  }
  absl::StatusOr<std::unique_ptr<Session>> s = OpenSession(*args);
  if (!s.ok()) return Fail("eval", s.status());
  Engine& engine = *(*s)->engine;
  // The pass-key answer is checked on the generated text: without a tokenizer every output was
  // empty and scored 0 % (a tester). Refused before any evaluation runs.
  if (!passkey_file.empty() && (*s)->tokenizer == nullptr) {
    return Fail("eval", absl::InvalidArgumentError(absl::StrCat(
                            "--passkey ", passkey_file, ": the answers are checked on the generated text, "
                            "which needs the model's tokenizer (", args->Get("model"),
                            " has no tokenizer.json); give --passkey none to skip it",
                            multi_turn ? ", without --multi-turn" : "")));
  }

  // Insertion order: keys as computed, pass-key lengths ascending (a map sorted "1024" before
  // "256", a tester).
  nlohmann::ordered_json j;
  j["model"] = args->Get("model");
  j["backend"] = (*s)->backend->name();
  const KvCacheSpec& kv = (*s)->model.runner->kv_spec();
  j["kv_bytes_per_token"] = kv.BytesPerToken();  // scales of quantized caches included
  j["kv_cache_dtype"] = KvCacheDtypeName(kv.kv_cache_dtype);
  j["kv_dtype"] = kv.StorageName();  // what is stored: F32, BF16, fp8_e4m3, int8, int4
  j["kv_compression"] = kv.CompressionName();
  j["kv_capacity_tokens"] = static_cast<int64_t>(kv.num_blocks) * kv.block_size;
  j["load_time_s"] = (*s)->model.load_seconds;
  if (!ppl_file.empty()) {
    absl::StatusOr<PplResult> p = EvalPerplexity(engine, windows);
    if (!p.ok()) return Fail("eval", p.status());
    j["ppl"] = p->ppl;
    j["ppl_windows"] = p->windows;
    j["ppl_tokens"] = p->tokens;
    j["ppl_time_s"] = p->seconds;
  }
  if (multi_turn) {
    if (passkey_file.empty() || (*s)->tokenizer == nullptr) {
      return Fail("eval", absl::InvalidArgumentError(
                              "--multi-turn needs --passkey FILE and a model with a tokenizer"));
    }
    absl::StatusOr<MultiTurnResult> m =
        EvalMultiTurnPasskey(engine, *(*s)->tokenizer, passkey_file, 1536, *limit);
    if (!m.ok()) return Fail("eval", m.status());
    j["multi_turn_conversations"] = m->conversations;
    j["multi_turn_context_tokens"] = m->context_tokens;
    j["multi_turn_time_s"] = m->seconds;
    j["enable_prefix_caching"] = engine.scheduler().config().enable_prefix_caching;
    for (const MultiTurnResult::Turn& t : m->turns) {
      j["multi_turn_acc"].push_back(static_cast<double>(t.correct) / static_cast<double>(t.total));
      j["multi_turn_prompt_tokens"].push_back(t.prompt_tokens);
      j["multi_turn_cached_prompt_tokens"].push_back(t.cached_prompt_tokens);
    }
  } else if (!passkey_file.empty()) {
    absl::StatusOr<PasskeyResult> p = EvalPasskey(engine, passkeys);
    if (!p.ok()) return Fail("eval", p.status());
    for (const auto& [filler, ct] : p->by_length) {
      j["passkey_acc"][std::to_string(filler)] = static_cast<double>(ct.first) / ct.second;
      j["passkey_n"][std::to_string(filler)] = ct.second;
    }
    j["passkey_time_s"] = p->seconds;
  }
  if (const kvpolicy::KvPolicyStore* policy = (*s)->model.runner->kv_policy()) {
    // What the sequences' policy kept when they ended (kvpolicy/sequence_policy.h KvPolicyStats).
    const kvpolicy::KvPolicyStats& st = policy->stats();
    const double tokens = static_cast<double>(std::max<int64_t>(st.tokens, 1));
    const double entries = static_cast<double>(
        std::max<int64_t>(st.entries.full + st.entries.low + st.entries.dead, 1));
    j["kv_policy"] = policy->config().Describe();
    j["kv_policy_sequences"] = st.sequences;
    j["kv_policy_bytes_per_token"] = st.kv_bytes / tokens;
    j["kv_policy_metadata_bytes_per_token"] = st.metadata_bytes / tokens;
    j["kv_policy_full_kv_bytes_per_token"] = st.full_kv_bytes / tokens;
    j["kv_policy_full_fraction"] = static_cast<double>(st.entries.full) / entries;
    j["kv_policy_low_fraction"] = static_cast<double>(st.entries.low) / entries;
  } else {
    j["kv_policy"] = "none";
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
  if (j.contains("multi_turn_acc")) {
    for (size_t t = 0; t < j["multi_turn_acc"].size(); ++t) {
      std::cout << absl::StrFormat(
          "multi-turn   turn %d: accuracy %.2f (n=%d), prompt tokens %d, cached %d\n", t + 1,
          j["multi_turn_acc"][t].get<double>(), j["multi_turn_conversations"].get<int64_t>(),
          j["multi_turn_prompt_tokens"][t].get<int64_t>(),
          j["multi_turn_cached_prompt_tokens"][t].get<int64_t>());
    }
    std::cout << absl::StrFormat("multi-turn   %.1f s (prefix caching %s)\n",
                                 j["multi_turn_time_s"].get<double>(),
                                 j["enable_prefix_caching"].get<bool>() ? "on" : "off");
  }
  if (j.contains("kv_policy_bytes_per_token")) {
    std::cout << absl::StrFormat(
        "kv policy    %s: %.0f bytes/token kept at the end of the sequences (of %.0f; %.1f %% "
        "full precision, %.1f %% low), policy metadata %.0f bytes/token\n",
        j["kv_policy"].get<std::string>(), j["kv_policy_bytes_per_token"].get<double>(),
        j["kv_policy_full_kv_bytes_per_token"].get<double>(),
        100 * j["kv_policy_full_fraction"].get<double>(),
        100 * j["kv_policy_low_fraction"].get<double>(),
        j["kv_policy_metadata_bytes_per_token"].get<double>());
  }
  std::cout << absl::StrFormat("kv bytes/token %d (%s, %s), capacity %d tokens\n",
                               j["kv_bytes_per_token"].get<int64_t>(), j["kv_dtype"].get<std::string>(),
                               j["kv_compression"].get<std::string>(),
                               j["kv_capacity_tokens"].get<int64_t>());
  return 0;
}

}  // namespace lorc::cli
