#include "model/weights.h"

#include <cstdio>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/dtype.h"
#include "common/status_macros.h"
#include "model/weights_source.h"

namespace lorc {

namespace weights_internal {

std::string Gigabytes(double bytes) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.2f GB", bytes * 1e-9);
  return buf;
}

std::string Seconds(double seconds) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.2f s", seconds);
  return buf;
}

}  // namespace weights_internal

namespace {

using weights_internal::Piece;
using weights_internal::WeightSource;

// Plans every buffer of a rank (which pieces, in which order), then allocates each final device
// buffer and has the source write its pieces in place at their byte offsets.
class Loader {
 public:
  Loader(const ModelConfig& c, const ShardLayout& s, Backend& b, WeightSource& src)
      : c_(c), s_(s), b_(b), src_(src), dtype_(b.compute_dtype()) {}

  absl::StatusOr<ModelWeights> Load() {
    if (dtype_ != DType::kF32 && dtype_ != DType::kBF16) {
      return absl::UnimplementedError(absl::StrCat("weights: ", DTypeName(dtype_),
                                                   " on the device not implemented (F32, BF16)"));
    }
    if (c_.lorc && static_cast<int64_t>(c_.lorc->layers.size()) != c_.num_layers) {
      return absl::InvalidArgumentError(absl::StrCat("weights: lorc.json has ", c_.lorc->layers.size(),
                                                     " layers, the model ", c_.num_layers));
    }
    ModelWeights w;
    w.shard = s_;
    w.dtype = dtype_;
    const int64_t d = c_.hidden_size;
    Add(w.embed, {Rows("model.embed_tokens.weight", c_.vocab_size, d, 0, c_.vocab_size)});
    Add(w.final_norm, {Norm("model.norm.weight")});
    const std::string head = c_.tie_word_embeddings ? "model.embed_tokens.weight" : "lm_head.weight";
    if (s_.lm_head_sharded) {
      Add(w.lm_head, {Rows(head, c_.vocab_size, d, s_.vocab_begin, s_.vocab_size)});
    } else if (!c_.tie_word_embeddings) {
      Add(w.lm_head, {Rows(head, c_.vocab_size, d, 0, c_.vocab_size)});
    }
    w.layers.resize(static_cast<size_t>(c_.num_layers));
    for (int64_t l = 0; l < c_.num_layers; ++l) PlanLayer(l, w.layers[l]);

    std::vector<Piece> all;
    for (const Planned& b : plan_) all.insert(all.end(), b.pieces.begin(), b.pieces.end());
    RETURN_IF_ERROR(src_.Begin(all));  // the checkpoint's headers and shapes checked
    const size_t esz = DTypeSize(dtype_);
    // Refused before anything is allocated when the shard cannot fit: the CPU backend's memory is
    // committed lazily, so an 8B model in fp32 on a 24 GB machine was killed by the kernel
    // part-way through the load instead of getting an error (a tester).
    double bytes = 0;
    for (const Piece& p : all) bytes += static_cast<double>(p.numel()) * static_cast<double>(esz);
    const MemoryInfo mem = b_.GetMemoryInfo();
    if (mem.free_bytes > 0 && bytes > static_cast<double>(mem.free_bytes)) {
      return absl::ResourceExhaustedError(absl::StrFormat(
          "weights: this rank's %.2f GiB (%s; config.json's sizes, tensor-parallel rank %d of %d) do not fit the "
          "%.2f GiB free on the %s backend's device (a CPU's: available memory within its cgroup's limit, no swap)",
          bytes / (1 << 30), DTypeName(dtype_), s_.tp_rank, s_.tp_size, static_cast<double>(mem.free_bytes) / (1 << 30),
          b_.name()));
    }
    for (Planned& b : plan_) {
      int64_t n = 0;
      for (const Piece& p : b.pieces) n += p.numel();
      ASSIGN_OR_RETURN(*b.target, b_.Allocate(static_cast<size_t>(n) * esz));
      size_t offset = 0;
      for (const Piece& p : b.pieces) {
        RETURN_IF_ERROR(src_.Write(p, static_cast<char*>(b.target->data()) + offset));
        offset += static_cast<size_t>(p.numel()) * esz;
      }
    }
    RETURN_IF_ERROR(src_.End());
    return w;
  }

 private:
  struct Planned {
    DeviceBuffer* target;
    std::vector<Piece> pieces;  // concatenated in order
  };

  void Add(DeviceBuffer& target, std::vector<Piece> pieces) {
    plan_.push_back({&target, std::move(pieces)});
  }
  Piece Norm(const std::string& name) const { return {name, {c_.hidden_size}, 0, c_.hidden_size, 0, 1}; }
  // Rows [r0, r0 + n) of a [rows, cols] tensor.
  static Piece Rows(const std::string& name, int64_t rows, int64_t cols, int64_t r0, int64_t n) {
    return {name, {rows, cols}, r0, n, 0, cols};
  }
  // Columns [c0, c0 + n) of a [rows, cols] tensor.
  static Piece Cols(const std::string& name, int64_t rows, int64_t cols, int64_t c0, int64_t n) {
    return {name, {rows, cols}, 0, rows, c0, n};
  }

  void PlanLayer(int64_t l, LayerWeights& lw) {
    const std::string p = absl::StrCat("model.layers.", l, ".");
    const int64_t d = c_.hidden_size, hd = c_.head_dim, inter = c_.intermediate_size;
    Add(lw.input_norm, {Norm(p + "input_layernorm.weight")});
    Add(lw.post_norm, {Norm(p + "post_attention_layernorm.weight")});
    // Full layers: K/V/O per head are head_dim wide; LoRC layers: r_k (keys), r_v (values and
    // the o_proj columns of each query head), plus the key up-projection (FORMAT.md).
    const int64_t rk = c_.lorc ? c_.lorc->layers[l].k_rank : hd;
    const int64_t rv = c_.lorc ? c_.lorc->layers[l].v_rank : hd;
    const int64_t nkv = c_.num_kv_heads, nq = c_.num_heads;
    Add(lw.qkv, {Rows(p + "self_attn.q_proj.weight", c_.q_size(), d, s_.head_begin * hd, s_.num_heads * hd),
                 Rows(p + "self_attn.k_proj.weight", nkv * rk, d, s_.kv_head_begin * rk,
                      s_.num_kv_heads * rk),
                 Rows(p + "self_attn.v_proj.weight", nkv * rv, d, s_.kv_head_begin * rv,
                      s_.num_kv_heads * rv)});
    if (c_.lorc) {
      Add(lw.k_up, {Rows(p + "self_attn.k_up_proj.weight", nkv * hd, rk, s_.kv_head_begin * hd,
                         s_.num_kv_heads * hd)});
    }
    Add(lw.o, {Cols(p + "self_attn.o_proj.weight", d, nq * rv, s_.head_begin * rv, s_.num_heads * rv)});
    Add(lw.gate_up, {Rows(p + "mlp.gate_proj.weight", inter, d, s_.inter_begin, s_.inter_size),
                     Rows(p + "mlp.up_proj.weight", inter, d, s_.inter_begin, s_.inter_size)});
    Add(lw.down, {Cols(p + "mlp.down_proj.weight", d, inter, s_.inter_begin, s_.inter_size)});
  }

  const ModelConfig& c_;
  const ShardLayout& s_;
  Backend& b_;
  WeightSource& src_;
  DType dtype_;  // on the device: the backend's compute dtype
  std::vector<Planned> plan_;
};

}  // namespace

bool DefaultLmHeadSplit(const ModelConfig& config, int32_t tp_size, bool cuda) {
  if (tp_size <= 1 || config.vocab_size % tp_size != 0) return false;
  return cuda || tp_size >= 4;
}

absl::StatusOr<ShardLayout> ShardLayout::Make(const ModelConfig& c, int32_t tp_rank,
                                              int32_t tp_size, std::optional<bool> shard_lm_head_opt,
                                              bool cuda) {
  const bool shard_lm_head = shard_lm_head_opt.value_or(DefaultLmHeadSplit(c, tp_size, cuda));
  if (tp_size < 1 || tp_rank < 0 || tp_rank >= tp_size) {
    return absl::InvalidArgumentError(absl::StrCat("invalid tensor-parallel rank ", tp_rank, " of ", tp_size));
  }
  if (c.num_heads % tp_size != 0) {
    return absl::InvalidArgumentError(absl::StrCat("tensor parallelism ", tp_size, " does not divide the ",
                                                   c.num_heads, " attention heads"));
  }
  if (c.intermediate_size % tp_size != 0) {
    return absl::InvalidArgumentError(absl::StrCat("tensor parallelism ", tp_size,
                                                   " does not divide intermediate_size ",
                                                   c.intermediate_size));
  }
  if (c.num_kv_heads % tp_size != 0 && tp_size % c.num_kv_heads != 0) {
    return absl::InvalidArgumentError(absl::StrCat("tensor parallelism ", tp_size, " and the ",
                                                   c.num_kv_heads,
                                                   " KV heads: neither divides the other"));
  }
  ShardLayout s;
  s.tp_rank = tp_rank;
  s.tp_size = tp_size;
  s.num_heads = c.num_heads / tp_size;
  s.head_begin = tp_rank * s.num_heads;
  if (c.num_kv_heads >= tp_size) {
    s.num_kv_heads = c.num_kv_heads / tp_size;
    s.kv_head_begin = tp_rank * s.num_kv_heads;
  } else {
    s.num_kv_heads = 1;
    s.kv_head_begin = tp_rank / (tp_size / c.num_kv_heads);
  }
  s.inter_size = c.intermediate_size / tp_size;
  s.inter_begin = tp_rank * s.inter_size;
  s.vocab_size = c.vocab_size;
  if (shard_lm_head && tp_size > 1) {
    if (c.vocab_size % tp_size != 0) {
      return absl::InvalidArgumentError(absl::StrCat("cannot shard the LM head: tensor parallelism ",
                                                     tp_size, " does not divide vocab_size ",
                                                     c.vocab_size));
    }
    s.lm_head_sharded = true;
    s.vocab_size = c.vocab_size / tp_size;
    s.vocab_begin = tp_rank * s.vocab_size;
  }
  return s;
}

absl::StatusOr<ModelWeights> LoadWeights(const ModelConfig& config, const CheckpointReader& reader,
                                         const ShardLayout& shard, Backend& backend,
                                         const WeightsProgress& progress) {
  std::unique_ptr<WeightSource> src = weights_internal::NewFileSource(reader, backend, progress);
  return Loader(config, shard, backend, *src).Load();
}

absl::StatusOr<ModelWeights> RandomWeights(const ModelConfig& config, uint64_t seed,
                                           const ShardLayout& shard, Backend& backend,
                                           const WeightsProgress& progress) {
  std::unique_ptr<WeightSource> src = weights_internal::NewRandomSource(seed, backend, progress);
  return Loader(config, shard, backend, *src).Load();
}

}  // namespace lorc
