#include "kernels/rope.cuh"

#include "kernels/vec.cuh"

namespace lorc::kernels {
namespace {

// One token: each thread takes N consecutive pairs (i, i + half) of one head of q or k.
template <typename T, int N>
__device__ __forceinline__ void RopeToken(const RopeArgs& a, int64_t t, int64_t slot,
                                          const float* cos_sin) {
  const int hd = a.head_dim, half = hd / 2, per_head = half / N;
  const int heads = a.num_heads + (a.k != nullptr ? a.num_kv_heads : 0);
  const int64_t k_width = static_cast<int64_t>(a.num_kv_heads) * hd;
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
      T* dst = static_cast<T*>(a.k_cache) + slot * k_width + kh * hd;
      StoreF32<T, N>(dst + i, y1);
      StoreF32<T, N>(dst + i + half, y2);
    }
  }
  if (slot >= 0) {
    const T* v = static_cast<const T*>(a.v) + t * a.v_ld;
    T* dst = static_cast<T*>(a.v_cache) + slot * a.v_width;
    for (int64_t c = threadIdx.x * static_cast<int64_t>(N); c < a.v_width;
         c += static_cast<int64_t>(blockDim.x) * N) {
      CopyN<T, N>(dst + c, v + c);
    }
  }
}

// One block per token; cos and sin of the token's angles are computed once into shared memory
// ([half] cos, then [half] sin) and shared by all its heads.
template <typename T>
__global__ void RopeKernel(const RopeArgs a, bool vec) {
  extern __shared__ float cos_sin[];
  const int64_t t = blockIdx.x;
  const int half = a.head_dim / 2;
  const float pos = static_cast<float>(a.positions[t]);
  for (int i = threadIdx.x; i < half; i += blockDim.x) {
    float s, c;
    sincosf(__fmul_rn(pos, a.inv_freq[i]), &s, &c);
    cos_sin[i] = c;
    cos_sin[half + i] = s;
  }
  __syncthreads();
  const int64_t slot = a.slot_mapping != nullptr ? a.slot_mapping[t] : -1;
  if (vec) {
    RopeToken<T, kVec<T>>(a, t, slot, cos_sin);
  } else {
    RopeToken<T, 1>(a, t, slot, cos_sin);
  }
}

}  // namespace

cudaError_t LaunchRope(const RopeArgs& a, cudaStream_t stream) {
  if (a.head_dim <= 0 || a.head_dim % 2 != 0 || a.num_tokens < 0 || a.num_heads < 0 ||
      a.num_kv_heads < 0 || a.v_width < 0) {
    return cudaErrorInvalidValue;
  }
  const bool write = a.slot_mapping != nullptr;
  if (write && (a.k == nullptr || a.v == nullptr || a.k_cache == nullptr || a.v_cache == nullptr)) {
    return cudaErrorInvalidValue;
  }
  if (a.num_tokens == 0) return cudaSuccess;
  const int n = static_cast<int>(16 / ElemSize(a.dtype));
  bool vec = (a.head_dim / 2) % n == 0 && a.q_ld % n == 0 && Aligned16(a.q);
  if (a.k != nullptr) vec = vec && a.k_ld % n == 0 && Aligned16(a.k);
  if (write) {
    vec = vec && a.v_ld % n == 0 && a.v_width % n == 0 && Aligned16(a.v) && Aligned16(a.k_cache) &&
          Aligned16(a.v_cache);
  }
  const int heads = a.num_heads + (a.k != nullptr ? a.num_kv_heads : 0);
  const int64_t units = static_cast<int64_t>(heads) * (a.head_dim / 2) / (vec ? n : 1);
  const unsigned threads = BlockThreads(units, 256);
  const size_t smem = sizeof(float) * a.head_dim;
  const dim3 grid(static_cast<unsigned>(a.num_tokens));
  if (a.dtype == ElemType::kF32) {
    RopeKernel<float><<<grid, threads, smem, stream>>>(a, vec);
  } else {
    RopeKernel<__nv_bfloat16><<<grid, threads, smem, stream>>>(a, vec);
  }
  return cudaGetLastError();
}

}  // namespace lorc::kernels
