// Internal to backend/: fp32 building blocks shared by the CPU backend's ops (cpu_backend.cc)
// and its LoRC latent attention (cpu_latent_attention.cc), so both paths rotate and normalise
// with the same arithmetic.
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

// Scratch reused across calls (sized on demand).
struct LatentScratch {
  std::vector<float> c_k, c_v, k, scores, cos, sin;
  std::vector<int32_t> positions;
};

// CpuBackend::LatentAttention over the sequences `seqs` of batch `b` (LatentAttentionParams).
absl::Status LatentAttention(const LatentAttentionParams& p, const AttentionBatch& b,
                             absl::Span<const int32_t> seqs, LatentScratch* scratch);

}  // namespace lorc::cpu_internal
