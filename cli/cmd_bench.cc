// lorcserve bench: load-tests a running server with concurrent streaming clients and reports
// throughput, latency percentiles and where the coordinator's step time went (JSON + table).
#include <algorithm>
#include <atomic>
#include <iostream>
#include <optional>
#include <mutex>
#include <random>
#include <thread>

#include <limits>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "cli/api_client.h"
#include "cli/commands.h"
#include "cli/session.h"
#include "common/defaults.h"
#include "common/grpc_status.h"
#include "nlohmann/json.hpp"

namespace lorc::cli {
namespace {

double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const double idx = p * static_cast<double>(v.size() - 1);
  const size_t lo = static_cast<size_t>(idx);
  const size_t hi = std::min(lo + 1, v.size() - 1);
  return v[lo] + (v[hi] - v[lo]) * (idx - static_cast<double>(lo));
}

absl::StatusOr<lorcserve::v1::ModelInfoResponse> Info(lorcserve::v1::LorcServe::Stub& stub) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  lorcserve::v1::ModelInfoResponse resp;
  const grpc::Status s = stub.ModelInfo(&ctx, {}, &resp);
  if (!s.ok()) return FromGrpcStatus(s);
  return resp;
}

}  // namespace

int RunBench(int argc, char** argv) {
  // --model DIR: the offline engine benchmark in this process (no server).
  for (int i = 2; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--model" || a.rfind("--model=", 0) == 0) return RunEngineBench(argc, argv);
  }
  std::vector<FlagSpec> flags = {
      {"server", true, "coordinator address (default 127.0.0.1:50051)", "ADDR"},
      {"requests", true, "requests in total (default 64)", "N"},
      {"concurrency", true, "clients streaming at once (default 8)", "C"},
      {"prompt-len", true, "random prompt tokens per request (default 128)", "L"},
      {"max-tokens", true,
       absl::StrCat("tokens generated per request (EOS ignored, default ", defaults::kCliMaxTokens,
                    ")"),
       "T"},
      {"seed", true, "seed of the random prompts (default 0)", "S"},
      {"json", false, "print only the JSON object"},
      {"help", false, "show this help"},
  };
  for (const FlagSpec& f : ClientSecurityFlags()) flags.insert(flags.end() - 1, f);  // before --help
  const char* synopsis = "--server ADDR [--requests N] [--concurrency C] [--prompt-len L] [--max-tokens T]";
  int exit_code = 0;
  const std::optional<Args> args = ParseCommand("bench", synopsis, flags, argc, argv, &exit_code);
  if (!args.has_value()) return exit_code;
  constexpr int64_t kBig = std::numeric_limits<int32_t>::max();
  absl::StatusOr<int64_t> n = args->GetIntInRange("requests", 64, 1, 1'000'000),
                          c = args->GetIntInRange("concurrency", 8, 1, 4096),
                          plen = args->GetIntInRange("prompt-len", 128, 1, kBig),
                          tmax = args->GetIntInRange("max-tokens", defaults::kCliMaxTokens, 1, kBig),
                          seed = args->GetIntInRange("seed", 0, 0, std::numeric_limits<int64_t>::max());
  for (const auto* v : {&n, &c, &plen, &tmax, &seed}) {
    if (!v->ok()) return Fail("bench", v->status());
  }
  absl::StatusOr<std::string> server = args->GetServerAddress("server", "127.0.0.1:50051");
  if (!server.ok()) return Fail("bench", server.status());
  absl::StatusOr<ClientSecurity> security = ParseClientSecurity(*args);
  if (!security.ok()) return Fail("bench", security.status());
  absl::StatusOr<std::shared_ptr<grpc::Channel>> channel = Connect(*server, *security);
  if (!channel.ok()) return Fail("bench", channel.status());
  auto stub = lorcserve::v1::LorcServe::NewStub(*channel);
  absl::StatusOr<lorcserve::v1::ModelInfoResponse> before = Info(*stub);
  if (!before.ok()) return Fail("bench", before.status());

  // Checked before any prompt is built (found by a tester: --prompt-len 2147483647 grew the
  // client to 7.5 GB before the server could refuse it).
  if (before->max_model_len() > 0 && *plen + *tmax > before->max_model_len()) {
    return Fail("bench", absl::InvalidArgumentError(absl::StrCat(
                             "--prompt-len ", *plen, " + --max-tokens ", *tmax, " = ", *plen + *tmax,
                             " exceeds the server's max_model_len ", before->max_model_len())));
  }
  if (before->vocab_size() <= 3) {
    return Fail("bench", absl::FailedPreconditionError(absl::StrCat(
                             "the server's vocab_size ", before->vocab_size(),
                             ": the random prompts take ids from 3 up (0-2 are kept for special tokens); it "
                             "needs vocab_size > 3")));
  }
  // Request k's random prompt, built when a client takes it (its own seeded generator).
  std::uniform_int_distribution<int32_t> tok(3, static_cast<int32_t>(before->vocab_size() - 1));
  auto make_request = [&](int64_t k) {
    std::mt19937_64 rng(static_cast<uint64_t>(*seed) ^ (static_cast<uint64_t>(k) * 0x9E3779B97F4A7C15ull));
    std::uniform_int_distribution<int32_t> draw = tok;
    lorcserve::v1::GenerateRequest r;
    for (int64_t i = 0; i < *plen; ++i) r.mutable_token_ids()->add_ids(draw(rng));
    r.mutable_sampling()->set_max_tokens(static_cast<int32_t>(*tmax));
    r.mutable_sampling()->set_ignore_eos(true);
    return r;
  };
  std::vector<StreamResult> results(*n);
  std::atomic<int64_t> next{0};
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<std::thread> clients;
  for (int64_t i = 0; i < *c; ++i) {
    clients.emplace_back([&] {
      for (int64_t k; (k = next.fetch_add(1)) < *n;) results[k] = StreamGenerate(*stub, make_request(k), 3600);
    });
  }
  for (auto& t : clients) t.join();
  const double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  absl::StatusOr<lorcserve::v1::ModelInfoResponse> after = Info(*stub);
  if (!after.ok()) return Fail("bench", after.status());

  std::vector<double> ttft, itl, latency;
  int64_t ok = 0, out_tokens = 0;
  std::string first_error;
  for (const StreamResult& r : results) {
    if (!r.status.ok()) {
      if (first_error.empty()) first_error = r.status.error_message();
      continue;
    }
    ++ok;
    out_tokens += static_cast<int64_t>(r.ids.size());
    ttft.push_back(r.ttft_s * 1e3);
    latency.push_back(r.total_s * 1e3);
    for (size_t i = 1; i < r.token_times_s.size(); ++i) {
      itl.push_back((r.token_times_s[i] - r.token_times_s[i - 1]) * 1e3);
    }
  }
  const auto& sb = before->step_stats();
  const auto& sa = after->step_stats();
  const double steps = static_cast<double>(sa.steps() - sb.steps());
  const double pipelined = static_cast<double>(sa.pipelined_steps() - sb.pipelined_steps());
  auto delta_mean = [&](double a_mean, double b_mean) {
    return steps > 0 ? (a_mean * sa.steps() - b_mean * sb.steps()) / steps : 0.0;
  };
  nlohmann::json j;
  j["config"] = {{"requests", *n}, {"concurrency", *c}, {"prompt_len", *plen}, {"max_tokens", *tmax},
                 {"tp", after->tensor_parallel_size()}, {"backend", after->backend()},
                 {"transport", sa.transport()}};
  j["ok"] = ok;
  j["first_error"] = first_error;
  j["wall_s"] = wall;
  j["output_tokens_per_s"] = out_tokens / wall;
  j["total_tokens_per_s"] = (out_tokens + ok * *plen) / wall;
  j["ttft_ms"] = {{"p50", Percentile(ttft, 0.5)}, {"p90", Percentile(ttft, 0.9)}, {"p99", Percentile(ttft, 0.99)}};
  j["itl_ms"] = {{"p50", Percentile(itl, 0.5)}, {"p90", Percentile(itl, 0.9)}, {"p99", Percentile(itl, 0.99)}};
  j["latency_ms"] = {{"p50", Percentile(latency, 0.5)}, {"p99", Percentile(latency, 0.99)}};
  j["steps"] = {{"count", sa.steps() - sb.steps()},
                {"schedule_us", delta_mean(sa.schedule_us_mean(), sb.schedule_us_mean())},
                {"rpc_us", delta_mean(sa.rpc_us_mean(), sb.rpc_us_mean())},
                {"apply_us", delta_mean(sa.apply_us_mean(), sb.apply_us_mean())},
                {"worker_compute_us", delta_mean(sa.worker_compute_us_mean(), sb.worker_compute_us_mean())},
                {"worker_idle_us", pipelined > 0 ? (sa.worker_idle_us_mean() * sa.pipelined_steps() -
                                                    sb.worker_idle_us_mean() * sb.pipelined_steps()) /
                                                       pipelined
                                                 : 0.0},
                {"pipelined_steps", sa.pipelined_steps() - sb.pipelined_steps()},
                {"wait_us", delta_mean(sa.wait_us_mean(), sb.wait_us_mean())}};
  // Without a live worker group (a worker failed and the group is restarting) ModelInfo has no
  // KV figures: null, with the failure, rather than zeros that read as a full cache.
  if (after->kv_capacity_blocks() > 0) {
    j["kv_free_blocks_after"] = after->kv_free_blocks();
    j["kv_capacity_blocks"] = after->kv_capacity_blocks();
  } else {
    j["kv_free_blocks_after"] = nullptr;
    j["kv_capacity_blocks"] = nullptr;
  }
  if (!after->worker_failure().empty()) j["worker_failure"] = after->worker_failure();
  if (!args->Has("json")) {
    std::cout << absl::StrFormat(
        "requests %d ok of %d, concurrency %d, prompt %d, output %d, TP %d (%s, %s steps)\n"
        "throughput   %.1f output tok/s, %.1f total tok/s, wall %.2f s\n"
        "TTFT ms      p50 %.1f  p90 %.1f  p99 %.1f\n"
        "ITL ms       p50 %.2f  p90 %.2f  p99 %.2f\n"
        "step us      schedule %.1f  rpc %.1f  apply %.1f  (worker compute %.1f, idle %.1f) over %d steps\n",
        ok, *n, *c, *plen, *tmax, after->tensor_parallel_size(), after->backend(), sa.transport(),
        out_tokens / wall, (out_tokens + ok * *plen) / wall, wall, Percentile(ttft, 0.5),
        Percentile(ttft, 0.9), Percentile(ttft, 0.99), Percentile(itl, 0.5), Percentile(itl, 0.9),
        Percentile(itl, 0.99), j["steps"]["schedule_us"].get<double>(), j["steps"]["rpc_us"].get<double>(),
        j["steps"]["apply_us"].get<double>(), j["steps"]["worker_compute_us"].get<double>(),
        j["steps"]["worker_idle_us"].get<double>(), static_cast<int64_t>(steps));
    if (!first_error.empty()) std::cout << "first error  " << first_error << "\n";
  }
  std::cout << j.dump() << "\n";
  return ok == *n ? 0 : 1;
}

}  // namespace lorc::cli
