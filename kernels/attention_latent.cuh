// Attention over LoRC low-rank latents (compress/FORMAT.md; backend.h LatentAttentionParams),
// fused: keys are reconstructed from the cached latents on the tensor cores, rotated (RoPE) at
// their positions in registers and scored; probabilities multiply the value latents, so the
// output is r_v wide per query head (the output projection holds B_V). kernels/attention_latent.cu.
// Framework-free: plain CUDA runtime types. BF16 q, k_up, cache and out; fp32 accumulation,
// softmax (base 2) and RoPE angles (float(position) * inv_freq, as kernels/rope.cu).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/attention_paged.cuh"

namespace lorc::kernels {

// One layer's latent attention. Sequence s has query rows [query_start[s], query_start[s+1]);
// row i sits at position seq_lens[s] - q_len + i and attends to [0, position]. The cache holds per
// token (slot) and KV head g the unrotated key latent at columns [g*k_rank, (g+1)*k_rank) of
// k_cache and the value latent at [g*v_rank, (g+1)*v_rank) of v_cache.
// Every pointer 16-byte aligned, every stride a multiple of 8 elements. A quantized cache
// (kv_quant fp8 / int8 / int4, kernels/kv_quant.h: a KV head's latent is one scale group, int4:
// groups of 32 of it) is read as codes and dequantized to bf16 as the tiles are staged.
struct LatentAttentionArgs {
  const void* q = nullptr;     // [num_tokens, num_heads * head_dim] bf16, RoPE applied
  int64_t q_ld = 0;
  void* out = nullptr;         // [num_tokens, num_heads * v_rank] bf16
  int64_t out_ld = 0;
  const void* k_up = nullptr;  // [num_kv_heads * head_dim, k_rank] bf16 (B_K per KV head)
  int64_t k_up_ld = 0;
  const void* k_cache = nullptr;  // [slots, k_ld] bf16
  const void* v_cache = nullptr;  // [slots, v_ld] bf16
  int64_t k_ld = 0;
  int64_t v_ld = 0;
  int32_t num_heads = 0;
  int32_t num_kv_heads = 0;
  int32_t head_dim = 0;  // 128
  int32_t k_rank = 0;    // 8..128, a multiple of 8
  int32_t v_rank = 0;    // 8..128, a multiple of 8
  float scale = 1.0f;
  const float* inv_freq = nullptr;  // [head_dim / 2], device, fp32
  const int32_t* query_start = nullptr;   // device, [num_seqs + 1]
  const int32_t* seq_lens = nullptr;      // device, [num_seqs]
  const int32_t* block_tables = nullptr;  // device, [num_seqs][max_blocks_per_seq]
  int32_t max_blocks_per_seq = 0;
  int32_t block_size = 0;
  // Quantized cache: k_cache / v_cache hold blocks of codes then fp16 scales (k_ld / v_ld
  // unused), head widths k_rank / v_rank, geometry k_q / v_q (MakeKvqSide).
  KvQuant kv_quant = KvQuant::kNone;
  KvqSide k_q, v_q;
};

// (query token, query head) rows per CTA: a decode CTA covers the group of one KV head (at most
// 16 heads); a prefill CTA covers kLatentRows / group query tokens of one sequence.
inline constexpr int kLatentRows = 16;
// For the split-KV plan: decode CTAs resident per SM (8 warps, two CTAs for r_v <= 64) and the
// shortest key chunk worth a CTA (each of its 8 warps takes 16-token tiles).
inline constexpr int kLatentDecodeCtasPerSm = 2;
inline constexpr int kLatentMinChunk = 128;

// True when the kernels take this shape: head_dim 128, the group (num_heads / num_kv_heads) a
// divisor of 16, ranks in [8, 128] and multiples of 8, num_heads * v_rank within a partial slot.
bool LatentShapeSupported(int num_heads, int num_kv_heads, int head_dim, int k_rank, int v_rank);

// Decode rows (q_len 1) of the schedule PlanAttention wrote (split-KV work items, partials
// merged by a second kernel; partial slots hold num_heads * v_rank floats). The grid is sized by
// the schedule's maxima, so the launch can be captured in a CUDA graph. cudaErrorInvalidValue
// for an unsupported shape (LatentShapeSupported) or unaligned pointers / strides.
cudaError_t LaunchLatentDecode(const LatentAttentionArgs& args, const DecodeSchedule& schedule,
                               cudaStream_t stream);

// Prefill rows (q_len > 1): schedule.num_tiles = sum over the prefills of
// ceil(q_len / (kLatentRows / group)) (host). Causal over the cached context and the chunk.
cudaError_t LaunchLatentPrefill(const LatentAttentionArgs& args, const PrefillSchedule& schedule,
                                cudaStream_t stream);

}  // namespace lorc::kernels
