// The HTTP endpoint Prometheus scrapes: `GET /metrics` on 0.0.0.0:PORT, answering with the text
// exposition (format 0.0.4) of a prometheus-cpp registry; any other path is 404, any other
// method 405. Only the process that serves (cli/cmd_coordinator.cc) links this.
//
// Why not prometheus-cpp's pull Exposer: its civetweb server creates its threads with a fixed
// 100 KiB stack (Debian's civetweb 1.15), smaller than the static TLS this binary had when the
// CUDA libraries were linked (cublasLt ~92 KiB + OpenBLAS 60 KiB; cuBLASLt is now loaded at first use),
// so pthread_create failed with EINVAL ("null context when constructing CivetServer"). Scrapes are rare and small: one thread serving
// one connection at a time (2 s socket timeouts, `Connection: close`) is enough.
//
// Threads: one serving thread, started by Start and joined by the destructor; it reads the
// registry (prometheus-cpp's atomics) while the serving threads update it.
#pragma once

#include <atomic>
#include <memory>
#include <string>
#include <thread>

#include "absl/status/statusor.h"

namespace prometheus {
class Registry;
}  // namespace prometheus

namespace lorc {

class MetricsExposer {
 public:
  // Listens on 0.0.0.0:`port` (0: the kernel picks one) and serves `registry` at /metrics.
  // INVALID_ARGUMENT for a port outside [0, 65535]; UNAVAILABLE when it cannot listen (in use).
  static absl::StatusOr<std::unique_ptr<MetricsExposer>> Start(
      int port, std::shared_ptr<prometheus::Registry> registry);
  ~MetricsExposer();  // stops listening, joins the thread
  MetricsExposer(const MetricsExposer&) = delete;
  MetricsExposer& operator=(const MetricsExposer&) = delete;

  int port() const { return port_; }
  std::string address() const;  // "0.0.0.0:<port>"

 private:
  MetricsExposer() = default;
  void Serve();
  void Answer(int fd);

  std::shared_ptr<prometheus::Registry> registry_;
  int listen_fd_ = -1;
  int port_ = 0;
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

}  // namespace lorc
