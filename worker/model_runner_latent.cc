// The attention block of LoRC latent layers (compress/FORMAT.md, backend.h LatentAttentionParams):
// qkv matmul -> RoPE on q, key/value latents written unrotated -> latent attention -> o matmul
// over the r_v-wide outputs of this rank's query heads.
#include <cmath>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "worker/model_runner.h"

namespace lorc {

absl::Status ModelRunner::CheckLatentLayer(int l) const {
  if (!backend_->SupportsLatentAttention()) {
    return absl::UnimplementedError(absl::StrCat(
        backend_->name(), " backend: LoRC latent KV cache (lorc.json) not implemented: latent "
        "attention runs on the cpu backend for now"));
  }
  if (!config_.lorc || static_cast<int64_t>(config_.lorc->layers.size()) != config_.num_layers ||
      static_cast<int64_t>(kv_spec_.k_rank.size()) != config_.num_layers ||
      static_cast<int64_t>(kv_spec_.v_rank.size()) != config_.num_layers) {
    return absl::InvalidArgumentError(absl::StrCat(
        "kv spec layer ", l, ": latent KV, but the model config has no LoRC ranks for every layer"));
  }
  const LorcLayerRanks& r = config_.lorc->layers[l];
  const int64_t nkv = weights_.shard.num_kv_heads;
  if (kv_spec_.k_rank[l] != r.k_rank || kv_spec_.v_rank[l] != r.v_rank ||
      kv_spec_.k_width[l] != nkv * r.k_rank || kv_spec_.v_width[l] != nkv * r.v_rank) {
    return absl::InvalidArgumentError(absl::StrCat(
        "kv spec layer ", l, ": latent widths ", kv_spec_.k_width[l], "/", kv_spec_.v_width[l],
        ", this rank's ", nkv, " KV heads at ranks ", r.k_rank, "/", r.v_rank, " need ",
        nkv * r.k_rank, "/", nkv * r.v_rank));
  }
  if (weights_.layers[l].k_up.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("layer ", l, ": LoRC layer without k_up weights"));
  }
  return absl::OkStatus();
}

absl::Status ModelRunner::LatentAttentionBlock(int l, int32_t T, const Tensor2D& h) {
  const int32_t* dm = meta_.as<int32_t>();
  const ShardLayout& sh = weights_.shard;
  const LayerWeights& w = weights_.layers[l];
  const int64_t d = config_.hidden_size, hd = config_.head_dim;
  const int64_t rk = kv_spec_.k_rank[l], rv = kv_spec_.v_rank[l];
  const int64_t q_sz = sh.num_heads * hd, kw = kv_spec_.k_width[l], vw = kv_spec_.v_width[l];
  const Tensor2D qkv = Act(qkv_, T, q_sz + kw + vw), attn = Act(attn_, T, sh.num_heads * rv);
  RETURN_IF_ERROR(backend_->Matmul(h, Weight(w.qkv, q_sz + kw + vw, d), qkv));

  RopeKvWriteParams rk_write;
  rk_write.q = qkv.ColSlice(0, q_sz);
  rk_write.k = qkv.ColSlice(q_sz, kw);
  rk_write.v = qkv.ColSlice(q_sz + kw, vw);
  rk_write.cache = kv_layers_[l];
  rk_write.rotate_k = false;
  rk_write.num_heads = static_cast<int32_t>(sh.num_heads);
  rk_write.num_kv_heads = static_cast<int32_t>(sh.num_kv_heads);
  rk_write.head_dim = static_cast<int32_t>(hd);
  rk_write.positions = dm + meta_at_.positions;
  rk_write.inv_freq = inv_freq_.as<float>();
  rk_write.slot_mapping = dm + meta_at_.slots;
  RETURN_IF_ERROR(backend_->RopeKvWrite(rk_write));

  LatentAttentionParams lp;
  lp.q = rk_write.q;
  lp.k_up = Weight(w.k_up, sh.num_kv_heads * hd, rk);
  lp.out = attn;
  lp.cache = kv_layers_[l];
  lp.num_heads = rk_write.num_heads;
  lp.num_kv_heads = rk_write.num_kv_heads;
  lp.head_dim = rk_write.head_dim;
  lp.k_rank = static_cast<int32_t>(rk);
  lp.v_rank = static_cast<int32_t>(rv);
  lp.scale = 1.0f / std::sqrt(static_cast<float>(hd));
  lp.inv_freq = inv_freq_.as<float>();
  lp.kv_policy = {policy_seqs_.empty() ? nullptr : policy_seqs_.data(), static_cast<int32_t>(l)};
  RETURN_IF_ERROR(backend_->LatentAttention(lp, *plan_));
  return backend_->Matmul(attn, Weight(w.o, d, sh.num_heads * rv), h);
}

}  // namespace lorc
