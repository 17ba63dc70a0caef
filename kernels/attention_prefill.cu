// Paged prefill attention (flash-attention style, causal, variable lengths in one launch); see
// attention_paged.cuh.
//
// A CTA of 4 warps takes kPrefillRows = 64 rows of one sequence and one KV head, a row being a
// (query token, query head of the group) pair, so the K/V tiles it reads serve the whole group.
// Per KV tile of 64 keys (gathered from the paged cache into shared memory): S = Q K^T on the
// tensor cores (WMMA bf16 16x16x16, fp32 accumulate), an online softmax per row in fp32 (two
// lanes per row), P rounded to bf16, O += P V on the tensor cores with O kept in shared memory
// (WMMA accumulator layouts are opaque, so the per-row rescale goes through shared memory).
// TODO(perf): mma.sync with O and P in registers, cp.async multi-stage K/V, 128-row tiles,
// skipping a warp's fully masked tiles (measured: see kernels/README.md).
#include <cuda_bf16.h>
#include <mma.h>

#include <cmath>

#include "kernels/attention_paged.cuh"
#include "kernels/elem_type.cuh"
#include "kernels/kv_quant.cuh"

namespace lorc::kernels {
namespace {

namespace wmma = nvcuda::wmma;

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kRows = kPrefillRows;  // 16 per warp
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

// kQuant: a quantized cache (a.kv_quant, switched at run time) or bf16, instantiated apart so
// that the bf16 kernel carries none of the dequantization (attention_decode.cu says why).
template <int D, bool kQuant>
__global__ void __launch_bounds__(kThreads) PrefillKernel(const PagedAttentionArgs a, const PrefillSchedule sch) {
  const KvQuant kq = kQuant ? a.kv_quant : KvQuant::kNone;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  Smem<D>& sm = *reinterpret_cast<Smem<D>*>(smem_raw);
  const int group = a.num_heads / a.num_kv_heads;
  const int tq = kRows / group;  // query tokens per CTA
  const int kvh = blockIdx.y;

  // Find this CTA's (sequence, first query token) by walking the prefill list.
  int tile = blockIdx.x, seq = -1, tok0 = 0;
  const int num_prefills = *sch.num_prefills;
  for (int i = 0; i < num_prefills; ++i) {
    const int s = sch.prefill_seqs[i];
    const int n = (a.query_start[s + 1] - a.query_start[s] + tq - 1) / tq;
    if (tile < n) {
      seq = s;
      tok0 = tile * tq;
      break;
    }
    tile -= n;
  }
  if (seq < 0) return;  // uniform over the CTA
  const int q0 = a.query_start[seq];
  const int q_len = a.query_start[seq + 1] - q0;
  const int ctx = a.seq_lens[seq] - q_len;  // cached keys before the first query row
  const int32_t* table = a.block_tables + static_cast<int64_t>(seq) * a.max_blocks_per_seq;
  const __nv_bfloat16* kc = static_cast<const __nv_bfloat16*>(a.k_cache) + kvh * D;
  const __nv_bfloat16* vc = static_cast<const __nv_bfloat16*>(a.v_cache) + kvh * D;
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
        if (kq == KvQuant::kNone) {
          const int64_t slot = block * a.block_size + t % a.block_size;
          kreg[j] = __ldg(reinterpret_cast<const uint4*>(kc + slot * a.k_ld + c * 8));
          vreg[j] = __ldg(reinterpret_cast<const uint4*>(vc + slot * a.v_ld + c * 8));
        } else {  // codes + scale now, dequantized to bf16 when stored to shared memory
          kreg[j] = KvqLoad8(kq, static_cast<const uint8_t*>(a.k_cache), a.k_q, block, t % a.block_size,
                             kvh, c * 8);
          vreg[j] = KvqLoad8(kq, static_cast<const uint8_t*>(a.v_cache), a.v_q, block, t % a.block_size,
                             kvh, c * 8);
        }
      }
    }
  };
  load_tile(0);
  for (int kv0 = 0; kv0 < kv_end; kv0 += kKvTile) {
    __syncthreads();  // the previous tile's K/V are consumed (and Q is stored, first time)
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      const int idx = threadIdx.x + j * kThreads;
      const bool dq = kq != KvQuant::kNone && kv0 + idx / kChunks < kv_end;
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

template <int D, bool kQuant>
cudaError_t LaunchKernel(const PagedAttentionArgs& a, const PrefillSchedule& s, cudaStream_t stream) {
  const size_t smem = sizeof(Smem<D>);
  // Once per instantiation and process (a worker process drives one device; not a stream op).
  static bool attribute_set = false;
  if (!attribute_set) {
    const cudaError_t e = cudaFuncSetAttribute(PrefillKernel<D, kQuant>,
                                               cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (e != cudaSuccess) return e;
    attribute_set = true;
  }
  const dim3 grid(static_cast<unsigned>(s.num_tiles), static_cast<unsigned>(a.num_kv_heads));
  PrefillKernel<D, kQuant><<<grid, kThreads, smem, stream>>>(a, s);
  return cudaGetLastError();
}

template <int D>
cudaError_t Launch(const PagedAttentionArgs& a, const PrefillSchedule& s, cudaStream_t stream) {
  return a.kv_quant == KvQuant::kNone ? LaunchKernel<D, false>(a, s, stream) : LaunchKernel<D, true>(a, s, stream);
}

}  // namespace

cudaError_t LaunchPrefillAttention(const PagedAttentionArgs& a, const PrefillSchedule& s,
                                   cudaStream_t stream) {
  if ((a.head_dim != 64 && a.head_dim != 128) || a.num_kv_heads <= 0 ||
      a.num_heads % a.num_kv_heads != 0 || kPrefillRows % (a.num_heads / a.num_kv_heads) != 0 ||
      a.block_size <= 0 || s.num_tiles < 0) {
    return cudaErrorInvalidValue;
  }
  if (!Aligned16(a.q) || !Aligned16(a.out) || !Aligned16(a.k_cache) || !Aligned16(a.v_cache) ||
      a.q_ld % 8 != 0 || a.out_ld % 8 != 0 || a.k_ld % 8 != 0 || a.v_ld % 8 != 0) {
    return cudaErrorInvalidValue;
  }
  if (a.kv_quant != KvQuant::kNone &&
      (!KvqSideReadable(a.kv_quant, a.k_q, a.block_size) || !KvqSideReadable(a.kv_quant, a.v_q, a.block_size))) {
    return cudaErrorInvalidValue;
  }
  if (s.num_tiles == 0) return cudaSuccess;
  return a.head_dim == 64 ? Launch<64>(a, s, stream) : Launch<128>(a, s, stream);
}

}  // namespace lorc::kernels
