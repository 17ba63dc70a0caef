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
// W L = U S V^T, A = V_r^T L^-1, B = U_r S_r. With an output metric too (m: lower Cholesky
// factor [d, d] of M, the weight of the output error: tr(E C E^T M) is minimised):
// M_L^T W L = U S V^T, A = V_r^T L^-1, B = M_L^-T U_r S_r. InvalidArgument for a rank out of
// range.
absl::StatusOr<HeadFactors> FactorizeHead(const MatD& w, int64_t rank, const MatD* l,
                                          const MatD* m = nullptr);

// The SVD of one head's (metric-weighted) weight, computed once and truncated at any rank.
struct HeadSvd {
  Svd svd;                 // of M_L^T W L (or W L, or W)
  const MatD* l = nullptr; // input whitening factor (not owned)
  const MatD* m = nullptr; // output metric factor (not owned)
};
absl::StatusOr<HeadSvd> ComputeHeadSvd(const MatD& w, const MatD* l, const MatD* m);
absl::StatusOr<HeadFactors> TruncateHead(const HeadSvd& h, int64_t rank);

// Output metric of a key head for the attention scores after RoPE (README.md "Key metric"):
// M = sum_{j in group} E_delta[R(delta) C_q,j R(delta)^T] with C_q,j = W_Q,j C W_Q,j^T ([d, d]),
// R(delta) the RoPE rotation (rotate-half pairs (i, i + d/2), angles delta * inv_freq[i]) and
// delta weighted by the number of (query, key) pairs at that distance in a causal window of
// `window` tokens. wq_group: the group's query rows stacked, [n_group * d, D].
inline constexpr int64_t kRopeMetricWindow = 2048;  // tokens
MatD RopeQueryMetric(const MatD& wq_group, const MatD& c, const std::vector<float>& inv_freq,
                     int64_t window);
// Output metric of a value head through the output projection: sum_{j in group} W_O,j^T W_O,j
// ([d, d]); wo: o_proj [D, n_q * d], query heads [j0, j0 + n_group).
MatD OProjMetric(const MatD& wo, int64_t j0, int64_t n_group, int64_t head_dim);

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
// (1 for the first layer), rank_l = round8(r_min + score_l (r_max - r_min)). r_max =
// min(head_dim, kProgressiveMaxRankFactor * R * head_dim) and r_min is bisected for the largest
// ratio <= R; when r_min = 8 is still over R, r_min = 8 and r_max is bisected. InvalidArgument
// when R < 8 / head_dim (no schedule fits).
//
// The cap on r_max is ours, not LoRC's: with r_max = head_dim the deepest layers fall to rank 8
// at R = 0.5 (ranks 120..8 on the fixture), and the fixture's perplexity rose to 27.8 from 10.20
// (2026-12-01, whitened, 48 windows: the last layer's keys at rank 8). Bounding the shallowest
// layer at 1.5x the uniform rank keeps the progressive shape (0.5: ranks 96..32).
inline constexpr double kProgressiveMaxRankFactor = 1.5;
absl::StatusOr<std::vector<LayerRanks>> ProgressiveRanks(const std::vector<double>& kappa_k,
                                                         const std::vector<double>& kappa_v,
                                                         int64_t head_dim, double kv_ratio);

}  // namespace lorc::compress
