// The HTTP endpoint Prometheus scrapes: `GET /metrics` on HOST:PORT (`--metrics-host`, default
// defaults::kMetricsHost = 0.0.0.0, and `--metrics-port`), answering with the text exposition
// (format 0.0.4) of a prometheus-cpp registry; any other path is 404, any other method 405. Only
// the process that serves (cli/cmd_coordinator.cc) links this.
//
// Why not prometheus-cpp's pull Exposer: its civetweb server creates its threads with a fixed
// 100 KiB stack (Debian's civetweb 1.15), smaller than the static TLS this binary had when the
// CUDA libraries were linked (cublasLt ~92 KiB + OpenBLAS 60 KiB; cuBLASLt is now loaded at first use),
// so pthread_create failed with EINVAL ("null context when constructing CivetServer").
//
// Connections: one thread multiplexes up to kMaxConnections open connections with poll(), each
// with non-blocking I/O and a total deadline (kConnectionDeadline from its accept, monotonic
// clock) for reading the whole request head and writing the whole response; a connection past
// it gets a best-effort 408 and is closed. A new connection beyond the cap closes the oldest. So
// idle or slow clients (one header line a second, a tester's slowloris) delay no scrape: before
// this, one connection was served at a time with a 2 s timeout per read, and one such client
// held every scrape for 20 s. `Connection: close`: one request per connection.
//
// Threads: one serving thread, started by Start and joined by the destructor; it reads the
// registry (prometheus-cpp's atomics) while the serving threads update it.
#pragma once

#include <atomic>
#include <chrono>
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
  // Connections open at once, at most (beyond it the oldest is closed).
  static constexpr int kMaxConnections = 64;
  // From accept to the response's last byte.
  static constexpr std::chrono::milliseconds kConnectionDeadline{2000};

  // Listens on `host`:`port` and serves `registry` at /metrics. `host`: an IPv4 or IPv6 address
  // (brackets optional) or a name that resolves to one (the first address); `port` 0: the kernel
  // picks one. INVALID_ARGUMENT for a port outside [0, 65535] (naming --metrics-port) or a host
  // that does not resolve (naming --metrics-host); UNAVAILABLE when it cannot listen: naming
  // --metrics-port for a port in use, --metrics-host for an address not of this machine.
  static absl::StatusOr<std::unique_ptr<MetricsExposer>> Start(
      const std::string& host, int port, std::shared_ptr<prometheus::Registry> registry);
  ~MetricsExposer();  // stops listening, closes the open connections, joins the thread
  MetricsExposer(const MetricsExposer&) = delete;
  MetricsExposer& operator=(const MetricsExposer&) = delete;

  int port() const { return port_; }
  std::string address() const;  // "host:port" as bound ("[::1]:9090" for IPv6)

 private:
  struct Connection;
  MetricsExposer() = default;
  void Serve();
  // The whole response to a request head (or to what arrived of it).
  std::string Answer(const std::string& head) const;

  std::shared_ptr<prometheus::Registry> registry_;
  int listen_fd_ = -1;
  int port_ = 0;
  std::string host_;  // as printed: IPv6 in brackets
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

}  // namespace lorc
