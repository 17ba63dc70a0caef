#include "cli/api_client.h"

#include <chrono>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace lorc::cli {

std::vector<FlagSpec> RequestFlags() {
  return {
      {"prompt", true, "prompt text (the server tokenizes it and adds BOS)", "TEXT"},
      {"prompt-ids", true, "prompt token ids, used as given", "0,1,2"},
      {"max-tokens", true, "tokens to generate at most (default 64)", "N"},
      {"temperature", true, "0 = greedy (default 0)", "T"},
      {"top-k", true, "keep the K most likely tokens (0 = off)", "K"},
      {"top-p", true, "nucleus sampling mass (1 = off)", "P"},
      {"min-p", true, "drop tokens below P x the top probability", "P"},
      {"repetition-penalty", true, "HF repetition penalty (1 = off)", "R"},
      {"seed", true, "sampling seed", "S"},
      {"stop", true, "stop string (repeatable)", "TEXT"},
      {"stop-id", true, "stop token id (repeatable)", "ID"},
      {"ignore-eos", false, "keep generating past EOS"},
      {"priority", true, "higher is scheduled first", "N"},
      {"request-id", true, "echoed back in the responses", "ID"},
  };
}

absl::StatusOr<lorcserve::v1::GenerateRequest> RequestFromArgs(const Args& args) {
  lorcserve::v1::GenerateRequest req;
  if (args.Has("prompt") == args.Has("prompt-ids")) {
    return absl::InvalidArgumentError("give exactly one of --prompt and --prompt-ids");
  }
  if (args.Has("prompt")) {
    req.set_text(args.Get("prompt"));
  } else {
    ASSIGN_OR_RETURN(std::vector<int32_t> ids, args.GetIntList("prompt-ids"));
    req.mutable_token_ids()->mutable_ids()->Add(ids.begin(), ids.end());
  }
  auto* s = req.mutable_sampling();
  ASSIGN_OR_RETURN(int64_t max_tokens, args.GetInt("max-tokens", 64));
  ASSIGN_OR_RETURN(double temperature, args.GetDouble("temperature", 0.0));
  ASSIGN_OR_RETURN(int64_t top_k, args.GetInt("top-k", 0));
  ASSIGN_OR_RETURN(double top_p, args.GetDouble("top-p", 1.0));
  ASSIGN_OR_RETURN(double min_p, args.GetDouble("min-p", 0.0));
  ASSIGN_OR_RETURN(double rep, args.GetDouble("repetition-penalty", 1.0));
  ASSIGN_OR_RETURN(int64_t priority, args.GetInt("priority", 0));
  s->set_max_tokens(static_cast<int32_t>(max_tokens));
  s->set_temperature(static_cast<float>(temperature));
  s->set_top_k(static_cast<int32_t>(top_k));
  s->set_top_p(static_cast<float>(top_p));
  s->set_min_p(static_cast<float>(min_p));
  s->set_repetition_penalty(static_cast<float>(rep));
  if (args.Has("seed")) {
    ASSIGN_OR_RETURN(int64_t seed, args.GetInt("seed", 0));
    s->set_seed(static_cast<uint64_t>(seed));
  }
  for (const std::string& stop : args.GetAll("stop")) s->add_stop(stop);
  for (const std::string& id : args.GetAll("stop-id")) {
    int32_t v;
    if (!absl::SimpleAtoi(id, &v)) return absl::InvalidArgumentError(absl::StrCat("--stop-id: '", id, "' is not an integer"));
    s->add_stop_token_ids(v);
  }
  s->set_ignore_eos(args.Has("ignore-eos"));
  req.set_priority(static_cast<int32_t>(priority));
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
