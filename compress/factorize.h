// The LoRC factorization of one KV head and the rank schedules (FORMAT.md, README.md).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "compress/linalg.h"

namespace lorc::compress {

// W [d, D] ~= B [d, r] A [r, D].
struct HeadFactors {
  MatD a;                  // [r, D] down-projection (the latent is A x)
  MatD b;                  // [d, r] up-projection
  std::vector<double> s;   // all min(d, D) singular values, descending (of W, or of W L whitened)
};

// Truncated SVD at rank r in [1, min(d, D)]. Plain (l == nullptr): W = U S V^T, A = V_r^T,
// B = U_r S_r. Whitened (l: the Cholesky factor of the input second moment, [D, D] lower):
// W L = U S V^T, A = V_r^T L^-1, B = U_r S_r. InvalidArgument for a rank out of range.
absl::StatusOr<HeadFactors> FactorizeHead(const MatD& w, int64_t rank, const MatD* l);

// Cholesky factor of c + eps I with eps = rel_eps * trace(c) / D (relative to the mean diagonal).
inline constexpr double kWhitenRelEps = 1e-6;
absl::StatusOr<MatD> WhiteningFactor(const MatD& c, double rel_eps = kWhitenRelEps);

struct LayerRanks {
  int64_t k_rank = 0, v_rank = 0;
};

// sum(r_k + r_v) / (num_layers * 2 * head_dim).
double KvBytesRatio(const std::vector<LayerRanks>& ranks, int64_t head_dim);

// Ranks are multiples of this (kernel tiles), at least it, at most head_dim.
inline constexpr int64_t kRankMultiple = 8;

// Uniform: r = R * head_dim rounded to the nearest multiple of 8, clamped to [8, head_dim].
std::vector<LayerRanks> UniformRanks(int64_t num_layers, int64_t head_dim, double kv_ratio);

// Progressive (LoRC): kappa_K,l, kappa_V,l are the condition numbers (s_max / s_min) of layer l's
// stacked K / V weights. Per kind, score_l = sum_{j >= l} log kappa_j normalised to [0, 1]
// (1 for the first layer), rank_l = round8(r_min + score_l (r_max - r_min)). r_max = head_dim and
// r_min is bisected for the largest ratio <= R; when r_min = 8 is still over R, r_min = 8 and
// r_max is bisected. InvalidArgument when R < 8 / head_dim (no schedule fits).
absl::StatusOr<std::vector<LayerRanks>> ProgressiveRanks(const std::vector<double>& kappa_k,
                                                         const std::vector<double>& kappa_v,
                                                         int64_t head_dim, double kv_ratio);

}  // namespace lorc::compress
