// ParallelFor: a loop over [0, n) split across the host cores, for host work whose result does
// not depend on the split (each item written by exactly one thread).
#pragma once

#include <algorithm>
#include <cstdint>
#include <thread>
#include <vector>

namespace lorc {

// Runs fn(begin, end) over [0, n) in contiguous chunks, one thread per chunk, when n *
// work_per_item is large (at least 2^20 per thread); otherwise fn(0, n) on the calling thread.
// Returns after every chunk is done.
template <typename Fn>
void ParallelFor(int64_t n, int64_t work_per_item, Fn fn) {
  const int64_t threads = std::min<int64_t>(
      std::max<unsigned>(1, std::thread::hardware_concurrency()), (n * work_per_item) >> 20);
  if (threads <= 1) {
    fn(int64_t{0}, n);
    return;
  }
  std::vector<std::thread> pool;
  for (int64_t t = 0; t < threads; ++t) pool.emplace_back(fn, n * t / threads, n * (t + 1) / threads);
  for (std::thread& th : pool) th.join();
}

}  // namespace lorc
