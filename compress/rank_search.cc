#include "compress/rank_search.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/status_macros.h"

namespace lorc::compress {

namespace {

std::string Describe(const std::vector<LayerRanks>& r) {
  std::string s;
  for (const LayerRanks& x : r) absl::StrAppend(&s, s.empty() ? "" : " ", x.k_rank, ":", x.v_rank);
  return s;
}

}  // namespace

absl::StatusOr<RankSearchResult> SearchRanks(const RankSearchInput& in, const MeasurePplFn& measure,
                                             const std::function<void(const std::string&)>& progress) {
  const int64_t L = static_cast<int64_t>(in.k_err.size()), hd = in.head_dim;
  if (L == 0 || static_cast<int64_t>(in.v_err.size()) != L || hd < kRankMultiple ||
      hd % kRankMultiple != 0 || !(in.base_ppl > 0) || !(in.max_increase_pct >= 0)) {
    return absl::InvalidArgumentError("rank search: inconsistent input");
  }
  for (int64_t l = 0; l < L; ++l) {
    if (static_cast<int64_t>(in.k_err[l].size()) != hd + 1 ||
        static_cast<int64_t>(in.v_err[l].size()) != hd + 1) {
      return absl::InvalidArgumentError(absl::StrCat("rank search: layer ", l, ": error tables need ",
                                                     hd + 1, " entries"));
    }
  }
  const double limit = in.base_ppl * (1.0 + in.max_increase_pct / 100.0);
  RankSearchResult res;
  const auto say = [&](const std::string& s) { if (progress) progress(s); };
  const auto run = [&](const std::vector<LayerRanks>& r) -> absl::StatusOr<double> {
    ASSIGN_OR_RETURN(const double p, measure(r));
    ++res.trials;
    return p;
  };
  // Units: 2l = K of layer l, 2l + 1 = V.
  const auto err = [&](int64_t u, int64_t r) {
    return (u % 2 == 0 ? in.k_err : in.v_err)[static_cast<size_t>(u / 2)][static_cast<size_t>(r)];
  };
  const auto rank_of = [](std::vector<LayerRanks>& r, int64_t u) -> int64_t& {
    return u % 2 == 0 ? r[static_cast<size_t>(u / 2)].k_rank : r[static_cast<size_t>(u / 2)].v_rank;
  };
  const std::vector<LayerRanks> full(static_cast<size_t>(L), LayerRanks{hd, hd});

  // 1. Sensitivities.
  const int64_t probe = std::max<int64_t>(kRankMultiple, hd / 2 / kRankMultiple * kRankMultiple);
  std::vector<double> sigma(static_cast<size_t>(2 * L));
  for (int64_t u = 0; u < 2 * L; ++u) {
    std::vector<LayerRanks> r = full;
    rank_of(r, u) = probe;
    ASSIGN_OR_RETURN(const double p, run(r));
    const double e = std::max(err(u, probe), 1e-12);
    sigma[static_cast<size_t>(u)] = std::log(p / in.base_ppl) / e;
    say(absl::StrFormat("search: sensitivity layer %d %s at rank %d: calibration ppl %.4f (%+.2f%%)",
                        u / 2 + 1, u % 2 == 0 ? "K" : "V", probe, p,
                        100.0 * (p / in.base_ppl - 1.0)));
  }

  // A unit whose probe measured no increase (or a decrease: noise of a short calibration text)
  // gets a twentieth of the median positive sensitivity, not zero: it goes early on the path,
  // but not all the way down for free.
  std::vector<double> positive;
  for (double x : sigma) if (x > 0) positive.push_back(x);
  std::sort(positive.begin(), positive.end());
  const double floor = positive.empty() ? 1e-9 : 0.05 * positive[positive.size() / 2];
  for (double& x : sigma) x = std::max(x, floor);

  // 2. The greedy path.
  std::vector<std::vector<LayerRanks>> path = {full};
  std::vector<double> predicted = {0.0};
  std::vector<LayerRanks> cur = full;
  double pred = 0;
  for (;;) {
    int64_t best = -1;
    double best_cost = 0;
    for (int64_t u = 0; u < 2 * L; ++u) {
      const int64_t r = rank_of(cur, u);
      if (r - kRankMultiple < kRankMultiple) continue;
      const double cost = sigma[static_cast<size_t>(u)] * (err(u, r - kRankMultiple) - err(u, r));
      if (best < 0 || cost < best_cost) { best = u; best_cost = cost; }
    }
    if (best < 0) break;
    rank_of(cur, best) -= kRankMultiple;
    pred += best_cost;
    path.push_back(cur);
    predicted.push_back(pred);
  }

  // 3. Bisection on the measured perplexity: lo fits (index 0 is full rank: fits by definition),
  // hi does not (or is one past the end).
  size_t lo = 0, hi = path.size();
  double lo_ppl = in.base_ppl;
  // Start near the prediction: the first point predicted over the limit.
  const double target = std::log(limit / in.base_ppl);
  size_t guess = static_cast<size_t>(
      std::lower_bound(predicted.begin(), predicted.end(), target) - predicted.begin());
  while (hi - lo > 1) {
    size_t mid = (guess > lo && guess < hi) ? guess : lo + (hi - lo) / 2;
    guess = 0;
    ASSIGN_OR_RETURN(const double p, run(path[mid]));
    const bool fits = p <= limit;
    say(absl::StrFormat("search: step %d/%d, kv ratio %.4f: calibration ppl %.4f (%+.2f%%) %s",
                        mid, path.size() - 1, KvBytesRatio(path[mid], hd), p,
                        100.0 * (p / in.base_ppl - 1.0), fits ? "fits" : "over"));
    if (fits) {
      lo = mid;
      lo_ppl = p;
    } else {
      hi = mid;
    }
  }
  res.ranks = path[lo];
  res.ppl = lo_ppl;
  if (lo == 0) {
    ASSIGN_OR_RETURN(res.ppl, run(path[0]));
  }
  say(absl::StrCat("search: ranks (k:v per layer) ", Describe(res.ranks)));
  return res;
}

}  // namespace lorc::compress
