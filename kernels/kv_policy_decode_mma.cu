// The policy decode on the tensor cores (kv_policy.cuh LaunchKvPolicyDecode; sm_80+, rows
// 16-byte aligned): DecodeMmaKernel's structure (attention_decode.cu: per-warp cp.async rings of
// 16-key tiles, S = Q K^T and O += P V on mma.sync, the online softmax in registers) over the keys
// a policy keeps, then the importance from the scores it saved.
//
// (1) PolicyMmaKernel, one CTA per (chunk of kKvPolicyChunk walk indices, KV head, sequence):
//     its threads first find the chunk's keys (slot -> pos -> state; MiKV's packed entries past
//     the slots) and list them in walk order (a block scan) with their cache slots resolved
//     through the block table, so a dead slot costs its classification only and the tile loop
//     has no dependent loads. Warp w takes list tiles w, w + 4, ... through its cp.async ring.
//     MiKV's low keys travel the same ring: a demoted key's bf16 row as a full one's, a packed
//     entry's code word and (scale, zero) in its lanes' 16-byte chunks; when the tile has landed
//     the lanes turn them in place into the values the CUDA-core kernels read (FixLowChunk: bit
//     for bit in fp32, then K split into two bf16 tiles, hi and lo, both multiplied by Q; V
//     rounded to bf16). With record_hits the full keys' scores go to the scratch (fp32,
//     natural-log units, as the CUDA-core kernels' scores) for (2); the chunk writes its (max,
//     sum), its key count (t's share: full and low keys) and its unnormalised O.
// (2) ImportanceKernel (record_hits): per chunk, the sequence's softmax and t from every chunk's
//     (SequenceSoftmax, as the CUDA-core P V kernel), then last_hit for every full key a query
//     head of the group gives p >= 1 / t.
// (3) ReduceKernel: out = sum over chunks of O_c exp(m_c - M) / sum of l_c exp(m_c - M), in
//     chunk order (deterministic).
// Against the CUDA-core kernels (kv_policy.cu): the same keys, t and importance rule; P (and
// MiKV's dequantized V) enter the P V mma as bf16 (the paged decode's tolerance), scores are
// summed by the tensor cores in another order.
// A quantized cache (kQuant; CORM only): the rows' codes and scale words travel the ring raw,
// DequantTile turns each landed tile into fp16 K and bf16 V (fp8 / int8 codes exact, their per-row
// scales applied to the scores and to P's columns; int4 zero + code x scale per group), Q is
// converted to fp16 once, S runs on fp16 mma and P V on bf16 mma as the bf16 path's (P times the
// V scales in bf16: fp16 would flush small probabilities times a small scale to zero).
#include <cuda_bf16.h>

#include <cmath>
#include <cstdint>

#include "kernels/device_query.cuh"
#include "kernels/elem_type.cuh"
#include "kernels/kv_policy.cuh"
#include "kernels/kv_policy_device.cuh"
#include "kernels/kv_quant.cuh"
#include "kernels/mma.cuh"

namespace lorc::kernels {
namespace kvp {
namespace {

constexpr int kWarps = 4, kThreads = 32 * kWarps;
constexpr int kTile = 16;                              // keys per mma tile
constexpr int kStages = 2;                             // tiles in flight per warp
constexpr int kPerThread = kKvPolicyChunk / kThreads;  // walk indices a thread classifies
constexpr float kLog2e = 1.4426950408889634f;
static_assert(kPerThread * kThreads == kKvPolicyChunk && kKvPolicyChunk <= 256, "s_off holds a uint8_t");

// A listed key's kind (MiKV's classification; CORM lists full keys only).
constexpr uint8_t kRowFull = 0, kRowLowSlot = 1, kRowPacked = 2;

// Tiles per ring stage: K and V; MiKV adds K's low part (below).
template <bool kLow>
inline constexpr int kTilesPerStage = kLow ? 3 : 2;
// kQuant (a quantized cache): after a stage's tiles, the 16 rows' scale words of K, then of V
// (16 bytes a row: int4 D 128's 4 groups x (scale, zero); fp8 / int8: the word holding the
// head's scale), in bf16 units.
template <bool kQuant>
inline constexpr int kScaleElems = kQuant ? 2 * kTile * 8 : 0;
template <int D, bool kLow, bool kQuant>
inline constexpr int kStageElemsOf = kTilesPerStage<kLow> * kTile * D + kScaleElems<kQuant>;
template <int D, bool kLow, bool kQuant>
constexpr size_t SmemBytes() {  // the warps' rings, then Q ([16][D] bf16)
  return sizeof(__nv_bfloat16) * (kWarps * kStages * kStageElemsOf<D, kLow, kQuant> + 16 * D);
}

__device__ __forceinline__ void CpAsync4(void* dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(SmemAddr(dst)), "l"(src));
}
// N (4 or 8) bytes global -> shared, zero-filled when !valid (src is then not read).
template <int N>
__device__ __forceinline__ void CpAsyncZ(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(SmemAddr(dst)), "l"(src), "n"(N),
               "r"(valid ? N : 0));
}

// kQuant: the tile's quantized rows, landed raw at the end of their own tile (codes, row r at raw +
// r * raw_row; 8 channels' codes: 8 bytes, int4 4) with their scale words, turned in place into
// the rows the mma reads, fp16 (K, kBf16 false) or bf16 (V): fp8 / int8 codes as they are (exact
// in both; the row's scale is applied to its scores, or to P's column, instead: ScaleOfRow), int4
// zero + code x scale of its group (fp16 arithmetic for K; fp32, each step rounded as the CPU's,
// then bf16 for V). Rows 0-7 of the tile lie below every raw byte; rows 8-15 overlap them, so
// those are read by every lane before any is written. `cc`: the lane's chunk (the same in every
// row it holds).
template <int D, bool kBf16>
__device__ __forceinline__ void DequantTile(KvQuant quant, __nv_bfloat16* tile, const uint8_t* raw, int raw_row,
                                            const uint32_t* scales, int lane) {
  constexpr int kChunks = D / 8, kJ = kTile * kChunks / 32, kHalf = kJ / 2;
  const int cc = lane % kChunks;
  auto load = [&](int jj) {  // the chunk's codes (int4: .x) and, int4, its group's (scale, zero) word
    const int r = (lane + 32 * jj) / kChunks;
    uint2 c;
    if (quant == KvQuant::kInt4) {
      c.x = *reinterpret_cast<const uint32_t*>(raw + r * raw_row + cc * 4);
      c.y = scales[r * 4 + cc / 4];  // group cc * 8 / 32
    } else {
      c = *reinterpret_cast<const uint2*>(raw + r * raw_row + cc * 8);
    }
    return c;
  };
  auto store = [&](int jj, const uint2& c) {
    const int r = (lane + 32 * jj) / kChunks;
    uint32_t h[4];
    if constexpr (kBf16) {  // V: bf16 values, fp8 / int8 codes exact, int4 dequantized in fp32
      float f[8];
      if (quant == KvQuant::kInt4) {
        const float sc = KvqHalfBits(c.y & 0xffffu), z = KvqHalfBits(c.y >> 16);
#pragma unroll
        for (int i = 0; i < 8; ++i) f[i] = __fadd_rn(z, __fmul_rn(static_cast<float>((c.x >> (4 * i)) & 0xfu), sc));
      } else {
        KvqCodes8(quant, make_uint4(c.x, c.y, 0u, 0u), f);  // the codes' values, unscaled
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) h[i] = PackBf16(f[2 * i], f[2 * i + 1]);
    } else if (quant == KvQuant::kFp8E4m3) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const __half2_raw v =
            __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>((i < 2 ? c.x : c.y) >> (16 * (i & 1))), __NV_E4M3);
        h[i] = static_cast<uint32_t>(v.x) | (static_cast<uint32_t>(v.y) << 16);
      }
    } else if (quant == KvQuant::kInt8) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const uint32_t w = i < 2 ? c.x : c.y;
        const int sh = 16 * (i & 1);
        const __half2 v = __halves2half2(__short2half_rn(static_cast<int8_t>(w >> sh)),
                                         __short2half_rn(static_cast<int8_t>(w >> (sh + 8))));
        h[i] = *reinterpret_cast<const uint32_t*>(&v);
      }
    } else {  // int4: nibble 2 i and 2 i + 1 as 1024 + code in fp16, less 1024, times scale plus zero
      const __half2 s2 = __half2half2(__ushort_as_half(static_cast<unsigned short>(c.y & 0xffffu)));
      const __half2 z2 = __half2half2(__ushort_as_half(static_cast<unsigned short>(c.y >> 16)));
      const __half2 k1024 = __half2half2(__ushort_as_half(static_cast<unsigned short>(0x6400u)));
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const uint32_t bits = ((c.x >> (8 * i)) & 0xfu) | (((c.x >> (8 * i + 4)) & 0xfu) << 16) | 0x64006400u;
        const __half2 code = __hsub2(*reinterpret_cast<const __half2*>(&bits), k1024);
        const __half2 v = __hfma2(code, s2, z2);
        h[i] = *reinterpret_cast<const uint32_t*>(&v);
      }
    }
    *reinterpret_cast<uint4*>(tile + Swz<D>(r, cc)) = make_uint4(h[0], h[1], h[2], h[3]);
  };
#pragma unroll
  for (int jj = 0; jj < kHalf; ++jj) store(jj, load(jj));
  uint2 q[kJ - kHalf];
#pragma unroll
  for (int jj = kHalf; jj < kJ; ++jj) q[jj - kHalf] = load(jj);
  __syncwarp();
#pragma unroll
  for (int jj = kHalf; jj < kJ; ++jj) store(jj, q[jj - kHalf]);
}

// kQuant, fp8 / int8: the scale of tile row r (its scale word's half `half_bits` bit r names; 1 for
// int4, whose rows the tile holds dequantized).
__device__ __forceinline__ float ScaleOfRow(KvQuant quant, const uint32_t* scales, uint32_t half_bits, int r) {
  if (quant == KvQuant::kInt4) return 1.0f;
  const uint32_t w = scales[r * 4];
  return KvqHalfBits(((half_bits >> r) & 1u) != 0 ? w >> 16 : w & 0xffffu);
}

// MiKV: a packed entry's values at this lane's chunk (channels [cc * 8, cc * 8 + 8)) from `raw`
// (the chunk's code word, then the entry's fp16 scale and zero; kvpolicy DecodeLowEntry), K's
// times the reciprocal of the balance (`inv`, the chunk's 8; null: V, or no balance).
__device__ __forceinline__ void DecodePacked(uint2 raw, int cc, int bits, const float* inv, float (&x)[8]) {
  const uint32_t codes = bits == 4 ? raw.x : (cc & 1) != 0 ? raw.x >> 16 : raw.x & 0xffffu;  // int2: a half
  int code[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) code[i] = static_cast<int>((codes >> (i * bits)) & ((1u << bits) - 1u));
  DequantizeLane<8>(code, static_cast<uint16_t>(raw.y & 0xffffu), static_cast<uint16_t>(raw.y >> 16), x);
  if (inv != nullptr) {
#pragma unroll
    for (int e = 0; e < 8; ++e) x[e] = __fmul_rn(x[e], inv[e]);
  }
}

// A low row's values into its tile chunk: hi = bf16(x) in place and, for K (lo non-null),
// lo = bf16(x - hi) in K's low-part tile, so that S = Q hi + Q lo keeps x to ~2^-16 (one bf16
// rounding of a dequantized key measured up to 1.7 % off the CPU's outputs); V is rounded once.
__device__ __forceinline__ void StoreLow(const float (&x)[8], __nv_bfloat16* chunk, __nv_bfloat16* lo) {
  uint32_t hi[4], rest[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(x[2 * i], x[2 * i + 1]);
    const float2 hf = __bfloat1622float2(h);
    hi[i] = *reinterpret_cast<const uint32_t*>(&h);
    rest[i] = PackBf16(x[2 * i] - hf.x, x[2 * i + 1] - hf.y);
  }
  *reinterpret_cast<uint4*>(chunk) = make_uint4(hi[0], hi[1], hi[2], hi[3]);
  if (lo != nullptr) *reinterpret_cast<uint4*>(lo) = make_uint4(rest[0], rest[1], rest[2], rest[3]);
}

// MiKV, a tile that holds a demoted key in its slot: this lane's chunk of a row's K (lo non-null)
// or V turned in place into the values the CUDA-core kernels read: a demoted key (the tile holds
// its bf16 row: times the balance, quantized, dequantized, bit for bit in fp32) or a packed entry
// (DecodePacked); K then times `inv` (within an ulp of the CUDA-core kernels' quotient) and stored
// by StoreLow. Every lane of the warp calls it: each row's (min, max) reduces over its
// kLanes = D / 8 lanes; a full row's lanes only take part.
template <int D>
__device__ __forceinline__ void FixLowChunk(uint8_t kind, __nv_bfloat16* chunk, __nv_bfloat16* lo,
                                            const float* balance, const float* inv, int cc, int bits) {
  float x[8];
  int code[8];
  uint16_t scale16 = 0, zero16 = 0;
  const uint4 raw = *reinterpret_cast<const uint4*>(chunk);
  if (kind == kRowLowSlot) {
    Bf16x8ToF32(raw, x);
  } else {
#pragma unroll
    for (int e = 0; e < 8; ++e) x[e] = 0.f;
  }
  QuantizeBalancedLane<8, D / 8>(x, balance, cc, bits, code, &scale16, &zero16);
  if (kind == kRowPacked) {
    DecodePacked(make_uint2(raw.x, raw.y), cc, bits, inv, x);
  } else if (kind == kRowLowSlot) {
    DequantizeLane<8>(code, scale16, zero16, x);
    if (inv != nullptr) {
#pragma unroll
      for (int e = 0; e < 8; ++e) x[e] = __fmul_rn(x[e], inv[e]);
    }
  } else {
    return;
  }
  StoreLow(x, chunk, lo);
}

// (1) Grid (max_chunks, num_kv_heads, num_seqs), kThreads threads.
// kLow: MiKV (low entries; its own instantiation, two CTAs an SM by its larger rings).
// kQuant: CORM over a quantized cache (a.layout; its own instantiation): each row's codes and
// scale words travel the ring raw and are dequantized in the tile (DequantTile) when it lands.
template <int D, bool kLow, bool kQuant>
__global__ void __launch_bounds__(kThreads, kLow ? 2 : 3) PolicyMmaKernel(KvPolicyDecodeArgs a, Scratch sc) {
  static_assert(!(kLow && kQuant), "MiKV over a quantized cache runs the CUDA-core kernels");
  constexpr int kChunks = D / 8;  // 16-byte chunks of a row
  constexpr int kTileElems = kTile * D;
  constexpr int kStageElems = kStageElemsOf<D, kLow, kQuant>;  // K, V (, K's low part) (, scale words)
  static_assert(kWarps * kStages * 2 * kTileElems * 2 >= kWarps * 8 * (D + 2) * 4, "the combine fits the rings");
  extern __shared__ __align__(128) unsigned char smem_raw[];
  __shared__ int32_t s_slot[kKvPolicyChunk];  // a listed key's cache slot (MiKV: a packed one's entry)
  __shared__ uint8_t s_off[kKvPolicyChunk];   // its walk index - p0
  __shared__ uint8_t s_kind[kLow ? kKvPolicyChunk : 1];  // MiKV: its kind
  // MiKV: a packed entry's bytes lie in one or two slot regions: the cache slot of the region of
  // its last byte (s_slot: of its first), and the reciprocals of the head's key balance.
  __shared__ int32_t s_slot2[kLow ? kKvPolicyChunk : 1];
  __shared__ float s_inv[kLow ? D : 1];
  __shared__ int s_warp[kWarps];

  const int c = blockIdx.x, kvh = blockIdx.y, s = blockIdx.z;
  const KvPolicySeq seq = a.seqs[s];
  const int len = seq.seq_len - seq.slot_offset, walk = WalkLength(seq, a.low_bits), p0 = c * kKvPolicyChunk;
  if (p0 >= walk) return;
  const int end = min(walk, p0 + kKvPolicyChunk);
  const int group = a.num_heads / a.num_kv_heads;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int lhead = a.layer * a.num_kv_heads + kvh;
  const size_t lh = static_cast<size_t>(lhead) * seq.capacity;
  const int32_t* table = a.block_tables + TableRow(seq, s) * a.max_blocks;
  const LowHead low = kLow ? LowHeadOf(seq, a.low_bits, lhead, D) : LowHead{};

  // This thread's walk indices that hold a key the query reads (a slot: pos -> state; MiKV's
  // packed entries past the slots), then the chunk's keys listed in walk order.
  int32_t slot[kPerThread], slot2[kPerThread];  // slot -1: no key
  uint8_t kind[kPerThread];
  const int entry_bytes = D * a.low_bits / 8 + 4;
  int mine = 0;
#pragma unroll
  for (int k = 0; k < kPerThread; ++k) {
    const int v = p0 + tid * kPerThread + k;
    slot[k] = -1;
    kind[k] = kRowFull;
    if (v < end && v < len) {
      const int kp = seq.pos[lh + v];
      const uint8_t st = kp >= 0 ? seq.state[lh + kp] : kKvPolicyDead;
      // Cache slots fit 32 bits: 2^31 slots of at least 128 bytes exceed any device.
      if (st == kKvPolicyFull || (kLow && st == kKvPolicyLow)) {
        slot[k] = static_cast<int32_t>(CacheSlot(table, v, a.block_size));
        kind[k] = st == kKvPolicyFull ? kRowFull : kRowLowSlot;
      }
    } else if (kLow && v < end && v - len < low.packed) {
      const int32_t first = (v - len) * entry_bytes;
      slot[k] = static_cast<int32_t>(CacheSlot(table, low.base + first / (2 * D), a.block_size));
      slot2[k] = static_cast<int32_t>(CacheSlot(table, low.base + (first + entry_bytes - 1) / (2 * D), a.block_size));
      kind[k] = kRowPacked;
    }
    mine += slot[k] >= 0;
  }
  int at = 0, n = 0;
  BlockExclusiveScan<kWarps>(mine, s_warp, &at, &n);
#pragma unroll
  for (int k = 0; k < kPerThread; ++k) {
    if (slot[k] < 0) continue;
    s_slot[at] = slot[k];
    if constexpr (kLow) {
      s_kind[at] = kind[k];
      if (kind[k] == kRowPacked) s_slot2[at] = slot2[k];
    }
    s_off[at] = static_cast<uint8_t>(tid * kPerThread + k);
    ++at;
  }
  float* const ml = sc.chunk_ml + ((static_cast<size_t>(s) * a.num_heads + kvh * group) * sc.max_chunks + c) * 2;
  if (tid == 0) sc.chunk_n[(static_cast<size_t>(s) * a.num_kv_heads + kvh) * sc.max_chunks + c] = n;
  if (n == 0) {  // uniform: no key in the chunk (the reduce skips it)
    if (tid < group) {
      ml[static_cast<size_t>(tid) * sc.max_chunks * 2] = -INFINITY;
      ml[static_cast<size_t>(tid) * sc.max_chunks * 2 + 1] = 0.f;
    }
    return;
  }
  if (kLow && low.balance != nullptr && tid < D) s_inv[kLow ? tid : 0] = __frcp_rn(low.balance[tid]);
  __syncthreads();  // the list

  __nv_bfloat16* const rings = reinterpret_cast<__nv_bfloat16*>(smem_raw);
  __nv_bfloat16* const sq = rings + kWarps * kStages * kStageElems;
  __nv_bfloat16* const ring = rings + warp * kStages * kStageElems;  // stage s: K, V (, K's low part)
  const __nv_bfloat16* kc = a.k_cache + kvh * D;
  const __nv_bfloat16* vc = a.v_cache + kvh * D;
  const float scale2 = a.scale * kLog2e;
  const int g = lane / 4, t4 = lane % 4;
  uint32_t q_off[4], k_off[4], v_off[4];
  SwzLdsmOffsets<D>(lane, SmemAddr(sq), q_off, k_off, v_off);

  // Q: row r < group is query head kvh * group + r; zeros below.
  const __nv_bfloat16* qg = a.q + QRow(seq, s) * a.q_stride + static_cast<int64_t>(kvh) * group * D;
  for (int idx = tid; idx < 16 * kChunks; idx += kThreads) {
    const int r = idx / kChunks, cc = idx % kChunks;
    const bool valid = r < group;
    CpAsync16(sq + Swz<D>(r, cc), valid ? qg + r * D + cc * 8 : qg, valid);
  }
  CpAsyncCommit();

  const int num_tiles = (n + kTile - 1) / kTile;
  const int my_tiles = num_tiles > warp ? (num_tiles - warp + kWarps - 1) / kWarps : 0;
  // MiKV: whether this warp's tile i holds a low key (uniform over the warp).
  auto tile_low = [&](int i) {
    const int j = (warp + kWarps * i) * kTile + (lane & (kTile - 1));
    return kLow && __any_sync(0xffffffffu, j < n && s_kind[kLow ? j : 0] != kRowFull);
  };
  // kQuant: a row's code bytes, where a tile's raw codes land, and where a listed key's codes and
  // scales of head kvh lie (K and V share the geometry, both D wide: kv_quant.h KvqSide), the
  // block of a cache slot by a shift (block sizes are powers of two in practice) or a division.
  const KvQuant quant = kQuant ? a.layout.kv_quant : KvQuant::kNone;
  const int raw_row = quant == KvQuant::kInt4 ? D / 2 : D;
  const int raw_at = kTileElems * 2 - kTile * raw_row;  // bytes into the tile
  const KvqSide& geo = a.layout.k_q;
  const uint8_t* const kbase = reinterpret_cast<const uint8_t*>(a.k_cache);
  const uint8_t* const vbase = reinterpret_cast<const uint8_t*>(a.v_cache);
  const uint32_t bs = static_cast<uint32_t>(geo.block_size);
  const int bs_shift = (bs & (bs - 1)) == 0 ? __ffs(static_cast<int>(bs)) - 1 : -1;
  const int64_t block_bytes = kQuant ? geo.block_bytes() : 0;
  const int64_t code_head = static_cast<int64_t>(kvh) * geo.head_code;
  const int64_t scale_head = static_cast<int64_t>(geo.block_size) * geo.code_row + int64_t{kvh} * geo.head_scales * 2;
  auto row_at = [&](uint32_t slot, int64_t* code, int64_t* scale) {  // byte offsets from a side's base
    uint32_t blk, row;
    if (bs_shift >= 0) {
      blk = slot >> bs_shift;
      row = slot & (bs - 1);
    } else {
      blk = slot / bs;
      row = slot - blk * bs;
    }
    const int64_t b = static_cast<int64_t>(blk) * block_bytes;
    *code = b + row * geo.code_row + code_head;
    *scale = b + row * geo.scale_row + scale_head;
  };
  auto issue = [&](int i) {  // this warp's i-th tile into stage i % kStages
    __nv_bfloat16* sk = ring + (i % kStages) * kStageElems;
    __nv_bfloat16* sv = sk + kTileElems;
    const int j0 = (warp + kWarps * i) * kTile;
    if constexpr (kQuant) {
      uint8_t* kraw = reinterpret_cast<uint8_t*>(sk) + raw_at;
      uint8_t* vraw = reinterpret_cast<uint8_t*>(sv) + raw_at;
      uint32_t* kscl = reinterpret_cast<uint32_t*>(sk + kTilesPerStage<kLow> * kTileElems);
      uint32_t* vscl = kscl + kTile * 4;
#pragma unroll
      for (int jj = 0; jj < kTile * kChunks / 32; ++jj) {
        const int idx = lane + 32 * jj;
        const int r = idx / kChunks, cc = idx % kChunks;
        const int j = j0 + r;
        const bool valid = j < n;  // zeros past it (masked; 0 x V must not be NaN)
        int64_t code, scale;
        row_at(valid ? static_cast<uint32_t>(s_slot[j]) : 0u, &code, &scale);
        if (quant == KvQuant::kInt4) {
          CpAsyncZ<4>(kraw + r * raw_row + cc * 4, kbase + code + cc * 4, valid);
          CpAsyncZ<4>(vraw + r * raw_row + cc * 4, vbase + code + cc * 4, valid);
        } else {
          CpAsyncZ<8>(kraw + r * raw_row + cc * 8, kbase + code + cc * 8, valid);
          CpAsyncZ<8>(vraw + r * raw_row + cc * 8, vbase + code + cc * 8, valid);
        }
        if (cc == 0) {  // the row's scale words: int4 its groups' (scale, zero) pairs; else the word with its scale
          const int64_t at = scale & ~int64_t{3};
          const int words = quant == KvQuant::kInt4 ? geo.head_scales / 2 : 1;
          for (int w = 0; w < words; ++w) {
            CpAsyncZ<4>(kscl + r * 4 + w, kbase + at + 4 * w, valid);
            CpAsyncZ<4>(vscl + r * 4 + w, vbase + at + 4 * w, valid);
          }
        }
      }
      return;
    }
    const bool has_low = tile_low(i);
#pragma unroll
    for (int jj = 0; jj < kTile * kChunks / 32; ++jj) {
      const int idx = lane + 32 * jj;
      const int r = idx / kChunks, cc = idx % kChunks;
      const int j = j0 + r;
      const bool valid = j < n;  // zeros past it (masked; 0 x V must not be NaN)
      const int32_t slot = valid ? s_slot[j] : 0;
      const uint8_t k = kLow && valid ? s_kind[kLow ? j : 0] : kRowFull;
      if (kLow && k == kRowPacked) {
        // The entry's code word for this chunk and its (scale, zero), K's and V's (FixLowChunk):
        // aligned 4-byte pieces inside one slot region (entries and regions are multiples of 4),
        // the region's cache slot from the list (run byte b: byte b % (2 D) of the head's region
        // of run slot b / (2 D); low_precision.h).
        const int bits = a.low_bits, code_bytes = D * bits / 8;
        const int32_t first = (p0 + s_off[j] - len) * (code_bytes + 4);
        const int32_t word = first + (bits == 4 ? cc * 4 : (cc * 2) & ~3), sz = first + code_bytes;
        const int32_t slot2 = s_slot2[kLow ? j : 0];
        auto at = [&](int32_t b) {  // element offset (bf16 units) of run byte b's 4-byte piece in a cache
          const int32_t cs = b / (2 * D) == first / (2 * D) ? slot : slot2;
          return static_cast<int64_t>(cs) * a.kv_stride + kvh * D + (b % (2 * D)) / 2;
        };
        CpAsync4(sk + Swz<D>(r, cc), a.k_cache + at(word));
        CpAsync4(sk + Swz<D>(r, cc) + 2, a.k_cache + at(sz));
        CpAsync4(sv + Swz<D>(r, cc), a.v_cache + at(word));
        CpAsync4(sv + Swz<D>(r, cc) + 2, a.v_cache + at(sz));
      } else {
        CpAsync16(sk + Swz<D>(r, cc), kc + static_cast<int64_t>(slot) * a.kv_stride + cc * 8, valid);
        CpAsync16(sv + Swz<D>(r, cc), vc + static_cast<int64_t>(slot) * a.kv_stride + cc * 8, valid);
      }
      // K's low part: zeros for full rows (a low row's is written by FixLowChunk).
      if (kLow && has_low && k == kRowFull) CpAsync16(sv + kTileElems + Swz<D>(r, cc), kc, false);
    }
  };
#pragma unroll
  for (int i = 0; i < kStages - 1; ++i) {
    if (i < my_tiles) issue(i);
    CpAsyncCommit();
  }
  CpAsyncWait<kStages - 1>();  // Q (committed first) has landed, for this thread
  __syncthreads();             // ... and for everyone
  if constexpr (kQuant) {  // Q in fp16 for the fp16 mma (clamped to its range; rows past the group are 0)
    for (int idx = tid; idx < 16 * D / 2; idx += kThreads) {
      uint32_t* p2 = reinterpret_cast<uint32_t*>(sq) + idx;
      const float2 f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(p2));
      auto clamp = [](float x) { return x != x ? x : fminf(fmaxf(x, -65504.f), 65504.f); };  // NaN stays NaN
      *p2 = PackF16(clamp(f.x), clamp(f.y));
    }
    __syncthreads();
  }
  uint32_t qa[D / 16][4];
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) Ldsm4(qa[kk], q_off[kk & 3] + 32 * (kk & 4));

  float* const scores = sc.scores + (static_cast<size_t>(s) * a.num_heads + kvh * group + g) * a.max_seq_len + p0;
  float o[D / 8][4];
#pragma unroll
  for (int nn = 0; nn < D / 8; ++nn) o[nn][0] = o[nn][1] = o[nn][2] = o[nn][3] = 0.f;
  float m = -INFINITY, l = 0.f;  // row g: raw-score max, this lane's part of the sum
  for (int i = 0; i < my_tiles; ++i) {
    CpAsyncWait<kStages - 2>();  // tile i has landed (this thread's copies)
    __syncwarp();                // everyone's (and the lanes' own stores), and tile i - 1's stage is free
    if (i + kStages - 1 < my_tiles) issue(i + kStages - 1);
    CpAsyncCommit();
    __nv_bfloat16* const stage = ring + (i % kStages) * kStageElems;
    const uint32_t sk = SmemAddr(stage);
    const uint32_t sv = sk + kTileElems * 2;
    const int j0 = (warp + kWarps * i) * kTile;
    float sc4[2][4] = {};
    float kscale[2][2], vscale[2][2];  // kQuant: the lane's columns' scales
    if constexpr (kQuant) {
      // fp8 / int8: which half of each row's scale word holds its scale (the offset's bit 1; both
      // sides' bases are 16-byte aligned and share the offsets).
      uint32_t half = 0;
      if (quant != KvQuant::kInt4) {
        const int r = lane & (kTile - 1), j = j0 + r;
        int64_t code, scale;
        row_at(j < n ? static_cast<uint32_t>(s_slot[j]) : 0u, &code, &scale);
        half = __ballot_sync(0xffffffffu, (scale & 2) != 0 && lane < kTile);
      }
      const uint32_t* kscl = reinterpret_cast<const uint32_t*>(stage + kTilesPerStage<kLow> * kTileElems);
      DequantTile<D, false>(quant, stage, reinterpret_cast<const uint8_t*>(stage) + raw_at, raw_row, kscl, lane);
      DequantTile<D, true>(quant, stage + kTileElems, reinterpret_cast<const uint8_t*>(stage + kTileElems) + raw_at, raw_row,
                     kscl + kTile * 4, lane);
      // The scales of this lane's score columns (keys nn * 8 + 2 t4 + e), K's and V's.
#pragma unroll
      for (int nn = 0; nn < 2; ++nn) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int r = nn * 8 + 2 * t4 + e;
          kscale[nn][e] = ScaleOfRow(quant, kscl, half, r);
          vscale[nn][e] = ScaleOfRow(quant, kscl + kTile * 4, half, r);
        }
      }
      __syncwarp();  // every lane's rows written before the ldmatrix reads
      TileQK<D, true>(qa, sk, k_off, sc4);
#pragma unroll
      for (int nn = 0; nn < 2; ++nn) {
        sc4[nn][0] *= kscale[nn][0];
        sc4[nn][1] *= kscale[nn][1];
      }
    }
    if (kLow && tile_low(i)) {
      // MiKV: the tile's low rows to the values read (K as hi in place + lo in the third tile).
      const int jl = j0 + (lane & (kTile - 1));
      const bool any_slot = __any_sync(0xffffffffu, jl < n && s_kind[kLow ? jl : 0] == kRowLowSlot);
      const float* inv = low.balance != nullptr ? s_inv + (kLow ? (lane % kChunks) * 8 : 0) : nullptr;
      constexpr int kJ = kTile * kChunks / 32, kG = kJ < 4 ? kJ : 4;  // chunks per lane, per batch
      const int cc = lane % kChunks;  // the same chunk of every row the lane holds
      if (!any_slot) {
        // Full and packed rows only (the steady state after compactions): each batch's pieces
        // read before any is written (the reads in flight together), then decoded.
#pragma unroll
        for (int g0 = 0; g0 < kJ; g0 += kG) {
          uint2 kr[kG], vr[kG];
          bool packed[kG];
#pragma unroll
          for (int q = 0; q < kG; ++q) {
            const int r = (lane + 32 * (g0 + q)) / kChunks, j = j0 + r;
            packed[q] = j < n && s_kind[kLow ? j : 0] == kRowPacked;
            if (packed[q]) {
              kr[q] = *reinterpret_cast<const uint2*>(stage + Swz<D>(r, cc));
              vr[q] = *reinterpret_cast<const uint2*>(stage + kTileElems + Swz<D>(r, cc));
            }
          }
#pragma unroll
          for (int q = 0; q < kG; ++q) {
            if (!packed[q]) continue;
            const int r = (lane + 32 * (g0 + q)) / kChunks;
            float x[8];
            DecodePacked(kr[q], cc, a.low_bits, inv, x);
            StoreLow(x, stage + Swz<D>(r, cc), stage + 2 * kTileElems + Swz<D>(r, cc));
            DecodePacked(vr[q], cc, a.low_bits, nullptr, x);
            StoreLow(x, stage + kTileElems + Swz<D>(r, cc), nullptr);
          }
        }
      } else {
#pragma unroll
        for (int jj = 0; jj < kJ; ++jj) {
          const int r = (lane + 32 * jj) / kChunks, j = j0 + r;
          const uint8_t k = j < n ? s_kind[kLow ? j : 0] : kRowFull;
          FixLowChunk<D>(k, stage + Swz<D>(r, cc), stage + 2 * kTileElems + Swz<D>(r, cc), low.balance, inv, cc,
                         a.low_bits);
          FixLowChunk<D>(k, stage + kTileElems + Swz<D>(r, cc), nullptr, nullptr, nullptr, cc, a.low_bits);
        }
      }
      __syncwarp();
      TileQK<D>(qa, sk + kTileElems * 4, k_off, sc4);
    }
    if constexpr (!kQuant) TileQK<D>(qa, sk, k_off, sc4);
#pragma unroll
    for (int nn = 0; nn < 2; ++nn) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int j = j0 + nn * 8 + 2 * t4 + e;
        if (j >= n) {
          sc4[nn][e] = -INFINITY;
        } else if (a.record_hits && g < group && (!kLow || s_kind[kLow ? j : 0] == kRowFull)) {
          scores[s_off[j]] = sc4[nn][e] * a.scale;  // the importance pass reads full keys only
        }
      }
    }
    uint32_t pa[4];
    // kQuant: each column times its V row's scale (the tile holds codes); bf16: no underflow.
    SoftmaxTileStep<D>(sc4, scale2, m, l, o, pa, [&](int nn, int e) {
      if constexpr (kQuant) {
        return vscale[nn][e];
      } else {
        return 1.f;
      }
    });
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
  float* const partial = sc.partial + ((static_cast<size_t>(s) * sc.max_chunks + c) * a.num_heads + kvh * group) * D;
  for (int idx = tid; idx < group * D; idx += kThreads) {
    const int h = idx / D, d = idx % D;
    float mx, sum;
    const float out = CombineWarpStates<D, kWarps>(comb, h, d, scale2, mx, sum);  // mx finite: n > 0
    partial[static_cast<size_t>(h) * D + d] = out;
    if (d == 0) {
      ml[static_cast<size_t>(h) * sc.max_chunks * 2] = mx * a.scale;  // natural-log units
      ml[static_cast<size_t>(h) * sc.max_chunks * 2 + 1] = sum;
    }
  }
}

// (2) Grid as (1), kThreads threads: last_hit of the chunk's full keys.
__global__ void __launch_bounds__(kThreads) ImportanceKernel(KvPolicyDecodeArgs a, Scratch sc) {
  const int c = blockIdx.x, kvh = blockIdx.y, s = blockIdx.z;
  const KvPolicySeq seq = a.seqs[s];
  const int len = seq.seq_len - seq.slot_offset, walk = WalkLength(seq, a.low_bits), p0 = c * kKvPolicyChunk;
  if (p0 >= len) return;  // packed entries are never recorded
  const int group = a.num_heads / a.num_kv_heads;
  const int chunks = (walk + kKvPolicyChunk - 1) / kKvPolicyChunk;
  __shared__ float sm_max[kMaxGroup], sm_inv[kMaxGroup];
  __shared__ int sm_t;
  SequenceSoftmax(sc, s, kvh, a.num_heads, a.num_kv_heads, chunks, sm_max, sm_inv, &sm_t);
  __syncthreads();
  const float threshold = 1.0f / static_cast<float>(max(sm_t, 1));
  const int32_t query_pos = seq.seq_len - 1;
  const size_t lh = static_cast<size_t>(a.layer * a.num_kv_heads + kvh) * seq.capacity;
  const float* scores = sc.scores + (static_cast<size_t>(s) * a.num_heads + kvh * group) * a.max_seq_len;
  const int end = min(len, p0 + kKvPolicyChunk);
  for (int v = p0 + threadIdx.x; v < end; v += kThreads) {
    const int kp = seq.pos[lh + v];
    if (kp < 0 || seq.state[lh + kp] != kKvPolicyFull) continue;  // low keys: never chosen again
    bool hit = false;
    for (int h = 0; h < group; ++h) {
      hit |= __expf(scores[static_cast<size_t>(h) * a.max_seq_len + v] - sm_max[h]) * sm_inv[h] >= threshold;
    }
    // atomicMax: several entries may be query rows of one sequence (KvPolicySeq::q_row).
    int32_t* last_hit = seq.last_hit + lh + kp;
    if (hit && *last_hit < query_pos) atomicMax(last_hit, query_pos);
  }
}

// (3) Grid (num_heads, num_seqs), D threads; `width` (<= D) columns per head in out (D, or a
// LoRC latent layer's v_rank: kv_policy_latent.cu).
template <int D>
__global__ void __launch_bounds__(D) ReduceKernel(KvPolicyDecodeArgs a, Scratch sc, int width) {
  const int h = blockIdx.x, s = blockIdx.y, d = threadIdx.x;
  const KvPolicySeq& seq = a.seqs[s];
  if (seq.no_out || d >= width) return;
  const int chunks = (WalkLength(seq, a.low_bits) + kKvPolicyChunk - 1) / kKvPolicyChunk;
  const float* ml = sc.chunk_ml + (static_cast<size_t>(s) * a.num_heads + h) * sc.max_chunks * 2;
  const float* partial = sc.partial + static_cast<size_t>(s) * sc.max_chunks * a.num_heads * D +
                         static_cast<size_t>(h) * D + d;
  float mx = -INFINITY;
  for (int i = 0; i < chunks; ++i) mx = fmaxf(mx, ml[2 * i]);
  float sum = 0.f, out = 0.f;
  for (int i = 0; i < chunks; ++i) {
    if (ml[2 * i] == -INFINITY) continue;  // a chunk without keys
    const float w = __expf(ml[2 * i] - mx);
    sum = fmaf(ml[2 * i + 1], w, sum);
    out = fmaf(partial[static_cast<size_t>(i) * a.num_heads * D], w, out);
  }
  a.out[QRow(seq, s) * a.out_stride + static_cast<int64_t>(h) * width + d] = __float2bfloat16(sum > 0.f ? out / sum : 0.f);
}

template <int D, bool kLow, bool kQuant = false>
cudaError_t Launch(const KvPolicyDecodeArgs& a, const Scratch& sc, cudaStream_t stream) {
  constexpr size_t smem = SmemBytes<D, kLow, kQuant>();
  static bool allowed = false;  // once per process and instantiation (a worker drives one device)
  if (!allowed) {
    const cudaError_t e =
        cudaFuncSetAttribute(PolicyMmaKernel<D, kLow, kQuant>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(smem));
    if (e != cudaSuccess) return e;
    allowed = true;
  }
  const dim3 grid(sc.max_chunks, a.num_kv_heads, a.num_seqs);
  PolicyMmaKernel<D, kLow, kQuant><<<grid, kThreads, smem, stream>>>(a, sc);
  return LaunchImportanceAndReduce(a, sc, D, stream);
}

}  // namespace

cudaError_t LaunchImportanceAndReduce(const KvPolicyDecodeArgs& a, const Scratch& sc, int out_width,
                                      cudaStream_t stream) {
  if (a.record_hits) ImportanceKernel<<<dim3(sc.max_chunks, a.num_kv_heads, a.num_seqs), kThreads, 0, stream>>>(a, sc);
  if (a.head_dim == 128) {
    ReduceKernel<128><<<dim3(a.num_heads, a.num_seqs), 128, 0, stream>>>(a, sc, out_width);
  } else {
    ReduceKernel<64><<<dim3(a.num_heads, a.num_seqs), 64, 0, stream>>>(a, sc, out_width);
  }
  return cudaGetLastError();
}

bool KvPolicyDecodeMmaApplies(const KvPolicyDecodeArgs& a) {
  static const bool enabled = TensorCoreKernelsEnabled("LORC_KV_POLICY_MMA");
  // A quantized cache: CORM only, K and V of one geometry (the kernel addresses both by K's).
  const KvqSide& k = a.layout.k_q;
  const KvqSide& v = a.layout.v_q;
  const bool quant_ok = a.layout.kv_quant == KvQuant::kNone ||
                        (a.low_bits == 0 && k.code_row == v.code_row && k.scale_row == v.scale_row &&
                         k.head_code == v.head_code && k.head_scales == v.head_scales && k.block_size == v.block_size);
  return enabled && !a.cuda_cores && quant_ok && Aligned16(a.q) && Aligned16(a.k_cache) && Aligned16(a.v_cache) &&
         a.q_stride % 8 == 0 && a.kv_stride % 8 == 0;
}

cudaError_t LaunchKvPolicyDecodeMma(const KvPolicyDecodeArgs& a, cudaStream_t stream) {
  size_t bytes = 0;
  const Scratch sc = Carve(a.scratch, a.num_seqs, a.num_heads, a.num_kv_heads, a.head_dim, a.max_seq_len, &bytes);
  const bool low = a.low_bits > 0;
  if (a.layout.kv_quant != KvQuant::kNone) {  // CORM over a quantized cache (Applies: never MiKV)
    if (a.head_dim == 128) return Launch<128, false, true>(a, sc, stream);
    if (a.head_dim == 64) return Launch<64, false, true>(a, sc, stream);
    return cudaErrorInvalidValue;
  }
  if (a.head_dim == 128) return low ? Launch<128, true>(a, sc, stream) : Launch<128, false>(a, sc, stream);
  if (a.head_dim == 64) return low ? Launch<64, true>(a, sc, stream) : Launch<64, false>(a, sc, stream);
  return cudaErrorInvalidValue;
}

}  // namespace kvp
}  // namespace lorc::kernels
