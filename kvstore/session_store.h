// Multi-turn sessions: a request with a session_id keeps its conversation's computed full blocks
// (prompt + generated tokens, the ones in the prefix index) referenced after it ends, so the next
// turn, whose prompt starts with the whole conversation so far, finds them in the prefix index
// and prefills only the new tokens. A pinned block is in use: never evicted, never rewritten.
//
// A session ends (its blocks unpinned, then reusable as ordinary cached blocks until evicted):
//  - after `ttl` without a turn ending or starting (Expire, called by the scheduler thread with
//    its clock, so tests can use a fake one);
//  - when the blocks pinned by all sessions exceed `max_blocks`: oldest first (by last use),
//    the session just kept included if it alone is over the cap;
//  - on Close (the CloseSession RPC); NotFound for an unknown id;
//  - under memory pressure, when a waiting request cannot be admitted with nothing running
//    (ReleaseOldest, the scheduler's call), and on Clear (a worker restart or failure).
// Pinned blocks are counted per session (a block two sessions share counts twice: the cap is
// conservative). The store is format-agnostic: block ids of whatever the cache holds (full,
// LoRC latents, low-precision codes).
// Thread safety: none (the scheduler thread).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/time/time.h"
#include "kvstore/kv_block_manager.h"

namespace lorc {

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
  void Keep(const std::string& id, std::vector<int32_t> blocks, absl::Time now);
  // A turn of `id` started: its idle time restarts. No-op for unknown ids.
  void Touch(const std::string& id, absl::Time now);
  // NotFound naming the id when there is no such session.
  absl::Status Close(const std::string& id);
  // Ends sessions idle for longer than the ttl; returns how many.
  int32_t Expire(absl::Time now);
  // Ends the least recently used session; false when there is none.
  bool ReleaseOldest();
  void Clear();

  bool Has(const std::string& id) const { return sessions_.contains(id); }
  int64_t num_sessions() const { return static_cast<int64_t>(sessions_.size()); }
  int64_t num_pinned_blocks() const { return num_pinned_; }
  int64_t num_expired() const { return num_expired_; }   // by ttl, since construction
  int64_t num_capped() const { return num_capped_; }     // by the cap or memory pressure
  int64_t num_closed() const { return num_closed_; }     // by Close
  // The blocks `id` pins (empty for unknown ids). For tests.
  std::vector<int32_t> PinnedBlocks(const std::string& id) const;
  // Every session's pins, concatenated (a block once per session pinning it).
  std::vector<int32_t> AllPinnedBlocks() const;

 private:
  struct Session {
    std::vector<int32_t> blocks;
    absl::Time last_used;
  };
  void Drop(absl::flat_hash_map<std::string, Session>::iterator it);

  KvBlockManager* blocks_;
  absl::Duration ttl_;
  int64_t max_blocks_;
  absl::flat_hash_map<std::string, Session> sessions_;
  int64_t num_pinned_ = 0;
  int64_t num_expired_ = 0, num_capped_ = 0, num_closed_ = 0;
};

}  // namespace lorc
