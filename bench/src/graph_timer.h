// Timing helper shared by the CUDA kernel benchmarks (cuda_kernels_bench, gemm_bench,
// attention_bench): many calls of one op captured into one CUDA graph, so launch overhead is
// hidden, and the graph's replays timed on the host around a stream synchronization.
#pragma once

#include <algorithm>
#include <chrono>
#include <functional>

#include "backend/backend.h"
#include "common/check.h"

namespace lorc {

enum class ReplayStat { kBest, kMean };

// Microseconds per call of `op(0) .. op(reps - 1)` captured into one graph: the graph is replayed
// once untimed, then `replays` times, each timed alone (kBest: the fastest) or all together
// (kMean: their mean). Warm-up calls (lazy initialization, algorithm choice) are the caller's,
// before this. Aborts on a backend error (a tool, not a test).
inline double GraphMicrosPerCall(Backend& be, int reps, int replays, ReplayStat stat,
                                 const std::function<void(int)>& op) {
  using Clock = std::chrono::steady_clock;
  CHECK_OK(be.BeginCapture());
  for (int i = 0; i < reps; ++i) op(i);
  auto graph = be.EndCapture();
  CHECK(graph.ok()) << graph.status();
  CHECK_OK(be.ReplayGraph(**graph));
  CHECK_OK(be.Synchronize());
  auto micros = [](Clock::time_point t0) {
    return std::chrono::duration<double, std::micro>(Clock::now() - t0).count();
  };
  if (stat == ReplayStat::kMean) {
    const Clock::time_point t0 = Clock::now();
    for (int r = 0; r < replays; ++r) CHECK_OK(be.ReplayGraph(**graph));
    CHECK_OK(be.Synchronize());
    return micros(t0) / (static_cast<double>(replays) * reps);
  }
  double best = 1e300;
  for (int r = 0; r < replays; ++r) {
    const Clock::time_point t0 = Clock::now();
    CHECK_OK(be.ReplayGraph(**graph));
    CHECK_OK(be.Synchronize());
    best = std::min(best, micros(t0));
  }
  return best / reps;
}

}  // namespace lorc
