#include "cli/signals.h"

#include <pthread.h>
#include <signal.h>

namespace lorc::cli {
namespace {

sigset_t TerminationSet() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  return set;
}

}  // namespace

void BlockTerminationSignals() {
  signal(SIGPIPE, SIG_IGN);
  const sigset_t set = TerminationSet();
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
}

std::thread WatchTerminationSignals(std::function<void(int)> on_signal) {
  return std::thread([on_signal = std::move(on_signal)] {
    const sigset_t set = TerminationSet();
    int sig = 0;
    sigwait(&set, &sig);
    on_signal(sig);
  });
}

}  // namespace lorc::cli
