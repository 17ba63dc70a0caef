#include "cli/api_client.h"

#include <algorithm>
#include <chrono>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "cli/sampling_flags.h"
#include "common/grpc_status.h"
#include "common/status_macros.h"
#include "coordinator/lorcserve_service.h"

namespace lorc::cli {
namespace {

TokenLogprobs FromProto(const lorcserve::v1::TokenLogprobs& p) {
  TokenLogprobs t;
  t.logprob = p.logprob();
  t.rank = p.rank();
  for (const lorcserve::v1::TopLogprob& top : p.top()) {
    t.top_ids.push_back(top.id());
    t.top_logprobs.push_back(top.logprob());
  }
  return t;
}

FinishReason FromProto(lorcserve::v1::FinishReason r) {
  switch (r) {
    case lorcserve::v1::FINISH_REASON_LENGTH: return FinishReason::kLength;
    case lorcserve::v1::FINISH_REASON_STOP: return FinishReason::kStop;
    case lorcserve::v1::FINISH_REASON_ABORTED: return FinishReason::kAborted;
    default: return FinishReason::kNone;
  }
}

}  // namespace

std::vector<FlagSpec> RequestFlags() {
  std::vector<FlagSpec> f = PromptAndSamplingFlags();
  f.push_back({"priority", true, "higher is scheduled first", "N"});
  f.push_back({"request-id", true, "echoed back in the responses", "ID"});
  f.push_back({"session-id", true, "multi-turn session: keep this conversation's KV blocks (at most 256 bytes)",
               "ID"});
  f.push_back({"cache-salt", true, "tenant salt: never share cached blocks with other salts (at most 256 bytes)",
               "S"});
  return f;
}

absl::StatusOr<lorcserve::v1::GenerateRequest> RequestFromArgs(const Args& args) {
  lorcserve::v1::GenerateRequest req;
  RETURN_IF_ERROR(CheckOnePrompt(args));
  if (args.Has("prompt")) {
    req.set_text(args.Get("prompt"));
  } else {
    ASSIGN_OR_RETURN(std::vector<int32_t> ids, args.GetIntList("prompt-ids"));
    req.mutable_token_ids()->mutable_ids()->Add(ids.begin(), ids.end());
  }
  ASSIGN_OR_RETURN(SamplingParams p, ParseSampling(args));
  auto* s = req.mutable_sampling();
  s->set_max_tokens(p.max_tokens);
  if (args.Has("n")) s->set_n(p.n);
  s->set_min_tokens(p.min_tokens);
  s->mutable_allowed_token_ids()->Add(p.allowed_token_ids.begin(), p.allowed_token_ids.end());
  for (const auto& [id, bias] : p.logit_bias) (*s->mutable_logit_bias())[id] = bias;
  s->set_presence_penalty(p.presence_penalty);
  s->set_frequency_penalty(p.frequency_penalty);
  if (p.logprobs.has_value()) s->set_logprobs(*p.logprobs);
  if (p.prompt_logprobs.has_value()) s->set_prompt_logprobs(*p.prompt_logprobs);
  s->set_include_stop_str_in_output(p.include_stop_str_in_output);
  s->set_temperature(p.temperature);
  s->set_top_k(p.top_k);
  s->set_top_p(p.top_p);
  s->set_min_p(p.min_p);
  s->set_repetition_penalty(p.repetition_penalty);
  if (p.seed.has_value()) s->set_seed(*p.seed);
  for (const std::string& stop : p.stop_strings) s->add_stop(stop);
  s->mutable_stop_token_ids()->Add(p.stop_token_ids.begin(), p.stop_token_ids.end());
  s->set_ignore_eos(p.ignore_eos);
  ASSIGN_OR_RETURN(int32_t priority, args.GetInt32("priority", 0));
  req.set_priority(priority);
  req.set_request_id(args.Get("request-id"));
  req.set_session_id(args.Get("session-id"));
  req.set_cache_salt(args.Get("cache-salt"));
  // Before sending: protobuf would refuse to serialize it (logging a line of its own).
  if (absl::Status u = CheckUtf8Fields(req); !u.ok()) return NotSent(u);
  return req;
}

absl::Status CallError(const grpc::Status& status, const ClientSecurity& security, bool answered) {
  absl::Status s = FromGrpcStatus(status);
  if (s.code() != absl::StatusCode::kUnavailable || answered) return s;
  const absl::string_view m = s.message();
  // gRPC's own words for a connection closed before any answer. A server's status names its own
  // cause ("worker 1 (...): ... Connection reset by peer") and gets no hint: it did answer.
  const bool transport = m == "Socket closed" || absl::StartsWith(m, "recvmsg:") ||
                         absl::StartsWith(m, "Connection reset") ||
                         (absl::StartsWith(m, "failed to connect to all addresses") &&
                          (absl::EndsWith(m, "Socket closed") || absl::StrContains(m, "Connection reset")));
  std::string hint;
  if (transport && !security.tls.enabled()) {
    hint = "the connection closed without an answer: the server went away, or it serves TLS (then pass --tls-ca)";
  } else if (transport && security.tls.cert_file.empty()) {
    hint = "the connection closed without an answer: the server went away, or it wants a client certificate "
           "(mutual TLS: pass --tls-cert and --tls-key)";
  } else if (security.tls.enabled() && absl::StrContains(absl::AsciiStrToLower(m), "handshake")) {
    hint = "the TLS handshake failed: the server may be plaintext (drop --tls-ca) or its certificate not signed by "
           "--tls-ca / not valid for the name (--tls-server-name)";
  }
  if (hint.empty()) return s;
  return absl::Status(s.code(), absl::StrCat(m, " (", hint, ")"));
}

absl::Status NotSent(const absl::Status& status) {
  return absl::Status(status.code(), absl::StrCat(status.message(), " (checked by the client; nothing was sent)"));
}

std::shared_ptr<grpc::Channel> Connect(const std::string& address) {
  grpc::ChannelArguments ch;
  ch.SetMaxReceiveMessageSize(64 << 20);
  return grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(), ch);
}

absl::StatusOr<std::shared_ptr<grpc::Channel>> Connect(const std::string& address,
                                                       const ClientSecurity& security) {
  grpc::ChannelArguments ch;
  ch.SetMaxReceiveMessageSize(64 << 20);
  if (!security.tls.server_name.empty()) ch.SetSslTargetNameOverride(security.tls.server_name);
  ASSIGN_OR_RETURN(std::shared_ptr<grpc::ChannelCredentials> creds,
                   security::ChannelCredentials(security.tls));
  if (security.token.empty()) return grpc::CreateCustomChannel(address, creds, ch);
  std::vector<std::unique_ptr<grpc::experimental::ClientInterceptorFactoryInterface>> interceptors;
  interceptors.push_back(security::BearerTokenInterceptorFactory(security.token));
  return grpc::experimental::CreateCustomChannelWithInterceptors(address, creds, ch,
                                                                 std::move(interceptors));
}

StreamResult StreamGenerate(lorcserve::v1::LorcServe::Stub& stub,
                            const lorcserve::v1::GenerateRequest& request, double timeout_s,
                            const std::function<void(const lorcserve::v1::GenerateResponse&)>& on_chunk) {
  using Clock = std::chrono::steady_clock;
  StreamResult r;
  grpc::ClientContext ctx;
  if (timeout_s > 0) {
    ctx.set_deadline(std::chrono::system_clock::now() +
                     std::chrono::milliseconds(static_cast<int64_t>(timeout_s * 1000)));
  }
  const auto t0 = Clock::now();
  auto reader = stub.Generate(&ctx, request);
  lorcserve::v1::GenerateResponse msg;
  r.completions.resize(std::max(1, request.sampling().has_n() ? request.sampling().n() : 1));
  while (reader->Read(&msg)) {
    ++r.messages;
    const double now = std::chrono::duration<double>(Clock::now() - t0).count();
    if (msg.index() < 0 || msg.index() >= static_cast<int32_t>(r.completions.size())) continue;
    CompletionOutput& c = r.completions[msg.index()];
    c.output_ids.insert(c.output_ids.end(), msg.token_ids().begin(), msg.token_ids().end());
    c.text += msg.text();
    for (const lorcserve::v1::TokenLogprobs& t : msg.logprobs()) c.logprobs.push_back(FromProto(t));
    for (const lorcserve::v1::TokenLogprobs& t : msg.prompt_logprobs()) {
      r.prompt_logprobs.push_back(FromProto(t));
    }
    if (msg.final()) {
      c.finish = FromProto(msg.finish_reason());
      if (msg.has_stop_token_id()) c.stop_reason.token_id = msg.stop_token_id();
      if (msg.has_stop_string()) c.stop_reason.stop_string = msg.stop_string();
    }
    if (msg.index() == 0) {
      for (int32_t id : msg.token_ids()) {
        if (r.ids.empty()) r.ttft_s = now;
        r.ids.push_back(id);
        r.token_times_s.push_back(now);
      }
      r.text += msg.text();
      if (msg.final()) r.final = msg;
    }
    if (on_chunk) on_chunk(msg);
  }
  r.status = reader->Finish();
  r.total_s = std::chrono::duration<double>(Clock::now() - t0).count();
  return r;
}

}  // namespace lorc::cli
