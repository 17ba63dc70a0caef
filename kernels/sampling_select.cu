// Step 6 of LaunchSample for the selected sampled rows (the last num_selected sampled x slots,
// kernels/sampling.cuh kSampleSelectMaxK): instead of sorting the whole row, select its first
// SampleSelectCount (x, id) pairs in the sort's order (x descending, ties by ascending id) and
// sort only those. A top-k row's walk reads no candidate past top_k (sampling.cu WalkKernel), so
// its inputs, and the token, are those of the full sort. A prefix row (no top-k cut) gets its
// first kSampleSelectMaxK pairs and, in one more pass, the row's sum of exp(z) and count of
// finite candidates, which the walk needs from the whole row; the walk draws from the prefix
// when every cut and the draw fall inside it, else the host samples the row again, sorted whole.
//
// One 1024-thread CTA a row (SelectKernel<false>), or, when the selected rows are too few to fill
// the SMs (SampleSelectParts), a split: SelectChunkKernel's CTAs each keep the first
// min(k, chunk) pairs of a chunk of the row (every pair of the row's first k is among its chunk's
// first k) and a prefix row's partial sums (its chunk's maximum m_c, the sum of exp(z) from m_c,
// its count), then SelectKernel<true> selects the first k among those candidates and rescales the
// sums to the row's top (sum_c S_c exp((m_c - top) / t): the same value but for rounding).
// The order is that of a composite key K = (u, ~id), u the
// order-preserving 64-bit image of x (what a radix sort of doubles sorts by; x holds no NaN and
// no -0, sampling.cu step 2), ~id the 32-bit complement of the id: all keys distinct, larger K
// first. A most-significant-digit radix select over K's 12 bytes (a 256-bin histogram a pass of
// the ids whose higher digits match the prefix found so far) finds the prefix of the k-th
// largest key, stopping as soon as the bin it falls in is taken whole; the ids at or above that
// prefix (exactly k of them) are gathered into shared memory and bitonic-sorted there. A tie
// that spans the k-th key (equal x) is resolved on the id bytes: up to 12 passes then.
// Source: radix select (a most-significant-digit radix sort that keeps only the bucket holding
// the k-th key), as in Alabi, Blanchard, Gordon and Steinbach, "Fast k-selection algorithms for
// graphics processing units" (ACM J. Experimental Algorithmics 17, 2012); checked against the
// full sort by tests/backend/cuda_sampling_test.cc TokenParitySelected (token-exact with the CPU
// reference).
#include "kernels/sampling.cuh"

#include <math_constants.h>

#include <cub/block/block_reduce.cuh>
#include <cuda/functional>

#include <climits>
#include <cstdint>

namespace lorc::kernels {
namespace {

constexpr int kSelectThreads = kSampleSelectMaxK;  // one slot a thread in the final sort
constexpr int kSelectUnroll = 8;                   // loads in flight a thread
static_assert((kSelectThreads & (kSelectThreads - 1)) == 0, "the bitonic sort needs a power of two");

__device__ __forceinline__ uint64_t OrderKey(double v) {
  const uint64_t b = static_cast<uint64_t>(__double_as_longlong(v));
  return (b >> 63) ? ~b : (b | 0x8000000000000000ull);
}
__device__ __forceinline__ double FromOrderKey(uint64_t u) {
  return __longlong_as_double(static_cast<long long>((u >> 63) ? (u & 0x7fffffffffffffffull) : ~u));
}
__device__ __forceinline__ uint32_t IdKey(int64_t id) { return ~static_cast<uint32_t>(id); }
// Digit p (0 = most significant) of K: bytes 0-7 of u, then bytes 0-3 of the id key.
__device__ __forceinline__ uint32_t Digit(uint64_t u, uint32_t ik, int p) {
  return p < 8 ? static_cast<uint32_t>(u >> (56 - 8 * p)) & 255u : (ik >> (24 - 8 * (p - 8))) & 255u;
}
// Masks of K's first p digits.
__device__ __forceinline__ uint64_t MaskU(int p) { return p >= 8 ? ~0ull : p == 0 ? 0ull : ~0ull << (64 - 8 * p); }
__device__ __forceinline__ uint32_t MaskI(int p) { return p <= 8 ? 0u : p >= 12 ? ~0u : ~0u << (32 - 8 * (p - 8)); }

struct SelectShared {
  uint32_t hist[256];
  uint64_t key[kSelectThreads];
  int32_t id[kSelectThreads];
  uint64_t pu;  // the prefix found so far (its digits in place, zeros below)
  uint32_t pi;
  int64_t need;  // keys still to take at or below the prefix
  int taken;     // gathered so far
  int done;
};

// Keys of ids [base, base + n) of an x row.
struct RowSource {
  const double* x;  // the row
  int64_t base, n;
  __device__ __forceinline__ int64_t Count() const { return n; }
  __device__ __forceinline__ void Load(int64_t i, uint64_t* u, int32_t* id) const {
    *u = OrderKey(x[base + i]);
    *id = static_cast<int32_t>(base + i);
  }
};
// The candidates a row's chunks kept (SelectChunkKernel): chunk c's kept[c] pairs at c * k.
struct CandSource {
  const uint64_t* u;
  const int32_t* id;
  int64_t k, chunk, vocab;  // pairs a chunk keeps at most, ids a chunk, the row's ids
  int parts;
  __device__ __forceinline__ int64_t Count() const { return k * parts; }
  __device__ __forceinline__ bool Valid(int64_t i) const {
    const int64_t c = i / k, len = vocab - c * chunk;
    return i % k < (len < chunk ? len : chunk);
  }
  __device__ __forceinline__ void Load(int64_t i, uint64_t* uu, int32_t* ii) const {
    *uu = u[i];
    *ii = id[i];
  }
};
__device__ __forceinline__ bool ValidAt(const RowSource&, int64_t) { return true; }
__device__ __forceinline__ bool ValidAt(const CandSource& s, int64_t i) { return s.Valid(i); }

// Calls f(in_row, u, id key, id) kSelectUnroll times an iteration in every thread (the same
// count in every lane: warp intrinsics in f see the whole warp), in_row false past the source's
// end (and for a chunk's unused candidate slots); kSelectUnroll loads in flight a thread.
template <typename Src, typename F>
__device__ __forceinline__ void ForEachKey(const Src& src, F f) {
  const int64_t step = static_cast<int64_t>(kSelectThreads) * kSelectUnroll, n = src.Count();
  for (int64_t base = 0; base < n; base += step) {
    uint64_t u[kSelectUnroll];
    int32_t id[kSelectUnroll];
    bool in[kSelectUnroll];
#pragma unroll
    for (int j = 0; j < kSelectUnroll; ++j) {
      const int64_t i = base + j * kSelectThreads + threadIdx.x;
      in[j] = i < n && ValidAt(src, i);
      u[j] = 0;
      id[j] = 0;
      if (in[j]) src.Load(i, &u[j], &id[j]);
    }
#pragma unroll
    for (int j = 0; j < kSelectUnroll; ++j) f(in[j], u[j], IdKey(id[j]), id[j]);
  }
}

// Whether pair a comes before pair b in the sort's order.
__device__ __forceinline__ bool Before(uint64_t ua, int32_t ia, uint64_t ub, int32_t ib) {
  return ua > ub || (ua == ub && ia < ib);
}

// The source's k largest keys (1 <= k <= kSelectThreads, k <= its keys) into sh.key / sh.id
// [0, k), in no order; every thread of the CTA calls it.
template <typename Src>
__device__ void SelectTop(const Src& src, int64_t k, SelectShared& sh) {
  const int tid = threadIdx.x, lane = tid % 32;
  if (tid == 0) {
    sh.pu = 0;
    sh.pi = 0;
    sh.need = k;
    sh.taken = 0;
    sh.done = 0;
  }
  int p = 0;
  for (; p < 12; ++p) {
    for (int b = tid; b < 256; b += kSelectThreads) sh.hist[b] = 0;
    __syncthreads();
    const uint64_t mu = MaskU(p), pu = sh.pu;
    const uint32_t mi = MaskI(p), pi = sh.pi;
    const int64_t need = sh.need;  // read here: warp 0 rewrites it below (after the next barrier)
    ForEachKey(src, [&](bool in_row, uint64_t u, uint32_t ik, int32_t) {
      const bool counted = in_row && (u & mu) == pu && (ik & mi) == pi;
      const uint32_t d = counted ? Digit(u, ik, p) : 256u;
      const unsigned same = __match_any_sync(0xffffffffu, d);  // warp-aggregated: one atomic a bin
      if (counted && lane == __ffs(same) - 1) atomicAdd(&sh.hist[d], static_cast<uint32_t>(__popc(same)));
    });
    __syncthreads();
    if (tid < 32) {  // the bin holding the need-th largest key: lane l scans bins 255 - 8l ... 248 - 8l
      int64_t mine = 0;
#pragma unroll
      for (int j = 0; j < 8; ++j) mine += sh.hist[255 - (8 * lane + j)];
      int64_t above = mine;  // inclusive scan over lanes, then exclusive
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const int64_t t = __shfl_up_sync(0xffffffffu, above, o);
        if (lane >= o) above += t;
      }
      above -= mine;
      if (above < need && need <= above + mine) {
        for (int j = 0; j < 8; ++j) {
          const int bin = 255 - (8 * lane + j);
          const int64_t c = sh.hist[bin];
          if (above + c >= need) {
            sh.need = need - above;
            if (p < 8) {
              sh.pu = pu | (static_cast<uint64_t>(bin) << (56 - 8 * p));
            } else {
              sh.pi = pi | (static_cast<uint32_t>(bin) << (24 - 8 * (p - 8)));
            }
            sh.done = c == need - above;  // the bin is taken whole
            break;
          }
          above += c;
        }
      }
    }
    __syncthreads();
    if (sh.done) break;  // uniform: read after the barrier
  }
  // The top k keys: those whose first p + 1 digits are at or above the prefix (the loop always
  // ends done: at the last digit a bin holds one key).
  const int digits = p + 1;
  const uint64_t mu = MaskU(digits), pu = sh.pu;
  const uint32_t mi = MaskI(digits), pi = sh.pi;
  ForEachKey(src, [&](bool in_row, uint64_t u, uint32_t ik, int32_t i) {
    const uint64_t hu = u & mu;
    if (in_row && (hu > pu || (hu == pu && (ik & mi) >= pi))) {
      const int at = atomicAdd(&sh.taken, 1);
      if (at < kSelectThreads) {
        sh.key[at] = u;
        sh.id[at] = i;
      }
    }
  });
  __syncthreads();
}

// The weight of key v against the top key m (sampling.cuh SampleZ).
__device__ __forceinline__ double Weight(double v, double m, double t) { return exp(SampleZ(v, m, t)); }

// Where a row's chunk candidates and partial sums live: candidates in the tail of the row's
// sorted_x / sorted_ids span (parts * k <= vocab - k pairs: the sorted output, the first k
// pairs, does not reach them), partial sums in select_parts.
__device__ __forceinline__ int64_t CandOffset(int64_t slot, int64_t vocab, int64_t k, int parts) {
  return slot * vocab + vocab - k * parts;
}

// Phase 1 of a split selection: chunk blockIdx.x of selected row blockIdx.y keeps its
// min(k, chunk) largest pairs (unsorted) and, for a prefix row, its maximum, sum of weights from
// that maximum and count of finite candidates.
__global__ void __launch_bounds__(kSelectThreads) SelectChunkKernel(const SampleArgs a, int parts) {
  const int32_t j = static_cast<int32_t>(blockIdx.y);
  const int32_t slot = a.num_sorted - a.num_selected + j;
  const SampleRowMeta m = a.rows[a.sorted_rows[slot]];
  const int64_t k = SampleSelectCount(m.top_k, a.vocab);
  const int64_t chunk = (a.vocab + parts - 1) / parts, base = blockIdx.x * chunk;
  const int64_t n = a.vocab - base < chunk ? a.vocab - base : chunk;
  const double* x = a.x + static_cast<int64_t>(slot) * a.vocab;
  __shared__ SelectShared sh;
  const int64_t kc = n < k ? n : k;
  SelectTop(RowSource{x, base, n}, kc, sh);
  const int64_t at = CandOffset(slot, a.vocab, k, parts) + blockIdx.x * k;
  uint64_t* cu = reinterpret_cast<uint64_t*>(a.sorted_x) + at;
  int32_t* ci = a.sorted_ids + at;
  for (int64_t i = threadIdx.x; i < kc; i += kSelectThreads) {
    cu[i] = sh.key[i];
    ci[i] = sh.id[i];
  }
  if (SampleSelectTopK(m.top_k, a.vocab)) return;
  // The chunk's maximum: the largest of the keys kept (their order bits back to the double).
  using MaxR = cub::BlockReduce<unsigned long long, kSelectThreads>;
  __shared__ typename MaxR::TempStorage max_tmp;
  __shared__ double s_max;
  const unsigned long long top_u = MaxR(max_tmp).Reduce(threadIdx.x < kc ? sh.key[threadIdx.x] : 0ull,
                                                         cuda::maximum<>{});
  if (threadIdx.x == 0) s_max = FromOrderKey(top_u);
  __syncthreads();
  const double mx = s_max;
  using SumR = cub::BlockReduce<double, kSelectThreads>;
  __shared__ typename SumR::TempStorage tmp;
  const double t = static_cast<double>(m.temperature);
  double sum = 0;
  int32_t cand = 0;
  if (mx > -CUDART_INF) {
    for (int64_t i = threadIdx.x; i < n; i += kSelectThreads) {
      const double v = x[base + i];
      sum += Weight(v, mx, t);
      cand += v > -CUDART_INF;
    }
  }
  sum = SumR(tmp).Sum(sum);
  __shared__ typename cub::BlockReduce<int32_t, kSelectThreads>::TempStorage cand_tmp;
  cand = cub::BlockReduce<int32_t, kSelectThreads>(cand_tmp).Sum(cand);
  if (threadIdx.x == 0) {
    SampleSelectPart& part = a.select_parts[static_cast<int64_t>(j) * kSampleSelectMaxParts + blockIdx.x];
    part.max = mx;
    part.sum = sum;
    part.cand = cand;
  }
}

// The selection's end: the row's first k pairs (from the whole row when parts is 1, else from
// its chunks' candidates) sorted into sorted_x / sorted_ids [0, k), and a prefix row's sums.
template <bool kSplit>
__global__ void __launch_bounds__(kSelectThreads) SelectKernel(const SampleArgs a, int parts) {
  const int32_t j = static_cast<int32_t>(blockIdx.x);
  const int32_t slot = a.num_sorted - a.num_selected + j;
  const SampleRowMeta m = a.rows[a.sorted_rows[slot]];
  const int64_t k = SampleSelectCount(m.top_k, a.vocab);  // 2..kSampleSelectMaxK, below vocab
  const double* x = a.x + static_cast<int64_t>(slot) * a.vocab;
  __shared__ SelectShared sh;
  const int tid = threadIdx.x;
  if constexpr (kSplit) {
    const int64_t at = CandOffset(slot, a.vocab, k, parts);
    const CandSource src{reinterpret_cast<const uint64_t*>(a.sorted_x) + at, a.sorted_ids + at, k,
                         (a.vocab + parts - 1) / parts, a.vocab, parts};
    SelectTop(src, k, sh);
  } else {
    SelectTop(RowSource{x, 0, a.vocab}, k, sh);
  }
  if (tid >= k) {  // padding after every real key
    sh.key[tid] = 0;
    sh.id[tid] = INT_MAX;
  }
  __syncthreads();
  for (int size = 2; size <= kSelectThreads; size <<= 1) {  // bitonic sort, Before order
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      const int other = tid ^ stride;
      if (other > tid) {
        const uint64_t ua = sh.key[tid], ub = sh.key[other];
        const int32_t ia = sh.id[tid], ib = sh.id[other];
        const bool forward = (tid & size) == 0;
        if (forward ? Before(ub, ib, ua, ia) : Before(ua, ia, ub, ib)) {
          sh.key[tid] = ub;
          sh.key[other] = ua;
          sh.id[tid] = ib;
          sh.id[other] = ia;
        }
      }
      __syncthreads();
    }
  }
  // (Split: the candidates this CTA read may lie where these writes go only past k: CandOffset.)
  if (tid < k) {
    const int64_t out = static_cast<int64_t>(slot) * a.vocab + tid;
    a.sorted_x[out] = x[sh.id[tid]];
    a.sorted_ids[out] = sh.id[tid];
  }
  if (SampleSelectTopK(m.top_k, a.vocab)) return;
  // A prefix row: the walk's sum of exp(z) over the whole row (z from the top pair, as
  // sampling.cu Walk::Z; split: the chunks' sums rescaled to the top) and its count of finite
  // candidates.
  const double top = x[sh.id[0]], t = static_cast<double>(m.temperature);
  if constexpr (kSplit) {
    if (tid == 0) {
      double sum = 0;
      int32_t cand = 0;
      for (int c = 0; c < parts; ++c) {
        const SampleSelectPart& part = a.select_parts[static_cast<int64_t>(j) * kSampleSelectMaxParts + c];
        if (part.max > -CUDART_INF) sum += part.sum * Weight(part.max, top, t);
        cand += part.cand;
      }
      a.select_sum[j] = sum;
      a.select_cand[j] = cand;
    }
  } else {
    double sum = 0;
    int32_t cand = 0;
    if (top > -CUDART_INF) {
      for (int64_t i = tid; i < a.vocab; i += kSelectThreads) {
        const double v = x[i];
        sum += Weight(v, top, t);
        cand += v > -CUDART_INF;
      }
    }
    __shared__ typename cub::BlockReduce<double, kSelectThreads>::TempStorage sum_tmp;
    __shared__ typename cub::BlockReduce<int32_t, kSelectThreads>::TempStorage cand_tmp;
    sum = cub::BlockReduce<double, kSelectThreads>(sum_tmp).Sum(sum);
    cand = cub::BlockReduce<int32_t, kSelectThreads>(cand_tmp).Sum(cand);
    if (tid == 0) {
      a.select_sum[j] = sum;
      a.select_cand[j] = cand;
    }
  }
}

}  // namespace

cudaError_t LaunchSampleSelect(const SampleArgs& a, cudaStream_t stream) {
  const int32_t rows = a.num_selected;
  if (rows <= 0) return cudaSuccess;
  const int parts = SampleSelectParts(rows, a.vocab, a.num_sms);
  if (parts > 1) {
    if (a.select_parts == nullptr) return cudaErrorInvalidValue;
    SelectChunkKernel<<<dim3(static_cast<unsigned>(parts), static_cast<unsigned>(rows)), kSelectThreads, 0, stream>>>(
        a, parts);
    SelectKernel<true><<<static_cast<unsigned>(rows), kSelectThreads, 0, stream>>>(a, parts);
  } else {
    SelectKernel<false><<<static_cast<unsigned>(rows), kSelectThreads, 0, stream>>>(a, 1);
  }
  return cudaGetLastError();
}

}  // namespace lorc::kernels
