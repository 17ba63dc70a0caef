// Reference-counted pool of KV cache block ids. Pure bookkeeping: no device memory here.
//
// Invariants: every block is either free (ref count 0, in the free queue exactly once) or in use
// (ref count >= 1, not in the free queue). Freed blocks join the back of the queue and
// allocation takes from the front, so the least recently freed block is reused first (the LRU
// order the prefix cache relies on).
// Thread safety: none; the owner (the scheduler thread) serialises access.
#pragma once

#include <cstdint>
#include <deque>
#include <vector>

#include "absl/status/statusor.h"

namespace lorc {

class BlockPool {
 public:
  explicit BlockPool(int32_t num_blocks);

  int32_t num_blocks() const { return static_cast<int32_t>(ref_.size()); }
  int32_t num_free() const { return static_cast<int32_t>(free_.size()); }
  int32_t num_used() const { return num_blocks() - num_free(); }

  // `n` fresh blocks with ref count 1, or ResourceExhausted (nothing taken) when fewer are free.
  absl::StatusOr<std::vector<int32_t>> Allocate(int32_t n);
  // Adds a reference to an in-use block (sharing it with another sequence).
  void IncRef(int32_t block);
  // Drops a reference; the block returns to the free queue when none is left.
  void Release(int32_t block);
  int32_t RefCount(int32_t block) const;

 private:
  std::vector<int32_t> ref_;
  std::deque<int32_t> free_;
};

}  // namespace lorc
