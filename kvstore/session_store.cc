#include "kvstore/session_store.h"

#include <utility>

#include "absl/strings/str_cat.h"

namespace lorc {

SessionStore::SessionStore(KvBlockManager* blocks, absl::Duration ttl, int64_t max_blocks)
    : blocks_(blocks), ttl_(ttl), max_blocks_(max_blocks) {}

SessionStore::~SessionStore() { Clear(); }

void SessionStore::Drop(absl::flat_hash_map<std::string, Session>::iterator it) {
  blocks_->Unpin(it->second.blocks);
  num_pinned_ -= static_cast<int64_t>(it->second.blocks.size());
  sessions_.erase(it);
}

void SessionStore::Keep(const std::string& id, std::vector<int32_t> blocks, absl::Time now) {
  blocks_->Pin(blocks);
  num_pinned_ += static_cast<int64_t>(blocks.size());
  Session& s = sessions_[id];
  std::vector<int32_t> old = std::exchange(s.blocks, std::move(blocks));
  s.last_used = now;
  blocks_->Unpin(old);
  num_pinned_ -= static_cast<int64_t>(old.size());
  while (num_pinned_ > max_blocks_ && ReleaseOldest()) ++num_capped_;
}

void SessionStore::Touch(const std::string& id, absl::Time now) {
  auto it = sessions_.find(id);
  if (it != sessions_.end()) it->second.last_used = now;
}

absl::Status SessionStore::Close(const std::string& id) {
  auto it = sessions_.find(id);
  if (it == sessions_.end()) {
    return absl::NotFoundError(absl::StrCat("session_id '", id, "': no such session (never "
                                            "started, or already ended: closed, idle past the "
                                            "ttl, or released for memory)"));
  }
  Drop(it);
  ++num_closed_;
  return absl::OkStatus();
}

int32_t SessionStore::Expire(absl::Time now) {
  int32_t n = 0;
  for (auto it = sessions_.begin(); it != sessions_.end();) {
    auto next = std::next(it);
    if (now - it->second.last_used > ttl_) {
      Drop(it);
      ++n;
    }
    it = next;
  }
  num_expired_ += n;
  return n;
}

bool SessionStore::ReleaseOldest() {
  auto oldest = sessions_.end();
  for (auto it = sessions_.begin(); it != sessions_.end(); ++it) {
    if (oldest == sessions_.end() || it->second.last_used < oldest->second.last_used ||
        (it->second.last_used == oldest->second.last_used && it->first < oldest->first)) {
      oldest = it;
    }
  }
  if (oldest == sessions_.end()) return false;
  Drop(oldest);
  return true;
}

void SessionStore::Clear() {
  while (!sessions_.empty()) Drop(sessions_.begin());
}

std::vector<int32_t> SessionStore::PinnedBlocks(const std::string& id) const {
  auto it = sessions_.find(id);
  return it == sessions_.end() ? std::vector<int32_t>() : it->second.blocks;
}

std::vector<int32_t> SessionStore::AllPinnedBlocks() const {
  std::vector<int32_t> out;
  for (const auto& [id, s] : sessions_) out.insert(out.end(), s.blocks.begin(), s.blocks.end());
  return out;
}

}  // namespace lorc
