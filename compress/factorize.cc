#include "compress/factorize.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace lorc::compress {

absl::StatusOr<HeadSvd> ComputeHeadSvd(const MatD& w, const MatD* l, const MatD* m) {
  MatD target = l != nullptr ? MatMul(w, *l) : w;
  if (m != nullptr) target = MatMul(Transpose(*m), target);
  HeadSvd h;
  ASSIGN_OR_RETURN(h.svd, ComputeSvd(target));
  h.l = l;
  h.m = m;
  return h;
}

absl::StatusOr<HeadFactors> TruncateHead(const HeadSvd& h, int64_t rank) {
  const Svd& svd = h.svd;
  const int64_t rows = svd.u.rows, cols = svd.vt.cols;
  const int64_t kmax = static_cast<int64_t>(svd.s.size());
  if (rank < 1 || rank > kmax) {
    return absl::InvalidArgumentError(absl::StrCat("rank ", rank, " is outside [1, ", kmax, "]"));
  }
  HeadFactors f;
  f.s = svd.s;
  MatD vt_r(rank, cols);
  for (int64_t i = 0; i < rank; ++i) {
    std::copy_n(&svd.vt.v[static_cast<size_t>(i * cols)], cols, &vt_r.v[static_cast<size_t>(i * cols)]);
  }
  if (h.l != nullptr) {
    ASSIGN_OR_RETURN(f.a, RightSolveLower(vt_r, *h.l));
  } else {
    f.a = std::move(vt_r);
  }
  // B^T = (U_r S_r)^T M_L^-1, i.e. B = M_L^-T U_r S_r.
  MatD bt(rank, rows);
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < rank; ++j) bt.at(j, i) = svd.u.at(i, j) * svd.s[j];
  }
  if (h.m != nullptr) {
    ASSIGN_OR_RETURN(bt, RightSolveLower(bt, *h.m));
  }
  f.b = Transpose(bt);
  return f;
}

absl::StatusOr<HeadFactors> FactorizeHead(const MatD& w, int64_t rank, const MatD* l, const MatD* m) {
  const int64_t kmax = std::min(w.rows, w.cols);
  if (rank < 1 || rank > kmax) {
    return absl::InvalidArgumentError(absl::StrCat("rank ", rank, " is outside [1, ", kmax, "]"));
  }
  ASSIGN_OR_RETURN(const HeadSvd h, ComputeHeadSvd(w, l, m));
  return TruncateHead(h, rank);
}

MatD RopeQueryMetric(const MatD& wq_group, const MatD& c, const std::vector<float>& inv_freq,
                     int64_t window) {
  const int64_t d = static_cast<int64_t>(inv_freq.size()) * 2, h = d / 2;
  // C_q = sum_j W_Q,j C W_Q,j^T.
  MatD cq(d, d);
  const MatD wc = MatMul(wq_group, c);  // [n_group d, D]
  for (int64_t j0 = 0; j0 < wq_group.rows; j0 += d) {
    cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(d), static_cast<int>(d),
                static_cast<int>(c.rows), 1.0, &wc.v[static_cast<size_t>(j0 * c.rows)],
                static_cast<int>(c.rows), &wq_group.v[static_cast<size_t>(j0 * c.rows)],
                static_cast<int>(c.rows), 1.0, cq.v.data(), static_cast<int>(d));
  }
  // Weighted averages over delta of cos_i cos_j, cos_i sin_j, sin_i cos_j, sin_i sin_j.
  std::vector<double> cc(static_cast<size_t>(h * h)), cs(cc.size()), sc(cc.size()), ss(cc.size());
  std::vector<double> co(static_cast<size_t>(h)), si(static_cast<size_t>(h));
  double wsum = 0;
  for (int64_t delta = 0; delta < window; ++delta) {
    const double wt = static_cast<double>(window - delta);
    wsum += wt;
    for (int64_t i = 0; i < h; ++i) {
      const double a = static_cast<double>(delta) * static_cast<double>(inv_freq[i]);
      co[i] = std::cos(a);
      si[i] = std::sin(a);
    }
    for (int64_t i = 0; i < h; ++i) {
      const double wci = wt * co[i], wsi = wt * si[i];
      double* pcc = &cc[i * h]; double* pcs = &cs[i * h]; double* psc = &sc[i * h]; double* pss = &ss[i * h];
      for (int64_t j = 0; j < h; ++j) {
        pcc[j] += wci * co[j]; pcs[j] += wci * si[j]; psc[j] += wsi * co[j]; pss[j] += wsi * si[j];
      }
    }
  }
  // Block (i, j) of R C R^T with R_i = [[c_i, -s_i], [s_i, c_i]] on dims (i, i + h).
  MatD m(d, d);
  for (int64_t i = 0; i < h; ++i) {
    for (int64_t j = 0; j < h; ++j) {
      const size_t k = static_cast<size_t>(i * h + j);
      const double CC = cc[k] / wsum, CS = cs[k] / wsum, SC = sc[k] / wsum, SS = ss[k] / wsum;
      const double a = cq.at(i, j), b = cq.at(i, j + h), e = cq.at(i + h, j), f = cq.at(i + h, j + h);
      m.at(i, j) = a * CC - e * SC - b * CS + f * SS;
      m.at(i, j + h) = a * CS - e * SS + b * CC - f * SC;
      m.at(i + h, j) = a * SC + e * CC - b * SS - f * CS;
      m.at(i + h, j + h) = a * SS + e * CS + b * SC + f * CC;
    }
  }
  return m;
}

MatD OProjMetric(const MatD& wo, int64_t j0, int64_t n_group, int64_t head_dim) {
  MatD m(head_dim, head_dim);
  for (int64_t j = j0; j < j0 + n_group; ++j) {
    cblas_dgemm(CblasRowMajor, CblasTrans, CblasNoTrans, static_cast<int>(head_dim),
                static_cast<int>(head_dim), static_cast<int>(wo.rows), 1.0,
                &wo.v[static_cast<size_t>(j * head_dim)], static_cast<int>(wo.cols),
                &wo.v[static_cast<size_t>(j * head_dim)], static_cast<int>(wo.cols), 1.0,
                m.v.data(), static_cast<int>(head_dim));
  }
  return m;
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
  const double cap = std::clamp(kProgressiveMaxRankFactor * kv_ratio * hd, r8, hd);
  if (fits(r8, cap)) {
    const double r_min = bisect([&](double x) { return fits(x, cap); }, r8, cap);
    return make(r_min, cap);
  }
  const double r_max = bisect([&](double x) { return fits(r8, x); }, r8, cap);
  return make(r8, r_max);
}

}  // namespace lorc::compress
