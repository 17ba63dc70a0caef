// Workers that join the coordinator (`lorcserve worker --join`, or the LeaderWorkerSet
// environment) instead of being listed in `--workers`: JoinRegistry is the bookkeeping of which
// rank is held by which worker process, WorkerJoinService serves it as
// lorcserve.internal.WorkerJoin on the coordinator's internal port (proto/.../join.proto).
//
// The group has `tensor_parallel_size` ranks; the first `num_local` are the coordinator's own
// `--local-workers` and never join; ranks [num_local, tensor_parallel_size) do. A LeaderWorkerSet
// slot (worker index i >= 1, local device d of N per pod) is rank num_local + (i - 1) * N + d,
// which is i * N + d (worker index times devices per pod, plus the device) when the leader runs N local workers.
//
// Rules (every refusal names the field and both values):
// - a rank outside [0, size), a coordinator-local rank, an LWS group size that makes a
//   different size (num_local + (LWS_GROUP_SIZE - 1) * N), a worker `--tensor-parallel-size`
//   that differs, an empty address: INVALID_ARGUMENT.
// - the same instance again (a heartbeat): OK, nothing changes.
// - a new instance at a held rank: if the holder has another address and still answers
//   (`still_there`), ALREADY_EXISTS naming the holder; else the newcomer replaces it (a restart)
//   and `on_change` is told, so a serving group over the old process is re-formed.
//
// Threads: any (gRPC handlers, the coordinator's monitor); one mutex. `still_there` runs without
// the mutex held (it may block for a ping); `on_change` runs after the mutex is released.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "lorcserve/internal/join.grpc.pb.h"

namespace lorc {

struct JoinedWorker {
  int rank = -1;
  std::string address;   // its Worker service
  uint64_t instance_id = 0;
  std::string hostname;
  absl::Time joined_at;  // of this instance
};

class JoinRegistry {
 public:
  // Whether a worker still answers at `address` (a short ping).
  using StillThereFn = std::function<bool(const std::string& address)>;
  // Rank `rank` has a new holder; `previous` is the replaced one (empty address: first join).
  using ChangeFn = std::function<void(const JoinedWorker& now, const JoinedWorker& previous)>;

  JoinRegistry(int tensor_parallel_size, int num_local, StillThereFn still_there, ChangeFn on_change);

  // Validates and registers `req`; returns the rank it holds.
  absl::StatusOr<int> Join(const lorcserve::internal::JoinRequest& req);

  int size() const { return size_; }
  int num_local() const { return num_local_; }
  bool complete() const;
  // Joining ranks without a holder, ascending.
  std::vector<int> missing() const;
  // Addresses of ranks [num_local, size), "" where missing.
  std::vector<std::string> addresses() const;
  std::vector<JoinedWorker> joined() const;
  // Counts registrations that changed a holder (first joins and replacements).
  uint64_t changes() const;
  // "missing ranks 1, 3 of 4 (joined: rank 2 at host:port)", for the join-timeout error.
  std::string Describe() const;

 private:
  // The rank `req` asks for, or INVALID_ARGUMENT.
  absl::StatusOr<int> RankOf(const lorcserve::internal::JoinRequest& req) const;

  const int size_;
  const int num_local_;
  StillThereFn still_there_;
  ChangeFn on_change_;
  mutable absl::Mutex mu_;
  std::vector<JoinedWorker> slots_ ABSL_GUARDED_BY(mu_);  // index rank - num_local_
  uint64_t changes_ ABSL_GUARDED_BY(mu_) = 0;
};

// lorcserve.internal.WorkerJoin over a JoinRegistry; `coordinator_id` goes back in every answer.
class WorkerJoinService final : public lorcserve::internal::WorkerJoin::Service {
 public:
  WorkerJoinService(JoinRegistry* registry, uint64_t coordinator_id)
      : registry_(registry), coordinator_id_(coordinator_id) {}
  grpc::Status Join(grpc::ServerContext* ctx, const lorcserve::internal::JoinRequest* req,
                    lorcserve::internal::JoinResponse* resp) override;

 private:
  JoinRegistry* registry_;
  const uint64_t coordinator_id_;
};

}  // namespace lorc
