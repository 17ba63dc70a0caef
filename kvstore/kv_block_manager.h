// Sequence-level view of the paged KV cache: which blocks each sequence owns (its block table),
// allocation as sequences grow, sharing between sequences (fork) with copy-on-write, and freeing.
//
// Invariants:
//  - a sequence with n tokens owns exactly ceil(n / block_size) blocks (after Reserve);
//  - a block shared by several sequences (ref count > 1) is never written: Reserve replaces a
//    shared, partially filled last block with a private copy and returns the copy to perform;
//  - Reserve is all-or-nothing: on ResourceExhausted nothing changed.
// Thread safety: none; owned by one scheduler / engine thread.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "kvstore/block_pool.h"

namespace lorc {

// Copy every layer's K and V rows of block `src` into block `dst` (copy-on-write).
struct BlockCopy {
  int32_t src = 0;
  int32_t dst = 0;
};

class KvBlockManager {
 public:
  KvBlockManager(int32_t block_size, int32_t num_blocks);

  int32_t block_size() const { return block_size_; }
  const BlockPool& pool() const { return pool_; }
  int32_t num_free_blocks() const { return pool_.num_free(); }
  size_t num_sequences() const { return seqs_.size(); }

  bool Has(int64_t seq) const { return seqs_.contains(seq); }
  // Registers an empty sequence; AlreadyExists if the id is taken.
  absl::Status AddSequence(int64_t seq);
  // New blocks Reserve(seq, total_tokens) would take (including a copy-on-write block).
  int32_t BlocksNeeded(int64_t seq, int64_t total_tokens) const;
  // Grows `seq` to hold `total_tokens` tokens; positions [NumTokens(seq), total_tokens) are about
  // to be written. Returns the block copies that must run before that write.
  absl::StatusOr<std::vector<BlockCopy>> Reserve(int64_t seq, int64_t total_tokens);
  // `child` (new id) shares all of `parent`'s blocks and its token count.
  absl::Status Fork(int64_t parent, int64_t child);
  // Releases the sequence's blocks; no-op for unknown ids.
  void Free(int64_t seq);

  absl::Span<const int32_t> BlockTable(int64_t seq) const;
  int64_t NumTokens(int64_t seq) const;

 private:
  struct Seq {
    std::vector<int32_t> blocks;
    int64_t num_tokens = 0;
  };
  bool NeedsCopyOnWrite(const Seq& s) const;

  int32_t block_size_;
  BlockPool pool_;
  absl::flat_hash_map<int64_t, Seq> seqs_;
};

}  // namespace lorc
