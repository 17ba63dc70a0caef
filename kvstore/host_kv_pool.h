// The host-memory KV tier (issue #10), coordinator side: which block (by its prefix-index hash)
// each host slot holds, LRU eviction, pins. Bookkeeping only: the bytes live on every worker
// (backend/backend.h HostKvStorage, sized by --kv-offloading-size), which copies blocks when a
// step plan says so (step/step.h StepPlan::kv_offloads / kv_loads). Because the coordinator makes
// every decision and every tensor-parallel rank executes the same plans, all ranks hold the same
// block in the same slot.
//
// How the scheduler uses it (the integration with the prefix index):
//  - A cached device block with hash h is evicted from the device pool: `Insert(h)`. When
//    `copy` is true, put HostBlockCopy{device block, slot} into the plan's kv_offloads (in the
//    same plan as, or before, any plan that reuses the device block; the worker copies before the
//    forward pass). `evicted` is the hash whose host copy was dropped for it (the prefix index
//    forgets that block's host location).
//  - A prefix lookup misses on the device but `Lookup(h)` finds a slot: allocate a device block
//    b, put HostBlockCopy{b, slot} into the plan's kv_loads, and `Pin(h)` until that plan has
//    been sent. Within one plan the workers run offloads before loads, so an `Insert` for the
//    same plan must not take a slot a load of that plan reads: pinned slots are never evicted.
//    Later plans run later, so the pin can go as soon as the plan is sent.
//  - The host copy stays valid after a load (an inclusive tier): a block evicted again later
//    needs no second copy while its hash is still here (`Insert` returns copy = false).
//  - A worker restart loses the host memory: `Clear()`.
//
// Threads: none; called by the one thread that owns the scheduler.
#pragma once

#include <cstdint>
#include <list>
#include <optional>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "kvstore/block_hash.h"

namespace lorc {

// One block moved between the device KV cache and the host tier: device block id `block`
// (in [0, num_blocks)) and host slot `slot` (in [0, num_host_blocks)). The direction is given by
// the list it is in (StepPlan::kv_offloads: device -> host; kv_loads: host -> device).
struct HostBlockCopy {
  int32_t block = 0;
  int32_t slot = 0;
  friend bool operator==(const HostBlockCopy& a, const HostBlockCopy& b) {
    return a.block == b.block && a.slot == b.slot;
  }
};

class HostKvPool {
 public:
  // `num_slots` >= 0: the host slots every worker reported (the smallest over the ranks); 0 is a
  // pool that holds nothing (the tier is off).
  explicit HostKvPool(int32_t num_slots);

  struct Insertion {
    int32_t slot = -1;
    // True when the block is new here and must be copied (a kv_offloads entry); false when the
    // hash already had a slot (refreshed as most recently used).
    bool copy = false;
    std::optional<BlockHash> evicted;  // the least recently used unpinned entry it replaced
  };
  // A slot for `hash`: its own if present, else a free slot, else the least recently used
  // unpinned entry's. ResourceExhausted when every slot is pinned or the pool has none.
  absl::StatusOr<Insertion> Insert(const BlockHash& hash);
  // The slot holding `hash` (refreshed as most recently used), or -1.
  int32_t Lookup(const BlockHash& hash);
  // The same without touching the recency order.
  int32_t Peek(const BlockHash& hash) const;
  // Pins (counted) keep an entry from eviction while a plan that loads it is being built.
  // NotFound for a hash that is not here.
  absl::Status Pin(const BlockHash& hash);
  // FailedPrecondition when the hash is not pinned, NotFound when it is not here.
  absl::Status Unpin(const BlockHash& hash);
  // Drops `hash` (NotFound when absent, FailedPrecondition when pinned); its slot becomes free.
  absl::Status Erase(const BlockHash& hash);
  // Forgets everything (a worker lost its host memory); pins included.
  void Clear();

  int32_t num_slots() const { return num_slots_; }
  int32_t num_used() const { return static_cast<int32_t>(entries_.size()); }
  int32_t num_pinned() const { return num_pinned_; }
  int64_t num_evictions() const { return num_evictions_; }  // entries replaced by Insert so far
  // Unpinned entries from least to most recently used (tests, debugging).
  std::vector<BlockHash> LruOrder() const;

 private:
  struct Entry {
    int32_t slot = -1;
    int32_t pins = 0;
    std::list<BlockHash>::iterator lru;  // valid only while pins == 0
  };
  int32_t num_slots_;
  absl::flat_hash_map<BlockHash, Entry> entries_;
  std::list<BlockHash> lru_;        // unpinned entries, least recently used first
  std::vector<int32_t> free_;       // free slots, taken from the back (0, 1, 2, ... at first)
  int32_t num_pinned_ = 0;          // entries with pins > 0
  int64_t num_evictions_ = 0;
};

}  // namespace lorc
