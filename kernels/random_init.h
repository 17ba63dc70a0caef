// The values of seeded random weights (`--random-weights`), one definition for the host and the
// device: the CPU backend's FillWeights and the CUDA kernel (kernels/random_fill.cu) both call
// these, so every backend makes bit-identical values. Header-only and framework-free: compiles
// as plain C++ (no nvcc, no CUDA headers) and as CUDA (__host__ __device__).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define LORC_HD __host__ __device__
#else
#define LORC_HD
#endif

namespace lorc::kernels {

// SplitMix64 (Steele, Lea and Flood): the finaliser of a 64-bit counter.
LORC_HD inline uint64_t WeightInitMix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// The key of one tensor: Mix(seed ^ name_hash) (model/ hashes the tensor name on the host).
LORC_HD inline uint64_t WeightInitKey(uint64_t seed, uint64_t name_hash) {
  return WeightInitMix(seed ^ name_hash);
}

// Element `index` (row-major index into the FULL tensor) of the tensor with `key`: uniform on
// [-scale, scale) as 2u - 1 times scale with u = the top 24 bits of Mix(key + index) / 2^24.
// u, 2u and 2u - 1 are exact in fp32, so the only rounding is the final product (RNE): the same
// float on any host or device, whether or not the compiler fuses the first multiply-add (the
// device code spells the roundings out anyway).
LORC_HD inline float UniformWeightValue(uint64_t key, uint64_t index, float scale) {
  const uint64_t h = WeightInitMix(key + index);
  const float u = static_cast<float>(h >> 40) * (1.0f / 16777216.0f);  // [0, 1)
#if defined(__CUDA_ARCH__)
  return __fmul_rn(__fsub_rn(__fmul_rn(2.0f, u), 1.0f), scale);
#else
  return (2.0f * u - 1.0f) * scale;
#endif
}

}  // namespace lorc::kernels
