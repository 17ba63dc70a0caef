#include "worker/worker_service.h"

#include <algorithm>
#if defined(__GLIBC__)
#include <malloc.h>
#endif
#include <deque>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/check.h"
#include "common/defaults.h"
#include "common/grpc_status.h"
#include "common/happens_before.h"
#include "common/status_macros.h"
#include "worker/comm/communicator.h"
#include "worker/comm/rendezvous.h"
#include "worker/comm/grpc_rendezvous.h"
#include "worker/model_loader.h"
#include "worker/step_executor.h"
#include "step/protocol.h"
#include "step/step_proto.h"

namespace lorc {

namespace pb = ::lorcserve::internal;

namespace {

CoordinatorRef FromProto(const lorcserve::internal::CoordinatorId& c) { return {c.id(), c.address()}; }

// A setup call from a coordinator of another build is refused before it owns the worker (it
// would misread or drop fields of the plans; step/protocol.h).
absl::Status CheckCoordinatorProtocol(const lorcserve::internal::CoordinatorId& c, absl::string_view call) {
  if (c.id() == 0) return absl::OkStatus();  // no coordinator named: Ownership::Begin's INVALID_ARGUMENT
  absl::Status s = CheckPeerProtocol(c.protocol(), DescribeCoordinator(FromProto(c)), "this worker");
  if (s.ok()) return s;
  return absl::FailedPreconditionError(absl::StrCat(call, " refused: ", s.message()));
}

void ToProto(const CoordinatorRef& c, lorcserve::internal::CoordinatorId* out) {
  out->set_id(c.id);
  out->set_address(c.address);
}

// The coordinator named by a step call's metadata (id 0 when absent or malformed).
CoordinatorRef FromMetadata(const grpc::ServerContextBase& ctx) {
  CoordinatorRef c;
  const auto& md = ctx.client_metadata();
  if (auto it = md.find(kCoordinatorIdMetadata); it != md.end()) {
    if (!absl::SimpleAtoi(absl::string_view(it->second.data(), it->second.size()), &c.id)) c.id = 0;
  }
  if (auto it = md.find(kCoordinatorAddressMetadata); it != md.end()) {
    c.address.assign(it->second.data(), it->second.size());
  }
  return c;
}

// A Steps call refused before it started: finishes at once with `status`.
class RefusedStream final : public grpc::ServerBidiReactor<pb::StepPlan, pb::StepResult> {
 public:
  explicit RefusedStream(const absl::Status& status) { Finish(ToGrpcStatus(status)); }
  void OnDone() override { delete this; }
};

}  // namespace

// Everything the device thread owns.
struct WorkerService::Device {
  std::unique_ptr<Backend> backend;
  std::unique_ptr<RendezvousStore> store;
  std::unique_ptr<Communicator> comm;
  LoadedModel model;
  std::unique_ptr<StepExecutor> executor;
  // The last step run in this serving epoch (reset by LoadModel and InitCommunicator).

  // Destroys the model before the communicator and the backend it uses.
  // Drops the model and its KV cache, and hands the freed heap back to the system: a reload
  // (every recovery re-loads the surviving ranks) would otherwise leave the old weights' pages
  // resident in glibc's free lists (the soak measured +11 % VmRSS after two reloads).
  void ResetModel() {
    executor.reset();
    model = LoadedModel();
#if defined(__GLIBC__)
    malloc_trim(0);
#endif
  }
};

// One Steps call: reads plans and posts each to the device thread at once; the device thread
// queues the results and starts the writes, one at a time, in order. A step that fails ends the
// stream with its status once the results before it are written (the plans queued behind it
// are dropped unrun). Finish is called once nothing is running on the device for this stream,
// so the device thread never touches a finished stream.
class WorkerService::StepStream final : public grpc::ServerBidiReactor<pb::StepPlan, pb::StepResult> {
 public:
  StepStream(WorkerService* service, uint64_t epoch) : service_(service), epoch_(epoch) {
    absl::MutexLock lock(&mu_);
    StartRead(&plan_);
  }

  void OnReadDone(bool ok) override {
    Next next;
    {
      absl::MutexLock lock(&mu_);
      if (!ok) {
        reads_done_ = true;
        if (!finished_) owner_closed_ = true;  // half-close or cancellation by the coordinator
      } else if (!failed_ && !write_failed_) {
        ++in_flight_;
        if (service_->device_.Post([this, plan = std::move(plan_)] { RunOnDevice(plan); })) {
          plan_.Clear();
          StartRead(&plan_);
        } else {
          --in_flight_;
          Fail(DeviceThreadStopped());
        }
      } else {
        reads_done_ = true;  // ending: read no more
      }
      next = NextLocked();
    }
    Act(std::move(next));
  }

  void OnWriteDone(bool ok) override {
    Next next;
    {
      absl::MutexLock lock(&mu_);
      writing_ = false;
      if (ok) {
        results_.pop_front();
      } else {
        write_failed_ = true;  // the coordinator is gone
        owner_closed_ = true;
        results_.clear();
      }
      next = NextLocked();
    }
    Act(std::move(next));
  }

  void OnDone() override {
    bool owner_closed;
    {
      absl::MutexLock lock(&mu_);
      owner_closed = owner_closed_;
    }
    service_->ownership_.End(epoch_, owner_closed);
    HappensBefore(service_);  // ~WorkerService: the server's shutdown waited for this OnDone
    delete this;
  }

 private:
  // On the device thread.
  void RunOnDevice(const pb::StepPlan& plan) {
    bool skip;
    {
      absl::MutexLock lock(&mu_);
      skip = failed_ || write_failed_;
    }
    absl::StatusOr<pb::StepResult> r =
        skip ? absl::CancelledError("not run") : service_->RunStepOnDevice(plan);
    {
      absl::MutexLock lock(&mu_);
      --in_flight_;
      if (!skip && !write_failed_) {  // nobody to tell once a write failed
        if (r.ok()) {
          results_.push_back(*std::move(r));
        } else {
          Fail(r.status());
        }
      }
      // The write (or the finish) starts on the writer thread; until it has run, the stream
      // cannot finish (NextLocked counts it), so `this` outlives the task.
      ++writer_tasks_;
    }
    if (!service_->writer_.Post([this] { StartNextOnWriter(); })) StartNextOnWriter();
  }

  // On the writer thread (or inline when it is shutting down).
  void StartNextOnWriter() {
    Next next;
    {
      absl::MutexLock lock(&mu_);
      --writer_tasks_;
      next = NextLocked();
    }
    Act(std::move(next));
  }

  void Fail(const absl::Status& s) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (!failed_) status_ = ToGrpcStatus(s);
    failed_ = true;
  }

  // What to do next, decided under the lock and done after it (a gRPC write can take a while
  // and must not hold up the device thread, which takes the lock between steps).
  struct Next {
    const pb::StepResult* write = nullptr;  // start this write (results_.front(), stable)
    std::optional<grpc::Status> finish;     // or finish the stream with this
  };
  void Act(Next next) {
    if (next.write != nullptr) {
      StartWrite(next.write);
    } else if (next.finish.has_value()) {
      Finish(*std::move(next.finish));  // last: OnDone may follow at once
    }
  }

  // The next write, or the status to finish with once everything is done.
  Next NextLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (finished_ || writing_) return {};
    if (!results_.empty()) {
      writing_ = true;
      return {&results_.front(), std::nullopt};
    }
    if (in_flight_ > 0 || writer_tasks_ > 0 || !(reads_done_ || failed_ || write_failed_)) {
      return {};
    }
    finished_ = true;
    if (write_failed_ && !failed_) {
      return {nullptr, grpc::Status(grpc::StatusCode::CANCELLED, "step stream closed by the coordinator")};
    }
    return {nullptr, status_};
  }

  WorkerService* const service_;
  const uint64_t epoch_;
  absl::Mutex mu_;
  pb::StepPlan plan_ ABSL_GUARDED_BY(mu_);               // the read in progress
  std::deque<pb::StepResult> results_ ABSL_GUARDED_BY(mu_);  // front: being written
  int in_flight_ ABSL_GUARDED_BY(mu_) = 0;           // posted, not yet run
  int writer_tasks_ ABSL_GUARDED_BY(mu_) = 0;        // StartNextOnWriter posted, not yet run
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool reads_done_ ABSL_GUARDED_BY(mu_) = false;
  bool failed_ ABSL_GUARDED_BY(mu_) = false;         // a step failed: status_ says why
  bool write_failed_ ABSL_GUARDED_BY(mu_) = false;
  bool owner_closed_ ABSL_GUARDED_BY(mu_) = false;  // read by OnDone
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  grpc::Status status_ ABSL_GUARDED_BY(mu_);
};

WorkerService::WorkerService(const WorkerOptions& options)
    : options_(options), instance_id_(NewCoordinatorId()), ownership_(options.owner_lease) {}

WorkerService::~WorkerService() {
  // The gRPC server was shut down first (the header's precondition): grpc::Server::Shutdown
  // returns only after every handler returned and every reactor's OnDone ran. Each of them ends
  // with HappensBefore(this) (a HappensBeforeOnExit guard, or StepStream::OnDone), which makes
  // that ordering, kept inside the uninstrumented gRPC library, visible to ThreadSanitizer.
  HappensAfter(this);
  (void)device_.Call([this] {
    DeviceOp("Teardown");
    device_state_.reset();
    return absl::OkStatus();
  });
  device_.Shutdown();
  writer_.Shutdown();
}

WorkerService::Device& WorkerService::device() {
  CHECK(device_.IsCurrent()) << "the worker's device state is used off its device thread";
  if (device_state_ == nullptr) device_state_ = std::make_unique<Device>();
  return *device_state_;
}

void WorkerService::DeviceOp(absl::string_view op) {
  CHECK(device_.IsCurrent()) << op << " runs off the worker's device thread";
  if (options_.device_op_hook) options_.device_op_hook(op);
}

absl::Status WorkerService::EnsureBackend() {
  Device& d = device();
  if (d.backend != nullptr) return absl::OkStatus();
  ASSIGN_OR_RETURN(d.backend, CreateBackend(options_.backend));
  return absl::OkStatus();
}

absl::StatusOr<lorcserve::internal::InitCommunicatorResponse> WorkerService::InitCommunicatorOnDevice(
    const lorcserve::internal::InitCommunicatorRequest& req) {
  DeviceOp("InitCommunicator");
  RETURN_IF_ERROR(EnsureBackend());
  Device& d = device();
  model_loaded_ = false;
  d.ResetModel();
  comm_ready_ = false;
  d.comm.reset();
  const WorldConfig world{req.rank(), req.world_size()};
  RETURN_IF_ERROR(ValidateWorldConfig(world));
  d.store = std::make_unique<GrpcRendezvousStore>(
      options_.rendezvous_address.empty() ? req.rendezvous_address() : options_.rendezvous_address);
  CommOptions co;
  co.group = req.group();
  co.join_timeout = absl::Milliseconds(req.timeout_ms() > 0 ? req.timeout_ms() : 60000);
  co.hostname_or_iface = req.bind_address().empty() ? options_.comm_address : req.bind_address();
  co.disable_custom_all_reduce = req.disable_custom_all_reduce();
  ASSIGN_OR_RETURN(d.comm, options_.backend.kind == BackendKind::kCuda
                               ? CreateNcclCommunicator(world, d.store.get(), options_.backend.device,
                                                        d.backend->stream_handle(), co)
                               : CreateGlooCommunicator(world, d.store.get(), co));
  comm_ready_ = true;
  lorcserve::internal::InitCommunicatorResponse resp;
  resp.set_backend(std::string(d.comm->backend_name()));
  resp.set_all_reduce(d.comm->AllReduceDescription());
  resp.set_protocol(WorkerProtocolFingerprint());
  return resp;
}

absl::StatusOr<lorcserve::internal::LoadModelResponse> WorkerService::LoadModelOnDevice(
    const lorcserve::internal::LoadModelRequest& req) {
  DeviceOp("LoadModel");
  RETURN_IF_ERROR(EnsureBackend());
  Device& d = device();
  const int tp_size = std::max(1, req.tp_size());
  if (tp_size > 1 && (d.comm == nullptr || d.comm->world().world_size != tp_size ||
                      d.comm->world().rank != req.tp_rank())) {
    return absl::FailedPreconditionError(absl::StrCat("tensor parallelism ", tp_size, " rank ",
                                                      req.tp_rank(),
                                                      " needs InitCommunicator for that rank first"));
  }
  model_loaded_ = false;
  d.ResetModel();
  if (tp_size == 1 && d.comm != nullptr && d.comm->world().world_size != 1) {
    // A group of one has no communicator. One left from an earlier, larger group (a coordinator
    // restarted at a smaller --tensor-parallel-size on the same worker) would have every step's
    // collectives wait for ranks that are gone: the steps hung until the step timeout, then
    // failed on the broken group until the worker process was restarted.
    comm_ready_ = false;
    d.comm.reset();
    d.store.reset();
  }
  ModelSource src{req.model_dir(), req.random_weights(), req.weights_seed(),
                  req.has_shard_lm_head() ? std::optional<bool>(req.shard_lm_head()) : std::nullopt};
  KvCacheOptions kv;
  kv.block_size = req.block_size() > 0 ? req.block_size() : defaults::kBlockSize;
  kv.num_blocks = req.num_blocks();
  if (req.kv_cache_bytes() > 0) kv.memory_bytes = req.kv_cache_bytes();
  if (req.max_num_seqs() > 0) kv.max_num_seqs = req.max_num_seqs();
  if (req.max_num_batched_tokens() > 0) kv.max_num_batched_tokens = req.max_num_batched_tokens();
  kv.max_model_len = req.max_model_len();
  kv.gpu_memory_utilization = req.gpu_memory_utilization();
  kv.enforce_eager = req.enforce_eager();
  kv.kv_offloading_bytes = req.kv_offloading_bytes();
  if (!req.kv_cache_dtype().empty()) {
    ASSIGN_OR_RETURN(kv.kv_cache_dtype, ParseKvCacheDtype(req.kv_cache_dtype()));
  }
  if (req.has_kv_policy()) {
    ASSIGN_OR_RETURN(kv.kv_policy, KvPolicyFromProto(req.kv_policy()));
  }
  ASSIGN_OR_RETURN(d.model, lorc::LoadModel(src, d.backend.get(), req.tp_rank(), tp_size, d.comm.get(), kv));
  d.executor = std::make_unique<StepExecutor>(d.model.runner.get(), d.comm.get());
  model_loaded_ = true;
  lorcserve::internal::LoadModelResponse resp;
  resp.set_num_blocks(d.model.runner->kv_spec().num_blocks);
  resp.set_kv_bytes_per_token(d.model.runner->kv_spec().BytesPerToken());
  resp.set_kv_policy_max_positions(d.model.runner->kv_policy_max_positions());
  resp.set_num_host_blocks(d.model.runner->num_host_blocks());
  resp.set_load_seconds(d.model.load_seconds);
  resp.set_backend(d.backend->name());
  resp.set_device(d.backend->Describe());
  resp.set_protocol(WorkerProtocolFingerprint());
  return resp;
}

absl::StatusOr<pb::StepResult> WorkerService::RunStepOnDevice(const pb::StepPlan& plan) {
  DeviceOp("Step");
  Device& d = device();
  if (d.executor == nullptr) {
    return absl::FailedPreconditionError(
        absl::StrCat("step_id ", plan.step_id(), ": the worker has no model loaded (LoadModel first)"));
  }
  // The executor refuses a step_id that does not follow the previous one (per model load).
  ASSIGN_OR_RETURN(lorc::StepResult r, d.executor->Execute(StepPlanFromProto(plan)));
  pb::StepResult out;
  StepResultToProto(r, &out);
  return out;
}

grpc::Status WorkerService::InitCommunicator(grpc::ServerContext*,
                                             const lorcserve::internal::InitCommunicatorRequest* req,
                                             lorcserve::internal::InitCommunicatorResponse* resp) {
  const HappensBeforeOnExit handler_done(this);  // ~WorkerService
  if (absl::Status s = CheckCoordinatorProtocol(req->coordinator(), "InitCommunicator"); !s.ok()) {
    return ToGrpcStatus(s);
  }
  absl::StatusOr<uint64_t> epoch = ownership_.Begin(FromProto(req->coordinator()), true, "InitCommunicator");
  if (!epoch.ok()) return ToGrpcStatus(epoch.status());
  ++setup_calls_;
  absl::StatusOr<lorcserve::internal::InitCommunicatorResponse> r =
      device_.Call([&] { return InitCommunicatorOnDevice(*req); });
  --setup_calls_;
  if (!r.ok()) {
    ownership_.EndFailedSetup(*epoch, "InitCommunicator");
    return ToGrpcStatus(r.status());
  }
  ownership_.End(*epoch, false);
  *resp = *std::move(r);
  return grpc::Status::OK;
}

grpc::Status WorkerService::LoadModel(grpc::ServerContext*, const lorcserve::internal::LoadModelRequest* req,
                                      lorcserve::internal::LoadModelResponse* resp) {
  const HappensBeforeOnExit handler_done(this);  // ~WorkerService
  if (absl::Status s = CheckCoordinatorProtocol(req->coordinator(), "LoadModel"); !s.ok()) return ToGrpcStatus(s);
  absl::StatusOr<uint64_t> epoch = ownership_.Begin(FromProto(req->coordinator()), true, "LoadModel");
  if (!epoch.ok()) return ToGrpcStatus(epoch.status());
  ++setup_calls_;
  absl::StatusOr<lorcserve::internal::LoadModelResponse> r =
      device_.Call([&] { return LoadModelOnDevice(*req); });
  --setup_calls_;
  if (!r.ok()) {
    ownership_.EndFailedSetup(*epoch, "LoadModel");
    return ToGrpcStatus(r.status());
  }
  ownership_.End(*epoch, false);
  *resp = *std::move(r);
  return grpc::Status::OK;
}

grpc::ServerBidiReactor<pb::StepPlan, pb::StepResult>* WorkerService::Steps(grpc::CallbackServerContext* ctx) {
  const HappensBeforeOnExit handler_done(this);  // ~WorkerService
  absl::StatusOr<uint64_t> epoch = ownership_.Begin(FromMetadata(*ctx), false, "Steps");
  if (!epoch.ok()) return new RefusedStream(epoch.status());
  return new StepStream(this, *epoch);
}

grpc::Status WorkerService::Step(grpc::ServerContext* ctx, const pb::StepPlan* req, pb::StepResult* resp) {
  const HappensBeforeOnExit handler_done(this);  // ~WorkerService
  absl::StatusOr<uint64_t> epoch = ownership_.Begin(FromMetadata(*ctx), false, "Step");
  if (!epoch.ok()) return ToGrpcStatus(epoch.status());
  absl::StatusOr<pb::StepResult> r = device_.Call([&] { return RunStepOnDevice(*req); });
  ownership_.End(*epoch, false);
  if (!r.ok()) return ToGrpcStatus(r.status());
  *resp = *std::move(r);
  return grpc::Status::OK;
}

grpc::Status WorkerService::Ping(grpc::ServerContext*, const lorcserve::internal::PingRequest* req,
                                 lorcserve::internal::PingResponse* resp) {
  const HappensBeforeOnExit handler_done(this);  // ~WorkerService
  if (req->release()) {
    ownership_.Release(FromProto(req->coordinator()));
  } else {
    ownership_.Touch(FromProto(req->coordinator()));
  }
  resp->set_instance_id(instance_id_);
  resp->set_model_loaded(model_loaded_.load());
  resp->set_communicator_ready(comm_ready_.load());
  if (std::optional<CoordinatorRef> owner = ownership_.owner(); owner.has_value()) {
    ToProto(*owner, resp->mutable_owner());
  }
  return grpc::Status::OK;
}

}  // namespace lorc
