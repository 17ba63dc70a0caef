// Tokenizer internals: the pre-tokenizer (ByteLevel / Split / Sequence), which cuts text into the
// pieces ("words") that the BPE model tokenizes independently.
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "tokenizer/tokenizer_regex.h"
#include "nlohmann/json.hpp"

namespace lorc::tokenizer_internal {

// HF SplitDelimiterBehavior.
enum class SplitBehavior { kRemoved, kIsolated, kMergedWithPrevious, kMergedWithNext, kContiguous };

class PreTokenizer {
 public:
  // `config` is tokenizer.json's "pre_tokenizer" (null: the whole text is one piece). `field`
  // names it in errors (e.g. "x/tokenizer.json: pre_tokenizer").
  static absl::StatusOr<std::unique_ptr<PreTokenizer>> FromJson(const nlohmann::json& config,
                                                                std::string_view field);

  // Appends the non-empty pieces of `text` (valid UTF-8). After a ByteLevel step the pieces are
  // in the byte-level alphabet. Thread-safe.
  absl::Status Run(std::string_view text, std::vector<std::string>* pieces) const;

 private:
  struct Step {
    bool byte_level = false;
    // Split, or ByteLevel with use_regex (Isolated, not inverted).
    std::unique_ptr<Regex> regex;
    SplitBehavior behavior = SplitBehavior::kIsolated;
    bool invert = false;
    bool add_prefix_space = false;  // ByteLevel only
  };

  absl::Status AddStep(const nlohmann::json& config, const std::string& field);
  absl::Status AddByteLevel(const nlohmann::json& config, const std::string& field);
  absl::Status AddSplit(const nlohmann::json& config, const std::string& field);
  static absl::Status SplitPiece(const Step& step, std::string_view piece,
                                 std::vector<std::string>* out);
  static absl::Status RunByteLevel(const Step& step, std::string_view piece,
                                   std::vector<std::string>* out);

  std::vector<Step> steps_;
};

}  // namespace lorc::tokenizer_internal
