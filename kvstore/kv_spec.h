// Shape and physical layout of the paged KV cache.
//
// Layout (the same on every backend; the CPU backend is the reference):
//   The cache holds `num_blocks` blocks of `block_size` token slots. A block id names the same
//   slots in every layer: one block table per sequence serves all layers.
//   For each layer l there are two arrays, K_l and V_l. Unquantized (kv_cache_dtype auto / bf16):
//     K_l : [num_blocks][block_size][k_width[l]]   elements of `dtype`, row-major
//     V_l : [num_blocks][block_size][v_width[l]]
//   For an uncompressed model k_width = v_width = (KV heads on this rank) * head_dim, with head h
//   of a token at columns [h * head_dim, (h + 1) * head_dim). Widths may differ per layer and
//   between K and V (the low-rank compression stores per-layer latents of different ranks).
//   Where RoPE is applied is per layer too (`rope`): kBeforeCache for full K (keys are stored
//   rotated), kAtAttention for latent K (the attention kernel rotates reconstructed keys).
//   The token at logical position p of a sequence is slot p % block_size of block
//   block_table[p / block_size]; its flat slot index is block * block_size + p % block_size.
//   Quantized (kv_cache_dtype fp8 / int8 / int4; kernels/kv_quant.h has the formats and the
//   arithmetic): a "head" of a side is head_dim values (full) or r_k / r_v values (one KV head's
//   latent), head_width = width / num_kv_heads. Each block of each side of each layer is
//     [block_size][code_row] codes, then [block_size][scale_row] fp16 scales
//   code_row = KV heads x head_width codes (fp8 / int8: one byte; int4: two per byte, each head
//   starting on a byte), padded to a multiple of 16 bytes; scale_row = per KV head one fp16 scale
//   (fp8, int8: per token and head) or per group of 32 channels of the head an fp16 scale and fp16
//   zero point (int4). So a block's codes and scales are contiguous: copying a block's bytes
//   (CopyBlocks, a host tier) moves everything, and the block stride is block_size x the side's
//   bytes per token, what BytesPerToken() sums.
#pragma once

#include <cstdint>
#include <vector>

#include <string>

#include "absl/status/status.h"

#include "absl/status/statusor.h"
#include "common/defaults.h"
#include "kvpolicy/kv_policy_config.h"
#include "absl/strings/string_view.h"
#include "common/dtype.h"
#include "kernels/kv_quant.h"
#include "model/model_config.h"

namespace lorc {

// `--kv-cache-dtype` (vLLM's name): how the KV cache stores K and V. kAuto: the backend's
// activation dtype (F32 on the CPU, BF16 on CUDA); kBf16: BF16 (round-to-nearest-even; on the CPU
// too, so the CPU measures a BF16 cache); kFp8 (OCP e4m3fn) and kInt8 with per-token, per-KV-head
// fp16 scales; kInt4: per token groups of 32 channels with an fp16 scale and zero point each
// (kernels/kv_quant.h). Quantize on write, dequantize inside attention.
enum class KvCacheDtype : uint8_t { kAuto, kBf16, kFp8, kInt8, kInt4 };

// "auto", "bf16", "fp8", "int8", "int4" (also fp8_e4m3 for fp8, as vLLM); InvalidArgument naming
// --kv-cache-dtype for anything else.
absl::StatusOr<KvCacheDtype> ParseKvCacheDtype(absl::string_view s);
// The flag spelling: "auto", "bf16", "fp8", "int8", "int4". Inline: libraries that only see this
// header (the backends) name the dtype without linking kvstore.
inline const char* KvCacheDtypeName(KvCacheDtype d) {
  switch (d) {
    case KvCacheDtype::kAuto: return "auto";
    case KvCacheDtype::kBf16: return "bf16";
    case KvCacheDtype::kFp8: return "fp8";
    case KvCacheDtype::kInt8: return "int8";
    case KvCacheDtype::kInt4: return "int4";
  }
  return "?";
}
// The code format: kNone for auto and bf16.
kernels::KvQuant KvQuantOf(KvCacheDtype d);

// KV cache sizing and the step limits the runner's fixed buffers are sized for.
struct KvCacheOptions {
  int32_t block_size = defaults::kBlockSize;
  KvCacheDtype kv_cache_dtype = KvCacheDtype::kAuto;  // --kv-cache-dtype
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
  // Host KV tier (issue #10; `--kv-offloading-size` GiB, vLLM's name and meaning): bytes of host
  // memory for offloaded blocks over the whole tensor-parallel group; each rank holds
  // kv_offloading_bytes / tp_size (pinned on a GPU), i.e. that / BytesPerBlock() slots. 0: none.
  int64_t kv_offloading_bytes = 0;
  // Token-level KV policy (kvpolicy/kv_policy_config.h: --kv-policy and its flags); none by
  // default. In-process CPU workers only for now (the model runner refuses it elsewhere).
  kvpolicy::KvPolicyConfig kv_policy;
};

// Where rotary position embedding is applied to a layer's keys.
enum class KvRope : uint8_t {
  kBeforeCache,  // full KV: k is rotated, then written (the fused RopeKvWrite op)
  kAtAttention,  // latent KV: the cache holds unrotated latents; attention rotates on the fly
};

struct KvCacheSpec {
  int32_t block_size = defaults::kBlockSize;
  int32_t num_blocks = 0;
  // What is stored: kAuto / kBf16 store elements of `dtype` (auto: the activation dtype; bf16:
  // BF16); fp8 / int8 / int4 store codes and scales (layout above) and `dtype` is U8.
  KvCacheDtype kv_cache_dtype = KvCacheDtype::kAuto;
  DType dtype = DType::kF32;
  // KV heads on this rank: a side's head width is width / num_kv_heads (scale groups follow the
  // heads). Needed by the quantized dtypes only (0 in hand-made unquantized specs).
  int64_t num_kv_heads = 0;
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
  kernels::KvQuant quant() const { return KvQuantOf(kv_cache_dtype); }
  // Bytes one token occupies in layer l's K (V) array: width x dtype size, or for a quantized
  // cache its codes (row padded to 16 bytes) and scales (kernels/kv_quant.h KvqTokenBytes).
  int64_t KBytesPerToken(int layer) const { return SideBytesPerToken(k_width[layer]); }
  int64_t VBytesPerToken(int layer) const { return SideBytesPerToken(v_width[layer]); }
  // Bytes one token occupies across all layers, K and V, scales included.
  int64_t BytesPerToken() const;
  int64_t BytesPerBlock() const { return BytesPerToken() * block_size; }
  int64_t TotalBytes() const { return BytesPerBlock() * num_blocks; }
  // Blocks needed to hold `num_tokens` tokens.
  int32_t BlocksForTokens(int64_t num_tokens) const {
    return static_cast<int32_t>((num_tokens + block_size - 1) / block_size);
  }
  // InvalidArgument for non-positive sizes or widths, and for a quantized cache without KV heads
  // or with widths they do not divide.
  absl::Status Validate() const;
  // What ModelInfo.kv_compression (and info / eval) report: "none" when every layer stores full
  // rotated K/V in the activation dtype (kv_cache_dtype auto); for LoRC latents
  // "lorc:<method> k=<ranks> v=<ranks>, <P>% KV" where <ranks> is the rank of every layer ("64")
  // or, when layers differ and never increase with depth (progressive), the first layer's and the
  // last layer's ("64..32"), otherwise the smallest and largest rank ("24-120": a searched
  // schedule), and P the KV elements against full K/V (sum of widths /
  // (2 * layers * full_width)), e.g. "lorc:whitened-svd k=64..32 v=64..32, 37.5% KV"; a
  // kv_cache_dtype other than auto is appended ("int8" alone for full K/V, else
  // "lorc:svd k=64 v=64, 50% KV, int4").
  std::string CompressionName() const;
  // The stored element type as eval reports it: "F32" / "BF16" (DTypeName) or "fp8_e4m3",
  // "int8", "int4".
  std::string StorageName() const;

 private:
  int64_t SideBytesPerToken(int64_t width) const;
};

// Inputs of MakeKvCacheSpec besides the model config.
struct KvSpecOptions {
  int32_t block_size = defaults::kBlockSize;
  DType dtype = DType::kF32;  // the activation dtype (what kv_cache_dtype auto stores)
  // KV heads held by this rank (its shard layout); 0 means all of the model's (tp 1).
  int64_t num_kv_heads = 0;
  KvCacheDtype kv_cache_dtype = KvCacheDtype::kAuto;
};

// The one place the KV geometry is decided: per layer K and V widths (KV heads on this rank x
// head_dim for an uncompressed model; KV heads x r_k and x r_v with kAtAttention for a LoRC
// model, config.lorc), stored dtype (options.dtype for kv_cache_dtype auto, BF16 for bf16, U8
// codes for fp8 / int8 / int4) and RoPE placement. num_blocks is left 0: the worker sizes the
// cache from memory. InvalidArgument for a non-positive block_size or heads, or a config.lorc
// whose layer count differs from the model's.
absl::StatusOr<KvCacheSpec> MakeKvCacheSpec(const ModelConfig& config, const KvSpecOptions& options);

}  // namespace lorc
