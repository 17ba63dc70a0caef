#include "kvstore/host_kv_pool.h"

#include <algorithm>
#include <string>

#include "absl/strings/str_cat.h"

namespace lorc {
namespace {

std::string Hex(const BlockHash& h) { return absl::StrCat(absl::Hex(h.hi, absl::kZeroPad16), absl::Hex(h.lo, absl::kZeroPad16)); }

}  // namespace

HostKvPool::HostKvPool(int32_t num_slots) : num_slots_(std::max(0, num_slots)) { Clear(); }

void HostKvPool::Clear() {
  entries_.clear();
  lru_.clear();
  free_.clear();
  for (int32_t s = num_slots_ - 1; s >= 0; --s) free_.push_back(s);
  num_pinned_ = 0;
}

absl::StatusOr<HostKvPool::Insertion> HostKvPool::Insert(const BlockHash& hash) {
  Insertion out;
  if (auto it = entries_.find(hash); it != entries_.end()) {
    Entry& e = it->second;
    if (e.pins == 0) lru_.splice(lru_.end(), lru_, e.lru);
    out.slot = e.slot;
    return out;
  }
  if (!free_.empty()) {
    out.slot = free_.back();
    free_.pop_back();
  } else if (!lru_.empty()) {
    const BlockHash victim = lru_.front();
    lru_.pop_front();
    auto vit = entries_.find(victim);
    out.slot = vit->second.slot;
    out.evicted = victim;
    entries_.erase(vit);
    ++num_evictions_;
  } else {
    return absl::ResourceExhaustedError(absl::StrCat(
        "host KV pool: no slot for block ", Hex(hash), ": ", num_slots_, " slots, ", num_pinned_,
        " pinned (--kv-offloading-size sizes the pool)"));
  }
  out.copy = true;
  Entry e;
  e.slot = out.slot;
  e.lru = lru_.insert(lru_.end(), hash);
  entries_.emplace(hash, e);
  return out;
}

int32_t HostKvPool::Lookup(const BlockHash& hash) {
  auto it = entries_.find(hash);
  if (it == entries_.end()) return -1;
  if (it->second.pins == 0) lru_.splice(lru_.end(), lru_, it->second.lru);
  return it->second.slot;
}

int32_t HostKvPool::Peek(const BlockHash& hash) const {
  auto it = entries_.find(hash);
  return it == entries_.end() ? -1 : it->second.slot;
}

absl::Status HostKvPool::Pin(const BlockHash& hash) {
  auto it = entries_.find(hash);
  if (it == entries_.end()) {
    return absl::NotFoundError(absl::StrCat("host KV pool: Pin: block ", Hex(hash), " is not here"));
  }
  Entry& e = it->second;
  if (e.pins++ == 0) {
    lru_.erase(e.lru);
    ++num_pinned_;
  }
  return absl::OkStatus();
}

absl::Status HostKvPool::Unpin(const BlockHash& hash) {
  auto it = entries_.find(hash);
  if (it == entries_.end()) {
    return absl::NotFoundError(absl::StrCat("host KV pool: Unpin: block ", Hex(hash), " is not here"));
  }
  Entry& e = it->second;
  if (e.pins == 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("host KV pool: Unpin: block ", Hex(hash), " is not pinned"));
  }
  if (--e.pins == 0) {
    e.lru = lru_.insert(lru_.end(), hash);  // most recently used: it was just loaded
    --num_pinned_;
  }
  return absl::OkStatus();
}

absl::Status HostKvPool::Erase(const BlockHash& hash) {
  auto it = entries_.find(hash);
  if (it == entries_.end()) {
    return absl::NotFoundError(absl::StrCat("host KV pool: Erase: block ", Hex(hash), " is not here"));
  }
  if (it->second.pins > 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("host KV pool: Erase: block ", Hex(hash), " is pinned"));
  }
  lru_.erase(it->second.lru);
  free_.push_back(it->second.slot);
  entries_.erase(it);
  return absl::OkStatus();
}

std::vector<BlockHash> HostKvPool::LruOrder() const { return {lru_.begin(), lru_.end()}; }

}  // namespace lorc
