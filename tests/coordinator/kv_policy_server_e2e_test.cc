// Token-level KV policies (issue #17, kvpolicy/) served end to end: `lorcserve coordinator
// --local-workers 2 --kv-policy ...` (tensor parallelism 2 over Gloo, worker processes, gRPC; the
// policy travels in LoadModelRequest.kv_policy, each rank keeps the states of its own KV heads)
// streams the same greedy tokens for the golden prompts as the same policy run in this process at
// TP = 1 (LoadModel + Engine::Generate), for CORM with a 30 % budget and MiKV int2 budget-free.
// The windows are small (w 4, r 4, one sink) so that the policy chooses inside the golden prompts'
// 48 tokens: the reference must differ from full KV's golden tokens somewhere, else a worker that
// ignored the policy would pass. The server compacts (kvpolicy/README.md "Compaction", from the
// larger of the two ranks' slot reports) and the reference does not: the tokens must not care,
// and the compaction counters must move. ModelInfo names the policy; a bad policy flag ends the
// coordinator's startup naming the flag.
// Fixture: server_e2e_fixture.h; the policy's own cases: tests/kvpolicy/, tests/worker/.
#include <sys/wait.h>

#include "kvpolicy/kv_policy_config.h"
#include "tests/coordinator/in_process_golden.h"
#include "tests/coordinator/server_e2e_fixture.h"
#include "tests/testing/http_get.h"

namespace lorc {
namespace e2e {
namespace {

constexpr int kMaxTokens = 48;

struct Policy {
  std::string name;
  std::vector<std::string> flags;  // for the coordinator
  kvpolicy::KvPolicyConfig config;  // the same, for the in-process reference
};
void PrintTo(const Policy& p, std::ostream* os) { *os << p.name; }

Policy Corm30() {
  Policy p{"corm_budget_30", {"--kv-policy", "corm", "--kv-token-budget", "30%"}, {}};
  p.config.kind = kvpolicy::KvPolicyKind::kCorm;
  p.config.budget_fraction = 0.3;
  return p;
}
// int2: int4 keeps every golden token of full KV here (docs/KV_POLICIES.md), so it would not show
// that the workers ran the policy.
Policy Mikv2Free() {
  Policy p{"mikv_int2_budget_free", {"--kv-policy", "mikv", "--kv-policy-low-bits", "2"}, {}};
  p.config.kind = kvpolicy::KvPolicyKind::kMikv;
  p.config.low_bits = 2;
  return p;
}
// Both: w 4, r 4, one sink.
Policy SmallWindows(Policy p) {
  for (const char* f : {"--kv-policy-window", "--kv-policy-recent"}) {
    p.flags.push_back(f);
    p.flags.push_back("4");
  }
  p.flags.push_back("--kv-policy-sinks");
  p.flags.push_back("1");
  p.config.window = 4;
  p.config.recent = 4;
  p.config.sinks = 1;
  return p;
}

// Greedy tokens of every golden prompt through the in-process engine at TP = 1 with `policy`.
std::vector<std::vector<int32_t>> RunInProcess(const kvpolicy::KvPolicyConfig& policy) {
  KvCacheOptions kv;
  kv.kv_policy = policy;
  return GoldenGreedyInProcess(Tiny(), kv, kMaxTokens);
}

class KvPolicyServerTest : public ServerE2ETest, public ::testing::WithParamInterface<Policy> {};

TEST_P(KvPolicyServerTest, TensorParallelTwoStreamsTheInProcessTokens) {
  const Policy& policy = GetParam();
  const std::vector<std::vector<int32_t>> want = RunInProcess(policy.config);
  const std::vector<Golden>& golden = GoldenPrompts();
  ASSERT_EQ(want.size(), golden.size());
  bool differs = false;
  for (size_t i = 0; i < want.size(); ++i) {
    const size_t n = std::min<size_t>(kMaxTokens, golden[i].greedy_ids.size());
    const std::vector<int32_t> full(golden[i].greedy_ids.begin(), golden[i].greedy_ids.begin() + n);
    differs |= want[i] != full;
  }
  EXPECT_TRUE(differs) << policy.name << " gives full KV's golden tokens: the policy never chose";

  std::vector<std::string> flags = policy.flags;
  flags.insert(flags.end(), {"--metrics-port", "0"});
  ASSERT_NO_FATAL_FAILURE(StartServer(2, flags));
  const std::string line = server_->ReadStdoutLine(10);
  int metrics_port = 0;
  ASSERT_EQ(line.rfind("METRICS_LISTENING 0.0.0.0:", 0), 0u) << "got '" << line << "'";
  ASSERT_TRUE(absl::SimpleAtoi(line.substr(line.rfind(':') + 1), &metrics_port)) << line;
  const v1::ModelInfoResponse info = Info();
  EXPECT_EQ(info.tensor_parallel_size(), 2);
  EXPECT_EQ(info.kv_policy(), policy.config.Describe());

  // Served with compaction (the coordinator compacts from the larger of the two ranks' slot
  // reports), against the in-process run without it: the same tokens.
  ExpectGoldenStreams(want, kMaxTokens);
  std::map<std::string, double> m;
  WaitFor([&] {
    absl::StatusOr<::lorc::testing::HttpResponse> r = ::lorc::testing::HttpGet(metrics_port, "/metrics");
    if (r.ok()) m = ::lorc::testing::ParseExposition(r->body);
    return m.contains("lorcserve_kv_compactions_total") && m.at("lorcserve_kv_compactions_total") > 0;
  }, 10);
  EXPECT_GT(m["lorcserve_kv_compactions_total"], 0) << "the policy never gave memory back";
  EXPECT_GT(m["lorcserve_kv_compaction_freed_blocks_total"], 0);
  if (GetParam().config.kind != kvpolicy::KvPolicyKind::kMikv) {
    // Only MiKV compacts without freeing a block (to pack keys demoted in their slots).
    EXPECT_GE(m["lorcserve_kv_compaction_freed_blocks_total"], m["lorcserve_kv_compactions_total"]);
  }
}

INSTANTIATE_TEST_SUITE_P(KvPolicy, KvPolicyServerTest,
                         ::testing::Values(SmallWindows(Corm30()), SmallWindows(Mikv2Free())),
                         [](const ::testing::TestParamInfo<Policy>& p) { return p.param.name; });

// Without a policy ModelInfo says "none".
TEST_F(ServerE2ETest, ModelInfoSaysNoKvPolicyByDefault) {
  ASSERT_NO_FATAL_FAILURE(StartServer(1));
  EXPECT_EQ(Info().kv_policy(), "none");
}

// A policy flag the workers could never run ends the startup with the flag's name and a plain
// exit code, before any worker starts.
TEST_F(ServerE2ETest, ABadKvPolicyFlagFailsStartupNamingTheFlag) {
  ServerProcess server;
  const std::string error = server.Start(1, {"--kv-policy", "mikv", "--kv-policy-low-bits", "3"});
  EXPECT_THAT(error, HasSubstr("exited before printing LISTENING"));
  EXPECT_THAT(error, HasSubstr("--kv-policy-low-bits: 3 is not 4 or 2"));
  const auto t0 = Clock::now();
  while (server.Alive() && SecondsSince(t0) < 30) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  EXPECT_FALSE(server.Alive());
  const int status = server.exit_status();
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) != 0) << "wait status " << status << "\n" << error;
}

}  // namespace
}  // namespace e2e
}  // namespace lorc
