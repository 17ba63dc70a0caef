// Worker processes started and supervised by the coordinator (`--local-workers N`): each is
// `lorcserve worker --listen 127.0.0.1:0 ...`, which prints the address it bound. A worker that
// exits is reported through the callback with its rank, pid and exit status.
// Threads: one supervisor thread (waitpid on the children).
#pragma once

#include <sys/types.h>

#include <functional>
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
};

class LocalWorkers {
 public:
  using ExitFn = std::function<void(int rank, pid_t pid, const std::string& how)>;
  static absl::StatusOr<std::unique_ptr<LocalWorkers>> Start(const LocalWorkersOptions& options,
                                                             ExitFn on_exit);
  ~LocalWorkers();  // terminates the children (SIGTERM, then SIGKILL)

  const std::vector<std::string>& addresses() const { return addresses_; }
  const std::vector<pid_t>& pids() const { return pids_; }

 private:
  LocalWorkers() = default;
  void Supervise();

  std::vector<std::string> addresses_;
  std::vector<pid_t> pids_;
  ExitFn on_exit_;
  absl::Mutex mu_;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::thread supervisor_;
};

}  // namespace lorc
