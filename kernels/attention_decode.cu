// Split-KV ("flash-decoding") paged decode attention; see attention_paged.cuh.
//
// Partial kernel: a CTA of 128 threads takes one (work item, KV head). Threads form token
// groups of D/8 lanes (one 16-byte bf16x8 slice of a K/V row per lane); each group streams its
// share of the item's keys four tokens at a time with its own online softmax for all query heads
// of the KV head (GQA: one read of each K/V row per group of heads), then the groups' states are
// combined through shared memory. Merge kernel: per split sequence, the lse-weighted sum of its
// partial outputs.
#include <cuda_bf16.h>

#include <cmath>
#include <cstdlib>

#include "common/env_switch.h"
#include "kernels/attention_paged.cuh"
#include "kernels/attention_merge.cuh"
#include "kernels/device_query.cuh"
#include "kernels/elem_type.cuh"
#include "kernels/kv_quant.cuh"
#include "kernels/mma.cuh"
#include "kernels/pdl.cuh"

namespace lorc::kernels {
namespace {

constexpr int kThreads = 128;
constexpr int kTokensPerStep = 4;  // tokens a group loads before one softmax update
constexpr float kLog2e = 1.4426950408889634f;

// A quantized cache as this lane reads it: its channels' codes and its scales of KV head kvh in
// block 0, row 0 (K; V at + v_off). Full attention stores K and V with one geometry (head_dim
// values per head), so a token's offsets serve both sides.
struct QuantLane {
  const uint8_t* codes;
  const uint16_t* scales;
  int64_t v_off;  // bytes from K's cache to V's
  int64_t block_bytes, code_row, scale_row;
};

__device__ __forceinline__ QuantLane MakeQuantLane(const PagedAttentionArgs& a, int kvh, int c) {
  QuantLane l;
  const auto* k = static_cast<const uint8_t*>(a.k_cache);
  l.codes = KvqCodePtr(a.kv_quant, k, a.k_q, 0, 0, kvh, c);
  const uint16_t* s = KvqScalePtr(k, a.k_q, 0, 0, kvh);
  l.scales = a.kv_quant == KvQuant::kInt4 ? s + 2 * (c / kKvInt4Group) : s;
  l.v_off = static_cast<const uint8_t*>(a.v_cache) - k;
  l.block_bytes = a.k_q.block_bytes();
  l.code_row = a.k_q.code_row;
  l.scale_row = a.k_q.scale_row;
  return l;
}

// Keys and values of tokens [t0, t0 + kTokensPerStep) (zeros past kv_end) at this lane's 8 dims:
// bf16x8 rows, or (quantized cache) KvqLoadAt's codes and scale.
__device__ __forceinline__ void LoadStep(const PagedAttentionArgs& a, KvQuant kq, const int32_t* table,
                                         const __nv_bfloat16* kc, const __nv_bfloat16* vc, const QuantLane& ql,
                                         int t0, int kv_end, uint4 (&kr)[kTokensPerStep],
                                         uint4 (&vr)[kTokensPerStep]) {
#pragma unroll
  for (int j = 0; j < kTokensPerStep; ++j) {
    const int t = t0 + j;
    if (t < kv_end) {
      const int64_t block = table[t / a.block_size];
      const int row = t % a.block_size;
      if (kq == KvQuant::kNone) {
        const int64_t slot = block * a.block_size + row;
        kr[j] = __ldg(reinterpret_cast<const uint4*>(kc + slot * a.k_ld));
        vr[j] = __ldg(reinterpret_cast<const uint4*>(vc + slot * a.v_ld));
      } else {
        const int64_t b = block * ql.block_bytes;
        const uint8_t* codes = ql.codes + b + row * ql.code_row;
        const uint16_t* scales =
            reinterpret_cast<const uint16_t*>(reinterpret_cast<const uint8_t*>(ql.scales) + b + row * ql.scale_row);
        kr[j] = KvqLoadAt(kq, codes, scales);
        vr[j] = KvqLoadAt(kq, codes + ql.v_off,
                          reinterpret_cast<const uint16_t*>(reinterpret_cast<const uint8_t*>(scales) + ql.v_off));
      }
    } else {
      kr[j] = make_uint4(0, 0, 0, 0);
      vr[j] = kr[j];
    }
  }
}

// LoadStep's raw value -> 8 fp32 values and the factor they still need (the runtime dtype switch
// is uniform over the grid): bf16 values and 1, or KvqCodes8 (fp8 / int8: the codes and their
// scale, applied once per token to the reduced score or to the probability).
__device__ __forceinline__ float RawToF32(KvQuant q, const uint4& raw, float (&out)[8]) {
  if (q == KvQuant::kNone) {
    Bf16x8ToF32(raw, out);
    return 1.0f;
  }
  return KvqCodes8(q, raw, out);
}

// Both decode kernels' start (PDL, pdl.cuh). Before the wait: the schedule, query_start and the
// block tables are host uploads (the plan's metadata), never written by the kernel before this
// one, so the chain of dependent loads that leads to the first K/V address runs while that kernel
// (RoPE + KV write, or the QKV GEMV with them fused) finishes; q and the caches are read after
// the wait. Only prefetches into L1 (no value stays live: registers decide occupancy). A CTA
// without a work item leaves before the wait (false: the grid is sized for the most work the
// captured batch size can plan, usually far more than a step has: at batch 1 and a short context,
// 3 items of up to 51), so that its slot goes to the next kernel's CTAs at once. CTA row 0 always
// waits: the grid completes only after the kernel before it, which the next kernel's PdlWait
// relies on even in a step without decodes.
// before_wait(item): more of the first item's work before the wait (the tensor-core kernel's
// early K/V loads, DecodeSchedule::early_kv); called only for a CTA with a work item.
struct NothingBeforeWait {
  __device__ void operator()(const DecodeWorkItem&) const {}
};
template <typename BeforeWait = NothingBeforeWait>
__device__ __forceinline__ bool DecodePrologue(const PagedAttentionArgs& a, const DecodeSchedule& sch, int num_work,
                                               BeforeWait before_wait = {}) {
  PdlTrigger();
  if (static_cast<int>(blockIdx.y) >= max(num_work, 1)) return false;
  if (num_work > 0) {
    const DecodeWorkItem it = sch.work[blockIdx.y];
    asm volatile("prefetch.global.L1 [%0];" ::"l"(a.query_start + it.seq));
    asm volatile("prefetch.global.L1 [%0];" ::"l"(a.block_tables + static_cast<int64_t>(it.seq) * a.max_blocks_per_seq +
                                                    it.kv_start / a.block_size));
    before_wait(it);
  }
  PdlWait();
  return true;
}

// After a CTA has written its partial of a split item (every thread past a barrier): when it is
// the last chunk of this (sequence, KV head) to finish, merges the chunks into the out row. (The
// threadFenceReduction pattern: each writer fences, the barrier orders them before thread 0's
// count.) Uniform over the CTA; ends with a barrier.
template <int D>
__device__ __forceinline__ void MergeIfLastChunk(const PagedAttentionArgs& a, const DecodeSchedule& sch,
                                                 const DecodeWorkItem& item, int row, int kvh, int group) {
  if (item.partial < 0) return;
  __shared__ int s_last;
  int32_t* counter = sch.merge_counters + static_cast<int64_t>(item.merge) * kMaxPartialHeads + kvh;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    const int num = sch.merge[item.merge].num;
    const bool last = atomicAdd(counter, 1) == num - 1;
    if (last) *counter = 0;  // no other CTA touches it in this launch: zero for the next one
    s_last = last;
  }
  __syncthreads();
  if (s_last) {
    __threadfence();  // the other chunks' writes, seen through their fences and the count
    const DecodeMergeItem mi = sch.merge[item.merge];
    const int width = a.num_heads * D;
    for (int h = threadIdx.x / 32; h < group; h += blockDim.x / 32) {
      const int head = kvh * group + h;
      MergeSplitChunks(sch.partial_lse + static_cast<int64_t>(mi.first) * a.num_heads + head, a.num_heads,
                       sch.partial_out + static_cast<int64_t>(mi.first) * width + head * D, width, mi.num, D,
                       static_cast<__nv_bfloat16*>(a.out) + row * a.out_ld + head * D);
    }
  }
  __syncthreads();  // s_last is reused by the next item
}

// D: head_dim; G: the group size bucket (the real group a.num_heads / a.num_kv_heads <= G);
// kQuant: a quantized cache (a.kv_quant, switched at run time) or bf16. A separate bf16
// instantiation keeps the quantized path's registers and branches out of the bf16 kernel (one
// kernel for both measured 549 vs 409 us at batch 64 x 4k on an H200, 2026-12-01).
template <int D, int G, bool kQuant>
__global__ void __launch_bounds__(kThreads)
    DecodePartialKernel(const PagedAttentionArgs a, const DecodeSchedule sch) {
  constexpr int kLanes = D / 8;             // lanes per token
  constexpr int kGroups = kThreads / kLanes;  // token groups per CTA
  __shared__ float s_m[kGroups][G];
  __shared__ float s_l[kGroups][G];
  __shared__ __align__(16) float s_acc[kGroups][G][D];

  const int kvh = blockIdx.x;
  const int group = a.num_heads / a.num_kv_heads;
  const int lane = threadIdx.x % kLanes, tg = threadIdx.x / kLanes;
  const int num_work = sch.counts[0];
  const float qscale = a.scale * kLog2e;
  const __nv_bfloat16* kc = static_cast<const __nv_bfloat16*>(a.k_cache) + kvh * D + lane * 8;
  const __nv_bfloat16* vc = static_cast<const __nv_bfloat16*>(a.v_cache) + kvh * D + lane * 8;
  const KvQuant kq = kQuant ? a.kv_quant : KvQuant::kNone;
  const QuantLane ql = kQuant ? MakeQuantLane(a, kvh, lane * 8) : QuantLane{};  // unused for bf16

  if (!DecodePrologue(a, sch, num_work)) return;

  for (int w = blockIdx.y; w < num_work; w += gridDim.y) {
    const DecodeWorkItem item = sch.work[w];
    const int row = a.query_start[item.seq];
    const int32_t* table = a.block_tables + static_cast<int64_t>(item.seq) * a.max_blocks_per_seq;

    float q[G][8];
#pragma unroll
    for (int h = 0; h < G; ++h) {
      if (h < group) {
        const uint4 raw = *reinterpret_cast<const uint4*>(
            static_cast<const __nv_bfloat16*>(a.q) + row * a.q_ld + (kvh * group + h) * D + lane * 8);
        Bf16x8ToF32(raw, q[h]);
#pragma unroll
        for (int e = 0; e < 8; ++e) q[h][e] *= qscale;
      } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) q[h][e] = 0.f;
      }
    }
    float m[G], l[G], acc[G][8];
#pragma unroll
    for (int h = 0; h < G; ++h) {
      m[h] = -INFINITY;
      l[h] = 0.f;
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[h][e] = 0.f;
    }

    // The loop bound is uniform over the warp (the shuffles need every lane): tokens of the
    // warp's groups past kv_end are masked.
    constexpr int kGroupsPerWarp = 32 / kLanes;
    const int warp_first = item.kv_start + (tg - tg % kGroupsPerWarp) * kTokensPerStep;
    // kPrefetch: the next step's loads are issued before this step's math (register double
    // buffering; the group sizes whose registers allow it).
    constexpr bool kPrefetch = G <= 4;
    constexpr int kStride = kGroups * kTokensPerStep;
    const int my_first = warp_first + (tg % kGroupsPerWarp) * kTokensPerStep;
    uint4 kn[kTokensPerStep], vn[kTokensPerStep];
    if (kPrefetch) LoadStep(a, kq, table, kc, vc, ql, my_first, item.kv_end, kn, vn);
    for (int base = warp_first; base < item.kv_end; base += kStride) {
      const int t0 = base + (tg % kGroupsPerWarp) * kTokensPerStep;
      uint4 kr[kTokensPerStep], vr[kTokensPerStep];
      if (kPrefetch) {
#pragma unroll
        for (int j = 0; j < kTokensPerStep; ++j) {
          kr[j] = kn[j];
          vr[j] = vn[j];
        }
        LoadStep(a, kq, table, kc, vc, ql, t0 + kStride, item.kv_end, kn, vn);
      } else {
        LoadStep(a, kq, table, kc, vc, ql, t0, item.kv_end, kr, vr);
      }
      float s[kTokensPerStep][G], vscale[kTokensPerStep];
#pragma unroll
      for (int j = 0; j < kTokensPerStep; ++j) {
        float k[8];
        const float kscale = RawToF32(kq, kr[j], k);
#pragma unroll
        for (int h = 0; h < G; ++h) {
          float d = 0.f;
#pragma unroll
          for (int e = 0; e < 8; ++e) d = fmaf(q[h][e], k[e], d);
#pragma unroll
          for (int o = kLanes / 2; o > 0; o >>= 1) d += __shfl_xor_sync(0xffffffffu, d, o);
          s[j][h] = (t0 + j < item.kv_end) ? d * kscale : -INFINITY;
        }
      }
      float v[kTokensPerStep][8];
#pragma unroll
      for (int j = 0; j < kTokensPerStep; ++j) vscale[j] = RawToF32(kq, vr[j], v[j]);
#pragma unroll
      for (int h = 0; h < G; ++h) {
        float mx = s[0][h];
#pragma unroll
        for (int j = 1; j < kTokensPerStep; ++j) mx = fmaxf(mx, s[j][h]);
        const float m_new = fmaxf(m[h], mx);
        // -inf while this group has seen no key: then c and p are 0 and the state stays empty.
        const float m_ref = m_new == -INFINITY ? 0.f : m_new;
        const float c = exp2f(m[h] - m_ref);
        float p[kTokensPerStep], sum = 0.f;
#pragma unroll
        for (int j = 0; j < kTokensPerStep; ++j) {
          p[j] = exp2f(s[j][h] - m_ref);
          sum += p[j];
        }
        l[h] = l[h] * c + sum;
        m[h] = m_new;
        float pv[kTokensPerStep];  // p times the value row's scale (1 unless fp8 / int8)
#pragma unroll
        for (int j = 0; j < kTokensPerStep; ++j) pv[j] = p[j] * vscale[j];
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          float x = acc[h][e] * c;
#pragma unroll
          for (int j = 0; j < kTokensPerStep; ++j) x = fmaf(pv[j], v[j][e], x);
          acc[h][e] = x;
        }
      }
    }

    // Combine the token groups' (m, l, acc).
#pragma unroll
    for (int h = 0; h < G; ++h) {
      if (lane == 0) {
        s_m[tg][h] = m[h];
        s_l[tg][h] = l[h];
      }
#pragma unroll
      for (int e = 0; e < 8; ++e) s_acc[tg][h][lane * 8 + e] = acc[h][e];
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < group * D; idx += kThreads) {
      const int h = idx / D, d = idx % D;
      float mx = -INFINITY;
#pragma unroll
      for (int g = 0; g < kGroups; ++g) mx = fmaxf(mx, s_m[g][h]);  // finite: group 0 has a key
      float sum = 0.f, o = 0.f;
#pragma unroll
      for (int g = 0; g < kGroups; ++g) {
        const float wgt = exp2f(s_m[g][h] - mx);  // 0 for a group without keys (m = -inf)
        sum = fmaf(s_l[g][h], wgt, sum);
        o = fmaf(s_acc[g][h][d], wgt, o);
      }
      const int head = kvh * group + h;
      if (item.partial < 0) {
        static_cast<__nv_bfloat16*>(a.out)[row * a.out_ld + head * D + d] = __float2bfloat16_rn(o / sum);
      } else {
        sch.partial_out[static_cast<int64_t>(item.partial) * a.num_heads * D + head * D + d] = o / sum;
        if (d == 0) sch.partial_lse[static_cast<int64_t>(item.partial) * a.num_heads + head] = mx + log2f(sum);
      }
    }
    __syncthreads();  // s_* are reused by the next item
    MergeIfLastChunk<D>(a, sch, item, row, kvh, group);
  }
}

// ---------------------------------------------------------------------------------------------
// Tensor-core decode over a bf16 cache (FlashAttention-2's fragments on mma.sync, as the flash
// prefill kernel, attention_prefill.cu, with one 16-row m-tile: the group's query heads of the
// item's token, rows past the group zero). A CTA of 4 warps takes one (work item, KV head); warp w
// streams 16-key tiles w, w + 4, ... of the item global -> shared through its own 3-stage cp.async
// ring (no CTA barrier in the loop), S = Q K^T and O += P V on the tensor cores with P straight
// from the accumulators, the online softmax in registers; then the warps' (max, sum, O) are
// combined through shared memory and written as the CUDA-core kernel above writes them (out row or
// partial + lse, the last chunk merging). Why: that kernel is issue-bound at large batch (a dot
// product and 4 shuffles per key, query head and lane group); here a 16-key tile costs 2 x D/16
// mma for S and D/8 for P V per warp. Shared rows are XOR-swizzled 16-byte chunks (Swz).
constexpr int kMmaWarps = 4;
constexpr int kMmaThreads = 32 * kMmaWarps;
constexpr int kMmaKv = 16;     // keys per tile
constexpr int kMmaStages = 3;  // tiles in flight per warp (ring stages)

template <int D, int kStages = kMmaStages>
constexpr size_t MmaSmemBytes() {
  // the warps' K/V rings, then Q ([16][D] bf16); the combine reuses the rings
  return sizeof(__nv_bfloat16) * D * (kMmaWarps * kStages * 2 * kMmaKv + 16);
}

template <int D, int kMmaStages>
__global__ void __launch_bounds__(kMmaThreads, 2)
    DecodeMmaKernel(const PagedAttentionArgs a, const DecodeSchedule sch) {
  constexpr int kChunks = D / 8;
  constexpr int kTileElems = kMmaKv * D;
  static_assert(kMmaWarps * kMmaStages * 2 * kTileElems * 2 >= kMmaWarps * 8 * (D + 2) * 4,
                "the combine's buffers fit in the rings");
  extern __shared__ __align__(128) unsigned char smem_raw[];
  __nv_bfloat16* const rings = reinterpret_cast<__nv_bfloat16*>(smem_raw);
  __nv_bfloat16* const sq = rings + kMmaWarps * kMmaStages * 2 * kTileElems;

  const int kvh = blockIdx.x;
  const int group = a.num_heads / a.num_kv_heads;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t4 = lane % 4;
  const int num_work = sch.counts[0];
  const float scale2 = a.scale * kLog2e;
  const __nv_bfloat16* kc = static_cast<const __nv_bfloat16*>(a.k_cache) + kvh * D;
  const __nv_bfloat16* vc = static_cast<const __nv_bfloat16*>(a.v_cache) + kvh * D;
  __nv_bfloat16* const ring = rings + warp * kMmaStages * 2 * kTileElems;  // stage s: K, then V

  // This warp's i-th tile of `item` into ring stage i % kMmaStages: the rows t with
  // (t == late) == only_late, zeros past item.kv_end (masked; 0 x V must not be NaN).
  auto issue_rows = [&](const DecodeWorkItem& item, int i, int late, bool only_late) {
    const int32_t* table = a.block_tables + static_cast<int64_t>(item.seq) * a.max_blocks_per_seq;
    __nv_bfloat16* sk = ring + (i % kMmaStages) * 2 * kTileElems;
    __nv_bfloat16* sv = sk + kTileElems;
    const int kv0 = item.kv_start + (warp + kMmaWarps * i) * kMmaKv;
#pragma unroll
    for (int j = 0; j < kMmaKv * kChunks / 32; ++j) {
      const int idx = lane + 32 * j;
      const int r = idx / kChunks, c = idx % kChunks;
      const int t = kv0 + r;
      if ((t == late) != only_late) continue;
      const bool valid = t < item.kv_end;
      int64_t slot = 0;
      if (valid) slot = static_cast<int64_t>(table[t / a.block_size]) * a.block_size + t % a.block_size;
      CpAsync16(sk + Swz<D>(r, c), kc + slot * a.k_ld + c * 8, valid);
      CpAsync16(sv + Swz<D>(r, c), vc + slot * a.v_ld + c * 8, valid);
    }
  };
  auto tiles_of = [&](const DecodeWorkItem& item) {
    const int num_tiles = (item.kv_end - item.kv_start + kMmaKv - 1) / kMmaKv;
    return num_tiles > warp ? (num_tiles - warp + kMmaWarps - 1) / kMmaWarps : 0;
  };
  // Early K/V (sch.early_kv): the first item's first kMmaStages - 1 tiles of this warp are
  // issued before the PDL wait, all but the item's last key, the one row the kernel before this
  // one may be writing (a decode's new token; pdl.cuh, "Early K/V"). The item's first pass of
  // the loop below waits for all of them (and its last key) before it starts.
  const bool early = sch.early_kv;
  auto early_issue = [&](const DecodeWorkItem& item) {
    if (!early) return;
    const int my_tiles = tiles_of(item);
#pragma unroll
    for (int i = 0; i < kMmaStages - 1; ++i) {
      if (i < my_tiles) issue_rows(item, i, item.kv_end - 1, /*only_late=*/false);
      CpAsyncCommit();
    }
  };
  if (!DecodePrologue(a, sch, num_work, early_issue)) return;

  uint32_t q_off[4], k_off[4], v_off[4];
  SwzLdsmOffsets<D>(lane, SmemAddr(sq), q_off, k_off, v_off);

  for (int w = blockIdx.y; w < num_work; w += gridDim.y) {
    const DecodeWorkItem item = sch.work[w];
    const int row = a.query_start[item.seq];
    // Q: row r < group is head kvh * group + r of the item's token; zeros below.
    const __nv_bfloat16* qg = static_cast<const __nv_bfloat16*>(a.q) + static_cast<int64_t>(row) * a.q_ld +
                              static_cast<int64_t>(kvh) * group * D;
    for (int idx = tid; idx < 16 * kChunks; idx += kMmaThreads) {
      const int r = idx / kChunks, c = idx % kChunks;
      const bool valid = r < group;
      CpAsync16(sq + Swz<D>(r, c), valid ? qg + r * D + c * 8 : qg, valid);
    }

    const int my_tiles = tiles_of(item);
    auto issue = [&](int i) { issue_rows(item, i, -1, /*only_late=*/false); };
    if (early && w == static_cast<int>(blockIdx.y)) {
      // The first item's tiles are in flight since the prologue: add its last key (if this
      // warp's early tiles hold it) to Q's group and wait for all of them.
#pragma unroll
      for (int i = 0; i < kMmaStages - 1; ++i) {
        if (i < my_tiles) issue_rows(item, i, item.kv_end - 1, /*only_late=*/true);
      }
      CpAsyncCommit();
      CpAsyncWait<0>();
    } else {
      CpAsyncCommit();  // Q first
#pragma unroll
      for (int i = 0; i < kMmaStages - 1; ++i) {
        if (i < my_tiles) issue(i);
        CpAsyncCommit();
      }
      CpAsyncWait<kMmaStages - 1>();  // Q (committed first) has landed, for this thread
    }
    __syncthreads();                // ... and for everyone
    uint32_t qa[D / 16][4];
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) Ldsm4(qa[kk], q_off[kk & 3] + 32 * (kk & 4));

    float o[D / 8][4];
#pragma unroll
    for (int n = 0; n < D / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
    float m = -INFINITY, l = 0.f;  // row g: raw-score max, this lane's part of the sum
    for (int i = 0; i < my_tiles; ++i) {
      CpAsyncWait<kMmaStages - 2>();  // tile i has landed (this thread's copies)
      __syncwarp();                   // everyone's, and every lane is done with tile i - 1's stage
      if (i + kMmaStages - 1 < my_tiles) issue(i + kMmaStages - 1);
      CpAsyncCommit();
      const uint32_t sk = SmemAddr(ring + (i % kMmaStages) * 2 * kTileElems);
      const uint32_t sv = sk + kTileElems * 2;
      float s[2][4] = {};
      TileQK<D>(qa, sk, k_off, s);
      const int kv0 = item.kv_start + (warp + kMmaWarps * i) * kMmaKv;
#pragma unroll
      for (int n = 0; n < 2; ++n) {
        const int key = kv0 + n * 8 + 2 * t4;
        if (key >= item.kv_end) s[n][0] = -INFINITY;
        if (key + 1 >= item.kv_end) s[n][1] = -INFINITY;
      }
      uint32_t pa[4];
      SoftmaxTileStep<D>(s, scale2, m, l, o, pa, [](int, int) { return 1.f; });
      TilePV<D>(pa, sv, v_off, o);
    }
    CpAsyncWait<0>();
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);

    // Combine the warps: [warp][row][D + 2] floats (O, then max and sum) over the rings.
    __syncthreads();  // every warp is done with its ring
    float* const comb = reinterpret_cast<float*>(smem_raw);
    StoreWarpState<D>(comb, warp, g, t4, group, o, m, l);
    __syncthreads();
    for (int idx = tid; idx < group * D; idx += kMmaThreads) {
      const int h = idx / D, d = idx % D;
      float mx, sum;
      const float out = CombineWarpStates<D, kMmaWarps>(comb, h, d, scale2, mx, sum);  // warp 0 has a key
      const int head = kvh * group + h;
      if (item.partial < 0) {
        static_cast<__nv_bfloat16*>(a.out)[row * a.out_ld + head * D + d] = __float2bfloat16_rn(out / sum);
      } else {
        sch.partial_out[static_cast<int64_t>(item.partial) * a.num_heads * D + head * D + d] = out / sum;
        if (d == 0) sch.partial_lse[static_cast<int64_t>(item.partial) * a.num_heads + head] = mx * scale2 + log2f(sum);
      }
    }
    __syncthreads();  // comb (the rings) and sq are reused by the next item
    MergeIfLastChunk<D>(a, sch, item, row, kvh, group);
  }
}

// Whether the bf16 decodes of a launch run on the tensor cores (DecodeMmaKernel): sm_80+, unless
// LORC_DECODE_MMA=0 (the CUDA-core kernel, kept for A/B measurements and as the fallback of older
// GPUs). Read once per process.
bool UseDecodeMma() {
  static const bool use = TensorCoreKernelsEnabled("LORC_DECODE_MMA");
  return use;
}

// Both decode kernels' grid: enough CTAs for several waves of resident work (`ctas_per_sm` x the
// SMs over the KV heads), at most one per work item the launch can meet (grid_work, else the
// capacity); each CTA strides over the work list. KV heads along x, so that the CTAs of the first
// work items are dispatched first.
dim3 DecodeGrid(const PagedAttentionArgs& a, const DecodeSchedule& s, int ctas_per_sm) {
  const int per_head = (ctas_per_sm * s.num_sms + a.num_kv_heads - 1) / a.num_kv_heads;
  const int work = s.grid_work > 0 && s.grid_work < s.max_work ? s.grid_work : s.max_work;
  return dim3(static_cast<unsigned>(a.num_kv_heads), static_cast<unsigned>(per_head < work ? per_head : work));
}

template <int D, int kStages>
cudaError_t LaunchMmaStages(const PagedAttentionArgs& a, const DecodeSchedule& s, cudaStream_t stream) {
  constexpr size_t smem = MmaSmemBytes<D, kStages>();
  static bool allowed = false;  // once per process (a worker drives one device)
  if (!allowed) {
    const cudaError_t e = cudaFuncSetAttribute(DecodeMmaKernel<D, kStages>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               static_cast<int>(smem));
    if (e != cudaSuccess) return e;
    allowed = true;
  }
  return LaunchPdl(DecodeMmaKernel<D, kStages>, DecodeGrid(a, s, 4), kMmaThreads, smem, stream, nullptr, a, s);
}

template <int D>
cudaError_t LaunchMma(const PagedAttentionArgs& a, const DecodeSchedule& s, cudaStream_t stream) {
  // Ring stages by the decodes served (kDecodeMmaMinSeqs, attention_paged.cuh): 2 (68 KiB a CTA
  // at head_dim 128) below it, 3 (100 KiB) from it. LORC_DECODE_MMA_STAGES=2 or 3 forces one
  // (A/B measurements; 0: by the decodes served).
  static const int forced = static_cast<int>(EnvIntOf("LORC_DECODE_MMA_STAGES", {0, 2, 3}, 0));
  const int stages = forced != 0 ? forced : s.num_decodes >= kDecodeMmaMinSeqs ? 3 : 2;
  return stages == 2 ? LaunchMmaStages<D, 2>(a, s, stream) : LaunchMmaStages<D, 3>(a, s, stream);
}

template <int D, int G>
cudaError_t LaunchPartial(const PagedAttentionArgs& a, const DecodeSchedule& s, cudaStream_t stream) {
  const dim3 grid = DecodeGrid(a, s, 8);
  return a.kv_quant == KvQuant::kNone ? LaunchPdl(DecodePartialKernel<D, G, false>, grid, kThreads, 0, stream, nullptr, a, s)
                                      : LaunchPdl(DecodePartialKernel<D, G, true>, grid, kThreads, 0, stream, nullptr, a, s);
}

template <int D>
cudaError_t LaunchPartialForGroup(const PagedAttentionArgs& a, const DecodeSchedule& s, int group,
                                  cudaStream_t stream) {
  if (group <= 1) return LaunchPartial<D, 1>(a, s, stream);
  if (group <= 2) return LaunchPartial<D, 2>(a, s, stream);
  if (group <= 4) return LaunchPartial<D, 4>(a, s, stream);
  return LaunchPartial<D, 8>(a, s, stream);
}

}  // namespace

cudaError_t LaunchDecodeAttention(const PagedAttentionArgs& a, const DecodeSchedule& s,
                                  cudaStream_t stream) {
  if ((a.head_dim != 64 && a.head_dim != 128) || a.num_kv_heads <= 0 ||
      a.num_heads % a.num_kv_heads != 0 || a.num_heads / a.num_kv_heads > 8 ||
      a.num_heads * a.head_dim > kMaxPartialWidth || a.num_heads > kMaxPartialHeads ||
      a.block_size <= 0 || s.max_work <= 0 || s.max_merge <= 0 || s.num_sms <= 0) {
    return cudaErrorInvalidValue;
  }
  if (!Aligned16(a.q) || !Aligned16(a.out) || !Aligned16(a.k_cache) || !Aligned16(a.v_cache) ||
      a.q_ld % 8 != 0 || a.out_ld % 8 != 0 || a.k_ld % 8 != 0 || a.v_ld % 8 != 0) {
    return cudaErrorInvalidValue;
  }
  if (a.kv_quant != KvQuant::kNone &&
      (!KvqSideReadable(a.kv_quant, a.k_q, a.block_size) || !KvqSideReadable(a.kv_quant, a.v_q, a.block_size) ||
       a.k_q.code_row != a.v_q.code_row || a.k_q.scale_row != a.v_q.scale_row)) {
    return cudaErrorInvalidValue;  // K and V of one geometry (QuantLane)
  }
  const int group = a.num_heads / a.num_kv_heads;
  if (s.merge_counters == nullptr) return cudaErrorInvalidValue;
  if (a.kv_quant == KvQuant::kNone && UseDecodeMma()) {
    return a.head_dim == 64 ? LaunchMma<64>(a, s, stream) : LaunchMma<128>(a, s, stream);
  }
  const cudaError_t e = a.head_dim == 64 ? LaunchPartialForGroup<64>(a, s, group, stream)
                                          : LaunchPartialForGroup<128>(a, s, group, stream);
  return e;
}

}  // namespace lorc::kernels
