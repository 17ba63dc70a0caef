// Tokenizer internals: added tokens (special and not), found in the input text before
// pre-tokenization, like HF's AddedVocabulary.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "tokenizer/tokenizer_bpe.h"
#include "nlohmann/json.hpp"

namespace lorc::tokenizer_internal {

struct AddedToken {
  int32_t id = -1;
  std::string content;
  bool single_word = false;
  bool lstrip = false;
  bool rstrip = false;
  bool normalized = true;
  bool special = false;
};

// A piece of input text: plain text [begin, end) when id < 0, else the span an added token took.
struct TextSegment {
  size_t begin;
  size_t end;
  int32_t id;
};

class AddedVocabulary {
 public:
  // `tokens` is tokenizer.json's "added_tokens" (an array, or null). As in HF, a token whose
  // content is in the model vocabulary takes the model's id; otherwise the id given in the file.
  static absl::StatusOr<std::unique_ptr<AddedVocabulary>> FromJson(const nlohmann::json& tokens,
                                                                   std::string_view field,
                                                                   const BpeModel& model);

  // Cuts `text` into plain-text segments and added-token matches, in order. Non-normalized
  // tokens are matched first over the whole text, then normalized ones inside the plain parts
  // (leftmost-longest, honouring single_word / lstrip / rstrip). Empty segments are omitted.
  void Split(std::string_view text, std::vector<TextSegment>* out) const;

  const AddedToken* FindById(int32_t id) const;
  std::optional<int32_t> FindByContent(std::string_view content) const;
  const std::vector<AddedToken>& tokens() const { return tokens_; }

 private:
  // Byte trie over token contents for leftmost-longest search.
  class Trie {
   public:
    void Insert(std::string_view key, int32_t token_index);
    // The leftmost match at or after `from`, longest at that position: {begin, end, index}.
    std::optional<TextSegment> FindFirst(std::string_view text, size_t from) const;
    bool empty() const { return nodes_.size() == 1; }

   private:
    struct Node {
      absl::flat_hash_map<uint8_t, int32_t> children;
      int32_t token_index = -1;
    };
    std::vector<Node> nodes_ = std::vector<Node>(1);
    std::array<bool, 256> first_byte_{};
  };

  AddedVocabulary() = default;
  absl::Status Add(const nlohmann::json& entry, std::string_view field, const BpeModel& model);
  // HF AddedVocabulary::find_matches over `sentence`, offsets shifted by `base`.
  void FindMatches(const Trie& trie, std::string_view sentence, size_t base,
                   std::vector<TextSegment>* out) const;

  std::vector<AddedToken> tokens_;
  absl::flat_hash_map<int32_t, size_t> by_id_;
  absl::flat_hash_map<std::string, size_t> by_content_;
  Trie raw_trie_;         // normalized == false
  Trie normalized_trie_;  // normalized == true (there is no normalizer, so same text)
};

}  // namespace lorc::tokenizer_internal
