// Row gathers and scatters by index, dtype-free byte copies (kernels/copy_rows.cu): the
// embedding lookup, GatherRows and the paged KV write. Framework-free: plain CUDA runtime types.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace lorc::kernels {

// `row_bytes` bytes per row; row r of src starts at src + r * src_ld_bytes (likewise dst).
// Copies use the widest access (16, 8, 4, 2 or 1 bytes) that every pointer, stride and the row
// size allow.
struct RowCopy {
  const void* src = nullptr;
  int64_t src_ld_bytes = 0;
  void* dst = nullptr;
  int64_t dst_ld_bytes = 0;
  int64_t row_bytes = 0;  // 0: nothing to copy
};

// dst row i = src row rows[i], for i < n (indices trusted: validated before the step).
cudaError_t LaunchGatherRows(const RowCopy& copy, const int32_t* rows, int64_t n, cudaStream_t stream);

// dst row slots[i] = src row i, for i < n and both copies (e.g. K and V into one layer's cache;
// `second.row_bytes` 0 for one copy); a slot of -1 skips that row (padding rows of a graph).
cudaError_t LaunchScatterRows(const RowCopy& first, const RowCopy& second, const int32_t* slots,
                              int64_t n, cudaStream_t stream);

// ids[pairs[2 i]] = drawn[pairs[2 i + 1]] for i < n, an id outside [0, vocab) written as 0
// (Backend::TakeDrawnTokens: a step's input ids from the previous step's draw, still on the
// device). Pairs trusted (the runner builds them). An ordinary launch (no programmatic wait).
cudaError_t LaunchTakeDrawnTokens(int32_t* ids, const int32_t* drawn, const int32_t* pairs, int32_t n,
                                  int32_t vocab, cudaStream_t stream);

}  // namespace lorc::kernels
