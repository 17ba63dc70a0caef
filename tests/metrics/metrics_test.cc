// metrics/: the registry's families (names are an interface: the Grafana dashboard and users'
// alerts use them), updates as seen in the exposition, the structured log lines (parsed back),
// the /metrics HTTP endpoint (with idle, slow and too many clients), and the dashboard's PromQL
// naming only metrics that exist.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <fstream>
#include <set>
#include <sstream>
#include <thread>

#include "absl/status/status.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "metrics/metrics_exposer.h"
#include "metrics/request_log.h"
#include "metrics/serving_metrics.h"
#include "nlohmann/json.hpp"
#include "tests/testing/http_get.h"
#include "tests/testing/status_matchers.h"
#include "tokenizer/tokenizer_regex.h"

namespace lorc {
namespace {

using ::lorc::testing::HttpGet;
using ::lorc::testing::ParseExposition;
using ::testing::HasSubstr;

// Every family, as metrics/README.md lists them (histograms by their base name).
const std::vector<std::string> kCounters = {
    "lorcserve_requests_total",
    "lorcserve_requests_started_total",
    "lorcserve_prompt_tokens_total",
    "lorcserve_cached_prompt_tokens_total",
    "lorcserve_generation_tokens_total",
    "lorcserve_engine_steps_total",
    "lorcserve_preemptions_total",
    "lorcserve_kv_compactions_total",
    "lorcserve_kv_compaction_freed_blocks_total",
    "lorcserve_prefix_cache_queries_total",
    "lorcserve_prefix_cache_query_tokens_total",
    "lorcserve_prefix_cache_hit_tokens_total",
    "lorcserve_prefix_cache_evictions_total",
    "lorcserve_host_kv_offloads_total",
    "lorcserve_host_kv_loads_total",
    "lorcserve_sessions_ended_total",
    "lorcserve_worker_failures_total",
    "lorcserve_worker_recoveries_total",
};
const std::vector<std::string> kGauges = {
    "lorcserve_num_sequences_waiting",  "lorcserve_num_sequences_running",
    "lorcserve_kv_blocks_used",         "lorcserve_kv_blocks_capacity",
    "lorcserve_host_kv_blocks_used",    "lorcserve_host_kv_blocks_capacity",
    "lorcserve_serving_state",          "lorcserve_worker_group_size",
    "lorcserve_num_requests_in_flight",
    "lorcserve_kv_policy_positions_used", "lorcserve_kv_policy_positions_capacity",
    "lorcserve_sessions",               "lorcserve_session_kv_blocks",
    "lorcserve_kv_cache_usage_perc",    "lorcserve_prefix_cache_blocks",
};
const std::vector<std::string> kHistograms = {
    "lorcserve_time_to_first_token_seconds",
    "lorcserve_inter_token_latency_seconds",
    "lorcserve_e2e_request_latency_seconds",
    "lorcserve_step_duration_seconds",
};

TEST(ServingMetricsTest, ExposesExactlyTheListedFamilies) {
  ServingMetrics m;
  std::vector<std::string> expected = kCounters;
  expected.insert(expected.end(), kGauges.begin(), kGauges.end());
  for (const std::string& h : kHistograms) {
    for (const char* suffix : {"_bucket", "_sum", "_count"}) expected.push_back(h + suffix);
  }
  std::sort(expected.begin(), expected.end());
  EXPECT_EQ(m.SampleNames(), expected);
  // Every series exists before anything happens (a scrape at start-up shows all of them).
  const std::map<std::string, double> s = ParseExposition(m.Serialize());
  for (const std::string& name : expected) {
    const bool found = std::any_of(s.begin(), s.end(), [&](const auto& kv) {
      return kv.first == name || kv.first.rfind(name + "{", 0) == 0;
    });
    EXPECT_TRUE(found) << name;
  }
  EXPECT_EQ(s.at("lorcserve_requests_total{outcome=\"stop\"}"), 0);
  EXPECT_EQ(s.at("lorcserve_requests_total{outcome=\"deadline\"}"), 0);
  EXPECT_EQ(s.at("lorcserve_serving_state{state=\"starting\"}"), 1);
  EXPECT_EQ(s.at("lorcserve_serving_state{state=\"serving\"}"), 0);
}

TEST(ServingMetricsTest, UpdatesShowInTheExposition) {
  ServingMetrics m;
  for (int i = 0; i < 8; ++i) m.RequestStarted();  // 6 end below, 2 stay in flight
  m.CountRequest("stop");
  m.CountRequest("stop");
  m.CountRequest("length");
  m.CountRequest(ServingMetrics::OutcomeOfStatus(absl::StatusCode::kCancelled));
  m.CountRequest(ServingMetrics::OutcomeOfStatus(absl::StatusCode::kInvalidArgument));
  m.CountRequest("no-such-outcome");
  m.AddPromptTokens(21);
  m.AddCachedPromptTokens(16);
  m.AddGenerationTokens(8);
  m.AddGenerationTokens(0);
  m.AddGenerationTokens(-3);  // ignored: counters only go up
  m.ObserveTimeToFirstToken(0.02);
  m.ObserveInterTokenLatency(0.004);
  m.ObserveInterTokenLatency(0.006);
  m.ObserveE2eLatency(0.5);
  m.ObserveStep(0.0001, 0.003, -1);  // no result applied in this iteration
  m.ObserveStep(-1, 0.004, 0.0002);
  m.AddEngineSteps(1);
  m.SetScheduler({.num_waiting = 3, .num_running = 2, .kv_blocks_used = 10,
                  .kv_blocks_capacity = 100, .host_kv_blocks_used = 1, .host_kv_blocks_capacity = 8,
                  .kv_policy_positions_used = 768, .kv_policy_positions_capacity = 4096, .sessions = 3,
                  .session_blocks = 12, .cached_blocks = 40});
  m.AddScheduler({.preemptions = 2, .prefix_cache_queries = 1, .prefix_cache_query_tokens = 32,
                  .prefix_cache_hit_tokens = 16, .prefix_cache_host_hit_tokens = 4, .sessions_expired = 1,
                  .sessions_capped = 2, .sessions_closed = 5, .prefix_cache_evictions = 7, .host_kv_offloads = 6,
                  .host_kv_loads = 3});
  m.SetServingState(ServingState::kRecovering);
  m.SetWorkerGroupSize(2);
  m.CountWorkerFailure();
  m.CountWorkerRecovery();

  const std::map<std::string, double> s = ParseExposition(m.Serialize());
  EXPECT_EQ(s.at("lorcserve_requests_total{outcome=\"stop\"}"), 2);
  EXPECT_EQ(s.at("lorcserve_requests_total{outcome=\"length\"}"), 1);
  EXPECT_EQ(s.at("lorcserve_requests_total{outcome=\"cancelled\"}"), 1);
  EXPECT_EQ(s.at("lorcserve_requests_total{outcome=\"invalid_argument\"}"), 1);
  EXPECT_EQ(s.at("lorcserve_requests_total{outcome=\"other\"}"), 1);
  // started = ended (every outcome) + in flight: the check a tester could not write in PromQL.
  EXPECT_EQ(s.at("lorcserve_requests_started_total"), 8);
  EXPECT_EQ(s.at("lorcserve_num_requests_in_flight"), 2);
  double ended = 0;
  for (const auto& [series, v] : s) {
    if (series.rfind("lorcserve_requests_total{", 0) == 0) ended += v;
  }
  EXPECT_EQ(ended + s.at("lorcserve_num_requests_in_flight"), s.at("lorcserve_requests_started_total"));
  EXPECT_EQ(s.at("lorcserve_prompt_tokens_total"), 21);
  EXPECT_EQ(s.at("lorcserve_cached_prompt_tokens_total"), 16);
  EXPECT_EQ(s.at("lorcserve_generation_tokens_total"), 8);
  EXPECT_EQ(s.at("lorcserve_time_to_first_token_seconds_count"), 1);
  EXPECT_DOUBLE_EQ(s.at("lorcserve_time_to_first_token_seconds_sum"), 0.02);
  EXPECT_EQ(s.at("lorcserve_inter_token_latency_seconds_count"), 2);
  // 0.004 and 0.006 both fall at or below the 0.0075 bucket, not the 0.005 one both.
  EXPECT_EQ(s.at("lorcserve_inter_token_latency_seconds_bucket{le=\"0.005\"}"), 1);
  EXPECT_EQ(s.at("lorcserve_inter_token_latency_seconds_bucket{le=\"0.0075\"}"), 2);
  EXPECT_EQ(s.at("lorcserve_e2e_request_latency_seconds_count"), 1);
  EXPECT_EQ(s.at("lorcserve_step_duration_seconds_count{phase=\"schedule\"}"), 1);
  EXPECT_EQ(s.at("lorcserve_step_duration_seconds_count{phase=\"workers\"}"), 2);
  EXPECT_EQ(s.at("lorcserve_step_duration_seconds_count{phase=\"apply\"}"), 1);
  EXPECT_EQ(s.at("lorcserve_engine_steps_total"), 1);
  EXPECT_EQ(s.at("lorcserve_num_sequences_waiting"), 3);
  EXPECT_EQ(s.at("lorcserve_num_sequences_running"), 2);
  EXPECT_EQ(s.at("lorcserve_kv_blocks_used"), 10);
  EXPECT_EQ(s.at("lorcserve_kv_blocks_capacity"), 100);
  EXPECT_EQ(s.at("lorcserve_host_kv_blocks_used"), 1);
  EXPECT_EQ(s.at("lorcserve_host_kv_blocks_capacity"), 8);
  EXPECT_EQ(s.at("lorcserve_kv_policy_positions_used"), 768);
  EXPECT_EQ(s.at("lorcserve_kv_policy_positions_capacity"), 4096);
  EXPECT_EQ(s.at("lorcserve_sessions"), 3);
  EXPECT_EQ(s.at("lorcserve_session_kv_blocks"), 12);
  EXPECT_DOUBLE_EQ(s.at("lorcserve_kv_cache_usage_perc"), 0.1);
  EXPECT_EQ(s.at("lorcserve_prefix_cache_blocks"), 40);
  EXPECT_EQ(s.at("lorcserve_prefix_cache_evictions_total"), 7);
  EXPECT_EQ(s.at("lorcserve_host_kv_offloads_total"), 6);
  EXPECT_EQ(s.at("lorcserve_host_kv_loads_total"), 3);
  EXPECT_EQ(s.at("lorcserve_sessions_ended_total{reason=\"expired\"}"), 1);
  EXPECT_EQ(s.at("lorcserve_sessions_ended_total{reason=\"capped\"}"), 2);
  EXPECT_EQ(s.at("lorcserve_sessions_ended_total{reason=\"closed\"}"), 5);
  EXPECT_EQ(s.at("lorcserve_preemptions_total"), 2);
  EXPECT_EQ(s.at("lorcserve_prefix_cache_queries_total"), 1);
  EXPECT_EQ(s.at("lorcserve_prefix_cache_query_tokens_total"), 32);
  EXPECT_EQ(s.at("lorcserve_prefix_cache_hit_tokens_total{tier=\"device\"}"), 16);
  EXPECT_EQ(s.at("lorcserve_prefix_cache_hit_tokens_total{tier=\"host\"}"), 4);
  EXPECT_EQ(s.at("lorcserve_serving_state{state=\"recovering\"}"), 1);
  EXPECT_EQ(s.at("lorcserve_serving_state{state=\"serving\"}"), 0);
  EXPECT_EQ(s.at("lorcserve_serving_state{state=\"starting\"}"), 0);
  EXPECT_EQ(s.at("lorcserve_worker_group_size"), 2);
  EXPECT_EQ(s.at("lorcserve_worker_failures_total"), 1);
  EXPECT_EQ(s.at("lorcserve_worker_recoveries_total"), 1);

  // A drain: its own state, the only one at 1 (found by a tester: serving stayed 1 while
  // readiness was NOT_SERVING).
  m.SetServingState(ServingState::kDraining);
  const std::map<std::string, double> d = ParseExposition(m.Serialize());
  for (const char* state : {"starting", "serving", "draining", "recovering", "failed"}) {
    EXPECT_EQ(d.at(absl::StrCat("lorcserve_serving_state{state=\"", state, "\"}")),
              std::string(state) == "draining" ? 1 : 0)
        << state;
  }
}

TEST(ServingMetricsTest, OutcomeLabels) {
  EXPECT_EQ(ServingMetrics::OutcomeOfStatus(absl::StatusCode::kCancelled), "cancelled");
  EXPECT_EQ(ServingMetrics::OutcomeOfStatus(absl::StatusCode::kDeadlineExceeded), "deadline");
  EXPECT_EQ(ServingMetrics::OutcomeOfStatus(absl::StatusCode::kResourceExhausted), "resource_exhausted");
  EXPECT_EQ(ServingMetrics::OutcomeOfStatus(absl::StatusCode::kUnavailable), "unavailable");
}

// ---- log lines ------------------------------------------------------------------------------

RequestLogRecord Record() {
  RequestLogRecord r;
  r.request_id = "chat-\"7\"\nx";  // a quote and a newline: still one line, parsed back exactly
  r.outcome = "length";
  r.n = 2;
  r.prompt_tokens = 90;
  r.cached_prompt_tokens = 80;
  r.completion_tokens = 16;
  r.ttft_s = 0.0123456;
  r.duration_s = 0.25;
  return r;
}

TEST(RequestLogTest, JsonLineParsesBack) {
  const absl::Time now = absl::FromUnixSeconds(1764590400) + absl::Milliseconds(5);
  const std::string line = FormatRequestLine(Record(), LogFormat::kJson, now);
  ASSERT_FALSE(line.empty());
  EXPECT_EQ(line.back(), '\n');
  EXPECT_EQ(line.find('\n'), line.size() - 1) << "one object per line";
  const nlohmann::json j = nlohmann::json::parse(line);
  EXPECT_EQ(j.at("ts"), "2025-12-01T12:00:00.005Z");
  EXPECT_EQ(j.at("event"), "request");
  EXPECT_EQ(j.at("request_id"), "chat-\"7\"\nx");
  EXPECT_EQ(j.at("outcome"), "length");
  EXPECT_EQ(j.at("n"), 2);
  EXPECT_EQ(j.at("prompt_tokens"), 90);
  EXPECT_EQ(j.at("cached_prompt_tokens"), 80);
  EXPECT_EQ(j.at("completion_tokens"), 16);
  EXPECT_DOUBLE_EQ(j.at("ttft_ms").get<double>(), 12.346);  // rounded to microseconds
  EXPECT_DOUBLE_EQ(j.at("duration_ms").get<double>(), 250);
  EXPECT_FALSE(j.contains("status"));
  // The first keys are the timestamp and the event, for people reading the raw stream.
  EXPECT_EQ(line.rfind("{\"ts\":", 0), 0u);

  RequestLogRecord failed;
  failed.request_id = "req-3";
  failed.outcome = "invalid_argument";
  failed.status_message = "empty prompt: set text or token_ids";
  failed.duration_s = 0.001;
  const nlohmann::json f = nlohmann::json::parse(FormatRequestLine(failed, LogFormat::kJson, now));
  EXPECT_TRUE(f.at("ttft_ms").is_null());
  EXPECT_EQ(f.at("status"), "empty prompt: set text or token_ids");
  EXPECT_EQ(f.at("prompt_tokens"), 0);

  // Bytes that are not UTF-8 in a client's request_id do not throw.
  RequestLogRecord bad = failed;
  bad.request_id = "\xff\xfe";
  EXPECT_NO_THROW(nlohmann::json::parse(FormatRequestLine(bad, LogFormat::kJson, now)));
}

TEST(RequestLogTest, TextLine) {
  const std::string line = FormatRequestLine(Record(), LogFormat::kText, absl::Now());
  EXPECT_EQ(line,
            "lorcserve request id=\"chat-\\\"7\\\"\\nx\" outcome=length prompt_tokens=90 "
            "cached_prompt_tokens=80 completion_tokens=16 n=2 ttft_ms=12.346 duration_ms=250.000\n");
  RequestLogRecord failed;
  failed.request_id = "r";
  failed.outcome = "cancelled";
  failed.status_message = "request cancelled";
  EXPECT_THAT(FormatRequestLine(failed, LogFormat::kText, absl::Now()),
              HasSubstr("ttft_ms=-1 duration_ms=0.000 status=\"request cancelled\"\n"));
  // Only what logfmt needs is escaped (CEscape wrote "the model\'s"); other bytes as \xHH.
  failed.status_message = "the model's \\ \"x\"\t\x01";
  failed.request_id = "caf\xc3\xa9";
  const std::string line2 = FormatRequestLine(failed, LogFormat::kText, absl::Now());
  EXPECT_THAT(line2, HasSubstr("status=\"the model's \\\\ \\\"x\\\"\\t\\x01\"\n"));
  EXPECT_THAT(line2, HasSubstr("id=\"caf\\xc3\\xa9\" "));
}

TEST(RequestLogTest, WorkerEventLines) {
  const WorkerEvent e{"restart", "restarting worker 1", 1};
  EXPECT_EQ(FormatWorkerLine(e, LogFormat::kText, absl::Now()),
            "lorcserve coordinator: restarting worker 1\n");
  const nlohmann::json j = nlohmann::json::parse(FormatWorkerLine(e, LogFormat::kJson, absl::Now()));
  EXPECT_EQ(j.at("event"), "worker_restart");
  EXPECT_EQ(j.at("message"), "restarting worker 1");
  EXPECT_EQ(j.at("rank"), 1);
  const nlohmann::json g = nlohmann::json::parse(
      FormatWorkerLine({"give_up", "not serving: gave up"}, LogFormat::kJson, absl::Now()));
  EXPECT_EQ(g.at("event"), "worker_give_up");
  EXPECT_FALSE(g.contains("rank"));
}

TEST(RequestLogTest, ParseLogFormat) {
  EXPECT_EQ(ParseLogFormat("text").value(), LogFormat::kText);
  EXPECT_EQ(ParseLogFormat("json").value(), LogFormat::kJson);
  const absl::StatusOr<LogFormat> bad = ParseLogFormat("JSON");
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(bad.status().message()), HasSubstr("--log-format"));
}

TEST(RequestLogTest, EventLogWritesWholeLines) {
  std::FILE* f = std::tmpfile();
  ASSERT_NE(f, nullptr);
  const EventLog log(LogFormat::kJson, f);
  log.Request(Record());
  log.Worker({"join", "2 worker(s) joined"});
  std::rewind(f);
  std::string text;
  char buf[512];
  for (size_t n; (n = std::fread(buf, 1, sizeof(buf), f)) > 0;) text.append(buf, n);
  std::fclose(f);
  std::vector<std::string> lines = absl::StrSplit(text, '\n', absl::SkipEmpty());
  ASSERT_EQ(lines.size(), 2u) << text;
  EXPECT_EQ(nlohmann::json::parse(lines[0]).at("event"), "request");
  EXPECT_EQ(nlohmann::json::parse(lines[1]).at("event"), "worker_join");
}

// ---- the /metrics endpoint ------------------------------------------------------------------

TEST(MetricsExposerTest, ServesTheRegistry) {
  ServingMetrics m;
  absl::StatusOr<std::unique_ptr<MetricsExposer>> e = MetricsExposer::Start("0.0.0.0", 0, m.registry());
  ASSERT_TRUE(e.ok()) << e.status();
  const int port = (*e)->port();
  EXPECT_GT(port, 0);
  EXPECT_EQ((*e)->address(), absl::StrCat("0.0.0.0:", port));
  m.AddGenerationTokens(5);
  absl::StatusOr<testing::HttpResponse> r = HttpGet(port, "/metrics");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->status, 200);
  EXPECT_EQ(ParseExposition(r->body).at("lorcserve_generation_tokens_total"), 5);
  m.AddGenerationTokens(2);  // a later scrape sees the update
  r = HttpGet(port, "/metrics?x=1");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(ParseExposition(r->body).at("lorcserve_generation_tokens_total"), 7);
  r = HttpGet(port, "/");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->status, 404);
  r = HttpGet(port, "/metrics", "POST");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->status, 405);
  r = HttpGet(port, "/metrics", "HEAD");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->status, 200);
  EXPECT_EQ(r->body, "");

  // The same port again: in use.
  absl::StatusOr<std::unique_ptr<MetricsExposer>> again = MetricsExposer::Start("0.0.0.0", port, m.registry());
  ASSERT_FALSE(again.ok());
  EXPECT_EQ(again.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(std::string(again.status().message()), HasSubstr("--metrics-port"));
  // Gone after destruction.
  e->reset();
  EXPECT_FALSE(HttpGet(port, "/metrics").ok());
}

TEST(MetricsExposerTest, RejectsBadPorts) {
  ServingMetrics m;
  for (int port : {-1, 65536}) {
    absl::StatusOr<std::unique_ptr<MetricsExposer>> e = MetricsExposer::Start("0.0.0.0", port, m.registry());
    ASSERT_FALSE(e.ok());
    EXPECT_EQ(e.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(e.status().message()), HasSubstr("--metrics-port"));
  }
}

TEST(MetricsExposerTest, BindsTheGivenHost) {
  ServingMetrics m;
  absl::StatusOr<std::unique_ptr<MetricsExposer>> e = MetricsExposer::Start("127.0.0.1", 0, m.registry());
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_EQ((*e)->address(), absl::StrCat("127.0.0.1:", (*e)->port()));
  absl::StatusOr<testing::HttpResponse> r = HttpGet((*e)->port(), "/metrics");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->status, 200);
  // A name resolves to its address; the printed address is the bound one.
  e = MetricsExposer::Start("localhost", 0, m.registry());
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_THAT((*e)->address(), ::testing::AnyOf(::testing::StartsWith("127.0.0.1:"), ::testing::StartsWith("[::1]:")));
  // Errors name --metrics-host: a name that does not resolve, an address not of this machine
  // (192.0.2.1: TEST-NET-1), an empty host.
  for (const std::string host : {"no-such-host.invalid", "192.0.2.1", ""}) {
    e = MetricsExposer::Start(host, 0, m.registry());
    ASSERT_FALSE(e.ok()) << host;
    EXPECT_THAT(std::string(e.status().message()), HasSubstr("--metrics-host")) << e.status();
  }
}

// A TCP connection to 127.0.0.1:port (-1 on failure).
int ConnectTo(int port) {
  const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (fd < 0 || connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    if (fd >= 0) close(fd);
    return -1;
  }
  return fd;
}

double SecondsSince(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Found by a tester: one connection was served at a time with a 2 s timeout per read, so a
// client sending one header line a second held every scrape for 20 s, and 5 idle connections
// delayed one by ~10 s.
TEST(MetricsExposerTest, IdleAndSlowClientsDelayNoScrape) {
  ServingMetrics m;
  absl::StatusOr<std::unique_ptr<MetricsExposer>> e = MetricsExposer::Start("127.0.0.1", 0, m.registry());
  ASSERT_TRUE(e.ok()) << e.status();
  const int port = (*e)->port();
  std::vector<int> idle;
  for (int i = 0; i < 5; ++i) {
    idle.push_back(ConnectTo(port));
    ASSERT_GE(idle.back(), 0);
  }
  // A slowloris: the request line, then one header line every 300 ms, never the blank line.
  const int slow = ConnectTo(port);
  ASSERT_GE(slow, 0);
  std::atomic<bool> stop{false};
  std::thread trickle([&] {
    std::string line = "GET /metrics HTTP/1.1\r\n";
    for (int i = 0; i < 30 && !stop; ++i) {
      if (send(slow, line.data(), line.size(), MSG_NOSIGNAL) < 0) return;  // closed by the server
      line = absl::StrCat("X-Slow-", i, ": 1\r\n");
      std::this_thread::sleep_for(std::chrono::milliseconds(300));
    }
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(500));  // all of them open and waiting
  for (int i = 0; i < 3; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    absl::StatusOr<testing::HttpResponse> r = HttpGet(port, "/metrics");
    const double took = SecondsSince(t0);
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->status, 200);
    EXPECT_LT(took, 1.0) << "scrape " << i << " waited behind the idle and slow connections";
  }
  // The slow one is closed at its total deadline (2 s from its accept) with a 408, although it
  // kept sending: it reads the answer and then EOF within ~3 s of opening.
  const auto t_read = std::chrono::steady_clock::now();
  timeval tv{5, 0};
  setsockopt(slow, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  std::string got;
  char buf[512];
  for (ssize_t n; (n = recv(slow, buf, sizeof(buf), 0)) > 0;) got.append(buf, static_cast<size_t>(n));
  EXPECT_LT(SecondsSince(t_read), 3.0);
  EXPECT_THAT(got, HasSubstr("408 Request Timeout"));
  stop = true;
  trickle.join();
  close(slow);
  // So are the idle ones.
  for (int fd : idle) {
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    got.clear();
    for (ssize_t n; (n = recv(fd, buf, sizeof(buf), 0)) > 0;) got.append(buf, static_cast<size_t>(n));
    EXPECT_THAT(got, HasSubstr("408"));
    close(fd);
  }
}

TEST(MetricsExposerTest, ConnectionsBeyondTheCapCloseTheOldest) {
  ServingMetrics m;
  absl::StatusOr<std::unique_ptr<MetricsExposer>> e = MetricsExposer::Start("127.0.0.1", 0, m.registry());
  ASSERT_TRUE(e.ok()) << e.status();
  std::vector<int> idle;
  for (int i = 0; i < MetricsExposer::kMaxConnections + 10; ++i) {
    idle.push_back(ConnectTo((*e)->port()));
    ASSERT_GE(idle.back(), 0);
  }
  const auto t0 = std::chrono::steady_clock::now();
  absl::StatusOr<testing::HttpResponse> r = HttpGet((*e)->port(), "/metrics");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->status, 200);
  EXPECT_LT(SecondsSince(t0), 1.5);
  // The first ones were closed without an answer (EOF at once, well before their deadline).
  timeval tv{1, 0};
  setsockopt(idle[0], SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  char c;
  EXPECT_EQ(recv(idle[0], &c, 1, 0), 0);
  for (int fd : idle) close(fd);
}

// ---- the Grafana dashboard ------------------------------------------------------------------

// Every string under `j` whose key is `key` (recursively).
void Collect(const nlohmann::json& j, const std::string& key, std::vector<std::string>* out) {
  if (j.is_object()) {
    for (auto it = j.begin(); it != j.end(); ++it) {
      if (it.key() == key && it.value().is_string()) out->push_back(it.value().get<std::string>());
      Collect(it.value(), key, out);
    }
  } else if (j.is_array()) {
    for (const nlohmann::json& v : j) Collect(v, key, out);
  }
}

TEST(GrafanaDashboardTest, ParsesAndQueriesOnlyExposedMetrics) {
  const std::string path = std::string(LORC_SOURCE_DIR) + "/deploy/grafana/lorcserve-dashboard.json";
  std::ifstream in(path);
  ASSERT_TRUE(in.good()) << "cannot read " << path;
  std::stringstream ss;
  ss << in.rdbuf();
  nlohmann::json d;
  ASSERT_NO_THROW(d = nlohmann::json::parse(ss.str())) << path << " is not valid JSON";
  EXPECT_EQ(d.at("uid"), "lorcserve");
  ASSERT_TRUE(d.at("panels").is_array());
  std::set<int> ids;
  int with_queries = 0;
  for (const nlohmann::json& p : d.at("panels")) {
    EXPECT_TRUE(ids.insert(p.at("id").get<int>()).second) << "duplicate panel id " << p.at("id");
    EXPECT_TRUE(p.at("gridPos").contains("w")) << p.at("title");
    if (p.at("type") == "row") continue;
    ASSERT_FALSE(p.at("targets").empty()) << p.at("title");
    ++with_queries;
  }
  EXPECT_GE(with_queries, 10);

  std::vector<std::string> exprs;
  Collect(d, "expr", &exprs);
  Collect(d, "definition", &exprs);  // the template variable's query
  ServingMetrics m;
  const std::vector<std::string> names = m.SampleNames();
  const std::set<std::string> exposed(names.begin(), names.end());
  ASSERT_OK_AND_ASSIGN(const std::unique_ptr<tokenizer_internal::Regex> metric,
                       tokenizer_internal::Regex::FromOniguruma("lorcserve_[a-z0-9_]+", "metric"));
  std::set<std::string> used;
  for (const std::string& e : exprs) {
    std::vector<tokenizer_internal::Regex::Match> names_in_e;
    ASSERT_OK(metric->FindAll(e, &names_in_e));
    for (const auto& [begin, end] : names_in_e) {
      const std::string name = e.substr(begin, end - begin);
      used.insert(name);
      EXPECT_TRUE(exposed.contains(name)) << name << " (in `" << e << "`) is not exposed";
    }
  }
  // The panels the issue asks for: request outcomes, TTFT / ITL / e2e quantiles, KV usage,
  // queue, prefix hit rate, the step split.
  for (const char* m : {"lorcserve_requests_total", "lorcserve_time_to_first_token_seconds_bucket",
                        "lorcserve_inter_token_latency_seconds_bucket",
                        "lorcserve_e2e_request_latency_seconds_bucket", "lorcserve_kv_blocks_used",
                        "lorcserve_kv_blocks_capacity", "lorcserve_num_sequences_waiting",
                        "lorcserve_prefix_cache_hit_tokens_total",
                        "lorcserve_prefix_cache_query_tokens_total",
                        "lorcserve_step_duration_seconds_sum", "lorcserve_serving_state"}) {
    EXPECT_TRUE(used.contains(m)) << m << " is on no panel";
  }
  int quantiles = 0;
  for (const std::string& e : exprs) quantiles += e.find("histogram_quantile(0.99") != std::string::npos;
  EXPECT_GE(quantiles, 3);
}

}  // namespace
}  // namespace lorc
