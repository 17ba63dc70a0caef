// The coordinator process: two gRPC servers, the public one on `listen` (LorcServe API,
// grpc.health.v1, reflection) and the internal one on `internal_listen` (the Rendezvous store and
// WorkerJoin), its workers (remote, joined, or started and supervised here), and the engine
// thread that drives them.
//
// Joining (tensor_parallel_size > local workers, no worker_addresses): ranks
// [local_workers.count, tensor_parallel_size) register through WorkerJoin (join_registry.h).
// Start returns once both servers are up (health NOT_SERVING); the monitor forms the group when
// every rank has joined, and while ranks are missing reports them (stderr and
// ModelInfo.worker_failure) every `join_timeout`, and keeps waiting. A joined worker that
// re-joins as a new process re-forms a serving group; recovery uses the latest addresses.
//
// Start order: Create brings the servers up with health NOT_SERVING (the workers need the
// Rendezvous service to join); Start then has the workers join and load the model, then the
// engine thread starts and health turns SERVING. Start blocks through the load (minutes for a
// large model) and RequestShutdown() from another thread (a signal watcher, created between the
// two calls) ends it within ~100 ms with CANCELLED; the owner then calls Shutdown(), which ends
// the local workers. A worker that dies or stops answering turns health
// NOT_SERVING, fails its in-flight requests with UNAVAILABLE naming the worker, and the server
// keeps answering health and ModelInfo.
//
// Recovery: after a worker failure the monitor thread rebuilds the group: with local workers it
// restarts the ranks whose process exited, with remote ones it retries the same addresses with a
// backoff; then every worker joins a new communicator and reloads, and a fresh WorkerGroup,
// Engine and EngineLoop serve (health SERVING again). Requests arriving meanwhile get
// UNAVAILABLE ("recovering ..."; retryable). More than `max_restarts` recoveries within
// `restart_window` end it: health stays NOT_SERVING with the reason in ModelInfo.
//
// Health (grpc.health.v1): readiness is the overall "" service (and lorcserve.v1.LorcServe):
// SERVING only after the load and while not draining, recovering or failed. Liveness is the
// service name "liveness": SERVING from the moment the server listens (during the load, a
// recovery and a drain) until the process shuts down for good, or the coordinator has given up
// on its workers (more than max_restarts recoveries: only a restart helps then).
//
// Drain (SIGTERM): RequestDrain() turns readiness NOT_SERVING at once and new Generate/Tokenize
// calls get UNAVAILABLE ("draining ..."); FinishDrain() lets the admitted calls finish for up to
// `drain_timeout`, then ends the rest with UNAVAILABLE ("... drain timeout ...") and returns; the
// owner then calls Shutdown().
//
// Threads: the owner (Create, Start, Wait, Shutdown); the monitor thread (health probes, recovery); the
// local-worker supervisor (exit callbacks -> OnWorkerFailure); gRPC handler threads (FillLive,
// Generate through the service). The current worker group and engine loop live in one
// shared_ptr<Generation> guarded by mu_: every thread takes a snapshot under mu_, so Shutdown
// or a recovery dropping it never frees what another thread still uses.
#pragma once

#include <atomic>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "common/defaults.h"
#include "coordinator/engine_loop.h"
#include "coordinator/join_registry.h"
#include "coordinator/local_workers.h"
#include "coordinator/lorcserve_service.h"
#include "tokenizer/tokenizer.h"
#include "coordinator/worker_group.h"
#include "grpcpp/grpcpp.h"
#include "metrics/request_log.h"
#include "metrics/serving_metrics.h"
#include "security/auth.h"
#include "security/tls.h"
#include "step/coordinator_ref.h"
#include "worker/comm/grpc_rendezvous.h"

namespace lorc {

struct CoordinatorOptions {
  std::string listen = "127.0.0.1:50051";
  // The internal services' address; empty: the listen host with port defaults::kInternalPort
  // (port 0 when listen's port is 0). DefaultInternalListen.
  std::string internal_listen;
  // How workers reach the internal port (Rendezvous); default: the internal listen address (with
  // a wildcard host replaced by 127.0.0.1 for local workers, or this host's name). Joined
  // workers use the address they joined at instead.
  std::string advertise_address;
  std::vector<std::string> worker_addresses;  // remote workers, rank order
  LocalWorkersOptions local_workers;           // used when worker_addresses is empty (count 0: none)
  // Total ranks; 0: worker_addresses.size() or local_workers.count. Larger than the local count
  // (without worker_addresses): the rest join.
  int32_t tensor_parallel_size = 0;
  ModelSource model;
  KvCacheOptions kv;
  EngineOptions engine;
  bool step_stream = true;                     // bidi stream per worker, or unary calls
  bool disable_custom_all_reduce = false;      // CUDA workers: NCCL for every all-reduce
  absl::Duration step_timeout = absl::Minutes(5);
  absl::Duration join_timeout = absl::Seconds(60);
  absl::Duration probe_interval = absl::Seconds(2);  // worker health checks while idle
  // Worker-failure recoveries allowed within `restart_window` before giving up (0: never
  // recover: the first failure is final).
  int32_t max_restarts = 3;
  absl::Duration restart_window = absl::Minutes(10);
  absl::Duration max_backoff = absl::Seconds(30);  // between re-join attempts
  // Prometheus metrics (metrics/README.md), kept across recoveries; null: the server keeps its
  // own (the caller exposes `metrics->registry()`, e.g. on --metrics-port).
  std::shared_ptr<ServingMetrics> metrics;
  LogFormat log_format = LogFormat::kText;  // request and worker-event lines on stderr
  // Graceful drain: how long admitted requests may run after RequestDrain().
  absl::Duration drain_timeout = absl::Seconds(defaults::kDrainTimeoutS);
  security::ServerTlsOptions tls;                  // the public port (empty: plaintext)
  std::shared_ptr<const security::Authenticator> auth;  // bearer tokens (null: none)
  security::InternalTlsOptions internal_tls;  // every internal link (worker/comm/internal_grpc.h; empty: plaintext)
};

// `listen`'s host with port defaults::kInternalPort, or port 0 when `listen`'s port is 0.
std::string DefaultInternalListen(const std::string& listen);

class CoordinatorServer {
 public:
  // Checks the options, reads config.json and tokenizer.json and brings up both gRPC servers
  // (readiness NOT_SERVING, liveness SERVING); quick: no worker is started. INVALID_ARGUMENT
  // naming the flag or the file; UNAVAILABLE naming --listen / --internal-listen for a port
  // that cannot be bound.
  static absl::StatusOr<std::unique_ptr<CoordinatorServer>> Create(const CoordinatorOptions& options);
  // Starts (--local-workers) or connects to (--workers) the workers, joins them and has them
  // load the model, then serves (readiness SERVING) and starts the monitor thread. Blocks
  // through the load; in join mode (tensor_parallel_size beyond the local and listed workers)
  // returns at once and the monitor forms the group. CANCELLED when RequestShutdown() came
  // before or during it (from another thread); the error of a worker that could not start,
  // connect or load otherwise. After an error call Shutdown() (the destructor does too).
  absl::Status Start();
  ~CoordinatorServer();

  int port() const { return port_; }
  std::string address() const;
  // The internal port's address (Rendezvous, WorkerJoin), as bound.
  std::string internal_address() const;
  // Blocks until RequestShutdown(), Shutdown() or RequestDrain().
  void Wait();
  // Starts a graceful drain (safe from any thread, e.g. a signal watcher): readiness
  // NOT_SERVING, new requests UNAVAILABLE, Wait() returns. Idempotent.
  void RequestDrain();
  bool draining() const;
  // Owner thread, after RequestDrain(): waits until the admitted requests have finished, or
  // `drain_timeout` passed, or RequestShutdown() was called (a second signal); then ends the
  // rest with UNAVAILABLE and waits (up to 5 s) for their handlers. Returns how many were
  // aborted.
  int64_t FinishDrain();
  // Makes Wait() return, or Start() end with CANCELLED during the load (safe from any thread,
  // e.g. a signal watcher); the owner then calls Shutdown() or destroys the server.
  void RequestShutdown();
  // Stops serving (5 s grace for in-flight calls), the engine thread and the workers.
  // Idempotent; call from the owning thread.
  void Shutdown();

 private:
  // Ends the service's calls in flight with `why` (UNAVAILABLE) and waits up to 5 s for their
  // handlers to return (they poll every 50 ms): the drain's end and a shutdown without one.
  void AbortInFlightAndWait(absl::Status why);
  struct Generation;  // one WorkerGroup and the EngineLoop over it
  enum class State { kStarting, kServing, kRecovering, kFailed };

  CoordinatorServer() = default;
  absl::Status StartServer();
  // Start's part before the monitor: local workers, then JoinGroup (not in join mode).
  absl::Status StartWorkers();
  // Joins the workers (new communicator, load), builds the engine and serves it.
  absl::Status JoinGroup();
  void OnWorkerFailure(const absl::Status& why);
  // The recovery budget (--max-restarts within --restart-window): takes one restart, false when
  // none is left; the final status once none is.
  bool TakeRestartBudget() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status GaveUpStatus(const absl::Status& last) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Monitor();
  // Monitor thread, join mode, at start: waits until every rank joined (reporting the missing
  // ones every join_timeout), then JoinGroup; a failed formation goes on as a recovery.
  void FormJoinedGroup();
  // A joined rank changed holder (registry callback, gRPC thread).
  void OnJoin(const JoinedWorker& now, const JoinedWorker& previous);
  // Worker addresses in rank order: local, then listed or joined.
  std::vector<std::string> WorkerAddresses() const;
  // Monitor thread: restarts / re-joins until serving again, stopping, or out of restarts.
  void Recover();
  // Sleeps up to `d` unless stopping; returns true when stopping.
  bool SleepUnlessStopping(absl::Duration d);
  // lorcserve_serving_state: `s`, or kDraining once a drain started (it stays until the exit).
  void PublishState(ServingState s) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Readiness ("" and the service name): `serving` unless draining.
  void SetHealth(bool serving);
  void SetLiveness(bool alive);
  std::shared_ptr<Generation> Current() const;
  void FillLive(lorcserve::v1::ModelInfoResponse* resp);

  CoordinatorOptions options_;
  std::shared_ptr<ServingMetrics> metrics_;  // options_.metrics or our own; never null
  std::unique_ptr<EventLog> log_;
  ModelConfig config_;
  std::unique_ptr<Tokenizer> tokenizer_;
  RendezvousService rendezvous_;
  std::unique_ptr<JoinRegistry> registry_;          // join mode only
  std::unique_ptr<WorkerJoinService> join_service_;  // over registry_
  std::unique_ptr<LorcServeService> service_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<grpc::Server> internal_server_;
  int port_ = 0;
  int internal_port_ = 0;
  bool internal_listen_defaulted_ = false;  // internal_listen came from DefaultInternalListen
  std::unique_ptr<LocalWorkers> local_;  // set in StartWorkers, reset in Shutdown (owner)
  std::thread monitor_;
  mutable absl::Mutex mu_;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  bool draining_ ABSL_GUARDED_BY(mu_) = false;
  bool torn_down_ = false;  // owner thread only
  State state_ ABSL_GUARDED_BY(mu_) = State::kStarting;
  std::shared_ptr<Generation> gen_ ABSL_GUARDED_BY(mu_);  // null unless serving
  absl::Status failure_ ABSL_GUARDED_BY(mu_);  // the latest worker failure (OK while serving)
  std::string join_waiting_ ABSL_GUARDED_BY(mu_);  // join mode: the missing ranks after join_timeout
  std::vector<absl::Time> restarts_ ABSL_GUARDED_BY(mu_);  // recent recoveries (their first attempts)
  std::string rendezvous_address_;             // set in StartWorkers
  std::string coordinator_address_;            // set in StartWorkers: WorkerGroupOptions::coordinator_address
  const uint64_t coordinator_id_ = NewCoordinatorId();  // names this coordinator to its workers
};

}  // namespace lorc
