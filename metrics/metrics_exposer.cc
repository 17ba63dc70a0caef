#include "metrics/metrics_exposer.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "prometheus/registry.h"
#include "prometheus/text_serializer.h"

namespace lorc {
namespace {

using Clock = std::chrono::steady_clock;

constexpr size_t kMaxRequestHead = 8192;
constexpr int kPollMs = 100;  // how often the thread looks at stop_ when nothing happens

std::string Response(const std::string& status, const std::string& content_type,
                     const std::string& body) {
  return absl::StrCat("HTTP/1.1 ", status, "\r\nContent-Type: ", content_type,
                      "\r\nContent-Length: ", body.size(), "\r\nConnection: close\r\n\r\n", body);
}

// "[::1]" -> "::1"; anything else unchanged.
std::string StripBrackets(const std::string& host) {
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') return host.substr(1, host.size() - 2);
  return host;
}

}  // namespace

struct MetricsExposer::Connection {
  int fd = -1;
  Clock::time_point deadline;
  std::string in;
  std::string out;
  size_t sent = 0;
  bool writing = false;
};

absl::StatusOr<std::unique_ptr<MetricsExposer>> MetricsExposer::Start(
    const std::string& host, int port, std::shared_ptr<prometheus::Registry> registry) {
  if (port < 0 || port > 65535) {
    return absl::InvalidArgumentError(absl::StrCat("--metrics-port must be in [0, 65535], got ", port));
  }
  const std::string name = StripBrackets(host);
  if (name.empty()) return absl::InvalidArgumentError("--metrics-host: empty (give an address, e.g. 0.0.0.0)");
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE;
  addrinfo* found = nullptr;
  if (const int rc = getaddrinfo(name.c_str(), nullptr, &hints, &found); rc != 0 || found == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat("--metrics-host: cannot resolve '", host, "': ", gai_strerror(rc)));
  }
  sockaddr_storage addr{};
  socklen_t addr_len = static_cast<socklen_t>(found->ai_addrlen);
  std::memcpy(&addr, found->ai_addr, found->ai_addrlen);
  const int family = found->ai_family;
  freeaddrinfo(found);
  if (family == AF_INET) {
    reinterpret_cast<sockaddr_in*>(&addr)->sin_port = htons(static_cast<uint16_t>(port));
  } else if (family == AF_INET6) {
    reinterpret_cast<sockaddr_in6*>(&addr)->sin6_port = htons(static_cast<uint16_t>(port));
  } else {
    return absl::InvalidArgumentError(absl::StrCat("--metrics-host: '", host, "' is not an IP address"));
  }
  const std::string where = absl::StrCat(family == AF_INET6 ? "[" + name + "]" : name, ":", port);

  std::unique_ptr<MetricsExposer> e(new MetricsExposer());
  e->registry_ = std::move(registry);
  e->listen_fd_ = socket(family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (e->listen_fd_ < 0) {
    return absl::UnavailableError(absl::StrCat("--metrics-port: socket: ", std::strerror(errno)));
  }
  const int one = 1;
  setsockopt(e->listen_fd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  if (bind(e->listen_fd_, reinterpret_cast<sockaddr*>(&addr), addr_len) != 0 ||
      listen(e->listen_fd_, SOMAXCONN) != 0) {
    const int err = errno;
    // An address this machine does not have is the host's fault; anything else the port's.
    return absl::UnavailableError(absl::StrCat(err == EADDRNOTAVAIL ? "--metrics-host" : "--metrics-port",
                                               ": cannot listen on ", where, ": ", std::strerror(err)));
  }
  addr_len = sizeof(addr);
  if (getsockname(e->listen_fd_, reinterpret_cast<sockaddr*>(&addr), &addr_len) != 0) {
    return absl::UnavailableError(absl::StrCat("--metrics-port: getsockname: ", std::strerror(errno)));
  }
  char text[INET6_ADDRSTRLEN] = {};
  if (family == AF_INET) {
    const auto* a = reinterpret_cast<const sockaddr_in*>(&addr);
    inet_ntop(AF_INET, &a->sin_addr, text, sizeof(text));
    e->host_ = text;
    e->port_ = ntohs(a->sin_port);
  } else {
    const auto* a = reinterpret_cast<const sockaddr_in6*>(&addr);
    inet_ntop(AF_INET6, &a->sin6_addr, text, sizeof(text));
    e->host_ = absl::StrCat("[", text, "]");
    e->port_ = ntohs(a->sin6_port);
  }
  e->thread_ = std::thread([p = e.get()] { p->Serve(); });
  return e;
}

MetricsExposer::~MetricsExposer() {
  stop_ = true;
  if (thread_.joinable()) thread_.join();
  if (listen_fd_ >= 0) close(listen_fd_);
}

std::string MetricsExposer::address() const { return absl::StrCat(host_, ":", port_); }

void MetricsExposer::Serve() {
  std::vector<Connection> conns;  // oldest first
  std::vector<pollfd> fds;
  auto finish = [](Connection& c) {
    shutdown(c.fd, SHUT_WR);
    close(c.fd);
    c.fd = -1;
  };
  // Sends what the socket takes now; closes the connection once the response is out or the
  // peer is gone.
  auto send_some = [&](Connection& c) {
    while (c.sent < c.out.size()) {
      const ssize_t n = send(c.fd, c.out.data() + c.sent, c.out.size() - c.sent, MSG_NOSIGNAL | MSG_DONTWAIT);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
      if (n <= 0) break;
      c.sent += static_cast<size_t>(n);
    }
    finish(c);
  };
  while (!stop_) {
    // Past the deadline: a best-effort 408 to a request still arriving, then closed.
    const Clock::time_point now = Clock::now();
    for (Connection& c : conns) {
      if (now < c.deadline) continue;
      if (!c.writing) {
        const std::string r = Response(
            "408 Request Timeout", "text/plain",
            absl::StrCat("the request did not arrive within ", kConnectionDeadline.count(), " ms\n"));
        (void)!send(c.fd, r.data(), r.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
      }
      finish(c);
    }
    std::erase_if(conns, [](const Connection& c) { return c.fd < 0; });

    fds.clear();
    fds.push_back({listen_fd_, POLLIN, 0});
    int timeout_ms = kPollMs;
    for (const Connection& c : conns) {
      fds.push_back({c.fd, static_cast<short>(c.writing ? POLLOUT : POLLIN), 0});
      const auto left = std::chrono::ceil<std::chrono::milliseconds>(c.deadline - now).count();
      timeout_ms = std::min<int>(timeout_ms, static_cast<int>(std::max<int64_t>(0, left)));
    }
    if (poll(fds.data(), fds.size(), timeout_ms) <= 0) continue;  // timeout (deadlines, stop_) or EINTR

    for (size_t i = 0; i < conns.size(); ++i) {
      Connection& c = conns[i];
      const short revents = fds[i + 1].revents;
      if (revents == 0) continue;
      if (c.writing) {
        send_some(c);
        continue;
      }
      bool eof = (revents & (POLLERR | POLLNVAL)) != 0;
      char buf[4096];
      while (!eof && c.in.size() < kMaxRequestHead) {
        const ssize_t n = recv(c.fd, buf, sizeof(buf), MSG_DONTWAIT);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
        if (n <= 0) {
          eof = true;  // closed (or half-closed) by the peer, or an error: answer what came
          break;
        }
        c.in.append(buf, static_cast<size_t>(n));
        if (absl::StrContains(c.in, "\r\n\r\n")) break;
      }
      if (eof || c.in.size() >= kMaxRequestHead || absl::StrContains(c.in, "\r\n\r\n")) {
        c.out = Answer(c.in);
        c.writing = true;
        send_some(c);
      }
    }
    std::erase_if(conns, [](const Connection& c) { return c.fd < 0; });

    if ((fds[0].revents & POLLIN) != 0) {
      for (;;) {
        const int fd = accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
        if (fd < 0) break;  // EAGAIN: none left (or an error on one connection: the next poll)
        if (static_cast<int>(conns.size()) >= kMaxConnections) {
          finish(conns.front());  // the oldest: the nearest to its deadline anyway
          conns.erase(conns.begin());
        }
        Connection c;
        c.fd = fd;
        c.deadline = Clock::now() + kConnectionDeadline;
        conns.push_back(std::move(c));
      }
    }
  }
  for (Connection& c : conns) close(c.fd);
}

std::string MetricsExposer::Answer(const std::string& head) const {
  // Request line: METHOD SP TARGET SP VERSION.
  const size_t eol = head.find("\r\n");
  const std::string line = head.substr(0, eol);
  const size_t sp1 = line.find(' ');
  const size_t sp2 = sp1 == std::string::npos ? std::string::npos : line.find(' ', sp1 + 1);
  if (sp2 == std::string::npos) return Response("400 Bad Request", "text/plain", "bad request\n");
  const std::string method = line.substr(0, sp1);
  std::string target = line.substr(sp1 + 1, sp2 - sp1 - 1);
  target = target.substr(0, target.find('?'));
  if (target != "/metrics") return Response("404 Not Found", "text/plain", "not found: try /metrics\n");
  if (method != "GET" && method != "HEAD") return Response("405 Method Not Allowed", "text/plain", "only GET\n");
  const std::string body = prometheus::TextSerializer().Serialize(registry_->Collect());
  std::string resp = Response("200 OK", "text/plain; version=0.0.4; charset=utf-8", body);
  if (method == "HEAD") resp.resize(resp.size() - body.size());
  return resp;
}

}  // namespace lorc
