// Worker processes started and supervised by the coordinator (`--local-workers N`): each is
// `lorcserve worker --listen 127.0.0.1:0 ...`, which prints the address it bound. A worker that
// exits is reported through the callback with its rank, pid and exit status, and can be
// started again with Restart(rank) (the coordinator's recovery path).
// Threads: one supervisor thread (waitpid on the children; runs the callback); Restart and the
// accessors from any thread (they take the mutex).
#pragma once

#include <sys/types.h>

#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"

namespace lorc {

struct LocalWorkersOptions {
  int count = 1;
  std::string binary;        // the lorcserve executable (default: /proc/self/exe)
  std::string backend = "cpu";
  int threads_per_worker = 0;  // CPU backend BLAS threads; 0: cores / count
  int first_device = 0;        // CUDA: worker r uses device first_device + r
  // Each worker's --listen. Loopback for a group on this host alone; a mixed group (ranks joined
  // from other hosts) switches to kAllInterfaces, since those hosts must reach the communicator.
  static constexpr const char* kLoopback = "127.0.0.1:0";
  static constexpr const char* kAllInterfaces = "0.0.0.0:0";
  std::string listen = kLoopback;
  // More flags for worker r (e.g. `--join ADDR --rank R`); may be empty.
  std::function<std::vector<std::string>(int r)> extra_args;
};

class LocalWorkers {
 public:
  using ExitFn = std::function<void(int rank, pid_t pid, const std::string& how)>;
  static absl::StatusOr<std::unique_ptr<LocalWorkers>> Start(const LocalWorkersOptions& options,
                                                             ExitFn on_exit);
  // Terminates the children: SIGTERM, then SIGKILL (logged on stderr) to those still running 5 s
  // later; returns once all are reaped.
  ~LocalWorkers();

  // Rank order. A restarted rank has a new address and pid.
  std::vector<std::string> addresses() const;
  std::vector<pid_t> pids() const;
  // Ranks whose process has exited (reported through the callback) and not been restarted.
  std::vector<int> exited() const;
  // exited(), waiting up to `timeout` for at least one rank to exit (a step that saw a worker
  // vanish can be ahead of the supervisor reaping it).
  std::vector<int> WaitForExit(absl::Duration timeout) const;
  // Kills rank `rank` (SIGKILL; also a stopped or hung process) if it is running; the
  // supervisor then reports its exit like any other. False when it was not running.
  bool Kill(int rank);
  // Starts rank `rank` again (after it exited); returns once it printed its new address.
  // FAILED_PRECONDITION while that rank's process is still running.
  absl::Status Restart(int rank);

 private:
  LocalWorkers() = default;
  void Supervise();
  // Spawns rank `r` and waits for its address.
  absl::Status Spawn(int r);

  LocalWorkersOptions options_;
  std::string binary_;
  int threads_ = 1;
  ExitFn on_exit_;
  mutable absl::Mutex mu_;
  std::vector<std::string> addresses_ ABSL_GUARDED_BY(mu_);
  std::vector<pid_t> pids_ ABSL_GUARDED_BY(mu_);     // -1: exited
  int alive_ ABSL_GUARDED_BY(mu_) = 0;              // spawned and not yet reaped
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::thread supervisor_;
};

}  // namespace lorc
