#include "kernels/copy_rows.cuh"

#include "kernels/pdl.cuh"
#include "kernels/vec.cuh"

namespace lorc::kernels {
namespace {

template <typename U>
__device__ __forceinline__ void CopyRow(const char* src, char* dst, int64_t bytes) {
  const U* s = reinterpret_cast<const U*>(src);
  U* d = reinterpret_cast<U*>(dst);
  for (int64_t i = threadIdx.x; i < bytes / static_cast<int64_t>(sizeof(U)); i += blockDim.x) d[i] = s[i];
}

// Block (i, which): row i of copy `which` (0: c0, 1: c1). Gather: dst row i <- src row idx[i];
// scatter: dst row idx[i] <- src row i, skipped when idx[i] < 0.
__global__ void CopyRowsKernel(const RowCopy c0, const RowCopy c1, int unit0, int unit1,
                               const int32_t* idx, bool scatter) {
  PdlTrigger();
  PdlWait();
  // Field by field: selecting a whole parameter struct by reference would copy it to the stack.
  const bool second = blockIdx.y != 0;
  const int64_t bytes = second ? c1.row_bytes : c0.row_bytes;
  const int unit = second ? unit1 : unit0;
  if (bytes == 0) return;
  const int64_t i = blockIdx.x, j = idx[i];
  if (scatter && j < 0) return;
  const char* src = static_cast<const char*>(second ? c1.src : c0.src) +
                    (scatter ? i : j) * (second ? c1.src_ld_bytes : c0.src_ld_bytes);
  char* dst = static_cast<char*>(second ? c1.dst : c0.dst) +
              (scatter ? j : i) * (second ? c1.dst_ld_bytes : c0.dst_ld_bytes);
  switch (unit) {
    case 16: CopyRow<uint4>(src, dst, bytes); break;
    case 8: CopyRow<uint2>(src, dst, bytes); break;
    case 4: CopyRow<uint32_t>(src, dst, bytes); break;
    case 2: CopyRow<uint16_t>(src, dst, bytes); break;
    default: CopyRow<uint8_t>(src, dst, bytes); break;
  }
}

// The widest access size that divides every address, stride and the row size.
int Unit(const RowCopy& c) {
  const uint64_t all = reinterpret_cast<uintptr_t>(c.src) | reinterpret_cast<uintptr_t>(c.dst) |
                       static_cast<uint64_t>(c.src_ld_bytes) | static_cast<uint64_t>(c.dst_ld_bytes) |
                       static_cast<uint64_t>(c.row_bytes);
  for (int u = 16; u > 1; u /= 2) {
    if (all % u == 0) return u;
  }
  return 1;
}

cudaError_t Launch(const RowCopy& c0, const RowCopy& c1, const int32_t* idx, int64_t n,
                   bool scatter, cudaStream_t stream) {
  if (n < 0 || c0.row_bytes < 0 || c1.row_bytes < 0) return cudaErrorInvalidValue;
  if (n == 0 || (c0.row_bytes == 0 && c1.row_bytes == 0)) return cudaSuccess;
  const int u0 = Unit(c0), u1 = Unit(c1);
  const int64_t most = c0.row_bytes / u0 > c1.row_bytes / u1 ? c0.row_bytes / u0 : c1.row_bytes / u1;
  const dim3 grid(static_cast<unsigned>(n), c1.row_bytes > 0 ? 2 : 1);
  return LaunchPdl(CopyRowsKernel, grid, BlockThreads(most, 256), 0, stream, nullptr, c0, c1, u0, u1, idx, scatter);
}

}  // namespace

__global__ void TakeDrawnTokensKernel(int32_t* ids, const int32_t* drawn, const int32_t* pairs, int32_t n,
                                      int32_t vocab) {
  for (int32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    const int32_t t = drawn[pairs[2 * i + 1]];
    ids[pairs[2 * i]] = t >= 0 && t < vocab ? t : 0;
  }
}

cudaError_t LaunchTakeDrawnTokens(int32_t* ids, const int32_t* drawn, const int32_t* pairs, int32_t n,
                                  int32_t vocab, cudaStream_t stream) {
  if (n < 0 || vocab <= 0) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  const int threads = 128;
  const int64_t want = (int64_t{n} + threads - 1) / threads;
  const int blocks = static_cast<int>(want < 64 ? want : 64);
  TakeDrawnTokensKernel<<<blocks, threads, 0, stream>>>(ids, drawn, pairs, n, vocab);
  return cudaGetLastError();
}

cudaError_t LaunchGatherRows(const RowCopy& copy, const int32_t* rows, int64_t n, cudaStream_t stream) {
  return Launch(copy, RowCopy{}, rows, n, /*scatter=*/false, stream);
}

cudaError_t LaunchScatterRows(const RowCopy& first, const RowCopy& second, const int32_t* slots,
                              int64_t n, cudaStream_t stream) {
  return Launch(first, second, slots, n, /*scatter=*/true, stream);
}

}  // namespace lorc::kernels
