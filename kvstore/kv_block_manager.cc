#include "kvstore/kv_block_manager.h"

#include <algorithm>

#include "common/check.h"
#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace lorc {

KvBlockManager::KvBlockManager(int32_t block_size, int32_t num_blocks)
    : block_size_(block_size), pool_(num_blocks), cache_(num_blocks) {
  CHECK_GT(block_size, 0);
}

absl::Status KvBlockManager::AddSequence(int64_t seq, absl::Span<const int32_t> cached_blocks) {
  auto [it, added] = seqs_.try_emplace(seq);
  if (!added) {
    return absl::AlreadyExistsError(absl::StrCat("sequence ", seq, " already has KV blocks"));
  }
  Seq& s = it->second;
  for (int32_t b : cached_blocks) {
    CHECK(cache_.IsCached(b)) << "block " << b << " is not in the prefix index";
    pool_.Acquire(b);
    s.blocks.push_back(b);
  }
  s.num_tokens = static_cast<int64_t>(cached_blocks.size()) * block_size_;
  s.num_indexed = cached_blocks.size();
  return absl::OkStatus();
}

std::vector<int32_t> KvBlockManager::MatchPrefix(absl::Span<const BlockHash> hashes) const {
  std::vector<int32_t> out;
  for (const BlockHash& h : hashes) {
    const int32_t b = cache_.Find(h);
    if (b < 0) break;
    out.push_back(b);
  }
  return out;
}

int32_t KvBlockManager::NumFree(absl::Span<const int32_t> blocks) const {
  int32_t n = 0;
  for (int32_t b : blocks) n += pool_.RefCount(b) == 0 ? 1 : 0;
  return n;
}

int32_t KvBlockManager::CacheFullBlocks(int64_t seq, absl::Span<const BlockHash> hashes) {
  auto it = seqs_.find(seq);
  CHECK(it != seqs_.end()) << "unknown sequence " << seq;
  Seq& s = it->second;
  CHECK_LE(hashes.size(), s.blocks.size()) << "sequence " << seq;
  CHECK_LE(static_cast<int64_t>(hashes.size()) * block_size_, s.num_tokens) << "sequence " << seq;
  int32_t added = 0;
  for (size_t i = s.num_indexed; i < hashes.size(); ++i) {
    added += cache_.Insert(hashes[i], s.blocks[i]) ? 1 : 0;
  }
  s.num_indexed = std::max(s.num_indexed, hashes.size());
  return added;
}

void KvBlockManager::Pin(absl::Span<const int32_t> blocks) {
  for (int32_t b : blocks) pool_.Acquire(b);
}

void KvBlockManager::Unpin(absl::Span<const int32_t> blocks) {
  for (size_t i = blocks.size(); i-- > 0;) pool_.Release(blocks[i]);
}

bool KvBlockManager::NeedsCopyOnWrite(const Seq& s) const {
  // Only a partially filled last block can receive new tokens in place.
  if (s.num_tokens % block_size_ == 0 || s.blocks.empty()) return false;
  return pool_.RefCount(s.blocks.back()) > 1;
}

int32_t KvBlockManager::BlocksNeeded(int64_t seq, int64_t total_tokens) const {
  auto it = seqs_.find(seq);
  if (it == seqs_.end()) return static_cast<int32_t>((total_tokens + block_size_ - 1) / block_size_);
  const Seq& s = it->second;
  if (total_tokens <= s.num_tokens) return 0;
  const int64_t want = (total_tokens + block_size_ - 1) / block_size_;
  const int64_t extra = want > static_cast<int64_t>(s.blocks.size())
                            ? want - static_cast<int64_t>(s.blocks.size())
                            : 0;
  return static_cast<int32_t>(extra + (NeedsCopyOnWrite(s) ? 1 : 0));
}

absl::StatusOr<std::vector<BlockCopy>> KvBlockManager::Reserve(int64_t seq, int64_t total_tokens) {
  auto it = seqs_.find(seq);
  if (it == seqs_.end()) return absl::NotFoundError(absl::StrCat("unknown sequence ", seq));
  Seq& s = it->second;
  std::vector<BlockCopy> copies;
  if (total_tokens <= s.num_tokens) return copies;
  const int32_t needed = BlocksNeeded(seq, total_tokens);
  if (needed > pool_.num_free()) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "KV cache full: sequence ", seq, " needs ", needed, " more blocks, ", pool_.num_free(),
        " free of ", pool_.num_blocks()));
  }
  if (NeedsCopyOnWrite(s)) {
    auto fresh = pool_.Allocate(1);
    CHECK(fresh.ok()) << fresh.status();  // capacity checked above
    EvictForReuse((*fresh)[0]);
    copies.push_back({s.blocks.back(), (*fresh)[0]});
    pool_.Release(s.blocks.back());
    s.blocks.back() = (*fresh)[0];
  }
  const int64_t want = (total_tokens + block_size_ - 1) / block_size_;
  if (want > static_cast<int64_t>(s.blocks.size())) {
    auto fresh = pool_.Allocate(static_cast<int32_t>(want - s.blocks.size()));
    CHECK(fresh.ok()) << fresh.status();
    for (int32_t b : *fresh) EvictForReuse(b);  // new contents: no longer the cached prefix
    s.blocks.insert(s.blocks.end(), fresh->begin(), fresh->end());
  }
  s.num_tokens = total_tokens;
  return copies;
}

void KvBlockManager::EvictForReuse(int32_t block) {
  if (record_evictions_ && cache_.IsCached(block)) {
    evicted_.push_back({block, cache_.HashOf(block)});
  }
  cache_.Evict(block);
}

absl::StatusOr<std::vector<int32_t>> KvBlockManager::AppendLoadedBlocks(
    int64_t seq, absl::Span<const BlockHash> hashes) {
  auto it = seqs_.find(seq);
  if (it == seqs_.end()) return absl::NotFoundError(absl::StrCat("unknown sequence ", seq));
  Seq& s = it->second;
  if (s.num_tokens != static_cast<int64_t>(s.blocks.size()) * block_size_) {
    return absl::FailedPreconditionError(absl::StrCat(
        "sequence ", seq, ": loaded blocks must follow whole blocks, it has ", s.num_tokens,
        " tokens in ", s.blocks.size(), " blocks"));
  }
  ASSIGN_OR_RETURN(std::vector<int32_t> fresh,
                   pool_.Allocate(static_cast<int32_t>(hashes.size())));
  for (size_t i = 0; i < fresh.size(); ++i) {
    EvictForReuse(fresh[i]);
    cache_.Insert(hashes[i], fresh[i]);
  }
  s.blocks.insert(s.blocks.end(), fresh.begin(), fresh.end());
  s.num_tokens = static_cast<int64_t>(s.blocks.size()) * block_size_;
  s.num_indexed = s.blocks.size();
  return fresh;
}

absl::Status KvBlockManager::Fork(int64_t parent, int64_t child) {
  auto it = seqs_.find(parent);
  if (it == seqs_.end()) return absl::NotFoundError(absl::StrCat("unknown sequence ", parent));
  if (seqs_.contains(child)) {
    return absl::AlreadyExistsError(absl::StrCat("sequence ", child, " already has KV blocks"));
  }
  Seq copy = it->second;
  for (int32_t b : copy.blocks) pool_.IncRef(b);
  seqs_.emplace(child, std::move(copy));
  return absl::OkStatus();
}

void KvBlockManager::Free(int64_t seq) {
  auto it = seqs_.find(seq);
  if (it == seqs_.end()) return;
  // Tail first: the tail blocks reach the LRU queue first and are evicted before the head.
  const std::vector<int32_t>& blocks = it->second.blocks;
  for (size_t i = blocks.size(); i-- > 0;) pool_.Release(blocks[i]);
  seqs_.erase(it);
}

bool KvBlockManager::CanCompact(int64_t seq, int32_t from_block) const {
  auto it = seqs_.find(seq);
  if (it == seqs_.end() || from_block < 0) return false;
  const std::vector<int32_t>& blocks = it->second.blocks;
  for (size_t i = static_cast<size_t>(from_block); i < blocks.size(); ++i) {
    if (pool_.RefCount(blocks[i]) != 1) return false;
  }
  return true;
}

absl::Status KvBlockManager::Compact(int64_t seq, int32_t from_block, int64_t num_tokens) {
  auto it = seqs_.find(seq);
  if (it == seqs_.end()) return absl::NotFoundError(absl::StrCat("unknown sequence ", seq));
  Seq& s = it->second;
  if (!CanCompact(seq, from_block) || num_tokens < static_cast<int64_t>(from_block) * block_size_ ||
      num_tokens > s.num_tokens) {
    return absl::FailedPreconditionError(absl::StrCat(
        "sequence ", seq, ": cannot compact from block ", from_block, " to ", num_tokens, " of its ",
        s.num_tokens, " tokens (a block from there on is shared, or the count is out of range)"));
  }
  // Rewritten in place: out of the index, not offloaded (their bytes are about to change).
  for (size_t i = static_cast<size_t>(from_block); i < s.blocks.size(); ++i) cache_.Evict(s.blocks[i]);
  s.num_indexed = std::min(s.num_indexed, static_cast<size_t>(from_block));
  const size_t keep = static_cast<size_t>((num_tokens + block_size_ - 1) / block_size_);
  for (size_t i = s.blocks.size(); i-- > keep;) pool_.Release(s.blocks[i]);  // tail first
  s.blocks.resize(keep);
  s.num_tokens = num_tokens;
  return absl::OkStatus();
}

absl::Span<const int32_t> KvBlockManager::BlockTable(int64_t seq) const {
  auto it = seqs_.find(seq);
  CHECK(it != seqs_.end()) << "unknown sequence " << seq;
  return it->second.blocks;
}

int64_t KvBlockManager::NumTokens(int64_t seq) const {
  auto it = seqs_.find(seq);
  CHECK(it != seqs_.end()) << "unknown sequence " << seq;
  return it->second.num_tokens;
}

}  // namespace lorc
