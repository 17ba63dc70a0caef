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

// --model, --backend, --device, --threads, --random-weights, --weights-seed, then KvCacheFlags()
// and SchedulerFlags().
std::vector<FlagSpec> EngineFlags();
// The engine/KV flag group shared by generate, eval and coordinator (defaults: common/defaults.h).
// --kv-cache-mb, --num-blocks, --block-size.
std::vector<FlagSpec> KvCacheFlags();
// --max-num-batched-tokens, --max-num-seqs, --max-waiting.
std::vector<FlagSpec> SchedulerFlags();

// --disable-custom-all-reduce (coordinator and bench with worker processes).
FlagSpec DisableCustomAllReduceFlag();
// SchedulerFlags() into EngineOptions, each range-checked into its int32 field (errors name the
// flag).
absl::StatusOr<EngineOptions> ParseEngineOptions(const Args& args);

// --threads N (BLAS threads, for the command's CPU backend or each local worker): N >= 1
// when given (INVALID_ARGUMENT naming the flag otherwise, 0 included); 0 when not given (the
// caller's default: all cores, or cores / workers).
absl::StatusOr<int32_t> ParseThreads(const Args& args);

// --model: given, not empty, an existing directory; else INVALID_ARGUMENT naming the flag and path
// (exit 2). ParseModelSource checks it first; commands that read the directory otherwise
// (tokenize, compress, eval's default files) call it before anything else.
absl::Status CheckModelDirFlag(const Args& args);
// --model, --random-weights, --weights-seed, --lm-head (where the command has it).
absl::StatusOr<ModelSource> ParseModelSource(const Args& args);
// KvCacheFlags(), range-checked (errors name the flag).
absl::StatusOr<KvCacheOptions> ParseKvCacheOptions(const Args& args);
// --kv-policy and its flags (KvCacheFlags) into a checked config; InvalidArgument naming the flag.
absl::StatusOr<kvpolicy::KvPolicyConfig> ParseKvPolicyFlags(const Args& args);

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
