// The public gRPC service, lorcserve.v1.LorcServe: validates and tokenizes requests, hands
// them to the engine thread, and streams each request's updates back to its client.
//
// The methods are registered over raw request bytes (grpc::ByteBuffer) and parsed here
// (request_conversion.h: ParseRequest, ConvertGenerateRequest, TokenizeRequestIds), so that
// a request gRPC's own protobuf parsing would reject with an empty INTERNAL (a proto3 `string`
// field holding invalid UTF-8, or bytes that are no message) gets INVALID_ARGUMENT naming the
// field and the byte offset instead. The method names and message types are those of lorcserve.proto, so
// generated clients, grpcurl and server reflection see the usual service.
//
// Bearer tokens (SetAuthenticator) are checked before anything else in every method; a drain
// (StartDrain) refuses new Generate/Tokenize calls and AbortInFlight ends the admitted ones.
//
// Threads: gRPC handler threads; each Generate call blocks on its own RequestChannel. The engine
// loop is swapped by the coordinator (start, worker recovery, shutdown) while handlers run: each
// call takes a shared_ptr snapshot under the mutex, so a loop outlives the calls that use it.
#pragma once

#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "coordinator/engine_loop.h"
#include "coordinator/request_conversion.h"  // ParseRequest, ConvertGenerateRequest, limits
#include "google/protobuf/message.h"
#include "grpcpp/grpcpp.h"
#include "lorcserve/v1/lorcserve.grpc.pb.h"  // gRPC's service and handler types, the stub
#include "metrics/request_log.h"
#include "metrics/serving_metrics.h"
#include "model/model_config.h"
#include "security/auth.h"
#include "tokenizer/tokenizer.h"

namespace lorc {

class LorcServeService final : public grpc::Service {
 public:
  // `info` is the static part of ModelInfo (the EOS ids and generation defaults are added from
  // `config`); `live` fills in the live part (serving state, KV use).
  LorcServeService(const ModelConfig& config, const Tokenizer* tokenizer,
                   lorcserve::v1::ModelInfoResponse info,
                   std::function<void(lorcserve::v1::ModelInfoResponse*)> live);

  // The loop new requests go to. Null (model loading, recovering from a worker failure, shutting
  // down): requests get UNAVAILABLE with `why_not`'s message. Thread-safe.
  void SetLoop(std::shared_ptr<EngineLoop> loop,
               absl::Status why_not = absl::UnavailableError("model is still loading"));

  // Where each Generate call's outcome is counted (lorcserve_requests_total) and logged (one
  // line per call); either may be null. Call before serving; both must outlive the service.
  void SetObservability(ServingMetrics* metrics, const EventLog* log) {
    metrics_ = metrics;
    log_ = log;
  }

  // Bearer tokens (--auth-token-file): every method answers UNAUTHENTICATED without a valid
  // `authorization: Bearer <token>` before doing anything. Null (default): no tokens. Set before
  // the server starts.
  void SetAuthenticator(std::shared_ptr<const security::Authenticator> auth) { auth_ = std::move(auth); }

  // Graceful drain (SIGTERM): from now on new Generate and Tokenize calls get `why`
  // (UNAVAILABLE); the Generate calls already admitted keep streaming. Thread-safe; the first
  // call wins.
  void StartDrain(absl::Status why);
  // Ends every admitted Generate call still running with `why` (its request cancelled in the
  // engine, the tokens streamed so far stay with the client). Thread-safe.
  void AbortInFlight(absl::Status why);
  // Generate and Tokenize calls admitted and not yet returned.
  int64_t in_flight() const;

  // The handlers (registered in the constructor).
  grpc::Status Generate(grpc::ServerContext* ctx, const grpc::ByteBuffer* req,
                        grpc::ServerWriter<lorcserve::v1::GenerateResponse>* writer);
  grpc::Status Tokenize(grpc::ServerContext* ctx, const grpc::ByteBuffer* req,
                        lorcserve::v1::TokenizeResponse* resp);
  grpc::Status ModelInfo(grpc::ServerContext* ctx, const grpc::ByteBuffer* req,
                         lorcserve::v1::ModelInfoResponse* resp);
  grpc::Status CloseSession(grpc::ServerContext* ctx, const grpc::ByteBuffer* req,
                            lorcserve::v1::CloseSessionResponse* resp);

 private:
  // Generate's work; fills `rec` (id, tokens, finish outcome, first-token time) as it goes.
  grpc::Status GenerateImpl(grpc::ServerContext* ctx, const grpc::ByteBuffer* req,
                            grpc::ServerWriter<lorcserve::v1::GenerateResponse>* writer,
                            RequestLogRecord* rec);

  // "/lorcserve.v1.LorcServe/<method>", referenced by the registered methods.
  const std::string generate_name_, tokenize_name_, model_info_name_, close_session_name_;
  ModelConfig config_;
  const Tokenizer* tokenizer_;
  lorcserve::v1::ModelInfoResponse info_;
  std::function<void(lorcserve::v1::ModelInfoResponse*)> live_;
  // Returns the current loop, or the status to answer with.
  absl::StatusOr<std::shared_ptr<EngineLoop>> Loop() const;

  // Admits a Generate/Tokenize call (counted in in_flight() until Leave()), or the drain status.
  absl::Status Enter();
  void Leave();
  // OK without an authenticator, else its verdict on the call's metadata.
  grpc::Status CheckAuth(const grpc::ServerContext& ctx) const;
  // The AbortInFlight status, or OK.
  absl::Status Aborted() const;

  std::shared_ptr<const security::Authenticator> auth_;
  mutable absl::Mutex mu_;
  bool draining_ ABSL_GUARDED_BY(mu_) = false;
  absl::Status drain_status_ ABSL_GUARDED_BY(mu_);
  int64_t in_flight_ ABSL_GUARDED_BY(mu_) = 0;
  std::atomic<bool> aborting_{false};
  absl::Status abort_status_ ABSL_GUARDED_BY(mu_);
  std::shared_ptr<EngineLoop> loop_ ABSL_GUARDED_BY(mu_);
  absl::Status why_not_ ABSL_GUARDED_BY(mu_) = absl::UnavailableError("model is still loading");
  std::atomic<int64_t> next_id_{1};
  ServingMetrics* metrics_ = nullptr;
  const EventLog* log_ = nullptr;
};

}  // namespace lorc
