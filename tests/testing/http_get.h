// A blocking HTTP/1.1 GET for tests (the /metrics endpoint), and a parser for the Prometheus text
// exposition it returns. Test-only header.
#pragma once

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <map>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace lorc::testing {

struct HttpResponse {
  int status = 0;
  std::string body;
};

// GET `path` from 127.0.0.1:`port` (5 s socket timeouts; the server closes the connection).
inline absl::StatusOr<HttpResponse> HttpGet(int port, const std::string& path,
                                            const std::string& method = "GET") {
  const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return absl::InternalError(absl::StrCat("socket: ", std::strerror(errno)));
  timeval tv{5, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    const std::string why = std::strerror(errno);
    close(fd);
    return absl::UnavailableError(absl::StrCat("connect 127.0.0.1:", port, ": ", why));
  }
  const std::string req =
      absl::StrCat(method, " ", path, " HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
  if (send(fd, req.data(), req.size(), MSG_NOSIGNAL) != static_cast<ssize_t>(req.size())) {
    close(fd);
    return absl::UnavailableError("send failed");
  }
  std::string raw;
  char buf[4096];
  for (;;) {
    const ssize_t n = recv(fd, buf, sizeof(buf), 0);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    raw.append(buf, static_cast<size_t>(n));
  }
  close(fd);
  const size_t head_end = raw.find("\r\n\r\n");
  if (raw.rfind("HTTP/1.1 ", 0) != 0 || head_end == std::string::npos) {
    return absl::DataLossError(absl::StrCat("not an HTTP response: '", raw.substr(0, 80), "'"));
  }
  HttpResponse r;
  if (!absl::SimpleAtoi(raw.substr(9, 3), &r.status)) return absl::DataLossError("bad status line");
  r.body = raw.substr(head_end + 4);
  return r;
}

// Text exposition -> {series: value}, the series as printed ("name" or `name{label="v",...}`).
inline std::map<std::string, double> ParseExposition(const std::string& text) {
  std::map<std::string, double> out;
  for (absl::string_view line : absl::StrSplit(text, '\n', absl::SkipEmpty())) {
    if (line.front() == '#') continue;
    const size_t sp = line.rfind(' ');
    if (sp == absl::string_view::npos) continue;
    double v = 0;
    const std::string value(line.substr(sp + 1));
    if (value == "+Inf") {
      v = HUGE_VAL;
    } else if (!absl::SimpleAtod(value, &v)) {
      continue;
    }
    out[std::string(line.substr(0, sp))] = v;
  }
  return out;
}

}  // namespace lorc::testing
