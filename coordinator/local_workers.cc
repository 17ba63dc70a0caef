#include "coordinator/local_workers.h"

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "common/status_macros.h"

extern char** environ;

namespace lorc {
namespace {

// Reads one line from `fd` (blocking), without buffering past the newline.
absl::StatusOr<std::string> ReadLine(int fd) {
  std::string line;
  char c;
  for (;;) {
    const ssize_t n = read(fd, &c, 1);
    if (n == 1) {
      if (c == '\n') return line;
      line.push_back(c);
    } else if (n == 0) {
      return absl::UnavailableError("worker exited before reporting its address");
    } else if (errno != EINTR) {
      return absl::InternalError(absl::StrCat("read: ", std::strerror(errno)));
    }
  }
}

std::string ExitDescription(int status) {
  if (WIFEXITED(status)) return absl::StrCat("exited with code ", WEXITSTATUS(status));
  if (WIFSIGNALED(status)) return absl::StrCat("killed by signal ", WTERMSIG(status));
  return "stopped";
}

}  // namespace

absl::StatusOr<std::unique_ptr<LocalWorkers>> LocalWorkers::Start(const LocalWorkersOptions& options,
                                                                   ExitFn on_exit) {
  if (options.count < 1) return absl::InvalidArgumentError("--local-workers must be >= 1");
  std::unique_ptr<LocalWorkers> w(new LocalWorkers());
  w->options_ = options;
  w->on_exit_ = std::move(on_exit);
  w->binary_ = options.binary.empty() ? "/proc/self/exe" : options.binary;
  const int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  w->threads_ =
      options.threads_per_worker > 0 ? options.threads_per_worker : std::max(1, cores / options.count);
  {
    absl::MutexLock lock(&w->mu_);
    w->addresses_.assign(options.count, "");
    w->pids_.assign(options.count, -1);
  }
  w->supervisor_ = std::thread([p = w.get()] { p->Supervise(); });
  for (int r = 0; r < options.count; ++r) RETURN_IF_ERROR(w->Spawn(r));
  return w;
}

absl::Status LocalWorkers::Spawn(int r) {
  int out[2];
  if (pipe2(out, O_CLOEXEC) != 0) return absl::InternalError(absl::StrCat("pipe: ", std::strerror(errno)));
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_adddup2(&fa, out[1], STDOUT_FILENO);
  // The worker starts with no signal blocked: lorcserve blocks SIGINT/SIGTERM in its threads
  // (cli/signals.h), and a blocked mask survives exec.
  posix_spawnattr_t attr;
  posix_spawnattr_init(&attr);
  sigset_t none;
  sigemptyset(&none);
  posix_spawnattr_setsigmask(&attr, &none);
  // Its own process group: a signal to this coordinator's group (a terminal's Ctrl-C, `timeout`,
  // `kill -TERM -PGID`) reaches the coordinator alone, which drains and then stops its workers
  // (a SIGTERM that also reached them failed the requests the drain was finishing: a tester). A
  // coordinator killed outright still takes them along (the worker's PR_SET_PDEATHSIG).
  posix_spawnattr_setpgroup(&attr, 0);
  posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETPGROUP);
  std::vector<std::string> args = {"lorcserve", "worker", "--listen", options_.listen, "--backend",
                                   options_.backend, "--threads", std::to_string(threads_),
                                   "--device", std::to_string(options_.first_device + r),
                                   "--rank-hint", std::to_string(r),
                                   "--parent-pid", std::to_string(getpid())};
  if (options_.extra_args) {
    for (std::string& a : options_.extra_args(r)) args.push_back(std::move(a));
  }
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  pid_t pid;
  int rc;
  {
    // Under the lock: the supervisor must not reap the child before it is registered.
    absl::MutexLock lock(&mu_);
    if (pids_[r] > 0) {
      rc = -1;
    } else {
      rc = posix_spawn(&pid, binary_.c_str(), &fa, &attr, argv.data(), environ);
      if (rc == 0) {
        pids_[r] = pid;
        ++alive_;
      }
    }
  }
  posix_spawn_file_actions_destroy(&fa);
  posix_spawnattr_destroy(&attr);
  close(out[1]);
  if (rc == -1) {
    close(out[0]);
    return absl::FailedPreconditionError(absl::StrCat("worker ", r, " is still running"));
  }
  if (rc != 0) {
    close(out[0]);
    return absl::InternalError(absl::StrCat("cannot start worker ", r, " (", binary_, "): ", std::strerror(rc)));
  }
  absl::StatusOr<std::string> line = ReadLine(out[0]);
  close(out[0]);
  if (!line.ok()) return absl::Status(line.status().code(), absl::StrCat("worker ", r, ": ", line.status().message()));
  absl::string_view addr = *line;
  if (!absl::ConsumePrefix(&addr, "LISTENING ")) {
    return absl::InternalError(absl::StrCat("worker ", r, " printed '", *line, "' instead of its address"));
  }
  absl::MutexLock lock(&mu_);
  addresses_[r] = std::string(addr);
  return absl::OkStatus();
}

absl::Status LocalWorkers::Restart(int rank) {
  if (rank < 0 || rank >= options_.count) {
    return absl::InvalidArgumentError(absl::StrCat("no worker rank ", rank));
  }
  return Spawn(rank);
}

std::vector<std::string> LocalWorkers::addresses() const {
  absl::MutexLock lock(&mu_);
  return addresses_;
}

std::vector<pid_t> LocalWorkers::pids() const {
  absl::MutexLock lock(&mu_);
  return pids_;
}

std::vector<int> LocalWorkers::exited() const {
  absl::MutexLock lock(&mu_);
  std::vector<int> out;
  for (int r = 0; r < static_cast<int>(pids_.size()); ++r) {
    if (pids_[r] <= 0) out.push_back(r);
  }
  return out;
}

bool LocalWorkers::Kill(int rank) {
  absl::MutexLock lock(&mu_);
  if (rank < 0 || rank >= static_cast<int>(pids_.size()) || pids_[rank] <= 0) return false;
  return kill(pids_[rank], SIGKILL) == 0;
}

std::vector<int> LocalWorkers::WaitForExit(absl::Duration timeout) const {
  {
    absl::MutexLock lock(&mu_);
    auto any = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      return stopping_ || std::find(pids_.begin(), pids_.end(), -1) != pids_.end();
    };
    mu_.AwaitWithTimeout(absl::Condition(&any), timeout);
  }
  return exited();
}

void LocalWorkers::Supervise() {
  for (;;) {
    {
      absl::MutexLock lock(&mu_);
      // Nothing to reap: wait for a (re)start or the end.
      auto ready = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return stopping_ || alive_ > 0; };
      mu_.Await(absl::Condition(&ready));
      if (alive_ == 0) return;  // stopping
    }
    int status = 0;
    const pid_t pid = waitpid(-1, &status, 0);
    if (pid < 0) {
      if (errno == ECHILD) {
        // A child registered under the lock is always waitable; only a foreign waitpid gets here.
        absl::MutexLock lock(&mu_);
        if (stopping_) return;
      }
      continue;
    }
    int rank = -1;
    bool stopping;
    {
      absl::MutexLock lock(&mu_);
      auto it = std::find(pids_.begin(), pids_.end(), pid);
      if (it == pids_.end()) continue;  // not one of ours
      rank = static_cast<int>(it - pids_.begin());
      *it = -1;
      --alive_;
      stopping = stopping_;
    }
    if (!stopping && on_exit_) on_exit_(rank, pid, ExitDescription(status));
  }
}

LocalWorkers::~LocalWorkers() {
  std::vector<pid_t> pids;
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
    pids = pids_;
  }
  for (pid_t p : pids) {
    if (p > 0) kill(p, SIGTERM);
  }
  // Give them a moment (the supervisor reaps them), then make sure.
  {
    absl::MutexLock lock(&mu_);
    auto gone = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return alive_ == 0; };
    if (!mu_.AwaitWithTimeout(absl::Condition(&gone), absl::Seconds(5))) {
      for (int r = 0; r < static_cast<int>(pids_.size()); ++r) {
        if (pids_[r] <= 0) continue;
        std::fprintf(stderr, "lorcserve: worker %d (pid %d) still running 5 s after SIGTERM: SIGKILL\n", r,
                     static_cast<int>(pids_[r]));
        kill(pids_[r], SIGKILL);
      }
    }
  }
  if (supervisor_.joinable()) supervisor_.join();
}

}  // namespace lorc
