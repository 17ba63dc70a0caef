// lorcserve bench --model DIR: the offline engine benchmark (issue #8). The engine runs in this
// process: decode ms per step for each (batch, context), prefill tokens/s and time to first token
// for single prompts, each next to its physical floor (JSON lines + a table). The model runs in
// this process too (tensor-parallel size 1), or, with --local-workers N, sharded over N local
// worker processes (one per GPU) that the engine drives through a WorkerGroup, as the
// coordinator does (coordinator/local_group.h).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <iostream>
#include <optional>

#include "absl/strings/str_cat.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "cli/commands.h"
#include "cli/session.h"
#include "common/device_ceilings.h"
#include "common/status_macros.h"
#include "model/weights.h"
#include "nlohmann/json.hpp"
#ifdef LORC_WITH_GRPC
#include "coordinator/local_group.h"
#endif

namespace lorc::cli {
namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

double Median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

std::vector<FlagSpec> Flags() {
  std::vector<FlagSpec> f = EngineFlags();
  const std::vector<FlagSpec> own = {
      {"decode-batches", true, "sequences decoding at once (default 1,8,64,256)", "B,..."},
      {"contexts", true, "prompt tokens of each decoding sequence (default 128,4096)", "C,..."},
      {"prefill", true, "single-prompt lengths for prefill and TTFT (default 512,4096)", "L,..."},
      {"steps", true, "timed decode steps per (batch, context) (default 32)", "N"},
      {"warmup-steps", true, "decode steps before timing (default 4)", "N"},
      {"prefill-reps", true, "timed runs per prefill length, median (default 3)", "N"},
      {"hbm-tbps", true,
       "bandwidth of the decode floor, TB/s (default: the device's row in common/device_ceilings.h, "
       "the faster of its copy and weight read; a device without one gets no decode floor)",
       "X"},
      {"gemm-peak-tflops", true,
       "BF16 GEMM peak of the prefill floor, TFLOP/s (default: the device's row; without one, no "
       "prefill floor)",
       "X"},
      {"local-workers", true,
       "run the model sharded over N local worker processes (tensor parallelism, one per GPU "
       "from --device on); default: in this process",
       "N"},
      {"lm-head", true,
       "with --local-workers: split | replicated LM head (default: split on GPUs, on CPUs from 4 workers)",
       "HOW"},
      DisableCustomAllReduceFlag(),
      {"shared-prefix", true,
       "instead: time to first token with a shared prefix of N random tokens plus --question "
       "tokens, the first request (cold) against --prefix-reps later ones with other questions "
       "(prefix caching: on unless --no-enable-prefix-caching)", "N"},
      {"question", true, "question tokens after --shared-prefix, or per --chat-turns turn (default 50)",
       "Q"},
      {"chat-turns", true,
       "with --shared-prefix: instead a chat of N turns in one session (system prompt of "
       "--shared-prefix tokens; each turn adds --question tokens and generates --chat-output); "
       "prompt tokens computed against prompt tokens", "N"},
      {"chat-output", true, "tokens generated per --chat-turns turn (default 32)", "T"},
      {"prefix-reps", true, "later requests of --shared-prefix, median (default 5)", "N"},
      {"working-set", true,
       "with --shared-prefix: instead a mixed workload over contexts of --shared-prefix tokens "
       "whose working set is X times the device KV pool: --mixed-requests requests, each a random "
       "context plus --question new tokens generating --chat-output, --mixed-concurrency at a "
       "time; hit rate (device and host tier: --kv-offloading-size) and throughput", "X"},
      {"mixed-requests", true, "requests of --working-set (default 4 per context)", "N"},
      {"mixed-concurrency", true, "requests of --working-set in flight at once (default 4)", "N"},
      {"json", false, "print only the JSON lines"},
      {"help", false, "show this help"},
  };
  f.insert(f.end(), own.begin(), own.end());
  return f;
}

absl::StatusOr<std::vector<int32_t>> PositiveList(const Args& args, const char* flag,
                                                  const char* def) {
  std::vector<int32_t> v;
  if (args.Has(flag)) {
    absl::StatusOr<std::vector<int32_t>> got = args.GetIntList(flag);
    if (!got.ok()) return got.status();
    v = *got;
  } else {
    for (absl::string_view p : absl::StrSplit(def, ',')) {
      int32_t x = 0;
      (void)absl::SimpleAtoi(p, &x);
      v.push_back(x);
    }
  }
  for (int32_t x : v) {
    if (x < 1) return absl::InvalidArgumentError(absl::StrCat("--", flag, ": ", x, " is not >= 1"));
  }
  return v;
}

// The benchmark's random prompt ids: [3, vocab), so that none is one of the usual special ids
// 0-2 (BOS / EOS / pad of Llama-family vocabularies). RunEngineBench refuses vocab_size <= 3.
int32_t RandomPromptId(uint64_t x, int64_t vocab) {
  return 3 + static_cast<int32_t>(x % static_cast<uint64_t>(vocab - 3));
}

// Flags that belong to one kind of run, named when given to another (a tester ran --chat-turns
// without --shared-prefix and got the decode table, believing it was the chat run).
absl::Status CheckRunFlags(const Args& args) {
  const bool shared = args.Has("shared-prefix"), chat = args.Has("chat-turns"), mixed = args.Has("working-set");
  for (const char* f : {"question", "prefix-reps", "chat-turns", "chat-output", "working-set", "mixed-requests",
                        "mixed-concurrency"}) {
    if (args.Has(f) && !shared) return absl::InvalidArgumentError(absl::StrCat("--", f, ": needs --shared-prefix"));
  }
  if (chat && mixed) {
    return absl::InvalidArgumentError("--chat-turns and --working-set: two different runs; give one");
  }
  for (const char* f : {"mixed-requests", "mixed-concurrency"}) {
    if (args.Has(f) && !mixed) return absl::InvalidArgumentError(absl::StrCat("--", f, ": needs --working-set"));
  }
  if (args.Has("chat-output") && !chat && !mixed) {
    return absl::InvalidArgumentError("--chat-output: needs --chat-turns or --working-set");
  }
  if (args.Has("prefix-reps") && (chat || mixed)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--prefix-reps: not used by --", chat ? "chat-turns" : "working-set"));
  }
  if (shared) {
    for (const char* f : {"decode-batches", "contexts", "prefill", "steps", "warmup-steps", "prefill-reps"}) {
      if (args.Has(f)) {
        return absl::InvalidArgumentError(
            absl::StrCat("--", f, ": not used with --shared-prefix (the decode and prefill table is another run)"));
      }
    }
  }
  if (args.Has("lm-head") && !args.Has("local-workers")) {
    return absl::InvalidArgumentError("--lm-head: only with --local-workers (one process holds the whole LM head)");
  }
  return absl::OkStatus();
}

// Runs `batch` random prompts of `context` tokens (ignore_eos) until every one has its first
// token, then `warmup` + `steps` more decode steps. Returns the per-step times of sequence 0's
// tokens after all sequences were decoding (ms), and aborts everything (blocks freed).
struct DecodeRun {
  std::vector<double> step_ms;
  double fill_s = 0;
};

absl::StatusOr<DecodeRun> RunDecode(Engine& engine, int64_t vocab, int32_t batch, int32_t context,
                                    int32_t max_tokens, int32_t warmup, int32_t steps,
                                    uint64_t seed) {
  std::vector<int32_t> ntok(batch, 0);
  std::vector<Clock::time_point> t0_times;  // sequence 0's token arrival times once all decode
  int32_t started = 0;
  uint64_t x = seed * 0x9E3779B97F4A7C15ull + 1;
  for (int32_t b = 0; b < batch; ++b) {
    GenerationRequest r;
    r.prompt_ids.resize(context);
    for (int32_t& id : r.prompt_ids) {
      x = x * 6364136223846793005ull + 1442695040888963407ull;
      id = RandomPromptId(x >> 33, vocab);
    }
    r.params.max_tokens = max_tokens;
    r.params.ignore_eos = true;
    RETURN_IF_ERROR(engine.Add(b, r, [&, b](const RequestUpdate& u) {
      if (!u.status.ok() || u.new_ids.empty()) return;
      if (ntok[b] == 0) ++started;
      ntok[b] += static_cast<int32_t>(u.new_ids.size());
      if (b == 0 && started == batch) t0_times.push_back(Clock::now());
    }));
  }
  DecodeRun out;
  const auto t_fill = Clock::now();
  while (started < batch) {
    if (!engine.HasWork()) return absl::InternalError("bench: the engine ran out of work early");
    RETURN_IF_ERROR(engine.Step());
  }
  out.fill_s = Seconds(t_fill, Clock::now());
  t0_times.clear();
  t0_times.push_back(Clock::now());
  while (static_cast<int32_t>(t0_times.size()) <= warmup + steps && engine.HasWork()) {
    RETURN_IF_ERROR(engine.Step());
  }
  engine.AbortAll(absl::CancelledError("bench: done"));
  while (engine.HasWork()) RETURN_IF_ERROR(engine.Step());
  if (static_cast<int32_t>(t0_times.size()) <= warmup + steps) {
    return absl::InternalError("bench: sequence 0 finished before the timed steps (raise max_tokens)");
  }
  for (size_t i = 1 + warmup; i < t0_times.size(); ++i) {
    out.step_ms.push_back(1e3 * Seconds(t0_times[i - 1], t0_times[i]));
  }
  return out;
}

// One request alone: time to its first token and the prompt tokens found in the prefix cache.
struct SingleRun {
  double ttft_s = 0;
  int64_t cached_prompt_tokens = 0;
};

absl::StatusOr<SingleRun> RunSingle(Engine& engine, int64_t id, const std::vector<int32_t>& prompt,
                                   int32_t max_tokens = 1, const std::string& session_id = "",
                                   std::vector<int32_t>* output = nullptr) {
  GenerationRequest r;
  r.prompt_ids = prompt;
  r.params.max_tokens = max_tokens;
  r.params.ignore_eos = true;
  r.session_id = session_id;
  SingleRun out;
  bool done = false;
  absl::Status status;
  const auto t0 = Clock::now();
  RETURN_IF_ERROR(engine.Add(id, r, [&](const RequestUpdate& u) {
    if (!u.new_ids.empty() && out.ttft_s == 0) out.ttft_s = Seconds(t0, Clock::now());
    if (output != nullptr) output->insert(output->end(), u.new_ids.begin(), u.new_ids.end());
    if (u.finished) {
      done = true;
      status = u.status;
      out.cached_prompt_tokens = u.cached_prompt_tokens;
    }
  }));
  while (engine.HasWork()) RETURN_IF_ERROR(engine.Step());
  if (!done) return absl::InternalError("bench: the request did not finish");
  RETURN_IF_ERROR(status);
  return out;
}

// --chat-turns: one conversation of `turns` requests in a session (one JSON line, kind "chat").
absl::Status RunChat(Engine& engine, int64_t vocab, int32_t system, int32_t question,
                     int32_t turns, int32_t max_tokens, bool json_only) {
  uint64_t x = 0xc4a7;
  auto append_random = [&](std::vector<int32_t>& v, int32_t n) {
    for (int32_t i = 0; i < n; ++i) {
      x = x * 6364136223846793005ull + 1442695040888963407ull;
      v.push_back(RandomPromptId(x >> 33, vocab));
    }
  };
  const bool sessions = engine.scheduler().config().enable_prefix_caching;
  std::vector<int32_t> conversation;
  append_random(conversation, system);
  int64_t prompt_tokens = 0, cached = 0;
  double ttft_sum = 0;
  const auto t0 = Clock::now();
  for (int32_t t = 0; t < turns; ++t) {
    append_random(conversation, question);
    std::vector<int32_t> answer;
    ASSIGN_OR_RETURN(SingleRun r, RunSingle(engine, 100 + t, conversation, max_tokens,
                                            sessions ? "bench-chat" : "", &answer));
    prompt_tokens += static_cast<int64_t>(conversation.size());
    cached += r.cached_prompt_tokens;
    ttft_sum += r.ttft_s;
    conversation.insert(conversation.end(), answer.begin(), answer.end());
  }
  const double total_s = Seconds(t0, Clock::now());
  if (sessions) RETURN_IF_ERROR(engine.CloseSession("", "bench-chat"));
  const int64_t computed = prompt_tokens - cached;
  nlohmann::json j = {{"kind", "chat"},
                      {"turns", turns},
                      {"system_tokens", system},
                      {"user_tokens_per_turn", question},
                      {"output_tokens_per_turn", max_tokens},
                      {"enable_prefix_caching", sessions},
                      {"prompt_tokens", prompt_tokens},
                      {"prompt_tokens_computed", computed},
                      {"computed_fraction", static_cast<double>(computed) / prompt_tokens},
                      {"ttft_ms_mean", ttft_sum / turns * 1e3},
                      {"total_s", total_s}};
  std::cout << j.dump() << std::endl;
  if (!json_only) {
    std::cout << absl::StrFormat(
        "chat of %d turns (system %d, user %d, output %d tokens a turn): %d of %d prompt tokens "
        "computed (%.1f %%), mean TTFT %.1f ms, %.1f s\n",
        turns, system, question, max_tokens, computed, prompt_tokens,
        100.0 * static_cast<double>(computed) / prompt_tokens, ttft_sum / turns * 1e3, total_s);
  }
  return absl::OkStatus();
}

// --shared-prefix: the issue #10 TTFT benchmark (one JSON line, kind "shared_prefix").
absl::Status RunSharedPrefix(Engine& engine, int64_t vocab, int32_t prefix, int32_t question,
                             int32_t reps, bool json_only) {
  uint64_t x = 0x5eed;
  auto random_ids = [&](int32_t n) {
    std::vector<int32_t> v(n);
    for (int32_t& id : v) {
      x = x * 6364136223846793005ull + 1442695040888963407ull;
      id = RandomPromptId(x >> 33, vocab);
    }
    return v;
  };
  const std::vector<int32_t> shared = random_ids(prefix);
  auto prompt = [&]() {
    std::vector<int32_t> p = shared;
    const std::vector<int32_t> q = random_ids(question);
    p.insert(p.end(), q.begin(), q.end());
    return p;
  };
  // A warm-up request of other tokens (allocations, caches), then the cold one.
  RETURN_IF_ERROR(RunSingle(engine, 1, random_ids(prefix + question)).status());
  ASSIGN_OR_RETURN(SingleRun first, RunSingle(engine, 2, prompt()));
  std::vector<double> later;
  int64_t cached = 0;
  for (int32_t i = 0; i < reps; ++i) {
    ASSIGN_OR_RETURN(SingleRun r, RunSingle(engine, 3 + i, prompt()));
    later.push_back(r.ttft_s);
    cached = r.cached_prompt_tokens;
  }
  const double later_s = Median(later);
  nlohmann::json j = {{"kind", "shared_prefix"},
                      {"prefix_tokens", prefix},
                      {"question_tokens", question},
                      {"enable_prefix_caching", engine.scheduler().config().enable_prefix_caching},
                      {"first_ttft_ms", first.ttft_s * 1e3},
                      {"first_cached_prompt_tokens", first.cached_prompt_tokens},
                      {"later_ttft_ms_median", later_s * 1e3},
                      {"later_cached_prompt_tokens", cached},
                      {"later_reps", reps},
                      {"speedup", first.ttft_s / later_s}};
  std::cout << j.dump() << std::endl;
  if (!json_only) {
    std::cout << absl::StrFormat(
        "shared prefix %d + question %d tokens: first TTFT %.2f ms, later %.2f ms (median of %d, "
        "%d prompt tokens cached): %.1fx\n",
        prefix, question, first.ttft_s * 1e3, later_s * 1e3, reps, cached, first.ttft_s / later_s);
  }
  return absl::OkStatus();
}

// --working-set: the issue #10 host-tier benchmark (one JSON line, kind "mixed_working_set"):
// ceil(ratio x pool tokens / prefix) contexts of `prefix` random tokens; `requests` requests,
// each a uniformly drawn context plus `question` new random tokens, generating `output` tokens,
// `concurrency` in flight. Hit rate = prompt tokens found cached (device or host tier) / prompt
// tokens; throughput = (prompt + generated tokens) / wall time.
absl::Status RunMixedWorkingSet(Engine& engine, int64_t vocab, int32_t pool_tokens, double ratio,
                                int32_t prefix, int32_t question, int32_t output,
                                int32_t requests, int32_t concurrency, bool json_only) {
  uint64_t x = 0x3ea7;
  auto next = [&]() {
    x = x * 6364136223846793005ull + 1442695040888963407ull;
    return x >> 33;
  };
  auto random_ids = [&](int32_t n) {
    std::vector<int32_t> v(n);
    for (int32_t& id : v) id = RandomPromptId(next(), vocab);
    return v;
  };
  const int32_t num_contexts = std::max<int32_t>(
      1, static_cast<int32_t>(std::ceil(ratio * pool_tokens / static_cast<double>(prefix))));
  if (requests <= 0) requests = 4 * num_contexts;
  std::vector<std::vector<int32_t>> contexts;
  for (int32_t c = 0; c < num_contexts; ++c) contexts.push_back(random_ids(prefix));
  int64_t prompt_tokens = 0, cached = 0, generated = 0;
  double ttft_sum = 0;
  int32_t submitted = 0, finished = 0, in_flight = 0;
  absl::Status failure;
  const auto t0 = Clock::now();
  auto submit = [&]() -> absl::Status {
    GenerationRequest r;
    r.prompt_ids = contexts[next() % static_cast<uint64_t>(num_contexts)];
    const std::vector<int32_t> q = random_ids(question);
    r.prompt_ids.insert(r.prompt_ids.end(), q.begin(), q.end());
    r.params.max_tokens = output;
    r.params.ignore_eos = true;
    prompt_tokens += static_cast<int64_t>(r.prompt_ids.size());
    ++in_flight;
    return engine.Add(submitted++, r, [&](const RequestUpdate& u) {
      generated += static_cast<int64_t>(u.new_ids.size());
      if (!u.finished) return;
      if (!u.status.ok() && failure.ok()) failure = u.status;
      cached += u.cached_prompt_tokens;
      ttft_sum += u.time_to_first_token_s;
      ++finished;
      --in_flight;
    });
  };
  while (finished < requests) {
    while (submitted < requests && in_flight < concurrency) RETURN_IF_ERROR(submit());
    if (!engine.HasWork()) return absl::InternalError("bench: the engine ran out of work early");
    RETURN_IF_ERROR(engine.Step());
    RETURN_IF_ERROR(failure);
  }
  const double total_s = Seconds(t0, Clock::now());
  const PrefixCacheReport pc = engine.scheduler().prefix_cache_report();
  const double hit_rate = static_cast<double>(cached) / static_cast<double>(prompt_tokens);
  nlohmann::json j = {{"kind", "mixed_working_set"},
                      {"contexts", num_contexts},
                      {"context_tokens", prefix},
                      {"question_tokens", question},
                      {"output_tokens", output},
                      {"device_pool_tokens", pool_tokens},
                      {"working_set_ratio",
                       static_cast<double>(num_contexts) * prefix / pool_tokens},
                      {"host_blocks_total", pc.host_blocks_total},
                      {"host_blocks_used", pc.host_blocks_used},
                      {"enable_prefix_caching", pc.enabled},
                      {"requests", requests},
                      {"concurrency", concurrency},
                      {"prompt_tokens", prompt_tokens},
                      {"cached_prompt_tokens", cached},
                      {"hit_rate", hit_rate},
                      {"device_hit_tokens", pc.stats.hit_tokens},
                      {"host_hit_tokens", pc.stats.host_hit_tokens},
                      {"host_offloads", pc.stats.host_offloads},
                      {"host_loads", pc.stats.host_loads},
                      {"generated_tokens", generated},
                      {"ttft_ms_mean", ttft_sum / requests * 1e3},
                      {"total_s", total_s},
                      {"requests_per_s", requests / total_s},
                      {"tokens_per_s", static_cast<double>(prompt_tokens + generated) / total_s}};
  std::cout << j.dump() << std::endl;
  if (!json_only) {
    std::cout << absl::StrFormat(
        "mixed workload: %d contexts of %d tokens (%.1fx the device pool of %d tokens), host tier "
        "%d blocks: %d requests, %d at a time: hit rate %.1f %% (device %d, host %d tokens), "
        "%.2f requests/s, %.0f tokens/s, mean TTFT %.1f ms\n",
        num_contexts, prefix, static_cast<double>(num_contexts) * prefix / pool_tokens,
        pool_tokens, pc.host_blocks_total, requests, concurrency, 100 * hit_rate,
        pc.stats.hit_tokens, pc.stats.host_hit_tokens, requests / total_s,
        static_cast<double>(prompt_tokens + generated) / total_s, ttft_sum / requests * 1e3);
  }
  return absl::OkStatus();
}

// What the benchmark drives: the engine and, for the floors, what one rank holds.
struct Target {
  std::unique_ptr<Session> session;  // in-process (tensor-parallel size 1)
#ifdef LORC_WITH_GRPC
  std::unique_ptr<LocalGroup> workers;  // --local-workers
#endif
  std::unique_ptr<Engine> engine_over_workers;  // destroyed before `workers` (declared after)
  Engine* engine = nullptr;
  ModelConfig config;
  EngineOptions engine_options;
  int32_t tp = 1;
  bool shard_lm_head = false;   // the LM head split by vocabulary across the ranks
  int32_t block_size = 0;
  int32_t num_blocks = 0;       // the smallest over the ranks
  double elem_bytes = 0;        // weight (= KV) element size on the device
  double kv_bytes_per_token = 0;  // per rank: the KV of the rank's heads
  std::string backend;          // cpu, cuda
  std::string device;           // what it runs on (with workers: one rank's device)
  std::string all_reduce;       // with workers: the paths the all-reduces take
  double load_s = 0;            // the slowest rank
  std::string kv_policy = "none";  // kvpolicy::KvPolicyConfig::Describe() of the policy in use
};

absl::StatusOr<std::unique_ptr<Target>> OpenInProcess(const Args& args) {
  auto t = std::make_unique<Target>();
  ASSIGN_OR_RETURN(t->session, OpenSession(args));
  const Session& s = *t->session;
  const KvCacheSpec& kv = s.model.runner->kv_spec();
  t->engine = s.engine.get();
  t->config = s.model.config;
  t->engine_options = s.engine_options;
  t->block_size = kv.block_size;
  t->num_blocks = kv.num_blocks;
  t->elem_bytes = static_cast<double>(DTypeSize(s.backend->compute_dtype()));  // the weights'

  t->kv_bytes_per_token = static_cast<double>(kv.BytesPerToken());
  if (const kvpolicy::KvPolicyStore* p = s.model.runner->kv_policy(); p != nullptr) t->kv_policy = p->config().Describe();
  t->backend = s.backend->name();
  t->device = s.backend->Describe();
  t->load_s = s.model.load_seconds;
  return t;
}

#ifdef LORC_WITH_GRPC
// --local-workers N: N worker processes, each loading its shard; errors name the flag (a
// worker's own error, e.g. a device that is not there, is part of the message).
absl::StatusOr<std::unique_ptr<Target>> OpenLocalWorkers(const Args& args, int32_t n) {
  auto t = std::make_unique<Target>();
  const std::string flag = absl::StrCat("--local-workers ", n, ": ");
  LocalGroupOptions o;
  ASSIGN_OR_RETURN(o.model, ParseModelSource(args));
  ASSIGN_OR_RETURN(o.kv, ParseKvCacheOptions(args));
  ASSIGN_OR_RETURN(t->engine_options, ParseEngineOptions(args));
  o.disable_custom_all_reduce = args.Has("disable-custom-all-reduce");
  o.workers.count = n;
  o.workers.backend = args.Get("backend", "cpu");
  RETURN_IF_ERROR(ParseBackendKind(o.workers.backend).status());
  ASSIGN_OR_RETURN(o.workers.threads_per_worker, ParseThreads(args));
  ASSIGN_OR_RETURN(o.workers.first_device, args.GetInt32("device", 0, 0));
  ASSIGN_OR_RETURN(t->config, LoadModelConfig(o.model.dir));
  // The split is checked here too, so that a shape N does not divide names the flag at once.
  // The workers resolve an unset --lm-head the same way (model/weights.h DefaultLmHeadSplit).
  absl::StatusOr<ShardLayout> layout =
      ShardLayout::Make(t->config, 0, n, o.model.shard_lm_head, /*cuda=*/IsBackendKind(o.workers.backend, BackendKind::kCuda));
  if (!layout.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(flag, layout.status().message()));
  }
  absl::StatusOr<std::unique_ptr<LocalGroup>> group = LocalGroup::Start(o);
  if (!group.ok()) {
    return absl::Status(group.status().code(), absl::StrCat(flag, group.status().message()));
  }
  t->workers = *std::move(group);
  const WorkerGroupInfo& info = t->workers->group().info();
  // One rank's KV geometry in F32 gives the element size the workers store (and compute) in.
  KvSpecOptions ko;
  ko.block_size = o.kv.block_size;
  ko.num_kv_heads = layout->num_kv_heads;
  ASSIGN_OR_RETURN(KvCacheSpec f32, MakeKvCacheSpec(t->config, ko));
  t->tp = n;
  t->shard_lm_head = layout->lm_head_sharded;
  t->block_size = o.kv.block_size;
  t->num_blocks = info.num_blocks;
  t->kv_bytes_per_token = static_cast<double>(info.kv_bytes_per_token);
  // (With --kv-cache-dtype other than auto the KV bytes no longer tell: the backend's dtype.)
  t->elem_bytes = o.kv.kv_cache_dtype == KvCacheDtype::kAuto
                      ? 4.0 * t->kv_bytes_per_token / static_cast<double>(f32.BytesPerToken())
                      : (IsBackendKind(info.backend, BackendKind::kCuda) ? 2.0 : 4.0);
  t->backend = info.backend;
  t->device = info.device;
  t->all_reduce = info.all_reduce;
  t->load_s = info.load_seconds;
  t->engine_options.num_host_blocks = info.num_host_blocks;  // the workers' host KV tier
  t->engine_options.kv_compaction = o.kv.kv_policy.enabled();
  t->engine_options.kv_policy_max_positions = info.kv_policy_max_positions;
  if (o.kv.kv_policy.enabled()) t->kv_policy = o.kv.kv_policy.Describe();
  KvCacheSpec kv;  // what the scheduler allocates: blocks of block_size tokens
  kv.block_size = t->block_size;
  kv.num_blocks = t->num_blocks;
  ASSIGN_OR_RETURN(t->engine_over_workers,
                   Engine::Create(&t->workers->group(), t->config, kv, nullptr, t->engine_options));
  t->engine = t->engine_over_workers.get();
  return t;
}
#endif

absl::StatusOr<std::unique_ptr<Target>> OpenTarget(const Args& args) {
  if (!args.Has("local-workers")) return OpenInProcess(args);
  ASSIGN_OR_RETURN(const int32_t n, args.GetInt32("local-workers", 1, 1, 64));
#ifdef LORC_WITH_GRPC
  return OpenLocalWorkers(args, n);
#else
  return absl::UnimplementedError(
      absl::StrCat("--local-workers ", n, ": this build has no gRPC (no worker processes)"));
#endif
}

}  // namespace

int RunEngineBench(int argc, char** argv) {
  const std::vector<FlagSpec> flags = Flags();
  const char* synopsis =
      "--model DIR [--backend cuda] [--random-weights] [--local-workers N [--lm-head split|replicated]] "
      "[--decode-batches 1,8,64,256] "
      "[--contexts 128,4096] [--prefill 512,4096] [--steps N] [--json]";
  int exit_code = 0;
  const std::optional<Args> args = ParseCommand("bench", synopsis, flags, argc, argv, &exit_code);
  if (!args.has_value()) return exit_code;
  if (absl::Status s = CheckRunFlags(*args); !s.ok()) return Fail("bench", s);
  absl::StatusOr<std::vector<int32_t>> batches = PositiveList(*args, "decode-batches", "1,8,64,256"),
                                       contexts = PositiveList(*args, "contexts", "128,4096"),
                                       prefills = PositiveList(*args, "prefill", "512,4096");
  for (const auto* v : {&batches, &contexts, &prefills}) {
    if (!v->ok()) return Fail("bench", v->status());
  }
  absl::StatusOr<int32_t> steps = args->GetInt32("steps", 32, 1, 1 << 20),
                          warmup = args->GetInt32("warmup-steps", 4, 0, 1 << 20),
                          reps = args->GetInt32("prefill-reps", 3, 1, 1000);
  for (const auto* v : {&steps, &warmup, &reps}) {
    if (!v->ok()) return Fail("bench", v->status());
  }
  // The floors' ceilings: a flag, else the device's measured row (checked before loading).
  std::optional<double> hbm, peak;
  for (auto [flag, out] : {std::pair{"hbm-tbps", &hbm}, std::pair{"gemm-peak-tflops", &peak}}) {
    if (!args->Has(flag)) continue;
    absl::StatusOr<double> v = args->GetDouble(flag, 0);
    if (!v.ok()) return Fail("bench", v.status());
    // [1e-6, 1e6]: any real device's bandwidth (TB/s) or peak (TFLOP/s); inf, NaN, 0 and
    // denormals (an infinite floor) make no floor.
    if (!(*v >= 1e-6 && *v <= 1e6)) {
      return Fail("bench", absl::InvalidArgumentError(
                               absl::StrCat("--", flag, ": ", args->Get(flag), " is not in [1e-6, 1e6]")));
    }
    *out = *v;
  }
  // The random prompts' ids, checked before anything loads (config.json alone).
  if (args->Has("model")) {
    absl::StatusOr<ModelConfig> c = LoadModelConfig(args->Get("model"));
    if (c.ok() && c->vocab_size <= 3) {
      return Fail("bench", absl::InvalidArgumentError(absl::StrCat(
                               "config.json vocab_size ", c->vocab_size,
                               ": the benchmark's random prompts take ids from 3 up (0-2 are kept for special "
                               "tokens); it needs vocab_size > 3")));
    }
  }
  absl::StatusOr<std::unique_ptr<Target>> target = OpenTarget(*args);
  if (!target.ok()) return Fail("bench", target.status());
  const Target& t = **target;
  std::string ceilings_from = "flags";
  if (!hbm.has_value() || !peak.has_value()) {
    const std::optional<DeviceCeilings> row = CeilingsFor(t.device);
    if (row.has_value()) {
      ceilings_from = absl::StrCat(hbm.has_value() || peak.has_value() ? "flags and " : "",
                                   "common/device_ceilings.h: ", row->measured);
      if (!hbm.has_value()) hbm = row->decode_tbps();
      if (!peak.has_value()) peak = row->gemm_peak_tflops;
    } else {
      ceilings_from = absl::StrCat(
          hbm.has_value() || peak.has_value() ? "flags; " : "",
          "no row in common/device_ceilings.h for this device: ",
          hbm.has_value() ? "" : "no decode floor (--hbm-tbps)", !hbm.has_value() && !peak.has_value() ? ", " : "",
          peak.has_value() ? "" : "no prefill floor (--gemm-peak-tflops)");
    }
  }
  Engine& engine = *t.engine;
  const ModelConfig& cfg = t.config;
  const bool json_only = args->Has("json");
  if (args->Has("shared-prefix")) {
    absl::StatusOr<int32_t> prefix = args->GetInt32("shared-prefix", 2000, 1, 1 << 24),
                            question = args->GetInt32("question", 50, 1, 1 << 24),
                            prefix_reps = args->GetInt32("prefix-reps", 5, 1, 1000);
    for (const auto* v : {&prefix, &question, &prefix_reps}) {
      if (!v->ok()) return Fail("bench", v->status());
    }
    absl::Status s;
    if (args->Has("working-set")) {
      absl::StatusOr<double> ratio = args->GetDouble("working-set", 3.0);
      absl::StatusOr<int32_t> output = args->GetInt32("chat-output", 32, 1, 1 << 20),
                              requests = args->GetInt32("mixed-requests", 1, 1, 1 << 20),  // unset: 0 below
                              concurrency = args->GetInt32("mixed-concurrency", 4, 1, 1 << 16);
      if (!ratio.ok()) return Fail("bench", ratio.status());
      // (0, 1000]: the contexts (ratio x the pool / the context) are made up front; 1e9 overflowed
      // into a run of 1 context and 1e7 ran out of memory (a tester).
      if (!(*ratio > 0 && *ratio <= 1000)) {
        return Fail("bench", absl::InvalidArgumentError(
                                 absl::StrCat("--working-set: ", args->Get("working-set"), " is not in (0, 1000]")));
      }
      for (const auto* v : {&output, &requests, &concurrency}) {
        if (!v->ok()) return Fail("bench", v->status());
      }
      s = RunMixedWorkingSet(engine, cfg.vocab_size, t.num_blocks * t.block_size, *ratio, *prefix,
                             *question, *output, args->Has("mixed-requests") ? *requests : 0,
                             *concurrency, json_only);
    } else if (args->Has("chat-turns")) {
      absl::StatusOr<int32_t> turns = args->GetInt32("chat-turns", 10, 1, 10000),
                              max_tokens = args->GetInt32("chat-output", 32, 1, 1 << 20);
      for (const auto* v : {&turns, &max_tokens}) {
        if (!v->ok()) return Fail("bench", v->status());
      }
      s = RunChat(engine, cfg.vocab_size, *prefix, *question, *turns, *max_tokens, json_only);
    } else {
      s = RunSharedPrefix(engine, cfg.vocab_size, *prefix, *question, *prefix_reps, json_only);
    }
    return s.ok() ? 0 : Fail("bench", s);
  }
  const double elem = t.elem_bytes;
  const double tp = static_cast<double>(t.tp);
  // Bytes one rank must read per decode step: every weight but the embedding table (gathered
  // rows only), split tp ways, except the LM head: whole on every rank unless split by vocabulary.
  const double embed = static_cast<double>(cfg.vocab_size * cfg.hidden_size);
  const double params = static_cast<double>(cfg.NumParameters());
  const double matmul_params = params - (cfg.tie_word_embeddings ? 0.0 : embed);
  const double lm_head = embed;
  const double rank_params = (matmul_params - lm_head) / tp + (t.shard_lm_head ? lm_head / tp : lm_head);
  const double weight_bytes = rank_params * elem;
  const double kv_per_token = t.kv_bytes_per_token;
  const int64_t capacity = static_cast<int64_t>(t.num_blocks) * t.block_size;
  const std::string floor_assumes = absl::StrCat(
      "decode floor: one GPU's bytes per step over hbm_tbps: weights but the embedding table",
      t.tp > 1 ? absl::StrCat(" split ", t.tp, " ways, the LM head ",
                              t.shard_lm_head ? "split by vocabulary" : "whole on every GPU (replicated)")
               : "",
      ", plus the KV of ", t.tp > 1 ? "its" : "all", " heads for every sequence; ",
      t.tp > 1 ? "all-reduce time not counted; " : "",
      "prefill: 2 x params x tokens + causal attention FLOPs over ",
      t.tp > 1 ? absl::StrCat(t.tp, " x ") : "", "gemm_peak_tflops");

  nlohmann::json head = {{"kind", "config"}, {"engine", "lorcserve"}, {"model", args->Get("model")},
                         {"backend", t.backend}, {"device", t.device}, {"params", params},
                         {"tensor_parallel_size", t.tp}, {"shard_lm_head", t.shard_lm_head},
                         {"all_reduce", t.all_reduce},
                         {"weight_bytes_read", weight_bytes}, {"kv_bytes_per_token", kv_per_token},
                         {"kv_policy", t.kv_policy},
                         {"kv_capacity_tokens", capacity}, {"load_s", t.load_s},
                         {"floor_assumes", floor_assumes}, {"ceilings_from", ceilings_from}};
  if (hbm.has_value()) head["hbm_tbps"] = *hbm;
  if (peak.has_value()) head["gemm_peak_tflops"] = *peak;
  std::cout << head.dump() << std::endl;
  std::vector<std::string> table;
  const int32_t budget = t.engine_options.max_num_batched_tokens;
  for (int32_t context : *contexts) {
    for (int32_t batch : *batches) {
      // Sequences of `context` tokens the KV cache holds at once (the capacity at a fixed KV memory).
      const int64_t fit = std::min<int64_t>(t.engine_options.max_num_seqs,
                                            t.num_blocks / ((int64_t{context} + t.block_size - 1) / t.block_size));
      nlohmann::json j = {{"kind", "decode"}, {"batch", batch}, {"context", context}, {"max_seqs_at_context", fit}};
      // Early sequences decode while later ones prefill: one token per fill step at most.
      const int64_t fill_steps = (int64_t{batch} * context + budget - 1) / budget + batch;
      const int32_t max_tokens = static_cast<int32_t>(fill_steps + *warmup + *steps + 2);
      const int64_t per_seq = (int64_t{context} + max_tokens + t.block_size - 1) / t.block_size;
      if (batch > t.engine_options.max_num_seqs || per_seq * batch * t.block_size > capacity) {
        j["skipped"] = absl::StrCat("needs ", per_seq * batch * t.block_size, " KV slots and ",
                                    batch, " seqs; the cache holds ", capacity, ", max_num_seqs ",
                                    t.engine_options.max_num_seqs);
        std::cout << j.dump() << std::endl;
        const bool seqs = batch > t.engine_options.max_num_seqs, kv = per_seq * batch * t.block_size > capacity;
        table.push_back(absl::StrFormat("decode  b=%-4d ctx=%-6d skipped (%s)", batch, context,
                                        seqs && kv ? "max_num_seqs and KV capacity"
                                        : seqs     ? "max_num_seqs"
                                                   : "KV capacity"));
        continue;
      }
      absl::StatusOr<DecodeRun> r =
          RunDecode(engine, cfg.vocab_size, batch, context, max_tokens, *warmup, *steps, batch * 7919 + context);
      if (!r.ok()) return Fail("bench", r.status());
      const double ms = Median(r->step_ms);
      // KV read per step: every sequence's cached tokens (context plus the generated ones, ~mid-run).
      const double kv_bytes = kv_per_token * batch * (context + *warmup + *steps / 2.0);
      j["ms_per_step"] = ms;
      j["tokens_per_s"] = batch / (ms * 1e-3);
      std::string floor_cell = "floor        -           ";
      if (hbm.has_value()) {
        const double floor_ms = (weight_bytes + kv_bytes) / (*hbm * 1e12) * 1e3;
        j["floor_ms"] = floor_ms;
        j["pct_of_floor"] = 100.0 * floor_ms / ms;
        floor_cell = absl::StrFormat("floor %8.3f ms  %5.1f %%", floor_ms, 100.0 * floor_ms / ms);
      }
      j["fill_s"] = r->fill_s;
      j["steps"] = r->step_ms.size();
      std::cout << j.dump() << std::endl;
      table.push_back(absl::StrFormat("decode  b=%-4d ctx=%-6d %9.3f ms/step  %s  %10.0f tok/s", batch, context,
                                      ms, floor_cell, batch / (ms * 1e-3)));
    }
  }
  for (int32_t len : *prefills) {
    nlohmann::json j = {{"kind", "prefill"}, {"tokens", len}};
    if (len + 1 > capacity) {
      j["skipped"] = "KV capacity";
      std::cout << j.dump() << std::endl;
      continue;
    }
    std::vector<double> ttft;
    for (int32_t i = 0; i <= *reps; ++i) {  // run 0 warms up
      absl::StatusOr<DecodeRun> r = RunDecode(engine, cfg.vocab_size, 1, len, 2, 0, 1, 1000 + i);
      if (!r.ok()) return Fail("bench", r.status());
      if (i > 0) ttft.push_back(r->fill_s);
    }
    const double sec = Median(ttft);
    // All ranks together (a replicated LM head counted once) against all their GPUs' peak.
    const double flops = 2.0 * matmul_params * len +
                         2.0 * static_cast<double>(len) * len * cfg.q_size() * cfg.num_layers;
    const double tflops = flops / sec * 1e-12;
    j["ttft_ms"] = sec * 1e3;
    j["tokens_per_s"] = len / sec;
    j["tflops"] = tflops;
    std::string peak_cell;
    if (peak.has_value()) {
      j["pct_of_gemm_peak"] = 100.0 * tflops / (*peak * tp);
      peak_cell = absl::StrFormat("  %5.1f %% of %.4g", 100.0 * tflops / (*peak * tp), *peak * tp);
    }
    std::cout << j.dump() << std::endl;
    table.push_back(absl::StrFormat("prefill %-6d tokens  TTFT %9.2f ms  %10.0f tok/s  %7.1f TFLOP/s%s", len,
                                    sec * 1e3, len / sec, tflops, peak_cell));
  }
  if (engine.scheduler().num_free_blocks() != t.num_blocks) {
    return Fail("bench", absl::InternalError("KV blocks leaked after the benchmark"));
  }
  if (!json_only) {
    std::cout << absl::StrFormat("# %s on %s, tensor-parallel size %d%s%s, load %.1f s, %.2f GB weights "
                                 "read per step per GPU\n# %s\n# ceilings: %s%s",
                                 args->Get("model"), t.device, t.tp,
                                 t.tp > 1 ? (t.shard_lm_head ? " (LM head split)" : " (LM head replicated)") : "",
                                 t.tp > 1 ? absl::StrCat(", all-reduce: ", t.all_reduce) : "",
                                 t.load_s, weight_bytes * 1e-9, floor_assumes,
                                 hbm.has_value() ? absl::StrFormat("%.4g TB/s, ", *hbm) : "",
                                 peak.has_value() ? absl::StrFormat("%.4g TFLOP/s; ", *peak) : "") +
                     ceilings_from + "\n";
    for (const std::string& line : table) std::cout << line << "\n";
  }
  return 0;
}

}  // namespace lorc::cli
