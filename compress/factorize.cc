#include "compress/factorize.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace lorc::compress {

absl::StatusOr<HeadFactors> FactorizeHead(const MatD& w, int64_t rank, const MatD* l) {
  const int64_t kmax = std::min(w.rows, w.cols);
  if (rank < 1 || rank > kmax) {
    return absl::InvalidArgumentError(absl::StrCat("rank ", rank, " is outside [1, ", kmax, "]"));
  }
  MatD target = l != nullptr ? MatMul(w, *l) : w;
  ASSIGN_OR_RETURN(Svd svd, ComputeSvd(target));
  HeadFactors f;
  f.s = svd.s;
  MatD vt_r(rank, w.cols);
  for (int64_t i = 0; i < rank; ++i) {
    std::copy_n(&svd.vt.v[static_cast<size_t>(i * w.cols)], w.cols,
                &vt_r.v[static_cast<size_t>(i * w.cols)]);
  }
  if (l != nullptr) {
    ASSIGN_OR_RETURN(f.a, RightSolveLower(vt_r, *l));
  } else {
    f.a = std::move(vt_r);
  }
  f.b = MatD(w.rows, rank);
  for (int64_t i = 0; i < w.rows; ++i) {
    for (int64_t j = 0; j < rank; ++j) f.b.at(i, j) = svd.u.at(i, j) * svd.s[j];
  }
  return f;
}

absl::StatusOr<MatD> WhiteningFactor(const MatD& c, double rel_eps) {
  double trace = 0;
  for (int64_t i = 0; i < c.rows; ++i) trace += c.at(i, i);
  MatD reg = c;
  const double eps = rel_eps * std::max(trace, 1e-300) / static_cast<double>(c.rows);
  for (int64_t i = 0; i < c.rows; ++i) reg.at(i, i) += eps;
  return CholeskyLower(reg);
}

double KvBytesRatio(const std::vector<LayerRanks>& ranks, int64_t head_dim) {
  if (ranks.empty()) return 0;
  double sum = 0;
  for (const LayerRanks& r : ranks) sum += static_cast<double>(r.k_rank + r.v_rank);
  return sum / (static_cast<double>(ranks.size()) * 2.0 * static_cast<double>(head_dim));
}

namespace {

int64_t Round8(double r, int64_t head_dim) {
  const int64_t q = static_cast<int64_t>(std::llround(r / kRankMultiple)) * kRankMultiple;
  return std::clamp<int64_t>(q, kRankMultiple, head_dim);
}

// Cumulative log condition numbers from each layer to the last, normalised to [0, 1].
std::vector<double> Scores(const std::vector<double>& kappa) {
  const size_t n = kappa.size();
  std::vector<double> cum(n, 0.0);
  double acc = 0;
  for (size_t i = n; i-- > 0;) {
    acc += std::log(std::max(kappa[i], 1.0));
    cum[i] = acc;
  }
  const double lo = cum.empty() ? 0 : cum.back(), hi = cum.empty() ? 0 : cum.front();
  for (double& c : cum) c = hi > lo ? (c - lo) / (hi - lo) : 1.0;
  return cum;
}

}  // namespace

std::vector<LayerRanks> UniformRanks(int64_t num_layers, int64_t head_dim, double kv_ratio) {
  const int64_t r = Round8(kv_ratio * static_cast<double>(head_dim), head_dim);
  return std::vector<LayerRanks>(static_cast<size_t>(num_layers), LayerRanks{r, r});
}

absl::StatusOr<std::vector<LayerRanks>> ProgressiveRanks(const std::vector<double>& kappa_k,
                                                         const std::vector<double>& kappa_v,
                                                         int64_t head_dim, double kv_ratio) {
  const double floor_ratio = static_cast<double>(kRankMultiple) / static_cast<double>(head_dim);
  if (kv_ratio + 1e-12 < floor_ratio) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--kv-ratio: ", kv_ratio, " is below the smallest schedule (rank ", kRankMultiple,
        " of head_dim ", head_dim, ": ", floor_ratio, ")"));
  }
  const std::vector<double> sk = Scores(kappa_k), sv = Scores(kappa_v);
  const auto make = [&](double r_min, double r_max) {
    std::vector<LayerRanks> out(sk.size());
    for (size_t l = 0; l < sk.size(); ++l) {
      out[l].k_rank = Round8(r_min + sk[l] * (r_max - r_min), head_dim);
      out[l].v_rank = Round8(r_min + sv[l] * (r_max - r_min), head_dim);
    }
    return out;
  };
  const auto fits = [&](double r_min, double r_max) {
    return KvBytesRatio(make(r_min, r_max), head_dim) <= kv_ratio + 1e-12;
  };
  const double hd = static_cast<double>(head_dim), r8 = static_cast<double>(kRankMultiple);
  if (fits(hd, hd)) return make(hd, hd);
  // The ratio is non-decreasing in r_min and in r_max: bisect for the largest value that fits.
  const auto bisect = [&](auto&& ok, double lo, double hi) {  // ok(lo) holds, ok(hi) does not
    for (int i = 0; i < 60; ++i) {
      const double mid = 0.5 * (lo + hi);
      (ok(mid) ? lo : hi) = mid;
    }
    return lo;
  };
  if (fits(r8, hd)) {
    const double r_min = bisect([&](double x) { return fits(x, hd); }, r8, hd);
    return make(r_min, hd);
  }
  const double r_max = bisect([&](double x) { return fits(r8, x); }, r8, hd);
  return make(r8, r_max);
}

}  // namespace lorc::compress
