// Fused LoRC latent attention (see attention_latent.cuh). One kernel body serves decode and
// prefill: a CTA of 8 warps takes one item (a sequence's key range for up to 16 (query token,
// query head) rows of one KV head) and B_K of its KV head (staged once in shared memory).
// Each warp streams its own 16-token key tiles (cp.async, two stages, slots looked up one tile
// ahead, no block barriers inside the loop) and per tile, all with mma.sync m16n8k16 (bf16 in,
// fp32 accumulate), in two halves of 64 key columns ({32h..32h+31} and their RoPE partners
// {64+32h..}: 32 accumulator registers instead of 64, so two CTAs fit an SM):
//   K [16 x 64] = C_K [16 x r_k] B_K^T         (key reconstruction, fp32 in registers)
//   RoPE on K in registers (pairs i, i + 64 sit in the same thread)
//   S^T [16 rows x 16 tokens] += Q K^T          (K's accumulators repacked as bf16 B fragments)
//   online softmax per row (fp32, base 2), P rounded to bf16
//   O [16 x r_v] += P C_V                      (value latents; B_V is folded into o_proj)
// At the end of an item the warps' (m, l, O) are combined through shared memory. Decode items
// come from the split-KV schedule of PlanAttention; split items write fp32 partials that a
// merge kernel combines by their log-sum-exp. Decode of groups <= 8 (every GQA model we serve)
// runs a transposed variant of this body (attention_latent_decode.cu); ProcessItem serves
// prefill and decode of group 16. Shared pieces: attention_latent_common.cuh.
#include <cuda_bf16.h>

#include <cmath>

#include "kernels/attention_latent_common.cuh"
#include "kernels/attention_merge.cuh"
#include "kernels/elem_type.cuh"

namespace lorc::kernels {
namespace {

using namespace latent_internal;  // NOLINT: the kernels' internal helpers

// VT: n-tiles (8 columns each) of the value latents held in registers, >= rvp / 8.
template <int VT>
__device__ void ProcessItem(const LatentAttentionArgs& a, const Layout& L, const Smem& sm, const Item& it,
                            float* partial_out, float* partial_lse) {
  const int kvh = blockIdx.y;
  const int group = a.num_heads / a.num_kv_heads;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int row0 = a.query_start[it.seq];
  const int q_len = a.query_start[it.seq + 1] - row0;
  const int ctx = a.seq_lens[it.seq] - q_len;
  const int rows = it.num_tokens * group;
  const int rk = a.k_rank;
  __nv_bfloat16* region = sm.regions + warp * L.region_elems;

  // Q rows: row r is query token q_first + r / group, head kvh * group + r % group.
  for (int idx = threadIdx.x; idx < kLatentRows * (kD / 8); idx += kThreads) {
    const int r = idx / (kD / 8), c = idx % (kD / 8);
    uint4 val = make_uint4(0, 0, 0, 0);
    if (r < rows) {
      val = *reinterpret_cast<const uint4*>(static_cast<const __nv_bfloat16*>(a.q) +
                                            (row0 + it.q_first + r / group) * a.q_ld +
                                            (kvh * group + r % group) * kD + c * 8);
    }
    *reinterpret_cast<uint4*>(sm.q + r * kQLd + c * 8) = val;
  }
  // C_K columns [rk, rkp) feed the reconstruction's last k-step: zero in both stages (the region
  // held the previous item's fp32 state).
  if (rk != L.rkp) {
    const int s = lane / kTile, r = lane % kTile;  // 32 lanes = 2 stages x 16 rows
    *reinterpret_cast<uint4*>(region + s * L.stage_elems + r * L.ldk + rk) = make_uint4(0, 0, 0, 0);
  }
  __syncthreads();

  // Causal limit of this thread's rows g and g + 8 (padding rows see every key; never written).
  int lim[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = g + 8 * r;
    lim[r] = row < rows ? ctx + it.q_first + row / group : it.kv_end - 1;
  }
  const float qscale = a.scale * kLog2e;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  float o[VT][4];
#pragma unroll
  for (int n = 0; n < VT; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;

  const TileLoader ld(a, L, it, region, lane);
  constexpr int kStep = kWarps * kTile;
  const int first = it.kv_start + warp * kTile;
  if (first < it.kv_end) ld.Issue(0, ld.SlotOf(first));
  CpAsyncCommit();
  int64_t next_slot = ld.SlotOf(first + kStep);  // looked up one tile ahead of its issue
  int stage = 0;
  for (int base = first; base < it.kv_end; base += kStep) {  // uniform over the warp
    if (base + kStep < it.kv_end) ld.Issue(stage ^ 1, next_slot);
    CpAsyncCommit();
    next_slot = ld.SlotOf(base + 2 * kStep);
    CpAsyncWait<1>();
    __syncwarp();
    const __nv_bfloat16* ck = region + stage * L.stage_elems;
    const __nv_bfloat16* cv = ck + kTile * L.ldk;

    float sacc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
    // Keys in two halves of columns, {32h .. 32h+31} and their RoPE partners {64+32h ..}: acc[j]
    // (j < 4) is n-tile 4h + j (columns 8(4h+j) + 2t + {0,1}, rows g and g + 8), acc[j + 4] its
    // partner 64 columns on.
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float acc[8][4];
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
      for (int k0 = 0; k0 < L.rkp; k0 += 16) {  // K = C_K B_K^T
        uint32_t af[4];
        Ldsm4(af, ck + (lane % 16) * L.ldk + k0 + (lane / 16) * 8);
#pragma unroll
        for (int j = 0; j < 8; j += 2) {
          const int n = (j < 4 ? 4 * h : 8 + 4 * h) + (j % 4);
          uint32_t bf[4];
          Ldsm4(bf, sm.bk + (n * 8 + (lane & 7) + ((lane >> 4) << 3)) * L.ldk + k0 + ((lane >> 3) & 1) * 8);
          Mma(acc[j], af, bf[0], bf[1]);
          Mma(acc[j + 1], af, bf[2], bf[3]);
        }
      }
      RotateKeyHalf<false>(acc, sm, h, base + g, base + g + 8, t);  // RoPE at each token's position
      // S^T += Q K^T over this half's 64 columns: k-steps 2h, 2h + 1 (acc[0..3]) and 4 + 2h,
      // 5 + 2h (acc[4..7]); K's accumulators are the B fragments (tokens 0-7: rows g, 8-15: g + 8).
#pragma unroll
      for (int s = 0; s < 4; ++s) {
        const int kk = (s < 2 ? 2 * h : 4 + 2 * h) + (s % 2);
        uint32_t qf[4];
        Ldsm4(qf, sm.q + (lane % 16) * kQLd + kk * 16 + (lane / 16) * 8);
        const int j = 2 * s;
        Mma(sacc[0], qf, PackBf16(acc[j][0], acc[j][1]), PackBf16(acc[j + 1][0], acc[j + 1][1]));
        Mma(sacc[1], qf, PackBf16(acc[j][2], acc[j][3]), PackBf16(acc[j + 1][2], acc[j + 1][3]));
      }
    }
    // Online softmax per row; the quad (t = 0..3) shares a row.
    uint32_t pa[4];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float x[2][2], mx = -INFINITY;
#pragma unroll
      for (int j = 0; j < 2; ++j) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int tok = base + 8 * j + 2 * t + e;
          x[j][e] = (tok <= lim[r] && tok < it.kv_end) ? sacc[j][2 * r + e] * qscale : -INFINITY;
          mx = fmaxf(mx, x[j][e]);
        }
      }
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m[r], mx);
      const float m_ref = m_new == -INFINITY ? 0.f : m_new;  // no visible key yet: p = c = 0
      const float c = exp2f(m[r] - m_ref);
      float p[2][2];
#pragma unroll
      for (int j = 0; j < 2; ++j) {
#pragma unroll
        for (int e = 0; e < 2; ++e) p[j][e] = exp2f(x[j][e] - m_ref);
      }
      l[r] = l[r] * c + (p[0][0] + p[0][1] + p[1][0] + p[1][1]);
      m[r] = m_new;
#pragma unroll
      for (int n = 0; n < VT; ++n) {
        o[n][2 * r] *= c;
        o[n][2 * r + 1] *= c;
      }
      pa[r] = PackBf16(p[0][0], p[0][1]);      // row g + 8r, tokens 2t, 2t + 1
      pa[2 + r] = PackBf16(p[1][0], p[1][1]);  // tokens 8 + 2t, 8 + 2t + 1
    }
    // O += P C_V over the value latents' n-tiles.
#pragma unroll
    for (int n = 0; n < VT; n += 2) {
      if (n * 8 < L.rvp) {
        uint32_t bf[4];
        Ldsm4T(bf, cv + ((lane & 7) + ((lane >> 3) & 1) * 8) * L.ldv + n * 8 + (lane >> 4) * 8);
        Mma(o[n], pa, bf[0], bf[1]);
        Mma(o[n + 1], pa, bf[2], bf[3]);
      }
    }
    __syncwarp();  // this stage is refilled by the next iteration's issue
    stage ^= 1;
  }
  CpAsyncWait<0>();

  // The warp's state into its region (fp32), then all warps combined per (row, column).
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
  }
  __syncwarp();
  float* wm = reinterpret_cast<float*>(region);
  float* wl = wm + kLatentRows;
  float* wo = wl + kLatentRows;
  if (t == 0) {
    wm[g] = m[0], wm[g + 8] = m[1];
    wl[g] = l[0], wl[g + 8] = l[1];
  }
#pragma unroll
  for (int n = 0; n < VT; ++n) {
    if (n * 8 < L.rvp) {
      *reinterpret_cast<float2*>(wo + g * L.ldo + n * 8 + 2 * t) = make_float2(o[n][0], o[n][1]);
      *reinterpret_cast<float2*>(wo + (g + 8) * L.ldo + n * 8 + 2 * t) = make_float2(o[n][2], o[n][3]);
    }
  }
  __syncthreads();
  CombineWarps(a, L, sm, rows, ItemOut{a, it, partial_out, partial_lse});
}
template <int VT>
__global__ void __launch_bounds__(kThreads, VT <= 8 ? 2 : 1) LatentDecodeKernel(const LatentAttentionArgs a, const DecodeSchedule sch) {
  const int num_work = sch.counts[0];
  if (static_cast<int>(blockIdx.x) >= num_work) return;  // uniform over the CTA; spares B_K's load
  const Layout L(a.k_rank, a.v_rank);
  const Smem sm = Setup(a, L);
  for (int w = blockIdx.x; w < num_work; w += gridDim.x) {
    const DecodeWorkItem wi = sch.work[w];
    const Item it{wi.seq, 0, 1, wi.kv_start, wi.kv_end, wi.partial};
    ProcessItem<VT>(a, L, sm, it, sch.partial_out, sch.partial_lse);
  }
}

template <int VT>
__global__ void __launch_bounds__(kThreads, VT <= 8 ? 2 : 1) LatentPrefillKernel(const LatentAttentionArgs a, const PrefillSchedule sch) {
  const int group = a.num_heads / a.num_kv_heads;
  const int tq = kLatentRows / group;
  int tile = blockIdx.x, seq = -1;
  const int num_prefills = *sch.num_prefills;
  for (int i = 0; i < num_prefills; ++i) {
    const int s = sch.prefill_seqs[i];
    const int n = (a.query_start[s + 1] - a.query_start[s] + tq - 1) / tq;
    if (tile < n) {
      seq = s;
      break;
    }
    tile -= n;
  }
  if (seq < 0) return;  // uniform over the CTA
  const Layout L(a.k_rank, a.v_rank);
  const Smem sm = Setup(a, L);
  const int q_len = a.query_start[seq + 1] - a.query_start[seq];
  const int ctx = a.seq_lens[seq] - q_len;
  const int q_first = tile * tq;
  const int ntok = q_len - q_first < tq ? q_len - q_first : tq;
  const Item it{seq, q_first, ntok, 0, ctx + q_first + ntok, -1};
  ProcessItem<VT>(a, L, sm, it, nullptr, nullptr);
}

// One warp per (split sequence, query head), v_rank columns (MergeSplitChunks).
__global__ void __launch_bounds__(kThreads) LatentMergeKernel(const LatentAttentionArgs a, const DecodeSchedule sch) {
  const int pairs = sch.counts[1] * a.num_heads;
  const int rv = a.v_rank, width = a.num_heads * rv;
  const int warps = gridDim.x * (kThreads / 32);
  for (int pi = blockIdx.x * (kThreads / 32) + threadIdx.x / 32; pi < pairs; pi += warps) {
    const DecodeMergeItem it = sch.merge[pi / a.num_heads];
    const int head = pi % a.num_heads;
    MergeSplitChunks(sch.partial_lse + static_cast<int64_t>(it.first) * a.num_heads + head, a.num_heads,
                     sch.partial_out + static_cast<int64_t>(it.first) * width + head * rv, width, it.num, rv,
                     static_cast<__nv_bfloat16*>(a.out) + a.query_start[it.seq] * a.out_ld + head * rv);
  }
}

}  // namespace

namespace latent_internal {
bool ArgsOk(const LatentAttentionArgs& a) {
  return LatentShapeSupported(a.num_heads, a.num_kv_heads, a.head_dim, a.k_rank, a.v_rank) && a.block_size > 0 &&
         a.inv_freq != nullptr && Aligned16(a.q) && Aligned16(a.out) && Aligned16(a.k_up) && Aligned16(a.k_cache) &&
         Aligned16(a.v_cache) && a.q_ld % 8 == 0 && a.out_ld % 8 == 0 && a.k_up_ld % 8 == 0 && a.k_ld % 8 == 0 &&
         a.v_ld % 8 == 0 &&
         (a.kv_quant == KvQuant::kNone ||
          (KvqSideReadable(a.kv_quant, a.k_q, a.block_size) && KvqSideReadable(a.kv_quant, a.v_q, a.block_size)));
}
}  // namespace latent_internal

bool LatentShapeSupported(int num_heads, int num_kv_heads, int head_dim, int k_rank, int v_rank) {
  if (head_dim != kD || num_kv_heads <= 0 || num_heads <= 0 || num_heads % num_kv_heads != 0) return false;
  const int group = num_heads / num_kv_heads;
  return kLatentRows % group == 0 && k_rank >= 8 && k_rank <= kMaxRank && k_rank % 8 == 0 && v_rank >= 8 &&
         v_rank <= kMaxRank && v_rank % 8 == 0 && num_heads * v_rank <= kMaxPartialWidth &&
         num_heads <= kMaxPartialHeads;
}

cudaError_t LaunchLatentDecode(const LatentAttentionArgs& a, const DecodeSchedule& s, cudaStream_t stream) {
  if (!ArgsOk(a) || s.max_work <= 0 || s.max_merge <= 0 || s.num_sms <= 0) return cudaErrorInvalidValue;
  // Enough CTAs for two resident waves; each strides over the work list (read on the device).
  const int per_head = (4 * s.num_sms + a.num_kv_heads - 1) / a.num_kv_heads;
  const dim3 grid(static_cast<unsigned>(per_head < s.max_work ? per_head : s.max_work),
                  static_cast<unsigned>(a.num_kv_heads));
  const size_t smem = Layout(a.k_rank, a.v_rank).bytes();
  cudaError_t e;
  const int group = a.num_heads / a.num_kv_heads;
  if (group <= 8) {
    if ((e = latent_internal::LaunchLatentDecodeSmallGroup(a, s, grid, stream)) != cudaSuccess) return e;
  } else if (Pad16(a.v_rank) <= 64) {
    static bool smem_set = false;
    if ((e = AllowSmem(LatentDecodeKernel<8>, &smem_set)) != cudaSuccess) return e;
    LatentDecodeKernel<8><<<grid, kThreads, smem, stream>>>(a, s);
  } else {
    static bool smem_set = false;
    if ((e = AllowSmem(LatentDecodeKernel<16>, &smem_set)) != cudaSuccess) return e;
    LatentDecodeKernel<16><<<grid, kThreads, smem, stream>>>(a, s);
  }
  const int64_t merge_pairs = static_cast<int64_t>(s.max_merge) * a.num_heads;
  const int64_t merge_want = (merge_pairs + kThreads / 32 - 1) / (kThreads / 32);
  const int merge_ctas = static_cast<int>(merge_want < 4 * s.num_sms ? merge_want : 4 * s.num_sms);
  LatentMergeKernel<<<merge_ctas, kThreads, 0, stream>>>(a, s);
  return cudaGetLastError();
}

cudaError_t LaunchLatentPrefill(const LatentAttentionArgs& a, const PrefillSchedule& s, cudaStream_t stream) {
  if (!ArgsOk(a) || s.num_tiles < 0) return cudaErrorInvalidValue;
  if (s.num_tiles == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(s.num_tiles), static_cast<unsigned>(a.num_kv_heads));
  const size_t smem = Layout(a.k_rank, a.v_rank).bytes();
  cudaError_t e;
  if (Pad16(a.v_rank) <= 64) {
    static bool smem_set = false;
    if ((e = AllowSmem(LatentPrefillKernel<8>, &smem_set)) != cudaSuccess) return e;
    LatentPrefillKernel<8><<<grid, kThreads, smem, stream>>>(a, s);
  } else {
    static bool smem_set = false;
    if ((e = AllowSmem(LatentPrefillKernel<16>, &smem_set)) != cudaSuccess) return e;
    LatentPrefillKernel<16><<<grid, kThreads, smem, stream>>>(a, s);
  }
  return cudaGetLastError();
}

}  // namespace lorc::kernels
