// Internal to backend/: fp32 building blocks shared by the CPU backend's ops (cpu_backend.cc)
// and its LoRC latent attention (cpu_latent_attention.cc), so both paths rotate, normalise and
// read / write the KV cache (F32, BF16 or quantized: cpu_kv_cache.cc) with the same arithmetic.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "backend/backend.h"

namespace lorc::cpu_internal {

// Rotary embedding in place, rotate_half convention: for each row t of `x` (fp32, `rows` rows
// `ld` apart) and each of `heads` heads of `head_dim` values, pairs (i, i + head_dim/2) rotated by
// the fp32 angle positions[t] * inv_freq[i] (cos and sin evaluated in double, rounded to fp32,
// as transformers). `cos`, `sin`: scratch.
void RotateRows(float* x, int64_t rows, int64_t ld, int heads, int head_dim,
                const int32_t* positions, const float* inv_freq, std::vector<float>* cos,
                std::vector<float>* sin);

// Causal softmax over rows of `scores` [q_len, len] (row-major, ld len): query row i attends to
// keys [0, len - q_len + i]; later entries are set to 0.
void CausalSoftmax(float* scores, int q_len, int len);

// The KV cache storage of the CPU backend (kvstore/kv_spec.h layout). A cache is F32, BF16
// (round-to-nearest-even on write) or quantized (KvLayer::quant, kernels/kv_quant.h: quantized on
// write, dequantized on read). Unimplemented naming `op` for another element dtype;
// InvalidArgument for a quantized layer without KV heads or block_size, or whose widths the heads
// do not divide.
absl::Status CheckKvCache(const char* op, const KvLayer& cache);
// Writes one token's row (fp32, k_width or v_width values) to flat slot `slot` of K (v_side
// false) or V.
void StoreKvRow(const KvLayer& cache, bool v_side, int64_t slot, const float* row);
// Reads KV head `head` of the token at `slot` (head_width = width / num_kv_heads values, i.e.
// head_dim for full K/V or r for latents) as fp32 into out[head_width].
void LoadKvHead(const KvLayer& cache, bool v_side, int64_t slot, int64_t head, int64_t head_width,
                float* out);

// Copies KV head `head`'s entry (K: v_side false, V: true) from cache slot src to slot dst, in
// the cache's own format (a quantized cache: the head's codes and its scales).
void MoveKvHead(const KvLayer& cache, bool v_side, int64_t src, int64_t dst, int64_t head);

// KV head `head`'s region of cache slot `slot` (K: v_side false, V: true): KvHeadSlotBytes
// bytes, the head's elements or a quantized cache's codes. Where packed MiKV low entries live.
uint8_t* KvHeadSlot(const KvLayer& cache, bool v_side, int64_t slot, int64_t head);

// Token-level KV policies (cpu_kv_policy.cc; backend.h KvPolicyAttention).
// The keys / values of KV head `head` of one sequence (`len` tokens, paged by `table`; a kept
// key of position p at the sequence's cache slot policy->slot(layer, head, p), else p) that
// `policy` keeps (null: every position), in position order: kept[n] positions, k [n, k_width]
// and v [n, v_width] fp32 (cache slots dequantized as LoadKvHead; kLow entries decoded from the
// head's packed run, or, not packed yet, their full slot encoded and decoded: the same values). Returns n, or -1 when one of the step's q_len tokens (the last q_len positions) is not
// kept (the policy's invariant broken: callers fail with Internal).
int GatherKeptHead(const KvLayer& cache, kvpolicy::SequenceKvPolicy* policy, int layer,
                   const int32_t* table, int32_t block_size, int len, int q_len, int head, int64_t k_width,
                   int64_t v_width, std::vector<int32_t>* kept, std::vector<float>* k,
                   std::vector<float>* v);
// CORM's statistic from one query head's causal probabilities over the kept keys, probs
// [q_len, n] (query i at position len - q_len + i attends kept keys [0, t), t = n - q_len + i + 1):
// last_hit[kept[j]] = max(last_hit[kept[j]], that position) where probs[i][j] >= 1/t.
void RecordImportance(const float* probs, int q_len, int n, int len, const int32_t* kept,
                      int32_t* last_hit);
// Backend::CompactKvHeads on the CPU cache (checked by the caller: every layer with
// CheckKvCache, every move and run in range).
void CompactKvHeads(absl::Span<const KvLayer> layers, absl::Span<const KvHeadMove> moves,
                    absl::Span<const KvLowRun> low, int low_bits);

// Scratch reused across calls (sized on demand).
struct LatentScratch {
  std::vector<float> c_k, c_v, k, scores, cos, sin;
  std::vector<int32_t> positions;  // the kept keys' positions
};

// CpuBackend::LatentAttention over the sequences `seqs` of batch `b` (LatentAttentionParams).
absl::Status LatentAttention(const LatentAttentionParams& p, const AttentionBatch& b,
                             absl::Span<const int32_t> seqs, LatentScratch* scratch);

}  // namespace lorc::cpu_internal
