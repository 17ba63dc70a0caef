// RMSNorm and fused residual-add + RMSNorm, one thread block per row (kernels/rms_norm.cu).
// Framework-free: plain CUDA runtime types.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/elem_type.cuh"

namespace lorc::kernels {

struct RmsNormArgs {
  ElemType dtype = ElemType::kF32;  // of every tensor below
  int64_t rows = 0;
  int64_t cols = 0;                 // hidden size H
  const void* x = nullptr;          // [rows, cols], row stride x_ld elements
  int64_t x_ld = 0;
  void* residual = nullptr;         // [rows, cols] or null (plain RMSNorm)
  int64_t residual_ld = 0;
  const void* weight = nullptr;     // [cols]
  void* out = nullptr;              // [rows, cols]; may alias x (never residual)
  int64_t out_ld = 0;
  float eps = 1e-6f;
};

// Plain (residual null): out = x / sqrt(mean(x^2) + eps) * weight.
// Fused: residual += x (rounded to dtype and stored), then out = RMSNorm(residual) * weight.
// Sums of squares in fp32 over the stored (rounded) values, one rounding of each output.
// 16-byte vector accesses when every pointer and stride allows, scalar ones otherwise.
// Returns cudaErrorInvalidValue for cols <= 0 or cols > 2^31 - 1; rows == 0 launches nothing.
cudaError_t LaunchRmsNorm(const RmsNormArgs& args, cudaStream_t stream);

}  // namespace lorc::kernels
