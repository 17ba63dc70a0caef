// What the public service does with a request's bytes before the engine sees them: parse the
// wire format (with UTF-8 errors that name the field), then convert and validate a
// GenerateRequest into the engine's GenerationRequest, or tokenize a TokenizeRequest. Pure
// functions of their inputs (no gRPC server, no engine): LorcServeService calls exactly these,
// and so do the fuzz harnesses (fuzz/README.md). Thread-safe.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "coordinator/engine.h"
#include "google/protobuf/message.h"
#include "lorcserve/v1/lorcserve.pb.h"
#include "model/model_config.h"
#include "tokenizer/tokenizer.h"

namespace lorc {

// Requests larger than this are INVALID_ARGUMENT (the transport limit is set higher).
inline constexpr size_t kMaxRequestBytes = 4 << 20;
inline constexpr int kMaxStopStrings = 64;
inline constexpr size_t kMaxStopStringBytes = 512;
inline constexpr size_t kMaxSessionIdBytes = 256;  // session_id and cache_salt
inline constexpr size_t kMaxRequestIdBytes = 256;  // request_id (echoed in every response and log line)

// INVALID_ARGUMENT "<field> is not valid UTF-8 at byte offset <i> (byte 0x..)" for the first
// `string` field of `msg` (nested and repeated ones included: "sampling.stop[1]") whose bytes
// are not valid UTF-8; OK otherwise. For clients, before sending.
absl::Status CheckUtf8Fields(const google::protobuf::Message& msg);

// Parses wire-format `bytes` as `msg`. Errors (INVALID_ARGUMENT): more than kMaxRequestBytes; a
// string field that is not valid UTF-8 (as CheckUtf8Fields, found on the wire before parsing);
// bytes that are not a `msg` at all ("request is not a valid lorcserve.v1.GenerateRequest").
absl::Status ParseRequest(std::string_view bytes, google::protobuf::Message* msg);

// A parsed GenerateRequest as the engine's request: the prompt (text through PromptToIds with
// `config.bos_token_id`, or token_ids), the sampling options with their defaults (unset
// max_tokens: defaults::kMaxTokens; n, top_p, repetition_penalty: 1), priority, session_id and
// cache_salt. INVALID_ARGUMENT naming the field: an empty prompt, text without a tokenizer
// (`tokenizer` may be null), more than kMaxStopStrings stop strings or one over
// kMaxStopStringBytes, an explicit max_tokens or n below 1, session_id or cache_salt over
// kMaxSessionIdBytes, request_id over kMaxRequestIdBytes, and whatever SamplingParams::Validate(config.vocab_size) rejects. The
// engine (scheduler) checks prompt ids and lengths again when the request is added.
absl::StatusOr<GenerationRequest> ConvertGenerateRequest(const lorcserve::v1::GenerateRequest& req,
                                                         const ModelConfig& config,
                                                         const Tokenizer* tokenizer);

// A session key's sizes: session_id and cache_salt at most kMaxSessionIdBytes each
// (INVALID_ARGUMENT naming the field); Generate and CloseSession alike.
absl::Status CheckSessionKey(std::string_view session_id, std::string_view cache_salt);
// A CloseSessionRequest: a non-empty session_id, then CheckSessionKey.
absl::Status CheckCloseSessionRequest(const lorcserve::v1::CloseSessionRequest& req);

// The ids of a TokenizeRequest's text: with add_special_tokens exactly the ids a GenerateRequest's
// text becomes (PromptToIds with config.bos_token_id: the post-processor's template and one BOS
// when the model has one), without it the text's own tokens (Tokenizer::Encode).
// FAILED_PRECONDITION without a tokenizer; the tokenizer's INVALID_ARGUMENT otherwise.
absl::StatusOr<std::vector<int32_t>> TokenizeRequestIds(const lorcserve::v1::TokenizeRequest& req,
                                                        const ModelConfig& config, const Tokenizer* tokenizer);

}  // namespace lorc
