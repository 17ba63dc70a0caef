#include "worker/worker_service.h"

#include "absl/strings/str_cat.h"
#include "common/grpc_status.h"
#include "common/status_macros.h"
#include "worker/grpc_rendezvous.h"
#include "worker/step_proto.h"

namespace lorc {

absl::Status WorkerService::EnsureBackend() {
  if (backend_ != nullptr) return absl::OkStatus();
  ASSIGN_OR_RETURN(backend_, CreateBackend(options_.backend));
  return absl::OkStatus();
}

grpc::Status WorkerService::InitCommunicator(grpc::ServerContext*,
                                             const lorcserve::internal::InitCommunicatorRequest* req,
                                             lorcserve::internal::InitCommunicatorResponse* resp) {
  absl::MutexLock lock(&mu_);
  if (absl::Status s = EnsureBackend(); !s.ok()) return ToGrpcStatus(s);
  executor_.reset();
  model_loaded_ = false;
  model_ = LoadedModel();
  comm_.reset();
  comm_ready_ = false;
  const WorldConfig world{req->rank(), req->world_size()};
  if (absl::Status s = ValidateWorldConfig(world); !s.ok()) return ToGrpcStatus(s);
  store_ = std::make_unique<GrpcRendezvousStore>(req->rendezvous_address());
  CommOptions co;
  co.group = req->group();
  co.join_timeout = absl::Milliseconds(req->timeout_ms() > 0 ? req->timeout_ms() : 60000);
  co.hostname_or_iface = req->bind_address().empty() ? options_.comm_address : req->bind_address();
  absl::StatusOr<std::unique_ptr<Communicator>> comm =
      options_.backend.kind == BackendKind::kCuda
          ? CreateNcclCommunicator(world, store_.get(), options_.backend.device,
                                   backend_->stream_handle(), co)
          : CreateGlooCommunicator(world, store_.get(), co);
  if (!comm.ok()) return ToGrpcStatus(comm.status());
  comm_ = *std::move(comm);
  comm_ready_ = true;
  resp->set_backend(std::string(comm_->backend_name()));
  return grpc::Status::OK;
}

grpc::Status WorkerService::LoadModel(grpc::ServerContext*, const lorcserve::internal::LoadModelRequest* req,
                                      lorcserve::internal::LoadModelResponse* resp) {
  absl::MutexLock lock(&mu_);
  if (absl::Status s = EnsureBackend(); !s.ok()) return ToGrpcStatus(s);
  const int tp_size = std::max(1, req->tp_size());
  if (tp_size > 1 && (comm_ == nullptr || comm_->world().world_size != tp_size ||
                      comm_->world().rank != req->tp_rank())) {
    return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                        absl::StrCat("tensor parallelism ", tp_size, " rank ", req->tp_rank(),
                                     " needs InitCommunicator for that rank first"));
  }
  executor_.reset();
  model_loaded_ = false;
  model_ = LoadedModel();
  ModelSource src{req->model_dir(), req->random_weights(), req->weights_seed(), req->shard_lm_head()};
  KvCacheOptions kv;
  kv.block_size = req->block_size() > 0 ? req->block_size() : 16;
  kv.num_blocks = req->num_blocks();
  if (req->kv_cache_bytes() > 0) kv.memory_bytes = req->kv_cache_bytes();
  if (req->max_num_seqs() > 0) kv.max_num_seqs = req->max_num_seqs();
  if (req->max_num_batched_tokens() > 0) kv.max_num_batched_tokens = req->max_num_batched_tokens();
  kv.max_model_len = req->max_model_len();
  kv.gpu_memory_utilization = req->gpu_memory_utilization();
  absl::StatusOr<LoadedModel> m =
      lorc::LoadModel(src, backend_.get(), req->tp_rank(), tp_size, comm_.get(), kv);
  if (!m.ok()) return ToGrpcStatus(m.status());
  model_ = *std::move(m);
  executor_ = std::make_unique<StepExecutor>(model_.runner.get(), req->tp_rank() == 0);
  model_loaded_ = true;
  resp->set_num_blocks(model_.runner->kv_spec().num_blocks);
  resp->set_kv_bytes_per_token(model_.runner->kv_spec().BytesPerToken());
  resp->set_load_seconds(model_.load_seconds);
  resp->set_backend(backend_->name());
  resp->set_device(backend_->Describe());
  return grpc::Status::OK;
}

void WorkerService::RunStep(const lorcserve::internal::StepPlan& plan,
                            lorcserve::internal::StepResult* out) {
  absl::MutexLock lock(&mu_);
  absl::StatusOr<StepResult> r =
      executor_ == nullptr ? absl::FailedPreconditionError("worker has no model loaded")
                           : executor_->Run(StepPlanFromProto(plan));
  if (!r.ok()) {
    out->Clear();
    out->set_step_id(plan.step_id());
    out->set_error_code(static_cast<int32_t>(r.status().code()));
    out->set_error_message(std::string(r.status().message()));
    return;
  }
  StepResultToProto(*r, out);
}

grpc::Status WorkerService::Steps(
    grpc::ServerContext* ctx,
    grpc::ServerReaderWriter<lorcserve::internal::StepResult, lorcserve::internal::StepPlan>* stream) {
  lorcserve::internal::StepPlan plan;
  lorcserve::internal::StepResult result;
  while (stream->Read(&plan)) {
    RunStep(plan, &result);
    if (!stream->Write(result)) break;
  }
  return grpc::Status::OK;
}

grpc::Status WorkerService::Step(grpc::ServerContext*, const lorcserve::internal::StepPlan* req,
                                 lorcserve::internal::StepResult* resp) {
  RunStep(*req, resp);
  return grpc::Status::OK;
}

grpc::Status WorkerService::Ping(grpc::ServerContext*, const lorcserve::internal::PingRequest*,
                                 lorcserve::internal::PingResponse* resp) {
  resp->set_model_loaded(model_loaded_.load());
  resp->set_communicator_ready(comm_ready_.load());
  return grpc::Status::OK;
}

}  // namespace lorc
