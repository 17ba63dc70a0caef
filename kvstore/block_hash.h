// A full KV block's identity in the prefix index (issue #10): a 128-bit hash of the parent
// block's hash, the block's tokens, the request's cache_salt and the model / KV-format identity.
// Shared by the prefix index and the host tier (host_kv_pool.h), so one definition lives here.
#pragma once

#include <cstdint>
#include <utility>

namespace lorc {

struct BlockHash {
  uint64_t hi = 0, lo = 0;
  friend bool operator==(const BlockHash& a, const BlockHash& b) {
    return a.hi == b.hi && a.lo == b.lo;
  }
  friend bool operator!=(const BlockHash& a, const BlockHash& b) { return !(a == b); }
  template <typename H>
  friend H AbslHashValue(H h, const BlockHash& b) {
    return H::combine(std::move(h), b.hi, b.lo);
  }
};

}  // namespace lorc
