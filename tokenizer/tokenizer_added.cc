#include "tokenizer/tokenizer_added.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "tokenizer/tokenizer_fields.h"
#include "tokenizer/tokenizer_regex.h"
#include "tokenizer/tokenizer_unicode.h"

namespace lorc::tokenizer_internal {
namespace {

// Rust regex's Unicode \w (Alphabetic, marks, decimal digits, connector punctuation, joiners).
bool IsWordChar(std::string_view ch) {
  static const Regex* const kWord = [] {
    auto regex = Regex::FromOniguruma(
        R"([\p{L}\p{M}\p{Nd}\p{Nl}\p{Pc}\x{200C}\x{200D}\x{24B6}-\x{24E9}])", "word class");
    return regex.ok() ? regex->release() : nullptr;
  }();
  std::vector<Regex::Match> matches;
  return kWord != nullptr && kWord->FindAll(ch, &matches).ok() && !matches.empty();
}

// Start of the last character of non-empty valid UTF-8 `s`.
size_t LastCharStart(std::string_view s) {
  size_t i = s.size() - 1;
  while (i > 0 && (static_cast<uint8_t>(s[i]) & 0xC0) == 0x80) --i;
  return i;
}

bool EndsWithWord(std::string_view s) {
  return !s.empty() && IsWordChar(s.substr(LastCharStart(s)));
}

bool StartsWithWord(std::string_view s) {
  return !s.empty() && IsWordChar(s.substr(0, Utf8SequenceLength(static_cast<uint8_t>(s[0]))));
}

// Offset where the trailing whitespace of `s` starts (s.size() if none).
size_t TrailingSpaceStart(std::string_view s) {
  size_t end = s.size();
  while (end > 0) {
    const size_t start = LastCharStart(s.substr(0, end));
    size_t pos = start;
    if (!IsWhiteSpace(NextCodePoint(s, &pos))) break;
    end = start;
  }
  return end;
}

// Length of the leading whitespace of `s`.
size_t LeadingSpaceLength(std::string_view s) {
  size_t pos = 0;
  while (pos < s.size()) {
    size_t next = pos;
    if (!IsWhiteSpace(NextCodePoint(s, &next))) break;
    pos = next;
  }
  return pos;
}

}  // namespace

void AddedVocabulary::Trie::Insert(std::string_view key, int32_t token_index) {
  int32_t node = 0;
  for (char c : key) {
    const uint8_t b = static_cast<uint8_t>(c);
    auto it = nodes_[node].children.find(b);
    if (it == nodes_[node].children.end()) {
      const int32_t child = static_cast<int32_t>(nodes_.size());
      nodes_[node].children[b] = child;
      nodes_.emplace_back();
      node = child;
    } else {
      node = it->second;
    }
  }
  nodes_[node].token_index = token_index;
  first_byte_[static_cast<uint8_t>(key[0])] = true;
}

std::optional<TextSegment> AddedVocabulary::Trie::FindFirst(std::string_view text,
                                                            size_t from) const {
  for (size_t begin = from; begin < text.size(); ++begin) {
    if (!first_byte_[static_cast<uint8_t>(text[begin])]) continue;
    int32_t node = 0;
    std::optional<TextSegment> best;
    for (size_t i = begin; i < text.size(); ++i) {
      auto it = nodes_[node].children.find(static_cast<uint8_t>(text[i]));
      if (it == nodes_[node].children.end()) break;
      node = it->second;
      if (nodes_[node].token_index >= 0) best = TextSegment{begin, i + 1, nodes_[node].token_index};
    }
    if (best.has_value()) return best;
  }
  return std::nullopt;
}

absl::StatusOr<std::unique_ptr<AddedVocabulary>> AddedVocabulary::FromJson(
    const nlohmann::json& tokens, std::string_view field, const BpeModel& model) {
  auto vocab = std::unique_ptr<AddedVocabulary>(new AddedVocabulary());
  if (tokens.is_null()) return vocab;
  if (!tokens.is_array()) return FieldError(field, "expected an array");
  for (size_t i = 0; i < tokens.size(); ++i) {
    RETURN_IF_ERROR(vocab->Add(tokens[i], IndexField(field, i), model));
  }
  return vocab;
}

absl::Status AddedVocabulary::Add(const nlohmann::json& entry, std::string_view field,
                                  const BpeModel& model) {
  RETURN_IF_ERROR(ExpectObject(entry, field));
  AddedToken token;
  ASSIGN_OR_RETURN(token.content, GetString(entry, "content", field));
  if (token.content.empty()) return absl::OkStatus();  // HF ignores empty tokens
  if (FindInvalidUtf8(token.content).has_value()) {
    return FieldError(SubField(field, "content"), "is not valid UTF-8");
  }
  if (!entry.contains("id")) return FieldError(SubField(field, "id"), "missing");
  ASSIGN_OR_RETURN(token.id, GetTokenId(entry["id"], SubField(field, "id")));
  token.id = model.TokenToId(token.content).value_or(token.id);
  ASSIGN_OR_RETURN(token.special, GetBool(entry, "special", false, field));
  ASSIGN_OR_RETURN(token.single_word, GetBool(entry, "single_word", false, field));
  ASSIGN_OR_RETURN(token.lstrip, GetBool(entry, "lstrip", false, field));
  ASSIGN_OR_RETURN(token.rstrip, GetBool(entry, "rstrip", false, field));
  ASSIGN_OR_RETURN(token.normalized, GetBool(entry, "normalized", !token.special, field));

  const size_t index = tokens_.size();
  (token.normalized ? normalized_trie_ : raw_trie_).Insert(token.content,
                                                           static_cast<int32_t>(index));
  by_id_[token.id] = index;
  by_content_[token.content] = index;
  tokens_.push_back(std::move(token));
  return absl::OkStatus();
}

const AddedToken* AddedVocabulary::FindById(int32_t id) const {
  auto it = by_id_.find(id);
  return it == by_id_.end() ? nullptr : &tokens_[it->second];
}

std::optional<int32_t> AddedVocabulary::FindByContent(std::string_view content) const {
  auto it = by_content_.find(Sv(content));
  if (it == by_content_.end()) return std::nullopt;
  return tokens_[it->second].id;
}

void AddedVocabulary::FindMatches(const Trie& trie, std::string_view sentence, size_t base,
                                  std::vector<TextSegment>* out) const {
  size_t start_offset = 0;
  size_t search_from = 0;
  while (!trie.empty()) {
    const std::optional<TextSegment> match = trie.FindFirst(sentence, search_from);
    if (!match.has_value()) break;
    search_from = match->end;
    const AddedToken& token = tokens_[match->id];
    size_t start = match->begin, stop = match->end;
    if (token.single_word) {
      const bool space_before = start == 0 || !EndsWithWord(sentence.substr(0, start));
      const bool space_after = stop == sentence.size() || !StartsWithWord(sentence.substr(stop));
      if (!space_before || !space_after) continue;
    }
    if (token.lstrip) start = std::max(TrailingSpaceStart(sentence.substr(0, start)), start_offset);
    if (token.rstrip) stop += LeadingSpaceLength(sentence.substr(stop));
    if (start_offset < start) out->push_back(TextSegment{base + start_offset, base + start, -1});
    out->push_back(TextSegment{base + start, base + stop, token.id});
    start_offset = stop;
  }
  if (start_offset < sentence.size()) {
    out->push_back(TextSegment{base + start_offset, base + sentence.size(), -1});
  }
}

void AddedVocabulary::Split(std::string_view text, std::vector<TextSegment>* out) const {
  std::vector<TextSegment> first_pass;
  FindMatches(raw_trie_, text, 0, &first_pass);
  for (const TextSegment& segment : first_pass) {
    if (segment.id >= 0 || normalized_trie_.empty()) {
      out->push_back(segment);
    } else {
      FindMatches(normalized_trie_, text.substr(segment.begin, segment.end - segment.begin),
                  segment.begin, out);
    }
  }
}

}  // namespace lorc::tokenizer_internal
