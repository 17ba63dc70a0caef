#include "kernels/rope.cuh"

#include <algorithm>

#include "kernels/kv_quant.cuh"
#include "kernels/pdl.cuh"
#include "kernels/vec.cuh"

namespace lorc::kernels {
namespace {

// One token: each thread takes N consecutive pairs (i, i + half) of one head of q or k. kq: the
// token's fp32 [k_width + v_width] row in shared memory, filled instead of the cache when the
// cache is quantized (null otherwise).
template <typename T, int N>
__device__ __forceinline__ void RopeToken(const RopeArgs& a, int64_t t, int64_t slot, const float* cos_sin,
                                          float* kq) {
  const int hd = a.head_dim, half = hd / 2, per_head = N > 0 && half > 0 ? half / N : 0;
  const bool rot_k = a.k != nullptr && a.rotate_k;
  const int heads = a.num_heads + (rot_k ? a.num_kv_heads : 0);
  const int64_t k_width = a.k_width > 0 ? a.k_width : static_cast<int64_t>(a.num_kv_heads) * hd;
  // The rows copied as given (v; k when not rotated; bf16 cache, 16-byte units): this thread's
  // first unit of each is loaded before the rotation, so both wait on one memory round trip.
  constexpr bool kRaw = N * sizeof(T) == 16;
  const bool preload = kRaw && kq == nullptr && slot >= 0;
  const int64_t c_first = threadIdx.x * static_cast<int64_t>(N);
  uint4 pre[2] = {};
  if (preload) {
    if (!rot_k && c_first < k_width) pre[0] = *reinterpret_cast<const uint4*>(static_cast<const T*>(a.k) + t * a.k_ld + c_first);
    if (c_first < a.v_width) pre[1] = *reinterpret_cast<const uint4*>(static_cast<const T*>(a.v) + t * a.v_ld + c_first);
  }
  for (int w = threadIdx.x; w < heads * per_head; w += blockDim.x) {
    const int h = w / per_head, i = (w - h * per_head) * N;
    const bool is_k = h >= a.num_heads;
    const int kh = h - a.num_heads;
    T* p = is_k ? static_cast<T*>(a.k) + t * a.k_ld + kh * hd
                : static_cast<T*>(a.q) + t * a.q_ld + h * hd;
    float x1[N], x2[N], y1[N], y2[N];
    LoadF32<T, N>(p + i, x1);
    LoadF32<T, N>(p + i + half, x2);
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const float c = cos_sin[i + j], s = cos_sin[half + i + j];
      // Explicit rounding steps: the same bits whichever kernel body this is inlined into.
      y1[j] = __fsub_rn(__fmul_rn(x1[j], c), __fmul_rn(x2[j], s));
      y2[j] = __fadd_rn(__fmul_rn(x2[j], c), __fmul_rn(x1[j], s));
    }
    StoreF32<T, N>(p + i, y1);
    StoreF32<T, N>(p + i + half, y2);
    if (is_k && slot >= 0) {
      if (kq != nullptr) {  // quantized from the fp32 rotation, not from its rounding to T
#pragma unroll
        for (int j = 0; j < N; ++j) {
          kq[kh * hd + i + j] = y1[j];
          kq[kh * hd + i + half + j] = y2[j];
        }
      } else {
        T* dst = static_cast<T*>(a.k_cache) + slot * k_width + kh * hd;
        StoreF32<T, N>(dst + i, y1);
        StoreF32<T, N>(dst + i + half, y2);
      }
    }
  }
  if (slot < 0) return;
  // The rows written as given: v, and k when it is not rotated.
  for (int side = rot_k ? 1 : 0; side < 2; ++side) {
    const T* src = side == 0 ? static_cast<const T*>(a.k) + t * a.k_ld : static_cast<const T*>(a.v) + t * a.v_ld;
    const int64_t width = side == 0 ? k_width : a.v_width;
    for (int64_t c = threadIdx.x * static_cast<int64_t>(N); c < width; c += static_cast<int64_t>(blockDim.x) * N) {
      if (kq != nullptr) {
        float x[N];
        LoadF32<T, N>(src + c, x);
#pragma unroll
        for (int j = 0; j < N; ++j) kq[(side == 0 ? 0 : k_width) + c + j] = x[j];
      } else {
        T* dst = static_cast<T*>(side == 0 ? a.k_cache : a.v_cache) + slot * width;
        if (preload && c == c_first) {
          *reinterpret_cast<uint4*>(dst + c) = pre[side];
        } else {
          CopyN<T, N>(dst + c, src + c);
        }
      }
    }
  }
}

// One block per token; cos and sin of the token's angles are computed once into shared memory
// ([half] cos, then [half] sin) and shared by all its heads; a quantized cache's fp32 rows follow
// ([k_width + v_width]), quantized per KV head after a barrier.
template <typename T>
__global__ void RopeKernel(const RopeArgs a, bool vec) {
  extern __shared__ float cos_sin[];
  const int64_t t = blockIdx.x;
  const int half = a.head_dim / 2;
  const bool quant = a.kv_quant != KvQuant::kNone;
  PdlTrigger();
  // Before the PDL wait: positions, inv_freq and slot_mapping are host uploads or constants (never
  // written by the kernel before this one); q, k, v and the caches are read and written after it.
  if (a.positions != nullptr) {
    const float pos = static_cast<float>(a.positions[t]);
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
      float s, c;
      sincosf(__fmul_rn(pos, a.inv_freq[i]), &s, &c);
      cos_sin[i] = c;
      cos_sin[half + i] = s;
    }
    __syncthreads();
  }
  const int64_t slot = a.slot_mapping != nullptr ? a.slot_mapping[t] : -1;
  PdlWait();
  float* kq = quant ? cos_sin + 2 * half : nullptr;
  if (vec) {
    RopeToken<T, kVec<T>>(a, t, slot, cos_sin, kq);
  } else {
    RopeToken<T, 1>(a, t, slot, cos_sin, kq);
  }
  if (!quant || slot < 0) return;  // uniform over the block
  __syncthreads();
  const int64_t k_width = a.k_width > 0 ? a.k_width : static_cast<int64_t>(a.num_kv_heads) * a.head_dim;
  const int kw = static_cast<int>(k_width / a.num_kv_heads), vw = static_cast<int>(a.v_width / a.num_kv_heads);
  const KvQuant q = a.kv_quant;
  KvqQuantizeRow(q, kq, a.num_kv_heads, kw,
                 KvqTokenCodes(a.k_cache, q, a.block_size, a.num_kv_heads, kw, slot),
                 KvqTokenScales(a.k_cache, q, a.block_size, a.num_kv_heads, kw, slot));
  KvqQuantizeRow(q, kq + k_width, a.num_kv_heads, vw,
                 KvqTokenCodes(a.v_cache, q, a.block_size, a.num_kv_heads, vw, slot),
                 KvqTokenScales(a.v_cache, q, a.block_size, a.num_kv_heads, vw, slot));
}

// Most fp32 values a quantized write stages per token (k_width + v_width), in 48 KiB of shared memory.
constexpr int64_t kMaxQuantRow = 12 * 1024 - 512;

}  // namespace

cudaError_t LaunchRope(const RopeArgs& a, cudaStream_t stream) {
  const bool rot_k = a.k != nullptr && a.rotate_k;
  const bool rotates = a.num_heads > 0 || rot_k;
  if ((rotates && (a.head_dim <= 0 || a.head_dim % 2 != 0 || a.positions == nullptr)) || a.head_dim < 0 ||
      a.num_tokens < 0 || a.num_heads < 0 || a.num_kv_heads < 0 || a.v_width < 0 || a.k_width < 0) {
    return cudaErrorInvalidValue;
  }
  const bool write = a.slot_mapping != nullptr;
  if (write && (a.k == nullptr || a.v == nullptr || a.k_cache == nullptr || a.v_cache == nullptr)) {
    return cudaErrorInvalidValue;
  }
  const int64_t k_width = a.k_width > 0 ? a.k_width : static_cast<int64_t>(a.num_kv_heads) * a.head_dim;
  if (a.k != nullptr && !a.rotate_k && a.k_width <= 0) return cudaErrorInvalidValue;
  const bool quant = a.kv_quant != KvQuant::kNone;
  if (quant && write &&
      (a.block_size <= 0 || a.num_kv_heads <= 0 || k_width % a.num_kv_heads != 0 ||
       a.v_width % a.num_kv_heads != 0 || k_width + a.v_width > kMaxQuantRow)) {
    return cudaErrorInvalidValue;
  }
  if (a.num_tokens == 0) return cudaSuccess;
  const int n = static_cast<int>(16 / ElemSize(a.dtype));
  bool vec = (a.head_dim / 2) % n == 0 && (a.num_heads == 0 || (a.q_ld % n == 0 && Aligned16(a.q)));
  if (a.k != nullptr) vec = vec && a.k_ld % n == 0 && Aligned16(a.k) && k_width % n == 0;
  if (write) {
    vec = vec && a.v_ld % n == 0 && a.v_width % n == 0 && Aligned16(a.v) && Aligned16(a.k_cache) &&
          Aligned16(a.v_cache);
  }
  const int heads = a.num_heads + (rot_k ? a.num_kv_heads : 0);
  int64_t units = static_cast<int64_t>(heads) * (a.head_dim / 2) / (vec ? n : 1);
  if (write) units = std::max(units, (k_width + a.v_width) / (vec ? n : 1));
  // A quantized write takes a warp per KV head (group): at least 4 warps.
  // Up to 512 threads: a decode token of 32 + 8 heads x 128 (320 units) takes one pass, not two.
  const unsigned threads = std::max(BlockThreads(units, 512), quant && write ? 128u : 32u);
  const size_t smem = sizeof(float) * (a.head_dim + (quant && write ? k_width + a.v_width : 0));
  const dim3 grid(static_cast<unsigned>(a.num_tokens));
  return a.dtype == ElemType::kF32 ? LaunchPdl(RopeKernel<float>, grid, threads, smem, stream, nullptr, a, vec)
                                   : LaunchPdl(RopeKernel<__nv_bfloat16>, grid, threads, smem, stream, nullptr, a, vec);
}

}  // namespace lorc::kernels
