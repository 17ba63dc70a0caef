#include "coordinator/local_workers.h"

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
  w->on_exit_ = std::move(on_exit);
  const std::string binary = options.binary.empty() ? "/proc/self/exe" : options.binary;
  const int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  const int threads =
      options.threads_per_worker > 0 ? options.threads_per_worker : std::max(1, cores / options.count);
  for (int r = 0; r < options.count; ++r) {
    int out[2];
    if (pipe(out) != 0) return absl::InternalError(absl::StrCat("pipe: ", std::strerror(errno)));
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_adddup2(&fa, out[1], STDOUT_FILENO);
    posix_spawn_file_actions_addclose(&fa, out[0]);
    std::vector<std::string> args = {"lorcserve", "worker", "--listen", "127.0.0.1:0", "--backend",
                                     options.backend, "--threads", std::to_string(threads),
                                     "--device", std::to_string(options.first_device + r),
                                     "--rank-hint", std::to_string(r),
                                     "--parent-pid", std::to_string(getpid())};
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    pid_t pid;
    const int rc = posix_spawn(&pid, binary.c_str(), &fa, nullptr, argv.data(), environ);
    posix_spawn_file_actions_destroy(&fa);
    close(out[1]);
    if (rc != 0) {
      close(out[0]);
      return absl::InternalError(absl::StrCat("cannot start worker ", r, " (", binary, "): ", std::strerror(rc)));
    }
    w->pids_.push_back(pid);
    absl::StatusOr<std::string> line = ReadLine(out[0]);
    close(out[0]);
    if (!line.ok()) return absl::Status(line.status().code(), absl::StrCat("worker ", r, ": ", line.status().message()));
    absl::string_view addr = *line;
    if (!absl::ConsumePrefix(&addr, "LISTENING ")) {
      return absl::InternalError(absl::StrCat("worker ", r, " printed '", *line, "' instead of its address"));
    }
    w->addresses_.emplace_back(addr);
  }
  w->supervisor_ = std::thread([p = w.get()] { p->Supervise(); });
  return w;
}

void LocalWorkers::Supervise() {
  size_t alive = pids_.size();
  while (alive > 0) {
    int status = 0;
    const pid_t pid = waitpid(-1, &status, 0);
    if (pid < 0) {
      if (errno == EINTR) continue;
      if (errno == ECHILD) return;
      continue;
    }
    auto it = std::find(pids_.begin(), pids_.end(), pid);
    if (it == pids_.end()) continue;  // not one of ours
    --alive;
    bool stopping;
    {
      absl::MutexLock lock(&mu_);
      stopping = stopping_;
    }
    if (!stopping && on_exit_) on_exit_(static_cast<int>(it - pids_.begin()), pid, ExitDescription(status));
  }
}

LocalWorkers::~LocalWorkers() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  for (pid_t p : pids_) kill(p, SIGTERM);
  // Give them a moment, then make sure.
  for (int i = 0; i < 50; ++i) {
    bool any = false;
    for (pid_t p : pids_) any |= kill(p, 0) == 0;
    if (!any) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  for (pid_t p : pids_) kill(p, SIGKILL);
  if (supervisor_.joinable()) supervisor_.join();
}

}  // namespace lorc
