// Element-wise ops over row-major 2-D views (kernels/elementwise.cu): the residual add and the
// SwiGLU activation. Framework-free: plain CUDA runtime types.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/elem_type.cuh"

namespace lorc::kernels {

// acc[r, c] += x[r, c] for r < rows, c < cols (strides in elements), in fp32, rounded once.
// rows == 0 or cols == 0 launches nothing; negative sizes give cudaErrorInvalidValue.
cudaError_t LaunchAddInPlace(ElemType dtype, void* acc, int64_t acc_ld, const void* x, int64_t x_ld,
                             int64_t rows, int64_t cols, cudaStream_t stream);

// out[r, j] = silu(gate_up[r, j]) * gate_up[r, inter + j] for j < inter (gate_up has 2 * inter
// columns), silu(g) = g / (1 + exp(-g)) in fp32, rounded once. Sizes as LaunchAddInPlace.
cudaError_t LaunchSiluMul(ElemType dtype, const void* gate_up, int64_t gate_up_ld, void* out,
                          int64_t out_ld, int64_t rows, int64_t inter, cudaStream_t stream);

// w[r, c] = w[r, c] * g[c] for r < rows, c < cols (w's pitch ld elements; g [cols], of w's dtype),
// in fp32, rounded once: an RMSNorm weight folded into the projection after it (W diag(g)).
// Sizes as LaunchAddInPlace.
cudaError_t LaunchScaleColumns(ElemType dtype, void* w, int64_t ld, const void* g, int64_t rows, int64_t cols,
                               cudaStream_t stream);

}  // namespace lorc::kernels
