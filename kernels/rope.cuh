// Rotary embedding (Hugging Face rotate_half: pairs i and i + head_dim/2), optionally fused with
// the paged KV write (kernels/rope.cu). Framework-free: plain CUDA runtime types.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/elem_type.cuh"
#include "kernels/kv_quant.h"

namespace lorc::kernels {

// One launch rotates q (and k when given) in place for every token and, when slot_mapping is
// given, writes the rotated k row and the v row into the cache at slot_mapping[t] (-1: skip).
// The angle is the fp32 product float(position) * inv_freq[i] (as transformers computes it);
// RoPE scaling (linear, llama3) lives in inv_freq. Rotation in fp32, each value rounded once, so
// Rope-then-WriteKv and the fused form store identical bits.
// Quantized caches (kv_quant != kNone, `--kv-cache-dtype fp8|int8|int4`, the layout of
// kernels/kv_quant.h): the rotated fp32 key row and the value row are quantized per KV head
// (group) in the same launch, bit for bit the CPU reference's KvqQuantizeToken of the same fp32
// rows (kernels/kv_quant.cuh). rotate_k false (LoRC latents): k [num_tokens, k_width] is written
// as given, not rotated; with num_heads 0 and no positions the launch is a plain (quantizing) KV
// write.
struct RopeArgs {
  ElemType dtype = ElemType::kF32;  // of q, k, v and the cache
  int64_t num_tokens = 0;
  int32_t head_dim = 0;                // even
  const int32_t* positions = nullptr;  // [num_tokens], device
  const float* inv_freq = nullptr;     // [head_dim / 2], device, fp32
  void* q = nullptr;                   // [num_tokens, num_heads * head_dim], row stride q_ld
  int64_t q_ld = 0;
  int32_t num_heads = 0;
  void* k = nullptr;                   // optional: [num_tokens, num_kv_heads * head_dim]
  int64_t k_ld = 0;
  int32_t num_kv_heads = 0;
  // The KV write (all null / 0 for plain RoPE):
  const int32_t* slot_mapping = nullptr;  // [num_tokens], device, flat slot or -1
  const void* v = nullptr;                // [num_tokens, v_width], row stride v_ld
  int64_t v_ld = 0;
  void* k_cache = nullptr;                // [slots, num_kv_heads * head_dim]
  void* v_cache = nullptr;                // [slots, v_width]
  int64_t v_width = 0;
  bool rotate_k = true;   // false: k holds latents [num_tokens, k_width], stored unrotated
  int64_t k_width = 0;    // the cache's K width; 0: num_kv_heads * head_dim (rotate_k true)
  KvQuant kv_quant = KvQuant::kNone;  // kNone: k_cache / v_cache hold `dtype` elements
  int32_t block_size = 0;             // quantized caches: tokens per block
};

// cudaErrorInvalidValue for an odd or non-positive head_dim (unless nothing is rotated), negative
// counts, a KV write without k, v and both caches, or a quantized write without block_size,
// with KV heads that do not divide the widths or rows beyond shared memory (12k values).
// num_tokens == 0 launches nothing.
cudaError_t LaunchRope(const RopeArgs& args, cudaStream_t stream);

}  // namespace lorc::kernels
