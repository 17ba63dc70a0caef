#include "cli/signals.h"

#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <cerrno>

namespace lorc::cli {
namespace {

int g_pipe[2] = {-1, -1};

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
}

// Byte 0 on the pipe (no signal has number 0): the watcher's destructor asking it to stop.
constexpr unsigned char kStop = 0;

TerminationSignalWatcher::TerminationSignalWatcher(std::function<void(int)> on_signal,
                                                   bool every_signal) {
  if (g_pipe[0] < 0) return;  // InstallTerminationHandlers failed or was not called
  thread_ = std::thread([on_signal = std::move(on_signal), every_signal] {
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
