// The coordinator's handle on its tensor-parallel workers: connects, has them join one
// communicator group (through the coordinator's Rendezvous service) and load their shards,
// then runs every StepPlan on all of them and returns rank 0's result.
//
// Steps go over one bidirectional stream per worker (default; up to 2 plans in flight, so a
// worker finds its next plan queued when it finishes a step) or one unary call per step per
// worker (synchronous; kept for measurement). A worker that dies, closes its stream (a step that
// failed as a whole ends it with that status) or misses the step deadline breaks the group: that
// call and every later one return UNAVAILABLE naming the worker.
// A worker that serves another coordinator refuses every call with FAILED_PRECONDITION naming
// that coordinator: Start fails with it.
// Start blocks while the workers connect, form the communicator and load the model (minutes for
// a large model); WorkerGroupOptions::cancelled ends that wait early (a signal during the load).
// Threads: Submit/Await are called by the engine thread only; one reader thread per worker stream.
#pragma once

#include <atomic>
#include <deque>
#include <functional>
#include <future>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "grpcpp/security/credentials.h"
#include "lorcserve/internal/worker.grpc.pb.h"
#include "kvstore/kv_spec.h"
#include "model/model_source.h"
#include "step/step.h"

namespace lorc {

struct WorkerGroupOptions {
  std::vector<std::string> addresses;  // rank order
  std::string rendezvous_address;      // the coordinator's Rendezvous service, as workers reach it
  // Names this coordinator on every worker call (a worker serves one coordinator at a time;
  // worker/ownership.h); keep it across group restarts. 0: a random one is drawn at Start.
  uint64_t coordinator_id = 0;
  // How workers name this coordinator in their logs and refusals (CoordinatorId.address): its
  // internal port as other hosts know it; empty: rendezvous_address (which is loopback for a
  // coordinator's local workers, misleading in a joined worker's log on another host).
  std::string coordinator_address;
  std::string bind_address = "127.0.0.1";  // Gloo: the address workers listen on
  ModelSource model;
  KvCacheOptions kv;
  bool use_stream = true;
  bool disable_custom_all_reduce = false;  // CUDA workers: NCCL for every all-reduce
  absl::Duration connect_timeout = absl::Seconds(60);
  absl::Duration join_timeout = absl::Seconds(60);
  absl::Duration load_timeout = absl::Minutes(30);
  absl::Duration step_timeout = absl::Minutes(5);
  // How long Start waits for a worker that a Ping names as serving another coordinator (one that
  // died during its setup, or hung: the worker frees itself after its --owner-lease-s) before it
  // sends the setup calls, which then fail naming the owner. 0: no wait. The coordinator waits
  // its --join-timeout-s when it starts (a supervisor's restart right after a crash was refused,
  // exit 1, until the lease ran out: a tester).
  absl::Duration owner_wait = absl::ZeroDuration();
  // May be empty. Polled every 100 ms while Start waits (a worker's connection, the
  // communicator, the load); once it returns true, Start cancels its calls to the workers (a
  // worker may go on loading: its LoadModel call is cancelled, not the work) and returns
  // CANCELLED. Called from the thread that runs Start.
  std::function<bool()> cancelled;
};

struct WorkerGroupInfo {
  int32_t num_blocks = 0;         // the smallest over the workers
  // Host KV tier slots (--kv-offloading-size; kvstore/host_kv_pool.h's capacity), the smallest
  // over the workers (they agree unless misconfigured); 0: no host tier.
  int32_t num_host_blocks = 0;
  int64_t kv_bytes_per_token = 0; // per rank
  // Positions the device-resident KV policy states may hold together (kvpolicy/state_memory.h),
  // the smallest over the workers; 0: no limit (no policy, or host-resident states).
  int64_t kv_policy_max_positions = 0;
  std::string backend, device;
  double load_seconds = 0;        // the slowest worker
  std::string all_reduce;         // rank 0's Communicator::AllReduceDescription (TP > 1)
};

// At a coordinator's exit: tells each worker at `addresses` (HOST:PORT; empty items skipped)
// that coordinator `coordinator_id` gives it up (a Ping with release; worker.proto), so the
// next coordinator can take it at once instead of after the worker's lease: a worker whose
// step stream had ended with a failed step is not released by the stream's end. Best effort:
// all in parallel, each waiting at most `timeout` (an unreachable worker is skipped).
void ReleaseWorkers(const std::vector<std::string>& addresses, uint64_t coordinator_id,
                    absl::Duration timeout);

class WorkerGroup final : public StepRunner {
 public:
  static absl::StatusOr<std::unique_ptr<WorkerGroup>> Start(const WorkerGroupOptions& options);
  ~WorkerGroup() override;

  absl::Status Submit(const StepPlan& plan) override;
  absl::StatusOr<StepResult> Await() override;
  int max_in_flight() const override { return options_.use_stream ? 2 : 1; }

  const WorkerGroupInfo& info() const { return info_; }
  uint64_t coordinator_id() const { return options_.coordinator_id; }
  int size() const { return static_cast<int>(workers_.size()); }
  // OK while every worker answers; else UNAVAILABLE naming the first one that failed.
  absl::Status health() const;
  // Marks the group broken (a supervisor saw a worker exit, a probe went unanswered): a Run in
  // progress ends at once (its streams are cancelled) and every later Run fails with `why`.
  void Fail(const absl::Status& why);
  // Pings every worker (bounded by `timeout`); a worker whose step stream has closed, that does
  // not answer, that names another coordinator as its owner (it gave this one up) or that answers
  // as another process than the group formed with (PingResponse.instance_id: a restart at the
  // same address) breaks the group.
  absl::Status Probe(absl::Duration timeout);

 private:
  struct Worker;
  explicit WorkerGroup(const WorkerGroupOptions& options);
  absl::Status Connect();
  // While `first` (w's Ping answer) names another coordinator as its owner and `until` has not
  // passed: says so once, pings again every 250 ms. OK once it is free, the time is up or a ping
  // fails (the setup calls then name why); CANCELLED when Cancelled().
  absl::Status AwaitUnowned(Worker& w, const lorcserve::internal::PingResponse& first, absl::Time until);
  bool Cancelled() const { return options_.cancelled && options_.cancelled(); }
  // Waits for every one of `calls` (one per worker, each using ctxs[rank]); while waiting polls
  // Cancelled() and, once it is true, cancels every context. False when cancelled.
  template <typename T>
  bool AwaitCalls(std::vector<std::future<T>>& calls,
                  const std::vector<std::unique_ptr<grpc::ClientContext>>& ctxs) const;
  absl::Status OpenStreams();
  void MarkBroken(const absl::Status& s);
  // Names this coordinator in a request, or in a step call's metadata.
  void NameCoordinator(lorcserve::internal::CoordinatorId* out) const;
  void NameCoordinator(grpc::ClientContext* ctx) const;
  // options_.coordinator_address, or rendezvous_address when empty.
  const std::string& CoordinatorAddress() const {
    return options_.coordinator_address.empty() ? options_.rendezvous_address : options_.coordinator_address;
  }
  // Sends plan_msg_ to every worker as one unary call each; rank 0's result.
  absl::StatusOr<StepResult> RunUnary();
  absl::StatusOr<StepResult> AwaitStream(uint64_t step_id);
  // The failure to report when worker `rank`'s step stream ended with `why`: the death of
  // another worker if that is what made `rank` fail, else `why` (UNAVAILABLE naming `rank`).
  absl::Status RootCause(int rank, const absl::Status& why);

  WorkerGroupOptions options_;
  WorkerGroupInfo info_;
  std::vector<std::unique_ptr<Worker>> workers_;
  // Engine thread only.
  lorcserve::internal::StepPlan plan_msg_;
  std::deque<uint64_t> in_flight_;                          // step ids, oldest first
  std::deque<absl::StatusOr<StepResult>> unary_results_;    // unary mode: results of in_flight_
  mutable absl::Mutex mu_;
  absl::Status broken_ ABSL_GUARDED_BY(mu_);
};

}  // namespace lorc
