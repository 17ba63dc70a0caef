// Tokenizer internals: PCRE2 regexes with the semantics HF tokenizers gets from Oniguruma. Also
// the project's one regex wrapper elsewhere (eval/multi_turn.cc, tests): no std::regex.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

struct pcre2_real_code_8;

namespace lorc::tokenizer_internal {

// Rewrites an Oniguruma (Ruby syntax, UTF-8) pattern into PCRE2 syntax with the same meaning
// under PCRE2_UTF | PCRE2_UCP:
//   \s, \S  Oniguruma: Unicode White_Space. PCRE2 additionally counts U+180E, so they become
//           explicit classes (\p{Z}, \t-\r, U+0085).
//   \w, \W  Oniguruma: Letter, Mark, Decimal_Number, Connector_Punctuation.
//   \h, \H  Oniguruma: hex digit (PCRE2: horizontal space).
// Constructs PCRE2 cannot express the same way (nested classes, && intersection, \S/\W/\H inside
// a class) are InvalidArgument.
absl::StatusOr<std::string> TranslateOnigurumaPattern(std::string_view pattern);

class Regex {
 public:
  using Match = std::pair<size_t, size_t>;  // [begin, end) byte offsets

  // Compiles an Oniguruma-syntax pattern; `what` names it in errors.
  static absl::StatusOr<std::unique_ptr<Regex>> FromOniguruma(std::string_view pattern,
                                                              std::string_view what);
  // Compiles a pattern that matches `literal` exactly.
  static absl::StatusOr<std::unique_ptr<Regex>> FromLiteral(std::string_view literal,
                                                            std::string_view what);
  ~Regex();
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;

  // Appends all non-overlapping matches in `text` (valid UTF-8), left to right, iterating like
  // the onig crate's find_iter (an empty match right after the previous match is skipped).
  // Thread-safe.
  absl::Status FindAll(std::string_view text, std::vector<Match>* matches) const;

  // FindAll with the capture groups: per match, element 0 is the whole match and element k
  // capture group k ({npos, npos} for a group that took no part in the match). Thread-safe.
  absl::Status FindAllGroups(std::string_view text, std::vector<std::vector<Match>>* matches) const;

 private:
  // The FindAll iteration; calls on_match(ovector, pairs) for each match (pairs: the whole
  // match, then the groups).
  template <typename OnMatch>
  absl::Status ForEachMatch(std::string_view text, OnMatch on_match) const;

  static absl::StatusOr<std::unique_ptr<Regex>> Compile(std::string_view pattern, uint32_t options,
                                                        std::string_view what);
  Regex(pcre2_real_code_8* code, std::string_view what) : code_(code), what_(what) {}

  pcre2_real_code_8* code_;
  std::string what_;  // the pattern's field (e.g. pre_tokenizer.pattern.Regex), for match errors
};

}  // namespace lorc::tokenizer_internal
