#include "kernels/rms_norm.cuh"

#include <algorithm>

#include "kernels/pdl.cuh"
#include "kernels/vec.cuh"

namespace lorc::kernels {
namespace {

// One block per row. Each thread visits the same elements in both passes, so `out` may alias
// `x`: a thread overwrites only what it has already read.
template <typename T, int N>
__device__ __forceinline__ void NormRow(const RmsNormArgs& a) {
  const int64_t r = blockIdx.x;
  const int units = static_cast<int>(a.cols / N);
  const T* x = static_cast<const T*>(a.x) + r * a.x_ld;
  T* res = a.residual ? static_cast<T*>(a.residual) + r * a.residual_ld : nullptr;
  const T* src = res ? res : x;
  const T* w = static_cast<const T*>(a.weight);
  T* out = static_cast<T*>(a.out) + r * a.out_ld;

  float ss = 0.f;
  for (int u = threadIdx.x; u < units; u += blockDim.x) {
    float v[N];
    LoadF32<T, N>(x + u * N, v);
    if (res) {
      float rv[N];
      LoadF32<T, N>(res + u * N, rv);
#pragma unroll
      for (int i = 0; i < N; ++i) rv[i] = ToF32(FromF32<T>(rv[i] + v[i]));  // the stored value
      StoreF32<T, N>(res + u * N, rv);
#pragma unroll
      for (int i = 0; i < N; ++i) v[i] = rv[i];
    }
#pragma unroll
    for (int i = 0; i < N; ++i) ss += v[i] * v[i];
  }
  const float inv = rsqrtf(BlockSum(ss) / static_cast<float>(a.cols) + a.eps);
  for (int u = threadIdx.x; u < units; u += blockDim.x) {
    float v[N], wv[N];
    LoadF32<T, N>(src + u * N, v);
    LoadF32<T, N>(w + u * N, wv);
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] = wv[i] * (v[i] * inv);
    StoreF32<T, N>(out + u * N, v);
  }
}

template <typename T>
__global__ void RmsNormKernel(const RmsNormArgs a, bool vec) {
  PdlTrigger();
  PdlWait();
  if (vec) {
    NormRow<T, kVec<T>>(a);
  } else {
    NormRow<T, 1>(a);
  }
}

}  // namespace

cudaError_t LaunchRmsNorm(const RmsNormArgs& a, cudaStream_t stream) {
  if (a.cols <= 0 || a.cols > INT32_MAX || a.rows < 0) return cudaErrorInvalidValue;
  if (a.rows == 0) return cudaSuccess;
  const int n = static_cast<int>(16 / ElemSize(a.dtype));
  const bool vec = a.cols % n == 0 && a.x_ld % n == 0 && a.out_ld % n == 0 && Aligned16(a.x) &&
                   Aligned16(a.weight) && Aligned16(a.out) &&
                   (a.residual == nullptr || (a.residual_ld % n == 0 && Aligned16(a.residual)));
  const unsigned threads = BlockThreads(vec ? a.cols / n : a.cols, 1024);
  const dim3 grid(static_cast<unsigned>(a.rows));
  return a.dtype == ElemType::kF32 ? LaunchPdl(RmsNormKernel<float>, grid, threads, 0, stream, nullptr, a, vec)
                                   : LaunchPdl(RmsNormKernel<__nv_bfloat16>, grid, threads, 0, stream, nullptr, a, vec);
}

namespace {
__global__ void SumSquaresPartialsKernel(int64_t rows, int cols, const __nv_bfloat16* x, int64_t x_ld, float* out) {
  PdlTrigger();
  PdlWait();
  const int parts = (cols + 15) / 16;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < rows * parts;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / parts;
    const int c0 = static_cast<int>(i % parts) * 16, count = min(16, cols - c0);
    const __nv_bfloat16* row = x + r * x_ld + c0;
    float s = 0.f;
    for (int c = 0; c < count; ++c) {
      const float v = __bfloat162float(row[c]);
      s = __fadd_rn(s, __fmul_rn(v, v));
    }
    out[i] = s;
  }
}
}  // namespace

cudaError_t LaunchSumSquaresPartials(int64_t rows, int64_t cols, const void* x, int64_t x_ld, float* out,
                                     cudaStream_t stream) {
  if (rows < 0 || cols <= 0 || cols > INT32_MAX || x_ld < cols) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  const int64_t units = rows * ((cols + 15) / 16);
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((units + 255) / 256, 4096));
  return LaunchPdl(SumSquaresPartialsKernel, dim3(blocks), dim3(256), 0, stream, nullptr, rows,
                   static_cast<int>(cols), static_cast<const __nv_bfloat16*>(x), x_ld, out);
}

}  // namespace lorc::kernels
