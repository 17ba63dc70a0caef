// The worker process's gRPC service (lorcserve.internal.Worker): loads its model shard, joins
// the tensor-parallel group, and executes the coordinator's step plans in order.
//
// Threads: gRPC handler threads. One mutex serialises every state change and step, so the
// steps of the one step stream (or unary Step calls) run one at a time, in arrival order.
#pragma once

#include <atomic>
#include <memory>
#include <string>

#include "absl/synchronization/mutex.h"
#include "lorcserve/internal/worker.grpc.pb.h"
#include "backend/backend.h"
#include "worker/comm/communicator.h"
#include "worker/comm/rendezvous.h"
#include "worker/model_loader.h"
#include "worker/step_executor.h"

namespace lorc {

struct WorkerOptions {
  BackendOptions backend;
  // Gloo: the address this worker listens on for its peers, unless the coordinator names one.
  std::string comm_address = "127.0.0.1";
};

class WorkerService final : public lorcserve::internal::Worker::Service {
 public:
  explicit WorkerService(const WorkerOptions& options) : options_(options) {}

  grpc::Status LoadModel(grpc::ServerContext* ctx, const lorcserve::internal::LoadModelRequest* req,
                         lorcserve::internal::LoadModelResponse* resp) override;
  grpc::Status InitCommunicator(grpc::ServerContext* ctx,
                                const lorcserve::internal::InitCommunicatorRequest* req,
                                lorcserve::internal::InitCommunicatorResponse* resp) override;
  grpc::Status Steps(grpc::ServerContext* ctx,
                     grpc::ServerReaderWriter<lorcserve::internal::StepResult,
                                              lorcserve::internal::StepPlan>* stream) override;
  grpc::Status Step(grpc::ServerContext* ctx, const lorcserve::internal::StepPlan* req,
                    lorcserve::internal::StepResult* resp) override;
  grpc::Status Ping(grpc::ServerContext* ctx, const lorcserve::internal::PingRequest* req,
                    lorcserve::internal::PingResponse* resp) override;

 private:
  absl::Status EnsureBackend() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status RunStep(const lorcserve::internal::StepPlan& plan, lorcserve::internal::StepResult* out);

  WorkerOptions options_;
  absl::Mutex mu_;
  std::unique_ptr<Backend> backend_ ABSL_GUARDED_BY(mu_);
  std::unique_ptr<RendezvousStore> store_ ABSL_GUARDED_BY(mu_);
  std::unique_ptr<Communicator> comm_ ABSL_GUARDED_BY(mu_);
  LoadedModel model_ ABSL_GUARDED_BY(mu_);
  std::unique_ptr<StepExecutor> executor_ ABSL_GUARDED_BY(mu_);
  // Read by Ping without the mutex: a long step must not make the worker look dead.
  std::atomic<bool> model_loaded_{false};
  std::atomic<bool> comm_ready_{false};
};

}  // namespace lorc
