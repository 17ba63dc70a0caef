// Split-KV ("flash-decoding") paged decode attention; see attention_paged.cuh.
//
// Partial kernel: a CTA of 128 threads takes one (work item, KV head). Threads form token
// groups of D/8 lanes (one 16-byte bf16x8 slice of a K/V row per lane); each group streams its
// share of the item's keys four tokens at a time with its own online softmax for all query heads
// of the KV head (GQA: one read of each K/V row per group of heads), then the groups' states are
// combined through shared memory. Merge kernel: per split sequence, the lse-weighted sum of its
// partial outputs.
#include <cuda_bf16.h>

#include <cmath>

#include "kernels/attention_paged.cuh"
#include "kernels/elem_type.cuh"

namespace lorc::kernels {
namespace {

constexpr int kThreads = 128;
constexpr int kTokensPerStep = 4;  // tokens a group loads before one softmax update
constexpr float kLog2e = 1.4426950408889634f;

__device__ __forceinline__ void Bf16x8ToF32(const uint4& raw, float (&out)[8]) {
  const __nv_bfloat162* p = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(p[i]);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}

__device__ __forceinline__ uint4 F32ToBf16x8(const float (&in)[8]) {
  uint4 raw;
  __nv_bfloat162* p = reinterpret_cast<__nv_bfloat162*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) p[i] = __floats2bfloat162_rn(in[2 * i], in[2 * i + 1]);
  return raw;
}

// D: head_dim; G: the group size bucket (the real group a.num_heads / a.num_kv_heads <= G).
template <int D, int G>
__global__ void __launch_bounds__(kThreads)
    DecodePartialKernel(const PagedAttentionArgs a, const DecodeSchedule sch) {
  constexpr int kLanes = D / 8;             // lanes per token
  constexpr int kGroups = kThreads / kLanes;  // token groups per CTA
  __shared__ float s_m[kGroups][G];
  __shared__ float s_l[kGroups][G];
  __shared__ __align__(16) float s_acc[kGroups][G][D];

  const int kvh = blockIdx.y;
  const int group = a.num_heads / a.num_kv_heads;
  const int lane = threadIdx.x % kLanes, tg = threadIdx.x / kLanes;
  const int num_work = sch.counts[0];
  const float qscale = a.scale * kLog2e;
  const __nv_bfloat16* kc = static_cast<const __nv_bfloat16*>(a.k_cache) + kvh * D + lane * 8;
  const __nv_bfloat16* vc = static_cast<const __nv_bfloat16*>(a.v_cache) + kvh * D + lane * 8;

  for (int w = blockIdx.x; w < num_work; w += gridDim.x) {
    const DecodeWorkItem item = sch.work[w];
    const int row = a.query_start[item.seq];
    const int32_t* table = a.block_tables + static_cast<int64_t>(item.seq) * a.max_blocks_per_seq;

    float q[G][8];
#pragma unroll
    for (int h = 0; h < G; ++h) {
      if (h < group) {
        const uint4 raw = *reinterpret_cast<const uint4*>(
            static_cast<const __nv_bfloat16*>(a.q) + row * a.q_ld + (kvh * group + h) * D + lane * 8);
        Bf16x8ToF32(raw, q[h]);
#pragma unroll
        for (int e = 0; e < 8; ++e) q[h][e] *= qscale;
      } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) q[h][e] = 0.f;
      }
    }
    float m[G], l[G], acc[G][8];
#pragma unroll
    for (int h = 0; h < G; ++h) {
      m[h] = -INFINITY;
      l[h] = 0.f;
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[h][e] = 0.f;
    }

    // The loop bound is uniform over the warp (the shuffles need every lane): tokens of the
    // warp's groups past kv_end are masked.
    constexpr int kGroupsPerWarp = 32 / kLanes;
    const int warp_first = item.kv_start + (tg - tg % kGroupsPerWarp) * kTokensPerStep;
    for (int base = warp_first; base < item.kv_end; base += kGroups * kTokensPerStep) {
      const int t0 = base + (tg % kGroupsPerWarp) * kTokensPerStep;
      uint4 kr[kTokensPerStep], vr[kTokensPerStep];
#pragma unroll
      for (int j = 0; j < kTokensPerStep; ++j) {
        const int t = t0 + j;
        if (t < item.kv_end) {
          const int64_t slot =
              static_cast<int64_t>(table[t / a.block_size]) * a.block_size + t % a.block_size;
          kr[j] = __ldg(reinterpret_cast<const uint4*>(kc + slot * a.k_ld));
          vr[j] = __ldg(reinterpret_cast<const uint4*>(vc + slot * a.v_ld));
        } else {
          kr[j] = make_uint4(0, 0, 0, 0);
          vr[j] = kr[j];
        }
      }
      float s[kTokensPerStep][G];
#pragma unroll
      for (int j = 0; j < kTokensPerStep; ++j) {
        float k[8];
        Bf16x8ToF32(kr[j], k);
#pragma unroll
        for (int h = 0; h < G; ++h) {
          float d = 0.f;
#pragma unroll
          for (int e = 0; e < 8; ++e) d = fmaf(q[h][e], k[e], d);
#pragma unroll
          for (int o = kLanes / 2; o > 0; o >>= 1) d += __shfl_xor_sync(0xffffffffu, d, o);
          s[j][h] = (t0 + j < item.kv_end) ? d : -INFINITY;
        }
      }
      float v[kTokensPerStep][8];
#pragma unroll
      for (int j = 0; j < kTokensPerStep; ++j) Bf16x8ToF32(vr[j], v[j]);
#pragma unroll
      for (int h = 0; h < G; ++h) {
        float mx = s[0][h];
#pragma unroll
        for (int j = 1; j < kTokensPerStep; ++j) mx = fmaxf(mx, s[j][h]);
        const float m_new = fmaxf(m[h], mx);
        // -inf while this group has seen no key: then c and p are 0 and the state stays empty.
        const float m_ref = m_new == -INFINITY ? 0.f : m_new;
        const float c = exp2f(m[h] - m_ref);
        float p[kTokensPerStep], sum = 0.f;
#pragma unroll
        for (int j = 0; j < kTokensPerStep; ++j) {
          p[j] = exp2f(s[j][h] - m_ref);
          sum += p[j];
        }
        l[h] = l[h] * c + sum;
        m[h] = m_new;
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          float x = acc[h][e] * c;
#pragma unroll
          for (int j = 0; j < kTokensPerStep; ++j) x = fmaf(p[j], v[j][e], x);
          acc[h][e] = x;
        }
      }
    }

    // Combine the token groups' (m, l, acc).
#pragma unroll
    for (int h = 0; h < G; ++h) {
      if (lane == 0) {
        s_m[tg][h] = m[h];
        s_l[tg][h] = l[h];
      }
#pragma unroll
      for (int e = 0; e < 8; ++e) s_acc[tg][h][lane * 8 + e] = acc[h][e];
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < group * D; idx += kThreads) {
      const int h = idx / D, d = idx % D;
      float mx = -INFINITY;
#pragma unroll
      for (int g = 0; g < kGroups; ++g) mx = fmaxf(mx, s_m[g][h]);  // finite: group 0 has a key
      float sum = 0.f, o = 0.f;
#pragma unroll
      for (int g = 0; g < kGroups; ++g) {
        const float wgt = exp2f(s_m[g][h] - mx);  // 0 for a group without keys (m = -inf)
        sum = fmaf(s_l[g][h], wgt, sum);
        o = fmaf(s_acc[g][h][d], wgt, o);
      }
      const int head = kvh * group + h;
      if (item.partial < 0) {
        static_cast<__nv_bfloat16*>(a.out)[row * a.out_ld + head * D + d] = __float2bfloat16_rn(o / sum);
      } else {
        sch.partial_out[static_cast<int64_t>(item.partial) * a.num_heads * D + head * D + d] = o / sum;
        if (d == 0) sch.partial_lse[static_cast<int64_t>(item.partial) * a.num_heads + head] = mx + log2f(sum);
      }
    }
    __syncthreads();  // s_* are reused by the next item
  }
}

// One CTA per split sequence (striding); threads over (head, 8 dims).
__global__ void __launch_bounds__(kThreads) DecodeMergeKernel(const PagedAttentionArgs a, const DecodeSchedule sch) {
  const int num_merge = sch.counts[1];
  const int width = a.num_heads * a.head_dim;
  for (int mi = blockIdx.x; mi < num_merge; mi += gridDim.x) {
    const DecodeMergeItem it = sch.merge[mi];
    const int row = a.query_start[it.seq];
    for (int c = threadIdx.x * 8; c < width; c += kThreads * 8) {
      const int head = c / a.head_dim;
      float mx = -INFINITY;
      for (int i = 0; i < it.num; ++i) {
        mx = fmaxf(mx, sch.partial_lse[static_cast<int64_t>(it.first + i) * a.num_heads + head]);
      }
      float sum = 0.f, o[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
      for (int i = 0; i < it.num; ++i) {
        const int64_t p = it.first + i;
        const float wgt = exp2f(sch.partial_lse[p * a.num_heads + head] - mx);
        sum += wgt;
        const float4* src = reinterpret_cast<const float4*>(sch.partial_out + p * width + c);
        const float4 x0 = src[0], x1 = src[1];
        o[0] = fmaf(wgt, x0.x, o[0]);
        o[1] = fmaf(wgt, x0.y, o[1]);
        o[2] = fmaf(wgt, x0.z, o[2]);
        o[3] = fmaf(wgt, x0.w, o[3]);
        o[4] = fmaf(wgt, x1.x, o[4]);
        o[5] = fmaf(wgt, x1.y, o[5]);
        o[6] = fmaf(wgt, x1.z, o[6]);
        o[7] = fmaf(wgt, x1.w, o[7]);
      }
      const float inv = 1.0f / sum;
#pragma unroll
      for (int e = 0; e < 8; ++e) o[e] *= inv;
      *reinterpret_cast<uint4*>(static_cast<__nv_bfloat16*>(a.out) + row * a.out_ld + c) = F32ToBf16x8(o);
    }
  }
}

template <int D, int G>
void LaunchPartial(const PagedAttentionArgs& a, const DecodeSchedule& s, cudaStream_t stream) {
  // Enough CTAs for several waves of resident work; each strides over the work list.
  const int per_head = (8 * s.num_sms + a.num_kv_heads - 1) / a.num_kv_heads;
  const dim3 grid(static_cast<unsigned>(per_head < s.max_work ? per_head : s.max_work),
                  static_cast<unsigned>(a.num_kv_heads));
  DecodePartialKernel<D, G><<<grid, kThreads, 0, stream>>>(a, s);
}

template <int D>
void LaunchPartialForGroup(const PagedAttentionArgs& a, const DecodeSchedule& s, int group,
                           cudaStream_t stream) {
  if (group <= 1) {
    LaunchPartial<D, 1>(a, s, stream);
  } else if (group <= 2) {
    LaunchPartial<D, 2>(a, s, stream);
  } else if (group <= 4) {
    LaunchPartial<D, 4>(a, s, stream);
  } else {
    LaunchPartial<D, 8>(a, s, stream);
  }
}

}  // namespace

cudaError_t LaunchDecodeAttention(const PagedAttentionArgs& a, const DecodeSchedule& s,
                                  cudaStream_t stream) {
  if ((a.head_dim != 64 && a.head_dim != 128) || a.num_kv_heads <= 0 ||
      a.num_heads % a.num_kv_heads != 0 || a.num_heads / a.num_kv_heads > 8 ||
      a.num_heads * a.head_dim > kMaxPartialWidth || a.num_heads > kMaxPartialHeads ||
      a.block_size <= 0 || s.max_work <= 0 || s.max_merge <= 0 || s.num_sms <= 0) {
    return cudaErrorInvalidValue;
  }
  if (!Aligned16(a.q) || !Aligned16(a.out) || !Aligned16(a.k_cache) || !Aligned16(a.v_cache) ||
      a.q_ld % 8 != 0 || a.out_ld % 8 != 0 || a.k_ld % 8 != 0 || a.v_ld % 8 != 0) {
    return cudaErrorInvalidValue;
  }
  const int group = a.num_heads / a.num_kv_heads;
  if (a.head_dim == 64) {
    LaunchPartialForGroup<64>(a, s, group, stream);
  } else {
    LaunchPartialForGroup<128>(a, s, group, stream);
  }
  const int merge_ctas = 2 * s.num_sms < s.max_merge ? 2 * s.num_sms : s.max_merge;
  DecodeMergeKernel<<<merge_ctas, kThreads, 0, stream>>>(a, s);
  return cudaGetLastError();
}

}  // namespace lorc::kernels
