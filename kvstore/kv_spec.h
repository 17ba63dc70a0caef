// Shape and physical layout of the paged KV cache.
//
// Layout (the same on every backend; the CPU backend is the reference):
//   The cache holds `num_blocks` blocks of `block_size` token slots. A block id names the same
//   slots in every layer: one block table per sequence serves all layers.
//   For each layer l there are two arrays
//     K_l : [num_blocks][block_size][k_width[l]]   elements of `dtype`, row-major
//     V_l : [num_blocks][block_size][v_width[l]]
//   For an uncompressed model k_width = v_width = (KV heads on this rank) * head_dim, with head h
//   of a token at columns [h * head_dim, (h + 1) * head_dim). Widths may differ per layer and
//   between K and V (the low-rank compression stores per-layer latents of different ranks).
//   Where RoPE is applied is per layer too (`rope`): kBeforeCache for full K (keys are stored
//   rotated), kAtAttention for latent K (the attention kernel rotates reconstructed keys).
//   The token at logical position p of a sequence is slot p % block_size of block
//   block_table[p / block_size]; its flat slot index is block * block_size + p % block_size.
#pragma once

#include <cstdint>
#include <vector>

#include <string>

#include "absl/status/status.h"

#include "absl/status/statusor.h"
#include "common/defaults.h"
#include "common/dtype.h"
#include "model/model_config.h"

namespace lorc {

// KV cache sizing and the step limits the runner's fixed buffers are sized for.
struct KvCacheOptions {
  int32_t block_size = defaults::kBlockSize;
  int32_t num_blocks = 0;         // when 0: as many as the memory budget holds
  int64_t memory_bytes = defaults::kKvCacheMiB << 20;  // the budget when gpu_memory_utilization is 0
  // When > 0 (at most 1): the budget is total * utilization minus what the device already uses
  // after weights and step buffers (Backend::GetMemoryInfo). 0 keeps `memory_bytes` (the CPU way).
  double gpu_memory_utilization = 0;
  // Most sequences in one step.
  int32_t max_num_seqs = defaults::kMaxNumSeqs;
  // Most new tokens in one step over all sequences (also the most logit rows of one step).
  int32_t max_num_batched_tokens = defaults::kMaxNumBatchedTokens;
  // Most tokens of one sequence (num_computed_tokens + new); 0: the model's max_position_embeddings.
  int32_t max_model_len = 0;
  // Run every step eagerly: no CUDA graphs for decode steps (worker/model_runner.h).
  bool enforce_eager = false;
};

// Where rotary position embedding is applied to a layer's keys.
enum class KvRope : uint8_t {
  kBeforeCache,  // full KV: k is rotated, then written (the fused RopeKvWrite op)
  kAtAttention,  // latent KV: the cache holds unrotated latents; attention rotates on the fly
};

struct KvCacheSpec {
  int32_t block_size = defaults::kBlockSize;
  int32_t num_blocks = 0;
  DType dtype = DType::kF32;
  std::vector<int64_t> k_width;  // per layer
  std::vector<int64_t> v_width;  // per layer
  std::vector<KvRope> rope;      // per layer; empty means kBeforeCache everywhere
  // LoRC latent layers (kAtAttention) only, for reporting: the factorization method ("svd",
  // "whitened-svd"), per layer the latent ranks per KV head (empty without compression) and the
  // width an uncompressed layer would have on this rank (KV heads x head_dim).
  std::string latent_method;
  std::vector<int64_t> k_rank, v_rank;
  int64_t full_width = 0;

  int num_layers() const { return static_cast<int>(k_width.size()); }
  KvRope rope_at(int layer) const { return rope.empty() ? KvRope::kBeforeCache : rope[layer]; }
  // Bytes one token occupies across all layers, K and V.
  int64_t BytesPerToken() const;
  int64_t BytesPerBlock() const { return BytesPerToken() * block_size; }
  int64_t TotalBytes() const { return BytesPerBlock() * num_blocks; }
  // Blocks needed to hold `num_tokens` tokens.
  int32_t BlocksForTokens(int64_t num_tokens) const {
    return static_cast<int32_t>((num_tokens + block_size - 1) / block_size);
  }
  absl::Status Validate() const;
  // What ModelInfo.kv_compression (and info / eval) report: "none" when every layer stores full
  // rotated K/V; for LoRC latents "lorc:<method> k=<ranks> v=<ranks>, <P>% KV" where <ranks> is
  // the rank of every layer ("64") or, when layers differ, the first layer's and the last
  // layer's ("64..32"; progressive schedules decrease with depth), and P the KV bytes against
  // full K/V (sum of widths / (2 * layers * full_width)), e.g.
  // "lorc:whitened-svd k=64..32 v=64..32, 37.5% KV".
  std::string CompressionName() const;
};

// Inputs of MakeKvCacheSpec besides the model config.
struct KvSpecOptions {
  int32_t block_size = defaults::kBlockSize;
  DType dtype = DType::kF32;
  // KV heads held by this rank (its shard layout); 0 means all of the model's (tp 1).
  int64_t num_kv_heads = 0;
};

// The one place the KV geometry is decided: per layer K and V widths (KV heads on this rank x
// head_dim for an uncompressed model; KV heads x r_k and x r_v with kAtAttention for a LoRC
// model, config.lorc), dtype and RoPE placement. num_blocks is left 0: the worker sizes the
// cache from memory. InvalidArgument for a non-positive block_size or heads, or a config.lorc
// whose layer count differs from the model's.
absl::StatusOr<KvCacheSpec> MakeKvCacheSpec(const ModelConfig& config, const KvSpecOptions& options);

}  // namespace lorc
