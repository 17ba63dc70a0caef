// The public gRPC service, lorcserve.v1.LorcServe: validates and tokenizes requests, hands
// them to the engine thread, and streams each request's updates back to its client.
// Threads: gRPC handler threads; each Generate call blocks on its own RequestChannel. The engine
// loop is swapped by the coordinator (start, worker recovery, shutdown) while handlers run: each
// call takes a shared_ptr snapshot under the mutex, so a loop outlives the calls that use it.
#pragma once

#include <atomic>
#include <functional>
#include <memory>
#include <string>

#include "absl/synchronization/mutex.h"
#include "coordinator/engine_loop.h"
#include "tokenizer/tokenizer.h"
#include "lorcserve/v1/lorcserve.grpc.pb.h"
#include "model/model_config.h"

namespace lorc {

class LorcServeService final : public lorcserve::v1::LorcServe::Service {
 public:
  // `info` is the static part of ModelInfo; `live` fills in the live part (serving state, KV use).
  LorcServeService(const ModelConfig& config, const Tokenizer* tokenizer,
                   lorcserve::v1::ModelInfoResponse info,
                   std::function<void(lorcserve::v1::ModelInfoResponse*)> live);

  // The loop new requests go to. Null (model loading, recovering from a worker failure, shutting
  // down): requests get UNAVAILABLE with `why_not`'s message. Thread-safe.
  void SetLoop(std::shared_ptr<EngineLoop> loop,
               absl::Status why_not = absl::UnavailableError("model is still loading"));

  // Requests larger than this are INVALID_ARGUMENT (the transport limit is set higher).
  static constexpr size_t kMaxRequestBytes = 4 << 20;
  static constexpr int kMaxStopStrings = 64;
  static constexpr size_t kMaxStopStringBytes = 512;

  grpc::Status Generate(grpc::ServerContext* ctx, const lorcserve::v1::GenerateRequest* req,
                        grpc::ServerWriter<lorcserve::v1::GenerateResponse>* writer) override;
  grpc::Status Tokenize(grpc::ServerContext* ctx, const lorcserve::v1::TokenizeRequest* req,
                        lorcserve::v1::TokenizeResponse* resp) override;
  grpc::Status ModelInfo(grpc::ServerContext* ctx, const lorcserve::v1::ModelInfoRequest* req,
                         lorcserve::v1::ModelInfoResponse* resp) override;

 private:
  absl::StatusOr<GenerationRequest> Convert(const lorcserve::v1::GenerateRequest& req) const;

  ModelConfig config_;
  const Tokenizer* tokenizer_;
  lorcserve::v1::ModelInfoResponse info_;
  std::function<void(lorcserve::v1::ModelInfoResponse*)> live_;
  // Returns the current loop, or the status to answer with.
  absl::StatusOr<std::shared_ptr<EngineLoop>> Loop() const;

  mutable absl::Mutex mu_;
  std::shared_ptr<EngineLoop> loop_ ABSL_GUARDED_BY(mu_);
  absl::Status why_not_ ABSL_GUARDED_BY(mu_) = absl::UnavailableError("model is still loading");
  std::atomic<int64_t> next_id_{1};
};

}  // namespace lorc
