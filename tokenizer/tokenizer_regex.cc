#include "tokenizer/tokenizer_regex.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <optional>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "tokenizer/tokenizer_fields.h"
#include "tokenizer/tokenizer_unicode.h"

namespace lorc::tokenizer_internal {
namespace {

// Class items equal to Oniguruma's Unicode \s (White_Space), \w and \h.
constexpr std::string_view kSpaceItems = "\\p{Z}\\x{09}-\\x{0D}\\x{85}";
constexpr std::string_view kWordItems = "\\p{L}\\p{M}\\p{Nd}\\p{Pc}";
constexpr std::string_view kHexItems = "0-9a-fA-F";

absl::Status Unsupported(std::string_view what, size_t pos) {
  return absl::InvalidArgumentError(
      Cat("regex: ", what, " at offset ", pos, " is not supported"));
}

// Appends the PCRE2 form of the escape `\e` found at offset `pos`.
absl::Status TranslateEscape(char e, bool in_class, size_t pos, std::string* out) {
  std::string_view items;
  bool negated = false;
  switch (e) {
    case 's': case 'S': items = kSpaceItems; negated = e == 'S'; break;
    case 'w': case 'W': items = kWordItems; negated = e == 'W'; break;
    case 'h': case 'H': items = kHexItems; negated = e == 'H'; break;
    default:
      out->push_back('\\');
      out->push_back(e);
      return absl::OkStatus();
  }
  if (in_class) {
    if (negated) return Unsupported(Cat("\\", std::string(1, e), " inside a class"), pos);
    out->append(items);
  } else {
    out->append(Cat(negated ? "[^" : "[", items, "]"));
  }
  return absl::OkStatus();
}

// Translates the character class starting at pattern[*i] == '[' and moves *i past it.
absl::Status TranslateClass(std::string_view p, size_t* i, std::string* out) {
  const size_t start = *i;
  size_t j = start + 1;
  out->push_back('[');
  if (j < p.size() && p[j] == '^') out->push_back(p[j++]);
  if (j < p.size() && p[j] == ']') out->push_back(p[j++]);  // a leading ']' is literal
  while (j < p.size()) {
    const char c = p[j];
    if (c == ']') {
      out->push_back(']');
      *i = j + 1;
      return absl::OkStatus();
    }
    if (c == '\\') {
      if (j + 1 >= p.size()) break;
      RETURN_IF_ERROR(TranslateEscape(p[j + 1], /*in_class=*/true, j, out));
      j += 2;
    } else if (c == '[') {
      if (p.substr(j, 2) != "[:") return Unsupported("nested character class", j);
      const size_t end = p.find(":]", j + 2);
      if (end == std::string_view::npos) return Unsupported("unterminated POSIX class", j);
      out->append(p.substr(j, end + 2 - j));
      j = end + 2;
    } else if (c == '&' && j + 1 < p.size() && p[j + 1] == '&') {
      return Unsupported("class intersection &&", j);
    } else {
      out->push_back(c);
      ++j;
    }
  }
  return absl::InvalidArgumentError(
      Cat("regex: unterminated character class at offset ", start));
}

std::string Pcre2ErrorMessage(int code) {
  PCRE2_UCHAR buffer[256];
  if (pcre2_get_error_message(code, buffer, sizeof(buffer)) < 0) {
    return Cat("PCRE2 error ", code);
  }
  return std::string(reinterpret_cast<const char*>(buffer));
}

// Owns PCRE2 match data for one FindAll call.
class MatchData {
 public:
  explicit MatchData(const pcre2_code* code)
      : data_(pcre2_match_data_create_from_pattern(code, nullptr)) {}
  ~MatchData() { pcre2_match_data_free(data_); }
  MatchData(const MatchData&) = delete;
  MatchData& operator=(const MatchData&) = delete;
  pcre2_match_data* get() const { return data_; }

 private:
  pcre2_match_data* data_;
};

// One search from `start`; falls back to the interpreter when the JIT stack is too small.
int SearchFrom(const pcre2_code* code, std::string_view text, size_t start, pcre2_match_data* md) {
  const auto* subject = reinterpret_cast<PCRE2_SPTR>(text.data());
  int rc = pcre2_match(code, subject, text.size(), start, PCRE2_NO_UTF_CHECK, md, nullptr);
  if (rc == PCRE2_ERROR_JIT_STACKLIMIT) {
    rc = pcre2_match(code, subject, text.size(), start, PCRE2_NO_UTF_CHECK | PCRE2_NO_JIT, md,
                     nullptr);
  }
  return rc;
}

}  // namespace

absl::StatusOr<std::string> TranslateOnigurumaPattern(std::string_view p) {
  std::string out;
  out.reserve(p.size() * 2);
  size_t i = 0;
  while (i < p.size()) {
    if (p[i] == '\\') {
      if (i + 1 >= p.size()) return absl::InvalidArgumentError("regex: pattern ends with '\\'");
      RETURN_IF_ERROR(TranslateEscape(p[i + 1], /*in_class=*/false, i, &out));
      i += 2;
    } else if (p[i] == '[') {
      RETURN_IF_ERROR(TranslateClass(p, &i, &out));
    } else {
      out.push_back(p[i++]);
    }
  }
  return out;
}

absl::StatusOr<std::unique_ptr<Regex>> Regex::FromOniguruma(std::string_view pattern,
                                                            std::string_view what) {
  absl::StatusOr<std::string> translated = TranslateOnigurumaPattern(pattern);
  if (!translated.ok()) {
    return absl::InvalidArgumentError(
        Cat(what, ": ", translated.status().message(), " (pattern ", pattern, ")"));
  }
  return Compile(*translated, 0, what);
}

absl::StatusOr<std::unique_ptr<Regex>> Regex::FromLiteral(std::string_view literal,
                                                          std::string_view what) {
  return Compile(literal, PCRE2_LITERAL, what);
}

absl::StatusOr<std::unique_ptr<Regex>> Regex::Compile(std::string_view pattern, uint32_t options,
                                                      std::string_view what) {
  if (FindInvalidUtf8(pattern).has_value()) {
    return absl::InvalidArgumentError(Cat(what, ": pattern is not valid UTF-8"));
  }
  int error_code = 0;
  PCRE2_SIZE error_offset = 0;
  pcre2_code* code =
      pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                    PCRE2_UTF | options | ((options & PCRE2_LITERAL) ? 0 : PCRE2_UCP),
                    &error_code, &error_offset, nullptr);
  if (code == nullptr) {
    return absl::InvalidArgumentError(Cat(what, ": cannot compile regex ", pattern, ": ",
                                                   Pcre2ErrorMessage(error_code), " at offset ",
                                                   error_offset));
  }
  pcre2_jit_compile(code, PCRE2_JIT_COMPLETE);  // best effort; the interpreter is the fallback
  return std::unique_ptr<Regex>(new Regex(code, what));
}

Regex::~Regex() { pcre2_code_free(code_); }

template <typename OnMatch>
absl::Status Regex::ForEachMatch(std::string_view text, OnMatch on_match) const {
  MatchData md(code_);
  if (md.get() == nullptr) return absl::ResourceExhaustedError("regex: out of memory");
  size_t search_from = 0;
  std::optional<size_t> last_match_end;
  while (search_from <= text.size()) {
    const int rc = SearchFrom(code_, text, search_from, md.get());
    if (rc == PCRE2_ERROR_NOMATCH) break;
    if (rc < 0) {
      return absl::ResourceExhaustedError(
          Cat(what_, ": regex match failed: ", Pcre2ErrorMessage(rc)));
    }
    const PCRE2_SIZE* ovector = pcre2_get_ovector_pointer(md.get());
    const size_t begin = ovector[0], end = ovector[1];
    if (begin == end && last_match_end == end) {
      search_from += search_from < text.size()
                         ? Utf8SequenceLength(static_cast<uint8_t>(text[search_from]))
                         : 1;
      continue;
    }
    search_from = end;
    last_match_end = end;
    on_match(ovector, pcre2_get_ovector_count(md.get()));
  }
  return absl::OkStatus();
}

absl::Status Regex::FindAll(std::string_view text, std::vector<Match>* matches) const {
  return ForEachMatch(text, [matches](const PCRE2_SIZE* ovector, uint32_t) {
    matches->emplace_back(ovector[0], ovector[1]);
  });
}

absl::Status Regex::FindAllGroups(std::string_view text,
                                  std::vector<std::vector<Match>>* matches) const {
  uint32_t groups = 0;
  if (pcre2_pattern_info(code_, PCRE2_INFO_CAPTURECOUNT, &groups) != 0) {
    return absl::InternalError("regex: cannot read the capture group count");
  }
  return ForEachMatch(text, [matches, groups](const PCRE2_SIZE* ovector, uint32_t pairs) {
    std::vector<Match>& m = matches->emplace_back();
    for (uint32_t k = 0; k <= groups; ++k) {
      // PCRE2_UNSET (~0) marks a group that did not take part, as does one past `pairs`.
      if (k < pairs && ovector[2 * k] != PCRE2_UNSET) {
        m.emplace_back(ovector[2 * k], ovector[2 * k + 1]);
      } else {
        m.emplace_back(std::string_view::npos, std::string_view::npos);
      }
    }
  });
}

}  // namespace lorc::tokenizer_internal
