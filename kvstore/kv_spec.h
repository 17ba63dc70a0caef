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
//   The token at logical position p of a sequence is slot p % block_size of block
//   block_table[p / block_size]; its flat slot index is block * block_size + p % block_size.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "common/dtype.h"

namespace lorc {

// How big to make the cache (the coordinator asks, each worker sizes its own).
struct KvCacheOptions {
  int32_t block_size = 16;
  int32_t num_blocks = 0;         // when 0: as many as `memory_bytes` holds
  int64_t memory_bytes = 512ll << 20;
};

struct KvCacheSpec {
  int32_t block_size = 16;
  int32_t num_blocks = 0;
  DType dtype = DType::kF32;
  std::vector<int64_t> k_width;  // per layer
  std::vector<int64_t> v_width;  // per layer

  int num_layers() const { return static_cast<int>(k_width.size()); }
  // Bytes one token occupies across all layers, K and V.
  int64_t BytesPerToken() const;
  int64_t BytesPerBlock() const { return BytesPerToken() * block_size; }
  int64_t TotalBytes() const { return BytesPerBlock() * num_blocks; }
  // Blocks needed to hold `num_tokens` tokens.
  int32_t BlocksForTokens(int64_t num_tokens) const {
    return static_cast<int32_t>((num_tokens + block_size - 1) / block_size);
  }
  absl::Status Validate() const;
};

}  // namespace lorc
