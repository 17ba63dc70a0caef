// Internal to the LoRC latent decode kernels of groups <= 8 (attention_latent_decode.cu, the
// paged decode; kv_policy_latent.cu, a KV policy's decode over the keys it keeps): one decode
// item's body (DecodeItemT), its fixed-layout tile loader and the key sources it walks. Not part
// of the kernels' interface (attention_latent.cuh, kv_policy.cuh).
#pragma once

#include <cuda_bf16.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "kernels/attention_latent_common.cuh"

namespace lorc::kernels::latent_internal {

// TileLoader for the fixed layout Layout(64, 64) (ranks <= 64): a token row is 16 pieces of 16
// bytes (C_K chunks 0-7, C_V chunks 0-7), a warp instruction covers two rows; pieces past a rank
// are zero-filled (C_K's padding columns zero, no reads), so there is no padding pass. Slots are
// int32 here, as backend.h's slot_mapping everywhere.
// A quantized cache keeps the asynchronous pipeline: the same pieces are copied as codes (8 bytes
// of 8 fp8 / int8 channels, 4 bytes of 8 int4 channels) by cp.async into two raw stages of 16 rows
// x 128 bytes that live in the region's bf16 stage 1, while each lane loads the scales of one
// row and side (lanes 0-15: C_K of row lane, 16-31: C_V of row lane - 16) into registers, one
// tile ahead; Tile() then dequantizes the landed raw stage into bf16 stage 0 (scales by
// shuffle) for the tile's products. Q: the quantized variant (its own instantiation, so the bf16
// one keeps its registers).
constexpr int kRawRow = 128;  // bytes of one token's codes in a quantized raw stage (16 pieces of 8)
template <bool Q>
struct FixedTileLoader {
  static constexpr Layout L{64, 64};
  int lane;
  int block_size;
  __nv_bfloat16* dst;        // this lane's piece in row 0 of stage 0
  const __nv_bfloat16* src;  // this lane's piece in slot 0
  int64_t ld;
  bool in_rank;
  // A quantized cache (args.kv_quant != kNone): the scales of this lane's row and side per raw
  // stage (int4: the (scale, zero) pairs of groups 0 and 1); the rest is read from the arguments.
  const LatentAttentionArgs& args;
  __nv_bfloat16* region;
  mutable uint32_t sc0a = 0, sc0b = 0, sc1a = 0, sc1b = 0;
  __device__ FixedTileLoader(const LatentAttentionArgs& a, const Layout&, const Item&, __nv_bfloat16* region_,
                             int lane_)
      : lane(lane_), block_size(a.block_size), args(a), region(region_) {
    const int pc = lane & 15, c = pc & 7;
    const bool v = pc >= 8;
    dst = region_ + (v ? kTile * L.ldk : 0) + 8 * c;
    src = v ? static_cast<const __nv_bfloat16*>(a.v_cache) + blockIdx.y * a.v_rank + 8 * c
            : static_cast<const __nv_bfloat16*>(a.k_cache) + blockIdx.y * a.k_rank + 8 * c;
    ld = v ? a.v_ld : a.k_ld;
    in_rank = 8 * c < (v ? a.v_rank : a.k_rank);
    if (!in_rank) src = static_cast<const __nv_bfloat16*>(v ? a.v_cache : a.k_cache);
  }
  __device__ __forceinline__ uint8_t* Raw(int stage) const {
    return reinterpret_cast<uint8_t*>(region + L.stage_elems) + stage * kTile * kRawRow;
  }
  // `low`: as TileLoader::Issue's (a packed row's raw words in place of its pieces: this lane's
  // piece c of the row's side holds words 4c .. 4c + 3 of a bf16 row, or, quantized, words 2c and
  // 2c + 1 of the raw stage's 64 bytes of that side).
  template <typename Low>
  __device__ __forceinline__ void Issue(int stage, int my_slot, const Low& low, int base) const {
    static_assert(L.ldk == L.ldv, "one row stride for both latents");
    const KvQuant quant = args.kv_quant;
    if constexpr (Q) {
      const bool v = (lane & 15) >= 8;
      const auto* qbase = static_cast<const uint8_t*>(v ? args.v_cache : args.k_cache);
      uint8_t* rs = Raw(stage);
#pragma unroll
      for (int j = 0; j < kTile / 2; ++j) {
        const int r = 2 * j + (lane >> 4);
        const int slot = __shfl_sync(0xffffffffu, my_slot, r);
        if constexpr (Low::kFix) {
          if (low.Packed(base + r)) {
            low.template CopyRaw<true>(base + r, v, 2 * (lane & 7), 2,
                                       reinterpret_cast<uint32_t*>(rs + r * kRawRow + (lane & 15) * 8));
            continue;
          }
        }
        const bool valid = in_rank && slot >= 0;
        const uint8_t* p = valid ? KvqCodePtr(quant, qbase, v ? args.v_q : args.k_q, slot / block_size,
                                              slot % block_size, blockIdx.y, 8 * (lane & 7))
                                 : qbase;
        CpAsyncSmall(rs + r * kRawRow + (lane & 15) * 8, p, quant != KvQuant::kInt4, valid);
      }
      uint32_t s0 = 0, s1 = 0;  // an invalid row: scale (and zero point) 0, so its zero codes give 0
      if (my_slot >= 0) {
        const bool vs = lane >= 16;  // this lane's scales: row lane % 16 of C_K (lanes 0-15) or C_V
        const uint16_t* sp = KvqScalePtr(static_cast<const uint8_t*>(vs ? args.v_cache : args.k_cache),
                                         vs ? args.v_q : args.k_q, my_slot / block_size, my_slot % block_size,
                                         blockIdx.y);
        if (quant == KvQuant::kInt4) {
          s0 = __ldg(reinterpret_cast<const uint32_t*>(sp));
          if ((vs ? args.v_rank : args.k_rank) > kKvInt4Group) s1 = __ldg(reinterpret_cast<const uint32_t*>(sp) + 1);
        } else {
          s0 = __ldg(sp);
        }
      }
      if (stage != 0) {  // selects, not an indexed array: the scales stay in registers
        sc1a = s0, sc1b = s1;
      } else {
        sc0a = s0, sc0b = s1;
      }
    } else {
#pragma unroll
    for (int j = 0; j < kTile / 2; ++j) {
      const int r = 2 * j + (lane >> 4);
      const int slot = __shfl_sync(0xffffffffu, my_slot, r);
      if constexpr (Low::kFix) {
        if (low.Packed(base + r)) {
          low.template CopyRaw<true>(base + r, (lane & 15) >= 8, 4 * (lane & 7), 4,
                                     reinterpret_cast<uint32_t*>(dst + stage * L.stage_elems + r * L.ldk));
          continue;
        }
      }
      const bool valid = in_rank && slot >= 0;
      CpAsync16(dst + stage * L.stage_elems + r * L.ldk, src + (valid ? slot : 0) * ld, valid);
    }
    }
  }
  // The bf16 C_K tile of `stage` (C_V follows at kTile * ldk), once its copies landed (after the
  // caller's CpAsyncWait and __syncwarp): a quantized cache's raw stage dequantized into stage 0.
  __device__ __forceinline__ const __nv_bfloat16* Tile(int stage) const {
    const KvQuant quant = args.kv_quant;
    if constexpr (!Q) return region + stage * L.stage_elems;
    const uint8_t* rs = Raw(stage);
    const int channel = 8 * (lane & 7);
    const bool v = (lane & 15) >= 8;
#pragma unroll
    for (int j = 0; j < kTile / 2; ++j) {
      const int r = 2 * j + (lane >> 4);
      const int from = (v ? 16 : 0) + r;
      const uint32_t a0 = __shfl_sync(0xffffffffu, stage != 0 ? sc1a : sc0a, from);
      const uint32_t a1 = __shfl_sync(0xffffffffu, stage != 0 ? sc1b : sc0b, from);
      uint4 rv;
      if (quant == KvQuant::kInt4) {
        rv = make_uint4(*reinterpret_cast<const uint32_t*>(rs + r * kRawRow + (lane & 15) * 8), 0,
                        channel < kKvInt4Group ? a0 : a1, 0);
      } else {
        const uint2 c2 = *reinterpret_cast<const uint2*>(rs + r * kRawRow + (lane & 15) * 8);
        rv = make_uint4(c2.x, c2.y, a0, 0);
      }
      *reinterpret_cast<uint4*>(dst + r * L.ldk) = in_rank ? KvqDequant8Bf16(quant, rv) : make_uint4(0, 0, 0, 0);
    }
    __syncwarp();
    return region;
  }
};

// The keys a decode item walks, by walk index j in [it.kv_start, it.kv_end): Slot(j), its cache
// slot (-1 past the end), and Pos(j), the position its key is rotated at. PagedKeys: the
// sequence's tokens in order (j is the position, its slot from the block table), for the paged
// decode. A KV policy's list (kv_policy_latent.cu) is another: the chunk's kept keys, wherever a
// compaction moved them, with their positions, a hook that saves the scores and (MiKV, kFix) one
// that writes its low rows' values into a landed bf16 tile before the products read it.
struct PagedKeys {
  static constexpr bool kConsecutive = true;  // Pos(j + 8) == Pos(j) + 8 (RotateKeyHalf's FR)
  static constexpr bool kScores = false;      // no Score hook
  static constexpr bool kFix = false;         // no Fix hook (a policy's low rows)
  const int32_t* table;
  int block_size, end;
  __device__ __forceinline__ int Slot(int j) const {
    return j < end ? table[j / block_size] * block_size + j % block_size : -1;
  }
  __device__ __forceinline__ int Pos(int j) const { return j; }
  __device__ __forceinline__ void Score(int, int, float) const {}
};
// movmatrix: the transpose of an 8x8 bf16 matrix held in the mma fragment layout.
__device__ __forceinline__ uint32_t MovTrans(uint32_t x) {
  uint32_t y;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
  return y;
}

// One decode item (one query token; the group's <= 8 heads fit one mma n-tile), ProcessItem's
// tiles and key reconstruction with the score transposed: S [16 tokens x 8 heads] = K Q^T, so
// K's accumulators are A fragments as they stand and Q^T is a B operand held in registers for
// the whole item (no Q in shared memory); P^T reaches the B layout by movmatrix and
// O^T [r_v x 8 heads] += C_V^T P^T runs over 16-row tiles of value columns. Per 16-token tile
// that halves ProcessItem's score and value mma count and its softmax work (its 16 rows are
// mostly padding at group <= 8), and C_K's A fragments are loaded once for both key halves.
// KS / VM: k-steps of C_K (>= rkp / 16) and 16-column tiles of C_V (>= rvp / 16) in registers;
// KS = VM = 4 is the fixed Layout(64, 64) (compile-time strides, FixedTileLoader).
// FR: token g + 8's RoPE angle rotated on from token g's (RotateKeyHalf): half the sin/cos work.
// The kernel is issue-bound (H200: dropping RoPE entirely cut ~20% of its time), hence these.
// Keys: PagedKeys or a policy's list (above): slots, positions and (Keys::kScores) a hook that
// receives each valid (walk index, head of the group, score = scale x q . k); q_row: the query's
// row of a.q; `out`: CombineWarps's writer (ItemOut, or the policy's).
template <int KS, int VM, bool FR, bool QF, typename Keys, typename Out>
__device__ __forceinline__ void DecodeItemT(const LatentAttentionArgs& a, const Layout& L, const Smem& sm, const Item& it,
                                            int64_t q_row, const Keys& keys, const Out& out) {
  static_assert(!FR || Keys::kConsecutive, "FR rotates row g + 8 on from row g: consecutive positions only");
  // KS = VM = 4: L is Layout(64, 64) (compile-time strides) whatever the ranks <= 64.
  constexpr bool kFixed = KS == 4 && VM == 4;
  using Loader = std::conditional_t<kFixed, FixedTileLoader<QF>, TileLoader>;
  const int kvh = blockIdx.y;
  const int group = a.num_heads / a.num_kv_heads;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int rk = a.k_rank;
  __nv_bfloat16* region = sm.regions + warp * L.region_elems;

  // Q^T's B fragments: head column g (query head kvh * group + g), dims 16 kk + 2t (+1) and
  // 16 kk + 8 + 2t (+1); zero for g >= group.
  uint32_t qf[kD / 16][2];
  {
    const __nv_bfloat16* qr = static_cast<const __nv_bfloat16*>(a.q) +
                              q_row * a.q_ld + (kvh * group + g) * kD;
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk) {
      qf[kk][0] = g < group ? *reinterpret_cast<const uint32_t*>(qr + 16 * kk + 2 * t) : 0u;
      qf[kk][1] = g < group ? *reinterpret_cast<const uint32_t*>(qr + 16 * kk + 8 + 2 * t) : 0u;
    }
  }
  if (!kFixed && rk != L.rkp) {  // as ProcessItem: C_K's padding columns zero in both stages
    const int s = lane / kTile, r = lane % kTile;
    *reinterpret_cast<uint4*>(region + s * L.stage_elems + r * L.ldk + rk) = make_uint4(0, 0, 0, 0);
  }
  __syncthreads();  // B_K (first item) and the previous item's combine

  const float qscale = a.scale * kLog2e;
  // Softmax state of heads 2t and 2t + 1 (l: this thread's tokens only, summed at the end).
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  float o[VM][4];
#pragma unroll
  for (int n = 0; n < VM; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;

  const Loader ld(a, L, it, region, lane);
  constexpr int kStep = kWarps * kTile;
  const int first = it.kv_start + warp * kTile;
  const int tl = lane % kTile;  // the tile row whose slot this lane looks up
  if (first < it.kv_end) ld.Issue(0, keys.Slot(first + tl), keys, first);
  CpAsyncCommit();
  auto next_slot = keys.Slot(first + kStep + tl);
  int stage = 0;
  for (int base = first; base < it.kv_end; base += kStep) {  // uniform over the warp
    if (base + kStep < it.kv_end) ld.Issue(stage ^ 1, next_slot, keys, base + kStep);
    CpAsyncCommit();
    next_slot = keys.Slot(base + 2 * kStep + tl);
    CpAsyncWait<1>();
    __syncwarp();
    const __nv_bfloat16* ck;
    if constexpr (kFixed && QF) {
      ck = ld.Tile(stage);  // the raw stage dequantized into bf16 stage 0
    } else {
      ck = region + stage * L.stage_elems;
    }
    if constexpr (Keys::kFix) {  // the low rows, in the warp's own stage; a packed row's raw words
      // lie at its row's start (bf16 loaders) or in the quantized loader's raw stage
      __nv_bfloat16* w = const_cast<__nv_bfloat16*>(ck);
      const uint8_t* raw_k;
      int raw_ld_k, raw_ld_v, raw_v_off;
      if constexpr (kFixed && QF) {
        raw_k = ld.Raw(stage);
        raw_ld_k = raw_ld_v = kRawRow;
        raw_v_off = kRawRow / 2;
      } else {
        raw_k = reinterpret_cast<const uint8_t*>(w);
        raw_ld_k = 2 * L.ldk;
        raw_ld_v = 2 * L.ldv;
        raw_v_off = 2 * kTile * L.ldk;
      }
      keys.template Fix<kFixed>(w, w + kTile * L.ldk, base, L, raw_k, raw_k + raw_v_off, raw_ld_k, raw_ld_v, lane);
    }
    const __nv_bfloat16* cv = ck + kTile * L.ldk;
    // The positions of tile rows g and g + 8 (RoPE).
    const int pos0 = keys.Pos(base + g), pos1 = Keys::kConsecutive ? pos0 + 8 : keys.Pos(base + g + 8);
    // A listed tile whose 16 keys sit at consecutive positions (a prompt's importance rows, runs of
    // kept keys) takes the FR rotation as well (uniform over the warp).
    bool fr_tile = FR;
    if constexpr (!Keys::kConsecutive) {
      const int mine = keys.Pos(base + tl);
      const int first = __shfl_sync(0xffffffffu, mine, 0);
      fr_tile = __all_sync(0xffffffffu, base + tl < it.kv_end && mine == first + tl);
    }

    uint32_t af[KS][4];
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
      af[ks][0] = af[ks][1] = af[ks][2] = af[ks][3] = 0u;
      if (16 * ks < L.rkp) Ldsm4(af[ks], ck + (lane % 16) * L.ldk + 16 * ks + (lane / 16) * 8);
    }
    float sacc[4] = {0.f, 0.f, 0.f, 0.f};  // (token g, heads 2t, 2t+1), (token g + 8, ...)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float acc[8][4];  // as ProcessItem: n-tiles 4h + j (j < 4) and their partners 8 + 4h + j
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
#pragma unroll
      for (int ks = 0; ks < KS; ++ks) {
        if (16 * ks < L.rkp) {
#pragma unroll
          for (int j = 0; j < 8; j += 2) {
            const int n = (j < 4 ? 4 * h : 8 + 4 * h) + (j % 4);
            uint32_t bf[4];
            Ldsm4(bf, sm.bk + (n * 8 + (lane & 7) + ((lane >> 4) << 3)) * L.ldk + 16 * ks + ((lane >> 3) & 1) * 8);
            Mma(acc[j], af[ks], bf[0], bf[1]);
            Mma(acc[j + 1], af[ks], bf[2], bf[3]);
          }
        }
      }
      if (FR || fr_tile) {
        RotateKeyHalf<true>(acc, sm, h, pos0, pos1, t);
      } else {
        RotateKeyHalf<false>(acc, sm, h, pos0, pos1, t);
      }
      // S += K Q^T over this half's k-steps (as ProcessItem's); K's accumulators of n-tiles
      // (j, j + 1) are the A fragment of one k-step.
#pragma unroll
      for (int s = 0; s < 4; ++s) {
        const int kk = (s < 2 ? 2 * h : 4 + 2 * h) + (s % 2);
        const int j = 2 * s;
        const uint32_t ka[4] = {PackBf16(acc[j][0], acc[j][1]), PackBf16(acc[j][2], acc[j][3]),
                                PackBf16(acc[j + 1][0], acc[j + 1][1]), PackBf16(acc[j + 1][2], acc[j + 1][3])};
        Mma(sacc, ka, qf[kk][0], qf[kk][1]);
      }
    }
    if constexpr (Keys::kScores) {  // heads 2t, 2t + 1 of the group, rows g and g + 8
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        if (2 * t + e < group) {
          if (base + g < it.kv_end) keys.Score(base + g, 2 * t + e, sacc[e] * a.scale);
          if (base + g + 8 < it.kv_end) keys.Score(base + g + 8, 2 * t + e, sacc[2 + e] * a.scale);
        }
      }
    }
    // Online softmax per head column: its 16 tokens sit in the 8 lanes of equal t.
    float p[4];
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const float x0 = base + g < it.kv_end ? sacc[e] * qscale : -INFINITY;
      const float x1 = base + g + 8 < it.kv_end ? sacc[2 + e] * qscale : -INFINITY;
      float mx = fmaxf(x0, x1);
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 4));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 8));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 16));
      const float m_new = fmaxf(m[e], mx);
      const float m_ref = m_new == -INFINITY ? 0.f : m_new;  // no visible key yet: p = c = 0
      const float c = exp2f(m[e] - m_ref);
      p[e] = exp2f(x0 - m_ref);
      p[2 + e] = exp2f(x1 - m_ref);
      l[e] = fmaf(l[e], c, p[e] + p[2 + e]);
      m[e] = m_new;
#pragma unroll
      for (int n = 0; n < VM; ++n) {
        o[n][e] *= c;
        o[n][2 + e] *= c;
      }
    }
    // P^T's B fragments: (tokens 2t, 2t+1 | 8 + 2t, 9 + 2t; head g).
    const uint32_t pb0 = MovTrans(PackBf16(p[0], p[1])), pb1 = MovTrans(PackBf16(p[2], p[3]));
    // O^T += C_V^T P^T: A fragments of value columns 16n .. 16n + 15 by transposed ldmatrix.
#pragma unroll
    for (int n = 0; n < VM; ++n) {
      if (16 * n < L.rvp) {
        uint32_t vf[4];
        Ldsm4T(vf, cv + ((lane & 7) + ((lane >> 4) & 1) * 8) * L.ldv + 16 * n + ((lane >> 3) & 1) * 8);
        Mma(o[n], vf, pb0, pb1);
      }
    }
    __syncwarp();  // this stage is refilled by the next iteration's issue
    stage ^= 1;
  }
  CpAsyncWait<0>();

  // The warp's state into its region in ProcessItem's layout (rows = heads), then combined.
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    l[e] += __shfl_xor_sync(0xffffffffu, l[e], 4);
    l[e] += __shfl_xor_sync(0xffffffffu, l[e], 8);
    l[e] += __shfl_xor_sync(0xffffffffu, l[e], 16);
  }
  __syncwarp();
  float* wm = reinterpret_cast<float*>(region);
  float* wl = wm + kLatentRows;
  float* wo = wl + kLatentRows;
  if (g == 0) {
    wm[2 * t] = m[0], wm[2 * t + 1] = m[1];
    wl[2 * t] = l[0], wl[2 * t + 1] = l[1];
  }
#pragma unroll
  for (int n = 0; n < VM; ++n) {
    if (16 * n < L.rvp) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        wo[(2 * t + e) * L.ldo + 16 * n + g] = o[n][e];
        wo[(2 * t + e) * L.ldo + 16 * n + g + 8] = o[n][2 + e];
      }
    }
  }
  __syncthreads();
  CombineWarps(a, L, sm, group, out);
}

}  // namespace lorc::kernels::latent_internal
