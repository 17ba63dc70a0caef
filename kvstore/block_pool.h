// Reference-counted pool of KV cache block ids. Pure bookkeeping: no device memory here.
//
// Invariants: every block is either free (ref count 0, in the free queue exactly once) or in use
// (ref count >= 1, not in the free queue). Freed blocks join the back of the queue and
// allocation takes from the front, so the least recently freed block is reused first (the LRU
// order the prefix cache relies on: a free block may still hold a cached prefix, kvstore/
// prefix_cache.h, until it is handed out again). `Acquire` takes a free block out of the middle
// of the queue in O(1) (a prefix-cache hit on an unreferenced block); the queue is an intrusive
// doubly linked list over block ids.
// Thread safety: none; the owner (the scheduler thread) serialises access.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"

namespace lorc {

class BlockPool {
 public:
  explicit BlockPool(int32_t num_blocks);

  int32_t num_blocks() const { return static_cast<int32_t>(ref_.size()); }
  int32_t num_free() const { return num_free_; }
  int32_t num_used() const { return num_blocks() - num_free(); }

  // `n` fresh blocks with ref count 1 from the front of the free queue (least recently freed
  // first), or ResourceExhausted (nothing taken) when fewer are free.
  absl::StatusOr<std::vector<int32_t>> Allocate(int32_t n);
  // Adds a reference to an in-use block (sharing it with another sequence).
  void IncRef(int32_t block);
  // Adds a reference to any block: a free one leaves the free queue with ref count 1 (a cached
  // block reused), an in-use one is shared (IncRef).
  void Acquire(int32_t block);
  // Drops a reference; the block returns to the back of the free queue when none is left.
  void Release(int32_t block);
  int32_t RefCount(int32_t block) const;

 private:
  void Unlink(int32_t block);
  void PushBack(int32_t block);

  std::vector<int32_t> ref_;
  // Free queue: prev_/next_ link block ids, -1 ends; head_ is the next block to allocate.
  std::vector<int32_t> prev_, next_;
  int32_t head_ = -1, tail_ = -1;
  int32_t num_free_ = 0;
};

}  // namespace lorc
