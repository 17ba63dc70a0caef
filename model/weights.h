// Llama weights on a backend, for one tensor-parallel rank: read from a checkpoint (each rank
// reads only its slices) or generated from a seed (benchmarks of 8B/70B shapes without files).
//
// Tensor-parallel layout (Megatron style), for rank r of tp:
//   qkv     [q_local + 2 * kv_local, hidden]: rows = this rank's query heads, then its KV heads'
//           keys, then their values (q_proj/k_proj/v_proj split by heads, fused);
//   o       [hidden, q_local]: o_proj split by columns (input features), summed by all-reduce;
//   gate_up [2 * inter_local, hidden]: gate rows then up rows of this rank's slice;
//   down    [hidden, inter_local]: down_proj split by columns, summed by all-reduce;
//   embed, norms: replicated;
//   lm_head: replicated, or split (ShardLayout::Make's shard_lm_head; unset: DefaultLmHeadSplit):
//           rows [vocab_begin, vocab_begin + vocab_size) of it (the tied embedding's rows when
//           tied), logits all-gathered.
// When tp exceeds the KV-head count, each rank holds the one KV head its query heads use
// (KV heads replicated tp / num_kv_heads times).
//
// A LoRC layer (ModelConfig::lorc; compress/FORMAT.md; ranks r_k, r_v of the layer) is sliced by
// heads the same way, with latent widths in place of head_dim:
//   qkv     [q_local + kv_heads_local * (r_k + r_v), hidden]: this rank's query heads' q rows,
//           then A_K rows of its KV heads (k_proj rows [h*r_k, (h+1)*r_k)), then A_V rows;
//   k_up    [kv_heads_local * head_dim, r_k]: B_K of its KV heads (k_up_proj rows);
//   o       [hidden, q_heads_local * r_v]: o_proj columns [j*r_v, (j+1)*r_v) of its query heads.
// Each tensor's shape is checked at load (the error names tensor and expected shape).
#pragma once

#include <cstdint>
#include <optional>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "backend/backend.h"
#include "model/model_config.h"
#include "model/safetensors.h"

namespace lorc {

// Which heads and MLP columns one rank holds.
struct ShardLayout {
  int32_t tp_rank = 0;
  int32_t tp_size = 1;
  int64_t num_heads = 0;       // query heads on this rank
  int64_t num_kv_heads = 0;    // KV heads on this rank
  int64_t head_begin = 0;      // first query head
  int64_t kv_head_begin = 0;   // first KV head
  int64_t inter_size = 0;      // MLP intermediate columns on this rank
  int64_t inter_begin = 0;
  bool lm_head_sharded = false;
  int64_t vocab_begin = 0;     // LM-head rows on this rank (the whole vocabulary unless sharded)
  int64_t vocab_size = 0;

  // InvalidArgument when the model cannot be split `tp_size` ways (or, with `shard_lm_head`,
  // when tp_size does not divide the vocabulary). Unset `shard_lm_head`: DefaultLmHeadSplit.
  static absl::StatusOr<ShardLayout> Make(const ModelConfig& config, int32_t tp_rank,
                                          int32_t tp_size, std::optional<bool> shard_lm_head = false,
                                          bool cuda = false);
};

// Where the LM head goes when the user did not say (ModelSource::shard_lm_head unset), decided
// by measurement: split by vocabulary on GPUs (Llama-3-70B shape at TP = 2 on 2 x H200,
// 2026-12-01: decode batch 1 21.57 vs 21.85 ms a step, batch 64 equal, prefill of 512 tokens 73
// vs 80 ms) and on CPUs from TP = 4 (Gloo all-gather: -5 % at TP = 2, +19 % at TP = 4,
// 2026-11-22; docs/PERFORMANCE.md); replicated when tp_size does not divide the vocabulary.
bool DefaultLmHeadSplit(const ModelConfig& config, int32_t tp_size, bool cuda);

struct LayerWeights {
  DeviceBuffer input_norm;  // [hidden]
  DeviceBuffer qkv;         // see above
  DeviceBuffer o;
  DeviceBuffer k_up;        // LoRC layers only: [kv_heads_local * head_dim, r_k]; empty otherwise
  DeviceBuffer post_norm;   // [hidden]
  DeviceBuffer gate_up;
  DeviceBuffer down;
};

struct ModelWeights {
  ShardLayout shard;
  DeviceBuffer embed;       // [vocab, hidden]
  DeviceBuffer final_norm;  // [hidden]
  DeviceBuffer lm_head;     // [shard.vocab_size, hidden]; empty when tied and not sharded (use embed)
  std::vector<LayerWeights> layers;
  DType dtype = DType::kF32;  // element type on the device: the backend's compute_dtype()

  const DeviceBuffer& lm_head_or_embed() const { return lm_head.empty() ? embed : lm_head; }
};

// Receives the loaders' progress lines (no trailing newline); the worker prints them to stderr.
using WeightsProgress = std::function<void(const std::string& line)>;

// Reads this rank's slices of a checkpoint into buffers of the backend's compute_dtype():
// tensors already in that dtype are copied as bytes (BF16 files on CUDA, F32 on the CPU); F32,
// F16 and BF16 tensors of another dtype are read as fp32 and converted on the host (BF16:
// rounded to nearest even). After the last tensor this rank needs from a file, one line
// "weights: <file> (<i>/<n>, <X> GB) read in <T> s": i = the file's place among the
// checkpoint's n files sorted by name, X = the bytes of this rank's slices as stored in the
// file, T = the time spent reading, converting and enqueueing them. Errors name file and tensor.
absl::StatusOr<ModelWeights> LoadWeights(const ModelConfig& config, const CheckpointReader& reader,
                                         const ShardLayout& shard, Backend& backend,
                                         const WeightsProgress& progress = nullptr);

// Seeded random weights of the config's shape (LoRC factors of lorc.json's ranks when
// config.lorc is set) (uniform, std 0.02; norms 1), generated on the
// backend (Backend::FillWeights: no host staging). Values depend only on (seed, tensor name,
// element index in the full tensor), so every tp split sees slices of the same full model and
// every backend the same fp32 values (CUDA stores them rounded to BF16). With `progress`, after
// synchronizing the backend, one line "weights: random (seed S), X GB generated on <backend>
// in T s".
absl::StatusOr<ModelWeights> RandomWeights(const ModelConfig& config, uint64_t seed,
                                           const ShardLayout& shard, Backend& backend,
                                           const WeightsProgress& progress = nullptr);

}  // namespace lorc
