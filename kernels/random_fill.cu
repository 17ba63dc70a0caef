#include "kernels/random_fill.cuh"

#include "kernels/random_init.h"
#include "kernels/vec.cuh"

namespace lorc::kernels {
namespace {

// Grid-stride over rows, the block's threads over a row's columns (consecutive threads write
// consecutive elements). The hash, not the store, bounds it: ~30 integer ops per element.
template <typename T>
__global__ void WeightFillKernel(const WeightFillArgs a) {
  for (int64_t r = blockIdx.x; r < a.rows; r += gridDim.x) {
    T* row = static_cast<T*>(a.out) + r * a.ld;
    const uint64_t base = static_cast<uint64_t>(a.row0 + r) * static_cast<uint64_t>(a.full_cols) +
                          static_cast<uint64_t>(a.col0);
    for (int64_t c = threadIdx.x; c < a.cols; c += blockDim.x) {
      const float v = a.constant ? a.value : UniformWeightValue(a.key, base + c, a.scale);
      row[c] = FromF32<T>(v);
    }
  }
}

}  // namespace

cudaError_t LaunchWeightFill(const WeightFillArgs& a, cudaStream_t stream) {
  if (a.rows < 0 || a.cols < 0 || a.ld < a.cols) return cudaErrorInvalidValue;
  if (a.rows == 0 || a.cols == 0) return cudaSuccess;
  const unsigned threads = BlockThreads(a.cols, 256);
  const unsigned blocks = static_cast<unsigned>(a.rows < 8192 ? a.rows : 8192);
  if (a.dtype == ElemType::kF32) {
    WeightFillKernel<float><<<blocks, threads, 0, stream>>>(a);
  } else {
    WeightFillKernel<__nv_bfloat16><<<blocks, threads, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

}  // namespace lorc::kernels
