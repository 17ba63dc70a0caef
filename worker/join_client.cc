#include "worker/join_client.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <iostream>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/defaults.h"
#include "common/grpc_status.h"
#include "lorcserve/internal/join.grpc.pb.h"
#include "worker/comm/internal_grpc.h"

namespace lorc {

absl::StatusOr<std::string> LocalAddressTowards(const std::string& host_port) {
  const size_t colon = host_port.rfind(':');
  if (colon == std::string::npos || colon == 0) {
    return absl::InvalidArgumentError(absl::StrCat("'", host_port, "' is not HOST:PORT"));
  }
  std::string host = host_port.substr(0, colon);
  if (host.size() > 2 && host.front() == '[' && host.back() == ']') host = host.substr(1, host.size() - 2);
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_DGRAM;
  addrinfo* res = nullptr;
  const int rv = getaddrinfo(host.c_str(), host_port.substr(colon + 1).c_str(), &hints, &res);
  if (rv != 0 || res == nullptr) {
    return absl::UnavailableError(absl::StrCat("cannot resolve '", host, "': ", gai_strerror(rv)));
  }
  absl::Status err = absl::UnavailableError(absl::StrCat("no route to ", host_port));
  for (addrinfo* a = res; a != nullptr; a = a->ai_next) {
    const int fd = socket(a->ai_family, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0) continue;
    sockaddr_storage local{};
    socklen_t len = sizeof(local);
    if (connect(fd, a->ai_addr, a->ai_addrlen) == 0 &&
        getsockname(fd, reinterpret_cast<sockaddr*>(&local), &len) == 0) {
      char buf[INET6_ADDRSTRLEN] = {};
      const void* src = local.ss_family == AF_INET6
                            ? static_cast<const void*>(&reinterpret_cast<sockaddr_in6*>(&local)->sin6_addr)
                            : static_cast<const void*>(&reinterpret_cast<sockaddr_in*>(&local)->sin_addr);
      if (inet_ntop(local.ss_family, src, buf, sizeof(buf)) != nullptr) {
        close(fd);
        freeaddrinfo(res);
        return local.ss_family == AF_INET6 ? absl::StrCat("[", buf, "]") : std::string(buf);
      }
    }
    close(fd);
  }
  freeaddrinfo(res);
  return err;
}

absl::StatusOr<LwsEnv> ReadLwsEnv(const std::function<const char*(const char*)>& getenv) {
  LwsEnv env;
  const char* leader = getenv("LWS_LEADER_ADDRESS");
  if (leader == nullptr || *leader == '\0') return env;
  env.leader_address = leader;
  for (auto [name, out, lo] : {std::tuple<const char*, int32_t*, int32_t>{"LWS_GROUP_SIZE", &env.group_size, 1},
                               {"LWS_WORKER_INDEX", &env.worker_index, 0}}) {
    const char* v = getenv(name);
    if (v == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat(name, " is not set (LWS_LEADER_ADDRESS is)"));
    }
    if (!absl::SimpleAtoi(v, out) || *out < lo) {
      return absl::InvalidArgumentError(absl::StrCat(name, ": '", v, "' is not an integer >= ", lo));
    }
  }
  if (env.worker_index >= env.group_size) {
    return absl::InvalidArgumentError(absl::StrCat("LWS_WORKER_INDEX ", env.worker_index,
                                                   " is not below LWS_GROUP_SIZE ", env.group_size));
  }
  return env;
}

JoinLoop::JoinLoop(std::string coordinator, lorcserve::internal::JoinRequest request, FatalFn on_fatal)
    : coordinator_(std::move(coordinator)), request_(std::move(request)), on_fatal_(std::move(on_fatal)) {
  thread_ = std::thread([this] { Run(); });
}

JoinLoop::~JoinLoop() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  thread_.join();
}

void JoinLoop::Run() {
  auto stub = lorcserve::internal::WorkerJoin::NewStub(InternalChannel(coordinator_));
  const absl::Duration heartbeat = absl::Seconds(defaults::kJoinHeartbeatS);
  const absl::Duration max_backoff = absl::Seconds(defaults::kJoinMaxBackoffS);
  absl::Duration backoff = absl::Milliseconds(200);
  uint64_t coordinator_id = 0;
  std::string last_error;
  for (;;) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    lorcserve::internal::JoinResponse resp;
    const absl::Status s = FromGrpcStatus(stub->Join(&ctx, request_, &resp));
    absl::Duration wait = heartbeat;
    if (s.ok()) {
      backoff = absl::Milliseconds(200);
      last_error.clear();
      if (resp.coordinator_id() != coordinator_id) {
        coordinator_id = resp.coordinator_id();
        std::cerr << absl::StrCat("lorcserve worker: joined the coordinator at ", coordinator_, " as rank ",
                                  resp.rank(), " of ", resp.tensor_parallel_size(), " (", resp.missing_ranks(),
                                  " still missing)\n");
      }
    } else if (s.code() == absl::StatusCode::kInvalidArgument) {
      const absl::Status fatal(s.code(), absl::StrCat("the coordinator at ", coordinator_,
                                                      " refused the join: ", s.message()));
      if (on_fatal_) on_fatal_(fatal);
      return;
    } else {
      // Unreachable, restarting, or the rank is held by a live worker: retry.
      std::string msg(s.message());
      // A certificate that expired since start fails every new handshake.
      if (const absl::Status own = InternalCertificateValidNow(); !own.ok()) {
        absl::StrAppend(&msg, "; this worker's ", own.message(), ": restart it with a renewed one");
      }
      if (msg != last_error) {
        std::cerr << absl::StrCat("lorcserve worker: join ", coordinator_, ": ", msg, " (retrying)\n");
        last_error = msg;
      }
      wait = backoff;
      backoff = std::min(backoff * 2, max_backoff);
    }
    absl::MutexLock lock(&mu_);
    auto stop = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return stopping_; };
    if (mu_.AwaitWithTimeout(absl::Condition(&stop), wait)) return;
  }
}

}  // namespace lorc
