#include "kvstore/kv_block_manager.h"

#include "common/check.h"
#include "absl/strings/str_cat.h"

namespace lorc {

KvBlockManager::KvBlockManager(int32_t block_size, int32_t num_blocks)
    : block_size_(block_size), pool_(num_blocks) {
  CHECK_GT(block_size, 0);
}

absl::Status KvBlockManager::AddSequence(int64_t seq) {
  if (!seqs_.try_emplace(seq).second) {
    return absl::AlreadyExistsError(absl::StrCat("sequence ", seq, " already has KV blocks"));
  }
  return absl::OkStatus();
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
    copies.push_back({s.blocks.back(), (*fresh)[0]});
    pool_.Release(s.blocks.back());
    s.blocks.back() = (*fresh)[0];
  }
  const int64_t want = (total_tokens + block_size_ - 1) / block_size_;
  if (want > static_cast<int64_t>(s.blocks.size())) {
    auto fresh = pool_.Allocate(static_cast<int32_t>(want - s.blocks.size()));
    CHECK(fresh.ok()) << fresh.status();
    s.blocks.insert(s.blocks.end(), fresh->begin(), fresh->end());
  }
  s.num_tokens = total_tokens;
  return copies;
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
  for (int32_t b : it->second.blocks) pool_.Release(b);
  seqs_.erase(it);
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
