// SIGINT/SIGTERM handling for the long-running subcommands. A handler (installed for the whole
// process, so whichever thread the kernel picks is fine) writes the signal number to a pipe;
// a watcher thread reads it and runs the shutdown callback once. SIGPIPE is ignored.
#pragma once

#include <functional>
#include <thread>

namespace lorc::cli {

// Installs the handlers. Call once, early.
void InstallTerminationHandlers();
// Starts a thread that waits for SIGINT/SIGTERM and then calls `on_signal` once.
std::thread WatchTerminationSignals(std::function<void(int)> on_signal);

}  // namespace lorc::cli
