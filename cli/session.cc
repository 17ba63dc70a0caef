#include "cli/session.h"

#include <unistd.h>

#include <filesystem>
#include <iostream>
#include <limits>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/defaults.h"
#include "common/env_switch.h"
#include "common/status_macros.h"

namespace lorc::cli {

std::vector<FlagSpec> EngineFlags() {
  std::vector<FlagSpec> flags = {
      {"model", true, "model directory (config.json, *.safetensors, tokenizer.json)", "DIR"},
      {"backend", true, "cpu (default) or cuda", "KIND"},
      {"device", true, "CUDA device ordinal (default 0)", "K"},
      {"threads", true, "CPU backend: BLAS threads (default: all cores)", "N"},
      {"random-weights", false, "seeded random weights of config.json's shape (no weight files)"},
      {"weights-seed", true, "seed for --random-weights (default 0)", "S"},
  };
  for (std::vector<FlagSpec> group : {KvCacheFlags(), SchedulerFlags()}) {
    flags.insert(flags.end(), group.begin(), group.end());
  }
  return flags;
}

std::vector<FlagSpec> KvCacheFlags() {
  return {
      {"kv-cache-mb", true,
       absl::StrCat("KV cache memory per worker in MiB (default ", defaults::kKvCacheMiB, ")"),
       "MB"},
      {"num-blocks", true, "KV cache blocks per worker, at least 1 (overrides --kv-cache-mb)", "N"},
      {"gpu-memory-utilization", true,
       absl::StrCat("share of each GPU's memory for weights, step buffers and KV cache; the cache "
                    "gets what is left (CUDA default ", defaults::kGpuMemoryUtilization,
                    "; on the CPU backend --kv-cache-mb sizes the cache unless this is given)"),
       "F"},
      {"block-size", true,
       absl::StrCat("KV cache block size in tokens (default ", defaults::kBlockSize, ")"), "N"},
      {"kv-cache-dtype", true,
       "KV cache storage: auto (the backend's: cpu F32, cuda BF16; default), bf16, fp8 (e4m3, "
       "per-token per-head scales), int8 (per-token per-head scales) or int4 (per-token groups of "
       "32 channels, scale and zero point); for full and LoRC latent caches; cpu and cuda",
       "DT"},
      {"enforce-eager", false, "CUDA: run decode steps eagerly (no CUDA graphs)"},
      {"kv-policy", true,
       "token-level KV policy (kvpolicy/README.md): none (default), corm (evict keys no recent "
       "query attended, arXiv 2404.15949) or mikv (keep them in low precision instead, arXiv "
       "2402.18096); cpu and cuda backends, over a bf16, fp8, int8 or int4 cache and over LoRC "
       "latents (an int4 cache takes mikv int2 only); generate, eval, bench and the coordinator "
       "(sent to its workers)",
       "P"},
      {"kv-policy-window", true,
       absl::StrCat("CORM's w: a key stays while one of the last W queries gave it attention "
                    "probability >= 1/t (default ", kvpolicy::defaults::kWindow, ")"),
       "W"},
      {"kv-policy-recent", true,
       absl::StrCat("the last R tokens are always kept (default ", kvpolicy::defaults::kRecent, ")"),
       "R"},
      {"kv-policy-sinks", true,
       absl::StrCat("the first S tokens (attention sinks) are always kept (default ",
                    kvpolicy::defaults::kSinks, ")"),
       "S"},
      {"kv-token-budget", true,
       "full-precision tokens per sequence, layer and KV head: a fraction of the sequence (0.3 "
       "or 30%) or a count (512); default: budget-free",
       "B"},
      {"kv-policy-low-bits", true,
       absl::StrCat("mikv: bits of the low-precision tokens, 4 or 2 (default ",
                    kvpolicy::defaults::kLowBits, ")"),
       "N"},
      {"kv-policy-prefill", true,
       absl::StrCat("when the policy first chooses on a prompt: after-prompt (statistics over "
                    "the prompt's chunks, the first choice after its last one, from its last W "
                    "queries) or every-chunk (also at every multiple of --max-num-batched-tokens of the prompt, "
                    "where its chunks end: the budget holds during prefill) "
                    "(default ", kvpolicy::KvPolicyPrefillName(kvpolicy::defaults::kPrefill), ")"),
       "M"},
      {"kv-offloading-size", true,
       "host-memory KV tier in GiB for the whole tensor-parallel group, split evenly over the "
       "ranks (vLLM's flag; pinned memory on GPUs; default 0: off)",
       "GIB"},
  };
}

std::vector<FlagSpec> SchedulerFlags() {
  return {
      {"max-num-batched-tokens", true,
       absl::StrCat("tokens per engine step (chunked prefill budget, default ",
                    defaults::kMaxNumBatchedTokens, ")"),
       "N"},
      {"max-num-seqs", true,
       absl::StrCat("sequences running at once (default ", defaults::kMaxNumSeqs, ")"), "N"},
      {"max-waiting", true,
       absl::StrCat("queued requests before RESOURCE_EXHAUSTED (default ", defaults::kMaxWaiting,
                    ")"),
       "N"},
      {"enable-prefix-caching", false,
       absl::StrCat("reuse the KV blocks of prompt prefixes computed before (per cache_salt; "
                    "default ", defaults::kEnablePrefixCaching ? "on" : "off", ")")},
      {"no-enable-prefix-caching", false, "turn prefix caching (and sessions) off"},
      {"session-ttl-s", true,
       absl::StrCat("seconds a session (session_id) keeps its KV blocks after its last turn "
                    "(default ", defaults::kSessionTtlS, ")"),
       "S"},
      {"max-session-kv-fraction", true,
       absl::StrCat("share of the KV blocks all sessions may keep pinned; oldest released past "
                    "it (default ", defaults::kMaxSessionKvFraction, ")"),
       "F"},
  };
}

FlagSpec DisableCustomAllReduceFlag() {
  return {"disable-custom-all-reduce", false,
          absl::StrCat("CUDA tensor parallelism: every all-reduce through NCCL (default: BF16 "
                       "all-reduces up to ", defaults::kCustomAllReduceMaxBytes >> 20,
                       " MiB take a one-shot all-reduce through peer memory when the GPUs allow it)")};
}

absl::StatusOr<EngineOptions> ParseEngineOptions(const Args& args) {
  constexpr int32_t kMax = std::numeric_limits<int32_t>::max();
  EngineOptions eo;
  ASSIGN_OR_RETURN(eo.max_num_batched_tokens,
                   args.GetInt32("max-num-batched-tokens", defaults::kMaxNumBatchedTokens, 1, kMax));
  ASSIGN_OR_RETURN(eo.max_num_seqs, args.GetInt32("max-num-seqs", defaults::kMaxNumSeqs, 1, kMax));
  ASSIGN_OR_RETURN(eo.max_waiting, args.GetInt32("max-waiting", defaults::kMaxWaiting, 1, kMax));
  if (args.Has("enable-prefix-caching") && args.Has("no-enable-prefix-caching")) {
    return absl::InvalidArgumentError(
        "--enable-prefix-caching and --no-enable-prefix-caching contradict each other");
  }
  eo.enable_prefix_caching = args.Has("no-enable-prefix-caching")
                                 ? false
                                 : (args.Has("enable-prefix-caching") || defaults::kEnablePrefixCaching);
  // Sessions live in the prefix cache: setting them with it off is a contradiction.
  for (const char* flag : {"session-ttl-s", "max-session-kv-fraction"}) {
    if (!eo.enable_prefix_caching && args.Has(flag)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--", flag, " and --no-enable-prefix-caching contradict each other (sessions keep "
          "blocks in the prefix cache)"));
    }
  }
  ASSIGN_OR_RETURN(eo.session_ttl_s, args.GetDouble("session-ttl-s", defaults::kSessionTtlS));
  if (!(eo.session_ttl_s > 0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--session-ttl-s must be > 0, got ", eo.session_ttl_s));
  }
  ASSIGN_OR_RETURN(eo.max_session_kv_fraction,
                   args.GetDouble("max-session-kv-fraction", defaults::kMaxSessionKvFraction));
  if (!(eo.max_session_kv_fraction >= 0 && eo.max_session_kv_fraction <= 1)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--max-session-kv-fraction must be in [0, 1], got ", eo.max_session_kv_fraction));
  }
  return eo;
}

absl::StatusOr<int32_t> ParseThreads(const Args& args) {
  if (!args.Has("threads")) return 0;
  return args.GetInt32("threads", 0, 1);
}

absl::Status CheckModelDirFlag(const Args& args) {
  if (!args.Has("model")) return absl::InvalidArgumentError("--model DIR is required");
  const std::string dir = args.Get("model");
  std::error_code ec;
  if (dir.empty()) return absl::InvalidArgumentError("--model: an empty path (give the model's directory)");
  if (!std::filesystem::exists(dir, ec)) {
    return absl::InvalidArgumentError(
        ec ? absl::StrCat("--model ", dir, ": cannot be read (", ec.message(), ")")
           : absl::StrCat("--model ", dir, ": no such directory"));
  }
  if (!std::filesystem::is_directory(dir, ec)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--model ", dir, ": not a directory (give the directory holding config.json)"));
  }
  return absl::OkStatus();
}

absl::StatusOr<ModelSource> ParseModelSource(const Args& args) {
  RETURN_IF_ERROR(CheckModelDirFlag(args));
  ModelSource src;
  src.dir = args.Get("model");
  src.random_weights = args.Has("random-weights");
  if (args.Has("lm-head")) {
    const std::string v = args.Get("lm-head");
    if (v != "split" && v != "replicated") {
      return absl::InvalidArgumentError(absl::StrCat("--lm-head: '", v, "' is not split or replicated"));
    }
    src.shard_lm_head = v == "split";
  }
  if (args.Has("weights-seed") && !src.random_weights) {
    return absl::InvalidArgumentError("--weights-seed: applies only with --random-weights");
  }
  ASSIGN_OR_RETURN(int64_t seed, args.GetIntInRange("weights-seed", 0, 0, std::numeric_limits<int64_t>::max()));
  src.seed = static_cast<uint64_t>(seed);
  return src;
}

absl::StatusOr<KvCacheOptions> ParseKvCacheOptions(const Args& args) {
  KvCacheOptions kv;
  // Up to 1 PiB: `<< 20` must not overflow int64.
  ASSIGN_OR_RETURN(int64_t kv_mb,
                   args.GetIntInRange("kv-cache-mb", defaults::kKvCacheMiB, 1, int64_t{1} << 30));
  ASSIGN_OR_RETURN(kv.block_size, args.GetInt32("block-size", defaults::kBlockSize, 1, 1024));
  ASSIGN_OR_RETURN(kv.kv_cache_dtype, ParseKvCacheDtype(args.Get("kv-cache-dtype", "auto")));
  if (args.Has("num-blocks")) {  // unset (0 in KvCacheOptions): --kv-cache-mb sizes the cache
    ASSIGN_OR_RETURN(kv.num_blocks, args.GetInt32("num-blocks", 0, 1));
  }
  kv.memory_bytes = kv_mb << 20;
  const bool cuda = IsBackendKind(args.Get("backend", "cpu"), BackendKind::kCuda);
  // The CPU cache lives in this machine's memory (remote workers: theirs, unknown here); a budget
  // beyond it would fail later as an allocation error that names no flag.
  const long pages = sysconf(_SC_PHYS_PAGES);
  const long page_size = sysconf(_SC_PAGESIZE);
  const int64_t memory_mib =
      pages > 0 && page_size > 0
          ? static_cast<int64_t>(static_cast<double>(pages) * static_cast<double>(page_size) / (1 << 20))
          : 0;
  if (!cuda && !args.Has("workers") && kv.num_blocks == 0 && memory_mib > 0 && kv_mb > memory_mib) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--kv-cache-mb: ", kv_mb, " MiB is more than this machine's memory (", memory_mib, " MiB)"));
  }
  ASSIGN_OR_RETURN(kv.gpu_memory_utilization,
                   args.GetDouble("gpu-memory-utilization", cuda ? defaults::kGpuMemoryUtilization : 0.0));
  if (args.Has("gpu-memory-utilization") &&
      !(kv.gpu_memory_utilization > 0.0 && kv.gpu_memory_utilization <= 1.0)) {
    return absl::InvalidArgumentError(absl::StrCat("--gpu-memory-utilization: ",
                                                   kv.gpu_memory_utilization,
                                                   " is outside (0, 1]"));
  }
  // The runners' fixed step buffers must hold what the scheduler may put in one step: the same
  // flags (and defaults) as the engine's budget and running set.
  ASSIGN_OR_RETURN(EngineOptions eo, ParseEngineOptions(args));
  kv.max_num_batched_tokens = eo.max_num_batched_tokens;
  kv.max_num_seqs = eo.max_num_seqs;
  kv.enforce_eager = args.Has("enforce-eager");
  ASSIGN_OR_RETURN(const double offload_gib, args.GetDouble("kv-offloading-size", 0.0));
  if (!(offload_gib >= 0.0 && offload_gib <= double{1 << 20})) {  // NaN fails too
    return absl::InvalidArgumentError(absl::StrCat("--kv-offloading-size: ", offload_gib,
                                                   " GiB is outside [0, 1048576]"));
  }
  if (offload_gib > 0 && !eo.enable_prefix_caching) {
    return absl::InvalidArgumentError(
        "--kv-offloading-size and --no-enable-prefix-caching contradict each other (the host tier "
        "keeps blocks evicted from the prefix cache)");
  }
  kv.kv_offloading_bytes = static_cast<int64_t>(offload_gib * double{1 << 30});
  ASSIGN_OR_RETURN(kv.kv_policy, ParseKvPolicyFlags(args));
  // every-chunk chooses at multiples of the step budget, where the scheduler ends prompt chunks
  // (kvpolicy/kv_policy_config.h): the choices follow the request, not its neighbours.
  if (kv.kv_policy.prefill == kvpolicy::KvPolicyPrefill::kEveryChunk) {
    kv.kv_policy.prefill_interval = kv.max_num_batched_tokens;
  }
  return kv;
}

absl::StatusOr<kvpolicy::KvPolicyConfig> ParseKvPolicyFlags(const Args& args) {
  kvpolicy::KvPolicyConfig c;
  ASSIGN_OR_RETURN(c.kind, kvpolicy::ParseKvPolicyKind(args.Get("kv-policy", "none")));
  constexpr int32_t kMax = std::numeric_limits<int32_t>::max();
  ASSIGN_OR_RETURN(c.window, args.GetInt32("kv-policy-window", kvpolicy::defaults::kWindow, 1, kMax));
  ASSIGN_OR_RETURN(c.recent, args.GetInt32("kv-policy-recent", kvpolicy::defaults::kRecent, 0, kMax));
  ASSIGN_OR_RETURN(c.sinks, args.GetInt32("kv-policy-sinks", kvpolicy::defaults::kSinks, 0, kMax));
  // Any int: ValidateKvPolicyConfig says which values are taken ("is not 4 or 2").
  ASSIGN_OR_RETURN(c.low_bits, args.GetInt32("kv-policy-low-bits", kvpolicy::defaults::kLowBits,
                                             std::numeric_limits<int32_t>::min(), kMax));
  if (args.Has("kv-token-budget")) {
    RETURN_IF_ERROR(kvpolicy::ParseKvTokenBudget(args.Get("kv-token-budget"), &c));
  }
  if (args.Has("kv-policy-prefill")) {
    ASSIGN_OR_RETURN(c.prefill, kvpolicy::ParseKvPolicyPrefill(args.Get("kv-policy-prefill")));
  }
  if (c.kind != kvpolicy::KvPolicyKind::kMikv && args.Has("kv-policy-low-bits")) {
    return absl::InvalidArgumentError("--kv-policy-low-bits needs --kv-policy mikv");
  }
  if (!c.enabled()) {
    for (const char* flag : {"kv-policy-window", "kv-policy-recent", "kv-policy-sinks",
                             "kv-token-budget", "kv-policy-prefill"}) {
      if (args.Has(flag)) {
        return absl::InvalidArgumentError(absl::StrCat("--", flag, " needs --kv-policy corm or mikv"));
      }
    }
  }
  RETURN_IF_ERROR(kvpolicy::ValidateKvPolicyConfig(c));
  // (What a backend cannot run under a policy, more than 8 query heads per KV head on the GPU, it
  // refuses at load, naming the flags: CudaBackend::CheckKvPolicy.)
  return c;
}

absl::StatusOr<std::unique_ptr<Session>> OpenSession(const Args& args) {
  ASSIGN_OR_RETURN(ModelSource src, ParseModelSource(args));
  auto s = std::make_unique<Session>();
  BackendOptions bo;
  ASSIGN_OR_RETURN(bo.kind, ParseBackendKind(args.Get("backend", "cpu")));
  ASSIGN_OR_RETURN(bo.device, args.GetInt32("device", 0, 0));
  ASSIGN_OR_RETURN(bo.threads, ParseThreads(args));
  if (bo.kind == BackendKind::kCpu) {  // flags that would do nothing (as --weights-seed without --random-weights)
    for (const char* flag : {"device", "enforce-eager"}) {
      if (args.Has(flag)) {
        return absl::InvalidArgumentError(absl::StrCat("--", flag, ": applies only with --backend cuda"));
      }
    }
  }
  // The flags first: a bad one is refused before a device is opened.
  ASSIGN_OR_RETURN(KvCacheOptions kv, ParseKvCacheOptions(args));
  ASSIGN_OR_RETURN(s->backend, CreateBackend(bo));
  absl::StatusOr<LoadedModel> model = LoadModel(src, s->backend.get(), 0, 1, nullptr, kv);
  if (absl::IsResourceExhausted(model.status()) && !absl::StartsWith(model.status().message(), "--num-blocks") &&
      !absl::StartsWith(model.status().message(), "weights: ")) {  // those name what sized them
    // Memory ran out: for the weights, the runner's tables (RoPE: max_position_embeddings) or
    // the KV cache; name the flag that sized the last (the backend cannot).
    const std::string budget =
        kv.num_blocks > 0 ? absl::StrCat("--num-blocks ", kv.num_blocks)
        : kv.gpu_memory_utilization > 0
            ? absl::StrCat("--gpu-memory-utilization ", kv.gpu_memory_utilization)
            : absl::StrCat("--kv-cache-mb ", kv.memory_bytes >> 20);
    // Every input that sizes an allocation of the load is named (a tester's 4 TB allocation came
    // from --max-num-batched-tokens, which the message used to leave out).
    return absl::ResourceExhaustedError(absl::StrCat(
        model.status().message(),
        " (loading the model: the weights by config.json's sizes, the step buffers by --max-num-batched-tokens ",
        kv.max_num_batched_tokens, " and --max-num-seqs ", kv.max_num_seqs,
        ", the RoPE tables by config.json max_position_embeddings, the KV cache by ", budget, ")"));
  }
  if (!model.ok()) return model.status();
  s->model = *std::move(model);

  if (std::filesystem::exists(std::filesystem::path(src.dir) / "tokenizer.json")) {
    ASSIGN_OR_RETURN(s->tokenizer, Tokenizer::FromModelDir(src.dir));
  }
  ASSIGN_OR_RETURN(EngineOptions eo, ParseEngineOptions(args));
  eo.num_host_blocks = s->model.runner->num_host_blocks();  // --kv-offloading-size
  eo.kv_compaction = s->model.runner->kv_policy() != nullptr;  // --kv-policy
  eo.kv_policy_max_positions = s->model.runner->kv_policy_max_positions();
  if (const kvpolicy::KvPolicyStore* p = s->model.runner->kv_policy(); p != nullptr) {
    eo.kv_policy_prefill_interval = p->config().prefill_interval;
  }
  s->engine_options = eo;
  // Two plans in flight on a backend that runs asynchronously (CUDA): the executor launches the
  // next step's forward pass before the host has the last step's tokens (launch-ahead,
  // StepExecutor::Submit), so the device does not wait for the engine between steps. One at a
  // time on the CPU backend: there Submit runs the whole step at once, so a second plan overlaps
  // nothing; it only delayed every token's report by a step (the first token's time included the
  // second step; `generate --max-tokens 2` printed ~60,000 tokens/s) and ran one step more for a
  // request that had already stopped.
  // LORC_DISABLE_LAUNCH_AHEAD=1 (A/B runs) keeps one at a time there too: two plans without
  // launch-ahead measured 0.13-0.22 ms a step slower than one on an H100 (docs/PERFORMANCE.md,
  // 2026-12-07).
  const int max_in_flight =
      s->backend->RunsAsynchronously() && !EnvFlag("LORC_DISABLE_LAUNCH_AHEAD", false) ? 2 : 1;
  s->executor = std::make_unique<StepExecutor>(s->model.runner.get(), nullptr, max_in_flight);
  ASSIGN_OR_RETURN(s->engine, Engine::Create(s->executor.get(), s->model.config,
                                             s->model.runner->kv_spec(), s->tokenizer.get(), eo));
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
  // One write: gRPC's own log lines (a failed bind's) land on stderr from its threads too.
  std::cerr << absl::StrCat("lorcserve ", command, ": ", status.ToString(), "\n") << std::flush;
  return status.code() == absl::StatusCode::kInvalidArgument ? 2 : 1;
}

}  // namespace lorc::cli
