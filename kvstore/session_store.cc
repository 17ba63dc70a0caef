#include "kvstore/session_store.h"

#include <algorithm>
#include <utility>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"

namespace lorc {

SessionStore::SessionStore(KvBlockManager* blocks, absl::Duration ttl, int64_t max_blocks)
    : blocks_(blocks), ttl_(ttl), max_blocks_(max_blocks) {}

SessionStore::~SessionStore() { Clear(); }

void SessionStore::PinAll(const std::vector<int32_t>& blocks) {
  blocks_->Pin(blocks);
  for (int32_t b : blocks) ++pin_count_[b];
}

void SessionStore::UnpinAll(const std::vector<int32_t>& blocks) {
  blocks_->Unpin(blocks);
  for (int32_t b : blocks) {
    auto it = pin_count_.find(b);
    if (it != pin_count_.end() && --it->second <= 0) pin_count_.erase(it);
  }
}

void SessionStore::Drop(absl::flat_hash_map<SessionKey, Session>::iterator it) {
  UnpinAll(it->second.blocks);
  sessions_.erase(it);
}

void SessionStore::Keep(const SessionKey& id, std::vector<int32_t> blocks, absl::Time now) {
  // A chain's blocks are distinct: alone over the cap, the session is not kept (what it pinned
  // before is released too: the conversation moved past it), and the others stay.
  if (static_cast<int64_t>(blocks.size()) > max_blocks_) {
    auto it = sessions_.find(id);
    if (it != sessions_.end()) Drop(it);
    ++num_capped_;
    return;
  }
  PinAll(blocks);
  Session& s = sessions_[id];
  std::vector<int32_t> old = std::exchange(s.blocks, std::move(blocks));
  s.last_used = now;
  UnpinAll(old);
  // Oldest first, never `id` itself (it fits alone, so this ends before reaching it).
  // Also at most max(max_blocks, 1) sessions: those of conversations shorter than a block pin
  // nothing, and unbounded they would grow the map and Expire's scan without limit.
  while (num_pinned_blocks() > max_blocks_ || num_sessions() > std::max<int64_t>(max_blocks_, 1)) {
    if (!ReleaseOldest(&id)) break;
  }
}

int32_t SessionStore::PinCount(int32_t b) const {
  auto it = pin_count_.find(b);
  return it == pin_count_.end() ? 0 : it->second;
}

void SessionStore::Touch(const SessionKey& id, absl::Time now) {
  auto it = sessions_.find(id);
  if (it != sessions_.end()) it->second.last_used = now;
}

absl::Status SessionStore::Close(const SessionKey& id) {
  auto it = sessions_.find(id);
  if (it == sessions_.end()) {
    // The id escaped (C style, UTF-8 kept readable): a newline or a control character in it
    // cannot forge log lines.
    return absl::NotFoundError(absl::StrCat("session_id '", absl::Utf8SafeCEscape(id.session_id), "' (cache_salt of ", id.cache_salt.size(), " bytes): no such session (never "
                                            "started, or already ended: closed, idle past the "
                                            "ttl, or released for memory)"));
  }
  Drop(it);
  ++num_closed_;
  return absl::OkStatus();
}

int32_t SessionStore::Expire(absl::Time now, absl::FunctionRef<bool(const SessionKey&)> busy) {
  int32_t n = 0;
  for (auto it = sessions_.begin(); it != sessions_.end();) {
    auto next = std::next(it);
    if (now - it->second.last_used > ttl_ && !busy(it->first)) {
      Drop(it);
      ++n;
    }
    it = next;
  }
  num_expired_ += n;
  return n;
}

bool SessionStore::ReleaseOldest(const SessionKey* except) {
  auto oldest = sessions_.end();
  for (auto it = sessions_.begin(); it != sessions_.end(); ++it) {
    if (except != nullptr && it->first == *except) continue;
    if (oldest == sessions_.end() || it->second.last_used < oldest->second.last_used ||
        (it->second.last_used == oldest->second.last_used && it->first < oldest->first)) {
      oldest = it;
    }
  }
  if (oldest == sessions_.end()) return false;
  Drop(oldest);
  ++num_capped_;  // the cap (Keep) or memory pressure (the scheduler)
  return true;
}

void SessionStore::Clear() {
  while (!sessions_.empty()) Drop(sessions_.begin());
}

std::vector<int32_t> SessionStore::PinnedBlocks(const SessionKey& id) const {
  auto it = sessions_.find(id);
  return it == sessions_.end() ? std::vector<int32_t>() : it->second.blocks;
}

std::vector<int32_t> SessionStore::AllPinnedBlocks() const {
  std::vector<int32_t> out;
  for (const auto& [id, s] : sessions_) out.insert(out.end(), s.blocks.begin(), s.blocks.end());
  return out;
}

}  // namespace lorc
