// lorcserve tokenize: token ids of a text under a model's tokenizer.
#include <filesystem>
#include <iostream>
#include <optional>

#include "absl/strings/str_join.h"
#include "cli/commands.h"
#include "cli/session.h"
#include "common/json_util.h"
#include "model/model_config.h"
#include "tokenizer/prompt.h"
#include "tokenizer/tokenizer.h"
#include "nlohmann/json.hpp"

namespace lorc::cli {

int RunTokenize(int argc, char** argv) {
  const std::vector<FlagSpec> flags = {
      {"model", true, "model directory holding tokenizer.json", "DIR"},
      {"text", true, "text to tokenize", "TEXT"},
      {"file", true, "file whose contents to tokenize", "F"},
      {"add-special-tokens", false,
       "the ids a generate prompt becomes: the tokenizer's post-processor, then one BOS when "
       "config.json has a bos_token_id"},
      {"json", false, "print {\"ids\": [...], \"count\": N}"},
      {"help", false, "show this help"},
  };
  const char* synopsis = "--model DIR (--text TEXT | --file F) [--json]";
  int exit_code = 0;
  const std::optional<Args> args = ParseCommand("tokenize", synopsis, flags, argc, argv, &exit_code);
  if (!args.has_value()) return exit_code;
  if (absl::Status m = CheckModelDirFlag(*args); !m.ok()) return Fail("tokenize", m);
  if (args->Has("text") == args->Has("file")) {
    return Fail("tokenize", absl::InvalidArgumentError("give exactly one of --text and --file"));
  }
  std::string text = args->Get("text");
  if (args->Has("file")) {
    absl::StatusOr<std::string> content = ReadFileToString(args->Get("file"));
    if (!content.ok()) return Fail("tokenize", content.status());
    text = *std::move(content);
  }
  absl::StatusOr<std::unique_ptr<Tokenizer>> tok = Tokenizer::FromModelDir(args->Get("model"));
  if (!tok.ok()) return Fail("tokenize", tok.status());
  absl::StatusOr<std::vector<int32_t>> ids;
  if (args->Has("add-special-tokens")) {
    // The BOS rule of generation (PromptToIds) needs config.json's bos_token_id; a directory with
    // only tokenizer files has none, so the template alone applies.
    int64_t bos = -1;
    if (std::filesystem::exists(std::filesystem::path(args->Get("model")) / "config.json")) {
      absl::StatusOr<ModelConfig> config = LoadModelConfig(args->Get("model"));
      if (!config.ok()) return Fail("tokenize", config.status());
      bos = config->bos_token_id;
    }
    ids = PromptToIds(**tok, text, bos);
  } else {
    ids = (*tok)->Encode(text, /*add_special_tokens=*/false);
  }
  if (!ids.ok()) return Fail("tokenize", ids.status());
  if (args->Has("json")) {
    nlohmann::json j;
    j["ids"] = *ids;
    j["count"] = ids->size();
    std::cout << j.dump() << "\n";
  } else {
    std::cout << absl::StrJoin(*ids, " ") << "\n";
  }
  return 0;
}

}  // namespace lorc::cli
