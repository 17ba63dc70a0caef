// SIGINT/SIGTERM handling for the long-running subcommands: block the signals in every thread
// (call first thing in the command, before any thread exists), then wait for one on a
// dedicated thread and run a shutdown callback.
#pragma once

#include <functional>
#include <thread>

namespace lorc::cli {

void BlockTerminationSignals();
// Starts a thread that waits for SIGINT/SIGTERM and then calls `on_signal` once.
std::thread WatchTerminationSignals(std::function<void(int)> on_signal);

}  // namespace lorc::cli
