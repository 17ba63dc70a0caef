// The token-level KV policies' decode over a LoRC latent layer (kv_policy.cuh
// LaunchKvPolicyLatentDecode; CORM, and MiKV's low keys): the latent decode's item body
// (attention_latent_decode_item.cuh DecodeItemT) walking the keys a policy keeps instead of a
// sequence's tokens, then the tensor-core policy decode's importance and reduce passes
// (kv_policy_decode_mma.cu LaunchImportanceAndReduce).
//
// (1) PolicyLatentKernel, one CTA of 8 warps per (span of 1, 2 or 4 chunks of kKvPolicyChunk
//     walk indices, KV head, entry): each thread classifies its walk indices (slot -> pos ->
//     state; MiKV: then the head's packed entries, each with its packed_pos), a block scan lists
//     the span's keys in walk order with their cache slots (a packed key: its entry) and
//     positions, then
//     one item runs over the list: 16-key tiles of C_K and C_V by cp.async (bf16, or codes
//     dequantized as the paged latent decode does; MiKV's low rows then written in the landed
//     tile by ListKeys::Fix, from their slots quantized on the fly or from the head's run), K =
//     C_K B_K^T on mma.sync, RoPE at each listed key's own position (a compaction moves keys, so
//     slots are not positions; a tile of 16 consecutive positions rotates row g + 8 on from row
//     g, as the paged decode), S = K Q^T, the online softmax and O^T += C_V^T P^T. Each valid
//     score (scale x q . k, fp32) is saved for (2); the span's first chunk gets its key count
//     (t's share: full and low keys), its normalised partial O (r_v of each head's head_dim
//     columns) and (its log-sum-exp in natural-log units, 1) as the chunk's (max, sum):
//     exp(lse_c - M) = l_c exp(m_c - M), so the shared passes combine chunks unchanged; the
//     span's other chunks get no keys and (-inf, 0), which those passes skip.
// (2) The importance of the full keys (p = exp(s - M) / Z >= 1 / t) and (3) the reduce, r_v
//     columns per query head.
// Against the CPU (fp32 throughout): K and P enter the mma as bf16 (the latent decode's
// tolerance), the scores are summed in another order; a low key's values are the CPU's bit for
// bit in fp32 before that bf16 rounding.
#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <type_traits>

#include "common/env_switch.h"
#include "kernels/attention_latent_decode_item.cuh"
#include "kernels/kv_policy.cuh"
#include "kernels/kv_policy_device.cuh"

namespace lorc::kernels {
namespace {

using namespace latent_internal;  // NOLINT: the latent kernels' internal helpers
using kvp::Scratch;

// A CTA takes a span of `span` consecutive policy chunks (1, 2 or 4; LaunchKvPolicyLatentDecode
// picks it), listing up to kMaxSpan x kKvPolicyChunk keys for one item: longer items amortize the
// item's start (B_K, Q, the cp.async pipeline filling) over more 16-key tiles. MiKV lists up to
// kMaxSpanLow chunks: its list's per-key shared memory (where packed entries lie) at 4 would cost
// the fixed layout its second CTA per SM.
constexpr int kMaxSpan = 4, kMaxSpanLow = 2;
static_assert(kMaxSpan * kKvPolicyChunk % kThreads == 0 && kMaxSpan * kKvPolicyChunk <= 65536,
              "s_off holds a uint16_t");

__device__ __forceinline__ float2 Bf16x2ToFloat2(uint32_t x) {
  return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&x));
}

// A listed key's kind (MiKV; CORM lists full keys only).
constexpr uint8_t kRowFull = 0, kRowLowSlot = 1, kRowPacked = 2;

// MiKV's context of a CTA's (entry, KV head), in shared memory: the latent cache's two sides as
// the policy kernels address a head's region, the head, the bits and each side's entry bytes.
struct LowCtx {
  kvp::CacheSide kc, vc;
  int32_t head, bits, k_entry, v_entry;
};
// Written field by field into raw shared bytes (a __shared__ variable cannot have a constructor).
static_assert(std::is_trivially_copyable_v<LowCtx> && std::is_trivially_destructible_v<LowCtx>);

// Where a packed key's entries lie (MiKV; filled by the classification), per side, in 4-byte
// words from the side's cache base: a, the first word covering the entry (in the region of the
// run slot holding its first byte), b, the first word of the next run slot's region (where an
// entry straddles two), and m = the words from a to its region's end | 0x80 when the entry
// starts 2 bytes into word a. 32-bit word offsets reach 16 GiB, past any one layer's cache.
// A region is at most a bf16 row of kD values (256 bytes, 64 words): m's 7 bits hold its words.
static_assert(2 * kD / 4 < 0x80, "PackedAt's m");
struct PackedAt {
  uint32_t* ka;  // = the list's slot array (a packed key has no slot of its own)
  uint32_t* kb;
  uint32_t* va;
  uint32_t* vb;
  uint8_t* km;
  uint8_t* vm;
};

// The span's list (shared memory): key j's cache slot, position and walk index - p0; kLow: its
// kind and, packed, where its entries lie.
template <bool kLow>
struct ListKeys {
  static constexpr bool kConsecutive = false;
  static constexpr bool kScores = true;
  static constexpr bool kFix = kLow;
  const int32_t* slot;
  const int32_t* pos;
  const uint16_t* off;
  int n;
  float* scores;        // the entry's (head 0 of the group, walk index p0); null: not recorded
  int64_t head_stride;  // max_seq_len
  const uint8_t* kind;  // kLow
  PackedAt at;          // kLow
  const LowCtx* low;    // kLow
  // A packed key has no slot: the loaders copy its raw words (Packed, CopyRaw) and Fix decodes them.
  __device__ __forceinline__ int Slot(int j) const {
    if (j >= n) return -1;
    if constexpr (kLow) {
      if (kind[j] == kRowPacked) return -1;
    }
    return slot[j];
  }
  __device__ __forceinline__ int Pos(int j) const { return j < n ? pos[j] : 0; }
  __device__ __forceinline__ void Score(int j, int h, float s) const {
    if (scores != nullptr) scores[h * head_stride + off[j]] = s;
  }
  __device__ __forceinline__ bool Packed(int j) const { return kLow && j < n && kind[j] == kRowPacked; }
  // Words [w0, w0 + count) of the 4-byte aligned words covering row j's entry on side v (its
  // first word holds the entry's first byte at byte 0 or 2: entries and regions are whole 2-byte
  // words, regions whole 4-byte ones, so no word straddles two slots) to dst, those that exist:
  // by cp.async (kAsync) or loaded and stored.
  template <bool kAsync>
  __device__ __forceinline__ void CopyRaw(int j, bool v, int w0, int count, uint32_t* dst) const {
    const LowCtx& c = *low;
    const uint32_t m = v ? at.vm[j] : at.km[j];
    const int end = min(w0 + count, (static_cast<int>(m >> 6 & 2u) + (v ? c.v_entry : c.k_entry) + 3) >> 2);
    if (w0 >= end) return;
    const int na = static_cast<int>(m & 0x7fu);
    const uint32_t* base = reinterpret_cast<const uint32_t*>(v ? c.vc.base : c.kc.base);
    const uint32_t wa = v ? at.va[j] : at.ka[j], wb = v ? at.vb[j] : at.kb[j];
    for (int w = w0; w < end; ++w) {
      const uint32_t* src = base + (w < na ? wa + w : wb + (w - na));
      if constexpr (kAsync) {
        CpAsyncSmall(dst + (w - w0), src, false, true);
      } else {
        dst[w - w0] = *src;
      }
    }
  }
  // The low rows of the landed tile of list entries [base, base + 16): lane l writes side l / 16
  // (C_K, C_V) of row l % 16 with its entry's values (kvpolicy/low_precision.h, bit for bit in
  // fp32, then bf16; zeros past the rank to the padded width):
  //  - a packed key: from its raw words, which the loader put at raw_k / raw_v + row x raw_ld;
  //  - a demoted key still in its slot: its row quantized and dequantized (QuantizeLow, no key
  //    balance over latents), from the tile itself over a bf16 cache (the stored values), else
  //    from its slot in fp32 (as the CPU's LoadKvHead: the codes' exact values).
  // FIXED: the fixed Layout(64, 64) (ranks <= 64: entries of <= 36 bytes, 10 words), else ranks
  // <= 128 (68 bytes, 18 words).
  template <bool FIXED>
  __device__ __forceinline__ void Fix(__nv_bfloat16* ck, __nv_bfloat16* cv, int base, const Layout& L,
                                      const uint8_t* raw_k, const uint8_t* raw_v, int raw_ld_k, int raw_ld_v,
                                      int lane) const {
    constexpr int kMaxWords = FIXED ? 10 : 18, kMaxValues = FIXED ? 64 : 128;
    const int row = lane & 15, j = base + row;
    const uint8_t kd = j < n ? kind[j] : kRowFull;
    if (__all_sync(0xffffffffu, kd == kRowFull)) return;  // a tile of full keys only
    if (kd != kRowFull) {
      const LowCtx& c = *low;
      const bool v = lane >= 16;
      const int width = v ? c.vc.head_dim : c.kc.head_dim, padded = v ? L.rvp : L.rkp, bits = c.bits;
      __nv_bfloat16* out = v ? cv + row * L.ldv : ck + row * L.ldk;
      if (kd == kRowPacked) {
        const uint32_t* raw = reinterpret_cast<const uint32_t*>((v ? raw_v : raw_k) + row * (v ? raw_ld_v : raw_ld_k));
        const int shift = (v ? at.vm[j] : at.km[j]) >> 6 & 2;  // 0 or 2 bytes
        const int nw = (shift + (v ? c.v_entry : c.k_entry) + 3) / 4;
        uint32_t w[kMaxWords + 1];
#pragma unroll
        for (int i = 0; i <= kMaxWords; ++i) w[i] = i < nw ? raw[i] : 0u;
        if (shift != 0) {  // the entry's bytes from word 0's byte 0
#pragma unroll
          for (int i = 0; i < kMaxWords; ++i) w[i] = __funnelshift_r(w[i], w[i + 1], 16);
        }
        // (scale, zero) after the codes: bytes [cb, cb + 4) of the entry.
        const int cb = width * bits / 8;
        uint32_t sz = 0;
#pragma unroll
        for (int i = 0; i < kMaxWords; ++i) {
          if (i == cb / 4) sz = cb % 4 == 0 ? w[i] : __funnelshift_r(w[i], w[i + 1], 16);
        }
        const float scale = KvqF16ToF32(sz & 0xffffu), zero = KvqF16ToF32(sz >> 16);
        // float(code) as 2^23 + code less 2^23 (exact; full-rate ops, not the quarter-rate I2F)
        auto value = [&](uint32_t code) {
          return __fadd_rn(zero, __fmul_rn(__fsub_rn(__uint_as_float(0x4b000000u | code), 8388608.0f), scale));
        };
#pragma unroll
        for (int g = 0; g < kMaxValues / 4; ++g) {  // values 4g .. 4g + 3
          if (4 * g >= padded) break;
          uint2 o = make_uint2(0u, 0u);
          if (4 * g < width) {
            const uint32_t q = bits == 4 ? w[g / 2] >> (16 * (g % 2)) : w[g / 4] >> (8 * (g % 4));
            const uint32_t m = (1u << bits) - 1u;
            o.x = PackBf16(value(q & m), value((q >> bits) & m));
            o.y = PackBf16(value((q >> (2 * bits)) & m), value((q >> (3 * bits)) & m));
          }
          *reinterpret_cast<uint2*>(out + 4 * g) = o;
        }
      } else if (c.kc.quant == KvQuant::kNone) {  // the stored bf16 values: exact
        float mn = INFINITY, mx = -INFINITY;
        for (int ch = 0; ch < width; ch += 4) {
          const uint2 x = *reinterpret_cast<const uint2*>(out + ch);
          const float2 a = Bf16x2ToFloat2(x.x), b = Bf16x2ToFloat2(x.y);
          mn = fminf(fminf(mn, fminf(a.x, a.y)), fminf(b.x, b.y));
          mx = fmaxf(fmaxf(mx, fmaxf(a.x, a.y)), fmaxf(b.x, b.y));
        }
        const kvp::LowRange r = kvp::LowRangeOf(mn, mx, bits);
        const float scale = KvqF16ToF32(r.scale16);
        const float levels = static_cast<float>((1 << bits) - 1);
        auto round_trip = [&](float x) {  // LowCode's clamped rounding, in floats
          const float code = fminf(fmaxf(rintf(__fmul_rn(__fsub_rn(x, r.zero), r.inv)), 0.f), levels);
          return __fadd_rn(r.zero, __fmul_rn(code, scale));
        };
        for (int ch = 0; ch < width; ch += 4) {
          uint2 x = *reinterpret_cast<const uint2*>(out + ch);
          const float2 a = Bf16x2ToFloat2(x.x), b = Bf16x2ToFloat2(x.y);
          x.x = PackBf16(round_trip(a.x), round_trip(a.y));
          x.y = PackBf16(round_trip(b.x), round_trip(b.y));
          *reinterpret_cast<uint2*>(out + ch) = x;
        }
      } else {  // a quantized cache: the codes' values in fp32 from the slot
        const kvp::CacheSide side = v ? c.vc : c.kc;
        const int64_t cs = slot[j];
        float mn = INFINITY, mx = -INFINITY;
        for (int ch = 0; ch < width; ch += 4) {
          float x[4];
          kvp::LoadValues<4>(side, cs, c.head, ch, x);
#pragma unroll
          for (int i = 0; i < 4; ++i) mn = fminf(mn, x[i]), mx = fmaxf(mx, x[i]);
        }
        const kvp::LowRange r = kvp::LowRangeOf(mn, mx, bits);
        const float scale = KvqF16ToF32(r.scale16);
        for (int ch = 0; ch < width; ch += 4) {
          float x[4];
          kvp::LoadValues<4>(side, cs, c.head, ch, x);
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            x[i] = __fadd_rn(r.zero, __fmul_rn(static_cast<float>(kvp::LowCode(x[i], r, bits)), scale));
          }
          *reinterpret_cast<uint2*>(out + ch) = make_uint2(PackBf16(x[0], x[1]), PackBf16(x[2], x[3]));
        }
      }
    }
    __syncwarp();
  }
};

// The chunk's results in the policy scratch: partial [head][128] (r_v columns used) and the
// (lse, 1) pair standing for (max, sum).
struct ChunkOut {
  float* partial;  // the chunk's [num_heads][kD]
  float* ml;       // the entry's query head 0, this chunk: head h's pair at h * max_chunks * 2
  int32_t max_chunks;
  __device__ __forceinline__ void operator()(int, int head, int col, float value, float lse2) const {
    partial[static_cast<int64_t>(head) * kD + col] = value;
    if (col == 0) {
      ml[static_cast<int64_t>(head) * max_chunks * 2] = lse2 * 0.6931471805599453f;  // ln 2: natural-log units
      ml[static_cast<int64_t>(head) * max_chunks * 2 + 1] = 1.0f;
    }
  }
};

// Grid (ceil(max_chunks / span), num_kv_heads, num_seqs), kThreads threads. KS / VM / QF as
// DecodeItemT's (4, 4: the fixed Layout(64, 64) for ranks <= 64; QF its quantized loader); LOW:
// MiKV (low_bits 4 / 2), the walk's low keys listed and fixed in their tiles.
// The span's first chunk carries its keys' count and results (partial O and (lse, 1)); its other
// chunks none (count 0, (-inf, 0): the passes after skip them, and t sums the counts).
template <int KS, int VM, bool QF, bool LOW>
__global__ void __launch_bounds__(kThreads, KS <= 4 && VM <= 4 ? 2 : 1)
    PolicyLatentKernel(const LatentAttentionArgs a, const KvPolicySeq* seqs, int32_t layer, int32_t max_seq_len,
                       bool record_hits, int span, int low_bits, Scratch sc) {
  const int c0 = blockIdx.x * span, kvh = blockIdx.y, s = blockIdx.z;
  const KvPolicySeq seq = seqs[s];
  const int len = seq.seq_len - seq.slot_offset, p0 = c0 * kKvPolicyChunk;
  const int walk = LOW ? kvp::WalkLength(seq, low_bits) : len;
  if (p0 >= walk) return;  // uniform over the CTA
  const int tid = threadIdx.x;
  const int group = a.num_heads / a.num_kv_heads;
  const int per = span * kKvPolicyChunk / kThreads;  // walk indices of this thread: tid * per + k
  constexpr int kKeys = (LOW ? kMaxSpanLow : kMaxSpan) * kKvPolicyChunk, kPer = kKeys / kThreads;
  constexpr int kLowKeys = LOW ? kKeys : 1;
  __shared__ int32_t s_slot[kKeys], s_pos[kKeys];
  __shared__ uint16_t s_off[kKeys];
  __shared__ uint8_t s_kind[kLowKeys], s_km[kLowKeys], s_vm[kLowKeys];
  __shared__ uint32_t s_kb[kLowKeys], s_va[kLowKeys], s_vb[kLowKeys];
  // LowCtx has default member initializers, which a __shared__ variable may not: raw bytes.
  __shared__ alignas(LowCtx) unsigned char s_low_raw[LOW ? sizeof(LowCtx) : 1];
  LowCtx& s_low = *reinterpret_cast<LowCtx*>(s_low_raw);
  __shared__ int s_warp[kWarps];

  // This thread's walk indices: a key's cache slot (a packed key's entry index), or none; then
  // the list in walk order. Slots first (full keys; MiKV: demoted ones still there), then (MiKV)
  // the head's packed entries, each with its position (packed_pos).
  const int lhead = layer * a.num_kv_heads + kvh;
  const size_t lh = static_cast<size_t>(lhead) * seq.capacity;
  const int32_t* table = a.block_tables + kvp::TableRow(seq, s) * a.max_blocks_per_seq;
  kvp::CacheSide kc, vc;  // LOW: the cache as the policy kernels address a head's region
  int k_entry = 0, v_entry = 0, low_base = 0, packed = 0;
  if constexpr (LOW) {
    kc = kvp::CacheSide{static_cast<uint8_t*>(const_cast<void*>(a.k_cache)), a.kv_quant, a.k_q, a.k_ld, a.k_rank};
    vc = kvp::CacheSide{static_cast<uint8_t*>(const_cast<void*>(a.v_cache)), a.kv_quant, a.v_q, a.v_ld, a.v_rank};
    k_entry = a.k_rank * low_bits / 8 + 4;
    v_entry = a.v_rank * low_bits / 8 + 4;
    low_base = seq.low_base != nullptr ? seq.low_base[lhead] : 0;
    packed = seq.num_packed != nullptr && seq.packed_pos != nullptr ? seq.num_packed[lhead] : 0;
  }
  int32_t slot[kPer], kp[kPer];
  uint8_t kind[kPer];
  int mine = 0;
#pragma unroll
  for (int k = 0; k < kPer; ++k) {
    const int v = p0 + tid * per + k;
    slot[k] = -1;
    kp[k] = -1;
    kind[k] = kRowFull;
    if (k < per && v < len) {
      kp[k] = seq.pos[lh + v];
      const uint8_t st = kp[k] >= 0 ? seq.state[lh + kp[k]] : kKvPolicyDead;
      // Cache slots fit 32 bits (backend.h slot_mapping).
      if (st == kKvPolicyFull || (LOW && st == kKvPolicyLow)) {
        slot[k] = static_cast<int32_t>(kvp::CacheSlot(table, v, a.block_size));
        kind[k] = st == kKvPolicyFull ? kRowFull : kRowLowSlot;
      }
    } else if (LOW && k < per && v - len < packed) {
      kp[k] = seq.packed_pos[lh + v - len];
      slot[k] = v - len;
      kind[k] = kRowPacked;
    }
    mine += slot[k] >= 0;
  }
  int at = 0, n = 0;
  kvp::BlockExclusiveScan<kWarps>(mine, s_warp, &at, &n);
#pragma unroll
  for (int k = 0; k < kPer; ++k) {
    if (slot[k] < 0) continue;
    s_slot[at] = slot[k];
    s_pos[at] = kp[k];
    s_off[at] = static_cast<uint16_t>(tid * per + k);
    if constexpr (LOW) {
      s_kind[at] = kind[k];
      if (kind[k] == kRowPacked) {  // slot[k]: the entry's index; where its K and V entries lie
        for (int side = 0; side < 2; ++side) {
          const kvp::CacheSide& c = side == 0 ? kc : vc;
          const int32_t region = c.RegionBytes(), entry = side == 0 ? k_entry : v_entry;
          const int32_t b = slot[k] * entry, rs = low_base + b / region, o = b % region;
          const uint32_t wa = static_cast<uint32_t>(
              (c.Region(kvp::CacheSlot(table, rs, a.block_size), kvh) + (o & ~3) - c.base) / 4);
          const uint32_t wb =
              o + entry > region
                  ? static_cast<uint32_t>((c.Region(kvp::CacheSlot(table, rs + 1, a.block_size), kvh) - c.base) / 4)
                  : 0u;
          const uint8_t m = static_cast<uint8_t>((region - (o & ~3)) / 4 | ((o & 2) << 6));
          if (side == 0) {
            s_slot[at] = static_cast<int32_t>(wa), s_kb[at] = wb, s_km[at] = m;
          } else {
            s_va[at] = wa, s_vb[at] = wb, s_vm[at] = m;
          }
        }
      }
    }
    ++at;
  }
  if constexpr (LOW) {
    if (tid == 0) {
      s_low.kc = kc;
      s_low.vc = vc;
      s_low.head = kvh;
      s_low.bits = low_bits;
      s_low.k_entry = k_entry;
      s_low.v_entry = v_entry;
    }
  }
  // The span's chunks of this entry: counts, and (-inf, 0) for those without results.
  const int chunks = (walk + kKvPolicyChunk - 1) / kKvPolicyChunk;
  float* const ml = sc.chunk_ml + static_cast<size_t>(s) * a.num_heads * sc.max_chunks * 2;  // query head 0, chunk 0
  if (tid < span && c0 + tid < chunks) {
    sc.chunk_n[(static_cast<size_t>(s) * a.num_kv_heads + kvh) * sc.max_chunks + c0 + tid] = tid == 0 ? n : 0;
  }
  for (int i = tid; i < span * group; i += kThreads) {
    const int cc = i / group, h = kvh * group + i % group;
    if (c0 + cc < chunks && (cc > 0 || n == 0)) {
      ml[(static_cast<size_t>(h) * sc.max_chunks + c0 + cc) * 2] = -INFINITY;
      ml[(static_cast<size_t>(h) * sc.max_chunks + c0 + cc) * 2 + 1] = 0.f;
    }
  }
  if (n == 0) return;  // uniform: no key in the span
  const Layout L = KS == 4 && VM == 4 ? FixedTileLoader<QF>::L : Layout(a.k_rank, a.v_rank);
  const Smem sm = Setup(a, L);  // DecodeItemT's first barrier publishes it and the list
  float* const scores = record_hits ? sc.scores + (static_cast<size_t>(s) * a.num_heads + kvh * group) * max_seq_len + p0
                                    : nullptr;
  const ListKeys<LOW> keys{s_slot, s_pos, s_off, n, scores, max_seq_len, s_kind,
                           PackedAt{reinterpret_cast<uint32_t*>(s_slot), s_kb, s_va, s_vb, s_km, s_vm}, &s_low};
  const ChunkOut out{sc.partial + (static_cast<size_t>(s) * sc.max_chunks + c0) * a.num_heads * kD, ml + 2 * c0,
                     sc.max_chunks};
  const Item it{s, 0, 1, 0, n, c0};
  DecodeItemT<KS, VM, false, QF>(a, L, sm, it, kvp::QRow(seq, s), keys, out);
}

// The span: the longest (4, 2, 1 chunks) that still gives about two resident waves of CTAs (2 an
// SM) over the device; LORC_KV_POLICY_LATENT_SPAN=1|2|4 fixes it (A/B measurements; 0: by the device).
int SpanFor(const KvPolicyLatentDecodeArgs& p, int max_chunks) {
  const int most = p.low_bits > 0 ? kMaxSpanLow : kMaxSpan;
  if (p.span > 0) return std::min(p.span, most);
  static int num_sms = 0, fixed = 0;  // a worker drives one device
  if (num_sms == 0) {
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) {
      num_sms = 132;
    }
    fixed = static_cast<int>(EnvIntOf("LORC_KV_POLICY_LATENT_SPAN", {0, 1, 2, 4}, 0));
  }
  if (fixed > 0) return std::min(fixed, most);
  const int64_t pairs = int64_t{p.latent.num_kv_heads} * p.num_seqs;
  for (int span = most; span > 1; span /= 2) {
    if ((max_chunks + span - 1) / span * pairs >= int64_t{4} * num_sms) return span;
  }
  return 1;
}

template <int KS, int VM, bool QF, bool LOW>
cudaError_t Launch(const KvPolicyLatentDecodeArgs& p, const Scratch& sc, size_t smem, cudaStream_t stream) {
  static bool smem_set = false;  // once per process and instantiation (a worker drives one device)
  const cudaError_t e = AllowSmem(PolicyLatentKernel<KS, VM, QF, LOW>, &smem_set);
  if (e != cudaSuccess) return e;
  const int span = SpanFor(p, sc.max_chunks);
  const dim3 grid((sc.max_chunks + span - 1) / span, p.latent.num_kv_heads, p.num_seqs);
  PolicyLatentKernel<KS, VM, QF, LOW><<<grid, kThreads, smem, stream>>>(p.latent, p.seqs, p.layer, p.max_seq_len,
                                                                        p.record_hits, span, p.low_bits, sc);
  return cudaGetLastError();
}

template <bool LOW>
cudaError_t LaunchFor(const KvPolicyLatentDecodeArgs& p, const Scratch& sc, cudaStream_t stream) {
  const LatentAttentionArgs& a = p.latent;
  if (a.k_rank <= 64 && a.v_rank <= 64) {
    const size_t smem = FixedTileLoader<false>::L.bytes();
    return a.kv_quant != KvQuant::kNone ? Launch<4, 4, true, LOW>(p, sc, smem, stream)
                                        : Launch<4, 4, false, LOW>(p, sc, smem, stream);
  }
  // TileLoader: bf16 or quantized (dequantized as it loads)
  return Launch<8, 8, false, LOW>(p, sc, Layout(a.k_rank, a.v_rank).bytes(), stream);
}

}  // namespace

cudaError_t LaunchKvPolicyLatentDecode(const KvPolicyLatentDecodeArgs& p, cudaStream_t stream) {
  const LatentAttentionArgs& a = p.latent;
  if (!ArgsOk(a) || p.seqs == nullptr || p.num_seqs < 1 || p.max_seq_len < 1 || p.scratch == nullptr ||
      p.layer < 0 || a.num_heads / a.num_kv_heads > kvp::kMaxGroup ||
      (p.span != 0 && p.span != 1 && p.span != 2 && p.span != kMaxSpan) ||
      (p.low_bits != 0 && p.low_bits != 2 && p.low_bits != 4)) {
    return cudaErrorInvalidValue;
  }
  size_t bytes = 0;
  const Scratch sc = kvp::Carve(p.scratch, p.num_seqs, a.num_heads, a.num_kv_heads, kD, p.max_seq_len, &bytes);
  const cudaError_t e = p.low_bits > 0 ? LaunchFor<true>(p, sc, stream) : LaunchFor<false>(p, sc, stream);
  if (e != cudaSuccess) return e;
  KvPolicyDecodeArgs r;  // what the shared passes read
  r.out = static_cast<__nv_bfloat16*>(a.out);
  r.out_stride = a.out_ld;
  r.seqs = p.seqs;
  r.layer = p.layer;
  r.num_seqs = p.num_seqs;
  r.num_heads = a.num_heads;
  r.num_kv_heads = a.num_kv_heads;
  r.head_dim = kD;
  r.max_seq_len = p.max_seq_len;
  r.record_hits = p.record_hits;
  r.low_bits = p.low_bits;
  return kvp::LaunchImportanceAndReduce(r, sc, a.v_rank, stream);
}

}  // namespace lorc::kernels
