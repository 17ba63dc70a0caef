// Paged attention over the KV cache of kvstore/kv_spec.h (kernels/attention_decode.cu,
// kernels/attention_prefill.cu). Framework-free: plain CUDA runtime types. BF16 q, cache and out;
// fp32 scores, softmax (base 2, the scale folded into log2(e) * scale) and accumulation.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/kv_quant.h"

namespace lorc::kernels {

// What both paths read: the step's queries and outputs, one layer's cache and the batch arrays
// (AttentionBatch in backend/backend.h). Sequence s has query rows [query_start[s],
// query_start[s+1]); row i sits at position seq_lens[s] - q_len + i and attends to [0, position].
// Every pointer 16-byte aligned, every stride a multiple of 8 elements. A quantized cache
// (kv_quant fp8 / int8 / int4, kernels/kv_quant.h) is read as codes and dequantized in registers
// as K/V are loaded (bf16 for prefill's tensor-core tiles); its block bytes must be a multiple
// of 16.
struct PagedAttentionArgs {
  const void* q = nullptr;  // [num_tokens, num_heads * head_dim] bf16, row stride q_ld
  int64_t q_ld = 0;
  void* out = nullptr;      // [num_tokens, num_heads * head_dim] bf16, row stride out_ld
  int64_t out_ld = 0;
  const void* k_cache = nullptr;  // [slots, k_ld] bf16; KV head h at columns [h * head_dim, ...)
  const void* v_cache = nullptr;  // [slots, v_ld] bf16
  int64_t k_ld = 0;
  int64_t v_ld = 0;
  int32_t num_heads = 0;
  int32_t num_kv_heads = 0;
  int32_t head_dim = 0;  // 64 or 128
  float scale = 1.0f;
  const int32_t* query_start = nullptr;   // device, [num_seqs + 1]
  const int32_t* seq_lens = nullptr;      // device, [num_seqs]
  const int32_t* block_tables = nullptr;  // device, [num_seqs][max_blocks_per_seq]
  int32_t max_blocks_per_seq = 0;
  int32_t block_size = 0;
  // Quantized cache: k_cache / v_cache hold blocks of codes then fp16 scales (k_ld / v_ld unused),
  // head h of a token at head_dim channels, geometry k_q / v_q (MakeKvqSide).
  KvQuant kv_quant = KvQuant::kNone;
  KvqSide k_q, v_q;
};

// One piece of split-KV decode: keys [kv_start, kv_end) of sequence `seq` (all its KV heads).
// partial < 0: the item covers the whole sequence and writes its out row directly; else it
// writes fp32 (out, lse) into partial slot `partial`, merged later (merge item `merge`).
struct DecodeWorkItem {
  int32_t seq, kv_start, kv_end, partial, merge;
};
// A split sequence: its partial slots [first, first + num).
struct DecodeMergeItem {
  int32_t seq, first, num, unused;
};

// Largest num_heads * head_dim and num_heads a partial slot holds.
inline constexpr int kMaxPartialWidth = 16384;
inline constexpr int kMaxPartialHeads = 256;

// The decode schedule PlanAttention wrote (device memory at fixed addresses, so a captured
// launch replays with whatever the latest plan holds). The grid is sized by max_work/max_merge,
// never by the counts, which are read on the device.
struct DecodeSchedule {
  const int32_t* counts = nullptr;          // device: [0] work items, [1] merge items
  const DecodeWorkItem* work = nullptr;     // device, [max_work]
  const DecodeMergeItem* merge = nullptr;   // device, [max_merge]
  int32_t max_work = 0;
  int32_t max_merge = 0;
  float* partial_out = nullptr;  // device, [max_partials][num_heads * head_dim] fp32
  float* partial_lse = nullptr;  // device, [max_partials][num_heads] fp32 (log2 domain)
  int32_t num_sms = 1;           // grid sizing: CTAs stride over the work list
  // Grid sizing of the paged decode (the latent decode takes max_work): the most work items
  // this launch can meet (a captured launch: any plan of its batch size; eager: the plan's
  // count), or 0 for max_work. Only speed depends on it: CTAs stride over the work list and
  // those without an item leave at once.
  int32_t grid_work = 0;
  // device, [max_merge][kMaxPartialHeads], all zero between launches: the paged decode's count of
  // finished chunks per (merge item, KV head); the CTA that finishes the last one merges them
  // and sets the count back to 0. Unused by the latent decode.
  int32_t* merge_counters = nullptr;
  // Host: the decode sequences this launch serves (a captured launch: its batch size). The bf16
  // decode's tensor-core kernel keeps 3 ring stages from kDecodeMmaMinSeqs of them, 2 below
  // (LaunchDecodeAttention).
  int32_t num_decodes = 0;
  // Host: the tensor-core decode issues its first work item's first ring stages of K/V (every
  // key but the item's last) before its PDL wait, so that they load while the kernel before it
  // (the QKV projection writing the new token's row) finishes (pdl.cuh, "Early K/V"). Outputs
  // are the same bits either way. On below kDecodeEarlyKvMaxSeqs decodes (the backend's default,
  // backend/cuda_attention.cc; LORC_DECODE_EARLY_KV=0 / =1 force it off / on).
  bool early_kv = false;
};

// From this many decode sequences a launch over a bf16 cache gives the tensor-core decode kernel
// (attention_decode.cu DecodeMmaKernel) 3 cp.async ring stages a warp (100 KiB of shared memory a
// CTA at head_dim 128), below it 2 (68 KiB). Measured on an H200 (8B shape, docs/PERFORMANCE.md
// "Tensor-core decode attention" and "Two ring stages, by batch"): with 3 stages everywhere batch 1
// and 8 lost up to 1.5 ms a step (the kernel's shared memory keeps the GEMVs around it, overlapped
// by PDL, off its SMs); 2 stages are as fast as or faster than the CUDA-core kernel at every small
// batch, and batch 64 x 4k wants the third stage (13.9 against 14.9 ms). 32 lies between the
// measured sides. LORC_DECODE_MMA_STAGES=2 / =3 force a ring depth; LORC_DECODE_MMA=0 the
// CUDA-core kernel (A/B measurements; GPUs before sm_80 always take it).
inline constexpr int kDecodeMmaMinSeqs = 32;

// Below this many decode sequences the CUDA backend turns DecodeSchedule::early_kv on (the
// 2-stage ring's batches; a captured graph decides for its batch size). Measured on an H100 (8B
// shape, three interleaved rounds, docs/PERFORMANCE.md "Sampled rows sorted one by one, and the
// decode attention's early K/V at small batches"): on was faster in every round at 1 x 128,
// 1 x 4,096, 4 x 4,096 and 16 x 4,096 (0.01-0.18 ms a step), within the spread at 4-16 x 128 and
// 8 x 4,096, and 0.15-0.33 ms slower at batch 64 (3 stages). Batches 17-31 were not measured.
inline constexpr int kDecodeEarlyKvMaxSeqs = kDecodeMmaMinSeqs;

// Decode (q_len 1) for every item of the schedule: one kernel, a CTA per work item and KV head
// (all query heads of the group at once, so each K/V row is read once): over a bf16 cache with
// sm_80+ the tensor-core kernel (4 warps, S and P V on mma.sync, 2 or 3 ring stages by
// kDecodeMmaMinSeqs), else the CUDA-core one (quantized caches, LORC_DECODE_MMA=0); of a split
// sequence, the CTA that finishes its last chunk (for that KV head) merges the chunks (one
// launch, no merge kernel; schedule.merge_counters must be zero before the launch and are zero
// after it). cudaErrorInvalidValue for head_dim other than 64/128, a group (num_heads /
// num_kv_heads) above 8 or not whole, unaligned pointers or strides.
cudaError_t LaunchDecodeAttention(const PagedAttentionArgs& args, const DecodeSchedule& schedule,
                                  cudaStream_t stream);

// Rows (query token x query head of one KV head) per prefill CTA; a CTA covers rows / group
// query tokens of one sequence. A bf16 cache runs the flash kernel (mma.sync, 8 warps of 16
// rows); a quantized cache the 64-row WMMA kernel that dequantizes tiles as it stages them.
inline constexpr int kPrefillRowsBf16 = 128;
inline constexpr int kPrefillRowsQuantized = 64;
constexpr int PrefillTileRows(KvQuant q) { return q == KvQuant::kNone ? kPrefillRowsBf16 : kPrefillRowsQuantized; }

// Prefill (q_len > 1): the sequences prefill_seqs[0 .. num_prefills) (device), tiles of
// PrefillTileRows(kv_quant) / group query tokens; num_tiles (host) = sum over them of
// ceil(q_len / that). Split-KV (bf16 cache only; num_splits > 1): each tile's key range
// [0, its last row's position] is cut into num_splits pieces of whole 64-key tiles, one CTA each,
// writing fp32 partials (the normalized output of its rows and their log2-domain log-sum-exp,
// -inf for a row without keys in the piece) that a merge kernel combines; the grid is then
// num_tiles x num_kv_heads x num_splits CTAs and needs max_split_ctas >= that, partial_out
// holding max_split_ctas x kPrefillRowsBf16 x head_dim floats and partial_lse max_split_ctas x
// kPrefillRowsBf16. cudaErrorInvalidValue as for decode, a group that does not divide the rows,
// num_splits < 1, or a split schedule without room or over a quantized cache.
struct PrefillSchedule {
  const int32_t* prefill_seqs = nullptr;  // device
  const int32_t* num_prefills = nullptr;  // device, one value
  int32_t num_tiles = 0;                  // host
  int32_t num_splits = 1;                 // host
  float* partial_out = nullptr;           // device, split-KV only
  float* partial_lse = nullptr;           // device, split-KV only
  int32_t max_split_ctas = 0;
};
cudaError_t LaunchPrefillAttention(const PagedAttentionArgs& args, const PrefillSchedule& schedule,
                                   cudaStream_t stream);

}  // namespace lorc::kernels
