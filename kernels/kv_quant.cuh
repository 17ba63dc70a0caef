// Device side of the quantized KV cache (kernels/kv_quant.h, `--kv-cache-dtype fp8|int8|int4`),
// for the kernels' .cu files only (never included from host-only code):
//  - reading: KvqLoad8 fetches the codes of 8 consecutive channels of one token and KV head with
//    their scale (and int4 zero point) in one uint4; KvqDequant8 / KvqDequant8Bf16 turn that into
//    fp32 / bf16 values in registers (the attention kernels read codes, never a dequantized copy);
//  - writing: KvqQuantizeRow, a block-cooperative quantization of one token's fp32 row in shared
//    memory into its code and scale rows, bit for bit kv_quant.h's KvqQuantizeToken (the CPU
//    reference): max / min reductions are order-free and every per-element step is the same
//    IEEE fp32 operation (nvcc's default -prec-div: `/` and 1 / s are correctly rounded).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstdint>

#include "kernels/kv_quant.h"

namespace lorc::kernels {

// Where head `head`'s codes of channel c (c even; int4: byte c / 2) and its scales (fp16 values)
// sit for the token at (block, row).
__device__ __forceinline__ const uint8_t* KvqCodePtr(KvQuant q, const uint8_t* base, const KvqSide& s, int64_t block,
                                                     int row, int head, int c) {
  return base + block * s.block_bytes() + row * s.code_row + head * s.head_code + (q == KvQuant::kInt4 ? c / 2 : c);
}
__device__ __forceinline__ const uint16_t* KvqScalePtr(const uint8_t* base, const KvqSide& s, int64_t block, int row,
                                                       int head) {
  return reinterpret_cast<const uint16_t*>(base + block * s.block_bytes() + s.block_size * s.code_row +
                                           row * s.scale_row) +
         head * s.head_scales;
}

// KvqLoad8's value from the codes of the 8 channels and the head's scales (int4: the group's
// (scale, zero) pair) already located.
__device__ __forceinline__ uint4 KvqLoadAt(KvQuant q, const uint8_t* codes, const uint16_t* scales) {
  uint4 r;
  if (q == KvQuant::kInt4) {
    r.x = __ldg(reinterpret_cast<const uint32_t*>(codes));
    r.y = 0;
    r.z = __ldg(reinterpret_cast<const uint32_t*>(scales));
  } else {
    const uint2 v = __ldg(reinterpret_cast<const uint2*>(codes));
    r.x = v.x;
    r.y = v.y;
    r.z = __ldg(scales);
  }
  r.w = 0;
  return r;
}

// The codes of channels [c, c + 8) of head `head` of the token at (block, row), c a multiple of 8
// (and of 32 / 4 for int4's group: c / 32 is the group): .x .y the 8 fp8 / int8 codes (int4: .x
// the 8 nibbles), .z the fp16 scale (int4: scale | zero point << 16). Needs 8-byte aligned code
// rows and head offsets (the launchers check KvqSideReadable).
__device__ __forceinline__ uint4 KvqLoad8(KvQuant q, const uint8_t* base, const KvqSide& s, int64_t block, int row,
                                          int head, int c) {
  const uint16_t* scales = KvqScalePtr(base, s, block, row, head);
  return KvqLoadAt(q, KvqCodePtr(q, base, s, block, row, head, c),
                   q == KvQuant::kInt4 ? scales + 2 * (c / kKvInt4Group) : scales);
}
// The same for a flat slot (block slot / block_size, row slot % block_size).
__device__ __forceinline__ uint4 KvqLoad8Slot(KvQuant q, const uint8_t* base, const KvqSide& s, int64_t slot, int head,
                                              int c) {
  return KvqLoad8(q, base, s, slot / s.block_size, static_cast<int>(slot % s.block_size), head, c);
}

__device__ __forceinline__ float KvqHalfBits(uint32_t h) { return __half2float(__ushort_as_half(static_cast<unsigned short>(h))); }

// fp8 / int8: KvqLoad8's 8 codes as fp32 values WITHOUT the scale (returned: the row's scale, to
// apply to a reduced dot product or a probability instead of to every element); int4: the
// dequantized values (zero point and scale per group; returned 1).
__device__ __forceinline__ float KvqCodes8(KvQuant q, const uint4& raw, float (&out)[8]) {
  if (q == KvQuant::kInt4) {
    const float s = KvqHalfBits(raw.z & 0xffffu), z = KvqHalfBits(raw.z >> 16);
#pragma unroll
    for (int i = 0; i < 8; ++i) out[i] = __fmaf_rn(static_cast<float>((raw.x >> (4 * i)) & 0xfu), s, z);
    return 1.0f;
  }
  const uint32_t w[2] = {raw.x, raw.y};
  if (q == KvQuant::kFp8E4m3) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(w[i / 2] >> (16 * (i % 2))),
                                                       __NV_E4M3);
      const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&h));
      out[2 * i] = f.x;
      out[2 * i + 1] = f.y;
    }
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) out[i] = static_cast<float>(static_cast<int8_t>((w[i / 4] >> (8 * (i % 4))) & 0xffu));
  }
  return KvqHalfBits(raw.z);
}

// KvqLoad8's raw value -> 8 fp32 values: fp8 code (exact via fp16) x scale, int8 code x scale,
// int4 zero + code x scale (one fused rounding; the CPU rounds the product and the sum).
__device__ __forceinline__ void KvqDequant8(KvQuant q, const uint4& raw, float (&out)[8]) {
  const float s = KvqCodes8(q, raw, out);
  if (q == KvQuant::kInt4) return;
#pragma unroll
  for (int i = 0; i < 8; ++i) out[i] *= s;
}

// KvqLoad8's raw value -> 8 bf16 values (KvqDequant8 rounded to nearest even) as one uint4, for
// kernels that stage K/V tiles in shared memory for bf16 tensor-core products.
__device__ __forceinline__ uint4 KvqDequant8Bf16(KvQuant q, const uint4& raw) {
  float f[8];
  KvqDequant8(q, raw, f);
  uint4 r;
  uint32_t* w = &r.x;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    __nv_bfloat162 v = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
    w[i] = *reinterpret_cast<uint32_t*>(&v);
  }
  return r;
}

// Quantizes one token's row x[heads * head_width] (fp32, shared memory or registers' spill: any
// memory the block reads) into codes (KvqCodeRowBytes, padding zeroed) and scales
// (KvqScaleRowBytes), exactly as KvqQuantizeToken. Called by every thread of the block
// (blockDim.x a multiple of 32); warp w takes units w, w + warps, ...: a head (fp8 / int8) or a
// 32-channel group of a head (int4, lane i owning channel i). No barrier inside.
__device__ __forceinline__ void KvqQuantizeRow(KvQuant q, const float* x, int heads, int head_width, uint8_t* codes,
                                               uint16_t* scales) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int head_code = static_cast<int>(KvqHeadCodeBytes(q, head_width));
  const int code_row = static_cast<int>(KvqCodeRowBytes(q, heads, head_width));
  for (int i = heads * head_code + threadIdx.x; i < code_row; i += blockDim.x) codes[i] = 0;
  if (q != KvQuant::kInt4) {
    for (int h = warp; h < heads; h += warps) {
      const float* xh = x + h * head_width;
      float amax = 0.0f;
      for (int i = lane; i < head_width; i += 32) amax = fmaxf(amax, fabsf(xh[i]));
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
      float inv;
      const uint16_t sh = KvqSymmetricScale(q, amax, &inv);
      if (lane == 0) scales[h] = sh;
      uint8_t* ch = codes + h * head_code;
      for (int i = lane; i < head_width; i += 32) ch[i] = KvqSymmetricCode(q, xh[i] * inv);
    }
    return;
  }
  const int groups = static_cast<int>(KvqGroupsPerHead(q, head_width));
  for (int u = warp; u < heads * groups; u += warps) {
    const int h = u / groups, g = u % groups, c0 = g * kKvInt4Group;
    const int n = head_width - c0 < kKvInt4Group ? head_width - c0 : kKvInt4Group;
    const bool on = lane < n;
    const float xv = on ? x[h * head_width + c0 + lane] : 0.0f;
    float mn = on ? xv : INFINITY, mx = on ? xv : -INFINITY;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      mn = fminf(mn, __shfl_xor_sync(0xffffffffu, mn, o));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    }
    uint16_t sz[2];
    float z, inv;
    KvqInt4ScaleZero(mn, mx, sz, &z, &inv);
    if (lane == 0) {
      scales[2 * u] = sz[0];
      scales[2 * u + 1] = sz[1];
    }
    const uint32_t code = on ? KvqInt4Code(xv, z, inv) : 0u;
    const uint32_t hi = __shfl_down_sync(0xffffffffu, code, 1);
    if (on && lane % 2 == 0) {
      codes[h * head_code + (c0 + lane) / 2] = static_cast<uint8_t>(code | ((lane + 1 < n ? hi : 0u) << 4));
    }
  }
}

}  // namespace lorc::kernels
