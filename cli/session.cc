#include "cli/session.h"

#include <filesystem>
#include <iostream>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace lorc::cli {

std::vector<FlagSpec> EngineFlags() {
  return {
      {"model", true, "model directory (config.json, *.safetensors, tokenizer.json)", "DIR"},
      {"backend", true, "cpu (default) or cuda", "KIND"},
      {"device", true, "CUDA device ordinal (default 0)", "K"},
      {"threads", true, "CPU backend: BLAS threads (default: all cores)", "N"},
      {"random-weights", false, "seeded random weights of config.json's shape (no weight files)"},
      {"weights-seed", true, "seed for --random-weights (default 0)", "S"},
      {"kv-cache-mb", true, "KV cache memory in MiB (default 512)", "MB"},
      {"block-size", true, "KV cache block size in tokens (default 16)", "N"},
      {"max-step-tokens", true, "token budget per engine step (chunked prefill, default 2048)", "N"},
  };
}

absl::StatusOr<ModelSource> ParseModelSource(const Args& args) {
  if (!args.Has("model")) return absl::InvalidArgumentError("--model DIR is required");
  ModelSource src;
  src.dir = args.Get("model");
  src.random_weights = args.Has("random-weights");
  src.shard_lm_head = args.Has("shard-lm-head");
  ASSIGN_OR_RETURN(int64_t seed, args.GetInt("weights-seed", 0));
  src.seed = static_cast<uint64_t>(seed);
  return src;
}

absl::StatusOr<KvCacheOptions> ParseKvCacheOptions(const Args& args) {
  KvCacheOptions kv;
  ASSIGN_OR_RETURN(int64_t kv_mb, args.GetInt("kv-cache-mb", 512));
  ASSIGN_OR_RETURN(int64_t block_size, args.GetInt("block-size", 16));
  ASSIGN_OR_RETURN(int64_t num_blocks, args.GetInt("num-blocks", 0));
  if (kv_mb <= 0) return absl::InvalidArgumentError("--kv-cache-mb must be positive");
  if (block_size <= 0 || block_size > 1024) {
    return absl::InvalidArgumentError("--block-size must be in [1, 1024]");
  }
  if (num_blocks < 0) return absl::InvalidArgumentError("--num-blocks must be >= 0");
  kv.memory_bytes = kv_mb << 20;
  kv.block_size = static_cast<int32_t>(block_size);
  kv.num_blocks = static_cast<int32_t>(num_blocks);
  // The runner's step buffers must hold the engine's per-step token budget.
  ASSIGN_OR_RETURN(int64_t step_tokens, args.GetInt("max-step-tokens", kv.max_num_batched_tokens));
  if (step_tokens > 0 && step_tokens <= (1 << 30)) kv.max_num_batched_tokens = static_cast<int32_t>(step_tokens);
  ASSIGN_OR_RETURN(int64_t max_running, args.GetInt("max-running", kv.max_num_seqs));
  if (max_running > 0 && max_running <= (1 << 20)) kv.max_num_seqs = static_cast<int32_t>(max_running);
  return kv;
}

absl::StatusOr<std::unique_ptr<Session>> OpenSession(const Args& args) {
  ASSIGN_OR_RETURN(ModelSource src, ParseModelSource(args));
  auto s = std::make_unique<Session>();
  BackendOptions bo;
  ASSIGN_OR_RETURN(bo.kind, ParseBackendKind(args.Get("backend", "cpu")));
  ASSIGN_OR_RETURN(int64_t device, args.GetInt("device", 0));
  ASSIGN_OR_RETURN(int64_t threads, args.GetInt("threads", 0));
  bo.device = static_cast<int>(device);
  bo.threads = static_cast<int>(threads);
  ASSIGN_OR_RETURN(s->backend, CreateBackend(bo));

  ASSIGN_OR_RETURN(KvCacheOptions kv, ParseKvCacheOptions(args));
  ASSIGN_OR_RETURN(s->model, LoadModel(src, s->backend.get(), 0, 1, nullptr, kv));

  if (std::filesystem::exists(std::filesystem::path(src.dir) / "tokenizer.json")) {
    ASSIGN_OR_RETURN(s->tokenizer, Tokenizer::FromModelDir(src.dir));
  }
  EngineOptions eo;
  ASSIGN_OR_RETURN(int64_t step_tokens, args.GetInt("max-step-tokens", 2048));
  if (step_tokens <= 0) return absl::InvalidArgumentError("--max-step-tokens must be positive");
  eo.max_step_tokens = static_cast<int32_t>(step_tokens);
  s->engine_options = eo;
  s->executor = std::make_unique<StepExecutor>(s->model.runner.get());
  s->engine = std::make_unique<Engine>(s->executor.get(), s->model.config, s->model.runner->kv_spec(),
                                       s->tokenizer.get(), eo);
  return s;
}

std::optional<Args> ParseCommand(const char* command, const char* synopsis,
                                 const std::vector<FlagSpec>& flags, int argc, char** argv,
                                 int* exit_code) {
  absl::StatusOr<Args> args = Args::Parse(argc, argv, 2, flags);
  if (!args.ok()) {
    std::cerr << Usage(command, synopsis, flags);
    *exit_code = Fail(command, args.status());
    return std::nullopt;
  }
  if (args->Has("help")) {
    std::cout << Usage(command, synopsis, flags);
    *exit_code = 0;
    return std::nullopt;
  }
  return *std::move(args);
}

int Fail(const char* command, const absl::Status& status) {
  std::cerr << "lorcserve " << command << ": " << status << "\n";
  return status.code() == absl::StatusCode::kInvalidArgument ? 2 : 1;
}

}  // namespace lorc::cli
