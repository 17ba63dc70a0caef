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

// Partial sums of squares of the rows of x [rows, cols] BF16 (pitch x_ld elements): out[r, p] =
// sum of x[r, c]^2 over the group of 16 columns c in [16p, min(16p + 16, cols)), in column order,
// fp32 with one rounding per product and per sum (no fused multiply-add); out fp32 [rows,
// ceil(cols / 16)] dense. The same bits as kernels::LaunchGemvAddBf16's partials
// (gemv.cuh), which a folded-norm GEMV (GemvNormArgs::sum_squares) reduces to its rows' rms.
// cudaErrorInvalidValue for rows < 0, cols <= 0, cols > 2^31 - 1 or x_ld < cols; rows == 0 launches
// nothing. Launched with programmatic dependent launch (reads x after the wait).
cudaError_t LaunchSumSquaresPartials(int64_t rows, int64_t cols, const void* x, int64_t x_ld, float* out,
                                     cudaStream_t stream);

}  // namespace lorc::kernels
