// `lorcserve compress --max-ppl-increase P`: per-layer K/V ranks with the fewest KV bytes whose
// calibration perplexity rises by at most P percent (README.md "Rank search").
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "compress/factorize.h"

namespace lorc::compress {

struct RankSearchInput {
  int64_t head_dim = 0;
  // Per layer, the relative truncation error energy of its K (V) factorization at every rank:
  // err[l][r] = sum_{i >= r} s_i^2 / sum_i s_i^2 over the layer's heads, r in [0, head_dim]
  // (err[l][head_dim] = 0), s the singular values of the (whitened) weights.
  std::vector<std::vector<double>> k_err, v_err;
  double base_ppl = 0;          // the uncompressed model's calibration perplexity
  double max_increase_pct = 0;  // P
};

struct RankSearchResult {
  std::vector<LayerRanks> ranks;
  double ppl = 0;      // calibration perplexity at `ranks` (measured)
  int64_t trials = 0;  // perplexity measurements
};

// Calibration perplexity of the model compressed at `ranks` (every rank a multiple of 8).
using MeasurePplFn = std::function<absl::StatusOr<double>(const std::vector<LayerRanks>&)>;

// 1. Sensitivity: for each (layer, K|V) alone at rank head_dim / 2 (the others full), the measured
//    log-perplexity increase per unit of error energy, sigma = dlog(ppl) / err(head_dim / 2),
//    floored at a twentieth of the median positive sigma (a probe can measure a decrease).
// 2. Path: from full rank, repeatedly lower by 8 the (layer, K|V) whose predicted increase
//    sigma * (err(r - 8) - err(r)) is smallest (every step saves the same bytes), down to rank 8
//    everywhere.
// 3. Bisection along the path on the measured perplexity for the furthest point within
//    base_ppl * (1 + P / 100). Full rank (the path's start) is returned when nothing fits.
// Progress: one line per measurement. InvalidArgument for inconsistent input.
absl::StatusOr<RankSearchResult> SearchRanks(const RankSearchInput& in, const MeasurePplFn& measure,
                                             const std::function<void(const std::string&)>& progress);

}  // namespace lorc::compress
