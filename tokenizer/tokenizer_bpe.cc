#include "tokenizer/tokenizer_bpe.h"

#include <mutex>
#include <queue>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "tokenizer/tokenizer_fields.h"
#include "tokenizer/tokenizer_unicode.h"

namespace lorc::tokenizer_internal {
namespace {

// Ids may have holes, but not so many that the id table becomes absurd.
constexpr size_t kMaxIdSlack = size_t{1} << 20;

// A candidate merge of symbols[pos] with its next symbol (HF Merge).
struct Candidate {
  int32_t pos;
  int32_t rank;
  int32_t new_id;
};

// Orders the priority queue so that top() is the lowest rank, then the leftmost position.
struct CandidateAfter {
  bool operator()(const Candidate& a, const Candidate& b) const {
    if (a.rank != b.rank) return a.rank > b.rank;
    return a.pos > b.pos;
  }
};

// Splits a merge entry ("a b" or ["a", "b"]) into its two tokens.
absl::StatusOr<std::pair<std::string, std::string>> ParseMerge(const nlohmann::json& entry,
                                                               std::string_view field) {
  if (entry.is_string()) {
    const std::string& s = entry.get_ref<const std::string&>();
    const size_t space = s.find(' ');
    if (space == std::string::npos) {
      return FieldError(field, Cat("merge \"", s, "\" has no space separator"));
    }
    return std::make_pair(s.substr(0, space), s.substr(space + 1));
  }
  if (entry.is_array() && entry.size() == 2 && entry[0].is_string() && entry[1].is_string()) {
    return std::make_pair(entry[0].get<std::string>(), entry[1].get<std::string>());
  }
  return FieldError(field, "expected \"a b\" or [\"a\", \"b\"]");
}

}  // namespace

absl::StatusOr<std::unique_ptr<BpeModel>> BpeModel::FromJson(const nlohmann::json& config,
                                                            std::string_view field) {
  RETURN_IF_ERROR(ExpectObject(config, field));
  auto model = std::unique_ptr<BpeModel>(new BpeModel());
  auto vocab = config.find("vocab");
  if (vocab == config.end()) return FieldError(SubField(field, "vocab"), "missing");
  RETURN_IF_ERROR(model->LoadVocab(*vocab, SubField(field, "vocab")));
  auto merges = config.find("merges");
  if (merges != config.end() && !merges->is_null()) {
    RETURN_IF_ERROR(model->LoadMerges(*merges, SubField(field, "merges")));
  }
  RETURN_IF_ERROR(model->LoadOptions(config, field));
  return model;
}

absl::Status BpeModel::LoadVocab(const nlohmann::json& vocab, std::string_view field) {
  RETURN_IF_ERROR(ExpectObject(vocab, field));
  vocab_.reserve(vocab.size());
  int32_t max_id = -1;
  for (auto it = vocab.begin(); it != vocab.end(); ++it) {
    ASSIGN_OR_RETURN(const int32_t id,
                     GetTokenId(it.value(), Cat(field, "[\"", it.key(), "\"]")));
    vocab_[it.key()] = id;
    max_id = std::max(max_id, id);
  }
  if (static_cast<size_t>(max_id) >= vocab_.size() + kMaxIdSlack) {
    return FieldError(field, Cat("ids are too sparse (max id ", max_id, " for ",
                                          vocab_.size(), " tokens)"));
  }
  id_to_token_.resize(max_id + 1);
  has_token_.assign(max_id + 1, false);
  for (const auto& [token, id] : vocab_) {
    id_to_token_[id] = token;
    has_token_[id] = true;
  }
  return absl::OkStatus();
}

absl::Status BpeModel::LoadMerges(const nlohmann::json& merges, std::string_view field) {
  if (!merges.is_array()) return FieldError(field, "expected an array");
  merges_.reserve(merges.size());
  for (size_t rank = 0; rank < merges.size(); ++rank) {
    const std::string entry_field = IndexField(field, rank);
    ASSIGN_OR_RETURN(const auto pair, ParseMerge(merges[rank], entry_field));
    const std::string merged = pair.first + pair.second;
    for (const std::string* token : {&pair.first, &pair.second, &merged}) {
      if (!vocab_.contains(*token)) {
        return FieldError(entry_field, Cat("token \"", *token, "\" is not in model.vocab"));
      }
    }
    // Like HF's HashMap collect, a repeated pair keeps its last rank.
    merges_[PairKey(vocab_.at(pair.first), vocab_.at(pair.second))] =
        MergeResult{static_cast<int32_t>(rank), vocab_.at(merged)};
  }
  return absl::OkStatus();
}

absl::Status BpeModel::LoadOptions(const nlohmann::json& config, std::string_view field) {
  if (HasNonNull(config, "dropout")) {
    const nlohmann::json& dropout = config["dropout"];
    if (!dropout.is_number() || dropout.get<double>() != 0.0) {
      return FieldError(SubField(field, "dropout"), "BPE dropout is not supported");
    }
  }
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    ASSIGN_OR_RETURN(const std::optional<std::string> value, GetOptionalString(config, key, field));
    if (value.has_value() && !value->empty()) {
      return FieldError(SubField(field, key), "is not supported (must be null)");
    }
  }
  ASSIGN_OR_RETURN(ignore_merges_, GetBool(config, "ignore_merges", false, field));
  ASSIGN_OR_RETURN(fuse_unk_, GetBool(config, "fuse_unk", false, field));
  ASSIGN_OR_RETURN(byte_fallback_, GetBool(config, "byte_fallback", false, field));
  ASSIGN_OR_RETURN(const std::optional<std::string> unk, GetOptionalString(config, "unk_token", field));
  if (unk.has_value()) {
    unk_id_ = TokenToId(*unk);
    if (!unk_id_.has_value()) {
      return FieldError(SubField(field, "unk_token"),
                        Cat("\"", *unk, "\" is not in model.vocab"));
    }
  }
  for (int b = 0; b < 256; ++b) {
    static constexpr char kHex[] = "0123456789ABCDEF";
    const std::string name = {'<', '0', 'x', kHex[b >> 4], kHex[b & 15], '>'};
    byte_fallback_ids_[b] = TokenToId(name).value_or(-1);
  }
  return absl::OkStatus();
}

std::optional<int32_t> BpeModel::TokenToId(std::string_view token) const {
  auto it = vocab_.find(Sv(token));
  if (it == vocab_.end()) return std::nullopt;
  return it->second;
}

const std::string* BpeModel::IdToToken(int32_t id) const {
  if (id < 0 || static_cast<size_t>(id) >= id_to_token_.size() || !has_token_[id]) return nullptr;
  return &id_to_token_[id];
}

const BpeModel::MergeResult* BpeModel::FindMerge(int32_t a, int32_t b) const {
  auto it = merges_.find(PairKey(a, b));
  return it == merges_.end() ? nullptr : &it->second;
}

// One symbol per character (HF BPE::merge_word before merging).
std::vector<BpeModel::Symbol> BpeModel::InitialSymbols(std::string_view word) const {
  std::vector<Symbol> symbols;
  symbols.reserve(word.size());
  auto add = [&symbols](int32_t id, int32_t len) {
    const int32_t index = static_cast<int32_t>(symbols.size());
    if (index > 0) symbols.back().next = index;
    symbols.push_back(Symbol{id, index - 1, -1, len});
  };
  int32_t pending_unk_len = 0;  // > 0: an unk symbol of this many bytes awaits adding
  auto flush_unk = [&] {
    if (pending_unk_len > 0) add(*unk_id_, pending_unk_len);
    pending_unk_len = 0;
  };
  size_t pos = 0;
  while (pos < word.size()) {
    const size_t start = pos;
    NextCodePoint(word, &pos);
    const std::string_view ch = word.substr(start, pos - start);
    const int32_t len = static_cast<int32_t>(ch.size());
    if (std::optional<int32_t> id = TokenToId(ch)) {
      flush_unk();
      add(*id, len);
      continue;
    }
    if (byte_fallback_) {
      bool all_bytes = true;
      for (char c : ch) all_bytes = all_bytes && byte_fallback_ids_[static_cast<uint8_t>(c)] >= 0;
      if (all_bytes) {  // like HF, a pending unk is not flushed first
        for (char c : ch) add(byte_fallback_ids_[static_cast<uint8_t>(c)], 1);
        continue;
      }
    }
    if (!unk_id_.has_value()) continue;  // no unk token: HF drops the character
    if (!fuse_unk_) flush_unk();
    pending_unk_len += len;
  }
  flush_unk();
  return symbols;
}

// HF Word::merge_all without dropout: always apply the lowest-rank (then leftmost) merge.
void BpeModel::MergeAll(std::vector<Symbol>* symbols_ptr) const {
  std::vector<Symbol>& symbols = *symbols_ptr;
  std::priority_queue<Candidate, std::vector<Candidate>, CandidateAfter> queue;
  for (size_t i = 0; i + 1 < symbols.size(); ++i) {
    if (const MergeResult* m = FindMerge(symbols[i].id, symbols[i + 1].id)) {
      queue.push(Candidate{static_cast<int32_t>(i), m->rank, m->new_id});
    }
  }
  while (!queue.empty()) {
    const Candidate top = queue.top();
    queue.pop();
    Symbol& left = symbols[top.pos];
    if (left.len == 0 || left.next == -1) continue;
    const int32_t right_pos = left.next;
    const Symbol right = symbols[right_pos];
    const MergeResult* current = FindMerge(left.id, right.id);
    if (current == nullptr || current->new_id != top.new_id) continue;  // stale entry

    left.id = top.new_id;
    left.len += right.len;
    left.next = right.next;
    symbols[right_pos].len = 0;
    if (right.next >= 0) symbols[right.next].prev = top.pos;

    if (left.prev >= 0) {
      if (const MergeResult* m = FindMerge(symbols[left.prev].id, left.id)) {
        queue.push(Candidate{left.prev, m->rank, m->new_id});
      }
    }
    if (left.next >= 0) {
      if (const MergeResult* m = FindMerge(left.id, symbols[left.next].id)) {
        queue.push(Candidate{top.pos, m->rank, m->new_id});
      }
    }
  }
}

std::vector<int32_t> BpeModel::MergeWord(std::string_view word) const {
  std::vector<Symbol> symbols = InitialSymbols(word);
  MergeAll(&symbols);
  std::vector<int32_t> ids;
  for (const Symbol& s : symbols) {
    if (s.len != 0) ids.push_back(s.id);
  }
  return ids;
}

void BpeModel::Tokenize(std::string_view word, std::vector<int32_t>* ids) const {
  if (word.empty()) return;
  if (ignore_merges_) {
    if (std::optional<int32_t> id = TokenToId(word)) {
      ids->push_back(*id);
      return;
    }
  }
  const bool cacheable = word.size() < kMaxCachedWordBytes;
  if (cacheable) {
    std::shared_lock lock(cache_mu_);
    auto it = cache_.find(Sv(word));
    if (it != cache_.end()) {
      ids->insert(ids->end(), it->second.begin(), it->second.end());
      return;
    }
  }
  std::vector<int32_t> word_ids = MergeWord(word);
  ids->insert(ids->end(), word_ids.begin(), word_ids.end());
  if (cacheable) {
    std::unique_lock lock(cache_mu_);
    if (cache_.size() < kCacheCapacity) cache_.emplace(word, std::move(word_ids));
  }
}

}  // namespace lorc::tokenizer_internal
