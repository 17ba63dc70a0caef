// The coordinator process: the gRPC server (public LorcServe API, grpc.health.v1, reflection,
// and the internal Rendezvous store), its workers (remote, or started and supervised here),
// and the engine thread that drives them.
//
// Start order: the server comes up first with health NOT_SERVING (the workers need the
// Rendezvous service to join), then the workers join and load the model, then the engine thread
// starts and health turns SERVING. A worker that dies or stops answering turns health
// NOT_SERVING, fails its in-flight requests with UNAVAILABLE naming the worker, and the server
// keeps answering health and ModelInfo.
#pragma once

#include <atomic>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "coordinator/engine_loop.h"
#include "coordinator/local_workers.h"
#include "coordinator/lorcserve_service.h"
#include "tokenizer/tokenizer.h"
#include "coordinator/worker_group.h"
#include "grpcpp/grpcpp.h"
#include "worker/comm/grpc_rendezvous.h"

namespace lorc {

struct CoordinatorOptions {
  std::string listen = "127.0.0.1:50051";
  // How workers reach this server's Rendezvous service; default: the listen address (with a
  // wildcard host replaced by 127.0.0.1 for local workers, or this host's name).
  std::string advertise_address;
  std::vector<std::string> worker_addresses;  // remote workers, rank order
  LocalWorkersOptions local_workers;           // used when worker_addresses is empty
  ModelSource model;
  KvCacheOptions kv;
  EngineOptions engine;
  bool step_stream = true;                     // bidi stream per worker, or unary calls
  absl::Duration step_timeout = absl::Minutes(5);
  absl::Duration join_timeout = absl::Seconds(60);
  absl::Duration probe_interval = absl::Seconds(2);  // worker health checks while idle
};

class CoordinatorServer {
 public:
  static absl::StatusOr<std::unique_ptr<CoordinatorServer>> Start(const CoordinatorOptions& options);
  ~CoordinatorServer();

  int port() const { return port_; }
  std::string address() const;
  // Blocks until RequestShutdown() or Shutdown().
  void Wait();
  // Makes Wait() return (safe from any thread, e.g. a signal watcher); the owner then calls
  // Shutdown() or destroys the server.
  void RequestShutdown();
  // Stops serving (5 s grace for in-flight calls), the engine thread and the workers.
  // Idempotent; call from the owning thread.
  void Shutdown();

 private:
  CoordinatorServer() = default;
  absl::Status StartServer();
  absl::Status StartWorkers();
  void OnWorkerFailure(const absl::Status& why);
  void Monitor();
  void FillLive(lorcserve::v1::ModelInfoResponse* resp);

  CoordinatorOptions options_;
  ModelConfig config_;
  std::unique_ptr<Tokenizer> tokenizer_;
  RendezvousService rendezvous_;
  std::unique_ptr<LorcServeService> service_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;
  std::unique_ptr<LocalWorkers> local_;
  std::unique_ptr<WorkerGroup> group_;
  std::unique_ptr<EngineLoop> loop_;
  std::thread monitor_;
  absl::Mutex mu_;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  bool torn_down_ = false;  // owner thread only
  // Set (release) once group_ and loop_ exist; other threads read them only after seeing it.
  std::atomic<bool> ready_{false};
  absl::Status failure_ ABSL_GUARDED_BY(mu_);
};

}  // namespace lorc
