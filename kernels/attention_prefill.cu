// Paged prefill attention (flash-attention style, causal, variable lengths and chunks over cached
// context in one launch); see attention_paged.cuh. Two kernels: the bf16 flash kernel below
// (FlashPrefillKernel, with split-KV and its merge) and, for quantized caches, a WMMA kernel that
// dequantizes K/V as it stages them (QuantPrefillKernel).
//
// QuantPrefillKernel: a CTA of 4 warps takes kPrefillRowsQuantized = 64 rows of one sequence and
// one KV head, a row being a (query token, query head of the group) pair, so the K/V tiles it
// reads serve the whole group. Per KV tile of 64 keys (gathered from the paged cache into shared
// memory): S = Q K^T on the tensor cores (WMMA bf16 16x16x16, fp32 accumulate), an online softmax
// per row in fp32 (two lanes per row), P rounded to bf16, O += P V on the tensor cores with O
// kept in shared memory (WMMA accumulator layouts are opaque, so the per-row rescale goes through
// shared memory). TODO(perf): the flash kernel's structure with dequantization in the loader.
#include <cuda_bf16.h>
#include <mma.h>

#include <cmath>

#include "kernels/attention_paged.cuh"
#include "kernels/elem_type.cuh"
#include "kernels/kv_quant.cuh"
#include "kernels/mma.cuh"
#include "kernels/attention_merge.cuh"

namespace lorc::kernels {
namespace {

namespace wmma = nvcuda::wmma;

// This CTA's sequence and first query token: the tile'th tile (tq query tokens each) of the
// prefill list; false past its end.
__device__ __forceinline__ bool FindTile(const PagedAttentionArgs& a, const PrefillSchedule& sch, int tile, int tq,
                                         int* seq, int* tok0) {
  const int num_prefills = *sch.num_prefills;
  for (int i = 0; i < num_prefills; ++i) {
    const int s = sch.prefill_seqs[i];
    const int n = (a.query_start[s + 1] - a.query_start[s] + tq - 1) / tq;
    if (tile < n) {
      *seq = s;
      *tok0 = tile * tq;
      return true;
    }
    tile -= n;
  }
  return false;
}

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kRows = kPrefillRowsQuantized;  // 16 per warp
constexpr int kKvTile = 64;
constexpr float kLog2e = 1.4426950408889634f;
// Padded shared-memory row strides (fewer bank conflicts; WMMA needs multiples of 4 floats /
// 8 bf16 and 32-byte aligned tile starts, which these keep).
constexpr int kSLd = kKvTile + 4;
constexpr int kPLd = kKvTile + 8;

template <int D>
struct Smem {
  __nv_bfloat16 q[kRows][D + 8];
  __nv_bfloat16 k[kKvTile][D + 8];
  __nv_bfloat16 v[kKvTile][D + 8];
  float s[kWarps][16][kSLd];
  __nv_bfloat16 p[kWarps][16][kPLd];
  float o[kWarps][16][D + 4];
};

// A quantized cache only (a.kv_quant, switched at run time).
template <int D>
__global__ void __launch_bounds__(kThreads) QuantPrefillKernel(const PagedAttentionArgs a, const PrefillSchedule sch) {
  const KvQuant kq = a.kv_quant;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  Smem<D>& sm = *reinterpret_cast<Smem<D>*>(smem_raw);
  const int group = a.num_heads / a.num_kv_heads;
  const int tq = kRows / group;  // query tokens per CTA
  const int kvh = blockIdx.y;

  int seq, tok0;
  if (!FindTile(a, sch, blockIdx.x, tq, &seq, &tok0)) return;  // uniform over the CTA
  const int q0 = a.query_start[seq];
  const int q_len = a.query_start[seq + 1] - q0;
  const int ctx = a.seq_lens[seq] - q_len;  // cached keys before the first query row
  const int32_t* table = a.block_tables + static_cast<int64_t>(seq) * a.max_blocks_per_seq;
  constexpr int kChunks = D / 8;  // 16-byte pieces per row

  // Q rows: row r is query token tok0 + r / group, head kvh * group + r % group.
  for (int idx = threadIdx.x; idx < kRows * kChunks; idx += kThreads) {
    const int r = idx / kChunks, c = idx % kChunks;
    const int i = tok0 + r / group;
    uint4 val = make_uint4(0, 0, 0, 0);
    if (i < q_len) {
      val = *reinterpret_cast<const uint4*>(static_cast<const __nv_bfloat16*>(a.q) + (q0 + i) * a.q_ld +
                                            (kvh * group + r % group) * D + c * 8);
    }
    *reinterpret_cast<uint4*>(&sm.q[r][c * 8]) = val;
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int lr = lane / 2, half = lane % 2;  // this lane's row of the warp's 16, and column half
  const int row = warp * 16 + lr;
  const int my_tok = tok0 + row / group;
  // Padding rows (past q_len) take the last row's position; their output is never written.
  const int my_pos = ctx + (my_tok < q_len ? my_tok : q_len - 1);
  for (int d = half * (D / 2); d < (half + 1) * (D / 2); ++d) sm.o[warp][lr][d] = 0.f;
  float m = -INFINITY, l = 0.f;
  const float scale2 = a.scale * kLog2e;
  const int last_tok = (tok0 + tq < q_len ? tok0 + tq : q_len) - 1;
  const int kv_end = ctx + last_tok + 1;  // keys any row of the CTA attends to

  // K/V tiles go global -> registers -> shared memory; the next tile's loads are issued before
  // this tile's math (register double buffering).
  constexpr int kPerThread = kKvTile * kChunks / kThreads;
  uint4 kreg[kPerThread], vreg[kPerThread];
  auto load_tile = [&](int kv0) {
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      const int idx = threadIdx.x + j * kThreads;
      const int t = kv0 + idx / kChunks, c = idx % kChunks;
      kreg[j] = vreg[j] = make_uint4(0, 0, 0, 0);
      if (t < kv_end) {
        const int64_t block = table[t / a.block_size];
        // Codes + scale now, dequantized to bf16 when stored to shared memory.
        kreg[j] = KvqLoad8(kq, static_cast<const uint8_t*>(a.k_cache), a.k_q, block, t % a.block_size, kvh, c * 8);
        vreg[j] = KvqLoad8(kq, static_cast<const uint8_t*>(a.v_cache), a.v_q, block, t % a.block_size, kvh, c * 8);
      }
    }
  };
  load_tile(0);
  for (int kv0 = 0; kv0 < kv_end; kv0 += kKvTile) {
    __syncthreads();  // the previous tile's K/V are consumed (and Q is stored, first time)
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      const int idx = threadIdx.x + j * kThreads;
      const bool dq = kv0 + idx / kChunks < kv_end;
      *reinterpret_cast<uint4*>(&sm.k[idx / kChunks][(idx % kChunks) * 8]) =
          dq ? KvqDequant8Bf16(kq, kreg[j]) : kreg[j];
      *reinterpret_cast<uint4*>(&sm.v[idx / kChunks][(idx % kChunks) * 8]) =
          dq ? KvqDequant8Bf16(kq, vreg[j]) : vreg[j];
    }
    __syncthreads();
    if (kv0 + kKvTile < kv_end) load_tile(kv0 + kKvTile);

    // S = Q K^T for the warp's 16 rows.
    {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> sf[kKvTile / 16];
#pragma unroll
      for (int n = 0; n < kKvTile / 16; ++n) wmma::fill_fragment(sf[n], 0.f);
#pragma unroll
      for (int k0 = 0; k0 < D; k0 += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> qf;
        wmma::load_matrix_sync(qf, &sm.q[warp * 16][k0], D + 8);
#pragma unroll
        for (int n = 0; n < kKvTile / 16; ++n) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> kf;
          wmma::load_matrix_sync(kf, &sm.k[n * 16][k0], D + 8);
          wmma::mma_sync(sf[n], qf, kf, sf[n]);
        }
      }
#pragma unroll
      for (int n = 0; n < kKvTile / 16; ++n) {
        wmma::store_matrix_sync(&sm.s[warp][0][n * 16], sf[n], kSLd, wmma::mem_row_major);
      }
    }
    __syncwarp();

    // Online softmax: lanes 2r and 2r+1 share row r (alternate columns: fewer bank conflicts).
    {
      float x[kKvTile / 2];
      float mx = -INFINITY;
#pragma unroll
      for (int j = 0; j < kKvTile / 2; ++j) {
        const int col = 2 * j + half;
        x[j] = kv0 + col <= my_pos ? sm.s[warp][lr][col] * scale2 : -INFINITY;
        mx = fmaxf(mx, x[j]);
      }
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      // Key 0 is visible to every row, so m is finite from the first tile on.
      const float m_new = fmaxf(m, mx);
      const float c = exp2f(m - m_new);
      float sum = 0.f;
#pragma unroll
      for (int j = 0; j < kKvTile / 2; ++j) {
        const float p = exp2f(x[j] - m_new);
        sum += p;
        sm.p[warp][lr][2 * j + half] = __float2bfloat16_rn(p);
      }
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      l = l * c + sum;
      m = m_new;
      for (int d = half; d < D; d += 2) sm.o[warp][lr][d] *= c;
    }
    __syncwarp();

    // O += P V.
#pragma unroll
    for (int n0 = 0; n0 < D; n0 += 16) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> of;
      wmma::load_matrix_sync(of, &sm.o[warp][0][n0], D + 4, wmma::mem_row_major);
#pragma unroll
      for (int k0 = 0; k0 < kKvTile; k0 += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> pf;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major> vf;
        wmma::load_matrix_sync(pf, &sm.p[warp][0][k0], kPLd);
        wmma::load_matrix_sync(vf, &sm.v[k0][n0], D + 8);
        wmma::mma_sync(of, pf, vf, of);
      }
      wmma::store_matrix_sync(&sm.o[warp][0][n0], of, D + 4, wmma::mem_row_major);
    }
    __syncwarp();
  }

  if (my_tok < q_len) {
    const float inv = 1.0f / l;
    __nv_bfloat16* dst = static_cast<__nv_bfloat16*>(a.out) + (q0 + my_tok) * a.out_ld +
                         (kvh * group + row % group) * D;
    for (int d = half * (D / 2); d < (half + 1) * (D / 2); d += 2) {
      *reinterpret_cast<__nv_bfloat162*>(dst + d) =
          __floats2bfloat162_rn(sm.o[warp][lr][d] * inv, sm.o[warp][lr][d + 1] * inv);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// The bf16 flash kernel (FlashAttention-2's scheme, Dao 2023, on mma.sync): a CTA of 8 warps
// takes kPrefillRowsBf16 = 128 rows (query token x group head, as above) of one sequence and one
// KV head, warp w rows [16 w, 16 w + 16). K/V tiles of 64 keys stream global -> shared by
// cp.async (2 stages: tile j + 1 lands while tile j is consumed), gathered through the block
// table. Per tile and warp: S = Q K^T (mma.sync m16n8k16, bf16 in, fp32 accumulators; Q and K
// fragments by ldmatrix), the online softmax on the accumulators (row max / sum in registers, a
// row spread over the 4 lanes of a quad; scores in log2 units, exp2 on the SFU), P packed to
// bf16 straight from the accumulators as the A operand of O += P V (V fragments by
// ldmatrix.trans), O in registers all along. Causal: a warp skips tiles past its last row's
// position and masks only tiles that reach past its first row's; a CTA stops at its last row's
// position. Shared memory rows are 16-byte chunks XOR-swizzled by (row % 8), so the 8 rows an
// ldmatrix phase reads fall in distinct banks. Tiles are launched longest first (the last tiles
// of a causal prompt carry the most keys).

constexpr int kFlashRows = kPrefillRowsBf16;
constexpr int kFlashStages = 2;
// The one configuration instantiated: 1 m-tile of 16 rows per warp (8 warps), 64-key tiles, two
// CTAs per SM (128 registers, ~100 bytes of spill). Measured alternatives (H200, 2026-12-01,
// attention_bench --prefill, 1 x 4096 causal, docs/data/2026-12-01-h200-flashprefill-run3-*):
// this 246 TFLOP/s; one CTA per SM (194 registers, no spill) 214; 2 m-tiles per warp (4 warps,
// FlashAttention-2's layout, 255 registers) 237; 32-key tiles 236. One CTA per SM wins only
// where the grid is below one CTA per SM (1 x 512: 82 against 70 TFLOP/s).
constexpr int kFlashMTiles = 1;
constexpr int kFlashKv = 64;
constexpr int kFlashMinBlocks = 2;
constexpr int kMergeThreads = 256;

template <int D, int kKv>
constexpr size_t FlashSmemBytes() {
  return sizeof(__nv_bfloat16) * D * (kFlashRows + 2 * kFlashStages * kKv);
}

// Grid (num_kv_heads, num_tiles, num_splits). kMT: m-tiles of 16 rows per warp (1: 8 warps of 16
// rows; 2: 4 warps of 32 rows, each K/V fragment feeding two mma); kKv: keys per tile;
// kMinBlocks: CTAs per SM the registers are capped for. kSplit: write fp32 partials (split-KV)
// instead of out.
template <int D, int kMT, int kKv, int kMinBlocks, bool kSplit>
__global__ void __launch_bounds__(kFlashRows * 2 / kMT, kMinBlocks)
    FlashPrefillKernel(const PagedAttentionArgs a, const PrefillSchedule sch) {
  constexpr int kThreadsT = kFlashRows * 2 / kMT;
  constexpr int kWarpRows = 16 * kMT;
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  constexpr int kNT = kKv / 8;  // 8-key n-tiles of S
  extern __shared__ __align__(128) unsigned char smem_raw[];
  __nv_bfloat16* sq = reinterpret_cast<__nv_bfloat16*>(smem_raw);
  __nv_bfloat16* skv = sq + kFlashRows * D;  // stage s: K at skv + 2 s tile, V after it
  constexpr int kTileElems = kKv * D;

  const int group = a.num_heads / a.num_kv_heads;
  const int tq = kFlashRows / group;
  const int kvh = blockIdx.x;
  const int tile = gridDim.y - 1 - blockIdx.y;
  int seq, tok0;
  if (!FindTile(a, sch, tile, tq, &seq, &tok0)) return;  // uniform over the CTA
  const int q0 = a.query_start[seq];
  const int q_len = a.query_start[seq + 1] - q0;
  const int ctx = a.seq_lens[seq] - q_len;  // cached keys before the first query row
  const int32_t* table = a.block_tables + static_cast<int64_t>(seq) * a.max_blocks_per_seq;
  const int last_tok = min(tok0 + tq, q_len) - 1;
  const int kv_end = ctx + last_tok + 1;  // keys any row of the CTA attends to
  int t_begin = 0, t_end = (kv_end + kKv - 1) / kKv;  // key tiles of this CTA
  if (kSplit) {
    const int per = (t_end + gridDim.z - 1) / gridDim.z;
    t_begin = min(t_end, static_cast<int>(blockIdx.z) * per);
    t_end = min(t_end, t_begin + per);
  }

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const __nv_bfloat16* qg = static_cast<const __nv_bfloat16*>(a.q);
  // Q rows: row r is query token tok0 + r / group, head kvh * group + r % group (zeros past q_len).
  for (int idx = tid; idx < kFlashRows * kChunks; idx += kThreadsT) {
    const int r = idx / kChunks, c = idx % kChunks;
    const int i = tok0 + r / group;
    const bool valid = i < q_len;
    CpAsync16(sq + Swz<D>(r, c), valid ? qg + (q0 + i) * a.q_ld + (kvh * group + r % group) * D + c * 8 : qg, valid);
  }
  CpAsyncCommit();

  const __nv_bfloat16* kc = static_cast<const __nv_bfloat16*>(a.k_cache) + kvh * D;
  const __nv_bfloat16* vc = static_cast<const __nv_bfloat16*>(a.v_cache) + kvh * D;
  auto issue_tile = [&](int kt) {
    __nv_bfloat16* sk = skv + (kt % kFlashStages) * 2 * kTileElems;
    __nv_bfloat16* sv = sk + kTileElems;
#pragma unroll
    for (int j = 0; j < kKv * kChunks / kThreadsT; ++j) {
      const int idx = tid + j * kThreadsT;
      const int r = idx / kChunks, c = idx % kChunks;
      const int t = kt * kKv + r;
      const bool valid = t < kv_end;  // zeros past it (masked, and 0 x V must not be NaN)
      int64_t slot = 0;
      if (valid) slot = static_cast<int64_t>(table[t / a.block_size]) * a.block_size + t % a.block_size;
      CpAsync16(sk + Swz<D>(r, c), kc + slot * a.k_ld + c * 8, valid);
      CpAsync16(sv + Swz<D>(r, c), vc + slot * a.v_ld + c * 8, valid);
    }
  };

  // This lane's rows: g and g + 8 of each of the warp's m-tiles (accumulator layout: lane = 4 g + t).
  const int g = lane / 4, t4 = lane % 4;
  const int wrow = warp * kWarpRows;
  // Padding rows (past q_len) take the last row's position; their output is never written.
  int pos[kMT][2];
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
    pos[mt][0] = ctx + min(tok0 + (wrow + mt * 16 + g) / group, q_len - 1);
    pos[mt][1] = ctx + min(tok0 + (wrow + mt * 16 + g + 8) / group, q_len - 1);
  }
  const int warp_first = ctx + min(tok0 + wrow / group, q_len - 1);
  const int warp_last = ctx + min(tok0 + (wrow + kWarpRows - 1) / group, q_len - 1);
  const bool warp_live = tok0 + wrow / group < q_len;
  const float scale2 = a.scale * 1.4426950408889634f;  // scores to log2 units

  // ldmatrix addresses (mma.cuh SwzLdsmOffsets): four per-lane offsets per operand, the rest
  // compile-time immediates; this warp's Q rows start at row wrow.
  uint32_t q_off[4], k_off[4], v_off[4];
  SwzLdsmOffsets<D>(lane, SmemAddr(sq) + wrow * D * 2, q_off, k_off, v_off);

  float o[kMT][D / 8][4];
  float m[kMT][2], l[kMT][2];  // raw-score row max; this lane's part of the row sum
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int n = 0; n < D / 8; ++n) o[mt][n][0] = o[mt][n][1] = o[mt][n][2] = o[mt][n][3] = 0.f;
    m[mt][0] = m[mt][1] = -INFINITY;
    l[mt][0] = l[mt][1] = 0.f;
  }

  if (t_begin < t_end) issue_tile(t_begin);
  CpAsyncCommit();
  for (int kt = t_begin; kt < t_end; ++kt) {
    CpAsyncWait<0>();  // Q and tile kt have landed (this thread's copies)
    // Everyone's copies are visible, and every warp is done with tile kt - 1, whose stage tile
    // kt + 1 now overwrites while tile kt is consumed (one barrier per tile).
    __syncthreads();
    if (kt + 1 < t_end) issue_tile(kt + 1);
    CpAsyncCommit();
    const int kv0 = kt * kKv;
    if (warp_live && kv0 <= warp_last) {
      const uint32_t sk = SmemAddr(skv) + (kt % kFlashStages) * 2 * kTileElems * 2;
      const uint32_t sv = sk + kTileElems * 2;
      float s[kMT][kNT][4];
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
        for (int n = 0; n < kNT; ++n) s[mt][n][0] = s[mt][n][1] = s[mt][n][2] = s[mt][n][3] = 0.f;
      }
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        uint32_t qa[kMT][4];
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) Ldsm4(qa[mt], q_off[kk & 3] + 32 * (kk & 4) + mt * 16 * D * 2);
#pragma unroll
        for (int np = 0; np < kNT / 2; ++np) {
          uint32_t kb[4];
          Ldsm4(kb, sk + k_off[kk & 3] + 32 * (kk & 4) + np * 16 * D * 2);
#pragma unroll
          for (int mt = 0; mt < kMT; ++mt) {
            Mma(s[mt][2 * np], qa[mt], kb[0], kb[1]);
            Mma(s[mt][2 * np + 1], qa[mt], kb[2], kb[3]);
          }
        }
      }
      const bool diag = kv0 + kKv - 1 > warp_first;  // keys past some row's position
      uint32_t pa[kMT][kKv / 16][4];  // P as the A operand of P V, k-step by k-step
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        if (diag) {
#pragma unroll
          for (int n = 0; n < kNT; ++n) {
            const int key = kv0 + n * 8 + 2 * t4;
            if (key > pos[mt][0]) s[mt][n][0] = -INFINITY;
            if (key + 1 > pos[mt][0]) s[mt][n][1] = -INFINITY;
            if (key > pos[mt][1]) s[mt][n][2] = -INFINITY;
            if (key + 1 > pos[mt][1]) s[mt][n][3] = -INFINITY;
          }
        }
        float mx0 = m[mt][0], mx1 = m[mt][1];
#pragma unroll
        for (int n = 0; n < kNT; ++n) {
          mx0 = fmaxf(mx0, fmaxf(s[mt][n][0], s[mt][n][1]));
          mx1 = fmaxf(mx1, fmaxf(s[mt][n][2], s[mt][n][3]));
        }
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
        // A row with no key so far (split-KV) keeps max -inf: refer to 0 so p and c are 0, not NaN.
        const float ref0 = mx0 == -INFINITY ? 0.f : mx0 * scale2;
        const float ref1 = mx1 == -INFINITY ? 0.f : mx1 * scale2;
        const float c0 = Exp2Approx(m[mt][0] * scale2 - ref0), c1 = Exp2Approx(m[mt][1] * scale2 - ref1);
        m[mt][0] = mx0;
        m[mt][1] = mx1;
        float sum0 = 0.f, sum1 = 0.f;
#pragma unroll
        for (int n = 0; n < kNT; ++n) {
          const float p0 = Exp2Approx(fmaf(s[mt][n][0], scale2, -ref0));
          const float p1 = Exp2Approx(fmaf(s[mt][n][1], scale2, -ref0));
          const float p2 = Exp2Approx(fmaf(s[mt][n][2], scale2, -ref1));
          const float p3 = Exp2Approx(fmaf(s[mt][n][3], scale2, -ref1));
          sum0 += p0 + p1;
          sum1 += p2 + p3;
          pa[mt][n / 2][(n % 2) * 2] = PackBf16(p0, p1);
          pa[mt][n / 2][(n % 2) * 2 + 1] = PackBf16(p2, p3);
        }
        l[mt][0] = l[mt][0] * c0 + sum0;
        l[mt][1] = l[mt][1] * c1 + sum1;
#pragma unroll
        for (int n = 0; n < D / 8; ++n) {
          o[mt][n][0] *= c0;
          o[mt][n][1] *= c0;
          o[mt][n][2] *= c1;
          o[mt][n][3] *= c1;
        }
      }
#pragma unroll
      for (int kk = 0; kk < kKv / 16; ++kk) {
#pragma unroll
        for (int dp = 0; dp < D / 16; ++dp) {
          uint32_t vb[4];
          Ldsm4T(vb, sv + v_off[dp & 3] + 32 * (dp & 4) + kk * 16 * D * 2);
#pragma unroll
          for (int mt = 0; mt < kMT; ++mt) {
            Mma(o[mt][2 * dp], pa[mt][kk], vb[0], vb[1]);
            Mma(o[mt][2 * dp + 1], pa[mt][kk], vb[2], vb[3]);
          }
        }
      }
    }
  }
  CpAsyncWait<0>();

  if (!warp_live) return;
  __nv_bfloat16* out = static_cast<__nv_bfloat16*>(a.out);
  // Partial p = (tile, KV head, split): rows [128 p, 128 p + 128) of partial_out / partial_lse.
  const int64_t p = (static_cast<int64_t>(tile) * gridDim.x + kvh) * gridDim.z + blockIdx.z;
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {  // rows g and g + 8 of the m-tile
      float lsum = l[mt][h];
      lsum += __shfl_xor_sync(0xffffffffu, lsum, 1);
      lsum += __shfl_xor_sync(0xffffffffu, lsum, 2);
      const float inv = lsum > 0.f ? 1.0f / lsum : 0.f;
      const int row = wrow + mt * 16 + g + 8 * h;
      if (kSplit) {
        float* po = sch.partial_out + (p * kFlashRows + row) * D;
#pragma unroll
        for (int n = 0; n < D / 8; ++n) {
          *reinterpret_cast<float2*>(po + n * 8 + 2 * t4) =
              make_float2(o[mt][n][2 * h] * inv, o[mt][n][2 * h + 1] * inv);
        }
        if (t4 == 0) {
          sch.partial_lse[p * kFlashRows + row] = lsum > 0.f ? m[mt][h] * scale2 + log2f(lsum) : -INFINITY;
        }
      } else {
        const int tok = tok0 + row / group;
        if (tok < q_len) {
          __nv_bfloat16* dst = out + (q0 + tok) * a.out_ld + (kvh * group + row % group) * D + 2 * t4;
#pragma unroll
          for (int n = 0; n < D / 8; ++n) {
            *reinterpret_cast<uint32_t*>(dst + n * 8) = PackBf16(o[mt][n][2 * h] * inv, o[mt][n][2 * h + 1] * inv);
          }
        }
      }
    }
  }
}

// Split-KV merge: a CTA per (KV head, tile) as the partial kernel's grid (in tile order), a warp
// per row (MergeSplitChunks over the num_splits partials), rows of padding tokens skipped.
__global__ void __launch_bounds__(kMergeThreads)
    FlashMergeKernel(const PagedAttentionArgs a, const PrefillSchedule sch) {
  const int group = a.num_heads / a.num_kv_heads;
  const int tq = kFlashRows / group;
  const int kvh = blockIdx.x, tile = blockIdx.y, d = a.head_dim;
  int seq, tok0;
  if (!FindTile(a, sch, tile, tq, &seq, &tok0)) return;
  const int q0 = a.query_start[seq];
  const int q_len = a.query_start[seq + 1] - q0;
  const int64_t p = (static_cast<int64_t>(tile) * gridDim.x + kvh) * sch.num_splits;
  for (int row = threadIdx.x / 32; row < kFlashRows; row += kMergeThreads / 32) {
    const int tok = tok0 + row / group;
    if (tok >= q_len) break;  // rows are in token order
    MergeSplitChunks(sch.partial_lse + p * kFlashRows + row, kFlashRows, sch.partial_out + (p * kFlashRows + row) * d,
                     static_cast<int64_t>(kFlashRows) * d, sch.num_splits, d,
                     static_cast<__nv_bfloat16*>(a.out) + (q0 + tok) * a.out_ld + (kvh * group + row % group) * d);
  }
}

// Sets the kernel's dynamic shared memory limit once per process (a worker drives one device).
template <typename Kernel>
cudaError_t AllowSmem(Kernel* kernel, size_t bytes, bool* done) {
  if (*done) return cudaSuccess;
  const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  if (e == cudaSuccess) *done = true;
  return e;
}

template <int D, int kMT, int kKv, int kMinB>
cudaError_t LaunchFlashMt(const PagedAttentionArgs& a, const PrefillSchedule& s, cudaStream_t stream) {
  constexpr size_t smem = FlashSmemBytes<D, kKv>();
  constexpr int threads = kFlashRows * 2 / kMT;
  const dim3 grid(static_cast<unsigned>(a.num_kv_heads), static_cast<unsigned>(s.num_tiles),
                  static_cast<unsigned>(s.num_splits));
  if (s.num_splits == 1) {
    static bool done = false;
    if (const cudaError_t e = AllowSmem(FlashPrefillKernel<D, kMT, kKv, kMinB, false>, smem, &done); e != cudaSuccess) return e;
    FlashPrefillKernel<D, kMT, kKv, kMinB, false><<<grid, threads, smem, stream>>>(a, s);
    return cudaGetLastError();
  }
  static bool done = false;
  if (const cudaError_t e = AllowSmem(FlashPrefillKernel<D, kMT, kKv, kMinB, true>, smem, &done); e != cudaSuccess) return e;
  FlashPrefillKernel<D, kMT, kKv, kMinB, true><<<grid, threads, smem, stream>>>(a, s);
  FlashMergeKernel<<<dim3(grid.x, grid.y), kMergeThreads, 0, stream>>>(a, s);
  return cudaGetLastError();
}

template <int D>
cudaError_t LaunchFlash(const PagedAttentionArgs& a, const PrefillSchedule& s, cudaStream_t stream) {
  return LaunchFlashMt<D, kFlashMTiles, kFlashKv, kFlashMinBlocks>(a, s, stream);
}

template <int D>
cudaError_t LaunchQuant(const PagedAttentionArgs& a, const PrefillSchedule& s, cudaStream_t stream) {
  static bool done = false;
  if (const cudaError_t e = AllowSmem(QuantPrefillKernel<D>, sizeof(Smem<D>), &done); e != cudaSuccess) return e;
  const dim3 grid(static_cast<unsigned>(s.num_tiles), static_cast<unsigned>(a.num_kv_heads));
  QuantPrefillKernel<D><<<grid, kThreads, sizeof(Smem<D>), stream>>>(a, s);
  return cudaGetLastError();
}

}  // namespace

cudaError_t LaunchPrefillAttention(const PagedAttentionArgs& a, const PrefillSchedule& s,
                                   cudaStream_t stream) {
  const bool quant = a.kv_quant != KvQuant::kNone;
  if ((a.head_dim != 64 && a.head_dim != 128) || a.num_kv_heads <= 0 || a.num_heads % a.num_kv_heads != 0 ||
      PrefillTileRows(a.kv_quant) % (a.num_heads / a.num_kv_heads) != 0 || a.block_size <= 0 || s.num_tiles < 0 ||
      s.num_tiles > 65535 || s.num_splits < 1 || s.num_splits > 65535) {
    return cudaErrorInvalidValue;
  }
  if (s.num_splits > 1 &&
      (quant || s.partial_out == nullptr || s.partial_lse == nullptr ||
       static_cast<int64_t>(s.num_tiles) * a.num_kv_heads * s.num_splits > s.max_split_ctas)) {
    return cudaErrorInvalidValue;
  }
  if (!Aligned16(a.q) || !Aligned16(a.out) || !Aligned16(a.k_cache) || !Aligned16(a.v_cache) ||
      a.q_ld % 8 != 0 || a.out_ld % 8 != 0 || a.k_ld % 8 != 0 || a.v_ld % 8 != 0) {
    return cudaErrorInvalidValue;
  }
  if (quant &&
      (!KvqSideReadable(a.kv_quant, a.k_q, a.block_size) || !KvqSideReadable(a.kv_quant, a.v_q, a.block_size))) {
    return cudaErrorInvalidValue;
  }
  if (s.num_tiles == 0) return cudaSuccess;
  if (quant) return a.head_dim == 64 ? LaunchQuant<64>(a, s, stream) : LaunchQuant<128>(a, s, stream);
  return a.head_dim == 64 ? LaunchFlash<64>(a, s, stream) : LaunchFlash<128>(a, s, stream);
}

}  // namespace lorc::kernels
