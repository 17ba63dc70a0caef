#include "kernels/sampling.cuh"

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_segmented_radix_sort.cuh>
#include <cuda/functional>

#include <math_constants.h>

#include <climits>
#include <cmath>

namespace lorc::kernels {
namespace {

constexpr int kThreads = 512;       // mark / process / logprobs blocks
constexpr int kWalkThreads = 1024;  // one block per sampled row
constexpr int64_t kChunk = 8192;    // ids per process block
// counts[] bits: flags above the output-token count.
constexpr int32_t kAllowedBit = 1 << 30, kStopBit = 1 << 29, kBiasBit = 1 << 28,
                  kRepBit = 1 << 27, kCountMask = (1 << 27) - 1;

__host__ __device__ __forceinline__ int64_t Min64(int64_t a, int64_t b) { return a < b ? a : b; }
__device__ __forceinline__ double NegInf() { return -CUDART_INF; }
__device__ __forceinline__ double Clean(float v) { return isnan(v) ? NegInf() : static_cast<double>(v); }

// Steps 1-2 of one id.
__device__ __forceinline__ double Pre(const SampleRowMeta& m, double v, int32_t c) {
  if ((m.flags & kSampleAllowed) && !(c & kAllowedBit)) v = NegInf();
  if ((m.flags & kSampleStop) && (c & kStopBit)) v = NegInf();
  return v;
}
// Steps 4-5 of one id, then NaN -> -inf and -0 -> +0 (alike for every later step). The
// explicit _rn operations keep nvcc from fusing what the CPU rounds twice.
__device__ __forceinline__ double Post(const SampleRowMeta& m, double v, int32_t c) {
  if ((m.flags & kSampleRepetition) && (c & kRepBit)) {
    const double rp = m.repetition_penalty;
    v = v > 0 ? v / rp : __dmul_rn(v, rp);
  }
  if (m.flags & kSampleFreqPres) {
    const int32_t n = c & kCountMask;
    if (n > 0) {
      v = __dsub_rn(v, __dadd_rn(__dmul_rn(static_cast<double>(m.frequency_penalty), n),
                                 static_cast<double>(m.presence_penalty)));
    }
  }
  if (isnan(v)) v = NegInf();
  if (v == 0) v = 0.0;
  return v;
}

__device__ __forceinline__ bool InVocab(int32_t id, int64_t vocab) { return id >= 0 && id < vocab; }

// Mark (set) or unmark (zero) the counts of one row's listed ids.
__global__ void MarkKernel(const SampleArgs a, bool set) {
  const SampleRowMeta m = a.rows[blockIdx.x];
  if (m.count_slot < 0) return;
  int32_t* c = a.counts + static_cast<int64_t>(m.count_slot) * a.vocab;
  auto each = [&](int64_t off, int64_t n, int32_t bit) {
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
      const int32_t id = a.ints[off + j];
      if (!InVocab(id, a.vocab)) continue;
      if (!set) {
        c[id] = 0;
      } else if (bit == 0) {
        atomicAdd(&c[id], 1);
      } else {
        atomicOr(&c[id], bit);
      }
    }
  };
  if (m.flags & kSampleAllowed) each(m.allowed_off, m.num_allowed, kAllowedBit);
  if (m.flags & kSampleStop) each(m.stop_off, m.num_stop, kStopBit);
  if (m.flags & kSampleBias) each(m.bias_off, m.num_bias, kBiasBit);
  if (m.flags & kSampleRepetition) each(m.penalty_off, m.num_penalty, kRepBit);
  if (m.flags & kSampleFreqPres) each(m.output_off, m.num_output, 0);
}

// grid (chunks, rows): steps 0-5 for every id without a bias.
__global__ void ProcessKernel(const SampleArgs a) {
  const SampleRowMeta m = a.rows[blockIdx.y];
  if (m.x_slot < 0) return;
  const float* l = a.logits + static_cast<int64_t>(m.logits_row) * a.logits_ld;
  double* x = a.x + static_cast<int64_t>(m.x_slot) * a.vocab;
  const int32_t* c = m.count_slot >= 0 ? a.counts + static_cast<int64_t>(m.count_slot) * a.vocab : nullptr;
  const int64_t end = Min64(a.vocab, (blockIdx.x + 1) * kChunk);
  for (int64_t i = blockIdx.x * kChunk + threadIdx.x; i < end; i += blockDim.x) {
    const int32_t ci = c ? c[i] : 0;
    if (ci & kBiasBit) continue;
    x[i] = Post(m, Pre(m, Clean(l[i]), ci), ci);
  }
}

// Step 3 and the rest for each distinct bias id: entries grouped by id, in list order.
__global__ void BiasKernel(const SampleArgs a) {
  const SampleRowMeta m = a.rows[blockIdx.x];
  if (!(m.flags & kSampleBias)) return;
  const float* l = a.logits + static_cast<int64_t>(m.logits_row) * a.logits_ld;
  double* x = a.x + static_cast<int64_t>(m.x_slot) * a.vocab;
  const int32_t* c = a.counts + static_cast<int64_t>(m.count_slot) * a.vocab;
  const int32_t* ids = a.ints + m.bias_off;
  const float* vals = a.floats + m.bias_off;
  for (int64_t j = threadIdx.x; j < m.num_bias; j += blockDim.x) {
    const int32_t id = ids[j];
    if (!InVocab(id, a.vocab) || (j > 0 && ids[j - 1] == id)) continue;
    const int32_t ci = c[id];
    double v = Pre(m, Clean(l[id]), ci);
    for (int64_t k = j; k < m.num_bias && ids[k] == id; ++k) v += static_cast<double>(vals[k]);
    x[id] = Post(m, v, ci);
  }
}

struct Best {
  double v;
  int32_t i;
};
struct BestOp {  // higher value, then lower id
  __device__ __forceinline__ Best operator()(const Best& a, const Best& b) const {
    return (a.v > b.v || (a.v == b.v && a.i < b.i)) ? a : b;
  }
};

// Step 5, split over the row (kGreedyIds ids a CTA, grid (rows, parts)): for greedy rows the
// first index of the maximum (NaN never wins; 0 when nothing is above -inf), for every row
// non_finite[row] = whether its raw logits hold a NaN or an infinity (a scan of the raw row, with
// the argmax's own scan where that reads the raw logits). Each CTA reduces its range, stores
// (best, bad) in greedy_parts and counts itself in greedy_counters[row]; the row's last CTA
// (threadFenceReduction, as the decode attention's split-KV merge) reduces the parts and zeroes
// the counter. BestOp is a total order on (value, id), so the result does not depend on which
// CTA finishes last: the bits of one block scanning the whole row. (One 512-thread block a row
// took ~100 us at vocab 128,256 on an H100, 2026-12-06: one load latency per 512 ids.)
struct GreedyPart {
  double v;
  int32_t i;
  int32_t bad;
};

__global__ void __launch_bounds__(kGreedyThreads) GreedyKernel(const SampleArgs a) {
  const int row = blockIdx.x, part = blockIdx.y, parts = gridDim.y;  // rows in x: up to 2^31 - 1
  const SampleRowMeta m = a.rows[row];
  const bool greedy = (m.flags & kSampleGreedy) != 0;
  const float* l = a.logits + static_cast<int64_t>(m.logits_row) * a.logits_ld;
  const int64_t begin = static_cast<int64_t>(part) * kGreedyIds;
  Best b{NegInf(), INT_MAX};
  bool bad = false;
  // Every load of the range first (kGreedyIds / kGreedyThreads a thread, coalesced), then the scan.
  constexpr int kPer = kGreedyIds / kGreedyThreads;
  float f[kPer];
#pragma unroll
  for (int k = 0; k < kPer; ++k) {
    const int64_t i = begin + k * kGreedyThreads + threadIdx.x;
    f[k] = i < a.vocab ? l[i] : 0.f;
  }
  if (greedy && m.x_slot >= 0) {
    const double* x = a.x + static_cast<int64_t>(m.x_slot) * a.vocab;
    double xv[kPer];
#pragma unroll
    for (int k = 0; k < kPer; ++k) {
      const int64_t i = begin + k * kGreedyThreads + threadIdx.x;
      xv[k] = i < a.vocab ? x[i] : NegInf();
    }
#pragma unroll
    for (int k = 0; k < kPer; ++k) {
      const int64_t i = begin + k * kGreedyThreads + threadIdx.x;
      if (i >= a.vocab) continue;
      bad |= !isfinite(f[k]);
      if (xv[k] > b.v) b = {xv[k], static_cast<int32_t>(i)};
    }
  } else {
#pragma unroll
    for (int k = 0; k < kPer; ++k) {
      const int64_t i = begin + k * kGreedyThreads + threadIdx.x;
      if (i >= a.vocab) continue;
      bad |= !isfinite(f[k]);
      const double v = Clean(f[k]);
      if (greedy && v > b.v) b = {v, static_cast<int32_t>(i)};
    }
  }
  using Reduce = cub::BlockReduce<Best, kGreedyThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  __shared__ int s_last;
  const int any_bad = __syncthreads_or(bad);
  if (greedy) b = Reduce(tmp).Reduce(b, BestOp());  // thread 0's
  GreedyPart* const ps = static_cast<GreedyPart*>(a.greedy_parts) + static_cast<int64_t>(row) * parts;
  if (threadIdx.x == 0) {
    ps[part] = GreedyPart{b.v, b.i, any_bad};
    __threadfence();
    const bool last = atomicAdd(a.greedy_counters + row, 1) == parts - 1;
    if (last) a.greedy_counters[row] = 0;  // no other CTA of this launch touches it: zero for the next
    s_last = last;
  }
  __syncthreads();
  if (!s_last) return;  // uniform over the block
  __threadfence();      // the other parts' stores, seen through their fences and the count
  Best r{NegInf(), INT_MAX};
  bool row_bad = false;
  for (int p = threadIdx.x; p < parts; p += kGreedyThreads) {
    const double v = __ldcg(&ps[p].v);
    const int32_t i = __ldcg(&ps[p].i);
    row_bad |= __ldcg(&ps[p].bad) != 0;
    r = BestOp()(r, Best{v, i});
  }
  const int row_any_bad = __syncthreads_or(row_bad);  // also orders tmp's reuse after the first reduce
  if (threadIdx.x == 0) a.non_finite[row] = row_any_bad != 0;
  if (!greedy) return;
  r = Reduce(tmp).Reduce(r, BestOp());
  if (threadIdx.x == 0) a.tokens[row] = r.i == INT_MAX ? 0 : r.i;
}

struct Walk {
  const double* keys;
  double m, t, s;  // top candidate, temperature, sum of weights
  __device__ __forceinline__ double Z(int64_t i) const { return SampleZ(keys[i], m, t); }
  __device__ __forceinline__ double P(int64_t i) const { return exp(Z(i)) / s; }
};

using WalkScan = cub::BlockScan<double, kWalkThreads>;
using WalkSum = cub::BlockReduce<double, kWalkThreads>;
using WalkMin = cub::BlockReduce<int64_t, kWalkThreads>;
union WalkTemp {
  typename WalkScan::TempStorage scan;
  typename WalkSum::TempStorage sum;
  typename WalkMin::TempStorage min;
};

// First i in [0, n) whose running sum of p reaches thresh (cum > thresh when strict, >= else),
// or -1; *total: the sum over [0, n) when none does. Chunks of the block's width, in order.
__device__ int64_t FirstCrossing(const Walk& w, int64_t n, double thresh, bool strict, double* total,
                                 WalkTemp& tmp) {
  __shared__ int64_t hit_s;
  double carry = 0;
  for (int64_t base = 0; base < n; base += kWalkThreads) {
    const int64_t i = base + threadIdx.x;
    const double p = i < n ? w.P(i) : 0.0;
    double inc, agg;
    __syncthreads();
    WalkScan(tmp.scan).InclusiveSum(p, inc, agg);
    const double cum = carry + inc;
    const bool hit = i < n && (strict ? cum > thresh : cum >= thresh);
    __syncthreads();
    const int64_t first = WalkMin(tmp.min).Reduce(hit ? i : INT64_MAX, cuda::minimum<>{});
    if (threadIdx.x == 0) hit_s = first;
    __syncthreads();
    if (hit_s != INT64_MAX) return hit_s;
    carry += agg;
  }
  *total = carry;
  return -1;
}

// Steps 7-10 for sampled row s (x slot s) over its sorted (x, id) pairs. A prefix row
// (sampling_select.cu) holds only its first kSampleSelectMaxK pairs and the whole row's sum and
// candidate count: the same walk over the prefix, the same token when the cuts (top-p, min-p)
// and the draw fall inside it, else kSampleRedo (the host samples the row again, sorted whole).
__global__ void __launch_bounds__(kWalkThreads) WalkKernel(const SampleArgs a) {
  const int32_t row = a.sorted_rows[blockIdx.x];
  const SampleRowMeta m = a.rows[row];
  const double* keys = a.sorted_x + static_cast<int64_t>(blockIdx.x) * a.vocab;
  const int32_t* ids = a.sorted_ids + static_cast<int64_t>(blockIdx.x) * a.vocab;
  __shared__ WalkTemp tmp;
  __shared__ double s_sum;
  __shared__ int64_t s_cand, s_minp;
  const double top = keys[0];
  if (!(top > NegInf())) {  // no candidate: ArgMax of all -inf
    if (threadIdx.x == 0) a.tokens[row] = 0;
    return;
  }
  const int32_t first_selected = a.num_sorted - a.num_selected;
  const bool prefix = static_cast<int32_t>(blockIdx.x) >= first_selected && SampleSelectPrefix(m.top_k, a.vocab);
  const int64_t kk = m.top_k > 0 ? Min64(m.top_k, a.vocab) : a.vocab;
  const int64_t len = prefix ? kSampleSelectMaxK : kk;  // pairs held (prefix rows: vocab > len)
  Walk w{keys, top, static_cast<double>(m.temperature), 1.0};
  const bool use_min_p = m.min_p > 0.0f;
  const double log_floor = use_min_p ? log(static_cast<double>(m.min_p)) : 0.0;
  double sum = 0;
  int64_t cand = 0, minp = 0;
  for (int64_t i = threadIdx.x; i < len; i += kWalkThreads) {
    const double z = w.Z(i);  // -inf past the candidates: weight 0
    if (!prefix) sum += exp(z);
    cand += keys[i] > NegInf();
    minp += use_min_p && i >= 1 && z >= log_floor;
  }
  sum = WalkSum(tmp.sum).Sum(sum);
  __syncthreads();
  cand = cub::BlockReduce<int64_t, kWalkThreads>(tmp.min).Sum(cand);
  __syncthreads();
  minp = cub::BlockReduce<int64_t, kWalkThreads>(tmp.min).Sum(minp);
  if (threadIdx.x == 0) {
    s_sum = prefix ? a.select_sum[blockIdx.x - first_selected] : sum;
    s_cand = prefix ? a.select_cand[blockIdx.x - first_selected] : cand;
    s_minp = minp;
  }
  __syncthreads();
  w.s = s_sum;
  const int64_t k = s_cand;
  const int64_t held = Min64(len, k);  // candidates the walk can read
  // A prefix row's cuts may lie past its prefix: top-p when its crossing is not inside it, min-p
  // when every pair of it passes (z falls along the sorted pairs, so a pair that fails ends the
  // count: otherwise the count is the whole row's). Either open cut that decides the keep means
  // the row is sampled again, sorted whole.
  const bool minp_open = prefix && s_minp == held - 1 && held < k;
  int64_t keep = k;
  bool p_open = false;
  double unused;
  if (m.top_p < 1.0f) {
    const int64_t i = FirstCrossing(w, held, static_cast<double>(m.top_p), false, &unused, tmp);
    if (i >= 0) {
      keep = i + 1;
    } else {
      p_open = held < k;  // the crossing lies past the prefix
    }
  }
  bool redo = false;
  if (use_min_p && !minp_open) {
    keep = Min64(keep, Min64(1 + s_minp, k));  // an open top-p: the min-p cut, inside the prefix
  } else if (minp_open) {
    redo = keep > held;  // min-p keeps at least the prefix: known only when top-p cut inside it
  }
  // keep is k or a cut inside the prefix (a top-p crossing at i < held, 1 + s_minp <= held), so
  // keep > held means keep == k: redone when an open top-p decides it, else drawn below.
  redo = redo || (p_open && keep > held);
  if (redo) {
    if (threadIdx.x == 0) a.tokens[row] = kSampleRedo;
    return;
  }
  double mass = 1.0;  // a prefix row keeping every candidate: the p sum to 1 (rounding aside)
  if (keep <= held) FirstCrossing(w, keep, CUDART_INF, true, &mass, tmp);
  const double r = SampleCounterUniform(m.seed, m.offset) * mass;
  const int64_t i = FirstCrossing(w, Min64(keep, held), r, true, &unused, tmp);
  if (threadIdx.x == 0) a.tokens[row] = i >= 0 ? ids[i] : keep > held ? kSampleRedo : ids[keep - 1];
}

// Raw log-probabilities of one row (its token already chosen).
__global__ void LogprobsKernel(const SampleArgs a) {
  const SampleRowMeta m = a.rows[blockIdx.x];
  if (!(m.flags & kSampleLogprobs)) return;
  const float* l = a.logits + static_cast<int64_t>(m.logits_row) * a.logits_ld;
  using Reduce = cub::BlockReduce<double, kThreads>;
  using ReduceI = cub::BlockReduce<int32_t, kThreads>;
  using ReduceB = cub::BlockReduce<Best, kThreads>;
  __shared__ union {
    typename Reduce::TempStorage d;
    typename ReduceI::TempStorage i;
    typename ReduceB::TempStorage b;
  } tmp;
  __shared__ double s_val;
  __shared__ Best s_best;
  double mx = NegInf();
  for (int64_t i = threadIdx.x; i < a.vocab; i += blockDim.x) mx = fmax(mx, Clean(l[i]));
  mx = Reduce(tmp.d).Reduce(mx, cuda::maximum<>{});
  if (threadIdx.x == 0) s_val = mx;
  __syncthreads();
  mx = s_val;
  double sum = 0;
  if (isfinite(mx)) {
    for (int64_t i = threadIdx.x; i < a.vocab; i += blockDim.x) sum += exp(Clean(l[i]) - mx);
  }
  sum = Reduce(tmp.d).Sum(sum);
  __syncthreads();
  if (threadIdx.x == 0) s_val = isfinite(mx) ? mx + log(sum) : mx;
  __syncthreads();
  const double lse = s_val;
  auto lp = [&](int32_t id) -> float {
    const double v = Clean(l[id]);
    if (!isfinite(lse)) return v == lse ? 0.0f : -CUDART_INF_F;
    return static_cast<float>(v - lse);
  };
  const int32_t token = a.tokens[blockIdx.x];
  if (token == kSampleRedo) return;  // sampled again by the host, logprobs with it
  const double lt = Clean(l[token]);
  int32_t higher = 0;
  for (int64_t i = threadIdx.x; i < a.vocab; i += blockDim.x) higher += Clean(l[i]) > lt;
  higher = ReduceI(tmp.i).Sum(higher);
  const int64_t out = static_cast<int64_t>(blockIdx.x) * a.top_stride;
  if (threadIdx.x == 0) {
    a.logprob[blockIdx.x] = lp(token);
    a.rank[blockIdx.x] = 1 + higher;
  }
  // Top-N: N block argmaxes, each over the ids ordered after the previous pick.
  const int64_t n = Min64(m.logprobs, a.vocab);
  Best prev{CUDART_INF, -1};
  bool first = true;
  for (int64_t k = 0; k < n; ++k) {
    Best b{NegInf(), INT_MAX};
    for (int64_t i = threadIdx.x; i < a.vocab; i += blockDim.x) {
      const double v = Clean(l[i]);
      const int32_t id = static_cast<int32_t>(i);
      const bool after = first || v < prev.v || (v == prev.v && id > prev.i);
      if (after && (b.i == INT_MAX || v > b.v)) b = {v, id};
    }
    __syncthreads();
    const Best r = ReduceB(tmp.b).Reduce(b, BestOp());
    if (threadIdx.x == 0) {
      s_best = r;
      a.top_ids[out + k] = r.i;
      a.top_logprobs[out + k] = lp(r.i);
    }
    __syncthreads();
    prev = s_best;
    first = false;
  }
}

__global__ void IotaKernel(int32_t* ids, int64_t total, int64_t vocab) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    ids[i] = static_cast<int32_t>(i % vocab);
  }
}

}  // namespace

size_t SampleSortTempBytes(int32_t num_sorted, int64_t vocab) {
  if (num_sorted <= 0) return 0;
  size_t bytes = 0;
  if (num_sorted <= kSampleDeviceSortRows) {  // one device-wide sort a row
    if (cub::DeviceRadixSort::SortPairsDescending(nullptr, bytes, static_cast<const double*>(nullptr),
                                                  static_cast<double*>(nullptr), static_cast<const int32_t*>(nullptr),
                                                  static_cast<int32_t*>(nullptr), static_cast<int>(vocab)) !=
        cudaSuccess) {
      return 0;
    }
    return bytes;
  }
  const int total = static_cast<int>(num_sorted * vocab);
  if (cub::DeviceSegmentedRadixSort::SortPairsDescending(
          nullptr, bytes, static_cast<const double*>(nullptr), static_cast<double*>(nullptr),
          static_cast<const int32_t*>(nullptr), static_cast<int32_t*>(nullptr), total, num_sorted,
          static_cast<const int32_t*>(nullptr), static_cast<const int32_t*>(nullptr)) != cudaSuccess) {
    return 0;
  }
  return bytes;
}

cudaError_t LaunchSampleIota(int32_t* ids, int32_t num_sorted, int64_t vocab, cudaStream_t stream) {
  const int64_t total = static_cast<int64_t>(num_sorted) * vocab;
  if (total <= 0) return cudaSuccess;
  const unsigned blocks = static_cast<unsigned>(Min64((total + 255) / 256, 4096));
  IotaKernel<<<blocks, 256, 0, stream>>>(ids, total, vocab);
  return cudaGetLastError();
}

cudaError_t LaunchSample(const SampleArgs& a, cudaStream_t stream) {
  if (a.num_rows < 0 || a.vocab <= 0 || a.vocab >= INT32_MAX || SampleGreedyParts(a.vocab) > kSampleMaxGreedyParts
      || static_cast<int64_t>(a.num_sorted) * a.vocab >= INT32_MAX || a.num_selected < 0 ||
      a.num_selected > a.num_sorted) {
    return cudaErrorInvalidValue;
  }
  if (a.num_rows == 0) return cudaSuccess;
  if (a.greedy_parts == nullptr || a.greedy_counters == nullptr) return cudaErrorInvalidValue;
  const unsigned rows = static_cast<unsigned>(a.num_rows);
  if (a.any_counts) MarkKernel<<<rows, kThreads, 0, stream>>>(a, true);
  if (a.any_x) {
    ProcessKernel<<<dim3(static_cast<unsigned>((a.vocab + kChunk - 1) / kChunk), rows), kThreads, 0,
                    stream>>>(a);
    if (a.any_counts) {
      BiasKernel<<<rows, 128, 0, stream>>>(a);
      MarkKernel<<<rows, kThreads, 0, stream>>>(a, false);
    }
  }
  GreedyKernel<<<dim3(rows, static_cast<unsigned>(SampleGreedyParts(a.vocab))), kGreedyThreads, 0, stream>>>(a);
  if (a.num_sorted > 0) {
    size_t bytes = a.sort_temp_bytes;
    const int32_t num_full_sort = a.num_sorted - a.num_selected;  // sorted whole, the first slots
    if (num_full_sort == 0) {
      // nothing sorted whole
    } else if (num_full_sort <= kSampleDeviceSortRows) {
      // A few rows: one device-wide radix sort each (the segmented sort gives a segment one CTA,
      // ~1.9 ms for 128,256 ids on an H100, 2026-12-06). Both are stable over the same key bits:
      // the same order.
      for (int32_t r = 0; r < num_full_sort; ++r) {
        const int64_t off = static_cast<int64_t>(r) * a.vocab;
        const cudaError_t e = cub::DeviceRadixSort::SortPairsDescending(
            a.sort_temp, bytes, static_cast<const double*>(a.x) + off, a.sorted_x + off, a.iota + off,
            a.sorted_ids + off, static_cast<int>(a.vocab), 0, 64, stream);
        if (e != cudaSuccess) return e;
      }
    } else {
      const cudaError_t e = cub::DeviceSegmentedRadixSort::SortPairsDescending(
          a.sort_temp, bytes, static_cast<const double*>(a.x), a.sorted_x, a.iota, a.sorted_ids,
          static_cast<int>(num_full_sort * a.vocab), num_full_sort, a.sort_offsets, a.sort_offsets + 1,
          0, 64, stream);
      if (e != cudaSuccess) return e;
    }
    if (const cudaError_t e = LaunchSampleSelect(a, stream); e != cudaSuccess) return e;
    WalkKernel<<<static_cast<unsigned>(a.num_sorted), kWalkThreads, 0, stream>>>(a);
  }
  if (a.any_logprobs) LogprobsKernel<<<rows, kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace lorc::kernels
