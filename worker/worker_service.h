// The worker process's gRPC service (lorcserve.internal.Worker): loads its model shard, joins
// the tensor-parallel group, and executes the coordinator's step plans in order.
//
// Threads: one device thread (DeviceThread) owns the device state: the Backend, the loaded model,
// the Communicator and the StepExecutor are created, used and destroyed only there (reaching
// them from another thread is a CHECK failure). gRPC threads only check the caller and post
// work: the unary handlers (LoadModel, InitCommunicator, Step) block until their item ran; the
// Steps stream is a callback reactor that posts each plan as it arrives (so the next plan
// queues while one runs) and writes the results back in order, one write at a time. Ping reads
// atomics and the ownership record only, so it never waits behind a step.
//
// Ownership: a worker serves one coordinator at a time (worker/ownership.h).
#pragma once

#include <atomic>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "lorcserve/internal/worker.grpc.pb.h"
#include "backend/backend.h"
#include "worker/device_thread.h"
#include "worker/ownership.h"

namespace lorc {

struct WorkerOptions {
  BackendOptions backend;
  // Gloo: the address this worker listens on for its peers, unless the coordinator names one.
  std::string comm_address = "127.0.0.1";
  // Join mode (`--join`): the coordinator's internal port as this worker reaches it; used for the
  // rendezvous store instead of InitCommunicatorRequest.rendezvous_address (which names the
  // coordinator as it sees itself). Empty: the request's.
  std::string rendezvous_address;
  // How long the owning coordinator may stay silent, with no call open, before another
  // coordinator may take the worker (`lorcserve worker --owner-lease-s`).
  absl::Duration owner_lease = absl::Seconds(30);
  // Test hook, may be empty: called on the thread that touches the device state, at the start
  // of every operation on it ("InitCommunicator", "LoadModel", "Step", "Teardown").
  std::function<void(absl::string_view op)> device_op_hook;
};

class WorkerService final
    : public lorcserve::internal::Worker::WithCallbackMethod_Steps<lorcserve::internal::Worker::Service> {
 public:
  explicit WorkerService(const WorkerOptions& options);
  // Destroys the device state on the device thread. The gRPC server must be shut down first.
  ~WorkerService() override;

  // Random, nonzero, drawn when this service (the worker process) starts: PingResponse.instance_id
  // and the JoinRequest's, so two addresses that reach one worker can be told apart from two.
  uint64_t instance_id() const { return instance_id_; }

  grpc::Status LoadModel(grpc::ServerContext* ctx, const lorcserve::internal::LoadModelRequest* req,
                         lorcserve::internal::LoadModelResponse* resp) override;
  grpc::Status InitCommunicator(grpc::ServerContext* ctx,
                                const lorcserve::internal::InitCommunicatorRequest* req,
                                lorcserve::internal::InitCommunicatorResponse* resp) override;
  grpc::ServerBidiReactor<lorcserve::internal::StepPlan, lorcserve::internal::StepResult>* Steps(
      grpc::CallbackServerContext* ctx) override;
  grpc::Status Step(grpc::ServerContext* ctx, const lorcserve::internal::StepPlan* req,
                    lorcserve::internal::StepResult* resp) override;
  grpc::Status Ping(grpc::ServerContext* ctx, const lorcserve::internal::PingRequest* req,
                    lorcserve::internal::PingResponse* resp) override;

  // The thread that owns the device state.
  std::thread::id device_thread_id() const { return device_.id(); }
  // True while a LoadModel or InitCommunicator call is being served (a load, or the wait for the
  // communicator's peers): work that neither ends early nor leaves anything worth keeping, so
  // `lorcserve worker` exits at once on a signal then instead of waiting for it. Any thread.
  bool setting_up() const { return setup_calls_.load() > 0; }

 private:
  struct Device;
  class StepStream;

  // Device-thread operations (each CHECKs that it runs there).
  Device& device();
  void DeviceOp(absl::string_view op);
  absl::Status EnsureBackend();
  absl::StatusOr<lorcserve::internal::InitCommunicatorResponse> InitCommunicatorOnDevice(
      const lorcserve::internal::InitCommunicatorRequest& req);
  absl::StatusOr<lorcserve::internal::LoadModelResponse> LoadModelOnDevice(
      const lorcserve::internal::LoadModelRequest& req);
  absl::StatusOr<lorcserve::internal::StepResult> RunStepOnDevice(
      const lorcserve::internal::StepPlan& plan);

  const WorkerOptions options_;
  const uint64_t instance_id_;  // PingResponse.instance_id: random, nonzero, this process's
  Ownership ownership_;
  DeviceThread device_;
  // Starts the step streams' writes, so the device thread goes on to the next queued step at
  // once (a gRPC write started inline took ~0.6 ms of the device thread between steps).
  DeviceThread writer_;
  std::unique_ptr<Device> device_state_;  // device thread only
  // Read by Ping without waiting: a long step must not make the worker look dead.
  std::atomic<bool> model_loaded_{false};
  std::atomic<bool> comm_ready_{false};
  std::atomic<int> setup_calls_{0};  // LoadModel / InitCommunicator handlers running
};

}  // namespace lorc
