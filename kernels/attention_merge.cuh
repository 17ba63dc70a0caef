// The split-KV merge shared by the paged decode (attention_decode.cu) and the LoRC latent decode
// (attention_latent.cu): one warp combines the chunks of one (sequence, query head). Internal to
// the kernels' .cu files (device code only).
#pragma once

#include <cuda_bf16.h>

#include <cmath>
#include <cstdint>

namespace lorc::kernels {

// Most output columns a merge warp holds (4 per lane): head_dim / v_rank <= 128.
inline constexpr int kMergeMaxCols = 128;

// Called by all 32 lanes of a warp. Chunk i of `num` has its log2-domain log-sum-exp at
// lse[i * lse_stride] and its normalized fp32 output row at src + i * src_stride (`cols` <=
// kMergeMaxCols columns); dst[0 .. cols) = sum_i 2^(lse_i - mx) out_i / sum_i 2^(lse_i - mx)
// rounded to bf16. The lanes reduce the lse (max, then the sum of weights); lane l owns columns
// l, l + 32, ... and sums the chunks four at a time so their loads overlap.
__device__ __forceinline__ void MergeSplitChunks(const float* lse, int64_t lse_stride, const float* src,
                                                 int64_t src_stride, int num, int cols, __nv_bfloat16* dst) {
  constexpr int kPer = kMergeMaxCols / 32;
  const int lane = threadIdx.x % 32;
  float mx = -INFINITY;
  // __ldcg: the chunks were written by other CTAs (of this launch or an earlier one): read at L2.
  for (int i = lane; i < num; i += 32) mx = fmaxf(mx, __ldcg(lse + i * lse_stride));
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  float sum = 0.f;
  for (int i = lane; i < num; i += 32) sum += exp2f(__ldcg(lse + i * lse_stride) - mx);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  float o[kPer] = {0.f, 0.f, 0.f, 0.f};
  int i = 0;
  for (; i + 4 <= num; i += 4) {
    float x[4][kPer], wgt[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      wgt[j] = exp2f(__ldcg(lse + (i + j) * lse_stride) - mx);
      const float* p = src + (i + j) * src_stride;
#pragma unroll
      for (int e = 0; e < kPer; ++e) x[j][e] = lane + 32 * e < cols ? __ldcg(p + lane + 32 * e) : 0.f;
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
#pragma unroll
      for (int e = 0; e < kPer; ++e) o[e] = fmaf(wgt[j], x[j][e], o[e]);
    }
  }
  for (; i < num; ++i) {
    const float wgt = exp2f(__ldcg(lse + i * lse_stride) - mx);
    const float* p = src + i * src_stride;
#pragma unroll
    for (int e = 0; e < kPer; ++e) {
      if (lane + 32 * e < cols) o[e] = fmaf(wgt, __ldcg(p + lane + 32 * e), o[e]);
    }
  }
  const float inv = 1.0f / sum;
#pragma unroll
  for (int e = 0; e < kPer; ++e) {
    if (lane + 32 * e < cols) dst[lane + 32 * e] = __float2bfloat16_rn(o[e] * inv);
  }
}

}  // namespace lorc::kernels
