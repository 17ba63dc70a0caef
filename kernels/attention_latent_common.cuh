// Internal to the latent attention kernels (attention_latent.cu: ProcessItem, prefill, merge;
// attention_latent_decode.cu: the decode of groups <= 8): tile constants, the shared-memory
// layout, the key-tile loader, the per-CTA setup and the combine of the warps' softmax states
// (mma / ldmatrix / cp.async wrappers: kernels/mma.cuh). Not part of the kernels' interface
// (attention_latent.cuh).
#pragma once

#include <cuda_bf16.h>

#include <cmath>
#include <cstdint>

#include "kernels/attention_latent.cuh"
#include "kernels/kv_quant.cuh"
#include "kernels/mma.cuh"

namespace lorc::kernels::latent_internal {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kD = 128;        // head_dim
constexpr int kTile = 16;      // key tokens per warp tile
constexpr int kStages = 2;     // cp.async stages per warp
constexpr int kMaxRank = 128;
constexpr int kQLd = kD + 8;   // padded shared-memory row strides (conflict-free ldmatrix)
constexpr float kLog2e = 1.4426950408889634f;

__host__ __device__ constexpr int Pad16(int r) { return (r + 15) & ~15; }

// Shared-memory layout (bf16 elements unless noted): B_K [kD][ldk], Q [16][kQLd], then per warp
// kStages x (C_K [16][ldk], C_V [16][ldv]) (at the end of an item a warp's region holds its
// fp32 m[16], l[16], O[16][ldo]), then inv_freq [kD / 2] fp32 and rope8 [kD / 2][2] fp32.
struct Layout {
  int rkp, rvp, ldk, ldv, ldo;
  int stage_elems, region_elems;
  __host__ __device__ constexpr explicit Layout(int rk, int rv)
      : rkp(Pad16(rk)), rvp(Pad16(rv)), ldk(rkp + 8), ldv(rvp + 8), ldo(rvp + 4),
        stage_elems(kTile * (ldk + ldv)), region_elems(kStages * stage_elems) {}
  __host__ __device__ constexpr size_t bytes() const {
    return sizeof(__nv_bfloat16) * (static_cast<size_t>(kD) * ldk + kLatentRows * kQLd + kWarps * region_elems) +
           sizeof(float) * kD / 2 * 3;
  }
};

// 8 (or, !eight, 4) bytes global -> shared, through L1; zero-filled when !valid.
__device__ __forceinline__ void CpAsyncSmall(void* dst, const void* src, bool eight, bool valid) {
  if (eight) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(SmemAddr(dst)), "l"(src), "r"(valid ? 8 : 0));
  } else {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(SmemAddr(dst)), "l"(src), "r"(valid ? 4 : 0));
  }
}
// cos and sin of the fp32 angle a >= 0 (a = float(position) * inv_freq, the RoPE convention):
// a reduced by 2 pi (two-constant Cody-Waite, exact to ~1e-7 for angles up to ~1e6), then the
// SFU on [-pi, pi] (abs error < 4e-7). Far cheaper than sincosf, whose cost would rival the
// memory time of a long decode; the difference to it is below a bf16 key's rounding by 10^4.
__device__ __forceinline__ void AngleSinCos(float a, float* s, float* c) {
  const float k = rintf(a * 0.159154943091895336f);
  float r = fmaf(-k, 6.28318548202514648f, a);  // 2 pi rounded to fp32
  r = fmaf(-k, -1.74845553e-7f, r);             // 2 pi - that
  __sincosf(r, s, c);
}

// One unit of work: keys [kv_start, kv_end) of `seq` for query tokens [q_first, q_first +
// num_tokens) of its query rows; partial < 0 writes out, else fp32 partial slot `partial`.
struct Item {
  int seq, q_first, num_tokens, kv_start, kv_end, partial;
};

struct Smem {
  __nv_bfloat16* bk;
  __nv_bfloat16* q;
  __nv_bfloat16* regions;
  float* inv_freq;
  float* rope8;  // [kD / 2][2] fp32: cos, sin of 8 * inv_freq (DecodeItemT<.., true>)
};

// No low-precision rows in a tile (the loaders' default; attention_latent_decode_item.cuh: a KV
// policy's list may have MiKV's packed entries, whose raw words the loaders copy instead).
struct NoLowRows {
  static constexpr bool kFix = false;
  __device__ bool Packed(int) const { return false; }
  template <bool kAsync>
  __device__ void CopyRaw(int, bool, int, int, uint32_t*) const {}
};

// A warp's 16-token key tiles: C_K and C_V rows by cp.async into a stage of its region. A tile
// is 16 rows x `chunks` 16-byte pieces (C_K's, then C_V's); lane-strided, the row of piece idx
// is idx / chunks (by a multiply-high: exact for idx < 2^32 / chunks^2) and its slot comes from
// the lane that looked it up (lane r % 16 holds token r's slot).
struct TileLoader {
  const LatentAttentionArgs& a;
  const Layout& L;
  const Item& it;
  __nv_bfloat16* region;
  int lane;
  const int32_t* table;
  const __nv_bfloat16* kc;
  const __nv_bfloat16* vc;
  int kch, chunks, per_lane;
  uint32_t magic;
  __device__ TileLoader(const LatentAttentionArgs& a_, const Layout& L_, const Item& it_, __nv_bfloat16* region_,
                        int lane_)
      : a(a_), L(L_), it(it_), region(region_), lane(lane_),
        // SlotOf's block table (ProcessItem); DecodeItemT passes its own slots (it.seq may then be a
        // KV policy entry's index, not a table row: SlotOf is not called there).
        table(a_.block_tables + static_cast<int64_t>(it_.seq) * a_.max_blocks_per_seq),
        kc(static_cast<const __nv_bfloat16*>(a_.k_cache) + blockIdx.y * a_.k_rank),
        vc(static_cast<const __nv_bfloat16*>(a_.v_cache) + blockIdx.y * a_.v_rank), kch(a_.k_rank / 8),
        chunks(a_.k_rank / 8 + a_.v_rank / 8), per_lane((kTile * chunks + 31) / 32),
        magic(0xffffffffu / static_cast<uint32_t>(chunks) + 1u) {}
  // `low` (Low::kFix): the tile's rows are list entries base .. base + 15 of a KV policy's list;
  // a packed one (low.Packed) gets its entry's raw words instead (low.CopyRaw: piece c of a side
  // holds words 4c .. 4c + 3 at its place), which the list's Fix decodes once they landed.
  template <typename Low = NoLowRows>
  __device__ void Issue(int stage, int64_t my_slot, const Low& low = Low{}, int base = 0) const {
    __nv_bfloat16* ck = region + stage * L.stage_elems;
    __nv_bfloat16* cv = ck + kTile * L.ldk;
    if (a.kv_quant != KvQuant::kNone) {
      IssueQuantized(ck, cv, my_slot, low, base);
      return;
    }
    for (int j = 0; j < per_lane; ++j) {  // uniform over the warp (the shuffle needs all lanes)
      const int idx = lane + 32 * j;
      const int r = static_cast<int>(__umulhi(static_cast<uint32_t>(idx), magic)), c = idx - r * chunks;
      const int64_t slot = __shfl_sync(0xffffffffu, my_slot, r & 31);
      if constexpr (Low::kFix) {
        if (r < kTile && low.Packed(base + r)) {
          const bool vside = c >= kch;
          __nv_bfloat16* d = vside ? cv + r * L.ldv + (c - kch) * 8 : ck + r * L.ldk + c * 8;
          low.template CopyRaw<true>(base + r, vside, 4 * (vside ? c - kch : c), 4, reinterpret_cast<uint32_t*>(d));
          continue;
        }
      }
      if (r < kTile) {
        const bool valid = slot >= 0;
        const int64_t sl = valid ? slot : 0;
        if (c < kch) {
          CpAsync16(ck + r * L.ldk + c * 8, kc + sl * a.k_ld + c * 8, valid);
        } else {
          CpAsync16(cv + r * L.ldv + (c - kch) * 8, vc + sl * a.v_ld + (c - kch) * 8, valid);
        }
      }
    }
  }
  // A quantized cache: the same pieces read as codes (KvqLoad8), four per lane at a time so their
  // loads overlap, dequantized to bf16 and stored (zeros past kv_end: zero codes and scales
  // dequantize to 0). Synchronous: the next tile's loads are not in flight during this tile's math.
  template <typename Low>
  __device__ void IssueQuantized(__nv_bfloat16* ck, __nv_bfloat16* cv, int64_t my_slot, const Low& low,
                                 int base) const {
    const auto* kb = static_cast<const uint8_t*>(a.k_cache);
    const auto* vb = static_cast<const uint8_t*>(a.v_cache);
    for (int j0 = 0; j0 < per_lane; j0 += 4) {  // uniform over the warp
      uint4 raw[4];
      __nv_bfloat16* dst[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int idx = lane + 32 * (j0 + u);
        const int r = static_cast<int>(__umulhi(static_cast<uint32_t>(idx), magic)), c = idx - r * chunks;
        const int64_t slot = __shfl_sync(0xffffffffu, my_slot, r & 31);
        raw[u] = make_uint4(0, 0, 0, 0);
        dst[u] = nullptr;
        if (j0 + u < per_lane && r < kTile) {
          const bool kside = c < kch;
          dst[u] = kside ? ck + r * L.ldk + c * 8 : cv + r * L.ldv + (c - kch) * 8;
          if constexpr (Low::kFix) {  // a packed row: its raw words, stored as they are
            if (low.Packed(base + r)) {
              low.template CopyRaw<false>(base + r, !kside, 4 * (kside ? c : c - kch), 4,
                                          reinterpret_cast<uint32_t*>(dst[u]));
              dst[u] = nullptr;
              continue;
            }
          }
          if (slot >= 0) {
            raw[u] = KvqLoad8Slot(a.kv_quant, kside ? kb : vb, kside ? a.k_q : a.v_q, slot, blockIdx.y,
                                  (kside ? c : c - kch) * 8);
          }
        }
      }
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        if (dst[u] != nullptr) *reinterpret_cast<uint4*>(dst[u]) = KvqDequant8Bf16(a.kv_quant, raw[u]);
      }
    }
  }
  // The bf16 C_K tile of `stage` (C_V follows at kTile * ldk), ready once its copies landed.
  __device__ const __nv_bfloat16* Tile(int stage) const { return region + stage * L.stage_elems; }
  // Lane l's token in a tile starting at `base` is base + l % 16; -1: past kv_end.
  __device__ int64_t SlotOf(int base) const {
    const int tok = base + lane % kTile;
    return tok < it.kv_end ? static_cast<int64_t>(table[tok / a.block_size]) * a.block_size + tok % a.block_size
                           : int64_t{-1};
  }
};

// RoPE (rotate_half) on one half h of a 16-token key tile's reconstruction accumulators: acc[j]
// (j < 4) holds n-tile 4h + j (columns 8(4h + j) + 2t + {0, 1}, tile rows g and g + 8, whose keys
// sit at positions pos0 and pos1), acc[j + 4] its partner 64 columns on. The angle is
// float(position) * inv_freq (AngleSinCos).
// FR (pos1 == pos0 + 8, consecutive tokens; pos1 unused): row g + 8's angle is row g's rotated on
// by 8 * inv_freq (Setup's rope8 table) instead of its own reduction and SFU pair: half the
// sin/cos work; the angle is then float(p) * f + 8 f, not float(p + 8) * f: at most ~1 ulp of the
// angle apart (2e-3 rad at position 32k for f = 1, below a bf16 key's rounding), well inside the
// parity tolerance.
template <bool FR>
__device__ __forceinline__ void RotateKeyHalf(float (&acc)[8][4], const Smem& sm, int h, int pos0, int pos1, int t) {
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float2 f = *reinterpret_cast<const float2*>(sm.inv_freq + 8 * (4 * h + j) + 2 * t);
    float4 r8 = make_float4(0.f, 0.f, 0.f, 0.f);
    if constexpr (FR) r8 = *reinterpret_cast<const float4*>(sm.rope8 + 2 * (8 * (4 * h + j) + 2 * t));
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      float sn, cs;
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        if (!FR || r == 0) {
          AngleSinCos(__fmul_rn(static_cast<float>(r == 0 ? pos0 : pos1), e == 0 ? f.x : f.y), &sn, &cs);
        } else {
          const float c8 = e == 0 ? r8.x : r8.z, s8 = e == 0 ? r8.y : r8.w;
          const float c1 = fmaf(cs, c8, -sn * s8);
          sn = fmaf(sn, c8, cs * s8);
          cs = c1;
        }
        const float x1 = acc[j][2 * r + e], x2 = acc[j + 4][2 * r + e];
        acc[j][2 * r + e] = fmaf(x1, cs, -x2 * sn);
        acc[j + 4][2 * r + e] = fmaf(x2, cs, x1 * sn);
      }
    }
  }
}

// Where CombineWarps puts an item's rows: `out` (it.partial < 0) or the item's fp32 partial slot
// with its log-sum-exp (base 2, of scale * log2(e) x the scores), which the merge kernel reads.
struct ItemOut {
  const LatentAttentionArgs& a;
  const Item& it;
  float* partial_out;
  float* partial_lse;
  int64_t row0;  // the item's first query row (out)
  __device__ ItemOut(const LatentAttentionArgs& a_, const Item& it_, float* po, float* pl)
      : a(a_), it(it_), partial_out(po), partial_lse(pl), row0(it_.partial < 0 ? a_.query_start[it_.seq] + it_.q_first : 0) {}
  // Row r of the item (query token it.q_first + r / group), query head `head`, value column col.
  __device__ __forceinline__ void operator()(int r, int head, int col, float value, float lse2) const {
    const int rv = a.v_rank;
    if (it.partial < 0) {
      const int64_t row = row0 + r / (a.num_heads / a.num_kv_heads);
      static_cast<__nv_bfloat16*>(a.out)[row * a.out_ld + head * rv + col] = __float2bfloat16_rn(value);
    } else {
      partial_out[static_cast<int64_t>(it.partial) * a.num_heads * rv + head * rv + col] = value;
      if (col == 0) partial_lse[static_cast<int64_t>(it.partial) * a.num_heads + head] = lse2;
    }
  }
};

// After each warp left its fp32 (m[16], l[16], O[16][ldo]) in its region (and a block barrier):
// rows [0, rows) combined over the warps, handed to `out` (ItemOut, or the KV policy's writer:
// out(r, head, col, O / l, log2-sum-exp)). Ends with a block barrier (regions are reused by the
// next item).
template <typename Out>
__device__ __forceinline__ void CombineWarps(const LatentAttentionArgs& a, const Layout& L, const Smem& sm, int rows,
                                             const Out& out) {
  const int kvh = blockIdx.y;
  const int group = a.num_heads / a.num_kv_heads;
  const int rv = a.v_rank;
  for (int idx = threadIdx.x; idx < rows * rv; idx += kThreads) {
    const int r = idx / rv, col = idx % rv;
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, reinterpret_cast<const float*>(sm.regions + w * L.region_elems)[r]);
    float sum = 0.f, acc = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float* ws = reinterpret_cast<const float*>(sm.regions + w * L.region_elems);
      const float wgt = exp2f(ws[r] - mx);  // 0 for a warp without keys (m = -inf)
      sum = fmaf(ws[kLatentRows + r], wgt, sum);
      acc = fmaf(ws[2 * kLatentRows + r * L.ldo + col], wgt, acc);
    }
    out(r, kvh * group + r % group, col, acc / sum, mx + log2f(sum));
  }
  __syncthreads();  // regions and Q are reused by the next item
}
// Per CTA: shared-memory carve-up, B_K of the CTA's KV head (zero-padded to rkp columns), the
// RoPE frequencies and cos / sin of 8 x each (sincosf, exact: 8 f is exact in fp32).
__device__ __forceinline__ Smem Setup(const LatentAttentionArgs& a, const Layout& L) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  Smem sm;
  sm.bk = reinterpret_cast<__nv_bfloat16*>(smem_raw);
  sm.q = sm.bk + kD * L.ldk;
  sm.regions = sm.q + kLatentRows * kQLd;
  sm.inv_freq = reinterpret_cast<float*>(sm.regions + kWarps * L.region_elems);
  const int kvh = blockIdx.y;
  const int cpr = L.rkp / 8;  // 16-byte chunks per padded row
  for (int idx = threadIdx.x; idx < kD * cpr; idx += kThreads) {
    const int r = idx / cpr, c = idx % cpr;
    uint4 val = make_uint4(0, 0, 0, 0);
    if (c * 8 < a.k_rank) {
      val = *reinterpret_cast<const uint4*>(static_cast<const __nv_bfloat16*>(a.k_up) +
                                            static_cast<int64_t>(kvh * kD + r) * a.k_up_ld + c * 8);
    }
    *reinterpret_cast<uint4*>(sm.bk + r * L.ldk + c * 8) = val;
  }
  sm.rope8 = sm.inv_freq + kD / 2;
  for (int i = threadIdx.x; i < kD / 2; i += kThreads) {
    sm.inv_freq[i] = a.inv_freq[i];
    sincosf(8.0f * a.inv_freq[i], &sm.rope8[2 * i + 1], &sm.rope8[2 * i]);
  }
  return sm;  // the first item's __syncthreads publishes B_K
}
// Dynamic shared memory up to the largest layout (ranks 128), once per kernel and process.
template <typename Kernel>
cudaError_t AllowSmem(Kernel kernel, bool* done) {
  if (*done) return cudaSuccess;
  const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             static_cast<int>(Layout(kMaxRank, kMaxRank).bytes()));
  if (e == cudaSuccess) *done = true;
  return e;
}

// Whether the kernels take `a`: a supported shape (LatentShapeSupported), aligned pointers and
// strides, a readable quantized layout (attention_latent.cu).
bool ArgsOk(const LatentAttentionArgs& a);

// Decode of groups <= 8 (attention_latent_decode.cu): the launch of its kernel over the
// schedule with LaunchLatentDecode's grid; the merge kernel is launched by the caller.
cudaError_t LaunchLatentDecodeSmallGroup(const LatentAttentionArgs& a, const DecodeSchedule& s, dim3 grid,
                                         cudaStream_t stream);

}  // namespace lorc::kernels::latent_internal
