// Seeded random (or constant) fill of a weight block on the device (kernels/random_fill.cu), for
// CudaBackend::FillWeights. Framework-free: plain CUDA runtime types. Values: kernels/random_init.h.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/elem_type.cuh"

namespace lorc::kernels {

struct WeightFillArgs {
  ElemType dtype = ElemType::kBF16;  // of `out`
  void* out = nullptr;               // [rows, cols], row stride `ld` elements
  int64_t ld = 0;
  int64_t rows = 0;
  int64_t cols = 0;
  bool constant = false;             // true: every element = value
  float value = 0.0f;
  uint64_t key = 0;                  // else: UniformWeightValue(key, index, scale) with
  int64_t row0 = 0;                  //   index = (row0 + r) * full_cols + col0 + c
  int64_t col0 = 0;
  int64_t full_cols = 0;
  float scale = 0.0f;
};

// out[r, c] for r < rows, c < cols, rounded once to dtype (BF16: round to nearest even).
// The caller validated the indices (non-negative, col0 + cols <= full_cols, no int64 overflow).
// rows == 0 or cols == 0 launches nothing; negative sizes or ld < cols give cudaErrorInvalidValue.
cudaError_t LaunchWeightFill(const WeightFillArgs& args, cudaStream_t stream);

}  // namespace lorc::kernels
