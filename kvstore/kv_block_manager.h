// Sequence-level view of the paged KV cache: which blocks each sequence owns (its block table),
// allocation as sequences grow, sharing between sequences (fork) with copy-on-write, freeing, and
// the prefix index over full computed blocks (prefix_cache.h): a new sequence can start with
// cached blocks (AddSequence with a MatchPrefix result), computed full blocks are indexed
// (CacheFullBlocks), blocks can be pinned without a sequence (Pin / Unpin: sessions).
//
// Invariants:
//  - a sequence with n tokens owns exactly ceil(n / block_size) blocks (after Reserve); its
//    "tokens" are cache slots: fewer than its positions after a KV policy's Compact;
//  - a block shared by several sequences (ref count > 1) is never written: Reserve replaces a
//    shared, partially filled last block with a private copy and returns the copy to perform;
//  - Reserve is all-or-nothing: on ResourceExhausted nothing changed;
//  - an indexed block is full and never written while indexed: only a partially filled last
//    block receives tokens (copied first when shared), and a block handed out by the pool for new
//    contents leaves the index first (Evict), so a hit never returns a block being rewritten;
//  - Free releases a table tail first: the tail blocks of a sequence enter the pool's LRU queue
//    before its head blocks and are evicted first (a prefix is only useful from its start).
// Thread safety: none; owned by one scheduler / engine thread.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "kvstore/block_pool.h"
#include "kvstore/prefix_cache.h"

namespace lorc {

// Copy every layer's K and V rows of block `src` into block `dst` (copy-on-write).
struct BlockCopy {
  int32_t src = 0;
  int32_t dst = 0;
};

// An indexed block handed out for new contents (its prefix-index entry dropped): what the host
// tier may save before the block is overwritten (coordinator/scheduler.h).
struct EvictedBlock {
  int32_t block = 0;
  BlockHash hash;
};

class KvBlockManager {
 public:
  KvBlockManager(int32_t block_size, int32_t num_blocks);

  int32_t block_size() const { return block_size_; }
  const BlockPool& pool() const { return pool_; }
  int32_t num_free_blocks() const { return pool_.num_free(); }
  size_t num_sequences() const { return seqs_.size(); }

  bool Has(int64_t seq) const { return seqs_.contains(seq); }
  // Registers a sequence; AlreadyExists if the id is taken. `cached_blocks` (a MatchPrefix
  // result: indexed full blocks, in chain order) start its block table, referenced (a free one
  // leaves the free queue), and count as its first cached_blocks.size() * block_size tokens.
  absl::Status AddSequence(int64_t seq, absl::Span<const int32_t> cached_blocks = {});

  // --- Prefix index (prefix_cache.h) ---
  // The blocks of the longest prefix of `hashes` (a request's chain) that is indexed.
  std::vector<int32_t> MatchPrefix(absl::Span<const BlockHash> hashes) const;
  // How many of `blocks` are free (ref count 0): taking them costs free blocks.
  int32_t NumFree(absl::Span<const int32_t> blocks) const;
  // Indexes the sequence's full blocks whose hashes are given (the chain of its first
  // hashes.size() blocks, which the caller knows are computed; at most its table's size). Blocks
  // indexed before are skipped; a hash already indexed under another block leaves this block
  // unindexed. Returns the number of blocks newly indexed.
  int32_t CacheFullBlocks(int64_t seq, absl::Span<const BlockHash> hashes);
  // References blocks outside any sequence (a session keeping its conversation), and drops them
  // (tail first, as Free).
  void Pin(absl::Span<const int32_t> blocks);
  void Unpin(absl::Span<const int32_t> blocks);
  // A sequence just added (AddSequence: whole cached blocks only) continues with blocks whose
  // contents come from the host tier: allocates hashes.size() fresh blocks (least recently freed
  // first, evicting as Reserve does), indexes each under its hash (the caller's plan loads them
  // before any step reads them; a hash already indexed elsewhere leaves its block unindexed) and
  // counts their tokens as the sequence's. Returns the blocks, in chain order. ResourceExhausted
  // (nothing changed) when too few are free; NotFound for an unknown sequence;
  // FailedPrecondition when the sequence's last block is partial.
  absl::StatusOr<std::vector<int32_t>> AppendLoadedBlocks(int64_t seq,
                                                          absl::Span<const BlockHash> hashes);
  // Drops the whole index (the blocks stay with their holders; free ones are plain free blocks).
  // Also forgets evictions not yet taken.
  void ClearPrefixCache() {
    cache_.Clear();
    evicted_.clear();
  }
  // Evictions (indexed blocks handed out for new contents by Reserve / AppendLoadedBlocks) are
  // recorded, in order, while `on`; TakeEvicted returns and forgets them. Off by default.
  void set_record_evictions(bool on) { record_evictions_ = on; }
  std::vector<EvictedBlock> TakeEvicted() { return std::exchange(evicted_, {}); }
  const PrefixCache& prefix_cache() const { return cache_; }
  PrefixCacheStats& prefix_cache_stats() { return cache_.stats(); }

  // New blocks Reserve(seq, total_tokens) would take (including a copy-on-write block).
  int32_t BlocksNeeded(int64_t seq, int64_t total_tokens) const;
  // Grows `seq` to hold `total_tokens` tokens; positions [NumTokens(seq), total_tokens) are about
  // to be written. Returns the block copies that must run before that write.
  absl::StatusOr<std::vector<BlockCopy>> Reserve(int64_t seq, int64_t total_tokens);
  // `child` (new id) shares all of `parent`'s blocks and its token count.
  absl::Status Fork(int64_t parent, int64_t child);
  // Releases the sequence's blocks (tail first); no-op for unknown ids. Indexed blocks stay
  // indexed: reusable until the pool hands them out again.
  void Free(int64_t seq);

  // Token-level KV policy compaction (kvpolicy/README.md "Compaction"): the sequence's blocks
  // from `from_block` on are rewritten in place by the workers, so they leave the prefix index
  // (not recorded as evictions: no host copy of bytes about to change), and it keeps
  // num_tokens slots: the blocks past ceil(num_tokens / block_size) are released (tail first).
  // CanCompact: every block from from_block on is held by this sequence alone. Compact:
  // FailedPrecondition (nothing changed) unless CanCompact and num_tokens is in
  // [from_block x block_size, NumTokens]; NotFound for an unknown sequence.
  bool CanCompact(int64_t seq, int32_t from_block) const;
  absl::Status Compact(int64_t seq, int32_t from_block, int64_t num_tokens);
  absl::Span<const int32_t> BlockTable(int64_t seq) const;
  int64_t NumTokens(int64_t seq) const;

 private:
  struct Seq {
    std::vector<int32_t> blocks;
    int64_t num_tokens = 0;
    size_t num_indexed = 0;  // leading blocks CacheFullBlocks has seen
  };
  bool NeedsCopyOnWrite(const Seq& s) const;
  // `block` was just allocated for new contents: drop its index entry (recorded when asked).
  void EvictForReuse(int32_t block);

  int32_t block_size_;
  BlockPool pool_;
  PrefixCache cache_;
  absl::flat_hash_map<int64_t, Seq> seqs_;
  bool record_evictions_ = false;
  std::vector<EvictedBlock> evicted_;
};

}  // namespace lorc
