// Device helpers of the token-level KV policy kernels (kv_policy.cu, kv_policy_decode_mma.cu):
// the policy decode's scratch layout, a sequence's walk (slots, then MiKV's packed entries), cache
// slots through the block table, and MiKV's low entries (kvpolicy/low_precision.{h,cc}'s format
// and arithmetic). Internal to those files, not part of the kernels' interface (kv_policy.cuh).
#pragma once

#include <cuda_bf16.h>

#include <cmath>
#include <cstddef>
#include <cstdint>

#include "kernels/kv_policy.cuh"
#include "kernels/kv_quant.h"

namespace lorc::kernels::kvp {

constexpr int kMaxGroup = 8;

// The scratch of one launch, carved from KvPolicyDecodeArgs::scratch (256-byte aligned parts).
struct Scratch {
  float* scores;    // [num_seqs][num_heads][max_seq_len]
  float* chunk_ml;  // [num_seqs][num_heads][max_chunks][2]: the chunk's softmax max and sum
  int32_t* chunk_n; // [num_seqs][num_kv_heads][max_chunks]: keys (full and low) in the chunk
  float* partial;   // [num_seqs][max_chunks][num_heads][head_dim]
  int32_t max_chunks;
};

inline size_t Align256(size_t b) { return (b + 255) / 256 * 256; }

inline Scratch Carve(void* base, int num_seqs, int num_heads, int num_kv_heads, int head_dim, int max_seq_len,
              size_t* bytes) {
  const int64_t chunks = (max_seq_len + kKvPolicyChunk - 1) / kKvPolicyChunk;
  const size_t scores = Align256(sizeof(float) * num_seqs * num_heads * static_cast<size_t>(max_seq_len));
  const size_t ml = Align256(sizeof(float) * 2 * num_seqs * num_heads * chunks);
  const size_t n = Align256(sizeof(int32_t) * num_seqs * num_kv_heads * chunks);
  const size_t partial = Align256(sizeof(float) * num_seqs * chunks * num_heads * static_cast<size_t>(head_dim));
  *bytes = scores + ml + n + partial;
  char* p = static_cast<char*>(base);
  Scratch s;
  s.scores = reinterpret_cast<float*>(p);
  s.chunk_ml = reinterpret_cast<float*>(p + scores);
  s.chunk_n = reinterpret_cast<int32_t*>(p + scores + ml);
  s.partial = reinterpret_cast<float*>(p + scores + ml + n);
  s.max_chunks = static_cast<int32_t>(chunks);
  return s;
}

// E = head_dim / 32 bf16 values of a row at `p` (lane-contiguous), as fp32.
template <int E>
__device__ __forceinline__ void LoadRow(const __nv_bfloat16* p, float (&v)[E]) {
  if constexpr (E == 4) {
    const uint2 raw = *reinterpret_cast<const uint2*>(p);
    const float2 a = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&raw.x));
    const float2 b = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&raw.y));
    v[0] = a.x; v[1] = a.y; v[2] = b.x; v[3] = b.y;
  } else {
    const float2 a = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(p));
    v[0] = a.x; v[1] = a.y;
  }
}

// The entry's query / output row and block-table row (KvPolicySeq::q_row, table_row; -1: `s`).
__device__ __forceinline__ int64_t QRow(const KvPolicySeq& seq, int s) { return seq.q_row < 0 ? s : seq.q_row; }
__device__ __forceinline__ int64_t TableRow(const KvPolicySeq& seq, int s) {
  return seq.table_row < 0 ? s : seq.table_row;
}

__device__ __forceinline__ int64_t CacheSlot(const int32_t* table, int32_t slot, int32_t block_size) {
  return static_cast<int64_t>(table[slot / block_size]) * block_size + slot % block_size;
}

// --- MiKV's low entries (kvpolicy/low_precision.{h,cc}, bit for bit: each operation rounded
// as the CPU's, no contraction into fused multiply-adds) ---------------------------------------

__device__ __forceinline__ bool IsLow(uint8_t st) { return st == kKvPolicyLow || st == kKvPolicyLowPacked; }

// QuantizeLow's parameters from a row's min and max: zero = min rounded down to fp16, scale =
// (max - zero) / (2^bits - 1) rounded up to fp16, and 1 / scale (0 for a constant row).
struct LowRange {
  uint16_t scale16, zero16;
  float zero, inv;
};
__device__ __forceinline__ LowRange LowRangeOf(float mn, float mx, int bits) {
  LowRange r;
  r.zero16 = KvqF16RoundDown(mn);
  r.zero = KvqF16ToF32(r.zero16);
  r.scale16 = KvqF16RoundUp(__fdiv_rn(__fsub_rn(mx, r.zero), static_cast<float>((1 << bits) - 1)));
  const float scale = KvqF16ToF32(r.scale16);
  r.inv = scale > 0.f ? __fdiv_rn(1.0f, scale) : 0.f;
  return r;
}
// One value's code: round((x - zero) / scale), clamped to [0, 2^bits - 1].
__device__ __forceinline__ int LowCode(float x, const LowRange& r, int bits) {
  return min(max(static_cast<int>(rintf(__fmul_rn(__fsub_rn(x, r.zero), r.inv))), 0), (1 << bits) - 1);
}

// QuantizeLow of a row held by kLanes aligned lanes (a lane holds values [i * E, i * E + E), i
// its index among them; the whole warp, or each half / quarter of it, one row): the codes of this
// lane's values and the entry's fp16 (scale, zero). Every lane of the warp must call it.
template <int E, int kLanes = 32>
__device__ __forceinline__ void QuantizeLane(const float (&x)[E], int bits, int (&code)[E], uint16_t* scale16,
                                             uint16_t* zero16) {
  float mn = x[0], mx = x[0];
#pragma unroll
  for (int e = 1; e < E; ++e) {
    mn = fminf(mn, x[e]);
    mx = fmaxf(mx, x[e]);
  }
#pragma unroll
  for (int o = kLanes / 2; o > 0; o >>= 1) {
    mn = fminf(mn, __shfl_xor_sync(0xffffffffu, mn, o));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  }
  const LowRange r = LowRangeOf(mn, mx, bits);
  *zero16 = r.zero16;
  *scale16 = r.scale16;
#pragma unroll
  for (int e = 0; e < E; ++e) code[e] = LowCode(x[e], r, bits);
}

template <int E>
__device__ __forceinline__ void DequantizeLane(const int (&code)[E], uint16_t scale16, uint16_t zero16,
                                               float (&out)[E]) {
  const float zero = KvqF16ToF32(zero16), scale = KvqF16ToF32(scale16);
#pragma unroll
  for (int e = 0; e < E; ++e) out[e] = __fadd_rn(zero, __fmul_rn(static_cast<float>(code[e]), scale));
}

// EncodeLowEntry's arithmetic for a row as QuantizeLane holds it (`lane`: this lane's index in
// the row): x times the key factors (`balance`, this head's [D]; null for values) in place, then
// its codes and (scale, zero).
template <int E, int kLanes = 32>
__device__ __forceinline__ void QuantizeBalancedLane(float (&x)[E], const float* balance, int lane, int bits,
                                                     int (&code)[E], uint16_t* scale16, uint16_t* zero16) {
  if (balance != nullptr) {
#pragma unroll
    for (int e = 0; e < E; ++e) x[e] = __fmul_rn(x[e], balance[lane * E + e]);
  }
  QuantizeLane<E, kLanes>(x, bits, code, scale16, zero16);
}

// One KV head's low-entry context: the run, its region of a slot, the key factors.
struct LowHead {
  int32_t base = 0, packed = 0;
  const float* balance = nullptr;  // this head's [head_dim], null: none (V, or not fixed)
};

// One side (K or V) of a layer's paged cache as the policy kernels address a KV head's entry of a
// cache slot (kv_policy.cuh KvPolicyCacheLayout): its region (bf16: the head's D values; quantized:
// its codes, where MiKV's packed entries live too) and, quantized, its fp16 scales.
struct CacheSide {
  uint8_t* base = nullptr;
  KvQuant quant = KvQuant::kNone;
  KvqSide q;         // quantized geometry
  int64_t row = 0;   // bf16: elements per slot (kv_stride)
  int32_t head_dim = 0;

  __device__ __forceinline__ int32_t RegionBytes() const { return quant == KvQuant::kNone ? head_dim * 2 : q.head_code; }
  // fp16 scale values of a head (0 for bf16).
  __device__ __forceinline__ int32_t NumScales() const { return quant == KvQuant::kNone ? 0 : q.head_scales; }
  __device__ __forceinline__ uint8_t* Region(int64_t cs, int head) const {
    if (quant == KvQuant::kNone) return base + (cs * row + static_cast<int64_t>(head) * head_dim) * 2;
    return base + (cs / q.block_size) * q.block_bytes() + (cs % q.block_size) * q.code_row +
           static_cast<int64_t>(head) * q.head_code;
  }
  __device__ __forceinline__ uint16_t* Scales(int64_t cs, int head) const {
    return reinterpret_cast<uint16_t*>(base + (cs / q.block_size) * q.block_bytes() + q.block_size * q.code_row +
                                       (cs % q.block_size) * q.scale_row) +
           head * q.head_scales;
  }
};

__device__ __forceinline__ CacheSide MakeSide(const void* base, const KvPolicyCacheLayout& l, bool v_side,
                                              int64_t kv_stride, int head_dim) {
  CacheSide c;
  c.base = static_cast<uint8_t*>(const_cast<void*>(base));
  c.quant = l.kv_quant;
  c.q = v_side ? l.v_q : l.k_q;
  c.row = kv_stride;
  c.head_dim = head_dim;
  return c;
}

// Channels [c, c + E) (E 1, 2 or 4; c a multiple of E) of head `head` in cache slot cs, as fp32:
// bf16 as stored, or a quantized entry dequantized as the CPU's KvqDequantizeHead (fp8 / int8:
// code x scale; int4: zero + code x scale, the product and the sum rounded apart).
template <int E>
__device__ __forceinline__ void LoadValues(CacheSide side, int64_t cs, int head, int c, float (&x)[E]) {
  const uint8_t* r = side.Region(cs, head);
  if (side.quant == KvQuant::kNone) {
    const __nv_bfloat16* p = reinterpret_cast<const __nv_bfloat16*>(r) + c;
    if constexpr (E == 1) {
      x[0] = __bfloat162float(*p);
    } else {
      LoadRow<E>(p, x);
    }
    return;
  }
  const uint16_t* sc = side.Scales(cs, head);
  if (side.quant == KvQuant::kInt4) {
    const uint16_t* sz = sc + 2 * (c / kKvInt4Group);  // E channels never straddle a group
    const float s = KvqF16ToF32(sz[0]), z = KvqF16ToF32(sz[1]);
#pragma unroll
    for (int i = 0; i < E; ++i) {
      const int ch = c + i;
      const float code = static_cast<float>((r[ch / 2] >> ((ch & 1) * 4)) & 0xfu);
      x[i] = __fadd_rn(z, __fmul_rn(code, s));
    }
    return;
  }
  const float s = KvqF16ToF32(sc[0]);
  uint32_t w;
  if constexpr (E == 4) {
    w = *reinterpret_cast<const uint32_t*>(r + c);
  } else if constexpr (E == 2) {
    w = *reinterpret_cast<const uint16_t*>(r + c);
  } else {
    w = r[c];
  }
#pragma unroll
  for (int i = 0; i < E; ++i) {
    const uint8_t code = static_cast<uint8_t>(w >> (8 * i));
    const float v = side.quant == KvQuant::kFp8E4m3 ? KvqFp8E4m3ToF32(code) : static_cast<float>(static_cast<int8_t>(code));
    x[i] = __fmul_rn(v, s);
  }
}

// Byte b of a run from sequence slot `base` in head `head`'s regions (CacheSide::Region; run byte
// b is byte b % region of run slot b / region: kvpolicy/low_precision.h). 32-bit offsets: a
// run's bytes stay below 2^31 (fewer than 2^24 entries, positions, of at most 68 bytes).
__device__ __forceinline__ uint8_t* RunByte(CacheSide side, int head, const int32_t* table, int32_t block_size,
                                            int32_t base, int32_t b) {
  const int32_t region = side.RegionBytes();
  return side.Region(CacheSlot(table, base + b / region, block_size), head) + b % region;
}

// The MiKV context of (layer, head) `lhead` of a sequence (none without low_bits).
__device__ __forceinline__ LowHead LowHeadOf(const KvPolicySeq& seq, int low_bits, int lhead, int head_dim) {
  LowHead h;
  if (low_bits == 0 || seq.num_packed == nullptr) return h;
  h.base = seq.low_base[lhead];
  h.packed = seq.num_packed[lhead];
  if (seq.balance_set[lhead] == kKvBalanceFixed) h.balance = seq.balance + static_cast<size_t>(lhead) * head_dim;
  return h;
}

// The walk of an entry: its slots, then (MiKV) up to packed_max packed entries.
__device__ __forceinline__ int WalkLength(const KvPolicySeq& seq, int low_bits) {
  return seq.seq_len - seq.slot_offset + (low_bits > 0 && seq.num_packed != nullptr ? seq.packed_max : 0);
}

// A block-wide exclusive scan of the threads' counts `mine` (a block of kWarps whole warps, every
// thread calling it; one __syncthreads inside): *at = the counts of the threads below this one,
// *n = the block's total. s_warp: kWarps ints of shared memory, not rewritten until every thread
// has returned from here (the policy decodes' lists of kept keys, in walk order).
template <int kWarps>
__device__ __forceinline__ void BlockExclusiveScan(int mine, int* s_warp, int* at, int* n) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int incl = mine;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int y = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += y;
  }
  if (lane == 31) s_warp[warp] = incl;
  __syncthreads();
  *at = incl - mine;
  *n = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    *at += w < warp ? s_warp[w] : 0;
    *n += s_warp[w];
  }
}

__device__ __forceinline__ float WarpSum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// The sequence's softmax of each query head of KV head kvh's group, from every chunk's (max, sum)
// in the scratch (natural-log units): sm_max[h] and sm_inv[h] = 1 / sum; and *sm_t, t, the keys
// the query attends (every chunk's count). The CTA's warps share the heads, its last warp counts;
// the caller syncs before reading them.
__device__ __forceinline__ void SequenceSoftmax(const Scratch& sc, int s, int kvh, int num_heads, int num_kv_heads,
                                                int chunks, float* sm_max, float* sm_inv, int* sm_t) {
  const int group = num_heads / num_kv_heads, lane = threadIdx.x & 31, warp = threadIdx.x >> 5,
            warps = blockDim.x >> 5;
  for (int h = warp; h < group; h += warps) {
    const float* ml = sc.chunk_ml + (static_cast<size_t>(s) * num_heads + kvh * group + h) * sc.max_chunks * 2;
    float m = -INFINITY, l = 0.f;
    for (int i = lane; i < chunks; i += 32) {
      const float cm = ml[2 * i], cl = ml[2 * i + 1];
      if (cm == -INFINITY) continue;
      const float nm = fmaxf(m, cm);
      l = l * __expf(m - nm) + cl * __expf(cm - nm);
      m = nm;
    }
    float mm = m;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) mm = fmaxf(mm, __shfl_xor_sync(0xffffffffu, mm, o));
    const float ll = WarpSum(m == -INFINITY ? 0.f : l * __expf(m - mm));
    if (lane == 0) {
      sm_max[h] = mm;
      sm_inv[h] = ll > 0.f ? 1.0f / ll : 0.f;
    }
  }
  if (warp == warps - 1) {
    const int32_t* cn = sc.chunk_n + (static_cast<size_t>(s) * num_kv_heads + kvh) * sc.max_chunks;
    int t = 0;
    for (int i = lane; i < chunks; i += 32) t += cn[i];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(0xffffffffu, t, o);
    if (lane == 0) *sm_t = t;
  }
}

// The tensor-core policy decode (kv_policy_decode_mma.cu): whether it serves `a` (sm_80+, a bf16
// cache or CORM over a quantized one, not a.cuda_cores nor LORC_KV_POLICY_MMA=0, q and cache rows
// 16-byte aligned), and its launch (the arguments already checked by LaunchKvPolicyDecode).
bool KvPolicyDecodeMmaApplies(const KvPolicyDecodeArgs& a);
cudaError_t LaunchKvPolicyDecodeMma(const KvPolicyDecodeArgs& a, cudaStream_t stream);
// The tensor-core decodes' passes after the chunks' (kv_policy_decode_mma.cu; the LoRC latent
// decode, kv_policy_latent.cu, shares them): with a.record_hits the importance of every chunk's
// full keys from the scores in `sc`, then the reduce of the chunks' partials into a.out, out_width
// (<= a.head_dim, 64 or 128: the partials' stride) columns per query head. Reads a.seqs,
// num_seqs, layer, num_heads, num_kv_heads, head_dim, max_seq_len, low_bits, out, out_stride.
cudaError_t LaunchImportanceAndReduce(const KvPolicyDecodeArgs& a, const Scratch& sc, int out_width,
                                      cudaStream_t stream);

}  // namespace lorc::kernels::kvp
