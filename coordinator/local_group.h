// A tensor-parallel worker group on this machine for an engine in the calling process (no
// public server): N `lorcserve worker` processes (LocalWorkers, one per GPU), a loopback gRPC
// server hosting the Rendezvous service they join through, and the WorkerGroup (a StepRunner)
// over them. The same pieces, in the same order, as CoordinatorServer::StartWorkers and
// JoinGroup, without health, the public API or recovery: a worker that exits fails the group
// (every later step returns UNAVAILABLE naming it) and stays failed.
// Used by `lorcserve bench --model DIR --local-workers N`.
//
// Threads: the owner (Start, group(), failure(), the destructor); the local-worker supervisor
// (its exit callback fails the group under mu_).
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "coordinator/local_workers.h"
#include "coordinator/worker_group.h"
#include "grpcpp/grpcpp.h"
#include "kvstore/kv_spec.h"
#include "model/model_source.h"
#include "worker/comm/grpc_rendezvous.h"

namespace lorc {

struct LocalGroupOptions {
  LocalWorkersOptions workers;  // count = the tensor-parallel size; backend, devices, threads
  ModelSource model;            // every worker loads its shard of it
  KvCacheOptions kv;            // per worker
  bool disable_custom_all_reduce = false;  // CUDA: NCCL for every all-reduce
  absl::Duration join_timeout = absl::Seconds(60);
  absl::Duration step_timeout = absl::Minutes(5);
};

class LocalGroup {
 public:
  // Starts the rendezvous server on 127.0.0.1 (port picked by the system), the workers, and
  // has them join one communicator and load the model. Errors: a worker that cannot start or
  // exits ("worker R: ..."), or whose join or load fails (its status, naming the worker).
  // Nothing started is left running when this fails.
  static absl::StatusOr<std::unique_ptr<LocalGroup>> Start(const LocalGroupOptions& options);
  // Closes the step streams, then ends the workers (SIGTERM, SIGKILL after 5 s; all reaped),
  // then the rendezvous server.
  ~LocalGroup();
  LocalGroup(const LocalGroup&) = delete;
  LocalGroup& operator=(const LocalGroup&) = delete;

  WorkerGroup& group() { return *group_; }
  int size() const { return group_->size(); }
  // OK while every worker process runs; else UNAVAILABLE naming the first one that exited.
  absl::Status failure() const;

 private:
  LocalGroup() = default;
  void OnExit(int rank, pid_t pid, const std::string& how);

  RendezvousService rendezvous_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<LocalWorkers> workers_;
  std::unique_ptr<WorkerGroup> group_;
  mutable absl::Mutex mu_;
  WorkerGroup* live_group_ ABSL_GUARDED_BY(mu_) = nullptr;  // group_ while it may be failed
  absl::Status failure_ ABSL_GUARDED_BY(mu_);
};

}  // namespace lorc
