// Tokenizer internals: the BPE model (vocab + ranked merges) of a tokenizer.json.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <optional>
#include <shared_mutex>
#include <string>
#include <string_view>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace lorc::tokenizer_internal {

class BpeModel {
 public:
  // `config` is tokenizer.json's "model" object; `field` names it in errors.
  static absl::StatusOr<std::unique_ptr<BpeModel>> FromJson(const nlohmann::json& config,
                                                            std::string_view field);

  // Appends the ids of one pre-token `word` (in the model's alphabet). Characters that are not in
  // the vocabulary go to byte_fallback tokens, else unk_token, else are dropped (as HF does).
  // Thread-safe; results for short words are cached.
  void Tokenize(std::string_view word, std::vector<int32_t>* ids) const;

  std::optional<int32_t> TokenToId(std::string_view token) const;
  // nullptr when `id` has no token.
  const std::string* IdToToken(int32_t id) const;
  // Largest id in the vocabulary, -1 if it is empty.
  int32_t max_id() const { return static_cast<int32_t>(id_to_token_.size()) - 1; }

 private:
  struct MergeResult {
    int32_t rank;
    int32_t new_id;
  };
  // A symbol of the word being merged (HF Symbol); len == 0 marks a merged-away symbol.
  struct Symbol {
    int32_t id;
    int32_t prev;
    int32_t next;
    int32_t len;
  };

  static constexpr size_t kCacheCapacity = 10000;
  static constexpr size_t kMaxCachedWordBytes = 256;

  BpeModel() = default;
  absl::Status LoadVocab(const nlohmann::json& vocab, std::string_view field);
  absl::Status LoadMerges(const nlohmann::json& merges, std::string_view field);
  absl::Status LoadOptions(const nlohmann::json& config, std::string_view field);
  static uint64_t PairKey(int32_t a, int32_t b) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
  }
  const MergeResult* FindMerge(int32_t a, int32_t b) const;
  std::vector<Symbol> InitialSymbols(std::string_view word) const;
  void MergeAll(std::vector<Symbol>* symbols) const;
  std::vector<int32_t> MergeWord(std::string_view word) const;

  absl::flat_hash_map<std::string, int32_t> vocab_;
  std::vector<std::string> id_to_token_;
  std::vector<bool> has_token_;
  absl::flat_hash_map<uint64_t, MergeResult> merges_;
  bool ignore_merges_ = false;
  std::optional<int32_t> unk_id_;
  bool fuse_unk_ = false;
  bool byte_fallback_ = false;
  std::array<int32_t, 256> byte_fallback_ids_{};  // -1: no <0xXX> token

  mutable std::shared_mutex cache_mu_;
  mutable absl::flat_hash_map<std::string, std::vector<int32_t>> cache_;
};

}  // namespace lorc::tokenizer_internal
