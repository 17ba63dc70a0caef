// The Prometheus endpoint of a real `lorcserve coordinator --local-workers 1 --metrics-port 0
// --log-format json`: scraped over HTTP before and after requests (served ones with a repeated
// prefix, a cancelled one, one past its deadline, an invalid one) and across a worker recovery.
// Every listed metric is present; counters move by exactly what the clients were told (tokens,
// cached tokens, outcomes); the JSON log has one line per request and per worker event.
#include "metrics/serving_metrics.h"
#include "tests/coordinator/server_e2e_fixture.h"
#include "tests/testing/http_get.h"

namespace lorc {
namespace e2e {
namespace {

using Samples = std::map<std::string, double>;

class MetricsE2ETest : public ServerE2ETest {
 protected:
  void StartWithMetrics() {
    ASSERT_NO_FATAL_FAILURE(StartServer(1, {"--metrics-port", "0", "--log-format", "json"}));
    const std::string line = server_->ReadStdoutLine(10);
    ASSERT_EQ(line.rfind("METRICS_LISTENING 0.0.0.0:", 0), 0u) << "got '" << line << "'";
    ASSERT_TRUE(absl::SimpleAtoi(line.substr(line.rfind(':') + 1), &metrics_port_)) << line;
  }

  Samples Scrape() {
    absl::StatusOr<::lorc::testing::HttpResponse> r = ::lorc::testing::HttpGet(metrics_port_, "/metrics");
    EXPECT_TRUE(r.ok()) << r.status();
    if (!r.ok()) return {};
    EXPECT_EQ(r->status, 200);
    return ::lorc::testing::ParseExposition(r->body);
  }

  // Scrapes until `series` reaches `value` (the handler counts its outcome just after the
  // client has its last message), for up to 10 s; returns the last scrape.
  Samples ScrapeWhen(const std::string& series, double value) {
    Samples s = Scrape();
    WaitFor([&] {
      s = Scrape();
      return s.contains(series) && s.at(series) >= value;
    }, 10);
    return s;
  }

  // The server's JSON log lines (its stderr also holds the workers' text lines).
  std::vector<nlohmann::json> JsonLog() {
    std::vector<nlohmann::json> out;
    for (absl::string_view line : absl::StrSplit(server_->Stderr(), '\n', absl::SkipEmpty())) {
      if (line.front() != '{') continue;
      nlohmann::json j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
      EXPECT_FALSE(j.is_discarded()) << "not JSON: " << line;
      if (!j.is_discarded()) out.push_back(std::move(j));
    }
    return out;
  }

  // The golden prompts one after another: a ~90-token context (full blocks get cached).
  std::vector<int32_t> Context() {
    std::vector<int32_t> ids;
    for (const Golden& g : GoldenPrompts()) ids.insert(ids.end(), g.prompt_ids.begin(), g.prompt_ids.end());
    return ids;
  }

  int metrics_port_ = 0;
};

double Delta(const Samples& after, const Samples& before, const std::string& series) {
  return after.at(series) - (before.contains(series) ? before.at(series) : 0.0);
}

TEST_F(MetricsE2ETest, EveryMetricPresentAndMoving) {
  ASSERT_NO_FATAL_FAILURE(StartWithMetrics());
  const Samples s0 = Scrape();
  // Every family of the registry is exposed (names from the same ServingMetrics the server uses).
  for (const std::string& name : ServingMetrics().SampleNames()) {
    const bool found = std::any_of(s0.begin(), s0.end(), [&](const auto& kv) {
      return kv.first == name || kv.first.rfind(name + "{", 0) == 0;
    });
    EXPECT_TRUE(found) << name << " missing from /metrics";
  }
  EXPECT_EQ(s0.at("lorcserve_serving_state{state=\"serving\"}"), 1);
  EXPECT_EQ(s0.at("lorcserve_serving_state{state=\"starting\"}"), 0);
  EXPECT_EQ(s0.at("lorcserve_worker_group_size"), 1);
  EXPECT_EQ(s0.at("lorcserve_kv_blocks_capacity"), Info().kv_capacity_blocks());
  EXPECT_EQ(s0.at("lorcserve_kv_blocks_used"), 0);

  // ---- served requests: the context twice (the second finds its full blocks cached), a golden
  // prompt once; counters move by exactly what the clients' usage says.
  const std::vector<int32_t> ctx = Context();
  std::vector<cli::StreamResult> served;
  for (const auto& [ids, max_tokens, id] :
       std::vector<std::tuple<std::vector<int32_t>, int, std::string>>{
           {ctx, 8, "ctx-1"}, {ctx, 8, "ctx-2"}, {GoldenPrompts()[0].prompt_ids, 12, "golden-0"}}) {
    v1::GenerateRequest req = IdsRequest(ids, max_tokens);
    req.set_request_id(id);
    if (id == "ctx-2") req.set_session_id("chat-1");  // a session keeps its blocks after the turn
    served.push_back(Generate(req));
    ASSERT_TRUE(served.back().status.ok()) << StatusText(served.back().status);
  }
  int64_t prompt = 0, cached = 0, completion = 0, itl = 0;
  for (const cli::StreamResult& r : served) {
    prompt += r.final.usage().prompt_tokens();
    cached += r.final.usage().cached_prompt_tokens();
    completion += r.final.usage().completion_tokens();
    itl += r.final.usage().completion_tokens() - 1;  // one token per step: gaps between them
  }
  ASSERT_GT(served[1].final.usage().cached_prompt_tokens(), 0);
  const Samples s1 = ScrapeWhen("lorcserve_requests_total{outcome=\"length\"}", 3);
  EXPECT_EQ(Delta(s1, s0, "lorcserve_requests_total{outcome=\"length\"}"), 3);
  EXPECT_EQ(Delta(s1, s0, "lorcserve_requests_total{outcome=\"stop\"}"), 0);
  EXPECT_EQ(Delta(s1, s0, "lorcserve_prompt_tokens_total"), prompt);
  EXPECT_EQ(Delta(s1, s0, "lorcserve_cached_prompt_tokens_total"), cached);
  EXPECT_EQ(Delta(s1, s0, "lorcserve_generation_tokens_total"), completion);
  EXPECT_EQ(Delta(s1, s0, "lorcserve_prefix_cache_queries_total"), 3);
  EXPECT_EQ(Delta(s1, s0, "lorcserve_prefix_cache_hit_tokens_total{tier=\"device\"}"), cached);
  EXPECT_EQ(Delta(s1, s0, "lorcserve_prefix_cache_hit_tokens_total{tier=\"host\"}"), 0);
  EXPECT_GE(Delta(s1, s0, "lorcserve_prefix_cache_query_tokens_total"), cached);
  EXPECT_EQ(Delta(s1, s0, "lorcserve_sessions"), 1);
  EXPECT_GT(Delta(s1, s0, "lorcserve_session_kv_blocks"), 0);
  EXPECT_GT(s1.at("lorcserve_prefix_cache_blocks"), 0);  // the prompts' full blocks stay indexed
  EXPECT_DOUBLE_EQ(s1.at("lorcserve_kv_cache_usage_perc"),
                   s1.at("lorcserve_kv_blocks_used") / s1.at("lorcserve_kv_blocks_capacity"));
  EXPECT_EQ(Delta(s1, s0, "lorcserve_sessions_ended_total{reason=\"closed\"}"), 0);
  EXPECT_EQ(Delta(s1, s0, "lorcserve_time_to_first_token_seconds_count"), 3);
  EXPECT_EQ(Delta(s1, s0, "lorcserve_e2e_request_latency_seconds_count"), 3);
  EXPECT_EQ(Delta(s1, s0, "lorcserve_inter_token_latency_seconds_count"), itl);
  EXPECT_GT(Delta(s1, s0, "lorcserve_inter_token_latency_seconds_sum"), 0);
  const double steps = Delta(s1, s0, "lorcserve_engine_steps_total");
  EXPECT_GE(steps, 8 + 8 + 12);
  // One apply observation per applied result; schedule and workers at least as often.
  EXPECT_EQ(Delta(s1, s0, "lorcserve_step_duration_seconds_count{phase=\"apply\"}"), steps);
  EXPECT_GE(Delta(s1, s0, "lorcserve_step_duration_seconds_count{phase=\"schedule\"}"), steps);
  EXPECT_GE(Delta(s1, s0, "lorcserve_step_duration_seconds_count{phase=\"workers\"}"), steps);
  EXPECT_GT(Delta(s1, s0, "lorcserve_step_duration_seconds_sum{phase=\"workers\"}"), 0);
  EXPECT_EQ(s1.at("lorcserve_preemptions_total"), 0);  // the cache is far from full
  ASSERT_TRUE(CloseSession("chat-1").ok());  // its blocks go back; counted as closed
  WaitIdle(10);
  const Samples idle = Scrape();
  EXPECT_EQ(idle.at("lorcserve_sessions"), 0);
  EXPECT_EQ(idle.at("lorcserve_session_kv_blocks"), 0);
  EXPECT_EQ(Delta(idle, s0, "lorcserve_sessions_ended_total{reason=\"closed\"}"), 1);
  EXPECT_EQ(idle.at("lorcserve_num_sequences_running"), 0);
  EXPECT_EQ(idle.at("lorcserve_num_sequences_waiting"), 0);
  EXPECT_EQ(idle.at("lorcserve_kv_blocks_used"), 0);
  EXPECT_EQ(idle.at("lorcserve_kv_cache_usage_perc"), 0);

  // ---- a request running while scraped: it shows as running and holding blocks.
  v1::GenerateRequest long_req = IdsRequest(GoldenPrompts()[1].prompt_ids, 400);
  long_req.mutable_sampling()->set_ignore_eos(true);
  long_req.set_request_id("to-cancel");
  {
    grpc::ClientContext cctx;
    std::unique_ptr<grpc::ClientReader<v1::GenerateResponse>> reader = stub_->Generate(&cctx, long_req);
    v1::GenerateResponse first;
    ASSERT_TRUE(reader->Read(&first));
    const Samples busy = Scrape();
    EXPECT_EQ(busy.at("lorcserve_num_sequences_running"), 1);
    EXPECT_GT(busy.at("lorcserve_kv_blocks_used"), 0);
    cctx.TryCancel();
    v1::GenerateResponse more;
    while (reader->Read(&more)) {
    }
    EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
  }
  // ---- past its deadline, and invalid.
  // The context again (its full blocks cached), so the log line of a request that ends by its
  // deadline has cached prompt tokens to report.
  v1::GenerateRequest late = IdsRequest(ctx, 400);
  late.mutable_sampling()->set_ignore_eos(true);
  late.set_request_id("too-late");
  const cli::StreamResult expired = Generate(late, /*timeout_s=*/0.3);
  EXPECT_EQ(expired.status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED) << StatusText(expired.status);
  v1::GenerateRequest invalid;
  invalid.set_request_id("no-prompt");
  const cli::StreamResult rejected = Generate(invalid);
  EXPECT_EQ(rejected.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);

  ScrapeWhen("lorcserve_requests_total{outcome=\"deadline\"}", 1);
  ScrapeWhen("lorcserve_requests_total{outcome=\"cancelled\"}", 1);
  WaitIdle(10);  // the engine has ended the aborted ones (a token may come before the abort)
  const Samples s2 = Scrape();
  EXPECT_EQ(Delta(s2, s1, "lorcserve_requests_total{outcome=\"cancelled\"}"), 1);
  EXPECT_EQ(Delta(s2, s1, "lorcserve_requests_total{outcome=\"deadline\"}"), 1);
  EXPECT_EQ(Delta(s2, s1, "lorcserve_requests_total{outcome=\"invalid_argument\"}"), 1);
  EXPECT_EQ(Delta(s2, s1, "lorcserve_requests_total{outcome=\"length\"}"), 0);
  // The aborted ones generated tokens (at least the one the cancelled client read) but are no
  // end-to-end latency sample (not served to the end).
  EXPECT_GE(Delta(s2, s1, "lorcserve_generation_tokens_total"), 1);
  EXPECT_EQ(Delta(s2, s1, "lorcserve_e2e_request_latency_seconds_count"), 0);
  EXPECT_EQ(s2.at("lorcserve_kv_blocks_used"), 0);

  // ---- the log: one JSON line per request, with what its client got.
  std::map<std::string, nlohmann::json> by_id;
  bool joined = false, small = false;
  for (const nlohmann::json& j : JsonLog()) {
    if (j.at("event") == "request") by_id[j.at("request_id").get<std::string>()] = j;
    joined = joined || j.at("event") == "worker_join";
    small = small || j.at("event") == "worker_kv_cache_small";
  }
  EXPECT_TRUE(joined);
  EXPECT_FALSE(small) << "the default cache holds max_model_len";
  for (size_t i = 0; i < served.size(); ++i) {
    const std::string id = served[i].final.request_id();
    ASSERT_TRUE(by_id.contains(id)) << id;
    const nlohmann::json& j = by_id[id];
    EXPECT_EQ(j.at("outcome"), "length");
    EXPECT_EQ(j.at("prompt_tokens"), served[i].final.usage().prompt_tokens());
    EXPECT_EQ(j.at("cached_prompt_tokens"), served[i].final.usage().cached_prompt_tokens());
    EXPECT_EQ(j.at("completion_tokens"), served[i].final.usage().completion_tokens());
    EXPECT_GT(j.at("ttft_ms").get<double>(), 0);
    EXPECT_GE(j.at("duration_ms").get<double>(), j.at("ttft_ms").get<double>());
  }
  ASSERT_TRUE(by_id.contains("to-cancel"));
  EXPECT_EQ(by_id["to-cancel"].at("outcome"), "cancelled");
  EXPECT_GE(by_id["to-cancel"].at("completion_tokens").get<int>(), 1);
  ASSERT_TRUE(by_id.contains("too-late"));
  EXPECT_EQ(by_id["too-late"].at("outcome"), "deadline");
  EXPECT_EQ(by_id["too-late"].at("status"), "the client's deadline passed");  // not "request cancelled"
  // Known from its first token on (a very slow run may end it before one).
  if (by_id["too-late"].at("completion_tokens").get<int>() >= 1) {
    EXPECT_EQ(by_id["too-late"].at("cached_prompt_tokens"), served[1].final.usage().cached_prompt_tokens());
  }
  ASSERT_TRUE(by_id.contains("no-prompt"));
  EXPECT_EQ(by_id["no-prompt"].at("outcome"), "invalid_argument");
  EXPECT_THAT(by_id["no-prompt"].at("status").get<std::string>(), HasSubstr("prompt"));
  EXPECT_TRUE(by_id["no-prompt"].at("ttft_ms").is_null());

  // ---- a worker recovery: the same registry keeps counting.
  ASSERT_NO_FATAL_FAILURE(KillWorkerAndAwaitRestart());
  const Samples s3 = Scrape();
  EXPECT_EQ(Delta(s3, s2, "lorcserve_worker_failures_total"), 1);
  EXPECT_EQ(Delta(s3, s2, "lorcserve_worker_recoveries_total"), 1);
  EXPECT_EQ(s3.at("lorcserve_serving_state{state=\"serving\"}"), 1);
  EXPECT_EQ(s3.at("lorcserve_serving_state{state=\"recovering\"}"), 0);
  EXPECT_EQ(s3.at("lorcserve_worker_group_size"), 1);
  EXPECT_EQ(s3.at("lorcserve_generation_tokens_total"), s2.at("lorcserve_generation_tokens_total"));
  EXPECT_EQ(s3.at("lorcserve_requests_total{outcome=\"length\"}"),
            s2.at("lorcserve_requests_total{outcome=\"length\"}"));
  v1::GenerateRequest after = IdsRequest(GoldenPrompts()[2].prompt_ids, 6);
  after.set_request_id("after-recovery");
  const cli::StreamResult r = Generate(after);
  ASSERT_TRUE(r.status.ok()) << StatusText(r.status);
  const Samples s4 = ScrapeWhen("lorcserve_requests_total{outcome=\"length\"}",
                                s3.at("lorcserve_requests_total{outcome=\"length\"}") + 1);
  EXPECT_EQ(Delta(s4, s3, "lorcserve_generation_tokens_total"), 6);
  EXPECT_EQ(Delta(s4, s3, "lorcserve_requests_total{outcome=\"length\"}"), 1);
  EXPECT_EQ(Delta(s4, s3, "lorcserve_prefix_cache_queries_total"), 1);  // the new engine's, added
  std::set<std::string> events;
  for (const nlohmann::json& j : JsonLog()) events.insert(j.at("event").get<std::string>());
  for (const char* e : {"worker_failure", "worker_restart", "worker_recovery", "worker_join"}) {
    EXPECT_TRUE(events.contains(e)) << e << " not logged";
  }
}

// Found by a tester: during a drain readiness was NOT_SERVING but serving_state said serving,
// and no series told the calls in flight.
// Deadlines of a few milliseconds: many calls end before the coordinator has read their
// request. Those count as deadline (or cancelled) outcomes, never as failed_precondition
// "Buffer not initialized", which 207 of a tester's 2,400 such calls were.
TEST_F(MetricsE2ETest, CallsEndedBeforeTheirRequestArrivedAreDeadlines) {
  ASSERT_NO_FATAL_FAILURE(StartWithMetrics());
  const Samples s0 = Scrape();
  std::vector<std::thread> clients;
  for (int t = 0; t < 4; ++t) {
    clients.emplace_back([this, t] {
      for (int i = 0; i < 75; ++i) {
        (void)Generate(IdsRequest(GoldenPrompts()[0].prompt_ids, 3), 0.0005 * (1 + (i + t) % 6));
      }
    });
  }
  for (std::thread& c : clients) c.join();
  WaitIdle(10);
  const Samples s1 = Scrape();
  const std::string bad = "lorcserve_requests_total{outcome=\"failed_precondition\"}";
  EXPECT_EQ(s1.contains(bad) ? Delta(s1, s0, bad) : 0.0, 0.0);
  for (const nlohmann::json& j : JsonLog()) {
    EXPECT_NE(j.value("outcome", ""), "failed_precondition") << j.dump();
  }
}

TEST_F(MetricsE2ETest, DrainingStateAndRequestsInFlight) {
  ASSERT_NO_FATAL_FAILURE(StartWithMetrics());
  auto ended = [](const Samples& s) {
    double n = 0;
    for (const auto& [series, v] : s) {
      if (series.rfind("lorcserve_requests_total{", 0) == 0) n += v;
    }
    return n;
  };
  const Samples s0 = Scrape();
  EXPECT_EQ(s0.at("lorcserve_num_requests_in_flight"), 0);
  EXPECT_EQ(s0.at("lorcserve_requests_started_total"), ended(s0));
  v1::GenerateRequest req = IdsRequest(GoldenPrompts()[0].prompt_ids, 4000);
  req.mutable_sampling()->set_ignore_eos(true);
  grpc::ClientContext cctx;
  std::unique_ptr<grpc::ClientReader<v1::GenerateResponse>> reader = stub_->Generate(&cctx, req);
  v1::GenerateResponse first;
  ASSERT_TRUE(reader->Read(&first));
  const Samples busy = Scrape();
  EXPECT_EQ(busy.at("lorcserve_num_requests_in_flight"), 1);
  EXPECT_EQ(busy.at("lorcserve_requests_started_total"), ended(busy) + 1);
  EXPECT_EQ(busy.at("lorcserve_serving_state{state=\"serving\"}"), 1);
  EXPECT_EQ(busy.at("lorcserve_serving_state{state=\"draining\"}"), 0);
  ASSERT_EQ(kill(server_->pid(), SIGTERM), 0);  // the drain waits for the request (30 s)
  Samples draining;
  EXPECT_TRUE(WaitFor([&] {
    draining = Scrape();
    return draining.at("lorcserve_serving_state{state=\"draining\"}") == 1;
  }, 5));
  EXPECT_EQ(draining.at("lorcserve_serving_state{state=\"serving\"}"), 0);
  EXPECT_EQ(draining.at("lorcserve_num_requests_in_flight"), 1);
  // A call refused by the drain starts and ends too.
  const cli::StreamResult refused = Generate(IdsRequest(GoldenPrompts()[1].prompt_ids, 4));
  EXPECT_EQ(refused.status.error_code(), grpc::StatusCode::UNAVAILABLE);
  const Samples after = ScrapeWhen("lorcserve_requests_total{outcome=\"unavailable\"}",
                                   draining.at("lorcserve_requests_total{outcome=\"unavailable\"}") + 1);
  EXPECT_EQ(after.at("lorcserve_requests_started_total"), ended(after) + 1);
  EXPECT_EQ(after.at("lorcserve_num_requests_in_flight"), 1);
  cctx.TryCancel();  // the drain then ends, and the process
  v1::GenerateResponse more;
  while (reader->Read(&more)) {
  }
}

TEST_F(MetricsE2ETest, BadFlagsAreErrors) {
  int code = 0;
  const std::string out = RunLorcserve({"coordinator", "--model", Tiny(), "--local-workers", "1",
                                        "--listen", "127.0.0.1:0", "--log-format", "yaml"},
                                       &code);
  EXPECT_NE(code, 0);
  EXPECT_THAT(out, Not(HasSubstr("LISTENING")));
  const std::string out2 = RunLorcserve({"coordinator", "--model", Tiny(), "--local-workers", "1",
                                         "--listen", "127.0.0.1:0", "--metrics-port", "70000"},
                                        &code);
  EXPECT_NE(code, 0);
  EXPECT_THAT(out2, Not(HasSubstr("LISTENING")));
  // --metrics-host: only with --metrics-port, and an address (exit 2 naming the flag; stderr is
  // this test's, the exit code and stdout are checked).
  for (const std::vector<std::string>& extra :
       {std::vector<std::string>{"--metrics-host", "127.0.0.1"},
        std::vector<std::string>{"--metrics-port", "0", "--metrics-host", "no-such-host.invalid"}}) {
    std::vector<std::string> args = {"coordinator", "--model", Tiny(), "--local-workers", "1", "--listen",
                                     "127.0.0.1:0"};
    args.insert(args.end(), extra.begin(), extra.end());
    const std::string out3 = RunLorcserve(args, &code);
    EXPECT_EQ(code, 2) << extra.back();
    EXPECT_THAT(out3, Not(HasSubstr("LISTENING")));
  }
}

// A cache smaller than one sequence of max_model_len (64 blocks of 16 = 1,024 tokens < 4,096)
// serves, and says so once in the log, naming the flags that size it (a tester's request failed
// with "can never fit" and nothing at start-up had said why, 2026-12-05).
TEST_F(MetricsE2ETest, ACacheSmallerThanTheModelLengthIsLoggedAtStart) {
  ASSERT_NO_FATAL_FAILURE(StartServer(1, {"--log-format", "json", "--num-blocks", "64"}));
  std::string message;
  WaitFor([&] {
    for (const nlohmann::json& j : JsonLog()) {
      if (j.at("event") == "worker_kv_cache_small") message = j.at("message").get<std::string>();
    }
    return !message.empty();
  }, 10);
  EXPECT_THAT(message, HasSubstr("holds 1024 tokens (64 blocks of 16)"));
  EXPECT_THAT(message, HasSubstr("max_model_len 4096"));
  EXPECT_THAT(message, HasSubstr("--num-blocks"));
}

// Found by a tester: --metrics-port always bound 0.0.0.0, even with --listen 127.0.0.1 and a
// TLS / token-protected public port.
TEST_F(MetricsE2ETest, MetricsHostChoosesTheAddress) {
  ASSERT_NO_FATAL_FAILURE(StartServer(1, {"--metrics-port", "0", "--metrics-host", "127.0.0.1"}));
  const std::string line = server_->ReadStdoutLine(10);
  ASSERT_EQ(line.rfind("METRICS_LISTENING 127.0.0.1:", 0), 0u) << "got '" << line << "'";
  ASSERT_TRUE(absl::SimpleAtoi(line.substr(line.rfind(':') + 1), &metrics_port_)) << line;
  EXPECT_EQ(Scrape().at("lorcserve_serving_state{state=\"serving\"}"), 1);
}

}  // namespace
}  // namespace e2e
}  // namespace lorc
