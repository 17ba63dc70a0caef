#include "coordinator/request_conversion.h"

#include <algorithm>
#include <string>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "common/defaults.h"
#include "common/status_macros.h"
#include "google/protobuf/descriptor.h"
#include "google/protobuf/unknown_field_set.h"
#include "tokenizer/prompt.h"
#include "tokenizer/tokenizer_unicode.h"

namespace lorc {
namespace {

using google::protobuf::Descriptor;
using google::protobuf::FieldDescriptor;
using google::protobuf::Message;
using google::protobuf::Reflection;
using google::protobuf::UnknownField;
using google::protobuf::UnknownFieldSet;

constexpr int kMaxNesting = 16;  // lorcserve.proto nests 2 levels; deeper is not ours to check

using tokenizer_internal::CheckUtf8;

// "prefix" + name, "[k]" appended for repeated fields.
std::string FieldPath(const std::string& prefix, const FieldDescriptor* fd, int k) {
  std::string path = absl::StrCat(prefix, fd->name());
  if (fd->is_repeated()) absl::StrAppend(&path, "[", k, "]");
  return path;
}

// Walks wire-format `bytes` of a message of type `d` (`top`: the request's type) without parsing
// it as that type (a parse would stop at the first invalid string without saying where): string
// fields are checked, message fields recursed into. Bytes that are not wire format at all (here
// or in a nested message) are refused at once: the typed parse would fail on them too, but only
// after logging an ERROR line for any invalid string before the break (a line per request that a
// client could send at will: fuzz finding #4, docs/FUZZING.md).
absl::Status CheckUtf8OnWire(const Descriptor* top, const Descriptor* d, std::string_view bytes,
                             const std::string& prefix, int depth) {
  if (depth > kMaxNesting) return absl::OkStatus();
  UnknownFieldSet fields;
  if (!fields.ParseFromArray(bytes.data(), static_cast<int>(bytes.size()))) {
    std::string what = absl::StrCat("request is not a valid ", top->full_name());
    if (depth > 0) {
      absl::StrAppend(&what, ": ", prefix.substr(0, prefix.size() - 1), " is not a valid ",
                      d->full_name());
    }
    return absl::InvalidArgumentError(what);
  }
  absl::flat_hash_map<int, int> seen;  // field number -> occurrences so far (repeated index)
  for (int i = 0; i < fields.field_count(); ++i) {
    const UnknownField& f = fields.field(i);
    if (f.type() != UnknownField::TYPE_LENGTH_DELIMITED) continue;
    const FieldDescriptor* fd = d->FindFieldByNumber(f.number());
    if (fd == nullptr) continue;
    const std::string path = FieldPath(prefix, fd, seen[f.number()]++);
    if (fd->type() == FieldDescriptor::TYPE_STRING) {
      RETURN_IF_ERROR(CheckUtf8(path, f.length_delimited()));
    } else if (fd->type() == FieldDescriptor::TYPE_MESSAGE) {
      RETURN_IF_ERROR(CheckUtf8OnWire(top, fd->message_type(), f.length_delimited(), path + ".",
                                      depth + 1));
    }
  }
  return absl::OkStatus();
}

absl::Status CheckUtf8Message(const Message& msg, const std::string& prefix, int depth) {
  if (depth > kMaxNesting) return absl::OkStatus();
  const Reflection* r = msg.GetReflection();
  std::vector<const FieldDescriptor*> set;
  r->ListFields(msg, &set);
  for (const FieldDescriptor* fd : set) {
    const int count = fd->is_repeated() ? r->FieldSize(msg, fd) : 1;
    for (int k = 0; k < count; ++k) {
      const std::string path = FieldPath(prefix, fd, k);
      if (fd->type() == FieldDescriptor::TYPE_STRING) {
        std::string scratch;
        const std::string& s = fd->is_repeated()
                                   ? r->GetRepeatedStringReference(msg, fd, k, &scratch)
                                   : r->GetStringReference(msg, fd, &scratch);
        RETURN_IF_ERROR(CheckUtf8(path, s));
      } else if (fd->type() == FieldDescriptor::TYPE_MESSAGE) {
        const Message& sub =
            fd->is_repeated() ? r->GetRepeatedMessage(msg, fd, k) : r->GetMessage(msg, fd);
        RETURN_IF_ERROR(CheckUtf8Message(sub, path + ".", depth + 1));
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status CheckUtf8Fields(const google::protobuf::Message& msg) {
  return CheckUtf8Message(msg, "", 0);
}

absl::Status ParseRequest(std::string_view bytes, google::protobuf::Message* msg) {
  if (bytes.size() > kMaxRequestBytes) {
    return absl::InvalidArgumentError(absl::StrCat("request of ", bytes.size(),
                                                   " bytes exceeds the limit of ",
                                                   kMaxRequestBytes, " bytes"));
  }
  // Before the parse, which would log and fail without naming the field.
  RETURN_IF_ERROR(CheckUtf8OnWire(msg->GetDescriptor(), msg->GetDescriptor(), bytes, "", 0));
  if (!msg->ParseFromArray(bytes.data(), static_cast<int>(bytes.size()))) {
    return absl::InvalidArgumentError(absl::StrCat("request is not a valid ",
                                                   msg->GetDescriptor()->full_name()));
  }
  return absl::OkStatus();
}

absl::StatusOr<GenerationRequest> ConvertGenerateRequest(const lorcserve::v1::GenerateRequest& req,
                                                         const ModelConfig& config,
                                                         const Tokenizer* tokenizer) {
  GenerationRequest g;
  if (req.sampling().stop_size() > kMaxStopStrings) {
    return absl::InvalidArgumentError(absl::StrCat("stop: at most ", kMaxStopStrings,
                                                   " stop strings, got ", req.sampling().stop_size()));
  }
  for (int i = 0; i < req.sampling().stop_size(); ++i) {
    const std::string& s = req.sampling().stop(i);
    if (s.size() > kMaxStopStringBytes) {
      return absl::InvalidArgumentError(absl::StrCat("stop[", i, "]: stop string of ", s.size(),
                                                     " bytes exceeds ", kMaxStopStringBytes));
    }
  }
  const lorcserve::v1::SamplingOptions& s = req.sampling();
  // Unset means the default; an explicit 0 is an error (it used to become 16 silently).
  if (s.has_max_tokens() && s.max_tokens() < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "max_tokens must be >= 1, got ", s.max_tokens(), " (unset: ", defaults::kMaxTokens, ")"));
  }
  if (s.has_n() && s.n() < 1) {
    return absl::InvalidArgumentError(absl::StrCat("n must be >= 1, got ", s.n(), " (unset: 1)"));
  }
  switch (req.prompt_case()) {
    case lorcserve::v1::GenerateRequest::kText: {
      if (req.text().empty()) return absl::InvalidArgumentError("text: empty prompt");
      if (tokenizer == nullptr) {
        return absl::InvalidArgumentError("text: the model has no tokenizer: send token_ids");
      }
      ASSIGN_OR_RETURN(g.prompt_ids, PromptToIds(*tokenizer, req.text(), config.bos_token_id));
      break;
    }
    case lorcserve::v1::GenerateRequest::kTokenIds:
      if (req.token_ids().ids().empty()) return absl::InvalidArgumentError("token_ids: empty prompt");
      g.prompt_ids.assign(req.token_ids().ids().begin(), req.token_ids().ids().end());
      break;
    default:
      return absl::InvalidArgumentError("empty prompt: set text or token_ids");
  }
  if (g.prompt_ids.empty()) return absl::InvalidArgumentError("empty prompt");
  SamplingParams& p = g.params;
  p.n = s.has_n() ? s.n() : 1;
  p.max_tokens = s.has_max_tokens() ? s.max_tokens() : defaults::kMaxTokens;
  p.min_tokens = s.min_tokens();
  p.allowed_token_ids.assign(s.allowed_token_ids().begin(), s.allowed_token_ids().end());
  p.logit_bias.assign(s.logit_bias().begin(), s.logit_bias().end());
  std::sort(p.logit_bias.begin(), p.logit_bias.end());  // map order is unspecified
  p.repetition_penalty = s.has_repetition_penalty() ? s.repetition_penalty() : 1.0f;
  p.presence_penalty = s.presence_penalty();
  p.frequency_penalty = s.frequency_penalty();
  p.temperature = s.temperature();
  p.top_k = s.top_k();
  p.top_p = s.has_top_p() ? s.top_p() : 1.0f;
  p.min_p = s.min_p();
  if (s.has_seed()) p.seed = s.seed();
  p.stop_token_ids.assign(s.stop_token_ids().begin(), s.stop_token_ids().end());
  p.stop_strings.assign(s.stop().begin(), s.stop().end());
  p.include_stop_str_in_output = s.include_stop_str_in_output();
  p.ignore_eos = s.ignore_eos();
  if (s.has_logprobs()) p.logprobs = s.logprobs();
  if (s.has_prompt_logprobs()) p.prompt_logprobs = s.prompt_logprobs();
  g.priority = req.priority();
  if (req.request_id().size() > kMaxRequestIdBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("request_id: ", req.request_id().size(), " bytes exceeds ", kMaxRequestIdBytes));
  }
  RETURN_IF_ERROR(CheckSessionKey(req.session_id(), req.cache_salt()));
  g.session_id = req.session_id();
  g.cache_salt = req.cache_salt();
  // Sampling values (names the field); the scheduler checks ids and lengths again on Add.
  RETURN_IF_ERROR(p.Validate(config.vocab_size));
  return g;
}

absl::Status CheckSessionKey(std::string_view session_id, std::string_view cache_salt) {
  if (session_id.size() > kMaxSessionIdBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("session_id: ", session_id.size(), " bytes exceeds ", kMaxSessionIdBytes));
  }
  if (cache_salt.size() > kMaxSessionIdBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("cache_salt: ", cache_salt.size(), " bytes exceeds ", kMaxSessionIdBytes));
  }
  return absl::OkStatus();
}

absl::Status CheckCloseSessionRequest(const lorcserve::v1::CloseSessionRequest& req) {
  if (req.session_id().empty()) return absl::InvalidArgumentError("session_id: empty");
  return CheckSessionKey(req.session_id(), req.cache_salt());
}

absl::StatusOr<std::vector<int32_t>> TokenizeRequestIds(const lorcserve::v1::TokenizeRequest& req,
                                                        const ModelConfig& config, const Tokenizer* tokenizer) {
  if (tokenizer == nullptr) return absl::FailedPreconditionError("the model has no tokenizer");
  if (req.add_special_tokens()) return PromptToIds(*tokenizer, req.text(), config.bos_token_id);
  return tokenizer->Encode(req.text(), /*add_special_tokens=*/false);
}

}  // namespace lorc
