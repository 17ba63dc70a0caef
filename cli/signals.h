// SIGINT/SIGTERM handling for the long-running subcommands. A handler (installed for the whole
// process, so whichever thread the kernel picks is fine) writes the signal number to a pipe;
// a watcher thread reads it and runs the shutdown callback once. SIGPIPE is ignored.
#pragma once

#include <functional>
#include <thread>

namespace lorc::cli {

// Installs the handlers and blocks SIGINT/SIGTERM in the calling thread, so that only a watcher
// thread takes them. Call once, early: on the main thread before it starts any other thread.
void InstallTerminationHandlers();
// "SIGTERM", "SIGINT", or "a termination signal" for another number (log lines).
const char* TerminationSignalName(int sig);

// A thread that waits for SIGINT/SIGTERM and then calls `on_signal` once (with `every_signal`:
// for each signal, until the watcher is destroyed). The destructor stops it and joins it, so
// `on_signal` never runs after the watcher is gone: destroy the watcher before whatever the
// callback uses. One watcher at a time per process.
class TerminationSignalWatcher {
 public:
  explicit TerminationSignalWatcher(std::function<void(int)> on_signal, bool every_signal = false);
  ~TerminationSignalWatcher();
  TerminationSignalWatcher(const TerminationSignalWatcher&) = delete;
  TerminationSignalWatcher& operator=(const TerminationSignalWatcher&) = delete;

 private:
  std::thread thread_;
};

}  // namespace lorc::cli
