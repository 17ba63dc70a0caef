// The prefix index: which KV blocks hold the computed K/V of which token prefix, so a request
// whose prompt starts with tokens another request has computed reuses those blocks instead of
// recomputing them (automatic prefix caching; vLLM v1's KVCacheManager / BlockPool hash chain,
// docs "Automatic Prefix Caching"; SGLang's RadixAttention shares the same idea as a radix tree).
//
// Keys: a full block (block_size tokens) is named by a hash chain
//   h_0    = PrefixRootHash(format identity, cache_salt)
//   h_i+1  = HashBlock(h_i, tokens of block i)
// so a block's key depends on every token before it, on the request's cache_salt (tenants with
// different salts never share a block) and on KvFormatIdentity (model geometry, KV format:
// compression method and per-layer ranks and widths, kv_cache_dtype, block_size), so a LoRC or
// int8 cache never matches a full one. Hashes are the first 128 bits of SHA-256 (OpenSSL): a
// collision (two different prefixes with one key) has probability ~n^2 / 2^129 for n cached
// blocks, negligible; the index does not compare tokens on a hit.
// Only full blocks are indexed: a partially filled block is still being written.
//
// The index maps hash -> block id and block id -> hash. It holds no references: an indexed block
// may be in use (ref count >= 1) or free (ref count 0, in the BlockPool's free queue, reusable
// until allocated again; then KvBlockManager calls Evict). So eviction is the pool's LRU order
// (least recently freed first), never a block in use. Owned by KvBlockManager.
// Thread safety: none (the scheduler thread).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/types/span.h"
#include "kvstore/block_hash.h"  // BlockHash: 128 bits (here: of SHA-256)
#include "kvstore/kv_spec.h"
#include "model/model_config.h"

namespace lorc {

// What a KV block's contents depend on besides its tokens: the model's geometry (type, vocab,
// layers, hidden size, heads, head_dim, rope theta, and a LoRC model's method and factor source)
// and the cache format (block_size, kv_cache_dtype, stored dtype, KV heads, per-layer K/V widths,
// RoPE placement, latent method and per-layer ranks). Two specs that differ in any of these give
// different strings. Human-readable (for debugging), not parsed.
std::string KvFormatIdentity(const ModelConfig& config, const KvCacheSpec& spec);

// h_0 of a request's chain: SHA-256 over the format identity and the salt (length-prefixed, so
// ("ab", "c") and ("a", "bc") differ).
BlockHash PrefixRootHash(std::string_view format_identity, std::string_view cache_salt);
// h_{i+1} = SHA-256(parent || tokens as little-endian int32).
BlockHash HashBlock(const BlockHash& parent, absl::Span<const int32_t> tokens);
// Appends the hashes of the full blocks of `tokens` past those already in `hashes` (which must be
// the chain of a prefix of `tokens`, starting at `root`).
void ExtendBlockHashes(const BlockHash& root, absl::Span<const int32_t> tokens, int32_t block_size,
                       std::vector<BlockHash>* hashes);

// Counters since construction (ModelInfo's prefix-cache fields).
struct PrefixCacheStats {
  int64_t queries = 0;        // admissions that looked the index up
  int64_t query_tokens = 0;   // tokens those lookups could have hit (full blocks before the last token)
  int64_t hit_tokens = 0;     // tokens found cached
  int64_t evictions = 0;      // indexed blocks handed out for new contents
  int64_t resets = 0;         // whole-index drops (Clear)
  // Host KV tier (host_kv_pool.h; the scheduler counts these):
  int64_t host_hit_tokens = 0;  // tokens found in the host tier past the device hit (loaded)
  int64_t host_offloads = 0;    // blocks copied device -> host (evicted from the device)
  int64_t host_loads = 0;       // blocks copied host -> device (host hits)
};

class PrefixCache {
 public:
  explicit PrefixCache(int32_t num_blocks) : hash_of_(num_blocks) {}

  // The block holding `h`, or -1.
  int32_t Find(const BlockHash& h) const;
  // Indexes `block` under `h`. False (nothing changed) when `h` is indexed already (another block
  // computed the same prefix: the first stays) or `block` is indexed under another hash.
  bool Insert(const BlockHash& h, int32_t block);
  // `block` gets new contents: drop its entry (counted as an eviction). No-op when not indexed.
  void Evict(int32_t block);
  bool IsCached(int32_t block) const { return hash_of_[block].indexed; }
  // The hash `block` is indexed under; only for an indexed block (IsCached).
  const BlockHash& HashOf(int32_t block) const { return hash_of_[block].hash; }
  // Drops every entry (a worker restart or failure: cached contents can no longer be trusted).
  void Clear();

  int64_t num_cached_blocks() const { return static_cast<int64_t>(index_.size()); }
  PrefixCacheStats& stats() { return stats_; }
  const PrefixCacheStats& stats() const { return stats_; }

 private:
  struct Entry {
    bool indexed = false;
    BlockHash hash;
  };
  absl::flat_hash_map<BlockHash, int32_t> index_;
  std::vector<Entry> hash_of_;  // by block id
  PrefixCacheStats stats_;
};

}  // namespace lorc
