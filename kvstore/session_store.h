// Multi-turn sessions: a request with a session_id keeps its conversation's computed full blocks
// (prompt + generated tokens, the ones in the prefix index) referenced after it ends, so the next
// turn, whose prompt starts with the whole conversation so far, finds them in the prefix index
// and prefills only the new tokens. A pinned block is in use: never evicted, never rewritten.
//
// A session ends (its blocks unpinned, then reusable as ordinary cached blocks until evicted):
//  - after `ttl` without a turn ending or starting (Expire, called by the scheduler thread with
//    its clock, so tests can use a fake one);
//  - when the distinct blocks pinned by all sessions exceed `max_blocks`, or the sessions
//    max(`max_blocks`, 1) (a conversation shorter than a block pins nothing): oldest first (by
//    last use), never the session just kept; a session that alone exceeds the cap is not kept at
//    all (its blocks are not pinned, the others stay);
//  - on Close (the CloseSession RPC); NotFound for an unknown key;
//  - under memory pressure, when a waiting request cannot be admitted with nothing running
//    (ReleaseOldest, the scheduler's call), and on Clear (a worker restart or failure).
// Sessions are keyed by (cache_salt, session_id): tenants with different salts never see, replace
// or close each other's sessions. Pinned blocks are counted once however many sessions pin them
// (a per-block pin count), for the cap and num_pinned_blocks. The store is format-agnostic: block ids of whatever the cache holds (full,
// LoRC latents, low-precision codes).
// Thread safety: none (the scheduler thread).
#pragma once

#include <cstdint>
#include <compare>
#include <string>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/functional/function_ref.h"
#include "absl/status/status.h"
#include "absl/time/time.h"
#include "kvstore/kv_block_manager.h"

namespace lorc {

// A session's identity: the request's cache_salt and session_id.
struct SessionKey {
  std::string cache_salt;
  std::string session_id;
  friend bool operator==(const SessionKey&, const SessionKey&) = default;
  friend auto operator<=>(const SessionKey&, const SessionKey&) = default;
  template <typename H>
  friend H AbslHashValue(H h, const SessionKey& k) {
    return H::combine(std::move(h), k.cache_salt, k.session_id);
  }
};

class SessionStore {
 public:
  // `blocks` must outlive the store. `max_blocks` >= 0.
  SessionStore(KvBlockManager* blocks, absl::Duration ttl, int64_t max_blocks);
  ~SessionStore();  // unpins everything
  SessionStore(const SessionStore&) = delete;
  SessionStore& operator=(const SessionStore&) = delete;

  // Pins `blocks` (in use by the ending turn, chain order) for `id`, replacing what it pinned
  // (the new blocks are pinned before the old ones are released, so shared ones stay), then
  // enforces the cap.
  void Keep(const SessionKey& id, std::vector<int32_t> blocks, absl::Time now);
  // A turn of `id` started: its idle time restarts. No-op for unknown ids.
  void Touch(const SessionKey& id, absl::Time now);
  // NotFound naming the id when there is no such session.
  absl::Status Close(const SessionKey& id);
  // Ends sessions idle for longer than the ttl, except those for which `busy` is true (a turn of
  // theirs is waiting or running: its end starts the idle time again); returns how many.
  int32_t Expire(absl::Time now, absl::FunctionRef<bool(const SessionKey&)> busy);
  int32_t Expire(absl::Time now) {
    return Expire(now, [](const SessionKey&) { return false; });
  }
  // Ends the least recently used session other than `except` (null: any), counted in
  // num_capped(); false when there is none.
  bool ReleaseOldest(const SessionKey* except = nullptr);
  void Clear();

  bool Has(const SessionKey& id) const { return sessions_.contains(id); }
  int64_t num_sessions() const { return static_cast<int64_t>(sessions_.size()); }
  int64_t num_pinned_blocks() const { return static_cast<int64_t>(pin_count_.size()); }
  int64_t num_expired() const { return num_expired_; }   // by ttl, since construction
  int64_t num_capped() const { return num_capped_; }     // by the cap or memory pressure
  int64_t num_closed() const { return num_closed_; }     // by Close
  // The blocks `id` pins (empty for unknown ids). For tests.
  std::vector<int32_t> PinnedBlocks(const SessionKey& id) const;
  // Every session's pins, concatenated (a block once per session pinning it).
  std::vector<int32_t> AllPinnedBlocks() const;
  // How many sessions pin block `b` (0 when none).
  int32_t PinCount(int32_t b) const;

 private:
  struct Session {
    std::vector<int32_t> blocks;
    absl::Time last_used;
  };
  void Drop(absl::flat_hash_map<SessionKey, Session>::iterator it);
  void PinAll(const std::vector<int32_t>& blocks);
  void UnpinAll(const std::vector<int32_t>& blocks);

  KvBlockManager* blocks_;
  absl::Duration ttl_;
  int64_t max_blocks_;
  absl::flat_hash_map<SessionKey, Session> sessions_;
  absl::flat_hash_map<int32_t, int32_t> pin_count_;  // block -> sessions pinning it (> 0)
  int64_t num_expired_ = 0, num_capped_ = 0, num_closed_ = 0;
};

}  // namespace lorc
