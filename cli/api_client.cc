#include "cli/api_client.h"

#include <chrono>

#include "cli/sampling_flags.h"
#include "common/status_macros.h"

namespace lorc::cli {

std::vector<FlagSpec> RequestFlags() {
  std::vector<FlagSpec> f = PromptAndSamplingFlags();
  f.push_back({"priority", true, "higher is scheduled first", "N"});
  f.push_back({"request-id", true, "echoed back in the responses", "ID"});
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
  return req;
}

std::shared_ptr<grpc::Channel> Connect(const std::string& address) {
  grpc::ChannelArguments ch;
  ch.SetMaxReceiveMessageSize(64 << 20);
  return grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(), ch);
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
  while (reader->Read(&msg)) {
    const double now = std::chrono::duration<double>(Clock::now() - t0).count();
    for (int32_t id : msg.token_ids()) {
      if (r.ids.empty()) r.ttft_s = now;
      r.ids.push_back(id);
      r.token_times_s.push_back(now);
    }
    r.text += msg.text();
    if (on_chunk) on_chunk(msg);
    if (msg.final()) r.final = msg;
  }
  r.status = reader->Finish();
  r.total_s = std::chrono::duration<double>(Clock::now() - t0).count();
  return r;
}

}  // namespace lorc::cli
