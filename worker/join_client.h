// A worker joining its coordinator (`lorcserve worker --join HOST:PORT`, or from the
// LeaderWorkerSet environment): JoinLoop registers the worker's Worker service address and rank
// with the coordinator's internal WorkerJoin service (proto/lorcserve/internal/join.proto) and
// repeats the call every defaults::kJoinHeartbeatS, so a coordinator that restarted (a new
// coordinator id) learns the worker again; a failed call is retried with a backoff doubling from
// 200 ms to defaults::kJoinMaxBackoffS. A refusal that retrying cannot fix (INVALID_ARGUMENT: bad
// rank, group size mismatch) ends the loop through `on_fatal`.
//
// Threads: one loop thread; the destructor stops and joins it.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <thread>
#include <tuple>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "lorcserve/internal/join.pb.h"

namespace lorc {

// This machine's address on the route to `host_port` (HOST:PORT; HOST a name or an IP): the local
// end of a UDP socket connected there (no packet is sent). Errors name the address.
absl::StatusOr<std::string> LocalAddressTowards(const std::string& host_port);

// The LeaderWorkerSet environment (LWS_LEADER_ADDRESS, LWS_GROUP_SIZE, LWS_WORKER_INDEX), read
// through `getenv` (nullptr when unset).
struct LwsEnv {
  std::string leader_address;  // empty: not under LWS
  int32_t group_size = 0;
  int32_t worker_index = 0;
};
// Errors name the variable; a partial set (LWS_LEADER_ADDRESS without the others) is an error.
absl::StatusOr<LwsEnv> ReadLwsEnv(const std::function<const char*(const char*)>& getenv);

class JoinLoop {
 public:
  using FatalFn = std::function<void(const absl::Status&)>;
  // `coordinator`: the internal port's HOST:PORT; `request`: the worker's registration.
  JoinLoop(std::string coordinator, lorcserve::internal::JoinRequest request, FatalFn on_fatal);
  ~JoinLoop();
  JoinLoop(const JoinLoop&) = delete;
  JoinLoop& operator=(const JoinLoop&) = delete;

 private:
  void Run();

  const std::string coordinator_;
  const lorcserve::internal::JoinRequest request_;
  FatalFn on_fatal_;
  absl::Mutex mu_;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::thread thread_;
};

}  // namespace lorc
