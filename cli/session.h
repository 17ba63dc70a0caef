// What `generate` and `eval` share: the model, backend and engine flags, and building an
// in-process engine from them.
#pragma once

#include <memory>
#include <optional>
#include <vector>

#include "absl/status/statusor.h"
#include "cli/args.h"
#include "coordinator/engine.h"
#include "tokenizer/tokenizer.h"
#include "backend/backend.h"
#include "worker/model_loader.h"
#include "worker/step_executor.h"

namespace lorc::cli {

// --model, --backend, --device, --threads, --random-weights, --seed-weights, --kv-cache-mb,
// --block-size, --max-step-tokens.
std::vector<FlagSpec> EngineFlags();

// --model, --random-weights, --weights-seed, --shard-lm-head (where the command has it).
absl::StatusOr<ModelSource> ParseModelSource(const Args& args);
// --kv-cache-mb, --block-size, --num-blocks (where the command has it), validated.
absl::StatusOr<KvCacheOptions> ParseKvCacheOptions(const Args& args);

struct Session {
  std::unique_ptr<Backend> backend;
  LoadedModel model;
  std::unique_ptr<Tokenizer> tokenizer;  // null when the model directory has no tokenizer.json
  std::unique_ptr<StepExecutor> executor;
  EngineOptions engine_options;
  std::unique_ptr<Engine> engine;
};

absl::StatusOr<std::unique_ptr<Session>> OpenSession(const Args& args);

// Prints "lorcserve <command>: <status>" to stderr and returns the exit code for it.
int Fail(const char* command, const absl::Status& status);

// Parses a command's flags (argv[2..]; `flags` includes "help"). On --help prints the usage to
// stdout; on a bad command line prints the usage and the error to stderr. In both cases returns
// nullopt and sets *exit_code (0 or 2).
std::optional<Args> ParseCommand(const char* command, const char* synopsis,
                                 const std::vector<FlagSpec>& flags, int argc, char** argv,
                                 int* exit_code);

}  // namespace lorc::cli
