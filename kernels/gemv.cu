// Small-M BF16 GEMM for decode: see gemv.cuh for the contract and the layout of the work.
//
// Fragment mapping (mma.m16n8k16.row.col, lane = 4 * g + t): A (w tile, 16 rows x 16 k) gives
// lane (g, t) rows g and g + 8 at fragment columns {2t, 2t+1, 2t+8, 2t+9}; B (x^T, 16 k x 8
// tokens) gives it token g at the same fragment rows; C gives it rows g, g + 8 x tokens 2t, 2t+1.
// A dot product does not care in which order its k terms come, so for each 32-wide k step lane
// (g, t) loads the 16 bytes at k0 + 8t of w rows g and g + 8 and of x row g (token), and feeds
// elements 0-3 to one mma and 4-7 to a second: fragment column 2t+e holds element e, column
// 2t+8+e element 2+e, in w and x alike (a bijection onto the step's 32 columns).
#include "kernels/gemv.cuh"

#include <cooperative_groups.h>

#include <algorithm>
#include <atomic>

#include "kernels/pdl.cuh"
#include "kernels/vec.cuh"

namespace lorc::kernels {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kTileRows = 16;
static_assert(kGemvMaxRows * kTileRows <= kThreads, "kAdd's epilogue gives each thread one element");

// 16 bytes of weight, not kept in L1 (read once), with a 256-byte L2 prefetch (a warp reads 64
// contiguous bytes of a row per step and the following steps of its chunk read the rest).
__device__ __forceinline__ uint4 LoadWeight(const __nv_bfloat16* p) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p));
  return v;
}

// c += a * b for one m16n8k16 tile (bf16 inputs, fp32 accumulators).
__device__ __forceinline__ void Mma(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                    uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
  __trap();  // the launcher's devices are sm_80+ (bf16 mma); never reached on older ones
#endif
}

// The rotary epilogue (kRope): the tile's 16 rows are dims [8c, 8c + 8) and their partners
// [8c + half, 8c + half + 8) of one head (rotate_half pairs), so a CTA rotates its own rows.
struct RopeTile {
  int head, dim0;  // the tile's head (q, then k, then v heads) and first dim
};
__device__ __forceinline__ RopeTile RopeTileOf(const GemvRopeArgs& r) {
  const int tiles_per_head = r.head_dim / kTileRows;
  return {static_cast<int>(blockIdx.x) / tiles_per_head, static_cast<int>(blockIdx.x) % tiles_per_head * 8};
}

// Rounds, rotates (q and k heads) and stores the tile's [m][16] sums `part` as out's bf16 rows
// and, for k and v heads, as the cache rows of slot_mapping[token] (>= 0). The rotation is
// kernels/rope.cu's, on the bf16-rounded projection: the same bits as Matmul then RopeKvWrite
// (when the projection sums alike).
__device__ __forceinline__ void RopeEpilogue(const GemvRopeArgs& r, int m, const float* part, __nv_bfloat16* out,
                                             int64_t ldo) {
  const RopeTile tile = RopeTileOf(r);
  const int hd = r.head_dim, half = hd / 2;
  const int nq = r.num_heads, nkv = r.num_kv_heads;
  for (int i = threadIdx.x; i < m * 8; i += kThreads) {
    const int token = i / 8, dim = tile.dim0 + i % 8;
    const float x1 = __bfloat162float(__float2bfloat16_rn(part[token * kTileRows + i % 8]));
    const float x2 = __bfloat162float(__float2bfloat16_rn(part[token * kTileRows + i % 8 + 8]));
    float y1 = x1, y2 = x2;
    if (tile.head < nq + nkv) {
      float sn, cs;
      sincosf(__fmul_rn(static_cast<float>(r.positions[token]), r.inv_freq[dim]), &sn, &cs);
      y1 = __fsub_rn(__fmul_rn(x1, cs), __fmul_rn(x2, sn));
      y2 = __fadd_rn(__fmul_rn(x2, cs), __fmul_rn(x1, sn));
    }
    const __nv_bfloat16 b1 = __float2bfloat16_rn(y1), b2 = __float2bfloat16_rn(y2);
    __nv_bfloat16* o = out + static_cast<int64_t>(token) * ldo + static_cast<int64_t>(tile.head) * hd + dim;
    o[0] = b1;
    o[half] = b2;
    if (tile.head < nq) continue;
    const int64_t slot = r.slot_mapping[token];
    if (slot < 0) continue;
    const bool is_k = tile.head < nq + nkv;
    const int kvh = tile.head - nq - (is_k ? 0 : nkv);
    __nv_bfloat16* c = static_cast<__nv_bfloat16*>(is_k ? r.k_cache : r.v_cache) +
                       slot * (static_cast<int64_t>(nkv) * hd) + static_cast<int64_t>(kvh) * hd + dim;
    c[0] = b1;
    c[half] = b2;
  }
}

// What the kernel writes: plain rows, the rotary epilogue, silu(gate) * up, or plain rows added
// into out (kAdd: out = bf16(out + bf16(sum))).
enum Mode { kPlain, kRope, kSilu, kAdd };
// What the kernel multiplies: x as given, or RMSNorm(x [+ add]) * weight (GemvNormArgs).
// kScaledX: x as given, its rows' 1 / rms from the partial sums of squares norm.sum_squares (the
// norm weight folded into w; no per-element work).
enum In { kX, kNormX, kScaledX };

// The SiLU-and-multiply epilogue (kSilu): the tile's 16 rows are gate rows [8c, 8c + 8) and the
// matching up rows [I + 8c, I + 8c + 8), I = n / 2; it stores act[token][8c + i] =
// silu(gate) * up from the bf16-rounded projections, kernels/elementwise.cu's SiluMul formula.
__device__ __forceinline__ void SiluEpilogue(int m, const float* part, __nv_bfloat16* out, int64_t ldo) {
  const int col0 = static_cast<int>(blockIdx.x) * 8;
  for (int i = threadIdx.x; i < m * 8; i += kThreads) {
    const int token = i / 8, c = i % 8;
    const float g = __bfloat162float(__float2bfloat16_rn(part[token * kTileRows + c]));
    const float u = __bfloat162float(__float2bfloat16_rn(part[token * kTileRows + c + 8]));
    out[static_cast<int64_t>(token) * ldo + col0 + c] = __float2bfloat16_rn(g / (1.0f + expf(-g)) * u);
  }
}

// kNormX, for one 16-byte vector of a live token's row (8 elements): r = x [+ add] rounded to
// bf16 (the residual stream's stored value, kernels/rms_norm.cu's); ss += sum r^2 in fp32;
// returns bf16(r * weight) (wv: the norm weight's 8 values), the GEMV's input. No memory access:
// the caller loads a chunk's vectors first and stores the residual after its loop (a store
// among the loads kept the compiler from issuing the next loads before it: 1.8 ms slower a step,
// 2026-12-05). The 1 / rms scale is applied to the fp32 sums at the end: sum_k w[j,k] (r_k g_k /
// rms) = (sum_k w[j,k] r_k g_k) / rms.
// The residual stream's stored value bf16(x + add): NormInput's r and StoreResidual's output.
__device__ __forceinline__ __nv_bfloat16 AddBf16(__nv_bfloat16 x, __nv_bfloat16 add) {
  return __float2bfloat16_rn(__bfloat162float(x) + __bfloat162float(add));
}
__device__ __forceinline__ uint4 NormInput(uint4 xv, uint4 av, uint4 wv, bool has_add, bool has_weight, float& ss) {
  const __nv_bfloat16* xe = reinterpret_cast<const __nv_bfloat16*>(&xv);
  const __nv_bfloat16* ae = reinterpret_cast<const __nv_bfloat16*>(&av);
  const __nv_bfloat16* we = reinterpret_cast<const __nv_bfloat16*>(&wv);
  uint4 y;
  __nv_bfloat16* ye = reinterpret_cast<__nv_bfloat16*>(&y);
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    const float r = __bfloat162float(has_add ? AddBf16(xe[e], ae[e]) : xe[e]);
    ss += r * r;
    ye[e] = has_weight ? __float2bfloat16_rn(r * __bfloat162float(we[e])) : __float2bfloat16_rn(r);
  }
  return y;
}

// The sum of squares of v[0, count) (count <= 16) in index order, one rounding per product and per
// sum (no fused multiply-add): the bits kernels::LaunchSumSquaresPartials computes for a group.
__device__ __forceinline__ float SumSquares16(const float* v, int count) {
  float s = 0.f;
  for (int i = 0; i < count; ++i) s = __fadd_rn(s, __fmul_rn(v[i], v[i]));
  return s;
}

// kNormX with add: residual_out = bf16(x + add) for the m rows, by one CTA after its GEMV loop
// (AddBf16, as NormInput).
__device__ __forceinline__ void StoreResidual(const GemvNormArgs& a, int m, int k, const __nv_bfloat16* x,
                                              int64_t ldx) {
  const int vecs = k / 8;
  for (int i = threadIdx.x; i < m * vecs; i += blockDim.x) {
    const int token = i / vecs, k0 = (i % vecs) * 8;
    const uint4 xv = __ldg(reinterpret_cast<const uint4*>(x + static_cast<int64_t>(token) * ldx + k0));
    const uint4 av = __ldg(reinterpret_cast<const uint4*>(static_cast<const __nv_bfloat16*>(a.add) +
                                                          static_cast<int64_t>(token) * a.ld_add + k0));
    const __nv_bfloat16* xe = reinterpret_cast<const __nv_bfloat16*>(&xv);
    const __nv_bfloat16* ae = reinterpret_cast<const __nv_bfloat16*>(&av);
    uint4 rv;
    __nv_bfloat16* re = reinterpret_cast<__nv_bfloat16*>(&rv);
#pragma unroll
    for (int e = 0; e < 8; ++e) re[e] = AddBf16(xe[e], ae[e]);
    *reinterpret_cast<uint4*>(static_cast<__nv_bfloat16*>(a.residual_out) + static_cast<int64_t>(token) * a.ld_residual_out +
                              k0) = rv;
  }
}

// One CTA: rows [16 * blockIdx.x, +16) of w (kRope: RopeTileOf's rows; kSilu: SiluEpilogue's),
// K chunks of cluster rank blockIdx.y of gridDim.y. NT: 8-token column tiles (M <= 8 * NT);
// STEPS: 32-wide k steps per warp chunk; kMode kRope / kSilu: their epilogue instead of the plain
// store (OutT bf16; kRope may be split, run by cluster rank 0 after the reduction; kSilu is not);
// kIn kNormX: the input is RMSNorm(x [+ add]) * weight, kScaledX: x scaled by the partials' 1 /
// rms (neither split: their sums of squares would cover one split's K only).
template <int NT, int STEPS, typename OutT, Mode kMode = kPlain, In kIn = kX>
__global__ void __launch_bounds__(kThreads, 2)
    GemvKernel(int m, int n, int k, const __nv_bfloat16* __restrict__ x, int64_t ldx,
               const __nv_bfloat16* __restrict__ w, int64_t ldw, OutT* __restrict__ out, int64_t ldo,
               const GemvRopeArgs rope, const GemvNormArgs norm) {
  constexpr int kChunk = 32 * STEPS;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int row0 = blockIdx.x * kTileRows;
  const int splits = gridDim.y, split = blockIdx.y;

  // Rows past n re-read row n - 1 (valid memory) and are not stored.
  int ra = min(row0 + g, n - 1), rb = min(row0 + g + 8, n - 1);
  if (kMode == kRope) {
    const RopeTile tile = RopeTileOf(rope);
    ra = tile.head * rope.head_dim + tile.dim0 + g;
    rb = ra + rope.head_dim / 2;
  }
  if (kMode == kSilu) {
    ra = static_cast<int>(blockIdx.x) * 8 + g;
    rb = ra + n / 2;
  }
  const __nv_bfloat16* wa = w + static_cast<int64_t>(ra) * ldw + 8 * t;
  const __nv_bfloat16* wb = w + static_cast<int64_t>(rb) * ldw + 8 * t;
  const __nv_bfloat16* xr[NT];
  const __nv_bfloat16* ar[NT];  // kNormX with add: the add rows, as xr
  bool x_live[NT];
  const bool has_add = kIn == kNormX && norm.add != nullptr;
  const bool has_weight = kIn == kNormX && norm.weight != nullptr;
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    x_live[j] = g + 8 * j < m;
    xr[j] = x + static_cast<int64_t>(x_live[j] ? g + 8 * j : 0) * ldx + 8 * t;
    ar[j] = has_add ? static_cast<const __nv_bfloat16*>(norm.add) +
                          static_cast<int64_t>(x_live[j] ? g + 8 * j : 0) * norm.ld_add + 8 * t
                    : nullptr;
  }

  const int chunks = (k + kChunk - 1) / kChunk;
  const int c_begin = static_cast<int>(static_cast<int64_t>(chunks) * split / splits);
  const int c_end = static_cast<int>(static_cast<int64_t>(chunks) * (split + 1) / splits);
  float acc[NT][4] = {};
  float ss[NT] = {};  // kNormX / kScaledX: this lane's share of its tokens' sums of squares
  const uint4 zero = make_uint4(0, 0, 0, 0);
  uint4 va[STEPS], vb[STEPS];
  auto load_w = [&](int c) {
#pragma unroll
    for (int s = 0; s < STEPS; ++s) {
      const int k0 = c * kChunk + 32 * s;
      const bool live = k0 + 8 * t < k;  // k % 8 == 0: a vector is all in or all out
      va[s] = live ? LoadWeight(wa + k0) : zero;
      vb[s] = live ? LoadWeight(wb + k0) : zero;
    }
  };
  // Prologue, independent of the previous kernel (PDL, pdl.cuh): the warp's first chunk of
  // weights into registers, then the wait for x. (Prefetching the next two chunks into L2 here as
  // well made the 8B decode step 0.3 ms slower on an H200, 2026-12-01: not done.)
  int c = c_begin + warp;
  const bool preloaded = c < c_end;
  if (preloaded) load_w(c);
  PdlWait();
  PdlTrigger();  // after the wait, not before: the decode attention's early K/V relies on it (pdl.cuh)
  // kScaledX: token g + 8j's partials, strided over the 32 (warp, t) lanes of that token, summed
  // in p order per lane and reduced below exactly as kNormX's per-lane sums (the same tree in
  // every CTA, so every CTA's 1 / rms has the same bits). The first kPartsInRegs per lane are
  // loaded here and added after the K loop, so their L2 round trip overlaps the weight stream.
  constexpr int kPartsInRegs = kIn == kScaledX ? 16 : 1;
  const int parts = (k + kTileRows - 1) / kTileRows;
  float pv[NT][kPartsInRegs];
  if constexpr (kIn == kScaledX) {
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      const float* row = norm.sum_squares + static_cast<int64_t>(x_live[j] ? g + 8 * j : 0) * parts;
#pragma unroll
      for (int i = 0; i < kPartsInRegs; ++i) {
        const int p = warp * 4 + t + 32 * i;
        pv[j][i] = x_live[j] && p < parts ? __ldg(row + p) : 0.f;
      }
    }
  }
  // kAdd: this thread's element of the epilogue (token threadIdx.x / 16, row row0 + threadIdx.x %
  // 16; m * 16 <= kThreads), loaded here for the same reason.
  float resid = 0.f;
  if constexpr (kMode == kAdd) {
    const int token = threadIdx.x / kTileRows, row = row0 + threadIdx.x % kTileRows;
    if (split == 0 && token < m && row < n) resid = ToF32(out[static_cast<int64_t>(token) * ldo + row]);
  }
  for (bool first = true; c < c_end; c += kWarps, first = false) {
    if (!(first && preloaded)) load_w(c);
    uint4 vx[NT][STEPS];
#pragma unroll
    for (int s = 0; s < STEPS; ++s) {
      const int k0 = c * kChunk + 32 * s;
      const bool live = k0 + 8 * t < k;
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        vx[j][s] = live && x_live[j] ? __ldg(reinterpret_cast<const uint4*>(xr[j] + k0)) : zero;
      }
    }
    if constexpr (kIn == kNormX) {
      // Every load of the chunk first (x above, add and the norm weight here), then the math.
      uint4 av[NT][STEPS], nw[STEPS];
#pragma unroll
      for (int s = 0; s < STEPS; ++s) {
        const int k0 = c * kChunk + 32 * s;
        const bool live = k0 + 8 * t < k;
        nw[s] = has_weight && live && x_live[0]
                    ? __ldg(reinterpret_cast<const uint4*>(static_cast<const __nv_bfloat16*>(norm.weight) + k0 + 8 * t))
                    : zero;
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          av[j][s] = has_add && live && x_live[j] ? __ldg(reinterpret_cast<const uint4*>(ar[j] + k0)) : zero;
        }
      }
#pragma unroll
      for (int s = 0; s < STEPS; ++s) {
        const bool live = c * kChunk + 32 * s + 8 * t < k;
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          if (live && x_live[j]) vx[j][s] = NormInput(vx[j][s], av[j][s], nw[s], has_add, has_weight, ss[j]);
        }
      }
    }
#pragma unroll
    for (int s = 0; s < STEPS; ++s) {
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        Mma(acc[j], va[s].x, vb[s].x, va[s].y, vb[s].y, vx[j][s].x, vx[j][s].y);
        Mma(acc[j], va[s].z, vb[s].z, va[s].w, vb[s].w, vx[j][s].z, vx[j][s].w);
      }
    }
  }

  if constexpr (kIn == kNormX) {
    if (has_add && blockIdx.x == 0) StoreResidual(norm, m, k, x, ldx);
  }
  if constexpr (kIn == kScaledX) {
#pragma unroll
    for (int j = 0; j < NT; ++j) {
#pragma unroll
      for (int i = 0; i < kPartsInRegs; ++i) ss[j] += pv[j][i];
      if (!x_live[j]) continue;
      const float* row = norm.sum_squares + static_cast<int64_t>(g + 8 * j) * parts;
      for (int p = warp * 4 + t + 32 * kPartsInRegs; p < parts; p += 32) ss[j] += __ldg(row + p);
    }
  }

  // Warp partials -> the CTA's [token][row] sums.
  __shared__ float red[kWarps][kTileRows][8 * NT];
  __shared__ float part[8 * NT * kTileRows];  // [token][row]
  __shared__ float ssq[kIn != kX ? kWarps : 1][8 * NT];  // kNormX / kScaledX: [warp][token] sums of squares
  if constexpr (kIn != kX) {
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      float v = ss[j];
      v += __shfl_xor_sync(0xffffffffu, v, 1);
      v += __shfl_xor_sync(0xffffffffu, v, 2);
      if (t == 0) ssq[warp][g + 8 * j] = v;
    }
  }
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    red[warp][g][8 * j + 2 * t] = acc[j][0];
    red[warp][g][8 * j + 2 * t + 1] = acc[j][1];
    red[warp][g + 8][8 * j + 2 * t] = acc[j][2];
    red[warp][g + 8][8 * j + 2 * t + 1] = acc[j][3];
  }
  __syncthreads();
  for (int i = threadIdx.x; i < 8 * NT * kTileRows; i += kThreads) {
    const int row = i % kTileRows, token = i / kTileRows;
    float sum = 0.f;
#pragma unroll
    for (int v = 0; v < kWarps; ++v) sum += red[v][row][token];
    if constexpr (kIn != kX) {
      float sq = 0.f;
#pragma unroll
      for (int v = 0; v < kWarps; ++v) sq += ssq[v][token];
      sum *= rsqrtf(sq / static_cast<float>(k) + norm.eps);
    }
    part[i] = sum;
  }
  if (splits > 1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    namespace cg = cooperative_groups;
    cg::cluster_group cluster = cg::this_cluster();
    cluster.sync();  // every rank's part is complete
    if (split == 0) {
      for (int i = threadIdx.x; i < m * kTileRows; i += kThreads) {
        float sum = part[i];
        for (int r = 1; r < splits; ++r) sum += cluster.map_shared_rank(part, r)[i];
        part[i] = sum;
      }
    }
    cluster.sync();  // rank 0 has read the others' part (they may exit now) and written its own
#else
    __trap();  // the launcher asks for clusters only where they exist
#endif
  } else {
    __syncthreads();
  }
  if (split != 0) return;
  if constexpr (kMode == kRope) {
    RopeEpilogue(rope, m, part, out, ldo);
  } else if constexpr (kMode == kSilu) {
    SiluEpilogue(m, part, out, ldo);
  } else {
    for (int i = threadIdx.x; i < m * kTileRows; i += kThreads) {
      const int row = row0 + i % kTileRows, token = i / kTileRows;
      if (row >= n) continue;
      OutT* o = out + static_cast<int64_t>(token) * ldo + row;
      if constexpr (kMode == kAdd) {  // AddInPlace's arithmetic on the GEMV's rounded output
        const OutT v = FromF32<OutT>(resid + ToF32(FromF32<OutT>(part[i])));  // resid: *o (i == threadIdx.x)
        *o = v;
        part[i] = ToF32(v);  // for the sums of squares below
      } else {
        *o = FromF32<OutT>(part[i]);
      }
    }
    if constexpr (kMode == kAdd) {
      if (norm.sum_squares_out != nullptr) {  // uniform over the CTA
        __syncthreads();
        for (int token = threadIdx.x; token < m; token += kThreads) {
          float* dst = norm.sum_squares_out + static_cast<int64_t>(token) * gridDim.x + blockIdx.x;
          *dst = SumSquares16(part + token * kTileRows, min(kTileRows, n - row0));
        }
      }
    }
  }
}

struct GemvLaunch {
  dim3 grid;
  cudaStream_t stream = nullptr;
  const cudaLaunchAttribute* cluster = nullptr;  // the split's cluster shape, or null
  float* sum_squares_out = nullptr;              // kAdd: GemvNormArgs::sum_squares_out
};

template <int NT, int STEPS, typename OutT, Mode kMode>
cudaError_t Launch(const GemvLaunch& cfg, int m, int n, int k, const void* x, int64_t ldx,
                   const void* w, int64_t ldw, void* out, int64_t ldo) {
  GemvNormArgs sums;  // kAdd: where the rows' partial sums of squares go (or null)
  sums.sum_squares_out = cfg.sum_squares_out;
  return LaunchPdl(GemvKernel<NT, STEPS, OutT, kMode>, cfg.grid, dim3(kThreads), 0, cfg.stream, cfg.cluster, m, n, k,
                   static_cast<const __nv_bfloat16*>(x), ldx, static_cast<const __nv_bfloat16*>(w), ldw,
                   static_cast<OutT*>(out), ldo, GemvRopeArgs{}, sums);
}

template <int STEPS, typename OutT, Mode kMode>
cudaError_t LaunchSteps(const GemvLaunch& cfg, int m, int n, int k, const void* x, int64_t ldx,
                        const void* w, int64_t ldw, void* out, int64_t ldo) {
  return m <= 8 ? Launch<1, STEPS, OutT, kMode>(cfg, m, n, k, x, ldx, w, ldw, out, ldo)
                : Launch<2, STEPS, OutT, kMode>(cfg, m, n, k, x, ldx, w, ldw, out, ldo);
}

// kPlain or kAdd (BF16 out) with `cfg`'s grid and cluster and k_steps 4 or 8.
template <typename OutT, Mode kMode = kPlain>
cudaError_t LaunchOut(const GemvLaunch& cfg, int k_steps, int m, int n, int k, const void* x,
                      int64_t ldx, const void* w, int64_t ldw, void* out, int64_t ldo) {
  return k_steps == 4 ? LaunchSteps<4, OutT, kMode>(cfg, m, n, k, x, ldx, w, ldw, out, ldo)
                      : LaunchSteps<8, OutT, kMode>(cfg, m, n, k, x, ldx, w, ldw, out, ldo);
}

// The fused QKV projection's k_steps: 4 (with the tiles unsplit, the fastest GEMV configuration of
// the 8B and 70B/2 qkv shapes at M = 1..8 on an H200, 2026-12-01,
// docs/data/2026-12-01-h200-gemm_bench-decode.txt); split where GemvRopeSplits says.
constexpr int kRopeSteps = 4;

// The fused launches (an epilogue other than the plain store, or the normed input): BF16 out,
// k_steps kRopeSteps, the token tile by m; unsplit unless grid.y > 1: then a cluster of grid.y
// CTAs a tile splits K (kX input only: kNormX's and kScaledX's sums of squares are per CTA).
template <Mode kMode, In kIn>
cudaError_t LaunchFused(dim3 grid, int64_t m, int64_t n, int64_t k, const void* x, int64_t ldx, const void* w,
                        int64_t ldw, void* out, int64_t ldo, const GemvRopeArgs& rope, const GemvNormArgs& norm,
                        cudaStream_t stream) {
  const int mi = static_cast<int>(m), ni = static_cast<int>(n), ki = static_cast<int>(k);
  const auto* xb = static_cast<const __nv_bfloat16*>(x);
  const auto* wb = static_cast<const __nv_bfloat16*>(w);
  auto* ob = static_cast<__nv_bfloat16*>(out);
  cudaLaunchAttribute cluster;
  const cudaLaunchAttribute* cl = nullptr;
  if (grid.y > 1) {
    if (kIn != kX) return cudaErrorInvalidValue;
    cluster.id = cudaLaunchAttributeClusterDimension;
    cluster.val.clusterDim.x = 1;
    cluster.val.clusterDim.y = grid.y;
    cluster.val.clusterDim.z = 1;
    cl = &cluster;
  }
  if constexpr (kIn != kX) {  // m <= kGemvNormMaxRows: one token tile
    return LaunchPdl(GemvKernel<1, kRopeSteps, __nv_bfloat16, kMode, kIn>, grid, dim3(kThreads), 0, stream, nullptr,
                     mi, ni, ki, xb, ldx, wb, ldw, ob, ldo, rope, norm);
  } else {
    return m <= 8 ? LaunchPdl(GemvKernel<1, kRopeSteps, __nv_bfloat16, kMode, kIn>, grid, dim3(kThreads), 0, stream,
                              cl, mi, ni, ki, xb, ldx, wb, ldw, ob, ldo, rope, norm)
                  : LaunchPdl(GemvKernel<2, kRopeSteps, __nv_bfloat16, kMode, kIn>, grid, dim3(kThreads), 0, stream,
                              cl, mi, ni, ki, xb, ldx, wb, ldw, ob, ldo, rope, norm);
  }
}
}  // namespace

bool GemvSupported(int64_t m, int64_t k, const void* x, int64_t ldx, const void* w, int64_t ldw) {
  return m >= 1 && m <= kGemvMaxRows && k > 0 && k % 8 == 0 && ldx >= k && ldw >= k && ldx % 8 == 0 &&
         ldw % 8 == 0 && Aligned16(x) && Aligned16(w);
}

namespace {
// The plain and adding GEMVs' launch: kPlain with F32 or BF16 out, kAdd with BF16 out.
cudaError_t LaunchGemvPlainOrAdd(bool add, int64_t m, int64_t n, int64_t k, const void* x, int64_t ldx,
                                 const void* w, int64_t ldw, ElemType out_type, void* out, int64_t ldo,
                                 GemvConfig cfg, float* sum_squares_out, cudaStream_t stream) {
  constexpr int64_t kIntMax = 0x7fffffff;
  if (!GemvSupported(m, k, x, ldx, w, ldw) || n < 0 || ldo < n || n >= kIntMax || k >= kIntMax ||
      cfg.splits < 1 || cfg.splits > kGemvMaxSplits || (cfg.k_steps != 4 && cfg.k_steps != 8)) {
    return cudaErrorInvalidValue;
  }
  if (n == 0) return cudaSuccess;
  GemvLaunch lc;
  lc.grid = dim3(static_cast<unsigned>((n + kTileRows - 1) / kTileRows), static_cast<unsigned>(cfg.splits));
  lc.stream = stream;
  lc.sum_squares_out = sum_squares_out;
  cudaLaunchAttribute cluster;
  if (cfg.splits > 1) {
    cluster.id = cudaLaunchAttributeClusterDimension;
    cluster.val.clusterDim.x = 1;
    cluster.val.clusterDim.y = static_cast<unsigned>(cfg.splits);
    cluster.val.clusterDim.z = 1;
    lc.cluster = &cluster;
  }
  const int mi = static_cast<int>(m), ni = static_cast<int>(n), ki = static_cast<int>(k);
  if (add) return LaunchOut<__nv_bfloat16, kAdd>(lc, cfg.k_steps, mi, ni, ki, x, ldx, w, ldw, out, ldo);
  return out_type == ElemType::kF32
             ? LaunchOut<float>(lc, cfg.k_steps, mi, ni, ki, x, ldx, w, ldw, out, ldo)
             : LaunchOut<__nv_bfloat16>(lc, cfg.k_steps, mi, ni, ki, x, ldx, w, ldw, out, ldo);
}
}  // namespace

cudaError_t LaunchGemvBf16(int64_t m, int64_t n, int64_t k, const void* x, int64_t ldx, const void* w,
                           int64_t ldw, ElemType out_type, void* out, int64_t ldo, GemvConfig cfg,
                           cudaStream_t stream) {
  return LaunchGemvPlainOrAdd(false, m, n, k, x, ldx, w, ldw, out_type, out, ldo, cfg, nullptr, stream);
}

cudaError_t LaunchGemvAddBf16(int64_t m, int64_t n, int64_t k, const void* x, int64_t ldx, const void* w,
                              int64_t ldw, void* acc, int64_t ld_acc, GemvConfig cfg, float* sum_squares,
                              cudaStream_t stream) {
  return LaunchGemvPlainOrAdd(true, m, n, k, x, ldx, w, ldw, ElemType::kBF16, acc, ld_acc, cfg, sum_squares, stream);
}

bool GemvRopeSupported(int64_t m, int64_t n, int64_t k, const void* x, int64_t ldx, const void* w, int64_t ldw,
                       const GemvRopeArgs& r) {
  return GemvSupported(m, k, x, ldx, w, ldw) && r.head_dim > 0 && r.head_dim % kTileRows == 0 && r.num_heads >= 0 &&
         r.num_kv_heads > 0 && n == static_cast<int64_t>(r.num_heads + 2 * r.num_kv_heads) * r.head_dim &&
         n < 0x7fffffff && k < 0x7fffffff && r.positions != nullptr && r.inv_freq != nullptr &&
         r.slot_mapping != nullptr && r.k_cache != nullptr && r.v_cache != nullptr;
}

namespace {
// The current device's SM count where the fused QKV kernel can run as a cluster, else -1 (cached
// per device, as pdl.cu).
int RopeClusterSms() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cached[kMaxDevices] = {};  // 0: not asked yet
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= kMaxDevices) {
    (void)cudaGetLastError();
    return -1;
  }
  int sms = cached[dev].load(std::memory_order_relaxed);
  if (sms == 0) {
    // Clusters need an sm_90 device and this kernel's code built for it: a binary of an earlier
    // architecture's PTX, JIT-compiled for the device, has the cluster reduction compiled out.
    int count = 0, major = 0;
    cudaFuncAttributes fa{};
    if (cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
        cudaFuncGetAttributes(&fa, GemvKernel<1, kRopeSteps, __nv_bfloat16, kRope, kX>) != cudaSuccess) {
      (void)cudaGetLastError();
      count = 0;
    }
    sms = major >= 9 && fa.ptxVersion >= 90 && count > 0 ? count : -1;
    cached[dev].store(sms, std::memory_order_relaxed);
  }
  return sms;
}
}  // namespace

int GemvRopeSplits(int64_t n) {
  const int sms = RopeClusterSms();
  const int64_t tiles = n / kTileRows;
  if (sms <= 0 || tiles <= 0 || tiles >= sms) return 1;
  return static_cast<int>(std::clamp<int64_t>(2 * sms / tiles, 1, kGemvMaxSplits));
}

cudaError_t LaunchGemvRopeKvWrite(int64_t m, int64_t n, int64_t k, const void* x, int64_t ldx, const void* w,
                                  int64_t ldw, void* out, int64_t ldo, const GemvRopeArgs& rope,
                                  cudaStream_t stream, int splits) {
  if (!GemvRopeSupported(m, n, k, x, ldx, w, ldw, rope) || ldo < n || splits < 0 || splits > kGemvMaxSplits) {
    return cudaErrorInvalidValue;
  }
  if (splits == 0) splits = GemvRopeSplits(n);
  if (splits > 1 && RopeClusterSms() < 0) return cudaErrorNotSupported;  // would trap, or not launch
  return LaunchFused<kRope, kX>(dim3(static_cast<unsigned>(n / kTileRows), static_cast<unsigned>(splits)), m, n, k,
                                x, ldx, w, ldw, out, ldo, rope, GemvNormArgs{}, stream);
}

bool GemvSiluMulSupported(int64_t m, int64_t n, int64_t k, const void* x, int64_t ldx, const void* w, int64_t ldw,
                          int64_t ldo) {
  return GemvSupported(m, k, x, ldx, w, ldw) && n > 0 && n % 16 == 0 && n < 0x7fffffff && k < 0x7fffffff &&
         ldo >= n / 2;
}

cudaError_t LaunchGemvSiluMul(int64_t m, int64_t n, int64_t k, const void* x, int64_t ldx, const void* w, int64_t ldw,
                              void* out, int64_t ldo, cudaStream_t stream) {
  if (!GemvSiluMulSupported(m, n, k, x, ldx, w, ldw, ldo)) return cudaErrorInvalidValue;
  return LaunchFused<kSilu, kX>(dim3(static_cast<unsigned>(n / kTileRows)), m, n, k, x, ldx, w, ldw, out, ldo,
                                GemvRopeArgs{}, GemvNormArgs{}, stream);
}

bool GemvNormSupported(int64_t m, int64_t n, int64_t k, const void* x, int64_t ldx, const void* w, int64_t ldw,
                       int64_t ldo, const GemvNormArgs& a, GemvEpilogue epilogue, const GemvRopeArgs* rope) {
  auto rows_ok = [&](const void* p, int64_t ld) { return p != nullptr && Aligned16(p) && ld >= k && ld % 8 == 0; };
  if (!GemvSupported(m, k, x, ldx, w, ldw) || m > kGemvNormMaxRows || n <= 0 || n >= 0x7fffffff || k >= 0x7fffffff ||
      (a.weight != nullptr && !Aligned16(a.weight)) || !(a.eps >= 0.f)) {
    return false;
  }
  if (a.add != nullptr && (!rows_ok(a.add, a.ld_add) || !rows_ok(a.residual_out, a.ld_residual_out))) return false;
  if (a.sum_squares != nullptr && (a.add != nullptr || epilogue == GemvEpilogue::kStore)) return false;
  switch (epilogue) {
    case GemvEpilogue::kStore:
      return ldo >= n;
    case GemvEpilogue::kRopeKvWrite:
      return rope != nullptr && ldo >= n && GemvRopeSupported(m, n, k, x, ldx, w, ldw, *rope);
    case GemvEpilogue::kSiluMul:
      return n % 16 == 0 && ldo >= n / 2;
  }
  return false;
}


cudaError_t LaunchGemvNorm(int64_t m, int64_t n, int64_t k, const void* x, int64_t ldx, const void* w, int64_t ldw,
                           void* out, int64_t ldo, const GemvNormArgs& norm, GemvEpilogue epilogue,
                           const GemvRopeArgs* rope, cudaStream_t stream) {
  if (!GemvNormSupported(m, n, k, x, ldx, w, ldw, ldo, norm, epilogue, rope)) return cudaErrorInvalidValue;
  switch (epilogue) {
    case GemvEpilogue::kStore:
      return LaunchFused<kPlain, kNormX>(dim3(static_cast<unsigned>((n + kTileRows - 1) / kTileRows)), m, n, k, x, ldx,
                                         w, ldw, out, ldo, GemvRopeArgs{}, norm, stream);
    case GemvEpilogue::kRopeKvWrite:
      if (norm.sum_squares != nullptr) {
        return LaunchFused<kRope, kScaledX>(dim3(static_cast<unsigned>(n / kTileRows)), m, n, k, x, ldx, w, ldw, out,
                                            ldo, *rope, norm, stream);
      }
      return LaunchFused<kRope, kNormX>(dim3(static_cast<unsigned>(n / kTileRows)), m, n, k, x, ldx, w, ldw, out, ldo,
                                        *rope, norm, stream);
    case GemvEpilogue::kSiluMul:
      if (norm.sum_squares != nullptr) {
        return LaunchFused<kSilu, kScaledX>(dim3(static_cast<unsigned>(n / kTileRows)), m, n, k, x, ldx, w, ldw, out,
                                            ldo, GemvRopeArgs{}, norm, stream);
      }
      return LaunchFused<kSilu, kNormX>(dim3(static_cast<unsigned>(n / kTileRows)), m, n, k, x, ldx, w, ldw, out, ldo,
                                        GemvRopeArgs{}, norm, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace lorc::kernels
