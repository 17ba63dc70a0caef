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
// merge kernel combines by their log-sum-exp.
#include <cuda_bf16.h>

#include <cmath>
#include <type_traits>

#include "kernels/attention_latent.cuh"
#include "kernels/elem_type.cuh"

namespace lorc::kernels {
namespace {

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
// fp32 m[16], l[16], O[16][ldo]), then inv_freq [kD / 2] fp32.
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

__device__ __forceinline__ uint32_t SmemAddr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
// 16 bytes global -> shared; zero-filled when !valid (src is then not read).
__device__ __forceinline__ void CpAsync16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(SmemAddr(dst)), "l"(src),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void CpAsyncCommit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
__device__ __forceinline__ void Ldsm4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(SmemAddr(p)));
}
__device__ __forceinline__ void Ldsm4T(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(SmemAddr(p)));
}
// d += a b (m16n8k16, bf16 inputs, fp32 accumulators).
__device__ __forceinline__ void Mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
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
__device__ __forceinline__ uint32_t PackBf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // lo in the low half (the lower column)
  return *reinterpret_cast<uint32_t*>(&v);
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
        table(a_.block_tables + static_cast<int64_t>(it_.seq) * a_.max_blocks_per_seq),
        kc(static_cast<const __nv_bfloat16*>(a_.k_cache) + blockIdx.y * a_.k_rank),
        vc(static_cast<const __nv_bfloat16*>(a_.v_cache) + blockIdx.y * a_.v_rank), kch(a_.k_rank / 8),
        chunks(a_.k_rank / 8 + a_.v_rank / 8), per_lane((kTile * chunks + 31) / 32),
        magic(0xffffffffu / static_cast<uint32_t>(chunks) + 1u) {}
  __device__ void Issue(int stage, int64_t my_slot) const {
    __nv_bfloat16* ck = region + stage * L.stage_elems;
    __nv_bfloat16* cv = ck + kTile * L.ldk;
    for (int j = 0; j < per_lane; ++j) {  // uniform over the warp (the shuffle needs all lanes)
      const int idx = lane + 32 * j;
      const int r = static_cast<int>(__umulhi(static_cast<uint32_t>(idx), magic)), c = idx - r * chunks;
      const int64_t slot = __shfl_sync(0xffffffffu, my_slot, r & 31);
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
  // Lane l's token in a tile starting at `base` is base + l % 16; -1: past kv_end.
  __device__ int64_t SlotOf(int base) const {
    const int tok = base + lane % kTile;
    return tok < it.kv_end ? static_cast<int64_t>(table[tok / a.block_size]) * a.block_size + tok % a.block_size
                           : int64_t{-1};
  }
};

// TileLoader for the fixed layout Layout(64, 64) (ranks <= 64): a token row is 16 pieces of 16
// bytes (C_K chunks 0-7, C_V chunks 0-7), a warp instruction covers two rows; pieces past a rank
// are zero-filled (C_K's padding columns zero, no reads), so there is no padding pass.
struct FixedTileLoader {
  static constexpr Layout L{64, 64};
  const Item& it;
  int lane;
  const int32_t* table;
  int block_size;
  __nv_bfloat16* dst;        // this lane's piece in row 0 of stage 0
  const __nv_bfloat16* src;  // this lane's piece in slot 0
  int64_t ld;
  bool in_rank;
  __device__ FixedTileLoader(const LatentAttentionArgs& a, const Layout&, const Item& it_, __nv_bfloat16* region,
                             int lane_)
      : it(it_), lane(lane_), table(a.block_tables + static_cast<int64_t>(it_.seq) * a.max_blocks_per_seq),
        block_size(a.block_size) {
    const int pc = lane & 15, c = pc & 7;
    const bool v = pc >= 8;
    dst = region + (v ? kTile * L.ldk : 0) + 8 * c;
    src = v ? static_cast<const __nv_bfloat16*>(a.v_cache) + blockIdx.y * a.v_rank + 8 * c
            : static_cast<const __nv_bfloat16*>(a.k_cache) + blockIdx.y * a.k_rank + 8 * c;
    ld = v ? a.v_ld : a.k_ld;
    in_rank = 8 * c < (v ? a.v_rank : a.k_rank);
    if (!in_rank) src = static_cast<const __nv_bfloat16*>(v ? a.v_cache : a.k_cache);
  }
  __device__ __forceinline__ void Issue(int stage, int my_slot) const {
    static_assert(L.ldk == L.ldv, "one row stride for both latents");
#pragma unroll
    for (int j = 0; j < kTile / 2; ++j) {
      const int r = 2 * j + (lane >> 4);
      const int slot = __shfl_sync(0xffffffffu, my_slot, r);
      const bool valid = in_rank && slot >= 0;
      CpAsync16(dst + stage * L.stage_elems + r * L.ldk, src + (valid ? slot : 0) * ld, valid);
    }
  }
  // Lane l's token in a tile starting at `base` is base + l % 16; -1: past kv_end.
  __device__ __forceinline__ int SlotOf(int base) const {
    const int tok = base + lane % kTile;
    return tok < it.kv_end ? table[tok / block_size] * block_size + tok % block_size : -1;
  }
};

// After each warp left its fp32 (m[16], l[16], O[16][ldo]) in its region (and a block barrier):
// rows [0, rows) combined over the warps, written to out or to the item's partial slot. Ends
// with a block barrier (regions are reused by the next item).
__device__ __forceinline__ void CombineWarps(const LatentAttentionArgs& a, const Layout& L, const Smem& sm, const Item& it, int rows,
                             float* partial_out, float* partial_lse) {
  const int kvh = blockIdx.y;
  const int group = a.num_heads / a.num_kv_heads;
  const int rv = a.v_rank;
  const int row0 = a.query_start[it.seq];
  const int width = a.num_heads * rv;
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
    const int head = kvh * group + r % group;
    if (it.partial < 0) {
      const int64_t row = row0 + it.q_first + r / group;
      static_cast<__nv_bfloat16*>(a.out)[row * a.out_ld + head * rv + col] = __float2bfloat16_rn(acc / sum);
    } else {
      partial_out[static_cast<int64_t>(it.partial) * width + head * rv + col] = acc / sum;
      if (col == 0) partial_lse[static_cast<int64_t>(it.partial) * a.num_heads + head] = mx + log2f(sum);
    }
  }
  __syncthreads();  // regions and Q are reused by the next item
}

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
      // RoPE (rotate_half) at each row's position.
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float2 f = *reinterpret_cast<const float2*>(sm.inv_freq + 8 * (4 * h + j) + 2 * t);
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const float pos = static_cast<float>(base + g + 8 * r);
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            float sn, cs;
            AngleSinCos(__fmul_rn(pos, e == 0 ? f.x : f.y), &sn, &cs);
            const float x1 = acc[j][2 * r + e], x2 = acc[j + 4][2 * r + e];
            acc[j][2 * r + e] = fmaf(x1, cs, -x2 * sn);
            acc[j + 4][2 * r + e] = fmaf(x2, cs, x1 * sn);
          }
        }
      }
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
  CombineWarps(a, L, sm, it, rows, partial_out, partial_lse);
}

// Per CTA: shared-memory carve-up, B_K of the CTA's KV head (zero-padded to rkp columns) and the
// RoPE frequencies.
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

// Decode items of groups <= 8 (one query token; the group's heads fit one mma n-tile), with the
// score transposed: S [16 tokens x 8 heads] = K Q^T, so K's accumulators are the A fragments
// as they stand and Q^T is a B operand held in registers for the whole item (no Q in shared
// memory); P^T reaches the B layout by movmatrix and O^T [r_v x 8 heads] += C_V^T P^T runs
// over 16-row tiles of value columns. Per 16-token tile this halves the score and value mma
// count and the softmax work of ProcessItem (whose 16 rows are mostly padding at group <= 8),
// and C_K's A fragments are loaded once for both key halves. KS / VM: k-steps of C_K (>= rkp /
// 16) and 16-column tiles of C_V (>= rvp / 16) held in registers.
__device__ __forceinline__ uint32_t MovTrans(uint32_t x) {
  uint32_t y;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
  return y;
}

template <int KS, int VM, bool FR>
__device__ __forceinline__ void DecodeItemT(const LatentAttentionArgs& a, const Layout& L, const Smem& sm, const Item& it,
                            float* partial_out, float* partial_lse) {
  // KS = VM = 4: L is Layout(64, 64) (compile-time strides) whatever the ranks <= 64.
  constexpr bool kFixed = KS == 4 && VM == 4;
  using Loader = std::conditional_t<kFixed, FixedTileLoader, TileLoader>;
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
                              static_cast<int64_t>(a.query_start[it.seq]) * a.q_ld + (kvh * group + g) * kD;
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
  if (first < it.kv_end) ld.Issue(0, ld.SlotOf(first));
  CpAsyncCommit();
  auto next_slot = ld.SlotOf(first + kStep);
  int stage = 0;
  for (int base = first; base < it.kv_end; base += kStep) {  // uniform over the warp
    if (base + kStep < it.kv_end) ld.Issue(stage ^ 1, next_slot);
    CpAsyncCommit();
    next_slot = ld.SlotOf(base + 2 * kStep);
    CpAsyncWait<1>();
    __syncwarp();
    const __nv_bfloat16* ck = region + stage * L.stage_elems;
    const __nv_bfloat16* cv = ck + kTile * L.ldk;

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
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float2 f = *reinterpret_cast<const float2*>(sm.inv_freq + 8 * (4 * h + j) + 2 * t);
        if (FR) {  // token g + 8's angle: token g's rotated on by 8 * inv_freq
          const float4 r8 = *reinterpret_cast<const float4*>(sm.rope8 + 2 * (8 * (4 * h + j) + 2 * t));
          const float pos = static_cast<float>(base + g);
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            float sn, cs;
            AngleSinCos(__fmul_rn(pos, e == 0 ? f.x : f.y), &sn, &cs);
            const float c8 = e == 0 ? r8.x : r8.z, s8 = e == 0 ? r8.y : r8.w;
#pragma unroll
            for (int r = 0; r < 2; ++r) {
              if (r == 1) {
                const float c1 = fmaf(cs, c8, -sn * s8);
                sn = fmaf(sn, c8, cs * s8);
                cs = c1;
              }
              const float x1 = acc[j][2 * r + e], x2 = acc[j + 4][2 * r + e];
              acc[j][2 * r + e] = fmaf(x1, cs, -x2 * sn);
              acc[j + 4][2 * r + e] = fmaf(x2, cs, x1 * sn);
            }
          }
          continue;
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const float pos = static_cast<float>(base + g + 8 * r);
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            float sn, cs;
            AngleSinCos(__fmul_rn(pos, e == 0 ? f.x : f.y), &sn, &cs);
            const float x1 = acc[j][2 * r + e], x2 = acc[j + 4][2 * r + e];
            acc[j][2 * r + e] = fmaf(x1, cs, -x2 * sn);
            acc[j + 4][2 * r + e] = fmaf(x2, cs, x1 * sn);
          }
        }
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
  CombineWarps(a, L, sm, it, group, partial_out, partial_lse);
}

template <int KS, int VM, bool FR>
__global__ void __launch_bounds__(kThreads, KS <= 4 && VM <= 4 ? 2 : 1)
    LatentDecodeKernelT(const LatentAttentionArgs a, const DecodeSchedule sch) {
  const int num_work = sch.counts[0];
  if (static_cast<int>(blockIdx.x) >= num_work) return;
  const Layout L = KS == 4 && VM == 4 ? FixedTileLoader::L : Layout(a.k_rank, a.v_rank);
  const Smem sm = Setup(a, L);
  for (int w = blockIdx.x; w < num_work; w += gridDim.x) {
    const DecodeWorkItem wi = sch.work[w];
    const Item it{wi.seq, 0, 1, wi.kv_start, wi.kv_end, wi.partial};
    DecodeItemT<KS, VM, FR>(a, L, sm, it, sch.partial_out, sch.partial_lse);
  }
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

// One warp per (split sequence, query head): the chunks' lse reduced by the lanes, then each lane
// sums the weighted partials of its columns (v_rank wide).
__global__ void __launch_bounds__(kThreads) LatentMergeKernel(const LatentAttentionArgs a, const DecodeSchedule sch) {
  const int pairs = sch.counts[1] * a.num_heads;
  const int rv = a.v_rank, width = a.num_heads * rv;
  const int lane = threadIdx.x % 32, warps = gridDim.x * (kThreads / 32);
  for (int pi = blockIdx.x * (kThreads / 32) + threadIdx.x / 32; pi < pairs; pi += warps) {
    const DecodeMergeItem it = sch.merge[pi / a.num_heads];
    const int head = pi % a.num_heads;
    const float* lse = sch.partial_lse + static_cast<int64_t>(it.first) * a.num_heads + head;
    float mx = -INFINITY;
    for (int i = lane; i < it.num; i += 32) mx = fmaxf(mx, lse[static_cast<int64_t>(i) * a.num_heads]);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    float sum = 0.f;
    for (int i = lane; i < it.num; i += 32) sum += exp2f(lse[static_cast<int64_t>(i) * a.num_heads] - mx);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    const float inv = 1.0f / sum;
    const float* src = sch.partial_out + static_cast<int64_t>(it.first) * width + head * rv;
    __nv_bfloat16* dst = static_cast<__nv_bfloat16*>(a.out) + a.query_start[it.seq] * a.out_ld + head * rv;
    for (int col = lane; col < rv; col += 32) {
      float acc = 0.f;
      for (int i = 0; i < it.num; ++i) {
        acc = fmaf(exp2f(lse[static_cast<int64_t>(i) * a.num_heads] - mx), src[static_cast<int64_t>(i) * width + col], acc);
      }
      dst[col] = __float2bfloat16_rn(acc * inv);
    }
  }
}

bool ArgsOk(const LatentAttentionArgs& a) {
  return LatentShapeSupported(a.num_heads, a.num_kv_heads, a.head_dim, a.k_rank, a.v_rank) && a.block_size > 0 &&
         a.inv_freq != nullptr && Aligned16(a.q) && Aligned16(a.out) && Aligned16(a.k_up) && Aligned16(a.k_cache) &&
         Aligned16(a.v_cache) && a.q_ld % 8 == 0 && a.out_ld % 8 == 0 && a.k_up_ld % 8 == 0 && a.k_ld % 8 == 0 &&
         a.v_ld % 8 == 0;
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

}  // namespace

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
  if (group <= 8 && a.k_rank <= 64 && a.v_rank <= 64) {
    static bool smem_set = false;
    if ((e = AllowSmem(LatentDecodeKernelT<4, 4, true>, &smem_set)) != cudaSuccess) return e;
    LatentDecodeKernelT<4, 4, true><<<grid, kThreads, FixedTileLoader::L.bytes(), stream>>>(a, s);
  } else if (group <= 8) {
    static bool smem_set = false;
    if ((e = AllowSmem(LatentDecodeKernelT<8, 8, false>, &smem_set)) != cudaSuccess) return e;
    LatentDecodeKernelT<8, 8, false><<<grid, kThreads, smem, stream>>>(a, s);
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
