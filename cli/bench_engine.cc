// lorcserve bench --model DIR: the offline engine benchmark (issue #8). The engine runs in this
// process (no gRPC): decode ms per step for each (batch, context), prefill tokens/s and time to
// first token for single prompts, each next to its physical floor (JSON lines + a table).
#include <algorithm>
#include <chrono>
#include <iostream>
#include <optional>

#include "absl/strings/str_cat.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "cli/commands.h"
#include "cli/session.h"
#include "common/status_macros.h"
#include "nlohmann/json.hpp"

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
      {"hbm-tbps", true, "device copy bandwidth of the decode floor, TB/s (default 4.275)", "X"},
      {"gemm-peak-tflops", true, "BF16 GEMM peak of the prefill floor, TFLOP/s (default 696)", "X"},
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
      id = 3 + static_cast<int32_t>((x >> 33) % static_cast<uint64_t>(vocab - 3));
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

}  // namespace

int RunEngineBench(int argc, char** argv) {
  const std::vector<FlagSpec> flags = Flags();
  const char* synopsis =
      "--model DIR [--backend cuda] [--random-weights] [--decode-batches 1,8,64,256] "
      "[--contexts 128,4096] [--prefill 512,4096] [--steps N] [--json]";
  int exit_code = 0;
  const std::optional<Args> args = ParseCommand("bench", synopsis, flags, argc, argv, &exit_code);
  if (!args.has_value()) return exit_code;
  absl::StatusOr<std::vector<int32_t>> batches = PositiveList(*args, "decode-batches", "1,8,64,256"),
                                       contexts = PositiveList(*args, "contexts", "128,4096"),
                                       prefills = PositiveList(*args, "prefill", "512,4096");
  for (const auto* v : {&batches, &contexts, &prefills}) {
    if (!v->ok()) return Fail("bench", v->status());
  }
  absl::StatusOr<int32_t> steps = args->GetInt32("steps", 32, 1, 1 << 20),
                          warmup = args->GetInt32("warmup-steps", 4, 0, 1 << 20),
                          reps = args->GetInt32("prefill-reps", 3, 1, 1000);
  absl::StatusOr<double> hbm = args->GetDouble("hbm-tbps", 4.275),
                         peak = args->GetDouble("gemm-peak-tflops", 696.0);
  for (const auto* v : {&steps, &warmup, &reps}) {
    if (!v->ok()) return Fail("bench", v->status());
  }
  for (const auto* v : {&hbm, &peak}) {
    if (!v->ok()) return Fail("bench", v->status());
    if (!(**v > 0)) return Fail("bench", absl::InvalidArgumentError("--hbm-tbps / --gemm-peak-tflops must be > 0"));
  }
  absl::StatusOr<std::unique_ptr<Session>> s = OpenSession(*args);
  if (!s.ok()) return Fail("bench", s.status());
  Engine& engine = *(*s)->engine;
  const ModelConfig& cfg = (*s)->model.config;
  const KvCacheSpec& kv = (*s)->model.runner->kv_spec();
  const bool json_only = args->Has("json");
  const double elem = static_cast<double>(DTypeSize(kv.dtype));  // weights share the KV dtype
  // Bytes a decode step must read: every weight but the embedding table (gathered rows only).
  const double embed = static_cast<double>(cfg.vocab_size * cfg.hidden_size);
  const double params = static_cast<double>(cfg.NumParameters());
  const double matmul_params = params - (cfg.tie_word_embeddings ? 0.0 : embed);
  const double weight_bytes = matmul_params * elem;
  const double kv_per_token = static_cast<double>(kv.BytesPerToken());
  const int64_t capacity = static_cast<int64_t>(kv.num_blocks) * kv.block_size;

  nlohmann::json head = {{"kind", "config"}, {"engine", "lorcserve"}, {"model", args->Get("model")},
                         {"backend", (*s)->backend->name()}, {"params", params},
                         {"weight_bytes_read", weight_bytes}, {"kv_bytes_per_token", kv_per_token},
                         {"kv_capacity_tokens", capacity}, {"load_s", (*s)->model.load_seconds},
                         {"hbm_tbps", *hbm}, {"gemm_peak_tflops", *peak}};
  std::cout << head.dump() << std::endl;
  std::vector<std::string> table;
  const int32_t budget = (*s)->engine_options.max_num_batched_tokens;
  for (int32_t context : *contexts) {
    for (int32_t batch : *batches) {
      nlohmann::json j = {{"kind", "decode"}, {"batch", batch}, {"context", context}};
      // Early sequences decode while later ones prefill: one token per fill step at most.
      const int64_t fill_steps = (int64_t{batch} * context + budget - 1) / budget + batch;
      const int32_t max_tokens = static_cast<int32_t>(fill_steps + *warmup + *steps + 2);
      const int64_t per_seq = (int64_t{context} + max_tokens + kv.block_size - 1) / kv.block_size;
      if (batch > (*s)->engine_options.max_num_seqs || per_seq * batch * kv.block_size > capacity) {
        j["skipped"] = absl::StrCat("needs ", per_seq * batch * kv.block_size, " KV slots and ",
                                    batch, " seqs; the cache holds ", capacity, ", max_num_seqs ",
                                    (*s)->engine_options.max_num_seqs);
        std::cout << j.dump() << std::endl;
        table.push_back(absl::StrFormat("decode  b=%-4d ctx=%-6d skipped (KV capacity)", batch, context));
        continue;
      }
      absl::StatusOr<DecodeRun> r =
          RunDecode(engine, cfg.vocab_size, batch, context, max_tokens, *warmup, *steps, batch * 7919 + context);
      if (!r.ok()) return Fail("bench", r.status());
      const double ms = Median(r->step_ms);
      // KV read per step: every sequence's cached tokens (context plus the generated ones, ~mid-run).
      const double kv_bytes = kv_per_token * batch * (context + *warmup + *steps / 2.0);
      const double floor_ms = (weight_bytes + kv_bytes) / (*hbm * 1e12) * 1e3;
      j["ms_per_step"] = ms;
      j["tokens_per_s"] = batch / (ms * 1e-3);
      j["floor_ms"] = floor_ms;
      j["pct_of_floor"] = 100.0 * floor_ms / ms;
      j["fill_s"] = r->fill_s;
      j["steps"] = r->step_ms.size();
      std::cout << j.dump() << std::endl;
      table.push_back(absl::StrFormat("decode  b=%-4d ctx=%-6d %9.3f ms/step  floor %8.3f ms  %5.1f %%  %10.0f tok/s",
                                      batch, context, ms, floor_ms, 100.0 * floor_ms / ms,
                                      batch / (ms * 1e-3)));
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
    const double t = Median(ttft);
    const double flops = 2.0 * matmul_params * len +
                         2.0 * static_cast<double>(len) * len * cfg.q_size() * cfg.num_layers;
    j["ttft_ms"] = t * 1e3;
    j["tokens_per_s"] = len / t;
    j["tflops"] = flops / t * 1e-12;
    j["pct_of_gemm_peak"] = 100.0 * flops / t * 1e-12 / *peak;
    std::cout << j.dump() << std::endl;
    table.push_back(absl::StrFormat("prefill %-6d tokens  TTFT %9.2f ms  %10.0f tok/s  %7.1f TFLOP/s  %5.1f %% of %.0f",
                                    len, t * 1e3, len / t, flops / t * 1e-12,
                                    100.0 * flops / t * 1e-12 / *peak, *peak));
  }
  if (engine.scheduler().num_free_blocks() != kv.num_blocks) {
    return Fail("bench", absl::InternalError("KV blocks leaked after the benchmark"));
  }
  if (!json_only) {
    std::cout << absl::StrFormat("# %s on %s, load %.1f s, %.2f GB weights read per step\n",
                                 args->Get("model"), (*s)->backend->name(),
                                 (*s)->model.load_seconds, weight_bytes * 1e-9);
    for (const std::string& line : table) std::cout << line << "\n";
  }
  return 0;
}

}  // namespace lorc::cli
