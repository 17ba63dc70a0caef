// Workers that join the coordinator (`lorcserve worker --join HOST:PORT --rank R`) instead of
// being listed: real processes on loopback. The group forms whatever order the ranks come in and
// serves the golden tokens; the missing ranks are named after --join-timeout-s; a duplicate rank
// is refused while its holder lives, a rank out of range ends the worker (exit 2) with the reason;
// a killed worker fails the group (NOT_SERVING) and a restarted one re-forms it; the leader's own
// --local-workers and joined ranks make one group. (Across network namespaces, with the
// LeaderWorkerSet environment: tests/multihost/netns_test.sh.)
#include "tests/coordinator/server_e2e_fixture.h"

namespace lorc {
namespace e2e {
namespace {

// `lorcserve worker --join ... args` as a child process; stderr in a temporary file.
class WorkerProcess {
 public:
  explicit WorkerProcess(const std::vector<std::string>& extra) {
    char tmpl[] = "/tmp/lorc_join_e2e_worker_XXXXXX";
    const int fd = mkostemp(tmpl, O_CLOEXEC);
    if (fd < 0) return;
    stderr_path_ = tmpl;
    std::vector<std::string> args = {Binary(), "worker", "--threads", "1"};
    args.insert(args.end(), extra.begin(), extra.end());
    std::vector<char*> argv;
    for (std::string& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, STDOUT_FILENO, "/dev/null", O_WRONLY, 0);
    posix_spawn_file_actions_adddup2(&fa, fd, STDERR_FILENO);
    if (posix_spawn(&pid_, argv[0], &fa, nullptr, argv.data(), environ) != 0) pid_ = -1;
    posix_spawn_file_actions_destroy(&fa);
    close(fd);
  }
  ~WorkerProcess() {
    Kill(SIGTERM);
    std::error_code ec;
    if (!stderr_path_.empty()) fs::remove(stderr_path_, ec);
  }
  // Sends `sig` and reaps the process (SIGKILL after 10 s); returns its exit code (128 + signal).
  int Kill(int sig) {
    if (pid_ <= 0) return exit_code_;
    kill(pid_, sig);
    if (!WaitExit(10)) {
      kill(pid_, SIGKILL);
      WaitExit(10);
    }
    return exit_code_;
  }
  // Waits up to `limit_s` for the process to exit by itself.
  bool WaitExit(double limit_s) {
    return WaitFor(
        [&] {
          if (pid_ <= 0) return true;
          int status = 0;
          if (waitpid(pid_, &status, WNOHANG) != pid_) return false;
          exit_code_ = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
          pid_ = -1;
          return true;
        },
        limit_s);
  }
  int exit_code() const { return exit_code_; }
  std::string Stderr() const { return ReadAll(stderr_path_); }

 private:
  pid_t pid_ = -1;
  int exit_code_ = -1;
  std::string stderr_path_;
};

class JoinE2ETest : public ServerE2ETest {
 protected:
  std::unique_ptr<WorkerProcess> Join(int rank, std::vector<std::string> extra = {}) {
    extra.insert(extra.begin(), {"--join", server_->internal_address(), "--rank", std::to_string(rank)});
    return std::make_unique<WorkerProcess>(extra);
  }
  bool WaitHealth(HealthCheckResponse::ServingStatus want, double limit_s) {
    return WaitFor([&] { return Health() == want; }, limit_s);
  }
};

TEST_F(JoinE2ETest, RanksJoinInAnyOrderMissingOnesAreNamedAndARestartedWorkerRejoins) {
  ASSERT_NO_FATAL_FAILURE(StartServer(0, {"--tensor-parallel-size", "2", "--join-timeout-s", "1"}));
  ASSERT_THAT(server_->internal_address(), HasSubstr("127.0.0.1:"));
  EXPECT_NE(server_->internal_address(), server_->address());
  std::unique_ptr<WorkerProcess> w1 = Join(1);
  // Rank 0 is missing: after --join-timeout-s the coordinator names it, and keeps waiting.
  ASSERT_TRUE(WaitFor([&] { return absl::StrContains(Info().worker_failure(), "missing rank 0 of 2"); }, 30))
      << Info().worker_failure();
  EXPECT_THAT(server_->Stderr(), HasSubstr("still waiting"));
  EXPECT_EQ(Health(), HealthCheckResponse::NOT_SERVING);
  EXPECT_FALSE(Info().serving());
  std::unique_ptr<WorkerProcess> w0 = Join(0);
  ASSERT_TRUE(WaitHealth(HealthCheckResponse::SERVING, 60));
  EXPECT_EQ(Info().tensor_parallel_size(), 2);
  EXPECT_EQ(Info().worker_failure(), "");
  ASSERT_NO_FATAL_FAILURE(ExpectGoldenGreedy());

  // A second worker claiming rank 1 while its holder answers: refused, and it keeps retrying.
  std::unique_ptr<WorkerProcess> dup = Join(1);
  ASSERT_TRUE(WaitFor([&] { return absl::StrContains(dup->Stderr(), "already held by the worker at"); }, 30))
      << dup->Stderr();
  EXPECT_EQ(Health(), HealthCheckResponse::SERVING);
  dup->Kill(SIGTERM);
  // A rank outside the group: the worker exits 2 naming it.
  std::unique_ptr<WorkerProcess> bad = Join(5);
  ASSERT_TRUE(bad->WaitExit(30)) << bad->Stderr();
  EXPECT_EQ(bad->exit_code(), 2);
  EXPECT_THAT(bad->Stderr(), HasSubstr("rank 5 is out of range"));
  // A mismatching group size: the same.
  std::unique_ptr<WorkerProcess> sized = Join(1, {"--tensor-parallel-size", "4"});
  ASSERT_TRUE(sized->WaitExit(30)) << sized->Stderr();
  EXPECT_EQ(sized->exit_code(), 2);
  EXPECT_THAT(sized->Stderr(), HasSubstr("group size mismatch"));

  // Rank 1 killed: health turns NOT_SERVING; a new process joins as rank 1 and the group re-forms.
  w1->Kill(SIGKILL);
  ASSERT_TRUE(WaitHealth(HealthCheckResponse::NOT_SERVING, 30));
  w1 = Join(1);
  ASSERT_TRUE(WaitHealth(HealthCheckResponse::SERVING, 120)) << server_->Stderr();
  EXPECT_THAT(server_->Stderr(), HasSubstr("worker rank 1 joined from"));
  ASSERT_NO_FATAL_FAILURE(ExpectGoldenGreedy());
}

// A LeaderWorkerSet worker pod can start before its leader's DNS record exists (the leader pod
// still pending): the worker waits for the name instead of exiting 1 (which cost a
// CrashLoopBackOff, a tester). Listening on all interfaces it needs the route to the coordinator
// first (said once); on a given address it listens at once and the join retries. SIGTERM ends it
// (exit 0); a malformed --join is still refused at once (exit 2).
TEST_F(JoinE2ETest, AWorkerWaitsForACoordinatorNameThatDoesNotResolveYet) {
  WorkerProcess wildcard({"--join", "lorc-no-such-host.invalid:50052", "--rank", "0"});
  WorkerProcess listening({"--join", "lorc-no-such-host.invalid:50052", "--rank", "0", "--listen", "127.0.0.1:0"});
  ASSERT_TRUE(WaitFor([&] { return absl::StrContains(wildcard.Stderr(), "waiting for it"); }, 30))
      << wildcard.Stderr();
  EXPECT_THAT(wildcard.Stderr(), HasSubstr("cannot resolve 'lorc-no-such-host.invalid'"));
  ASSERT_TRUE(WaitFor([&] { return absl::StrContains(listening.Stderr(), "serving on 127.0.0.1:"); }, 30))
      << listening.Stderr();
  EXPECT_FALSE(wildcard.WaitExit(2)) << wildcard.Stderr();
  EXPECT_FALSE(listening.WaitExit(0.1)) << listening.Stderr();
  EXPECT_EQ(wildcard.Kill(SIGTERM), 0) << wildcard.Stderr();
  EXPECT_THAT(wildcard.Stderr(), HasSubstr("SIGTERM while waiting for the coordinator's address"));
  WorkerProcess malformed({"--join", "lorc-no-port", "--rank", "0"});
  ASSERT_TRUE(malformed.WaitExit(30));
  EXPECT_EQ(malformed.exit_code(), 2);
  EXPECT_THAT(malformed.Stderr(), HasSubstr("--join: 'lorc-no-port' is not HOST:PORT"));
}

TEST_F(JoinE2ETest, LocalWorkersAndAJoinedRankMakeOneGroup) {
  ASSERT_NO_FATAL_FAILURE(StartServer(1, {"--tensor-parallel-size", "2", "--threads", "1"}));
  // Rank 0 is the coordinator's own: a worker cannot take it.
  std::unique_ptr<WorkerProcess> local = Join(0);
  ASSERT_TRUE(local->WaitExit(30)) << local->Stderr();
  EXPECT_THAT(local->Stderr(), HasSubstr("one of the coordinator's 1 local workers"));
  std::unique_ptr<WorkerProcess> w1 = Join(1);
  ASSERT_TRUE(WaitHealth(HealthCheckResponse::SERVING, 60)) << server_->Stderr();
  const v1::ModelInfoResponse info = Info();
  EXPECT_EQ(info.tensor_parallel_size(), 2);
  ASSERT_EQ(info.workers_size(), 2);
  ASSERT_NO_FATAL_FAILURE(ExpectGoldenGreedy());
}

}  // namespace
}  // namespace e2e
}  // namespace lorc
