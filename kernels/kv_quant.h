// Low-precision KV cache storage (`--kv-cache-dtype fp8|int8|int4`): the code formats, the
// per-block layout arithmetic and the quantize / dequantize math, one definition for the host and
// the device. The CPU backend (backend/cpu_kv_cache.cc) is the reference that calls these; CUDA
// kernels are to call the same functions. Header-only and framework-free: plain C++ without nvcc,
// __host__ __device__ (LORC_HD) under nvcc; only C math (rintf, fabsf, fmaxf, fminf) and memcpy.
//
// Formats (per token and KV head; a "head" is head_dim values of full K/V or the r values of a
// LoRC latent):
//   kFp8E4m3  OCP fp8 e4m3fn codes (max 448, no infinities, 0x7f/0xff NaN), round-to-nearest-even,
//             saturating; one fp16 scale per head: s = absmax / 448 rounded UP to fp16, code =
//             e4m3(x / s). Error per element <= 2^-4 |x| (normal codes) or 2^-10 s (subnormal).
//   kInt8     symmetric int8 codes in [-127, 127]; one fp16 scale per head: s = absmax / 127
//             rounded up to fp16, code = rint(x / s). Error per element <= s / 2.
//   kInt4     asymmetric 4-bit codes in [0, 15] (KIVI / MiKV style): per head, groups of
//             kKvInt4Group = 32 consecutive channels (a head narrower than 32 is one group; the
//             last group of a head whose width is not a multiple of 32 is shorter); per group an
//             fp16 scale s and an fp16 zero point z (the group minimum rounded DOWN to fp16, a real
//             offset, not an integer): s = (max - z) / 15 rounded up to fp16, code = rint((x - z) / s),
//             x' = z + code * s. Error per element <= s / 2. Two codes per byte, channel 2i in the
//             low nibble, 2i + 1 in the high nibble; each head's codes start on a byte.
// Rounding the scale up (and the zero point down) keeps every element inside the code range, so
// the bounds above hold with the STORED scale. Scales are fp16, not fp32: half the overhead
// (int4: 4 instead of 8 bytes per 32 codes of 16 bytes) and the range suffices: scales below 2^-24
// round up to 2^-24 (absolute error then <= 2^-25 int8/int4), values beyond +-65504 (int4) or a
// head absmax beyond 65504 * 448 (fp8) / * 127 (int8) saturate. Inputs must be finite.
//
// Layout of one side (K or V) of one layer (kvstore/kv_spec.h): block b of `block_size` tokens is
// KvqBlockBytes bytes at b * KvqBlockBytes: first block_size rows of codes (KvqCodeRowBytes each:
// head h's codes at h * KvqHeadCodeBytes, the row padded with zeros to a multiple of 16 bytes so
// rows and the scale area start 16-byte aligned), then block_size rows of fp16 scales
// (KvqScaleRowBytes each: per head, per group, the scale then (int4) the zero point).
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#if !defined(LORC_HD)
#if defined(__CUDACC__)
#define LORC_HD __host__ __device__
#else
#define LORC_HD
#endif
#endif

namespace lorc::kernels {

// The code format of a quantized KV cache; kNone: elements of the cache's dtype (F32 / BF16).
enum class KvQuant : uint8_t { kNone = 0, kFp8E4m3 = 1, kInt8 = 2, kInt4 = 3 };

inline constexpr int kKvInt4Group = 32;        // int4: channels per (scale, zero point) group
inline constexpr int kKvCodeRowAlign = 16;     // bytes: code rows are padded to this
inline constexpr float kFp8E4m3Max = 448.0f;
inline constexpr float kKvInt8Max = 127.0f;
inline constexpr float kKvInt4Max = 15.0f;
inline constexpr float kKvF16Max = 65504.0f;

// --- scalar conversions -------------------------------------------------------------------------

LORC_HD inline uint32_t KvqFloatBits(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof(u));
  return u;
}
LORC_HD inline float KvqBitsFloat(uint32_t u) {
  float f;
  memcpy(&f, &u, sizeof(f));
  return f;
}

// IEEE binary16 -> fp32 (exact).
LORC_HD inline float KvqF16ToF32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0) {
    const float v = static_cast<float>(m) * (1.0f / 16777216.0f);  // m * 2^-24
    return sign ? -v : v;
  }
  if (e == 31) return KvqBitsFloat(sign | 0x7f800000u | (m << 13));
  return KvqBitsFloat(sign | ((e + 112u) << 23) | (m << 13));
}

// fp32 -> binary16, round-to-nearest-even, saturating at +-65504. Finite inputs only.
LORC_HD inline uint16_t KvqF32ToF16(float f) {
  const uint32_t bits = KvqFloatBits(f);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t a = bits & 0x7fffffffu;
  if (a < 0x38800000u) {  // |f| < 2^-14: subnormal (1024 rounds to the smallest normal, 0x400)
    return static_cast<uint16_t>(sign | static_cast<uint16_t>(rintf(KvqBitsFloat(a) * 16777216.0f)));
  }
  uint32_t h = ((a + 0xfffu + ((a >> 13) & 1u)) >> 13) - (112u << 10);
  if (h > 0x7bffu) h = 0x7bffu;
  return static_cast<uint16_t>(sign | h);
}

// The smallest fp16 >= x, for 0 <= x <= 65504.
LORC_HD inline uint16_t KvqF16RoundUp(float x) {
  uint16_t h = KvqF32ToF16(x);
  if (KvqF16ToF32(h) < x) ++h;
  return h;
}

// The largest fp16 <= x, for |x| <= 65504.
LORC_HD inline uint16_t KvqF16RoundDown(float x) {
  uint16_t h = KvqF32ToF16(x);
  if (KvqF16ToF32(h) > x) {
    if (h == 0) {
      h = 0x8001u;
    } else if (h & 0x8000u) {
      ++h;  // more negative
    } else {
      --h;
    }
  }
  return h;
}

// fp32 -> OCP e4m3fn: round-to-nearest-even, saturating to +-448 (infinities too), NaN -> 0x7f.
LORC_HD inline uint8_t KvqF32ToFp8E4m3(float f) {
  const uint32_t bits = KvqFloatBits(f);
  const uint8_t sign = static_cast<uint8_t>((bits >> 24) & 0x80u);
  const uint32_t a = bits & 0x7fffffffu;
  if (a > 0x7f800000u) return static_cast<uint8_t>(sign | 0x7fu);
  if (a >= 0x43e00000u) return static_cast<uint8_t>(sign | 0x7eu);  // >= 448
  if (a < 0x3c800000u) {  // < 2^-6: subnormal m * 2^-9 (m = 8 is the smallest normal, 0x08)
    return static_cast<uint8_t>(sign | static_cast<uint8_t>(rintf(KvqBitsFloat(a) * 512.0f)));
  }
  uint32_t c = ((a + 0x7ffffu + ((a >> 20) & 1u)) >> 20) - (120u << 3);
  if (c > 0x7eu) c = 0x7eu;
  return static_cast<uint8_t>(sign | c);
}

LORC_HD inline float KvqFp8E4m3ToF32(uint8_t c) {
  const uint32_t e = (c >> 3) & 0xfu, m = c & 7u;
  float v;
  if (e == 0) {
    v = static_cast<float>(m) * (1.0f / 512.0f);
  } else if (e == 15 && m == 7) {
    v = KvqBitsFloat(0x7fc00000u);
  } else {
    v = KvqBitsFloat(((e + 120u) << 23) | (m << 20));
  }
  return (c & 0x80u) ? -v : v;
}

// --- layout -------------------------------------------------------------------------------------

// Scale groups per head of `head_width` values: int4 ceil(head_width / 32), fp8 / int8 one.
LORC_HD inline int64_t KvqGroupsPerHead(KvQuant q, int64_t head_width) {
  return q == KvQuant::kInt4 ? (head_width + kKvInt4Group - 1) / kKvInt4Group : 1;
}
// Bytes of one head's codes in a token row.
LORC_HD inline int64_t KvqHeadCodeBytes(KvQuant q, int64_t head_width) {
  return q == KvQuant::kInt4 ? (head_width + 1) / 2 : head_width;
}
// Bytes of one token's codes (all heads), padded to a multiple of kKvCodeRowAlign.
LORC_HD inline int64_t KvqCodeRowBytes(KvQuant q, int64_t heads, int64_t head_width) {
  const int64_t n = heads * KvqHeadCodeBytes(q, head_width);
  return (n + kKvCodeRowAlign - 1) / kKvCodeRowAlign * kKvCodeRowAlign;
}
// fp16 values per group: the scale, and for int4 the zero point.
LORC_HD inline int64_t KvqScalesPerGroup(KvQuant q) { return q == KvQuant::kInt4 ? 2 : 1; }
// Bytes of one token's scales (all heads).
LORC_HD inline int64_t KvqScaleRowBytes(KvQuant q, int64_t heads, int64_t head_width) {
  return heads * KvqGroupsPerHead(q, head_width) * KvqScalesPerGroup(q) * 2;
}
LORC_HD inline int64_t KvqTokenBytes(KvQuant q, int64_t heads, int64_t head_width) {
  return KvqCodeRowBytes(q, heads, head_width) + KvqScaleRowBytes(q, heads, head_width);
}
LORC_HD inline int64_t KvqBlockBytes(KvQuant q, int32_t block_size, int64_t heads, int64_t head_width) {
  return block_size * KvqTokenBytes(q, heads, head_width);
}
// The codes of the token in flat slot `slot` (block slot / block_size, row slot % block_size).
LORC_HD inline uint8_t* KvqTokenCodes(void* base, KvQuant q, int32_t block_size, int64_t heads,
                                      int64_t head_width, int64_t slot) {
  const int64_t block = slot / block_size, row = slot % block_size;
  return static_cast<uint8_t*>(base) + block * KvqBlockBytes(q, block_size, heads, head_width) +
         row * KvqCodeRowBytes(q, heads, head_width);
}
// Its scales (fp16 bits; 2-byte aligned when base is).
LORC_HD inline uint16_t* KvqTokenScales(void* base, KvQuant q, int32_t block_size, int64_t heads,
                                        int64_t head_width, int64_t slot) {
  const int64_t block = slot / block_size, row = slot % block_size;
  uint8_t* b = static_cast<uint8_t*>(base) + block * KvqBlockBytes(q, block_size, heads, head_width);
  return reinterpret_cast<uint16_t*>(b + block_size * KvqCodeRowBytes(q, heads, head_width) +
                                     row * KvqScaleRowBytes(q, heads, head_width));
}

// Byte geometry of one side (K or V) of a quantized layer, what the CUDA kernels address it by:
// the token at (block b, row r) has its codes at b * block_bytes() + r * code_row (head h's at
// + h * head_code) and its fp16 scales at b * block_bytes() + block_size * code_row +
// r * scale_row (head h's at + h * head_scales fp16 values).
struct KvqSide {
  int64_t code_row = 0;     // bytes, KvqCodeRowBytes
  int64_t scale_row = 0;    // bytes, KvqScaleRowBytes
  int32_t head_code = 0;    // bytes, KvqHeadCodeBytes
  int32_t head_scales = 0;  // fp16 values per head: groups x scales per group
  int32_t block_size = 0;
  LORC_HD int64_t block_bytes() const { return block_size * (code_row + scale_row); }
};
LORC_HD inline KvqSide MakeKvqSide(KvQuant q, int32_t block_size, int64_t heads, int64_t head_width) {
  KvqSide s;
  s.code_row = KvqCodeRowBytes(q, heads, head_width);
  s.scale_row = KvqScaleRowBytes(q, heads, head_width);
  s.head_code = static_cast<int32_t>(KvqHeadCodeBytes(q, head_width));
  s.head_scales = static_cast<int32_t>(KvqGroupsPerHead(q, head_width) * KvqScalesPerGroup(q));
  s.block_size = block_size;
  return s;
}

// Whether the CUDA kernels can read a side of this geometry with their 8-channel loads: its
// block_size is the batch's, blocks start 16-byte aligned and each head's codes 8-byte aligned
// (4 for int4), i.e. head widths multiples of 8.
LORC_HD inline bool KvqSideReadable(KvQuant q, const KvqSide& s, int32_t block_size) {
  return q != KvQuant::kNone && s.block_size == block_size && block_size > 0 && s.block_bytes() % 16 == 0 &&
         s.head_code % (q == KvQuant::kInt4 ? 4 : 8) == 0;
}

// --- one group ----------------------------------------------------------------------------------

// fp8 / int8: the fp16 scale of a group whose largest |x| is `amax`; *inv = 1 / scale (0 for a
// zero scale), the factor codes are taken of.
LORC_HD inline uint16_t KvqSymmetricScale(KvQuant q, float amax, float* inv) {
  float s = amax / (q == KvQuant::kFp8E4m3 ? kFp8E4m3Max : kKvInt8Max);
  if (s > kKvF16Max) s = kKvF16Max;
  const uint16_t sh = KvqF16RoundUp(s);
  const float sf = KvqF16ToF32(sh);
  *inv = sf > 0.0f ? 1.0f / sf : 0.0f;
  return sh;
}
// fp8 / int8: the code of x * inv.
LORC_HD inline uint8_t KvqSymmetricCode(KvQuant q, float v) {
  if (q == KvQuant::kFp8E4m3) return KvqF32ToFp8E4m3(v);
  const float r = fminf(fmaxf(rintf(v), -kKvInt8Max), kKvInt8Max);
  return static_cast<uint8_t>(static_cast<int8_t>(r));
}

// fp8 / int8: `n` values -> n codes and one fp16 scale (see the header comment).
LORC_HD inline void KvqQuantizeSymmetric(KvQuant q, const float* x, int64_t n, uint8_t* codes,
                                         uint16_t* scale) {
  float amax = 0.0f;
  for (int64_t i = 0; i < n; ++i) amax = fmaxf(amax, fabsf(x[i]));
  float inv;
  *scale = KvqSymmetricScale(q, amax, &inv);
  for (int64_t i = 0; i < n; ++i) codes[i] = KvqSymmetricCode(q, x[i] * inv);
}

LORC_HD inline float KvqDequantizeSymmetric(KvQuant q, uint8_t code, float scale) {
  return q == KvQuant::kFp8E4m3 ? KvqFp8E4m3ToF32(code) * scale
                                : static_cast<float>(static_cast<int8_t>(code)) * scale;
}

// int4: a group's fp16 (scale, zero point) into scale_zero[0..1] from its minimum and maximum;
// *z = the zero point, *inv = 1 / scale (0 for a zero scale).
LORC_HD inline void KvqInt4ScaleZero(float mn, float mx, uint16_t* scale_zero, float* z, float* inv) {
  mn = fminf(fmaxf(mn, -kKvF16Max), kKvF16Max);
  mx = fminf(fmaxf(mx, -kKvF16Max), kKvF16Max);
  const uint16_t zh = KvqF16RoundDown(mn);
  *z = KvqF16ToF32(zh);
  float s = (mx - *z) / kKvInt4Max;
  if (s > kKvF16Max) s = kKvF16Max;
  const uint16_t sh = KvqF16RoundUp(s);
  scale_zero[0] = sh;
  scale_zero[1] = zh;
  const float sf = KvqF16ToF32(sh);
  *inv = sf > 0.0f ? 1.0f / sf : 0.0f;
}
// int4: the code of x in a group of zero point z and 1 / scale inv.
LORC_HD inline uint32_t KvqInt4Code(float x, float z, float inv) {
  return static_cast<uint32_t>(fminf(fmaxf(rintf((x - z) * inv), 0.0f), kKvInt4Max));
}

// int4: `n` values (at most kKvInt4Group) -> n nibbles from the start of `codes` (channel i in
// byte i / 2, low nibble for even i) and an fp16 (scale, zero point) pair.
LORC_HD inline void KvqQuantizeInt4Group(const float* x, int64_t n, uint8_t* codes, uint16_t* scale_zero) {
  float mn = x[0], mx = x[0];
  for (int64_t i = 1; i < n; ++i) {
    mn = fminf(mn, x[i]);
    mx = fmaxf(mx, x[i]);
  }
  float z, inv;
  KvqInt4ScaleZero(mn, mx, scale_zero, &z, &inv);
  for (int64_t i = 0; i < n; i += 2) {
    const uint32_t r0 = KvqInt4Code(x[i], z, inv);
    const uint32_t r1 = i + 1 < n ? KvqInt4Code(x[i + 1], z, inv) : 0u;
    codes[i / 2] = static_cast<uint8_t>(r0 | (r1 << 4));
  }
}

LORC_HD inline float KvqDequantizeInt4(const uint8_t* codes, int64_t i, float scale, float zero) {
  const uint32_t c = (codes[i / 2] >> ((i & 1) * 4)) & 0xfu;
  return zero + static_cast<float>(c) * scale;
}

// --- one token ----------------------------------------------------------------------------------

// Quantizes one token's row x[heads * head_width] (head h at [h * head_width, (h+1) * head_width))
// into its code row (KvqCodeRowBytes; padding zeroed) and scale row (KvqScaleRowBytes).
LORC_HD inline void KvqQuantizeToken(KvQuant q, const float* x, int64_t heads, int64_t head_width,
                                     uint8_t* codes, uint16_t* scales) {
  const int64_t used = heads * KvqHeadCodeBytes(q, head_width);
  for (int64_t i = used; i < KvqCodeRowBytes(q, heads, head_width); ++i) codes[i] = 0;
  const int64_t groups = KvqGroupsPerHead(q, head_width);
  for (int64_t h = 0; h < heads; ++h) {
    const float* xh = x + h * head_width;
    uint8_t* ch = codes + h * KvqHeadCodeBytes(q, head_width);
    if (q != KvQuant::kInt4) {
      KvqQuantizeSymmetric(q, xh, head_width, ch, scales + h);
      continue;
    }
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t c0 = g * kKvInt4Group;
      const int64_t n = head_width - c0 < kKvInt4Group ? head_width - c0 : kKvInt4Group;
      KvqQuantizeInt4Group(xh + c0, n, ch + c0 / 2, scales + 2 * (h * groups + g));
    }
  }
}

// Dequantizes head `h` of one token (its code and scale rows) into out[head_width].
LORC_HD inline void KvqDequantizeHead(KvQuant q, const uint8_t* codes, const uint16_t* scales,
                                      int64_t head_width, int64_t h, float* out) {
  const uint8_t* ch = codes + h * KvqHeadCodeBytes(q, head_width);
  if (q != KvQuant::kInt4) {
    const float s = KvqF16ToF32(scales[h]);
    for (int64_t i = 0; i < head_width; ++i) out[i] = KvqDequantizeSymmetric(q, ch[i], s);
    return;
  }
  const int64_t groups = KvqGroupsPerHead(q, head_width);
  for (int64_t i = 0; i < head_width; ++i) {
    const uint16_t* sz = scales + 2 * (h * groups + i / kKvInt4Group);
    out[i] = KvqDequantizeInt4(ch, i, KvqF16ToF32(sz[0]), KvqF16ToF32(sz[1]));
  }
}

}  // namespace lorc::kernels
