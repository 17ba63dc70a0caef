// End-to-end tests of the serving system (fixture: server_e2e_fixture.h): golden greedy output
// at TP=1/2/4 and over the unary step transport, many concurrent streaming clients (greedy,
// seeded sampling, stop strings, cancellation, deadlines) with the KV cache checked free
// afterwards, a worker killed mid-generation, a second coordinator refused by a serving worker,
// worker restarts, health, Tokenize, ModelInfo and server reflection. Request semantics over
// gRPC: server_api_e2e_test.cc.
#include "tests/coordinator/server_e2e_fixture.h"

namespace lorc {
namespace e2e {
namespace {

class ServerGoldenTest : public ServerE2ETest, public ::testing::WithParamInterface<int> {};

TEST_P(ServerGoldenTest, GreedyMatchesGolden) {
  // The fixture has 2 KV heads: TP=4 replicates each KV head on two ranks.
  ASSERT_NO_FATAL_FAILURE(StartServer(GetParam()));
  const v1::ModelInfoResponse info = Info();
  EXPECT_EQ(info.tensor_parallel_size(), GetParam());
  EXPECT_EQ(info.num_kv_heads(), 2);
  ASSERT_NO_FATAL_FAILURE(ExpectGoldenGreedy());
  // And once more alone (no batching), for the first prompt.
  const Golden& g = GoldenPrompts()[0];
  const cli::StreamResult r = Generate(IdsRequest(g.prompt_ids, 48));
  ASSERT_TRUE(r.status.ok()) << StatusText(r.status);
  EXPECT_EQ(r.ids, g.greedy_ids);
  EXPECT_EQ(r.text, g.greedy_text);
}

INSTANTIATE_TEST_SUITE_P(TensorParallel, ServerGoldenTest, ::testing::Values(1, 2, 4),
                         [](const ::testing::TestParamInfo<int>& p) { return absl::StrCat("TP", p.param); });

// The LM head split by vocabulary (logits all-gathered), TP = 2 and 4: still the golden tokens.
class ShardedLmHeadTest : public ServerE2ETest, public ::testing::WithParamInterface<int> {};

TEST_P(ShardedLmHeadTest, GreedyMatchesGolden) {
  ASSERT_NO_FATAL_FAILURE(StartServer(GetParam(), {"--lm-head", "split"}));
  EXPECT_EQ(Info().tensor_parallel_size(), GetParam());
  ASSERT_NO_FATAL_FAILURE(ExpectGoldenGreedy());
}

INSTANTIATE_TEST_SUITE_P(TensorParallel, ShardedLmHeadTest, ::testing::Values(2, 4),
                         [](const ::testing::TestParamInfo<int>& p) { return absl::StrCat("TP", p.param); });

// ---- 8. the unary step transport ---------------------------------------------------------------

TEST_F(ServerE2ETest, UnaryStepTransportMatchesGolden) {
  ASSERT_NO_FATAL_FAILURE(StartServer(2, {"--step-transport", "unary"}));
  ASSERT_NO_FATAL_FAILURE(ExpectGoldenGreedy());
  const v1::ModelInfoResponse info = Info();
  EXPECT_EQ(info.step_stats().transport(), "unary");
  EXPECT_GT(info.step_stats().steps(), 0);
}

// ---- 2. many concurrent streaming clients ------------------------------------------------------

TEST_F(ServerE2ETest, ThirtyTwoConcurrentClients) {
  ASSERT_NO_FATAL_FAILURE(StartServer(2));
  const std::vector<Golden>& golden = GoldenPrompts();
  const int64_t capacity = Info().kv_capacity_blocks();
  ASSERT_GT(capacity, 0);

  enum class Kind { kGreedy, kSeeded, kStop, kCancel, kDeadline };
  struct Client {
    Kind kind = Kind::kGreedy;
    int prompt = 0;
    int seed = 0;
    std::string stop;
    cli::StreamResult result;
    int chunks_before_cancel = 0;
  };
  std::vector<Client> clients;
  auto add = [&clients](Kind kind, int prompt, int seed = 0, std::string stop = "") {
    Client c;
    c.kind = kind;
    c.prompt = prompt;
    c.seed = seed;
    c.stop = std::move(stop);
    clients.push_back(std::move(c));
  };
  // 8 greedy golden, 8 seeded sampled (4 pairs of identical requests), 8 with stop strings,
  // 4 cancelled by the client after their first chunk, 4 with a deadline that expires mid-stream.
  for (int i = 0; i < 8; ++i) add(Kind::kGreedy, i % 4);
  for (int i = 0; i < 8; ++i) add(Kind::kSeeded, (i / 2) % 4, 1000 + i / 2);
  const std::vector<std::pair<int, std::string>> stops = {
      {0, "verb"}, {1, "\n"}, {2, "Coagulated"}, {3, "Shak"},
      {0, "of the v"}, {1, "n\n"}, {2, "p. pr."}, {3, "[Obs.]"}};
  for (const auto& [p, s] : stops) {
    ASSERT_NE(golden[p].greedy_text.find(s), std::string::npos) << s;
    add(Kind::kStop, p, 0, s);
  }
  for (int i = 0; i < 4; ++i) add(Kind::kCancel, i % 4);
  for (int i = 0; i < 4; ++i) add(Kind::kDeadline, i % 4);
  ASSERT_EQ(clients.size(), 32u);

  std::latch start(static_cast<std::ptrdiff_t>(clients.size()));
  std::vector<std::thread> threads;
  const auto t0 = Clock::now();
  for (size_t i = 0; i < clients.size(); ++i) {
    threads.emplace_back([&, i] {
      Client& c = clients[i];
      v1::GenerateRequest req = IdsRequest(golden[c.prompt].prompt_ids, 48);
      req.set_request_id(absl::StrCat("client-", i));
      auto* s = req.mutable_sampling();
      switch (c.kind) {
        case Kind::kGreedy: break;
        case Kind::kSeeded:
          s->set_temperature(0.8f);
          s->set_seed(static_cast<uint64_t>(c.seed));
          s->set_max_tokens(32);
          s->set_ignore_eos(true);
          break;
        case Kind::kStop: s->add_stop(c.stop); break;
        case Kind::kCancel:
        case Kind::kDeadline:
          s->set_max_tokens(1000);  // would run for a long time
          s->set_ignore_eos(true);
          break;
      }
      start.arrive_and_wait();
      if (c.kind == Kind::kDeadline) {
        c.result = Generate(req, /*timeout_s=*/1.0);
      } else if (c.kind == Kind::kCancel) {
        grpc::ClientContext ctx;
        ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(120));
        auto reader = stub_->Generate(&ctx, req);
        v1::GenerateResponse msg;
        bool cancelled = false;
        while (reader->Read(&msg)) {
          c.result.ids.insert(c.result.ids.end(), msg.token_ids().begin(), msg.token_ids().end());
          if (!cancelled) {
            ++c.chunks_before_cancel;
            ctx.TryCancel();
            cancelled = true;
          }
        }
        c.result.status = reader->Finish();
      } else {
        c.result = Generate(req);
      }
    });
  }
  for (std::thread& t : threads) t.join();
  std::cerr << "[concurrent] 32 clients done in " << SecondsSince(t0) << " s\n";

  std::vector<std::vector<int32_t>> seeded_first(4);
  for (size_t i = 0; i < clients.size(); ++i) {
    const Client& c = clients[i];
    const cli::StreamResult& r = c.result;
    const Golden& g = golden[c.prompt];
    SCOPED_TRACE(absl::StrCat("client ", i, " (kind ", static_cast<int>(c.kind), ", prompt ", c.prompt, ")"));
    switch (c.kind) {
      case Kind::kGreedy:
        ASSERT_TRUE(r.status.ok()) << StatusText(r.status);
        EXPECT_EQ(r.ids, g.greedy_ids);
        EXPECT_EQ(r.text, g.greedy_text);
        EXPECT_EQ(r.final.finish_reason(), v1::FINISH_REASON_LENGTH);
        EXPECT_EQ(r.final.request_id(), absl::StrCat("client-", i));
        break;
      case Kind::kSeeded: {
        ASSERT_TRUE(r.status.ok()) << StatusText(r.status);
        EXPECT_EQ(r.ids.size(), 32u);
        EXPECT_EQ(r.final.finish_reason(), v1::FINISH_REASON_LENGTH);
        EXPECT_EQ(r.final.usage().completion_tokens(), 32);
        const int pair = c.seed - 1000;
        if (seeded_first[pair].empty()) {
          seeded_first[pair] = r.ids;
        } else {
          EXPECT_EQ(r.ids, seeded_first[pair]) << "two identical seeded requests differ (seed " << c.seed << ")";
        }
        break;
      }
      case Kind::kStop: {
        ASSERT_TRUE(r.status.ok()) << StatusText(r.status);
        EXPECT_EQ(r.final.finish_reason(), v1::FINISH_REASON_STOP) << "stop " << c.stop;
        EXPECT_THAT(r.text, Not(HasSubstr(c.stop)));
        EXPECT_EQ(r.text, g.greedy_text.substr(0, g.greedy_text.find(c.stop))) << "stop '" << c.stop << "'";
        EXPECT_TRUE(IsPrefix(r.ids, g.greedy_ids));
        EXPECT_LT(r.ids.size(), g.greedy_ids.size());
        EXPECT_EQ(r.final.usage().completion_tokens(), static_cast<int32_t>(r.ids.size()));
        break;
      }
      case Kind::kCancel:
        EXPECT_EQ(c.chunks_before_cancel, 1);
        EXPECT_EQ(r.status.error_code(), grpc::StatusCode::CANCELLED) << StatusText(r.status);
        EXPECT_LT(r.ids.size(), 1000u);
        break;
      case Kind::kDeadline:
        EXPECT_THAT(r.status.error_code(),
                    AnyOf(grpc::StatusCode::DEADLINE_EXCEEDED, grpc::StatusCode::CANCELLED))
            << StatusText(r.status);
        EXPECT_LT(r.ids.size(), 1000u);
        break;
    }
  }

  // Every request, cancelled ones included, must have given its KV blocks back.
  const v1::ModelInfoResponse info = WaitIdle(10);
  EXPECT_EQ(info.num_running(), 0);
  EXPECT_EQ(info.num_waiting(), 0);
  EXPECT_EQ(info.kv_free_blocks(), capacity) << "KV blocks leaked";
  EXPECT_EQ(info.kv_capacity_blocks(), capacity);
  EXPECT_TRUE(info.serving());
  // Still serving correctly.
  const cli::StreamResult after = Generate(IdsRequest(golden[3].prompt_ids, 16));
  ASSERT_TRUE(after.status.ok()) << StatusText(after.status);
  EXPECT_TRUE(IsPrefix(after.ids, golden[3].greedy_ids));
  EXPECT_EQ(after.ids.size(), 16u);
}

// ---- 3. invalid requests -----------------------------------------------------------------------

TEST_F(ServerE2ETest, WorkerKilledMidGeneration) {
  // Recovery off: the failure is final (the recovery tests below cover the default).
  ASSERT_NO_FATAL_FAILURE(StartServer(2, {"--max-restarts", "0"}));
  const Golden& g = GoldenPrompts()[0];
  const pid_t rank1 = server_->WorkerPid(1);
  const pid_t rank0 = server_->WorkerPid(0);
  ASSERT_GT(rank1, 0) << "no child of " << server_->pid() << " has --rank-hint 1";
  ASSERT_GT(rank0, 0);
  ASSERT_NE(rank0, rank1);
  EXPECT_EQ(Health(), HealthCheckResponse::SERVING);

  std::atomic<int> streamed{0};
  cli::StreamResult long_result;
  std::thread long_request([&] {
    v1::GenerateRequest req = IdsRequest(g.prompt_ids, 3000);
    req.mutable_sampling()->set_ignore_eos(true);
    long_result = Generate(req, 600, [&](const v1::GenerateResponse& m) { streamed += m.token_ids_size(); });
  });
  const auto t0 = Clock::now();
  while (streamed.load() < 8 && SecondsSince(t0) < 60) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  ASSERT_GE(streamed.load(), 8) << "the long request streamed nothing";
  ASSERT_EQ(kill(rank1, SIGKILL), 0) << std::strerror(errno);
  const auto killed_at = Clock::now();
  long_request.join();
  std::cerr << "[kill] the long request ended " << SecondsSince(killed_at) << " s after the kill, "
            << long_result.ids.size() << " tokens streamed\n";
  EXPECT_LT(SecondsSince(killed_at), 10);
  EXPECT_EQ(long_result.status.error_code(), grpc::StatusCode::UNAVAILABLE) << StatusText(long_result.status);
  EXPECT_THAT(long_result.status.error_message(), HasSubstr("worker 1"));
  EXPECT_GE(long_result.ids.size(), 8u);
  EXPECT_LT(long_result.ids.size(), 3000u);
  // What was streamed before the failure is the greedy continuation.
  const size_t n = std::min(long_result.ids.size(), g.greedy_ids.size());
  EXPECT_TRUE(std::equal(g.greedy_ids.begin(), g.greedy_ids.begin() + n, long_result.ids.begin()));

  // Health turns NOT_SERVING (the whole server and the LorcServe service).
  const auto t1 = Clock::now();
  HealthCheckResponse::ServingStatus health = Health();
  while (health != HealthCheckResponse::NOT_SERVING && SecondsSince(t1) < 5) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    health = Health();
  }
  EXPECT_EQ(health, HealthCheckResponse::NOT_SERVING);
  EXPECT_EQ(Health("lorcserve.v1.LorcServe"), HealthCheckResponse::NOT_SERVING);

  // ModelInfo still answers, and says why.
  const v1::ModelInfoResponse info = Info();
  EXPECT_FALSE(info.serving());
  EXPECT_THAT(info.worker_failure(), HasSubstr("worker 1"));
  EXPECT_EQ(info.tensor_parallel_size(), 2);
  EXPECT_EQ(info.num_running(), 0);

  // New requests fail fast.
  const auto t2 = Clock::now();
  const cli::StreamResult again = Generate(IdsRequest(g.prompt_ids, 8), 30);
  EXPECT_EQ(again.status.error_code(), grpc::StatusCode::UNAVAILABLE) << StatusText(again.status);
  EXPECT_THAT(again.status.error_message(), HasSubstr("worker 1"));
  EXPECT_LT(SecondsSince(t2), 2);
  EXPECT_TRUE(again.ids.empty());

  // The coordinator itself is still up.
  EXPECT_TRUE(server_->Alive());
  EXPECT_EQ(server_->WorkerPid(1), -1);
}

// ---- 5b. a second coordinator cannot take over a serving worker ---------------------------------

TEST_F(ServerE2ETest, SecondCoordinatorIsRefusedByAServingWorker) {
  ASSERT_NO_FATAL_FAILURE(StartServer(1));
  const v1::ModelInfoResponse info = Info();
  ASSERT_EQ(info.workers_size(), 1);
  ServerProcess second;
  // It waits up to --join-timeout-s for the worker to be released (the owner may have died during
  // its setup: the worker's lease frees it), saying so, then gives up naming the owner.
  const auto t0 = Clock::now();
  const std::string error = second.Start(0, {"--workers", info.workers(0), "--join-timeout-s", "2"});
  EXPECT_GE(SecondsSince(t0), 2);
  EXPECT_THAT(error, HasSubstr("exited before printing LISTENING"));
  EXPECT_THAT(error, HasSubstr("still serves coordinator 0x"));
  EXPECT_THAT(error, HasSubstr(absl::StrCat("this worker is serving coordinator 0x")));
  // Workers know a coordinator by its internal port (where they reach its rendezvous store).
  EXPECT_THAT(error, HasSubstr(absl::StrCat("(at ", server_->internal_address(), ")")));
  // The first one keeps serving, with golden output.
  const Golden& g = GoldenPrompts()[0];
  const cli::StreamResult r = Generate(IdsRequest(g.prompt_ids, 48));
  ASSERT_TRUE(r.status.ok()) << StatusText(r.status);
  EXPECT_EQ(r.ids, g.greedy_ids);
  EXPECT_TRUE(Info().serving());
}

// Polls `done` (state, not a fixed sleep) until it holds or `limit_s` passes.
TEST_F(ServerE2ETest, KilledLocalWorkerIsRestartedAndServesGoldenTokensAgain) {
  ASSERT_NO_FATAL_FAILURE(StartServer(2));
  const Golden& g = GoldenPrompts()[0];
  const pid_t coordinator = server_->pid();
  const pid_t old_rank1 = server_->WorkerPid(1);
  ASSERT_GT(old_rank1, 0);
  ASSERT_EQ(Health(), HealthCheckResponse::SERVING);

  std::atomic<int> streamed{0};
  cli::StreamResult in_flight;
  std::thread long_request([&] {
    v1::GenerateRequest req = IdsRequest(g.prompt_ids, 3000);
    req.mutable_sampling()->set_ignore_eos(true);
    in_flight = Generate(req, 600, [&](const v1::GenerateResponse& m) { streamed += m.token_ids_size(); });
  });
  ASSERT_TRUE(WaitFor([&] { return streamed.load() >= 4; }, 60)) << "nothing streamed";
  ASSERT_EQ(kill(old_rank1, SIGKILL), 0) << std::strerror(errno);
  const auto killed_at = Clock::now();
  long_request.join();
  // The request in flight on the old group ends with UNAVAILABLE naming the worker.
  EXPECT_EQ(in_flight.status.error_code(), grpc::StatusCode::UNAVAILABLE) << StatusText(in_flight.status);
  EXPECT_THAT(in_flight.status.error_message(), HasSubstr("worker 1"));

  // Requests while it recovers: UNAVAILABLE saying so (retryable); recovery may already be done.
  const cli::StreamResult during = Generate(IdsRequest(g.prompt_ids, 4), 30);
  if (!during.status.ok()) {
    EXPECT_EQ(during.status.error_code(), grpc::StatusCode::UNAVAILABLE) << StatusText(during.status);
    EXPECT_THAT(during.status.error_message(), ::testing::AnyOf(HasSubstr("recovering"), HasSubstr("worker 1")));
  }

  // Back to SERVING with a new rank-1 process, the same coordinator, within 30 s.
  ASSERT_TRUE(WaitFor([&] {
    const pid_t p = server_->WorkerPid(1);
    return p > 0 && p != old_rank1 && Health() == HealthCheckResponse::SERVING;
  }, 30)) << server_->Stderr();
  const cli::StreamResult r = Generate(IdsRequest(g.prompt_ids, 48));
  const double recovered_s = SecondsSince(killed_at);
  std::cerr << "[recover] serving golden tokens again " << recovered_s << " s after the kill\n";
  ASSERT_TRUE(r.status.ok()) << StatusText(r.status);
  EXPECT_EQ(r.ids, g.greedy_ids);
  EXPECT_LT(recovered_s, 30);
  EXPECT_EQ(server_->pid(), coordinator);
  EXPECT_TRUE(server_->Alive());
  const v1::ModelInfoResponse info = Info();
  EXPECT_TRUE(info.serving());
  EXPECT_EQ(info.tensor_parallel_size(), 2);
  EXPECT_EQ(info.worker_failure(), "");
}

// Regression (soak with faults, issue #16): every recovery re-loads the model in the surviving
// ranks; the old weights' pages stayed resident in glibc's free lists (worker 0: +11 % VmRSS
// after two reloads in the soak, +27 MB at one of 12 reloads here), now handed back on reset,
// and big buffers get their own mappings (cli/process_memory.h). Two bounds: the first reload
// may add at most kFirstReloadKb (it brings a second malloc arena into use and steps once:
// 2026-12-01, 2-core VM, 89.9 MB after warm-up, 98.2 after the first reload, 98.4 after 20,
// the step one 64 MB-aligned heap's pages in /proc/PID/smaps; a rank holding on to its old
// shard, ~56 MB of fp32 weights here, fails it), and the 8 reloads after it at most 5 % together
// (a leak of ~0.6 MB a reload fails it). The soak, whose baseline comes after a concurrent
// warm-up, did not show the step (+0.2 % over two reloads).
int64_t VmRssKb(pid_t pid) {
  for (absl::string_view line : absl::StrSplit(ReadAll(fs::path("/proc") / std::to_string(pid) / "status"), '\n')) {
    if (absl::StartsWith(line, "VmRSS:")) {
      std::vector<std::string> f = absl::StrSplit(line, ' ', absl::SkipEmpty());
      int64_t kb = -1;
      if (f.size() >= 2 && absl::SimpleAtoi(f[1], &kb)) return kb;
    }
  }
  return -1;
}

TEST_F(ServerE2ETest, ReloadsAfterWorkerRestartsKeepTheSurvivorsMemory) {
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
  // The memory bound is not checked under sanitizers (below): three restarts exercise the reload
  // path's races and leaks as well as nine, at a third of the time (79 s for nine under TSan).
  constexpr int kRestarts = 3;
#else
  constexpr int kRestarts = 9;  // the first sets the baseline of the other 8
#endif
  [[maybe_unused]] constexpr int64_t kFirstReloadKb = 16 * 1024;  // not checked under sanitizers
  ASSERT_NO_FATAL_FAILURE(StartServer(2, {"--max-restarts", "20", "--num-blocks", "48"}));
  const Golden& g = GoldenPrompts()[0];
  const pid_t rank0 = server_->WorkerPid(0);
  ASSERT_GT(rank0, 0);
  auto serve_golden = [&] {
    const cli::StreamResult r = Generate(IdsRequest(g.prompt_ids, 16));
    ASSERT_TRUE(r.status.ok()) << StatusText(r.status);
    EXPECT_TRUE(IsPrefix(r.ids, g.greedy_ids));
  };
  ASSERT_NO_FATAL_FAILURE(serve_golden());
  const int64_t warm_kb = VmRssKb(rank0);
  ASSERT_GT(warm_kb, 0);
  int64_t base_kb = -1;  // after the first reload
  for (int i = 0; i < kRestarts; ++i) {
    const pid_t old_rank1 = server_->WorkerPid(1);
    ASSERT_EQ(kill(old_rank1, SIGKILL), 0) << std::strerror(errno);
    ASSERT_TRUE(WaitFor([&] {
      const pid_t p = server_->WorkerPid(1);
      return p > 0 && p != old_rank1 && Health() == HealthCheckResponse::SERVING;
    }, 60)) << "restart " << i << "\n" << server_->Stderr();
    ASSERT_NO_FATAL_FAILURE(serve_golden());
    if (i == 0) {
      base_kb = VmRssKb(rank0);
      ASSERT_GT(base_kb, 0);
    }
  }
  ASSERT_EQ(server_->WorkerPid(0), rank0) << "rank 0 should survive (and reload at) every recovery";
  const int64_t end_kb = VmRssKb(rank0);
  std::cerr << "[reload] rank 0 VmRSS " << warm_kb << " kB after warm-up, " << base_kb
            << " kB after the first reload, " << end_kb << " kB after " << kRestarts << "\n";
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
  // Under AddressSanitizer freed memory sits in its quarantine (256 MB by default) instead of
  // going back, so resident memory is no measure of a leak here; LeakSanitizer checks the
  // process's leaks at exit instead (scripts/sanitize.sh). ThreadSanitizer has its own allocator
  // (glibc's malloc_trim, which the worker relies on, does nothing there) and shadow memory for
  // every byte touched: rank 0 grew 141 -> 206 MB over the reloads in the TSan build.
  std::cerr << "[reload] sanitizer build: the resident-memory bound is not checked\n";
#else
  EXPECT_LE(base_kb, warm_kb + kFirstReloadKb) << "the first reload kept more than a malloc arena's step";
  EXPECT_LE(static_cast<double>(end_kb), 1.05 * static_cast<double>(base_kb));
#endif
}

TEST_F(ServerE2ETest, AStoppedLocalWorkerIsKilledAndRestarted) {
  // A worker that hangs (here: SIGSTOP) never exits by itself: the health probe finds it, the
  // recovery kills it and restarts it like a dead one.
  ASSERT_NO_FATAL_FAILURE(StartServer(2));
  const Golden& g = GoldenPrompts()[0];
  const pid_t stopped = server_->WorkerPid(0);
  ASSERT_GT(stopped, 0);
  ASSERT_EQ(kill(stopped, SIGSTOP), 0) << std::strerror(errno);
  const auto stopped_at = Clock::now();
  ASSERT_TRUE(WaitFor([&] {
    const pid_t p = server_->WorkerPid(0);
    return p > 0 && p != stopped && Health() == HealthCheckResponse::SERVING;
  }, 60)) << server_->Stderr();
  const cli::StreamResult r = Generate(IdsRequest(g.prompt_ids, 48));
  std::cerr << "[stop] serving golden tokens again " << SecondsSince(stopped_at)
            << " s after the SIGSTOP\n";
  ASSERT_TRUE(r.status.ok()) << StatusText(r.status);
  EXPECT_EQ(r.ids, g.greedy_ids);
  EXPECT_THAT(server_->Stderr(), HasSubstr("worker 0 does not answer; killed it to restart it"));
  EXPECT_NE(kill(stopped, 0), 0) << "the stopped worker still exists";
}

TEST_F(ServerE2ETest, RestartsAreBoundedThenNotServingWithAReason) {
  ASSERT_NO_FATAL_FAILURE(StartServer(1, {"--max-restarts", "1"}));
  const pid_t first = server_->WorkerPid(0);
  ASSERT_GT(first, 0);
  ASSERT_EQ(kill(first, SIGKILL), 0);
  pid_t second = -1;
  ASSERT_TRUE(WaitFor([&] {
    second = server_->WorkerPid(0);
    return second > 0 && second != first && Health() == HealthCheckResponse::SERVING;
  }, 30)) << server_->Stderr();
  ASSERT_EQ(kill(second, SIGKILL), 0);  // the second failure within the window: give up
  ASSERT_TRUE(WaitFor([&] { return absl::StrContains(Info().worker_failure(), "gave up"); }, 30))
      << server_->Stderr();
  EXPECT_EQ(Health(), HealthCheckResponse::NOT_SERVING);
  EXPECT_FALSE(Info().serving());
  const cli::StreamResult r = Generate(IdsRequest(GoldenPrompts()[0].prompt_ids, 4), 30);
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::UNAVAILABLE) << StatusText(r.status);
  EXPECT_THAT(r.status.error_message(), HasSubstr("gave up after 1 worker recoveries"));
  // A request that could never pass is told so, not UNAVAILABLE (which a client retries).
  v1::GenerateRequest bad = IdsRequest(GoldenPrompts()[0].prompt_ids, 4);
  bad.mutable_sampling()->set_max_tokens(-1);
  const cli::StreamResult invalid = Generate(bad, 30);
  EXPECT_EQ(invalid.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << StatusText(invalid.status);
  EXPECT_THAT(invalid.status.error_message(), HasSubstr("max_tokens"));
  EXPECT_EQ(server_->WorkerPid(0), -1);  // not restarted again
  EXPECT_TRUE(server_->Alive());
  // The second failure gave up at once: nobody was told to retry while no recovery would come
  // (found by a tester, 2026-12-03: "recovering ... (retry shortly)" in the moment before).
  const std::string log = server_->Stderr();
  auto count = [&](const std::string& what) {
    int n = 0;
    for (size_t at = log.find(what); at != std::string::npos; at = log.find(what, at + 1)) ++n;
    return n;
  };
  EXPECT_EQ(count("health is NOT_SERVING"), 2) << log;
  EXPECT_EQ(count("health is NOT_SERVING, recovering"), 1) << log;
}

TEST_F(ServerE2ETest, ShutdownRightAfterAWorkerFailureExitsCleanly) {
  for (int round = 0; round < 3; ++round) {
    ASSERT_NO_FATAL_FAILURE(StartServer(2));
    const pid_t w = server_->WorkerPid(round % 2);
    ASSERT_GT(w, 0);
    ASSERT_EQ(kill(w, SIGKILL), 0);
    // Shut down while the failure is being handled (or recovery has started).
    ASSERT_TRUE(WaitFor([&] { return server_->WorkerPid(round % 2) != w; }, 10));
    server_->Stop();
    const int status = server_->exit_status();
    EXPECT_TRUE(WIFEXITED(status)) << "round " << round << ": " << (WIFSIGNALED(status) ? WTERMSIG(status) : -1)
                                   << "\n" << server_->Stderr();
    if (WIFEXITED(status)) {
      EXPECT_EQ(WEXITSTATUS(status), 0) << "round " << round;
    }
  }
}

// ---- 6. health, Tokenize, ModelInfo ------------------------------------------------------------

TEST_F(ServerE2ETest, HealthTokenizeAndModelInfo) {
  ASSERT_NO_FATAL_FAILURE(StartServer(2));
  EXPECT_EQ(Health(), HealthCheckResponse::SERVING);
  EXPECT_EQ(Health("lorcserve.v1.LorcServe"), HealthCheckResponse::SERVING);

  // Tokenize agrees with `lorcserve tokenize`, with and without special tokens.
  for (const bool special : {false, true}) {
    SCOPED_TRACE(special ? "add_special_tokens" : "plain");
    int exit_code = 0;
    std::vector<std::string> args = {"tokenize", "--model", Tiny(), "--text", "Hello world"};
    if (special) args.push_back("--add-special-tokens");
    const std::string out = RunLorcserve(args, &exit_code);
    ASSERT_EQ(exit_code, 0) << out;
    std::vector<int32_t> cli_ids;
    for (absl::string_view t : absl::StrSplit(out, absl::ByAnyChar(" \n"), absl::SkipEmpty())) {
      int32_t id;
      ASSERT_TRUE(absl::SimpleAtoi(t, &id)) << out;
      cli_ids.push_back(id);
    }
    ASSERT_FALSE(cli_ids.empty());
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    v1::TokenizeRequest req;
    req.set_text("Hello world");
    req.set_add_special_tokens(special);
    v1::TokenizeResponse resp;
    const grpc::Status s = stub_->Tokenize(&ctx, req, &resp);
    ASSERT_TRUE(s.ok()) << StatusText(s);
    EXPECT_EQ(std::vector<int32_t>(resp.ids().begin(), resp.ids().end()), cli_ids);
  }
  // A text prompt is the tokenized text with BOS: same output as the golden ids, and the ids
  // Tokenize gives with add_special_tokens (the fixture's BOS comes from config.json, not from a
  // tokenizer post-processor).
  {
    const Golden& g = GoldenPrompts()[0];
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    v1::TokenizeRequest treq;
    treq.set_text(g.prompt);
    treq.set_add_special_tokens(true);
    v1::TokenizeResponse tresp;
    const grpc::Status ts = stub_->Tokenize(&ctx, treq, &tresp);
    ASSERT_TRUE(ts.ok()) << StatusText(ts);
    EXPECT_EQ(std::vector<int32_t>(tresp.ids().begin(), tresp.ids().end()), g.prompt_ids);
    v1::GenerateRequest req;
    req.set_text(g.prompt);
    req.mutable_sampling()->set_max_tokens(8);
    const cli::StreamResult r = Generate(req);
    ASSERT_TRUE(r.status.ok()) << StatusText(r.status);
    EXPECT_EQ(r.final.usage().prompt_tokens(), static_cast<int32_t>(g.prompt_ids.size()));
    EXPECT_TRUE(IsPrefix(r.ids, g.greedy_ids));
    EXPECT_EQ(r.ids.size(), 8u);
  }

  const v1::ModelInfoResponse info = WaitIdle(5);
  EXPECT_EQ(info.tensor_parallel_size(), 2);
  EXPECT_EQ(info.block_size(), 16);
  EXPECT_GT(info.kv_capacity_blocks(), 0);
  EXPECT_EQ(info.kv_capacity_tokens(), info.kv_capacity_blocks() * 16);
  EXPECT_GT(info.kv_bytes_per_token(), 0);
  EXPECT_EQ(info.vocab_size(), 4096);
  EXPECT_EQ(info.max_model_len(), 4096);
  EXPECT_EQ(info.num_kv_heads(), 2);
  EXPECT_GT(info.num_layers(), 0);
  EXPECT_GT(info.hidden_size(), 0);
  EXPECT_EQ(info.backend(), "cpu");
  EXPECT_EQ(info.kv_compression(), "none");
  EXPECT_EQ(info.model(), fs::path(Tiny()).lexically_normal().string());
  EXPECT_EQ(info.workers_size(), 2);
  for (const std::string& w : info.workers()) EXPECT_THAT(w, HasSubstr("127.0.0.1:"));
  EXPECT_TRUE(info.serving());
  EXPECT_EQ(info.worker_failure(), "");
  EXPECT_EQ(info.num_running(), 0);
  EXPECT_EQ(info.num_waiting(), 0);
  EXPECT_EQ(info.kv_free_blocks(), info.kv_capacity_blocks());
  EXPECT_GT(info.step_stats().steps(), 0);
  EXPECT_EQ(info.step_stats().transport(), "stream");
  // Stopping ids and the fixture's generation_config.json ({"do_sample": false,
  // "eos_token_id": 1, "bos_token_id": 0}).
  EXPECT_EQ(std::vector<int32_t>(info.eos_token_ids().begin(), info.eos_token_ids().end()),
            std::vector<int32_t>{1});
  EXPECT_TRUE(info.generation_defaults().present());
  EXPECT_EQ(std::vector<int32_t>(info.generation_defaults().eos_token_ids().begin(),
                                 info.generation_defaults().eos_token_ids().end()),
            std::vector<int32_t>{1});
  ASSERT_TRUE(info.generation_defaults().has_do_sample());
  EXPECT_FALSE(info.generation_defaults().do_sample());
  EXPECT_FALSE(info.generation_defaults().has_temperature());
  EXPECT_FALSE(info.generation_defaults().has_max_new_tokens());

  // The workers are the coordinator's children, and go away with it.
  const std::vector<pid_t> workers = server_->Children();
  EXPECT_EQ(workers.size(), 2u);
  EXPECT_GT(server_->WorkerPid(0), 0);
  EXPECT_GT(server_->WorkerPid(1), 0);
  StopServer();
  const auto t0 = Clock::now();
  auto gone = [](pid_t p) {
    const std::string stat = ReadAll(fs::path("/proc") / std::to_string(p) / "stat");
    const size_t paren = stat.rfind(')');
    return stat.empty() || (paren != std::string::npos && stat.substr(paren + 2, 1) == "Z");
  };
  for (pid_t p : workers) {
    while (!gone(p) && SecondsSince(t0) < 10) std::this_thread::sleep_for(std::chrono::milliseconds(20));
    EXPECT_TRUE(gone(p)) << "worker " << p << " outlived its coordinator";
  }
}

// ---- 7. server reflection ----------------------------------------------------------------------

// Found by a tester: ModelInfo reported --model as given (models/tiny-llama-a), and the gateway
// resolved it against its own working directory. The coordinator reports it absolute, normalized.
TEST_F(ServerE2ETest, ModelInfoReportsTheModelDirectoryAbsolute) {
  const fs::path tiny = fs::path(Tiny()).lexically_normal();
  // Relative to this test's working directory (the coordinator's), with a './' and a trailing '/'.
  const std::string relative = "./" + fs::relative(tiny, fs::current_path()).string() + "/";
  ASSERT_TRUE(fs::path(relative).is_relative()) << relative;
  ASSERT_NO_FATAL_FAILURE(StartServer(1, {"--model", relative}));
  EXPECT_EQ(Info().model(), tiny.string());
  EXPECT_THAT(server_->Stderr(), HasSubstr("serving " + tiny.string() + " on "));
}

TEST_F(ServerE2ETest, ServerReflectionListsTheService) {
  ASSERT_NO_FATAL_FAILURE(StartServer(1));
  grpc::GenericStub stub(channel_);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  grpc::CompletionQueue cq;
  auto call = stub.PrepareCall(&ctx, "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", &cq);
  ASSERT_NE(call, nullptr);
  // Waits for the completion of the operation tagged `tag`; returns its `ok`.
  auto await = [&cq](intptr_t tag) {
    void* got = nullptr;
    bool ok = false;
    const auto status = cq.AsyncNext(&got, &ok, std::chrono::system_clock::now() + std::chrono::seconds(30));
    EXPECT_EQ(status, grpc::CompletionQueue::GOT_EVENT);
    EXPECT_EQ(reinterpret_cast<intptr_t>(got), tag);
    return status == grpc::CompletionQueue::GOT_EVENT && ok;
  };
  call->StartCall(reinterpret_cast<void*>(1));
  ASSERT_TRUE(await(1));
  // ServerReflectionRequest{list_services: "*"}: field 7, wire type 2, length 1, '*'.
  const char request[] = {0x3A, 0x01, '*'};
  grpc::Slice slice(request, sizeof(request));
  grpc::ByteBuffer out(&slice, 1);
  call->Write(out, reinterpret_cast<void*>(2));
  ASSERT_TRUE(await(2));
  grpc::ByteBuffer in;
  call->Read(&in, reinterpret_cast<void*>(3));
  ASSERT_TRUE(await(3));
  std::vector<grpc::Slice> slices;
  ASSERT_TRUE(in.Dump(&slices).ok());
  std::string bytes;
  for (const grpc::Slice& s : slices) bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
  EXPECT_THAT(bytes, HasSubstr("lorcserve.v1.LorcServe"));
  EXPECT_THAT(bytes, HasSubstr("grpc.health.v1.Health"));
  // The internal services (Rendezvous, WorkerJoin) are on --internal-listen only.
  EXPECT_THAT(bytes, Not(HasSubstr("lorcserve.internal")));
  // The service's types too (Generate and Tokenize are served over raw bytes, but reflection
  // describes them with lorcserve.proto): ServerReflectionRequest{file_containing_symbol: ...}
  // is field 4.
  const std::string symbol = "lorcserve.v1.LorcServe";
  const std::string by_symbol = std::string("\x22") + static_cast<char>(symbol.size()) + symbol;
  grpc::Slice slice2(by_symbol);
  grpc::ByteBuffer out2(&slice2, 1);
  call->Write(out2, reinterpret_cast<void*>(7));
  ASSERT_TRUE(await(7));
  grpc::ByteBuffer in2;
  call->Read(&in2, reinterpret_cast<void*>(8));
  ASSERT_TRUE(await(8));
  slices.clear();
  ASSERT_TRUE(in2.Dump(&slices).ok());
  std::string file;
  for (const grpc::Slice& s : slices) file.append(reinterpret_cast<const char*>(s.begin()), s.size());
  for (const char* name : {"GenerateRequest", "SamplingOptions", "logit_bias",
                           "include_stop_str_in_output", "TokenLogprobs", "GenerationDefaults"}) {
    EXPECT_THAT(file, HasSubstr(name));
  }
  call->WritesDone(reinterpret_cast<void*>(4));
  ASSERT_TRUE(await(4));
  grpc::ByteBuffer none;
  call->Read(&none, reinterpret_cast<void*>(5));
  EXPECT_FALSE(await(5));  // the server ends the stream after the client's half-close
  grpc::Status status;
  call->Finish(&status, reinterpret_cast<void*>(6));
  ASSERT_TRUE(await(6));
  EXPECT_TRUE(status.ok()) << StatusText(status);
  cq.Shutdown();
  void* tag;
  bool ok;
  while (cq.Next(&tag, &ok)) {
  }
}

}  // namespace
}  // namespace e2e
}  // namespace lorc
