#include "kernels/elementwise.cuh"

#include "kernels/pdl.cuh"
#include "kernels/vec.cuh"

namespace lorc::kernels {
namespace {

// Both kernels walk the flattened (row, N-element unit) space with a grid-stride loop, so a
// single wide row (decode) still spreads over many blocks.
template <typename T, int N>
__device__ __forceinline__ void AddUnits(T* acc, int64_t acc_ld, const T* x, int64_t x_ld,
                                         int64_t rows, int64_t cols) {
  const int64_t per_row = cols / N, total = rows * per_row;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / per_row, c = (i - r * per_row) * N;
    float a[N], b[N];
    LoadF32<T, N>(acc + r * acc_ld + c, a);
    LoadF32<T, N>(x + r * x_ld + c, b);
#pragma unroll
    for (int k = 0; k < N; ++k) a[k] += b[k];
    StoreF32<T, N>(acc + r * acc_ld + c, a);
  }
}

template <typename T>
__global__ void AddInPlaceKernel(T* acc, int64_t acc_ld, const T* x, int64_t x_ld, int64_t rows,
                                 int64_t cols, bool vec) {
  PdlTrigger();
  PdlWait();
  if (vec) {
    AddUnits<T, kVec<T>>(acc, acc_ld, x, x_ld, rows, cols);
  } else {
    AddUnits<T, 1>(acc, acc_ld, x, x_ld, rows, cols);
  }
}

template <typename T, int N>
__device__ __forceinline__ void SiluMulUnits(const T* gu, int64_t gu_ld, T* out, int64_t out_ld,
                                             int64_t rows, int64_t inter) {
  const int64_t per_row = inter / N, total = rows * per_row;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / per_row, c = (i - r * per_row) * N;
    float g[N], u[N];
    LoadF32<T, N>(gu + r * gu_ld + c, g);
    LoadF32<T, N>(gu + r * gu_ld + inter + c, u);
#pragma unroll
    for (int k = 0; k < N; ++k) g[k] = g[k] / (1.0f + expf(-g[k])) * u[k];
    StoreF32<T, N>(out + r * out_ld + c, g);
  }
}

template <typename T>
__global__ void SiluMulKernel(const T* gu, int64_t gu_ld, T* out, int64_t out_ld, int64_t rows,
                              int64_t inter, bool vec) {
  PdlTrigger();
  PdlWait();
  if (vec) {
    SiluMulUnits<T, kVec<T>>(gu, gu_ld, out, out_ld, rows, inter);
  } else {
    SiluMulUnits<T, 1>(gu, gu_ld, out, out_ld, rows, inter);
  }
}

template <typename T>
__global__ void ScaleColumnsKernel(T* w, int64_t ld, const T* g, int64_t rows, int64_t cols) {
  PdlTrigger();
  PdlWait();
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < rows * cols;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / cols, c = i - r * cols;
    w[r * ld + c] = FromF32<T>(ToF32(w[r * ld + c]) * ToF32(g[c]));
  }
}

constexpr unsigned kThreads = 256;

// Enough blocks for one unit per thread, capped (the loops are grid-stride).
dim3 Blocks(int64_t units) {
  const int64_t b = (units + kThreads - 1) / kThreads;
  return dim3(static_cast<unsigned>(b < 1 ? 1 : (b > 8192 ? 8192 : b)));
}

}  // namespace

cudaError_t LaunchAddInPlace(ElemType dtype, void* acc, int64_t acc_ld, const void* x, int64_t x_ld,
                             int64_t rows, int64_t cols, cudaStream_t stream) {
  if (rows < 0 || cols < 0) return cudaErrorInvalidValue;
  if (rows == 0 || cols == 0) return cudaSuccess;
  const int n = static_cast<int>(16 / ElemSize(dtype));
  const bool vec = cols % n == 0 && acc_ld % n == 0 && x_ld % n == 0 && Aligned16(acc) && Aligned16(x);
  const dim3 grid = Blocks(rows * (vec ? cols / n : cols));
  if (dtype == ElemType::kF32) {
    return LaunchPdl(AddInPlaceKernel<float>, grid, kThreads, 0, stream, nullptr, static_cast<float*>(acc), acc_ld,
                     static_cast<const float*>(x), x_ld, rows, cols, vec);
  }
  return LaunchPdl(AddInPlaceKernel<__nv_bfloat16>, grid, kThreads, 0, stream, nullptr,
                   static_cast<__nv_bfloat16*>(acc), acc_ld, static_cast<const __nv_bfloat16*>(x), x_ld, rows, cols,
                   vec);
}

cudaError_t LaunchSiluMul(ElemType dtype, const void* gate_up, int64_t gate_up_ld, void* out,
                          int64_t out_ld, int64_t rows, int64_t inter, cudaStream_t stream) {
  if (rows < 0 || inter < 0) return cudaErrorInvalidValue;
  if (rows == 0 || inter == 0) return cudaSuccess;
  const int n = static_cast<int>(16 / ElemSize(dtype));
  const bool vec = inter % n == 0 && gate_up_ld % n == 0 && out_ld % n == 0 && Aligned16(gate_up) &&
                   Aligned16(out);
  const dim3 grid = Blocks(rows * (vec ? inter / n : inter));
  if (dtype == ElemType::kF32) {
    return LaunchPdl(SiluMulKernel<float>, grid, kThreads, 0, stream, nullptr, static_cast<const float*>(gate_up),
                     gate_up_ld, static_cast<float*>(out), out_ld, rows, inter, vec);
  }
  return LaunchPdl(SiluMulKernel<__nv_bfloat16>, grid, kThreads, 0, stream, nullptr,
                   static_cast<const __nv_bfloat16*>(gate_up), gate_up_ld, static_cast<__nv_bfloat16*>(out), out_ld,
                   rows, inter, vec);
}

cudaError_t LaunchScaleColumns(ElemType dtype, void* w, int64_t ld, const void* g, int64_t rows, int64_t cols,
                               cudaStream_t stream) {
  if (rows < 0 || cols < 0 || ld < cols) return cudaErrorInvalidValue;
  if (rows == 0 || cols == 0) return cudaSuccess;
  const dim3 blocks = Blocks(rows * cols);
  return dtype == ElemType::kF32
             ? LaunchPdl(ScaleColumnsKernel<float>, blocks, dim3(kThreads), 0, stream, nullptr, static_cast<float*>(w), ld,
                         static_cast<const float*>(g), rows, cols)
             : LaunchPdl(ScaleColumnsKernel<__nv_bfloat16>, blocks, dim3(kThreads), 0, stream, nullptr,
                         static_cast<__nv_bfloat16*>(w), ld, static_cast<const __nv_bfloat16*>(g), rows, cols);
}

}  // namespace lorc::kernels
