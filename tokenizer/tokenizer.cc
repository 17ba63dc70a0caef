#include "tokenizer/tokenizer.h"

#include <algorithm>
#include <filesystem>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/json_util.h"
#include "common/status_macros.h"
#include "tokenizer/tokenizer_added.h"
#include "tokenizer/tokenizer_bpe.h"
#include "tokenizer/tokenizer_fields.h"
#include "tokenizer/tokenizer_pretokenizer.h"
#include "tokenizer/tokenizer_unicode.h"

namespace lorc {
namespace {

using nlohmann::json;
using tokenizer_internal::Cat;
using tokenizer_internal::ExpectObject;
using tokenizer_internal::FieldError;
using tokenizer_internal::GetString;
using tokenizer_internal::GetTokenId;
using tokenizer_internal::GetType;
using tokenizer_internal::HasNonNull;
using tokenizer_internal::IndexField;
using tokenizer_internal::SubField;

constexpr int32_t kInput = -1;  // Tokenizer::kTemplateInput

// Fallback names when tokenizer_config.json does not name the BOS / EOS token.
constexpr std::string_view kBosNames[] = {"<|begin_of_text|>", "<s>", "<|startoftext|>", "<bos>"};
constexpr std::string_view kEosNames[] = {"<|end_of_text|>", "</s>", "<|endoftext|>", "<eos>",
                                          "<|eot_id|>", "<|im_end|>"};

// `obj[key]`, or null when missing.
const json& Member(const json& obj, std::string_view key) {
  static const json kNull;
  if (!obj.is_object()) return kNull;
  auto it = obj.find(key);
  return it == obj.end() ? kNull : *it;
}

absl::Status CheckModelType(const json& model, const std::string& field) {
  RETURN_IF_ERROR(ExpectObject(model, field));
  if (!HasNonNull(model, "type")) {
    if (model.contains("merges")) return absl::OkStatus();  // old files: BPE without "type"
    return FieldError(SubField(field, "type"), "missing");
  }
  ASSIGN_OR_RETURN(const std::string type, GetString(model, "type", field));
  if (type != "BPE") {
    return FieldError(SubField(field, "type"),
                      Cat("unsupported model type '", type, "' (only BPE is supported)"));
  }
  return absl::OkStatus();
}

absl::Status CheckNormalizer(const json& normalizer, const std::string& field) {
  if (normalizer.is_null()) return absl::OkStatus();
  ASSIGN_OR_RETURN(const std::string type, GetType(normalizer, field));
  const json& list = Member(normalizer, "normalizers");
  if (type == "Sequence" && list.is_array() && list.empty()) return absl::OkStatus();
  return FieldError(SubField(field, "type"),
                    Cat("unsupported normalizer '", type, "' (only null is supported)"));
}

absl::Status CheckDecoder(const json& decoder, const std::string& field) {
  if (decoder.is_null()) return FieldError(field, "missing (only ByteLevel is supported)");
  ASSIGN_OR_RETURN(const std::string type, GetType(decoder, field));
  if (type != "ByteLevel") {
    return FieldError(SubField(field, "type"),
                      Cat("unsupported decoder '", type, "' (only ByteLevel is supported)"));
  }
  return absl::OkStatus();
}

// `outer` with its input marker replaced by `inner` (processors applied inner first).
std::vector<int32_t> ComposeTemplates(const std::vector<int32_t>& outer,
                                      const std::vector<int32_t>& inner) {
  std::vector<int32_t> out;
  for (int32_t item : outer) {
    if (item == kInput) {
      out.insert(out.end(), inner.begin(), inner.end());
    } else {
      out.push_back(item);
    }
  }
  return out;
}

// Ids of special token `name` from TemplateProcessing's "special_tokens".
absl::Status AppendTemplateSpecial(const json& specials, const std::string& name,
                                   const std::string& field, std::vector<int32_t>* out) {
  const json& entry = Member(specials, name);
  const json& ids = Member(entry, "ids");
  if (!ids.is_array()) {
    return FieldError(field, Cat("special token '", name,
                                          "' has no ids in post_processor.special_tokens"));
  }
  for (size_t i = 0; i < ids.size(); ++i) {
    ASSIGN_OR_RETURN(const int32_t id, GetTokenId(ids[i], field));
    out->push_back(id);
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<int32_t>> ParseTemplateProcessing(const json& pp,
                                                             const std::string& field) {
  const std::string single_field = SubField(field, "single");
  const json& single = Member(pp, "single");
  if (!single.is_array()) return FieldError(single_field, "expected an array");
  const json& specials = Member(pp, "special_tokens");
  std::vector<int32_t> out;
  for (size_t i = 0; i < single.size(); ++i) {
    const std::string item_field = IndexField(single_field, i);
    if (HasNonNull(single[i], "SpecialToken")) {
      ASSIGN_OR_RETURN(const std::string name, GetString(single[i]["SpecialToken"], "id",
                                                         SubField(item_field, "SpecialToken")));
      RETURN_IF_ERROR(AppendTemplateSpecial(specials, name, item_field, &out));
    } else if (HasNonNull(single[i], "Sequence")) {
      ASSIGN_OR_RETURN(const std::string seq, GetString(single[i]["Sequence"], "id",
                                                        SubField(item_field, "Sequence")));
      if (seq != "A") return FieldError(item_field, "a single template may only use sequence A");
      out.push_back(kInput);
    } else {
      return FieldError(item_field, "expected {\"SpecialToken\": ...} or {\"Sequence\": ...}");
    }
  }
  return out;
}

// BertProcessing / RobertaProcessing: [cls] $A [sep], with cls / sep given as ["token", id].
absl::StatusOr<std::vector<int32_t>> ParseClsSep(const json& pp, const std::string& field) {
  std::vector<int32_t> ids;
  for (const char* key : {"cls", "sep"}) {
    const json& pair = Member(pp, key);
    if (!pair.is_array() || pair.size() != 2) {
      return FieldError(SubField(field, key), "expected [\"token\", id]");
    }
    ASSIGN_OR_RETURN(const int32_t id, GetTokenId(pair[1], SubField(field, key)));
    ids.push_back(id);
  }
  return std::vector<int32_t>{ids[0], kInput, ids[1]};
}

absl::StatusOr<std::vector<int32_t>> ParsePostProcessor(const json& pp, const std::string& field) {
  if (pp.is_null()) return std::vector<int32_t>{kInput};
  ASSIGN_OR_RETURN(const std::string type, GetType(pp, field));
  if (type == "ByteLevel") return std::vector<int32_t>{kInput};
  if (type == "TemplateProcessing") return ParseTemplateProcessing(pp, field);
  if (type == "BertProcessing" || type == "RobertaProcessing") return ParseClsSep(pp, field);
  if (type == "Sequence") {
    const std::string list_field = SubField(field, "processors");
    const json& list = Member(pp, "processors");
    if (!list.is_array()) return FieldError(list_field, "expected an array");
    std::vector<int32_t> result = {kInput};
    for (size_t i = 0; i < list.size(); ++i) {
      ASSIGN_OR_RETURN(const std::vector<int32_t> step,
                       ParsePostProcessor(list[i], IndexField(list_field, i)));
      result = ComposeTemplates(step, result);
    }
    return result;
  }
  return FieldError(SubField(field, "type"),
                    Cat("unsupported post-processor '", type, "'"));
}

// bos_token / eos_token of tokenizer_config.json: a string, {"content": ...}, or null.
absl::StatusOr<std::optional<std::string>> ConfigTokenName(const json& config, const char* key,
                                                           const std::string& field) {
  const json& value = Member(config, key);
  if (value.is_null()) return std::optional<std::string>();
  if (value.is_string()) return std::optional<std::string>(value.get<std::string>());
  if (value.is_object() && Member(value, "content").is_string()) {
    return std::optional<std::string>(value["content"].get<std::string>());
  }
  return FieldError(SubField(field, key), "expected a string or {\"content\": ...}");
}

std::string HexByte(uint8_t b) {
  static constexpr char kHex[] = "0123456789ABCDEF";
  return {'0', 'x', kHex[b >> 4], kHex[b & 15]};
}

}  // namespace

Tokenizer::Tokenizer() = default;
Tokenizer::~Tokenizer() = default;

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromModelDir(const std::string& dir) {
  const std::filesystem::path base(dir);
  ASSIGN_OR_RETURN(std::string text, ReadFileToString((base / "tokenizer.json").string()));
  auto tok = std::unique_ptr<Tokenizer>(new Tokenizer());
  RETURN_IF_ERROR(tok->Load(text, (base / "tokenizer.json").string()));
  const std::string config_path = (base / "tokenizer_config.json").string();
  std::error_code ec;
  if (std::filesystem::exists(config_path, ec)) RETURN_IF_ERROR(tok->LoadConfig(config_path));
  tok->PickDefaultSpecialIds();
  return tok;
}

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromFile(const std::string& path) {
  ASSIGN_OR_RETURN(std::string text, ReadFileToString(path));
  return FromJsonString(text, path);
}

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromJsonString(std::string_view json_text,
                                                                     std::string_view what) {
  auto tok = std::unique_ptr<Tokenizer>(new Tokenizer());
  RETURN_IF_ERROR(tok->Load(json_text, what));
  tok->PickDefaultSpecialIds();
  return tok;
}

absl::Status Tokenizer::Load(std::string_view json_text, std::string_view what) try {
  ASSIGN_OR_RETURN(const json root, ParseJson(json_text, what));
  const std::string prefix = Cat(what, ": ");
  if (!root.is_object()) return FieldError(what, "expected a JSON object");
  if (!root.contains("model")) return FieldError(prefix + "model", "missing");
  RETURN_IF_ERROR(CheckModelType(root["model"], prefix + "model"));
  RETURN_IF_ERROR(CheckNormalizer(Member(root, "normalizer"), prefix + "normalizer"));
  RETURN_IF_ERROR(CheckDecoder(Member(root, "decoder"), prefix + "decoder"));
  ASSIGN_OR_RETURN(model_, tokenizer_internal::BpeModel::FromJson(root["model"], prefix + "model"));
  ASSIGN_OR_RETURN(pre_tokenizer_, tokenizer_internal::PreTokenizer::FromJson(
                                       Member(root, "pre_tokenizer"), prefix + "pre_tokenizer"));
  ASSIGN_OR_RETURN(added_, tokenizer_internal::AddedVocabulary::FromJson(
                               Member(root, "added_tokens"), prefix + "added_tokens", *model_));
  ASSIGN_OR_RETURN(template_, ParsePostProcessor(Member(root, "post_processor"),
                                                 prefix + "post_processor"));
  if (template_ == std::vector<int32_t>{kInput}) template_.clear();
  BuildIdTables();
  // The template's special-token ids are only numbers in the file: each must name a token, or
  // Encode would hand out ids past the vocabulary (fuzz finding, docs/FUZZING.md #6).
  for (const int32_t id : template_) {
    if (id != kInput && (id < 0 || id >= vocab_size_)) {
      return FieldError(prefix + "post_processor",
                        Cat("special token id ", id, " is outside the vocabulary [0, ", vocab_size_, ")"));
    }
  }
  return absl::OkStatus();
} catch (const nlohmann::json::exception& e) {
  return absl::InvalidArgumentError(Cat(what, ": malformed tokenizer JSON: ", e.what()));
}

absl::Status Tokenizer::LoadConfig(const std::string& config_path) {
  ASSIGN_OR_RETURN(const json config, ReadJsonFile(config_path));
  const std::string field = Cat(config_path, ": ");
  ASSIGN_OR_RETURN(const std::optional<std::string> bos, ConfigTokenName(config, "bos_token", field));
  ASSIGN_OR_RETURN(const std::optional<std::string> eos, ConfigTokenName(config, "eos_token", field));
  if (bos.has_value()) bos_id_ = TokenToId(*bos);
  if (eos.has_value()) eos_id_ = TokenToId(*eos);
  return absl::OkStatus();
}

void Tokenizer::PickDefaultSpecialIds() {
  if (!bos_id_.has_value() && !template_.empty() && template_.front() != kInput) {
    bos_id_ = template_.front();
  }
  for (std::string_view name : kBosNames) {
    if (!bos_id_.has_value()) bos_id_ = TokenToId(name);
  }
  for (std::string_view name : kEosNames) {
    if (!eos_id_.has_value()) eos_id_ = TokenToId(name);
  }
}

void Tokenizer::BuildIdTables() {
  int32_t max_id = model_->max_id();
  for (const auto& token : added_->tokens()) max_id = std::max(max_id, token.id);
  vocab_size_ = max_id + 1;
  token_bytes_.assign(vocab_size_, std::string());
  id_kind_.assign(vocab_size_, IdKind::kNone);
  for (int32_t id = 0; id < vocab_size_; ++id) {
    if (const auto* added = added_->FindById(id)) {
      // HF passes added tokens through the ByteLevel decoder too.
      token_bytes_[id] = tokenizer_internal::ByteLevelTokenBytes(added->content);
      id_kind_[id] = added->special ? IdKind::kSpecial : IdKind::kAdded;
    } else if (const std::string* token = model_->IdToToken(id)) {
      token_bytes_[id] = tokenizer_internal::ByteLevelTokenBytes(*token);
      id_kind_[id] = IdKind::kModel;
    }
  }
}

absl::Status Tokenizer::EncodePlainText(std::string_view text, std::vector<int32_t>* ids) const {
  std::vector<std::string> pieces;
  RETURN_IF_ERROR(pre_tokenizer_->Run(text, &pieces));
  for (const std::string& piece : pieces) model_->Tokenize(piece, ids);
  return absl::OkStatus();
}

absl::StatusOr<std::vector<int32_t>> Tokenizer::Encode(std::string_view text,
                                                       bool add_special_tokens) const {
  if (std::optional<size_t> bad = tokenizer_internal::FindInvalidUtf8(text)) {
    return absl::InvalidArgumentError(
        Cat("Encode: text is not valid UTF-8 at byte offset ", *bad, " (byte ",
                     HexByte(static_cast<uint8_t>(text[*bad])), ")"));
  }
  std::vector<tokenizer_internal::TextSegment> segments;
  added_->Split(text, &segments);
  std::vector<int32_t> ids;
  ids.reserve(text.size() / 3 + 4);
  for (const auto& segment : segments) {
    if (segment.id >= 0) {
      ids.push_back(segment.id);
    } else {
      RETURN_IF_ERROR(
          EncodePlainText(text.substr(segment.begin, segment.end - segment.begin), &ids));
    }
  }
  if (!add_special_tokens || template_.empty()) return ids;
  std::vector<int32_t> processed;
  processed.reserve(ids.size() + template_.size());
  for (int32_t item : template_) {
    if (item == kInput) {
      processed.insert(processed.end(), ids.begin(), ids.end());
    } else {
      processed.push_back(item);
    }
  }
  return processed;
}

absl::StatusOr<std::string> Tokenizer::Decode(absl::Span<const int32_t> ids,
                                              bool skip_special_tokens) const {
  std::string bytes;
  for (size_t i = 0; i < ids.size(); ++i) {
    const int32_t id = ids[i];
    if (id < 0 || id >= vocab_size_) {
      return absl::InvalidArgumentError(Cat("Decode: token id ", id, " (position ", i,
                                                     ") is out of range [0, ", vocab_size_, ")"));
    }
    if (id_kind_[id] == IdKind::kNone) {
      return absl::InvalidArgumentError(
          Cat("Decode: token id ", id, " (position ", i, ") has no token"));
    }
    if (skip_special_tokens && id_kind_[id] == IdKind::kSpecial) continue;
    bytes += token_bytes_[id];
  }
  std::string text;
  text.reserve(bytes.size());
  tokenizer_internal::AppendLossyUtf8(bytes, /*hold_incomplete_tail=*/false, &text);
  return text;
}

std::optional<int32_t> Tokenizer::TokenToId(std::string_view token) const {
  if (std::optional<int32_t> id = added_->FindByContent(token)) return id;
  return model_->TokenToId(token);
}

std::optional<std::string> Tokenizer::IdToToken(int32_t id) const {
  if (const auto* added = added_->FindById(id)) return added->content;
  if (const std::string* token = model_->IdToToken(id)) return *token;
  return std::nullopt;
}

bool Tokenizer::IsValidId(int32_t id) const {
  return id >= 0 && id < vocab_size_ && id_kind_[id] != IdKind::kNone;
}

bool Tokenizer::IsSpecial(int32_t id) const {
  return IsValidId(id) && id_kind_[id] == IdKind::kSpecial;
}

std::string Tokenizer::TokenBytes(int32_t id) const { return TokenBytesRef(id); }

const std::string& Tokenizer::TokenBytesRef(int32_t id) const {
  static const std::string kEmpty;
  return IsValidId(id) ? token_bytes_[id] : kEmpty;
}

IncrementalDecoder::IncrementalDecoder(const Tokenizer& tok, bool skip_special_tokens)
    : tok_(tok), skip_special_tokens_(skip_special_tokens) {}

std::string IncrementalDecoder::Push(int32_t id) {
  if (!tok_.IsValidId(id) || (skip_special_tokens_ && tok_.IsSpecial(id))) return "";
  pending_ += tok_.TokenBytesRef(id);
  std::string out;
  const size_t consumed =
      tokenizer_internal::AppendLossyUtf8(pending_, /*hold_incomplete_tail=*/true, &out);
  pending_.erase(0, consumed);
  return out;
}

std::string IncrementalDecoder::Flush() {
  std::string out;
  tokenizer_internal::AppendLossyUtf8(pending_, /*hold_incomplete_tail=*/false, &out);
  pending_.clear();
  return out;
}

}  // namespace lorc
