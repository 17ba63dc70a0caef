#include "tokenizer/tokenizer_pretokenizer.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "tokenizer/tokenizer_fields.h"
#include "tokenizer/tokenizer_unicode.h"

namespace lorc::tokenizer_internal {
namespace {

// The split regex of HF's ByteLevel pre-tokenizer (GPT-2).
constexpr std::string_view kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

// A piece of the text being split: [begin, end) and whether it was a pattern match.
struct Span {
  size_t begin;
  size_t end;
  bool is_match;
};

absl::StatusOr<SplitBehavior> ParseBehavior(std::string_view name, std::string_view field) {
  if (name == "Removed") return SplitBehavior::kRemoved;
  if (name == "Isolated") return SplitBehavior::kIsolated;
  if (name == "MergedWithPrevious") return SplitBehavior::kMergedWithPrevious;
  if (name == "MergedWithNext") return SplitBehavior::kMergedWithNext;
  if (name == "Contiguous") return SplitBehavior::kContiguous;
  return FieldError(field, Cat("unknown split behavior '", name, "'"));
}

// Matches plus the gaps between them, covering [0, len) (HF Pattern::find_matches).
std::vector<Span> CoverWithGaps(size_t len, const std::vector<Regex::Match>& matches) {
  std::vector<Span> spans;
  size_t prev = 0;
  for (const auto& [begin, end] : matches) {
    if (prev < begin) spans.push_back({prev, begin, false});
    spans.push_back({begin, end, true});
    prev = end;
  }
  if (prev < len) spans.push_back({prev, len, false});
  return spans;
}

// Folds spans per HF NormalizedString::split; returns the spans to keep.
std::vector<Span> ApplyBehavior(std::vector<Span> spans, SplitBehavior behavior) {
  std::vector<Span> out;
  bool prev_match = false;
  switch (behavior) {
    case SplitBehavior::kIsolated:
      return spans;
    case SplitBehavior::kRemoved:
      for (const Span& s : spans) {
        if (!s.is_match) out.push_back(s);
      }
      return out;
    case SplitBehavior::kContiguous:
      for (const Span& s : spans) {
        if (s.is_match == prev_match && !out.empty()) {
          out.back().end = s.end;
        } else {
          out.push_back(s);
        }
        prev_match = s.is_match;
      }
      return out;
    case SplitBehavior::kMergedWithPrevious:
      for (const Span& s : spans) {
        if (s.is_match && !prev_match && !out.empty()) {
          out.back().end = s.end;
        } else {
          out.push_back(s);
        }
        prev_match = s.is_match;
      }
      return out;
    case SplitBehavior::kMergedWithNext:
      for (auto it = spans.rbegin(); it != spans.rend(); ++it) {
        if (it->is_match && !prev_match && !out.empty()) {
          out.back().begin = it->begin;
        } else {
          out.push_back(*it);
        }
        prev_match = it->is_match;
      }
      std::reverse(out.begin(), out.end());
      return out;
  }
  return spans;
}

}  // namespace

absl::StatusOr<std::unique_ptr<PreTokenizer>> PreTokenizer::FromJson(const nlohmann::json& config,
                                                                    std::string_view field) {
  auto pre = std::unique_ptr<PreTokenizer>(new PreTokenizer());
  if (!config.is_null()) RETURN_IF_ERROR(pre->AddStep(config, std::string(field)));
  return pre;
}

absl::Status PreTokenizer::AddStep(const nlohmann::json& config, const std::string& field) {
  ASSIGN_OR_RETURN(const std::string type, GetType(config, field));
  if (type == "ByteLevel") return AddByteLevel(config, field);
  if (type == "Split") return AddSplit(config, field);
  if (type == "Sequence") {
    const std::string list_field = SubField(field, "pretokenizers");
    auto it = config.find("pretokenizers");
    if (it == config.end() || !it->is_array()) return FieldError(list_field, "expected an array");
    for (size_t i = 0; i < it->size(); ++i) {
      RETURN_IF_ERROR(AddStep((*it)[i], IndexField(list_field, i)));
    }
    return absl::OkStatus();
  }
  return FieldError(SubField(field, "type"),
                    Cat("unsupported pre-tokenizer type '", type,
                                 "' (supported: ByteLevel, Split, Sequence)"));
}

absl::Status PreTokenizer::AddByteLevel(const nlohmann::json& config, const std::string& field) {
  Step step;
  step.byte_level = true;
  ASSIGN_OR_RETURN(step.add_prefix_space, GetBool(config, "add_prefix_space", true, field));
  ASSIGN_OR_RETURN(const bool use_regex, GetBool(config, "use_regex", true, field));
  if (use_regex) {
    ASSIGN_OR_RETURN(step.regex, Regex::FromOniguruma(kGpt2Pattern, field));
  }
  steps_.push_back(std::move(step));
  return absl::OkStatus();
}

absl::Status PreTokenizer::AddSplit(const nlohmann::json& config, const std::string& field) {
  Step step;
  const std::string pattern_field = SubField(field, "pattern");
  auto it = config.find("pattern");
  if (it == config.end()) return FieldError(pattern_field, "missing");
  RETURN_IF_ERROR(ExpectObject(*it, pattern_field));
  if (it->contains("Regex")) {
    ASSIGN_OR_RETURN(const std::string regex, GetString(*it, "Regex", pattern_field));
    ASSIGN_OR_RETURN(step.regex, Regex::FromOniguruma(regex, SubField(pattern_field, "Regex")));
  } else if (it->contains("String")) {
    ASSIGN_OR_RETURN(const std::string literal, GetString(*it, "String", pattern_field));
    ASSIGN_OR_RETURN(step.regex, Regex::FromLiteral(literal, SubField(pattern_field, "String")));
  } else {
    return FieldError(pattern_field, "expected {\"Regex\": ...} or {\"String\": ...}");
  }
  ASSIGN_OR_RETURN(const std::string behavior, GetString(config, "behavior", field));
  ASSIGN_OR_RETURN(step.behavior, ParseBehavior(behavior, SubField(field, "behavior")));
  ASSIGN_OR_RETURN(step.invert, GetBool(config, "invert", false, field));
  steps_.push_back(std::move(step));
  return absl::OkStatus();
}

absl::Status PreTokenizer::SplitPiece(const Step& step, std::string_view piece,
                                      std::vector<std::string>* out) {
  std::vector<Regex::Match> matches;
  RETURN_IF_ERROR(step.regex->FindAll(piece, &matches));
  std::vector<Span> spans = CoverWithGaps(piece.size(), matches);
  if (step.invert) {
    for (Span& s : spans) s.is_match = !s.is_match;
  }
  for (const Span& s : ApplyBehavior(std::move(spans), step.behavior)) {
    if (s.end > s.begin) out->emplace_back(piece.substr(s.begin, s.end - s.begin));
  }
  return absl::OkStatus();
}

absl::Status PreTokenizer::RunByteLevel(const Step& step, std::string_view piece,
                                        std::vector<std::string>* out) {
  std::string prefixed;
  if (step.add_prefix_space && (piece.empty() || piece[0] != ' ')) {
    prefixed = Cat(" ", piece);
    piece = prefixed;
  }
  std::vector<std::string> parts;
  if (step.regex != nullptr) {
    RETURN_IF_ERROR(SplitPiece(step, piece, &parts));
  } else if (!piece.empty()) {
    parts.emplace_back(piece);
  }
  for (const std::string& part : parts) {
    std::string mapped;
    mapped.reserve(part.size() * 2);
    AppendByteLevel(part, &mapped);
    out->push_back(std::move(mapped));
  }
  return absl::OkStatus();
}

absl::Status PreTokenizer::Run(std::string_view text, std::vector<std::string>* pieces) const {
  std::vector<std::string> current;
  if (!text.empty()) current.emplace_back(text);
  std::vector<std::string> next;
  for (const Step& step : steps_) {
    next.clear();
    for (const std::string& piece : current) {
      RETURN_IF_ERROR(step.byte_level ? RunByteLevel(step, piece, &next)
                                      : SplitPiece(step, piece, &next));
    }
    current.swap(next);
  }
  for (std::string& piece : current) pieces->push_back(std::move(piece));
  return absl::OkStatus();
}

}  // namespace lorc::tokenizer_internal
