#include "kvstore/block_pool.h"

#include "common/check.h"
#include "absl/strings/str_cat.h"

namespace lorc {

BlockPool::BlockPool(int32_t num_blocks)
    : ref_(num_blocks, 0), prev_(num_blocks, -1), next_(num_blocks, -1) {
  CHECK_GE(num_blocks, 0);
  for (int32_t b = 0; b < num_blocks; ++b) PushBack(b);
}

void BlockPool::PushBack(int32_t block) {
  prev_[block] = tail_;
  next_[block] = -1;
  if (tail_ >= 0) {
    next_[tail_] = block;
  } else {
    head_ = block;
  }
  tail_ = block;
  ++num_free_;
}

void BlockPool::Unlink(int32_t block) {
  const int32_t p = prev_[block], n = next_[block];
  if (p >= 0) {
    next_[p] = n;
  } else {
    head_ = n;
  }
  if (n >= 0) {
    prev_[n] = p;
  } else {
    tail_ = p;
  }
  prev_[block] = next_[block] = -1;
  --num_free_;
}

absl::StatusOr<std::vector<int32_t>> BlockPool::Allocate(int32_t n) {
  CHECK_GE(n, 0);
  if (n > num_free()) {
    return absl::ResourceExhaustedError(
        absl::StrCat("KV cache full: need ", n, " blocks, ", num_free(), " of ", num_blocks(),
                     " free"));
  }
  std::vector<int32_t> out;
  out.reserve(n);
  for (int32_t i = 0; i < n; ++i) {
    const int32_t b = head_;
    Unlink(b);
    ref_[b] = 1;
    out.push_back(b);
  }
  return out;
}

void BlockPool::IncRef(int32_t block) {
  CHECK(block >= 0 && block < num_blocks()) << "block " << block;
  CHECK_GT(ref_[block], 0) << "IncRef on free block " << block;
  ++ref_[block];
}

void BlockPool::Acquire(int32_t block) {
  CHECK(block >= 0 && block < num_blocks()) << "block " << block;
  if (ref_[block] == 0) Unlink(block);
  ++ref_[block];
}

void BlockPool::Release(int32_t block) {
  CHECK(block >= 0 && block < num_blocks()) << "block " << block;
  CHECK_GT(ref_[block], 0) << "Release on free block " << block;
  if (--ref_[block] == 0) PushBack(block);
}

int32_t BlockPool::RefCount(int32_t block) const {
  CHECK(block >= 0 && block < num_blocks()) << "block " << block;
  return ref_[block];
}

}  // namespace lorc
