// End-to-end tests of the serving system: a real `lorcserve coordinator --local-workers N`
// child process (with its worker processes), driven over gRPC as a client drives it: golden
// greedy output at TP=1/2/4 and over the unary step transport, many concurrent streaming
// clients (greedy, seeded sampling, stop strings, cancellation, deadlines) with the KV cache
// checked free afterwards, request validation, the bounded admission queue, a worker killed
// mid-generation, a second coordinator refused by a serving worker, health, Tokenize, ModelInfo
// and server reflection.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <latch>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/match.h"
#include "absl/strings/str_split.h"
#include "cli/api_client.h"
#include "common/json_util.h"
#include "gmock/gmock.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "grpcpp/generic/generic_stub.h"
#include "grpcpp/impl/client_unary_call.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "lorcserve/v1/lorcserve.grpc.pb.h"
#include "nlohmann/json.hpp"
#include "tests/testing/fixtures.h"
#include "tests/testing/golden.h"

extern char** environ;

namespace lorc {
namespace {

namespace fs = std::filesystem;
namespace v1 = ::lorcserve::v1;
using ::lorc::testing::Golden;
using ::lorc::testing::GoldenPrompts;
using Clock = std::chrono::steady_clock;
using ::grpc::health::v1::HealthCheckRequest;
using ::grpc::health::v1::HealthCheckResponse;
using ::testing::AnyOf;
using ::testing::HasSubstr;
using ::testing::Not;

std::string Binary() { return std::string(LORC_BIN_DIR) + "/lorcserve"; }
std::string Tiny() { return ::lorc::testing::TinyLlamaDir(); }

double SecondsSince(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

std::string ReadAll(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::string StatusText(const grpc::Status& s) {
  return absl::StrCat("code ", static_cast<int>(s.error_code()), ": ", s.error_message());
}

// ---- the golden reference -----------------------------------------------------------------------

v1::GenerateRequest IdsRequest(const std::vector<int32_t>& ids, int max_tokens) {
  v1::GenerateRequest req;
  req.mutable_token_ids()->mutable_ids()->Add(ids.begin(), ids.end());
  req.mutable_sampling()->set_max_tokens(max_tokens);
  return req;
}

bool IsPrefix(const std::vector<int32_t>& prefix, const std::vector<int32_t>& of) {
  return prefix.size() <= of.size() && std::equal(prefix.begin(), prefix.end(), of.begin());
}

// ---- the server process ------------------------------------------------------------------------

// `lorcserve coordinator --local-workers N` as a child process. Its stdout is a pipe (read for
// the `LISTENING host:port` line), its stderr (and its workers') a temporary file, shown when a
// test fails. Stop() (and the destructor) sends SIGTERM, waits, then SIGKILLs; the workers exit
// with it (they are started with PR_SET_PDEATHSIG).
class ServerProcess {
 public:
  ServerProcess() = default;
  ServerProcess(const ServerProcess&) = delete;
  ServerProcess& operator=(const ServerProcess&) = delete;
  ~ServerProcess() {
    Stop();
    if (!stderr_path_.empty()) {
      std::error_code ec;
      fs::remove(stderr_path_, ec);
    }
  }

  // Empty on success, else what went wrong. `workers` 0: no --local-workers (give --workers).
  std::string Start(int workers, const std::vector<std::string>& extra_flags) {
    char tmpl[] = "/tmp/lorc_server_e2e_stderr_XXXXXX";
    const int err_fd = mkostemp(tmpl, O_CLOEXEC);
    if (err_fd < 0) return absl::StrCat("mkostemp: ", std::strerror(errno));
    stderr_path_ = tmpl;
    int out[2];
    if (pipe2(out, O_CLOEXEC) != 0) {
      close(err_fd);
      return absl::StrCat("pipe2: ", std::strerror(errno));
    }
    std::vector<std::string> args = {Binary(), "coordinator", "--model", Tiny(), "--listen", "127.0.0.1:0"};
    if (workers > 0) args.insert(args.end(), {"--local-workers", std::to_string(workers)});
    args.insert(args.end(), extra_flags.begin(), extra_flags.end());
    for (const std::string& a : args) absl::StrAppend(&command_, command_.empty() ? "" : " ", a);
    std::vector<char*> argv;
    for (std::string& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_adddup2(&fa, out[1], STDOUT_FILENO);
    posix_spawn_file_actions_adddup2(&fa, err_fd, STDERR_FILENO);
    const int rc = posix_spawn(&pid_, argv[0], &fa, nullptr, argv.data(), environ);
    posix_spawn_file_actions_destroy(&fa);
    close(out[1]);
    close(err_fd);
    if (rc != 0) {
      close(out[0]);
      pid_ = -1;
      return absl::StrCat("cannot spawn ", argv[0], ": ", std::strerror(rc));
    }
    stdout_fd_ = out[0];
    // Read the LISTENING line (the model loads in every worker first).
    const auto deadline = Clock::now() + std::chrono::seconds(60);
    std::string buf;
    for (;;) {
      const size_t nl = buf.find('\n');
      if (nl != std::string::npos) {
        const std::string line = buf.substr(0, nl);
        if (line.rfind("LISTENING ", 0) != 0) {
          return absl::StrCat("`", command_, "` printed '", line, "' instead of LISTENING\n", Stderr());
        }
        address_ = line.substr(10);
        return "";
      }
      const int left_ms = static_cast<int>(
          std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count());
      if (left_ms <= 0) return absl::StrCat("`", command_, "`: no LISTENING line within 60 s\n", Stderr());
      pollfd p{stdout_fd_, POLLIN, 0};
      const int n = poll(&p, 1, left_ms);
      if (n < 0 && errno != EINTR) return absl::StrCat("poll: ", std::strerror(errno));
      if (n <= 0) continue;
      char chunk[256];
      const ssize_t got = read(stdout_fd_, chunk, sizeof(chunk));
      if (got < 0 && errno != EINTR) return absl::StrCat("read: ", std::strerror(errno));
      if (got == 0) {
        return absl::StrCat("`", command_, "` exited before printing LISTENING\n", Stderr());
      }
      if (got > 0) buf.append(chunk, static_cast<size_t>(got));
    }
  }

  void Stop() {
    if (pid_ > 0) {
      const auto t0 = Clock::now();
      kill(pid_, SIGTERM);
      if (!WaitExit(std::chrono::seconds(20))) {
        std::cerr << "coordinator " << pid_ << " ignored SIGTERM for 20 s; SIGKILL\n";
        kill(pid_, SIGKILL);
        WaitExit(std::chrono::seconds(20));
      }
      std::cerr << "[server] stopped in " << SecondsSince(t0) << " s\n";
      pid_ = -1;
    }
    if (stdout_fd_ >= 0) {
      close(stdout_fd_);
      stdout_fd_ = -1;
    }
  }

  // True while the coordinator runs (reaps it once it has exited).
  bool Alive() {
    if (pid_ <= 0) return false;
    int status = 0;
    const pid_t r = waitpid(pid_, &status, WNOHANG);
    if (r == pid_) {
      exit_status_ = status;
      pid_ = -1;
      return false;
    }
    return r == 0;
  }

  pid_t pid() const { return pid_; }
  // The coordinator's wait status once Stop() reaped it.
  int exit_status() const { return exit_status_; }
  const std::string& address() const { return address_; }
  const std::string& command() const { return command_; }
  std::string Stderr() const { return stderr_path_.empty() ? "" : ReadAll(stderr_path_); }

  // The coordinator's children (its workers), from /proc/*/stat.
  std::vector<pid_t> Children() const {
    std::vector<pid_t> out;
    if (pid_ <= 0) return out;
    std::error_code ec;
    for (const fs::directory_entry& e : fs::directory_iterator("/proc", ec)) {
      pid_t child;
      if (!absl::SimpleAtoi(e.path().filename().string(), &child)) continue;
      const std::string stat = ReadAll(e.path() / "stat");
      const size_t paren = stat.rfind(')');  // the command name may hold spaces and parens
      if (paren == std::string::npos) continue;
      std::vector<std::string> f = absl::StrSplit(stat.substr(paren + 1), ' ', absl::SkipEmpty());
      pid_t ppid;
      // f[0]: state, f[1]: ppid.
      if (f.size() > 1 && f[0] != "Z" && absl::SimpleAtoi(f[1], &ppid) && ppid == pid_) {
        out.push_back(child);
      }
    }
    return out;
  }

  // The worker started with `--rank-hint rank`, or -1.
  pid_t WorkerPid(int rank) const {
    for (pid_t p : Children()) {
      const std::string cmdline = ReadAll(fs::path("/proc") / std::to_string(p) / "cmdline");
      std::vector<std::string> argv = absl::StrSplit(cmdline, '\0');
      for (size_t i = 0; i + 1 < argv.size(); ++i) {
        if (argv[i] == "--rank-hint" && argv[i + 1] == std::to_string(rank)) return p;
      }
    }
    return -1;
  }

 private:
  bool WaitExit(std::chrono::seconds limit) {
    const auto deadline = Clock::now() + limit;
    while (Clock::now() < deadline) {
      int status = 0;
      const pid_t r = waitpid(pid_, &status, WNOHANG);
      if (r == pid_ || (r < 0 && errno == ECHILD)) {
        exit_status_ = status;
        return true;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    return false;
  }

  pid_t pid_ = -1;
  int stdout_fd_ = -1;
  int exit_status_ = 0;
  std::string stderr_path_;
  std::string address_;
  std::string command_;
};

// Runs `lorcserve args...` to completion; returns its stdout (exit code in *exit_code).
std::string RunLorcserve(const std::vector<std::string>& args, int* exit_code) {
  char tmpl[] = "/tmp/lorc_server_e2e_out_XXXXXX";
  const int fd = mkostemp(tmpl, O_CLOEXEC);
  *exit_code = -1;
  if (fd < 0) return "";
  std::vector<std::string> argv_s = {Binary()};
  argv_s.insert(argv_s.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (std::string& a : argv_s) argv.push_back(a.data());
  argv.push_back(nullptr);
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_adddup2(&fa, fd, STDOUT_FILENO);
  pid_t pid;
  const int rc = posix_spawn(&pid, argv[0], &fa, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&fa);
  close(fd);
  std::string out;
  if (rc == 0) {
    int status = 0;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
    }
    *exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    out = ReadAll(tmpl);
  }
  std::error_code ec;
  fs::remove(tmpl, ec);
  return out;
}

// ---- the fixture -------------------------------------------------------------------------------

class ServerE2ETest : public ::testing::Test {
 protected:
  void SetUp() override {
    REQUIRE_TINY_LLAMA();
    ASSERT_TRUE(fs::exists(Binary())) << Binary() << " not built";
    ASSERT_EQ(GoldenPrompts().size(), 4u) << "cannot read " << Tiny() << "/golden_fp32.json";
  }

  void TearDown() override {
    if (server_ != nullptr) {
      if (HasFailure()) {
        std::cerr << "---- stderr of `" << server_->command() << "` ----\n"
                  << server_->Stderr() << "---- end of stderr ----\n";
      }
      StopServer();
    }
  }

  // Closes this test's channel first: the server's graceful shutdown waits (up to its 5 s
  // grace) for connected clients to go away, even idle ones.
  void StopServer() {
    stub_.reset();
    health_.reset();
    channel_.reset();
    if (server_ != nullptr) server_->Stop();
  }

  // Starts the server with N local workers (one BLAS thread each when N > 1: 2 cores are shared)
  // and connects to it. Use under ASSERT_NO_FATAL_FAILURE.
  void StartServer(int workers, std::vector<std::string> extra = {}) {
    if (workers > 1) {
      extra.push_back("--threads");
      extra.push_back("1");
    }
    server_ = std::make_unique<ServerProcess>();
    const auto t0 = Clock::now();
    const std::string error = server_->Start(workers, extra);
    ASSERT_EQ(error, "");
    std::cerr << "[server] `" << server_->command() << "` up on " << server_->address() << " in "
              << SecondsSince(t0) << " s\n";
    channel_ = cli::Connect(server_->address());
    ASSERT_TRUE(channel_->WaitForConnected(std::chrono::system_clock::now() + std::chrono::seconds(10)));
    stub_ = v1::LorcServe::NewStub(channel_);
    health_ = grpc::health::v1::Health::NewStub(channel_);
  }

  cli::StreamResult Generate(const v1::GenerateRequest& req, double timeout_s = 300,
                             const std::function<void(const v1::GenerateResponse&)>& on_chunk = {}) {
    return cli::StreamGenerate(*stub_, req, timeout_s, on_chunk);
  }

  v1::ModelInfoResponse Info() {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    v1::ModelInfoResponse resp;
    const grpc::Status s = stub_->ModelInfo(&ctx, {}, &resp);
    EXPECT_TRUE(s.ok()) << "ModelInfo: " << StatusText(s);
    return resp;
  }

  // The grpc.health.v1 status of `service` ("" = the whole server); UNKNOWN when the call fails.
  HealthCheckResponse::ServingStatus Health(const std::string& service = "") {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    HealthCheckRequest req;
    req.set_service(service);
    HealthCheckResponse resp;
    const grpc::Status s = health_->Check(&ctx, req, &resp);
    EXPECT_TRUE(s.ok()) << "Health.Check: " << StatusText(s);
    return s.ok() ? resp.status() : HealthCheckResponse::UNKNOWN;
  }

  // Polls ModelInfo until no request is running or waiting; returns the last answer.
  v1::ModelInfoResponse WaitIdle(double limit_s) {
    const auto t0 = Clock::now();
    v1::ModelInfoResponse info = Info();
    while ((info.num_running() != 0 || info.num_waiting() != 0) && SecondsSince(t0) < limit_s) {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
      info = Info();
    }
    return info;
  }

  // All four golden prompts, greedy, 48 tokens, concurrently: ids, text, finish and usage.
  void ExpectGoldenGreedy() {
    const std::vector<Golden>& golden = GoldenPrompts();
    std::vector<cli::StreamResult> results(golden.size());
    std::vector<std::thread> threads;
    const auto t0 = Clock::now();
    for (size_t i = 0; i < golden.size(); ++i) {
      threads.emplace_back([&, i] {
        v1::GenerateRequest req = IdsRequest(golden[i].prompt_ids, 48);
        req.set_request_id(absl::StrCat("golden-", i));
        results[i] = Generate(req);
      });
    }
    for (std::thread& t : threads) t.join();
    std::cerr << "[golden] 4 x 48 greedy tokens in " << SecondsSince(t0) << " s\n";
    for (size_t i = 0; i < golden.size(); ++i) {
      const cli::StreamResult& r = results[i];
      SCOPED_TRACE(absl::StrCat("golden prompt ", i, ": ", golden[i].prompt));
      ASSERT_TRUE(r.status.ok()) << StatusText(r.status);
      EXPECT_EQ(r.ids, golden[i].greedy_ids);
      EXPECT_EQ(r.text, golden[i].greedy_text);
      EXPECT_TRUE(r.final.final());
      EXPECT_EQ(r.final.request_id(), absl::StrCat("golden-", i));
      EXPECT_EQ(r.final.finish_reason(), v1::FINISH_REASON_LENGTH);
      EXPECT_EQ(r.final.usage().prompt_tokens(), static_cast<int32_t>(golden[i].prompt_ids.size()));
      EXPECT_EQ(r.final.usage().completion_tokens(), 48);
      EXPECT_GT(r.final.usage().time_to_first_token_ms(), 0);
      EXPECT_GE(r.final.usage().total_time_ms(), r.final.usage().time_to_first_token_ms());
    }
  }

  // Sends raw `bytes` as the request of LorcServe's `method` ("Generate", "Tokenize"), as a
  // client whose protobuf library does not check UTF-8 would; returns the call's status.
  grpc::Status RawCall(const std::string& method, const std::string& bytes, int* messages) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    grpc::Slice slice(bytes);
    const grpc::ByteBuffer req(&slice, 1);
    const std::string name = "/lorcserve.v1.LorcServe/" + method;
    *messages = 0;
    if (method == "Generate") {
      const grpc::internal::RpcMethod m(name.c_str(), grpc::internal::RpcMethod::SERVER_STREAMING,
                                        channel_);
      std::unique_ptr<grpc::ClientReader<grpc::ByteBuffer>> reader(
          grpc::internal::ClientReaderFactory<grpc::ByteBuffer>::Create(channel_.get(), m, &ctx, req));
      grpc::ByteBuffer msg;
      while (reader->Read(&msg)) ++*messages;
      return reader->Finish();
    }
    const grpc::internal::RpcMethod m(name.c_str(), grpc::internal::RpcMethod::NORMAL_RPC, channel_);
    grpc::ByteBuffer resp;
    const grpc::Status s = grpc::internal::BlockingUnaryCall<grpc::ByteBuffer, grpc::ByteBuffer>(
        channel_.get(), m, &ctx, req, &resp);
    if (s.ok()) ++*messages;
    return s;
  }

  std::unique_ptr<ServerProcess> server_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::LorcServe::Stub> stub_;
  std::unique_ptr<grpc::health::v1::Health::Stub> health_;
};

// ---- 1. golden greedy output at TP = 1, 2, 4 -----------------------------------------------------

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
  ASSERT_NO_FATAL_FAILURE(StartServer(GetParam(), {"--shard-lm-head"}));
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

TEST_F(ServerE2ETest, InvalidRequestsAreRejectedAndServingContinues) {
  ASSERT_NO_FATAL_FAILURE(StartServer(1));
  const Golden& g = GoldenPrompts()[0];
  struct Case {
    std::string name;
    v1::GenerateRequest req;
    std::string message;  // a substring of the expected message
  };
  std::vector<Case> cases;
  {
    v1::GenerateRequest r;
    r.mutable_sampling()->set_max_tokens(4);
    cases.push_back({"no prompt", r, "empty prompt: set text or token_ids"});
  }
  {
    v1::GenerateRequest r;
    r.set_text("");
    cases.push_back({"empty text", r, "empty prompt"});
  }
  {
    v1::GenerateRequest r = IdsRequest({}, 4);
    cases.push_back({"empty token ids", r, "empty prompt"});
  }
  cases.push_back({"token id 5000", IdsRequest({0, 5000, 3}, 4),
                   "prompt token id 5000 at position 1 outside the vocabulary [0, 4096)"});
  cases.push_back({"negative token id", IdsRequest({0, -1}, 4),
                   "prompt token id -1 at position 1 outside the vocabulary [0, 4096)"});
  cases.push_back({"prompt + max_tokens > 4096", IdsRequest(g.prompt_ids, 4091),
                   "prompt (6 tokens) + max_tokens (4091) = 4097 exceeds the maximum model length of 4096"});
  {
    v1::GenerateRequest r = IdsRequest(g.prompt_ids, 4);
    r.mutable_sampling()->set_temperature(-1);
    cases.push_back({"temperature -1", r, "temperature must be a finite value >= 0, got -1"});
  }
  {
    v1::GenerateRequest r = IdsRequest(g.prompt_ids, 4);
    r.mutable_sampling()->set_top_p(0);
    cases.push_back({"top_p 0", r, "top_p must be in (0, 1], got 0"});
  }
  {
    v1::GenerateRequest r = IdsRequest(g.prompt_ids, 4);
    r.mutable_sampling()->set_max_tokens(-3);
    cases.push_back({"max_tokens -3", r, "max_tokens must be >= 1, got -3"});
  }
  {
    v1::GenerateRequest r = IdsRequest(g.prompt_ids, 4);
    r.mutable_sampling()->add_stop_token_ids(4096);
    cases.push_back({"stop token id 4096", r, "stop_token_ids: id 4096 outside the vocabulary [0, 4096)"});
  }
  {
    v1::GenerateRequest r;
    r.set_text(std::string((4 << 20) + 1024, 'a'));  // > 4 MiB, under the 64 MiB transport limit
    r.mutable_sampling()->set_max_tokens(4);
    cases.push_back({"4 MiB text prompt", r, "bytes exceeds the limit of 4194304 bytes"});
  }
  {
    v1::GenerateRequest r = IdsRequest(g.prompt_ids, 4);
    for (int i = 0; i < 65; ++i) r.mutable_sampling()->add_stop(absl::StrCat("stop", i));
    cases.push_back({"65 stop strings", r, "at most 64 stop strings"});
  }
  {
    v1::GenerateRequest r = IdsRequest(g.prompt_ids, 4);
    r.mutable_sampling()->add_stop(std::string(513, 'x'));
    cases.push_back({"513-byte stop string", r, "stop string of 513 bytes exceeds 512"});
  }
  {
    v1::GenerateRequest r = IdsRequest(g.prompt_ids, 4);
    r.mutable_sampling()->add_stop("");
    cases.push_back({"empty stop string", r, "stop strings must not be empty"});
  }
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    const auto t0 = Clock::now();
    const cli::StreamResult r = Generate(c.req, 60);
    EXPECT_EQ(r.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << StatusText(r.status);
    EXPECT_THAT(r.status.error_message(), HasSubstr(c.message));
    EXPECT_TRUE(r.ids.empty());
    EXPECT_LT(SecondsSince(t0), 10);
  }
  // The exact texts of the ones whose message is the whole story.
  EXPECT_EQ(Generate(cases[0].req).status.error_message(), "empty prompt: set text or token_ids");
  EXPECT_EQ(Generate(cases[1].req).status.error_message(), "text: empty prompt");
  const std::string big = Generate(cases[10].req).status.error_message();
  EXPECT_EQ(big, absl::StrCat("request of ", cases[10].req.ByteSizeLong(),
                              " bytes exceeds the limit of 4194304 bytes"));

  // The server keeps serving, correctly.
  EXPECT_EQ(Health(), HealthCheckResponse::SERVING);
  const cli::StreamResult ok = Generate(IdsRequest(g.prompt_ids, 48));
  ASSERT_TRUE(ok.status.ok()) << StatusText(ok.status);
  EXPECT_EQ(ok.ids, g.greedy_ids);
  EXPECT_EQ(ok.text, g.greedy_text);
  const v1::ModelInfoResponse info = WaitIdle(5);
  EXPECT_EQ(info.kv_free_blocks(), info.kv_capacity_blocks());
}

// ---- 3b. the request fields of issue #7: validation over gRPC -----------------------------------

// `msg` serialized, with the first occurrence of `marker` turned into `bytes` (so that a
// string field can hold invalid UTF-8, which protobuf would refuse to serialize).
std::string SerializedWith(const google::protobuf::Message& msg, const std::string& marker,
                           const std::string& bytes) {
  std::string wire = msg.SerializeAsString();
  const size_t at = wire.find(marker);
  EXPECT_NE(at, std::string::npos) << marker;
  if (at != std::string::npos) wire.replace(at, marker.size(), bytes);
  return wire;
}

TEST_F(ServerE2ETest, NewSamplingFieldsAreValidatedNamingTheField) {
  ASSERT_NO_FATAL_FAILURE(StartServer(1));
  const Golden& g = GoldenPrompts()[0];
  struct Case {
    std::string name;
    std::function<void(v1::SamplingOptions*)> set;
    std::string message;  // a substring of the expected message
  };
  const std::vector<Case> cases = {
      {"max_tokens 0", [](auto* s) { s->set_max_tokens(0); }, "max_tokens must be >= 1, got 0"},
      {"n 0", [](auto* s) { s->set_n(0); }, "n must be >= 1, got 0"},
      {"n 65", [](auto* s) { s->set_n(65); }, "n must be in [1, 64], got 65"},
      {"min_tokens -1", [](auto* s) { s->set_min_tokens(-1); }, "min_tokens must be in [0, max_tokens = 4], got -1"},
      {"min_tokens 5 > max_tokens 4", [](auto* s) { s->set_min_tokens(5); }, "min_tokens must be in [0, max_tokens = 4], got 5"},
      {"allowed_token_ids 4096", [](auto* s) { s->add_allowed_token_ids(4096); },
       "allowed_token_ids: id 4096 outside the vocabulary [0, 4096)"},
      {"allowed_token_ids -1", [](auto* s) { s->add_allowed_token_ids(-1); },
       "allowed_token_ids: id -1 outside the vocabulary"},
      {"logit_bias id 4096", [](auto* s) { (*s->mutable_logit_bias())[4096] = 1; },
       "logit_bias: id 4096 outside the vocabulary [0, 4096)"},
      {"logit_bias 101", [](auto* s) { (*s->mutable_logit_bias())[5] = 101; },
       "logit_bias: bias of id 5 must be in [-100, 100], got 101"},
      {"logit_bias NaN", [](auto* s) { (*s->mutable_logit_bias())[5] = std::nanf(""); },
       "logit_bias: bias of id 5 must be in [-100, 100], got nan"},
      {"presence_penalty 3", [](auto* s) { s->set_presence_penalty(3); },
       "presence_penalty must be in [-2, 2], got 3"},
      {"frequency_penalty -2.5", [](auto* s) { s->set_frequency_penalty(-2.5); },
       "frequency_penalty must be in [-2, 2], got -2.5"},
      {"logprobs 21", [](auto* s) { s->set_logprobs(21); }, "logprobs must be in [0, 20]"},
      {"logprobs -1", [](auto* s) { s->set_logprobs(-1); }, "logprobs must be in [0, 20]"},
      {"prompt_logprobs 21", [](auto* s) { s->set_prompt_logprobs(21); }, "prompt_logprobs must be in [0, 20]"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    v1::GenerateRequest req = IdsRequest(g.prompt_ids, 4);
    c.set(req.mutable_sampling());
    const cli::StreamResult r = Generate(req, 60);
    EXPECT_EQ(r.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << StatusText(r.status);
    EXPECT_THAT(r.status.error_message(), HasSubstr(c.message));
    EXPECT_TRUE(r.ids.empty());
  }
  // max_tokens unset is the default (16), not an error.
  {
    v1::GenerateRequest req;
    req.mutable_token_ids()->mutable_ids()->Add(g.prompt_ids.begin(), g.prompt_ids.end());
    req.mutable_sampling()->set_ignore_eos(true);
    const cli::StreamResult r = Generate(req);
    ASSERT_TRUE(r.status.ok()) << StatusText(r.status);
    EXPECT_EQ(r.ids.size(), 16u);
    EXPECT_EQ(r.final.usage().completion_tokens(), 16);
  }
  // `lorcserve client --json` sends them and prints the completions.
  {
    int exit_code = 0;
    const std::string out = RunLorcserve(
        {"client", "--server", server_->address(), "--prompt-ids", "0,611,896,1229,287",
         "--max-tokens", "3", "--min-tokens", "1", "--presence-penalty", "0.5", "--logit-bias",
         "5:-1", "--json"},
        &exit_code);
    ASSERT_EQ(exit_code, 0) << out;
    const nlohmann::json j = nlohmann::json::parse(out, nullptr, false);
    ASSERT_FALSE(j.is_discarded()) << out;
    EXPECT_EQ(j["n"], 1);
    ASSERT_EQ(j["completions"].size(), 1u);
    EXPECT_EQ(j["completions"][0]["output_ids"], j["output_ids"]);
    EXPECT_EQ(j["output_ids"].size(), 3u);
    EXPECT_EQ(j["finish_reason"], "length");
    EXPECT_TRUE(j.contains("stop_reason")) << out;
    EXPECT_EQ(j["usage"]["completion_tokens"], 3);
  }
  EXPECT_EQ(Health(), HealthCheckResponse::SERVING);
  const v1::ModelInfoResponse info = WaitIdle(5);
  EXPECT_EQ(info.kv_free_blocks(), info.kv_capacity_blocks());
}

// Fault 4 of issue #7: a string field that is not valid UTF-8 used to fail inside gRPC (INTERNAL,
// empty message). Every such field is named, with the byte offset.
TEST_F(ServerE2ETest, InvalidUtf8IsInvalidArgumentNamingFieldAndOffset) {
  ASSERT_NO_FATAL_FAILURE(StartServer(1));
  const Golden& g = GoldenPrompts()[0];
  struct Case {
    std::string name, method, bytes, message;
  };
  std::vector<Case> cases;
  {
    v1::GenerateRequest r;
    r.set_text("ab#");
    r.mutable_sampling()->set_max_tokens(4);
    cases.push_back({"text", "Generate", SerializedWith(r, "ab#", "ab\xff"),
                     "text is not valid UTF-8 at byte offset 2 (byte 0xFF)"});
  }
  {
    v1::GenerateRequest r = IdsRequest(g.prompt_ids, 4);
    r.mutable_sampling()->add_stop("fine");
    r.mutable_sampling()->add_stop("xy#");
    cases.push_back({"stop[1]", "Generate", SerializedWith(r, "xy#", "xy\xc3"),
                     "sampling.stop[1] is not valid UTF-8 at byte offset 2 (byte 0xC3)"});
  }
  for (const std::string field : {"request_id", "session_id", "cache_salt"}) {
    v1::GenerateRequest r = IdsRequest(g.prompt_ids, 4);
    const google::protobuf::FieldDescriptor* fd = r.GetDescriptor()->FindFieldByName(field);
    ASSERT_NE(fd, nullptr) << field;
    r.GetReflection()->SetString(&r, fd, "id-#");
    cases.push_back({field, "Generate", SerializedWith(r, "id-#", "\xe2\x82id"),
                     field + " is not valid UTF-8 at byte offset 0 (byte 0xE2)"});
  }
  {
    v1::TokenizeRequest r;
    r.set_text("ab#");
    cases.push_back({"Tokenize text", "Tokenize", SerializedWith(r, "ab#", "ab\xff"),
                     "text is not valid UTF-8 at byte offset 2 (byte 0xFF)"});
  }
  // Not a GenerateRequest at all: field 1 (request_id) claims 255 bytes, 1 follows.
  cases.push_back({"truncated", "Generate", std::string("\x0a\xff\x01x", 4),
                   "request is not a valid lorcserve.v1.GenerateRequest"});
  cases.push_back({"truncated ModelInfo", "ModelInfo", std::string("\x0a\xff\x01x", 4),
                   "request is not a valid lorcserve.v1.ModelInfoRequest"});
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    int messages = 0;
    const grpc::Status s = RawCall(c.method, c.bytes, &messages);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << StatusText(s);
    EXPECT_EQ(s.error_message(), c.message);
    EXPECT_EQ(messages, 0);
  }
  // The same request with valid bytes goes through the raw path too (a sanity check of the
  // test's own encoding), and the server keeps serving.
  {
    v1::GenerateRequest r;
    r.set_text(g.prompt);
    r.mutable_sampling()->set_max_tokens(4);
    int messages = 0;
    const grpc::Status s = RawCall("Generate", r.SerializeAsString(), &messages);
    EXPECT_TRUE(s.ok()) << StatusText(s);
    EXPECT_GE(messages, 1);
  }
  EXPECT_EQ(Health(), HealthCheckResponse::SERVING);
  const cli::StreamResult ok = Generate(IdsRequest(g.prompt_ids, 48));
  ASSERT_TRUE(ok.status.ok()) << StatusText(ok.status);
  EXPECT_EQ(ok.ids, g.greedy_ids);
  // `lorcserve client` checks before sending (cli_test).
}

// ---- 3c. the request semantics of issue #7 over gRPC (the engine side lands separately) --------

TEST_F(ServerE2ETest, ParallelCompletionsEachEndWithTheirOwnFinalMessage) {
  ASSERT_NO_FATAL_FAILURE(StartServer(1));
  const Golden& g = GoldenPrompts()[0];
  v1::GenerateRequest req = IdsRequest(g.prompt_ids, 6);
  req.mutable_sampling()->set_n(3);
  req.mutable_sampling()->set_temperature(1.0f);
  req.mutable_sampling()->set_seed(7);
  req.mutable_sampling()->set_ignore_eos(true);
  std::vector<v1::GenerateResponse> finals;
  // The stream ends only after all 3 final messages (a deadline ends it otherwise).
  const cli::StreamResult r = Generate(req, 20, [&](const v1::GenerateResponse& m) {
    EXPECT_GE(m.index(), 0);
    EXPECT_LT(m.index(), 3);
    if (m.final()) finals.push_back(m);
  });
  ASSERT_TRUE(r.status.ok()) << StatusText(r.status);
  ASSERT_EQ(finals.size(), 3u);
  std::vector<int32_t> indices;
  for (const v1::GenerateResponse& f : finals) {
    indices.push_back(f.index());
    EXPECT_EQ(f.finish_reason(), v1::FINISH_REASON_LENGTH);
    EXPECT_EQ(f.usage().completion_tokens(), 6);
    EXPECT_EQ(f.usage().prompt_tokens(), static_cast<int32_t>(g.prompt_ids.size()));
  }
  std::sort(indices.begin(), indices.end());
  EXPECT_EQ(indices, (std::vector<int32_t>{0, 1, 2}));
  ASSERT_EQ(r.completions.size(), 3u);
  for (const CompletionOutput& c : r.completions) EXPECT_EQ(c.output_ids.size(), 6u);
  EXPECT_EQ(WaitIdle(5).kv_free_blocks(), Info().kv_capacity_blocks());
}

TEST_F(ServerE2ETest, LogprobsStopReasonsAndPromptLogprobs) {
  ASSERT_NO_FATAL_FAILURE(StartServer(1));
  const Golden& g = GoldenPrompts()[0];
  // Greedy with logprobs 2: each token is the most likely (rank 1, first of the top 2).
  {
    v1::GenerateRequest req = IdsRequest(g.prompt_ids, 8);
    req.mutable_sampling()->set_logprobs(2);
    req.mutable_sampling()->set_prompt_logprobs(1);
    std::vector<v1::GenerateResponse> msgs;
    const cli::StreamResult r = Generate(req, 60, [&](const v1::GenerateResponse& m) { msgs.push_back(m); });
    ASSERT_TRUE(r.status.ok()) << StatusText(r.status);
    EXPECT_TRUE(IsPrefix(r.ids, g.greedy_ids));
    for (const v1::GenerateResponse& m : msgs) {
      EXPECT_EQ(m.logprobs_size(), m.token_ids_size());
      for (int i = 0; i < m.token_ids_size() && i < m.logprobs_size(); ++i) {
        const v1::TokenLogprobs& t = m.logprobs(i);
        EXPECT_EQ(t.rank(), 1);
        EXPECT_LE(t.logprob(), 0.0f);
        ASSERT_EQ(t.top_size(), 2);
        EXPECT_EQ(t.top(0).id(), m.token_ids(i));
        EXPECT_FLOAT_EQ(t.top(0).logprob(), t.logprob());
        EXPECT_GE(t.top(0).logprob(), t.top(1).logprob());
      }
    }
    EXPECT_EQ(r.final.prompt_logprobs_size(), static_cast<int>(g.prompt_ids.size()) - 1);
    for (const v1::TokenLogprobs& t : r.final.prompt_logprobs()) {
      EXPECT_LE(t.logprob(), 0.0f);
      EXPECT_GE(t.rank(), 1);
      EXPECT_EQ(t.top_size(), 1);
    }
  }
  // A stop string that completes on the last allowed token is a stop, and is reported.
  const std::string stop = g.greedy_text.substr(0, std::min<size_t>(6, g.greedy_text.size()));
  for (const bool include : {false, true}) {
    SCOPED_TRACE(include ? "include_stop_str_in_output" : "cut");
    v1::GenerateRequest req = IdsRequest(g.prompt_ids, 48);
    req.mutable_sampling()->add_stop(stop);
    req.mutable_sampling()->set_include_stop_str_in_output(include);
    const cli::StreamResult r = Generate(req);
    ASSERT_TRUE(r.status.ok()) << StatusText(r.status);
    EXPECT_EQ(r.final.finish_reason(), v1::FINISH_REASON_STOP);
    EXPECT_EQ(r.final.stop_reason_case(), v1::GenerateResponse::kStopString);
    EXPECT_EQ(r.final.stop_string(), stop);
    EXPECT_EQ(r.text, include ? stop : "");
  }
  // A stop token id is reported as such.
  {
    v1::GenerateRequest req = IdsRequest(g.prompt_ids, 48);
    req.mutable_sampling()->add_stop_token_ids(g.greedy_ids[2]);
    const cli::StreamResult r = Generate(req);
    ASSERT_TRUE(r.status.ok()) << StatusText(r.status);
    EXPECT_EQ(r.final.finish_reason(), v1::FINISH_REASON_STOP);
    EXPECT_EQ(r.final.stop_reason_case(), v1::GenerateResponse::kStopTokenId);
    EXPECT_EQ(r.final.stop_token_id(), g.greedy_ids[2]);
    EXPECT_TRUE(IsPrefix(r.ids, g.greedy_ids));
    EXPECT_LE(r.ids.size(), 3u);  // whether the stop id itself is listed is the engine's contract
  }
  // allowed_token_ids / logit_bias steer greedy decoding.
  {
    v1::GenerateRequest req = IdsRequest(g.prompt_ids, 4);
    req.mutable_sampling()->add_allowed_token_ids(7);
    req.mutable_sampling()->add_allowed_token_ids(9);
    req.mutable_sampling()->set_ignore_eos(true);
    const cli::StreamResult r = Generate(req);
    ASSERT_TRUE(r.status.ok()) << StatusText(r.status);
    for (int32_t id : r.ids) EXPECT_TRUE(id == 7 || id == 9) << id;
    v1::GenerateRequest biased = IdsRequest(g.prompt_ids, 3);
    (*biased.mutable_sampling()->mutable_logit_bias())[11] = 100;
    biased.mutable_sampling()->set_ignore_eos(true);
    const cli::StreamResult b = Generate(biased);
    ASSERT_TRUE(b.status.ok()) << StatusText(b.status);
    EXPECT_EQ(b.ids, (std::vector<int32_t>{11, 11, 11}));
  }
}

// ---- 4. the bounded admission queue ------------------------------------------------------------

TEST_F(ServerE2ETest, BoundedQueueRejectsWithResourceExhausted) {
  ASSERT_NO_FATAL_FAILURE(
      StartServer(1, {"--num-blocks", "8", "--max-num-seqs", "1", "--max-waiting", "2"}));
  const Golden& g = GoldenPrompts()[0];
  ASSERT_EQ(Info().kv_capacity_blocks(), 8);

  // A request that can never fit: 6 + 200 - 1 cached tokens need 13 blocks of 16, the cache has 8. Not
  // retryable, so INVALID_ARGUMENT (RESOURCE_EXHAUSTED is only for the full queue below).
  {
    const cli::StreamResult r = Generate(IdsRequest(g.prompt_ids, 200), 30);
    EXPECT_EQ(r.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << StatusText(r.status);
    EXPECT_THAT(r.status.error_message(), HasSubstr("request needs 13 KV blocks for 205 cached tokens"));
    EXPECT_THAT(r.status.error_message(), HasSubstr("the whole cache has 8"));
  }

  // 8 simultaneous long requests (6 + 100 tokens: 7 blocks each): one runs, two wait, the rest
  // find the queue full.
  constexpr int kClients = 8;
  std::vector<cli::StreamResult> results(kClients);
  std::latch start(kClients);
  std::vector<std::thread> threads;
  const auto t0 = Clock::now();
  for (int i = 0; i < kClients; ++i) {
    threads.emplace_back([&, i] {
      v1::GenerateRequest req = IdsRequest(g.prompt_ids, 100);
      req.mutable_sampling()->set_ignore_eos(true);
      start.arrive_and_wait();
      results[i] = Generate(req, 300);
    });
  }
  // Meanwhile the live state never exceeds the bounds.
  std::atomic<bool> done{false};
  int max_num_seqs = 0, max_waiting = 0, samples = 0;
  std::thread poller([&] {
    while (!done.load()) {
      const v1::ModelInfoResponse info = Info();
      max_num_seqs = std::max(max_num_seqs, info.num_running());
      max_waiting = std::max(max_waiting, info.num_waiting());
      ++samples;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  });
  for (std::thread& t : threads) t.join();
  done = true;
  poller.join();
  std::cerr << "[queue] 8 clients done in " << SecondsSince(t0) << " s; " << samples
            << " ModelInfo samples, at most " << max_num_seqs << " running, " << max_waiting
            << " waiting\n";
  EXPECT_LE(max_num_seqs, 1);
  EXPECT_LE(max_waiting, 2);
  EXPECT_GE(max_num_seqs, 1);
  int admitted = 0, rejected = 0;
  for (int i = 0; i < kClients; ++i) {
    const cli::StreamResult& r = results[i];
    SCOPED_TRACE(absl::StrCat("client ", i));
    if (r.status.ok()) {
      ++admitted;
      EXPECT_EQ(r.ids.size(), 100u);
      EXPECT_EQ(r.final.finish_reason(), v1::FINISH_REASON_LENGTH);
      EXPECT_EQ(r.final.usage().completion_tokens(), 100);
      EXPECT_TRUE(IsPrefix(g.greedy_ids, r.ids));  // greedy: the golden 48 first
    } else {
      ++rejected;
      EXPECT_EQ(r.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << StatusText(r.status);
      EXPECT_THAT(r.status.error_message(), HasSubstr("queue full"));
      EXPECT_TRUE(r.ids.empty());
    }
  }
  // max_num_seqs 1 + max_waiting 2: at most 3 are admitted while the 8 arrive together (one
  // request takes far longer than their arrival); the others find the queue full.
  EXPECT_GE(admitted, 1);
  EXPECT_GE(rejected, 1);
  EXPECT_EQ(admitted + rejected, kClients);
  std::cerr << "[queue] " << admitted << " admitted, " << rejected << " rejected\n";
  const v1::ModelInfoResponse info = WaitIdle(5);
  EXPECT_EQ(info.kv_free_blocks(), 8);
  EXPECT_TRUE(info.serving());
}

// ---- 5. a worker killed mid-generation ---------------------------------------------------------

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
  const std::string error = second.Start(0, {"--workers", info.workers(0)});
  EXPECT_THAT(error, HasSubstr("exited before printing LISTENING"));
  EXPECT_THAT(error, HasSubstr(absl::StrCat("this worker is serving coordinator 0x")));
  EXPECT_THAT(error, HasSubstr(absl::StrCat("(at ", server_->address(), ")")));
  // The first one keeps serving, with golden output.
  const Golden& g = GoldenPrompts()[0];
  const cli::StreamResult r = Generate(IdsRequest(g.prompt_ids, 48));
  ASSERT_TRUE(r.status.ok()) << StatusText(r.status);
  EXPECT_EQ(r.ids, g.greedy_ids);
  EXPECT_TRUE(Info().serving());
}

// Polls `done` (state, not a fixed sleep) until it holds or `limit_s` passes.
bool WaitFor(const std::function<bool()>& done, double limit_s) {
  const auto t0 = Clock::now();
  while (!done()) {
    if (SecondsSince(t0) > limit_s) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return true;
}

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
  EXPECT_EQ(server_->WorkerPid(0), -1);  // not restarted again
  EXPECT_TRUE(server_->Alive());
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
  // A text prompt is the tokenized text with BOS: same output as the golden ids.
  {
    const Golden& g = GoldenPrompts()[0];
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
  EXPECT_EQ(info.model(), Tiny());
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
}  // namespace lorc
