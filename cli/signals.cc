#include "cli/signals.h"

#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <unistd.h>

#include <cerrno>

namespace lorc::cli {
namespace {

int g_pipe[2] = {-1, -1};

sigset_t TerminationSignals() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  return set;
}

void OnSignal(int sig) {
  const int saved = errno;
  const unsigned char b = static_cast<unsigned char>(sig);
  (void)!write(g_pipe[1], &b, 1);
  errno = saved;
}

}  // namespace

void InstallTerminationHandlers() {
  signal(SIGPIPE, SIG_IGN);
  if (g_pipe[0] >= 0) return;
  if (pipe2(g_pipe, O_CLOEXEC) != 0) return;
  struct sigaction sa = {};
  sa.sa_handler = OnSignal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGTERM, &sa, nullptr);
  // Only a watcher thread takes SIGINT/SIGTERM: they are blocked here, in the calling thread
  // (every thread it starts later inherits the mask), and unblocked by the watcher, so the kernel
  // delivers them to it. Any thread would do in an ordinary build, but ThreadSanitizer defers a
  // signal that lands on a thread blocked in a call it does not intercept (abseil's futex wait
  // inside the uninstrumented library, where the main thread spends its life in Server::Wait)
  // until that thread wakes: the coordinator ignored SIGTERM in the TSan build. The watcher
  // waits in read(), which TSan intercepts, so the handler runs at once. While no watcher runs
  // a signal stays pending (as it stayed unread in the pipe before); children started with
  // posix_spawn get an empty mask back (coordinator/local_workers.cc).
  const sigset_t set = TerminationSignals();
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
}

const char* TerminationSignalName(int sig) {
  switch (sig) {
    case SIGTERM: return "SIGTERM";
    case SIGINT: return "SIGINT";
    default: return "a termination signal";
  }
}

// Byte 0 on the pipe (no signal has number 0): the watcher's destructor asking it to stop.
constexpr unsigned char kStop = 0;

TerminationSignalWatcher::TerminationSignalWatcher(std::function<void(int)> on_signal,
                                                   bool every_signal) {
  if (g_pipe[0] < 0) return;  // InstallTerminationHandlers failed or was not called
  thread_ = std::thread([on_signal = std::move(on_signal), every_signal] {
    const sigset_t set = TerminationSignals();
    pthread_sigmask(SIG_UNBLOCK, &set, nullptr);  // the one thread that takes them
    for (;;) {
      unsigned char b = 0;
      const ssize_t n = read(g_pipe[0], &b, 1);
      if (n < 0 && errno == EINTR) continue;
      if (n != 1 || b == kStop) return;
      on_signal(b);
      if (!every_signal) return;
    }
  });
}

TerminationSignalWatcher::~TerminationSignalWatcher() {
  if (!thread_.joinable()) return;
  // A no-op when a signal already woke the thread (it has returned or is returning).
  (void)!write(g_pipe[1], &kStop, 1);
  thread_.join();
}

}  // namespace lorc::cli
