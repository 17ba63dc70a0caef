// lorcserve client: streams one generation from a running server (or prints its model info /
// health).
#include <iostream>
#include <optional>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "cli/api_client.h"
#include "cli/commands.h"
#include "cli/sampling_flags.h"
#include "cli/session.h"
#include "common/grpc_status.h"
#include "coordinator/request_conversion.h"
#include "google/protobuf/util/json_util.h"
#include "nlohmann/json.hpp"

namespace lorc::cli {
namespace {

int PrintInfo(lorcserve::v1::LorcServe::Stub& stub, double timeout_s, const ClientSecurity& security) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(static_cast<int64_t>(timeout_s * 1000)));
  lorcserve::v1::ModelInfoResponse resp;
  const grpc::Status s = stub.ModelInfo(&ctx, {}, &resp);
  if (!s.ok()) return Fail("client", CallError(s, security));
  std::string json;
  google::protobuf::util::JsonPrintOptions o;
  o.add_whitespace = true;
  // The proto's field names (kv_capacity_blocks, generation_defaults), as the READMEs and the
  // other commands' --json spell them; camelCase was protobuf's default (a tester).
  o.preserve_proto_field_names = true;
  o.always_print_primitive_fields = true;  // zero counters too (prefix cache, host tier)
  (void)google::protobuf::util::MessageToJsonString(resp, &json, o);
  std::cout << json;
  return 0;
}

int PrintHealth(const std::shared_ptr<grpc::Channel>& channel, const std::string& service,
                double timeout_s, const ClientSecurity& security) {
  auto stub = grpc::health::v1::Health::NewStub(channel);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(static_cast<int64_t>(timeout_s * 1000)));
  grpc::health::v1::HealthCheckRequest req;
  req.set_service(service);
  grpc::health::v1::HealthCheckResponse resp;
  const grpc::Status s = stub->Check(&ctx, req, &resp);
  if (!s.ok()) return Fail("client", CallError(s, security));
  std::cout << grpc::health::v1::HealthCheckResponse::ServingStatus_Name(resp.status()) << "\n";
  return resp.status() == grpc::health::v1::HealthCheckResponse::SERVING ? 0 : 1;
}

const char* FinishName(lorcserve::v1::FinishReason r) {
  switch (r) {
    case lorcserve::v1::FINISH_REASON_LENGTH: return "length";
    case lorcserve::v1::FINISH_REASON_STOP: return "stop";
    case lorcserve::v1::FINISH_REASON_ABORTED: return "abort";
    default: return "unspecified";
  }
}

}  // namespace

int RunClient(int argc, char** argv) {
  std::vector<FlagSpec> flags = {
      {"server", true, "coordinator address (default 127.0.0.1:50051)", "ADDR"},
      {"timeout-s", true, "deadline of the call in seconds (default 600)", "S"},
      {"info", false, "print ModelInfo as JSON"},
      {"health", false, "print the grpc.health.v1 status (exit 0 when SERVING)"},
      {"health-service", true, "with --health: the service name (default \"\": readiness; liveness)", "NAME"},
      {"close-session", true, "end a multi-turn session (CloseSession) and exit", "ID"},
      {"json", false, "print one JSON object at the end instead of streaming text"},
      {"help", false, "show this help"},
  };
  for (const std::vector<FlagSpec>& group : {ClientSecurityFlags(), RequestFlags()}) {
    flags.insert(flags.end(), group.begin(), group.end());
  }
  const char* synopsis = "--server ADDR (--prompt TEXT | --prompt-ids IDS | --info | --health | --close-session ID) [flags]";
  int exit_code = 0;
  const std::optional<Args> args = ParseCommand("client", synopsis, flags, argc, argv, &exit_code);
  if (!args.has_value()) return exit_code;
  // One action a call: a request's flags next to --info, --health or --close-session would be
  // dropped silently otherwise.
  std::vector<std::string> actions;
  for (const char* flag : {"info", "health", "close-session"}) {
    if (args->Has(flag)) actions.push_back(absl::StrCat("--", flag));
  }
  if (args->Has("prompt")) {
    actions.push_back("--prompt");
  } else if (args->Has("prompt-ids")) {
    actions.push_back("--prompt-ids");
  }
  if (actions.empty()) {
    return Fail("client", absl::InvalidArgumentError(
                              "nothing to do: give one of --prompt, --prompt-ids (a request), --info, --health or "
                              "--close-session"));
  }
  if (actions.size() > 1) {
    return Fail("client", absl::InvalidArgumentError(absl::StrCat(
                              "--info, --health, --close-session and a request (--prompt / --prompt-ids) are one "
                              "action each; got ", absl::StrJoin(actions, ", "))));
  }
  // A request's flags (sampling, session, ...) apply to a request only (--cache-salt also names a
  // session to close).
  if (!actions.empty() && actions[0] != "--prompt" && actions[0] != "--prompt-ids") {
    for (const FlagSpec& f : RequestFlags()) {
      if (args->Has(f.name) && !(f.name == "cache-salt" && actions[0] == "--close-session")) {
        return Fail("client", absl::InvalidArgumentError(absl::StrCat(
                                  "--", f.name, " applies to a request (--prompt / --prompt-ids), not to ", actions[0])));
      }
    }
  }
  absl::StatusOr<double> timeout = args->GetDouble("timeout-s", 600);
  if (!timeout.ok()) return Fail("client", timeout.status());
  if (!(*timeout > 0) || *timeout > 1e7) {
    return Fail("client", absl::InvalidArgumentError(absl::StrCat(
                              "--timeout-s: ", *timeout, " is not in (0, 1e7] seconds")));
  }
  absl::StatusOr<std::string> server = args->GetServerAddress("server", "127.0.0.1:50051");
  if (!server.ok()) return Fail("client", server.status());
  absl::StatusOr<ClientSecurity> security = ParseClientSecurity(*args);
  if (!security.ok()) return Fail("client", security.status());
  absl::StatusOr<std::shared_ptr<grpc::Channel>> connected =
      Connect(*server, *security);
  if (!connected.ok()) return Fail("client", connected.status());
  const std::shared_ptr<grpc::Channel> channel = *std::move(connected);
  auto stub = lorcserve::v1::LorcServe::NewStub(channel);
  if (args->Has("info")) return PrintInfo(*stub, *timeout, *security);
  if (args->Has("health")) return PrintHealth(channel, args->Get("health-service"), *timeout, *security);
  if (args->Has("close-session")) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() +
                     std::chrono::milliseconds(static_cast<int64_t>(*timeout * 1000)));
    lorcserve::v1::CloseSessionRequest creq;
    creq.set_session_id(args->Get("close-session"));
    creq.set_cache_salt(args->Get("cache-salt"));  // sessions are per (cache_salt, session_id)
    // Named with its byte offset before anything is sent (protobuf would print its own error).
    if (absl::Status u = CheckUtf8Fields(creq); !u.ok()) return Fail("client", NotSent(u));
    lorcserve::v1::CloseSessionResponse cresp;
    const grpc::Status s = stub->CloseSession(&ctx, creq, &cresp);
    if (!s.ok()) return Fail("client", CallError(s, *security));
    return 0;
  }

  absl::StatusOr<lorcserve::v1::GenerateRequest> req = RequestFromArgs(*args);
  if (!req.ok()) return Fail("client", req.status());
  const bool json = args->Has("json");
  // One completion streams as it comes; several are printed at the end, one per line.
  const bool stream_text = !json && !req->sampling().has_n();
  bool printed = false;
  StreamResult r = StreamGenerate(*stub, *req, *timeout, [stream_text, &printed](const lorcserve::v1::GenerateResponse& m) {
    if (stream_text && !m.text().empty()) {
      std::cout << m.text() << std::flush;
      printed = true;
    }
  });
  // The line ends before an error goes to stderr (flushed: a terminal showed the error on the text's
  // line); a call that printed nothing prints no empty line unless it succeeded (an empty completion).
  if (stream_text && (printed || r.status.ok())) std::cout << "\n" << std::flush;
  if (!r.status.ok()) return Fail("client", CallError(r.status, *security, /*answered=*/r.messages > 0));
  if (!json && !stream_text) {
    for (size_t i = 0; i < r.completions.size(); ++i) {
      std::cout << "[" << i << "] " << r.completions[i].text << "\n";
    }
  }
  const auto& u = r.final.usage();
  if (json) {
    const bool with_logprobs = req->sampling().has_logprobs();
    // Completion 0 at the top level (as before n existed), every completion in "completions".
    nlohmann::json j = CompletionJson(0, r.completions[0], with_logprobs);
    j.erase("index");
    j["request_id"] = r.final.request_id();
    j["finish_reason"] = FinishName(r.final.finish_reason());
    j["n"] = r.completions.size();
    nlohmann::json all = nlohmann::json::array();
    for (size_t i = 0; i < r.completions.size(); ++i) {
      all.push_back(CompletionJson(static_cast<int>(i), r.completions[i], with_logprobs));
    }
    j["completions"] = std::move(all);
    if (req->sampling().has_prompt_logprobs()) {
      nlohmann::json lp = nlohmann::json::array();
      for (const TokenLogprobs& t : r.prompt_logprobs) lp.push_back(LogprobsJson(t));
      j["prompt_logprobs"] = std::move(lp);
    }
    j["usage"] = {{"prompt_tokens", u.prompt_tokens()},
                  {"cached_prompt_tokens", u.cached_prompt_tokens()},
                  {"completion_tokens", u.completion_tokens()},
                  {"time_to_first_token_ms", u.time_to_first_token_ms()},
                  {"total_time_ms", u.total_time_ms()}};
    std::cout << j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) << "\n";
  } else {
    std::cerr << absl::StrCat("[", u.prompt_tokens(), " prompt tokens (", u.cached_prompt_tokens(),
                              " cached), ", u.completion_tokens(),
                              " generated (", FinishName(r.final.finish_reason()), "), first token ",
                              static_cast<int>(r.ttft_s * 1000), " ms, total ",
                              static_cast<int>(r.total_s * 1000), " ms]\n");
  }
  return 0;
}

}  // namespace lorc::cli
