// Device helpers shared by the kernels' .cu files (never included from host-only code): fp32
// conversion of F32/BF16 elements, N-wide loads and stores (one 16-byte access when N elements
// are 16 bytes, else scalar), and a block-wide sum.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace lorc::kernels {

// Elements per 16-byte vector.
template <typename T>
inline constexpr int kVec = static_cast<int>(16 / sizeof(T));

__device__ __forceinline__ float ToF32(float x) { return x; }
__device__ __forceinline__ float ToF32(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T FromF32(float x);
template <>
__device__ __forceinline__ float FromF32<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 FromF32<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// out[0..N) = p[0..N) as fp32. p must be 16-byte aligned when N * sizeof(T) == 16.
template <typename T, int N>
__device__ __forceinline__ void LoadF32(const T* p, float (&out)[N]) {
  if constexpr (N * sizeof(T) == 16) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = ToF32(e[i]);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = ToF32(p[i]);
  }
}

// p[0..N) = in[0..N) rounded to T.
template <typename T, int N>
__device__ __forceinline__ void StoreF32(T* p, const float (&in)[N]) {
  if constexpr (N * sizeof(T) == 16) {
    uint4 raw;
    T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int i = 0; i < N; ++i) e[i] = FromF32<T>(in[i]);
    *reinterpret_cast<uint4*>(p) = raw;
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) p[i] = FromF32<T>(in[i]);
  }
}

// dst[0..N) = src[0..N), bit for bit.
template <typename T, int N>
__device__ __forceinline__ void CopyN(T* dst, const T* src) {
  if constexpr (N * sizeof(T) == 16) {
    *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) dst[i] = src[i];
  }
}

// Sum of `v` over the block (blockDim.x a multiple of 32, at most 1024), returned to every thread.
// Uses 33 floats of static shared memory; call it at most once between __syncthreads().
__device__ __forceinline__ float BlockSum(float v) {
  __shared__ float warp_sums[32];
  __shared__ float total;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < static_cast<int>(blockDim.x >> 5) ? warp_sums[lane] : 0.f;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == 0) total = v;
  }
  __syncthreads();
  return total;
}

// Threads for a block that walks `units` items once: a multiple of 32 in [32, cap].
inline unsigned BlockThreads(int64_t units, unsigned cap) {
  const int64_t t = (units + 31) / 32 * 32;
  return static_cast<unsigned>(t < 32 ? 32 : (t > cap ? cap : t));
}

}  // namespace lorc::kernels
