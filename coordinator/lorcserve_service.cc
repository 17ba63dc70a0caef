#include "coordinator/lorcserve_service.h"

#include <algorithm>
#include <chrono>
#include <utility>
#include <vector>

#include "absl/cleanup/cleanup.h"
#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "common/grpc_status.h"
#include "google/protobuf/descriptor.h"

namespace lorc {
namespace {

lorcserve::v1::FinishReason ToProto(FinishReason r) {
  switch (r) {
    case FinishReason::kLength: return lorcserve::v1::FINISH_REASON_LENGTH;
    case FinishReason::kStop: return lorcserve::v1::FINISH_REASON_STOP;
    case FinishReason::kAborted: return lorcserve::v1::FINISH_REASON_ABORTED;
    default: return lorcserve::v1::FINISH_REASON_UNSPECIFIED;
  }
}

void ToProto(const TokenLogprobs& t, lorcserve::v1::TokenLogprobs* out) {
  out->set_logprob(t.logprob);
  out->set_rank(t.rank);
  const size_t n = std::min(t.top_ids.size(), t.top_logprobs.size());
  for (size_t i = 0; i < n; ++i) {
    lorcserve::v1::TopLogprob* top = out->add_top();
    top->set_id(t.top_ids[i]);
    top->set_logprob(t.top_logprobs[i]);
  }
}

void AddGenerationDefaults(const ModelConfig& c, lorcserve::v1::ModelInfoResponse* info) {
  for (int64_t id : c.eos_token_ids) info->add_eos_token_ids(static_cast<int32_t>(id));
  const GenerationDefaults& g = c.generation;
  lorcserve::v1::GenerationDefaults* d = info->mutable_generation_defaults();
  d->set_present(g.present);
  for (int64_t id : g.eos_token_ids) d->add_eos_token_ids(static_cast<int32_t>(id));
  if (g.do_sample) d->set_do_sample(*g.do_sample);
  if (g.temperature) d->set_temperature(static_cast<float>(*g.temperature));
  if (g.top_p) d->set_top_p(static_cast<float>(*g.top_p));
  if (g.top_k) d->set_top_k(static_cast<int32_t>(std::min<int64_t>(*g.top_k, INT32_MAX)));
  if (g.min_p) d->set_min_p(static_cast<float>(*g.min_p));
  if (g.repetition_penalty) d->set_repetition_penalty(static_cast<float>(*g.repetition_penalty));
  if (g.max_new_tokens) {
    d->set_max_new_tokens(static_cast<int32_t>(std::min<int64_t>(*g.max_new_tokens, INT32_MAX)));
  }
}

std::string MethodName(const char* method) {
  return absl::StrCat("/", lorcserve::v1::GenerateRequest::descriptor()->file()->package(),
                      ".LorcServe/", method);
}

}  // namespace

namespace {

// Parses a request's raw bytes into `msg` (ParseRequest), as a grpc::Status.
grpc::Status ParseBuffer(const grpc::ByteBuffer& buffer, google::protobuf::Message* msg) {
  // No message at all: the call ended (cancelled, or its deadline passed) before its request
  // arrived. CANCELLED, which Generate counts as the deadline's when that has passed (it read
  // FAILED_PRECONDITION "Buffer not initialized", counted and logged as such: a tester).
  if (!buffer.Valid()) {
    return grpc::Status(grpc::StatusCode::CANCELLED, "the call ended before its request arrived");
  }
  if (buffer.Length() > kMaxRequestBytes) {
    return ToGrpcStatus(absl::InvalidArgumentError(
        absl::StrCat("request of ", buffer.Length(), " bytes exceeds the limit of ",
                     kMaxRequestBytes, " bytes")));
  }
  grpc::Slice slice;
  if (grpc::Status s = buffer.DumpToSingleSlice(&slice); !s.ok()) return s;
  return ToGrpcStatus(ParseRequest(
      std::string_view(reinterpret_cast<const char*>(slice.begin()), slice.size()), msg));
}

}  // namespace

LorcServeService::LorcServeService(const ModelConfig& config, const Tokenizer* tokenizer,
                                   lorcserve::v1::ModelInfoResponse info,
                                   std::function<void(lorcserve::v1::ModelInfoResponse*)> live)
    : generate_name_(MethodName("Generate")),
      tokenize_name_(MethodName("Tokenize")),
      model_info_name_(MethodName("ModelInfo")),
      close_session_name_(MethodName("CloseSession")),
      config_(config),
      tokenizer_(tokenizer),
      info_(std::move(info)),
      live_(std::move(live)) {
  AddGenerationDefaults(config_, &info_);
  // As the generated LorcServe::Service registers them, but over the raw request bytes.
  using grpc::internal::RpcMethod;
  using grpc::internal::RpcServiceMethod;
  using Self = LorcServeService;
  AddMethod(new RpcServiceMethod(
      generate_name_.c_str(), RpcMethod::SERVER_STREAMING,
      new grpc::internal::ServerStreamingHandler<Self, grpc::ByteBuffer,
                                                 lorcserve::v1::GenerateResponse>(
          [](Self* s, grpc::ServerContext* ctx, const grpc::ByteBuffer* req,
             grpc::ServerWriter<lorcserve::v1::GenerateResponse>* w) {
            return s->Generate(ctx, req, w);
          },
          this)));
  AddMethod(new RpcServiceMethod(
      tokenize_name_.c_str(), RpcMethod::NORMAL_RPC,
      new grpc::internal::RpcMethodHandler<Self, grpc::ByteBuffer, lorcserve::v1::TokenizeResponse,
                                           grpc::ByteBuffer, grpc::protobuf::MessageLite>(
          [](Self* s, grpc::ServerContext* ctx, const grpc::ByteBuffer* req,
             lorcserve::v1::TokenizeResponse* resp) { return s->Tokenize(ctx, req, resp); },
          this)));
  AddMethod(new RpcServiceMethod(
      model_info_name_.c_str(), RpcMethod::NORMAL_RPC,
      new grpc::internal::RpcMethodHandler<Self, grpc::ByteBuffer, lorcserve::v1::ModelInfoResponse,
                                           grpc::ByteBuffer, grpc::protobuf::MessageLite>(
          [](Self* s, grpc::ServerContext* ctx, const grpc::ByteBuffer* req,
             lorcserve::v1::ModelInfoResponse* resp) { return s->ModelInfo(ctx, req, resp); },
          this)));
  AddMethod(new RpcServiceMethod(
      close_session_name_.c_str(), RpcMethod::NORMAL_RPC,
      new grpc::internal::RpcMethodHandler<Self, grpc::ByteBuffer,
                                           lorcserve::v1::CloseSessionResponse, grpc::ByteBuffer,
                                           grpc::protobuf::MessageLite>(
          [](Self* s, grpc::ServerContext* ctx, const grpc::ByteBuffer* req,
             lorcserve::v1::CloseSessionResponse* resp) { return s->CloseSession(ctx, req, resp); },
          this)));
}

void LorcServeService::SetLoop(std::shared_ptr<EngineLoop> loop, absl::Status why_not) {
  absl::MutexLock lock(&mu_);
  loop_ = std::move(loop);
  why_not_ = why_not.ok() ? absl::UnavailableError("not serving") : std::move(why_not);
}

void LorcServeService::StartDrain(absl::Status why) {
  absl::MutexLock lock(&mu_);
  if (draining_) return;
  draining_ = true;
  drain_status_ = std::move(why);
}

void LorcServeService::AbortInFlight(absl::Status why) {
  absl::MutexLock lock(&mu_);
  abort_status_ = std::move(why);
  aborting_.store(true);
}

int64_t LorcServeService::in_flight() const {
  absl::MutexLock lock(&mu_);
  return in_flight_;
}

absl::Status LorcServeService::Enter() {
  absl::MutexLock lock(&mu_);
  if (draining_) return drain_status_;
  ++in_flight_;
  return absl::OkStatus();
}

void LorcServeService::Leave() {
  absl::MutexLock lock(&mu_);
  --in_flight_;
}

grpc::Status LorcServeService::CheckAuth(const grpc::ServerContext& ctx) const {
  return auth_ == nullptr ? grpc::Status::OK : auth_->Check(ctx);
}

absl::Status LorcServeService::Aborted() const {
  if (!aborting_.load()) return absl::OkStatus();
  absl::MutexLock lock(&mu_);
  return abort_status_;
}

absl::StatusOr<std::shared_ptr<EngineLoop>> LorcServeService::Loop() const {
  absl::MutexLock lock(&mu_);
  if (loop_ == nullptr) return why_not_;
  return loop_;
}

grpc::Status LorcServeService::Generate(grpc::ServerContext* ctx, const grpc::ByteBuffer* raw,
                                        grpc::ServerWriter<lorcserve::v1::GenerateResponse>* writer) {
  const auto start = std::chrono::steady_clock::now();
  if (metrics_ != nullptr) metrics_->RequestStarted();  // ended by CountRequest below
  RequestLogRecord rec;
  grpc::Status status = GenerateImpl(ctx, raw, writer, &rec);
  rec.duration_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (!status.ok()) {
    // A cancellation past the client's deadline is the deadline's.
    const absl::StatusCode code =
        status.error_code() == grpc::StatusCode::CANCELLED &&
                ctx->deadline() <= std::chrono::system_clock::now()
            ? absl::StatusCode::kDeadlineExceeded
            : static_cast<absl::StatusCode>(status.error_code());
    rec.outcome = ServingMetrics::OutcomeOfStatus(code);
    rec.status_message = code == absl::StatusCode::kDeadlineExceeded && status.error_code() == grpc::StatusCode::CANCELLED
                             ? "the client's deadline passed"
                             : status.error_message();
  }
  if (metrics_ != nullptr) metrics_->CountRequest(rec.outcome);
  if (log_ != nullptr) log_->Request(rec);
  return status;
}

grpc::Status LorcServeService::GenerateImpl(grpc::ServerContext* ctx, const grpc::ByteBuffer* raw,
                                            grpc::ServerWriter<lorcserve::v1::GenerateResponse>* writer,
                                            RequestLogRecord* rec) {
  const auto start = std::chrono::steady_clock::now();
  if (grpc::Status s = CheckAuth(*ctx); !s.ok()) return s;
  if (absl::Status s = Enter(); !s.ok()) return ToGrpcStatus(s);
  const absl::Cleanup leave = [this] { Leave(); };
  lorcserve::v1::GenerateRequest req;
  if (grpc::Status s = ParseBuffer(*raw, &req); !s.ok()) return s;
  // Logged even when refused (over kMaxRequestIdBytes: ConvertGenerateRequest), so cut to that
  // many bytes at a UTF-8 character boundary (the field is valid UTF-8: ParseBuffer).
  const std::string& rid = req.request_id();
  size_t cut = std::min(rid.size(), kMaxRequestIdBytes);
  while (cut > 0 && cut < rid.size() && (static_cast<unsigned char>(rid[cut]) & 0xC0) == 0x80) --cut;
  rec->request_id = rid.substr(0, cut);
  // The request's own faults first: INVALID_ARGUMENT naming the field whatever the group's state
  // (while loading or recovering it said UNAVAILABLE, and a client retried a request that could
  // never pass; a tester).
  absl::StatusOr<GenerationRequest> g = ConvertGenerateRequest(req, config_, tokenizer_);
  if (!g.ok()) return ToGrpcStatus(g.status());
  absl::StatusOr<std::shared_ptr<EngineLoop>> current = Loop();
  if (!current.ok()) return ToGrpcStatus(current.status());
  const std::shared_ptr<EngineLoop> loop = *std::move(current);
  if (absl::Status f = loop->failure(); !f.ok()) return ToGrpcStatus(f);
  const int64_t id = next_id_.fetch_add(1);
  const std::string request_id =
      req.request_id().empty() ? absl::StrCat("req-", id) : req.request_id();
  const int32_t num_completions = g->params.n;
  rec->request_id = request_id;
  rec->n = num_completions;
  rec->prompt_tokens = static_cast<int64_t>(g->prompt_ids.size());
  rec->outcome = "stop";  // "length" once any completion ends at its limit
  int32_t num_final = 0;
  bool prompt_logprobs_sent = false;
  auto channel = std::make_shared<RequestChannel>();
  loop->Submit(id, *std::move(g), channel);
  for (;;) {
    for (RequestUpdate& u : channel->Take(absl::Milliseconds(50))) {
      if (!u.new_ids.empty()) {
        rec->completion_tokens += static_cast<int64_t>(u.new_ids.size());
        if (rec->ttft_s < 0) {
          rec->ttft_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        }
      }
      // Every update carries it once known: a request that ends by deadline or cancel logs it too.
      rec->cached_prompt_tokens = std::max(rec->cached_prompt_tokens, u.cached_prompt_tokens);
      if (u.finished && u.status.ok() && u.reason == FinishReason::kLength) rec->outcome = "length";
      lorcserve::v1::GenerateResponse resp;
      resp.set_request_id(request_id);
      resp.set_index(u.index);
      resp.mutable_token_ids()->Add(u.new_ids.begin(), u.new_ids.end());
      for (const TokenLogprobs& t : u.logprobs) ToProto(t, resp.add_logprobs());
      resp.set_text(std::move(u.new_text));
      // With the request's first token (whichever completion), or its first final message.
      if (!prompt_logprobs_sent && !u.prompt_logprobs.empty()) {
        for (const TokenLogprobs& t : u.prompt_logprobs) ToProto(t, resp.add_prompt_logprobs());
        prompt_logprobs_sent = true;
      }
      if (u.finished) {
        if (!u.status.ok()) {
          // Whatever was generated before the failure still goes out, then the error.
          if (resp.token_ids_size() > 0 || !resp.text().empty()) writer->Write(resp);
          return ToGrpcStatus(u.status);
        }
        resp.set_final(true);
        resp.set_finish_reason(ToProto(u.reason));
        if (u.stop_reason.token_id >= 0) {
          resp.set_stop_token_id(u.stop_reason.token_id);
        } else if (!u.stop_reason.stop_string.empty()) {
          resp.set_stop_string(u.stop_reason.stop_string);
        }
        auto* usage = resp.mutable_usage();
        usage->set_prompt_tokens(static_cast<int32_t>(u.prompt_tokens));
        usage->set_cached_prompt_tokens(static_cast<int32_t>(u.cached_prompt_tokens));
        usage->set_completion_tokens(static_cast<int32_t>(u.completion_tokens));
        usage->set_time_to_first_token_ms(u.time_to_first_token_s * 1e3);
        usage->set_total_time_ms(u.total_time_s * 1e3);
        if (++num_final >= num_completions) {
          // The last final message goes out with the OK status in one batch (WriteLast): written
          // apart, a client deadline expiring between the two gave the client a final message
          // and then DEADLINE_EXCEEDED (seen once in the 10,000-request soak). Together, the
          // client sees either both or, past its deadline, the status alone.
          writer->WriteLast(resp, grpc::WriteOptions());
          return grpc::Status::OK;
        }
        const bool written = writer->Write(resp);
        if (written) continue;
      } else if (writer->Write(resp)) {
        continue;
      }
      loop->Cancel(id, absl::CancelledError("client went away"));
      return grpc::Status(grpc::StatusCode::CANCELLED, "client went away");
    }
    if (absl::Status aborted = Aborted(); !aborted.ok()) {
      // The drain timeout: end the request (its KV blocks freed) with the drain's status.
      loop->Cancel(id, aborted);
      return ToGrpcStatus(aborted);
    }
    if (ctx->IsCancelled()) {
      // Client cancellation or deadline: free the request's KV blocks now.
      loop->Cancel(id, absl::CancelledError("cancelled by the client or its deadline"));
      return grpc::Status(grpc::StatusCode::CANCELLED, "request cancelled");
    }
  }
}

grpc::Status LorcServeService::Tokenize(grpc::ServerContext* ctx, const grpc::ByteBuffer* raw,
                                        lorcserve::v1::TokenizeResponse* resp) {
  if (grpc::Status s = CheckAuth(*ctx); !s.ok()) return s;
  if (absl::Status s = Enter(); !s.ok()) return ToGrpcStatus(s);
  const absl::Cleanup leave = [this] { Leave(); };
  lorcserve::v1::TokenizeRequest req;
  if (grpc::Status s = ParseBuffer(*raw, &req); !s.ok()) return s;
  absl::StatusOr<std::vector<int32_t>> ids = TokenizeRequestIds(req, config_, tokenizer_);
  if (!ids.ok()) return ToGrpcStatus(ids.status());
  resp->mutable_ids()->Add(ids->begin(), ids->end());
  return grpc::Status::OK;
}

grpc::Status LorcServeService::ModelInfo(grpc::ServerContext* ctx, const grpc::ByteBuffer* raw,
                                         lorcserve::v1::ModelInfoResponse* resp) {
  if (grpc::Status s = CheckAuth(*ctx); !s.ok()) return s;
  lorcserve::v1::ModelInfoRequest req;
  if (grpc::Status s = ParseBuffer(*raw, &req); !s.ok()) return s;
  *resp = info_;
  if (live_) live_(resp);
  return grpc::Status::OK;
}

grpc::Status LorcServeService::CloseSession(grpc::ServerContext* ctx, const grpc::ByteBuffer* raw,
                                            lorcserve::v1::CloseSessionResponse*) {
  if (grpc::Status s = CheckAuth(*ctx); !s.ok()) return s;
  lorcserve::v1::CloseSessionRequest req;
  if (grpc::Status s = ParseBuffer(*raw, &req); !s.ok()) return s;
  if (absl::Status s = CheckCloseSessionRequest(req); !s.ok()) return ToGrpcStatus(s);
  absl::StatusOr<std::shared_ptr<EngineLoop>> loop = Loop();
  if (!loop.ok()) return ToGrpcStatus(loop.status());
  return ToGrpcStatus((*loop)->CloseSession(req.cache_salt(), req.session_id()));
}

}  // namespace lorc
