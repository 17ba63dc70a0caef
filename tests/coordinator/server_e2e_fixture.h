// The end-to-end fixture shared by server_e2e_test.cc (serving, recovery, health) and
// server_api_e2e_test.cc (request semantics over gRPC): a real `lorcserve coordinator
// --local-workers N` child process with its workers (ServerProcess), a gRPC client to it
// (ServerE2ETest) and small helpers. Test-only header, included by one file per test binary.
#pragma once

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
#include "tests/testing/scratch_dir.h"

extern char** environ;

namespace lorc {
namespace e2e {

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

// Polls `done` every 20 ms for up to `limit_s` seconds.
bool WaitFor(const std::function<bool()>& done, double limit_s) {
  const auto t0 = Clock::now();
  while (!done()) {
    if (SecondsSince(t0) > limit_s) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return true;
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

// A model directory for --random-weights runs: tiny-llama-a's tokenizer and generation config,
// and its config.json after `edit` (a scratch directory `name` under `prefix`, no weights file).
std::string TinyTokenizerModel(const std::string& prefix, const std::string& name,
                               const std::function<void(nlohmann::json&)>& edit) {
  const fs::path dir = ::lorc::testing::MakeScratchDir(prefix, name);
  for (const char* f : {"generation_config.json", "tokenizer.json", "tokenizer_config.json"}) {
    fs::copy_file(fs::path(Tiny()) / f, dir / f, fs::copy_options::overwrite_existing);
  }
  std::ifstream in(fs::path(Tiny()) / "config.json");
  nlohmann::json c = nlohmann::json::parse(in);
  edit(c);
  std::ofstream(dir / "config.json") << c.dump();
  return dir.string();
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
  // Returns once the coordinator printed LISTENING (the model loaded).
  std::string Start(int workers, const std::vector<std::string>& extra_flags) {
    if (std::string error = Spawn(workers, extra_flags); !error.empty()) return error;
    return AwaitListening();
  }

  // Start's first half: the process is started, nothing is awaited (e.g. to signal it during
  // the load). `extra_flags` may repeat --model (the last one counts).
  std::string Spawn(int workers, const std::vector<std::string>& extra_flags) {
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
    // Its own process group (the coordinator leads it, pgid = pid): a test can signal the group,
    // as a terminal's Ctrl-C or `timeout` would, without signalling itself.
    posix_spawnattr_t attr;
    posix_spawnattr_init(&attr);
    posix_spawnattr_setpgroup(&attr, 0);
    posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETPGROUP);
    const int rc = posix_spawn(&pid_, argv[0], &fa, &attr, argv.data(), environ);
    posix_spawnattr_destroy(&attr);
    posix_spawn_file_actions_destroy(&fa);
    close(out[1]);
    close(err_fd);
    if (rc != 0) {
      close(out[0]);
      pid_ = -1;
      return absl::StrCat("cannot spawn ", argv[0], ": ", std::strerror(rc));
    }
    stdout_fd_ = out[0];
    return "";
  }

  // Start's second half: reads the LISTENING line (the model loads in every worker first).
  std::string AwaitListening() {
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
        stdout_pending_ = buf.substr(nl + 1);  // e.g. METRICS_LISTENING, read by ReadStdoutLine
        // The coordinator prints `INTERNAL_LISTENING host:port` right after it (one flush).
        const std::string next = ReadStdoutLine(2.0);
        if (next.rfind("INTERNAL_LISTENING ", 0) == 0) {
          internal_address_ = next.substr(19);
        } else if (!next.empty()) {
          stdout_pending_ = next + "\n" + stdout_pending_;
        }
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

  // The next line the coordinator prints on stdout after LISTENING (without its '\n'), or ""
  // when none comes within `limit_s` seconds.
  std::string ReadStdoutLine(double limit_s) {
    const auto deadline = Clock::now() + std::chrono::milliseconds(static_cast<int64_t>(limit_s * 1e3));
    for (;;) {
      const size_t nl = stdout_pending_.find('\n');
      if (nl != std::string::npos) {
        std::string line = stdout_pending_.substr(0, nl);
        stdout_pending_.erase(0, nl + 1);
        return line;
      }
      const int left_ms = static_cast<int>(
          std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count());
      if (left_ms <= 0 || stdout_fd_ < 0) return "";
      pollfd p{stdout_fd_, POLLIN, 0};
      if (poll(&p, 1, left_ms) <= 0) continue;
      char chunk[256];
      const ssize_t got = read(stdout_fd_, chunk, sizeof(chunk));
      if (got == 0) return "";
      if (got > 0) stdout_pending_.append(chunk, static_cast<size_t>(got));
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
  // The internal port (Rendezvous, WorkerJoin), from the INTERNAL_LISTENING line.
  const std::string& internal_address() const { return internal_address_; }
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
  std::string stdout_pending_;  // read past the LISTENING line
  std::string internal_address_;
  std::string command_;
};

// Runs `lorcserve args...` to completion; returns its stdout (and stderr when `with_stderr`;
// exit code in *exit_code).
std::string RunLorcserve(const std::vector<std::string>& args, int* exit_code, bool with_stderr = false) {
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
  if (with_stderr) posix_spawn_file_actions_adddup2(&fa, fd, STDERR_FILENO);
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

  // CloseSession(session_id = id, cache_salt = salt), 30 s deadline.
  grpc::Status CloseSession(const std::string& id, const std::string& salt = "") {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    v1::CloseSessionRequest req;
    req.set_session_id(id);
    req.set_cache_salt(salt);
    v1::CloseSessionResponse resp;
    return stub_->CloseSession(&ctx, req, &resp);
  }
  cli::StreamResult Generate(const v1::GenerateRequest& req, double timeout_s = 300,
                             const std::function<void(const v1::GenerateResponse&)>& on_chunk = {}) {
    return cli::StreamGenerate(*stub_, req, timeout_s, on_chunk);
  }

  // Streams every golden prompt (`max_tokens` each) concurrently (batched steps), then the first
  // alone, and expects `want[i]` (an in-process reference, in_process_golden.h) from prompt i; a
  // completion of max_tokens tokens ends by length.
  void ExpectGoldenStreams(const std::vector<std::vector<int32_t>>& want, int max_tokens) {
    const std::vector<Golden>& golden = GoldenPrompts();
    ASSERT_EQ(want.size(), golden.size());
    std::vector<cli::StreamResult> got(golden.size());
    std::vector<std::thread> threads;
    for (size_t i = 0; i < golden.size(); ++i) {
      threads.emplace_back([&, i] { got[i] = Generate(IdsRequest(golden[i].prompt_ids, max_tokens)); });
    }
    for (std::thread& t : threads) t.join();
    for (size_t i = 0; i < golden.size(); ++i) {
      SCOPED_TRACE(absl::StrCat("golden prompt ", i, ": ", golden[i].prompt));
      ASSERT_TRUE(got[i].status.ok()) << StatusText(got[i].status);
      EXPECT_EQ(got[i].ids, want[i]);
      if (static_cast<int>(got[i].ids.size()) == max_tokens) {
        EXPECT_EQ(got[i].final.finish_reason(), v1::FINISH_REASON_LENGTH);
      }
    }
    const cli::StreamResult alone = Generate(IdsRequest(golden[0].prompt_ids, max_tokens));
    ASSERT_TRUE(alone.status.ok()) << StatusText(alone.status);
    EXPECT_EQ(alone.ids, want[0]);
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

  // SIGKILLs worker 0 and waits until its replacement serves. Use under ASSERT_NO_FATAL_FAILURE.
  void KillWorkerAndAwaitRestart() {
    const pid_t old = server_->WorkerPid(0);
    ASSERT_GT(old, 0);
    ASSERT_EQ(kill(old, SIGKILL), 0) << std::strerror(errno);
    ASSERT_TRUE(WaitFor([&] {
      const pid_t p = server_->WorkerPid(0);
      return p > 0 && p != old && Health() == HealthCheckResponse::SERVING;
    }, 60)) << server_->Stderr();
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


}  // namespace e2e
}  // namespace lorc
