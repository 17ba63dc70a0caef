// The CPU reference of LoRC latent attention (backend.h, LatentAttentionParams): per sequence and
// KV head, gather the latents, reconstruct the keys with one GEMM, rotate them at their positions,
// then scores, causal softmax and probabilities x value latents, all in fp32 (latents read from
// an F32, BF16 or quantized cache through cpu_kv_cache.cc). Written for
// exactness, not speed: the GPU kernel is tested against it.
#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "absl/strings/str_cat.h"
#include "backend/cpu_kernels.h"
#include "common/status_macros.h"
#include "kvpolicy/sequence_policy.h"

namespace lorc::cpu_internal {

void RotateRows(float* x, int64_t rows, int64_t ld, int heads, int head_dim,
                const int32_t* positions, const float* inv_freq, std::vector<float>* cos,
                std::vector<float>* sin) {
  const int half = head_dim / 2;
  cos->resize(half);
  sin->resize(half);
  for (int64_t t = 0; t < rows; ++t) {
    const float pos = static_cast<float>(positions[t]);
    for (int i = 0; i < half; ++i) {
      // fp32 angle, as transformers computes it (inv_freq @ positions in float32).
      const float angle = pos * inv_freq[i];
      (*cos)[i] = static_cast<float>(std::cos(static_cast<double>(angle)));
      (*sin)[i] = static_cast<float>(std::sin(static_cast<double>(angle)));
    }
    float* row = x + t * ld;
    for (int h = 0; h < heads; ++h) {
      float* v = row + static_cast<int64_t>(h) * head_dim;
      for (int i = 0; i < half; ++i) {
        const float a = v[i], b = v[i + half];
        v[i] = a * (*cos)[i] - b * (*sin)[i];
        v[i + half] = b * (*cos)[i] + a * (*sin)[i];
      }
    }
  }
}

void CausalSoftmax(float* scores, int q_len, int len) {
  for (int i = 0; i < q_len; ++i) {
    float* row = scores + static_cast<size_t>(i) * len;
    const int last = len - q_len + i;  // causal: keys at positions <= last
    float mx = -std::numeric_limits<float>::infinity();
    for (int j = 0; j <= last; ++j) mx = std::max(mx, row[j]);
    float sum = 0.f;
    for (int j = 0; j <= last; ++j) {
      row[j] = std::exp(row[j] - mx);
      sum += row[j];
    }
    const float inv = 1.0f / sum;
    for (int j = 0; j <= last; ++j) row[j] *= inv;
    for (int j = last + 1; j < len; ++j) row[j] = 0.f;
  }
}

absl::Status LatentAttention(const LatentAttentionParams& p, const AttentionBatch& b,
                             absl::Span<const int32_t> seqs, LatentScratch* sc) {
  constexpr const char* kCpu = BackendKindName(BackendKind::kCpu);
  RETURN_IF_ERROR(RequireF32(kCpu, "LatentAttention", "query", p.q.dtype));
  RETURN_IF_ERROR(RequireF32(kCpu, "LatentAttention", "k_up", p.k_up.dtype));
  RETURN_IF_ERROR(RequireF32(kCpu, "LatentAttention", "output", p.out.dtype));
  RETURN_IF_ERROR(CheckKvCache("LatentAttention", p.cache));
  const int hd = p.head_dim, rk = p.k_rank, rv = p.v_rank;
  if (p.num_kv_heads <= 0 || p.num_heads % p.num_kv_heads != 0 || hd <= 0 || hd % 2 != 0 ||
      rk < 1 || rk > hd || rv < 1 || rv > hd) {
    return absl::InvalidArgumentError(absl::StrCat(
        "cpu backend: LatentAttention: ", p.num_heads, " query heads over ", p.num_kv_heads,
        " KV heads, head_dim ", hd, ", k_rank ", rk, ", v_rank ", rv));
  }
  if (p.cache.k_width != static_cast<int64_t>(p.num_kv_heads) * rk ||
      p.cache.v_width != static_cast<int64_t>(p.num_kv_heads) * rv ||
      p.k_up.rows != static_cast<int64_t>(p.num_kv_heads) * hd || p.k_up.cols != rk ||
      p.q.cols != static_cast<int64_t>(p.num_heads) * hd ||
      p.out.cols != static_cast<int64_t>(p.num_heads) * rv || p.out.rows != p.q.rows) {
    return absl::InvalidArgumentError(absl::StrCat(
        "cpu backend: LatentAttention: shapes q[", p.q.rows, ",", p.q.cols, "] k_up[", p.k_up.rows,
        ",", p.k_up.cols, "] out[", p.out.rows, ",", p.out.cols, "] cache widths ", p.cache.k_width,
        "/", p.cache.v_width, " do not match ", p.num_heads, " query heads, ", p.num_kv_heads,
        " KV heads, head_dim ", hd, ", k_rank ", rk, ", v_rank ", rv));
  }
  const int group = p.num_heads / p.num_kv_heads;
  const int64_t q_ld = p.q.stride(), o_ld = p.out.stride(), up_ld = p.k_up.stride();
  for (const int32_t s : seqs) {
    const int q0 = b.query_start[s];
    const int q_len = b.query_start[s + 1] - q0;
    if (q_len == 0) continue;
    const int len = b.seq_lens[s];
    const int32_t* table = b.block_tables + static_cast<int64_t>(s) * b.max_blocks_per_seq;
    kvpolicy::SequenceKvPolicy* policy =
        p.kv_policy.seqs != nullptr ? p.kv_policy.seqs[s] : nullptr;
    for (int g = 0; g < p.num_kv_heads; ++g) {
      // Latents of KV head g that the policy keeps (all without one), dequantized to fp32, and
      // their positions (the reconstructed keys are rotated at them).
      const int n = GatherKeptHead(p.cache, policy, p.kv_policy.layer, table, b.block_size, len,
                                   q_len, g, rk, rv, &sc->positions, &sc->c_k, &sc->c_v);
      if (n < 0) {
        return absl::InternalError(absl::StrCat("cpu backend: LatentAttention: sequence ", s,
                                                ": the KV policy left out a token of this step"));
      }
      sc->k.resize(static_cast<size_t>(n) * hd);
      sc->scores.resize(static_cast<size_t>(q_len) * n);
      // k [len, hd] = c_K [len, rk] x B_K,g^T (B_K,g: [hd, rk]), then RoPE at each position.
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, hd, rk, 1.0f, sc->c_k.data(), rk,
                  p.k_up.as<float>() + static_cast<int64_t>(g) * hd * up_ld, static_cast<int>(up_ld),
                  0.0f, sc->k.data(), hd);
      RotateRows(sc->k.data(), n, hd, 1, hd, sc->positions.data(), p.inv_freq, &sc->cos, &sc->sin);
      for (int hh = 0; hh < group; ++hh) {
        const int h = g * group + hh;
        const float* q = p.q.as<float>() + static_cast<int64_t>(q0) * q_ld + static_cast<int64_t>(h) * hd;
        float* out = p.out.as<float>() + static_cast<int64_t>(q0) * o_ld + static_cast<int64_t>(h) * rv;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, q_len, n, hd, p.scale, q,
                    static_cast<int>(q_ld), sc->k.data(), hd, 0.0f, sc->scores.data(), n);
        CausalSoftmax(sc->scores.data(), q_len, n);
        if (policy != nullptr) {
          RecordImportance(sc->scores.data(), q_len, n, len, sc->positions.data(),
                           policy->last_hit(p.kv_policy.layer, g));
        }
        // out [q_len, rv] = P [q_len, len] x c_V [len, rv]: the value up-projection is in o_proj.
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, q_len, rv, n, 1.0f,
                    sc->scores.data(), n, sc->c_v.data(), rv, 0.0f, out, static_cast<int>(o_ld));
      }
      if (policy != nullptr) {
        policy->Apply(p.kv_policy.layer, g, sc->positions, sc->c_k.data());
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace lorc::cpu_internal
