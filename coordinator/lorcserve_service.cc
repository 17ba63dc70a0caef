#include "coordinator/lorcserve_service.h"

#include "absl/strings/str_cat.h"
#include "common/defaults.h"
#include "common/grpc_status.h"
#include "common/status_macros.h"
#include "tokenizer/prompt.h"

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

}  // namespace

LorcServeService::LorcServeService(const ModelConfig& config, const Tokenizer* tokenizer,
                                   lorcserve::v1::ModelInfoResponse info,
                                   std::function<void(lorcserve::v1::ModelInfoResponse*)> live)
    : config_(config), tokenizer_(tokenizer), info_(std::move(info)), live_(std::move(live)) {}

absl::StatusOr<GenerationRequest> LorcServeService::Convert(const lorcserve::v1::GenerateRequest& req) const {
  GenerationRequest g;
  if (const size_t n = req.ByteSizeLong(); n > kMaxRequestBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("request of ", n, " bytes exceeds the limit of ", kMaxRequestBytes, " bytes"));
  }
  if (req.sampling().stop_size() > kMaxStopStrings) {
    return absl::InvalidArgumentError(absl::StrCat("at most ", kMaxStopStrings, " stop strings"));
  }
  for (const std::string& s : req.sampling().stop()) {
    if (s.size() > kMaxStopStringBytes) {
      return absl::InvalidArgumentError(
          absl::StrCat("stop string of ", s.size(), " bytes exceeds ", kMaxStopStringBytes));
    }
  }
  if (req.sampling().max_tokens() < 0) {
    return absl::InvalidArgumentError(absl::StrCat("max_tokens must be >= 1, got ", req.sampling().max_tokens()));
  }
  switch (req.prompt_case()) {
    case lorcserve::v1::GenerateRequest::kText: {
      if (req.text().empty()) return absl::InvalidArgumentError("empty prompt");
      if (tokenizer_ == nullptr) {
        return absl::InvalidArgumentError("the model has no tokenizer: send token_ids");
      }
      ASSIGN_OR_RETURN(g.prompt_ids, PromptToIds(*tokenizer_, req.text(), config_.bos_token_id));
      break;
    }
    case lorcserve::v1::GenerateRequest::kTokenIds:
      g.prompt_ids.assign(req.token_ids().ids().begin(), req.token_ids().ids().end());
      break;
    default:
      return absl::InvalidArgumentError("empty prompt: set text or token_ids");
  }
  if (g.prompt_ids.empty()) return absl::InvalidArgumentError("empty prompt");
  const lorcserve::v1::SamplingOptions& s = req.sampling();
  SamplingParams& p = g.params;
  p.temperature = s.temperature();
  p.top_k = s.top_k();
  p.top_p = s.has_top_p() ? s.top_p() : 1.0f;
  p.min_p = s.min_p();
  p.repetition_penalty = s.has_repetition_penalty() ? s.repetition_penalty() : 1.0f;
  if (s.has_seed()) p.seed = s.seed();
  p.max_tokens = s.max_tokens() == 0 ? defaults::kMaxTokens : s.max_tokens();
  p.stop_token_ids.assign(s.stop_token_ids().begin(), s.stop_token_ids().end());
  p.stop_strings.assign(s.stop().begin(), s.stop().end());
  p.ignore_eos = s.ignore_eos();
  g.priority = req.priority();
  // The scheduler validates ids, sampling values and lengths (INVALID_ARGUMENT) on Add.
  return g;
}

void LorcServeService::SetLoop(std::shared_ptr<EngineLoop> loop, absl::Status why_not) {
  absl::MutexLock lock(&mu_);
  loop_ = std::move(loop);
  why_not_ = why_not.ok() ? absl::UnavailableError("not serving") : std::move(why_not);
}

absl::StatusOr<std::shared_ptr<EngineLoop>> LorcServeService::Loop() const {
  absl::MutexLock lock(&mu_);
  if (loop_ == nullptr) return why_not_;
  return loop_;
}

grpc::Status LorcServeService::Generate(grpc::ServerContext* ctx, const lorcserve::v1::GenerateRequest* req,
                                        grpc::ServerWriter<lorcserve::v1::GenerateResponse>* writer) {
  absl::StatusOr<std::shared_ptr<EngineLoop>> current = Loop();
  if (!current.ok()) return ToGrpcStatus(current.status());
  const std::shared_ptr<EngineLoop> loop = *std::move(current);
  if (absl::Status f = loop->failure(); !f.ok()) return ToGrpcStatus(f);
  absl::StatusOr<GenerationRequest> g = Convert(*req);
  if (!g.ok()) return ToGrpcStatus(g.status());
  const int64_t id = next_id_.fetch_add(1);
  const std::string request_id = req->request_id().empty() ? absl::StrCat("req-", id) : req->request_id();
  auto channel = std::make_shared<RequestChannel>();
  loop->Submit(id, *std::move(g), channel);
  for (;;) {
    for (RequestUpdate& u : channel->Take(absl::Milliseconds(50))) {
      lorcserve::v1::GenerateResponse resp;
      resp.set_request_id(request_id);
      resp.mutable_token_ids()->Add(u.new_ids.begin(), u.new_ids.end());
      resp.set_text(std::move(u.new_text));
      if (u.finished) {
        if (!u.status.ok()) {
          // Whatever was generated before the failure still goes out, then the error.
          if (resp.token_ids_size() > 0 || !resp.text().empty()) writer->Write(resp);
          return ToGrpcStatus(u.status);
        }
        resp.set_final(true);
        resp.set_finish_reason(ToProto(u.reason));
        auto* usage = resp.mutable_usage();
        usage->set_prompt_tokens(static_cast<int32_t>(u.prompt_tokens));
        usage->set_cached_prompt_tokens(0);
        usage->set_completion_tokens(static_cast<int32_t>(u.completion_tokens));
        usage->set_time_to_first_token_ms(u.time_to_first_token_s * 1e3);
        usage->set_total_time_ms(u.total_time_s * 1e3);
        writer->Write(resp);
        return grpc::Status::OK;
      }
      if (!writer->Write(resp)) {
        loop->Cancel(id, absl::CancelledError("client went away"));
        return grpc::Status(grpc::StatusCode::CANCELLED, "client went away");
      }
    }
    if (ctx->IsCancelled()) {
      // Client cancellation or deadline: free the request's KV blocks now.
      loop->Cancel(id, absl::CancelledError("cancelled by the client or its deadline"));
      return grpc::Status(grpc::StatusCode::CANCELLED, "request cancelled");
    }
  }
}

grpc::Status LorcServeService::Tokenize(grpc::ServerContext*, const lorcserve::v1::TokenizeRequest* req,
                                        lorcserve::v1::TokenizeResponse* resp) {
  if (tokenizer_ == nullptr) return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION, "the model has no tokenizer");
  absl::StatusOr<std::vector<int32_t>> ids = tokenizer_->Encode(req->text(), req->add_special_tokens());
  if (!ids.ok()) return ToGrpcStatus(ids.status());
  resp->mutable_ids()->Add(ids->begin(), ids->end());
  return grpc::Status::OK;
}

grpc::Status LorcServeService::ModelInfo(grpc::ServerContext*, const lorcserve::v1::ModelInfoRequest*,
                                         lorcserve::v1::ModelInfoResponse* resp) {
  *resp = info_;
  if (live_) live_(resp);
  return grpc::Status::OK;
}

}  // namespace lorc
