// A small client of the public API, shared by `lorcserve client`, `lorcserve bench` and tests:
// sampling flags -> GenerateRequest, and one streamed generation with its timings.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "cli/args.h"
#include "cli/security_flags.h"
#include "coordinator/engine.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "grpcpp/grpcpp.h"
#include "lorcserve/v1/lorcserve.grpc.pb.h"

namespace lorc::cli {

// --prompt / --prompt-ids and the sampling flags, as `generate` names them.
std::vector<FlagSpec> RequestFlags();
// The request those flags describe. Errors (InvalidArgument): the flags' (naming the flag), and
// a string that is not valid UTF-8 ("text is not valid UTF-8 at byte offset 2 (byte 0xFF)", as
// the server would answer), found before anything is sent.
absl::StatusOr<lorcserve::v1::GenerateRequest> RequestFromArgs(const Args& args);

struct StreamResult {
  // Completion 0's tokens, text and final message (finish reason, usage).
  std::vector<int32_t> ids;
  std::string text;
  lorcserve::v1::GenerateResponse final;
  // Every completion by index (sampling.n of them): ids, text, logprobs, finish and stop reason.
  std::vector<CompletionOutput> completions;
  std::vector<TokenLogprobs> prompt_logprobs;  // when the request asked for them
  grpc::Status status;
  int64_t messages = 0;         // responses received before the status
  double ttft_s = 0;            // client-side: call start to first token
  std::vector<double> token_times_s;  // client-side arrival time of each token (completion 0)
  double total_s = 0;
};

// Runs one Generate call; `on_chunk` sees each message as it arrives (may be empty).
StreamResult StreamGenerate(lorcserve::v1::LorcServe::Stub& stub,
                            const lorcserve::v1::GenerateRequest& request, double timeout_s,
                            const std::function<void(const lorcserve::v1::GenerateResponse&)>& on_chunk = {});

// A failed call's status (FromGrpcStatus), with a hint where the cause may be the channel's
// security: UNAVAILABLE in gRPC's words for a connection closed before any answer ("Socket
// closed", "recvmsg:Connection reset by peer") names, beside a server that went away, one that
// wants TLS (over plaintext: --tls-ca) or a client certificate (over TLS without --tls-cert); a
// handshake failure over TLS reads as a plaintext server or another CA. A status the server sent
// (its message names its own cause), or any status of a call that `answered` (some response
// arrived first: the channel's security was fine), is returned as it is.
absl::Status CallError(const grpc::Status& status, const ClientSecurity& security, bool answered = false);

// A request the client refused before sending it (`status`, e.g. CheckUtf8Fields's): the same
// code, the message followed by "(checked by the client; nothing was sent)", so that it does not
// read as the server's reply.
absl::Status NotSent(const absl::Status& status);

// A plaintext channel to `address` without a token.
std::shared_ptr<grpc::Channel> Connect(const std::string& address);
// A channel with `security`'s TLS and bearer token (sent with every call, also over
// plaintext). Errors: unreadable or malformed files (naming the flag and file).
absl::StatusOr<std::shared_ptr<grpc::Channel>> Connect(const std::string& address,
                                                       const ClientSecurity& security);

}  // namespace lorc::cli
