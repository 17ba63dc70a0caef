#include "model/weights.h"

#include <cmath>
#include <algorithm>
#include <functional>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/dtype.h"
#include "common/status_macros.h"

namespace lorc {
namespace {

// Where the rows (or columns) of one full tensor come from, for the random and file sources.
class WeightSource {
 public:
  virtual ~WeightSource() = default;
  // Fills `out` with rows [r0, r0 + nrows) x columns [c0, c0 + ncols) of tensor `name` whose full
  // shape is `shape` (1-D tensors: shape {n}, rows only).
  virtual absl::Status Read(const std::string& name, std::vector<int64_t> shape, int64_t r0,
                            int64_t nrows, int64_t c0, int64_t ncols, float* out) = 0;
};

class FileSource final : public WeightSource {
 public:
  explicit FileSource(const CheckpointReader& r) : reader_(r) {}
  absl::Status Read(const std::string& name, std::vector<int64_t> shape, int64_t r0, int64_t nrows,
                    int64_t c0, int64_t ncols, float* out) override {
    const int64_t full_cols = shape.size() > 1 ? shape[1] : 1;
    const bool full_rows = r0 == 0 && nrows == shape[0];
    const bool full_cols_sel = c0 == 0 && ncols == full_cols;
    const size_t n = static_cast<size_t>(nrows * ncols);
    if (full_rows && full_cols_sel) return reader_.ReadF32(name, shape, absl::MakeSpan(out, n));
    if (full_cols_sel) {
      return reader_.ReadF32Slice(name, shape, TensorSlice{0, r0, r0 + nrows}, absl::MakeSpan(out, n));
    }
    if (full_rows) {
      return reader_.ReadF32Slice(name, shape, TensorSlice{1, c0, c0 + ncols}, absl::MakeSpan(out, n));
    }
    return absl::InternalError("row and column slice at once");
  }

 private:
  const CheckpointReader& reader_;
};

uint64_t SplitMix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// Runs fn(begin, end) over [0, n) split across the cores when n * work_per_item is large.
template <typename Fn>
void ParallelFor(int64_t n, int64_t work_per_item, Fn fn) {
  const int64_t threads = std::min<int64_t>(
      std::max<unsigned>(1, std::thread::hardware_concurrency()), (n * work_per_item) >> 20);
  if (threads <= 1) {
    fn(int64_t{0}, n);
    return;
  }
  std::vector<std::thread> pool;
  for (int64_t t = 0; t < threads; ++t) pool.emplace_back(fn, n * t / threads, n * (t + 1) / threads);
  for (std::thread& th : pool) th.join();
}

class RandomSource final : public WeightSource {
 public:
  explicit RandomSource(uint64_t seed) : seed_(seed) {}
  absl::Status Read(const std::string& name, std::vector<int64_t> shape, int64_t r0, int64_t nrows,
                    int64_t c0, int64_t ncols, float* out) override {
    const bool is_norm = shape.size() == 1;
    if (is_norm) {
      for (int64_t i = 0; i < nrows; ++i) out[i] = 1.0f;
      return absl::OkStatus();
    }
    const uint64_t key = SplitMix64(seed_ ^ std::hash<std::string>{}(name));
    const int64_t full_cols = shape[1];
    // Uniform on [-a, a] with a = 0.02 * sqrt(3): standard deviation 0.02.
    const float a = 0.02f * std::sqrt(3.0f);
    auto fill_rows = [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        for (int64_t c = 0; c < ncols; ++c) {
          const uint64_t idx = static_cast<uint64_t>((r0 + r) * full_cols + (c0 + c));
          const uint64_t h = SplitMix64(key + idx);
          const float u = static_cast<float>(h >> 40) * (1.0f / 16777216.0f);  // [0, 1)
          out[r * ncols + c] = (2.0f * u - 1.0f) * a;
        }
      }
    };
    // Each value depends only on (seed, name, index): split over the cores (an 8B-shaped model
    // is 8e9 values) with the same result as one thread.
    ParallelFor(nrows, ncols, fill_rows);
    return absl::OkStatus();
  }

 private:
  uint64_t seed_;
};

class Loader {
 public:
  Loader(const ModelConfig& c, const ShardLayout& s, Backend& b, WeightSource& src)
      : c_(c), s_(s), b_(b), src_(src), dtype_(b.compute_dtype()) {}

  absl::StatusOr<ModelWeights> Load() {
    if (dtype_ != DType::kF32 && dtype_ != DType::kBF16) {
      return absl::UnimplementedError(absl::StrCat("weights: ", DTypeName(dtype_),
                                                   " on the device not implemented (F32, BF16)"));
    }
    ModelWeights w;
    w.shard = s_;
    w.dtype = dtype_;
    const int64_t d = c_.hidden_size;
    ASSIGN_OR_RETURN(w.embed, Full("model.embed_tokens.weight", {c_.vocab_size, d}));
    ASSIGN_OR_RETURN(w.final_norm, Full("model.norm.weight", {d}));
    const std::string head = c_.tie_word_embeddings ? "model.embed_tokens.weight" : "lm_head.weight";
    if (s_.lm_head_sharded) {
      std::vector<float> rows;
      RETURN_IF_ERROR(AppendRows(head, c_.vocab_size, d, s_.vocab_begin, s_.vocab_size, rows));
      ASSIGN_OR_RETURN(w.lm_head, Upload(rows));
    } else if (!c_.tie_word_embeddings) {
      ASSIGN_OR_RETURN(w.lm_head, Full(head, {c_.vocab_size, d}));
    }
    for (int64_t l = 0; l < c_.num_layers; ++l) {
      ASSIGN_OR_RETURN(LayerWeights lw, Layer(l));
      w.layers.push_back(std::move(lw));
    }
    return w;
  }

 private:
  // Host fp32 values -> a device buffer of dtype_ (BF16: rounded to nearest even on the host).
  absl::StatusOr<DeviceBuffer> Upload(const std::vector<float>& host) {
    const size_t bytes = host.size() * DTypeSize(dtype_);
    ASSIGN_OR_RETURN(DeviceBuffer buf, b_.Allocate(bytes));
    if (dtype_ == DType::kBF16) {
      bf16_.resize(host.size());
      ParallelFor(static_cast<int64_t>(host.size()), 1, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) bf16_[i] = F32ToBf16(host[i]);
      });
      RETURN_IF_ERROR(b_.CopyToDevice(buf.data(), bf16_.data(), bytes));
    } else {
      RETURN_IF_ERROR(b_.CopyToDevice(buf.data(), host.data(), bytes));
    }
    return buf;
  }

  absl::StatusOr<DeviceBuffer> Full(const std::string& name, std::vector<int64_t> shape) {
    const int64_t cols = shape.size() > 1 ? shape[1] : 1;
    std::vector<float> host(static_cast<size_t>(shape[0] * cols));
    RETURN_IF_ERROR(src_.Read(name, shape, 0, shape[0], 0, cols, host.data()));
    return Upload(host);
  }

  // Appends rows [r0, r0 + n) of a [rows, cols] tensor to `host`.
  absl::Status AppendRows(const std::string& name, int64_t rows, int64_t cols, int64_t r0, int64_t n,
                          std::vector<float>& host) {
    const size_t at = host.size();
    host.resize(at + static_cast<size_t>(n * cols));
    return src_.Read(name, {rows, cols}, r0, n, 0, cols, host.data() + at);
  }

  absl::StatusOr<LayerWeights> Layer(int64_t l) {
    const std::string p = absl::StrCat("model.layers.", l, ".");
    const int64_t d = c_.hidden_size, hd = c_.head_dim;
    LayerWeights lw;
    ASSIGN_OR_RETURN(lw.input_norm, Full(p + "input_layernorm.weight", {d}));
    ASSIGN_OR_RETURN(lw.post_norm, Full(p + "post_attention_layernorm.weight", {d}));

    std::vector<float> qkv;
    RETURN_IF_ERROR(AppendRows(p + "self_attn.q_proj.weight", c_.q_size(), d, s_.head_begin * hd,
                               s_.num_heads * hd, qkv));
    RETURN_IF_ERROR(AppendRows(p + "self_attn.k_proj.weight", c_.kv_size(), d,
                               s_.kv_head_begin * hd, s_.num_kv_heads * hd, qkv));
    RETURN_IF_ERROR(AppendRows(p + "self_attn.v_proj.weight", c_.kv_size(), d,
                               s_.kv_head_begin * hd, s_.num_kv_heads * hd, qkv));
    ASSIGN_OR_RETURN(lw.qkv, Upload(qkv));

    std::vector<float> o(static_cast<size_t>(d * s_.num_heads * hd));
    RETURN_IF_ERROR(src_.Read(p + "self_attn.o_proj.weight", {d, c_.q_size()}, 0, d,
                              s_.head_begin * hd, s_.num_heads * hd, o.data()));
    ASSIGN_OR_RETURN(lw.o, Upload(o));

    const int64_t inter = c_.intermediate_size;
    std::vector<float> gate_up;
    RETURN_IF_ERROR(AppendRows(p + "mlp.gate_proj.weight", inter, d, s_.inter_begin, s_.inter_size, gate_up));
    RETURN_IF_ERROR(AppendRows(p + "mlp.up_proj.weight", inter, d, s_.inter_begin, s_.inter_size, gate_up));
    ASSIGN_OR_RETURN(lw.gate_up, Upload(gate_up));

    std::vector<float> down(static_cast<size_t>(d * s_.inter_size));
    RETURN_IF_ERROR(src_.Read(p + "mlp.down_proj.weight", {d, inter}, 0, d, s_.inter_begin,
                              s_.inter_size, down.data()));
    ASSIGN_OR_RETURN(lw.down, Upload(down));
    return lw;
  }

  const ModelConfig& c_;
  const ShardLayout& s_;
  Backend& b_;
  WeightSource& src_;
  DType dtype_;                  // on the device: the backend's compute dtype
  std::vector<uint16_t> bf16_;   // staging for BF16 uploads (pageable: consumed by CopyToDevice)
};

}  // namespace

absl::StatusOr<ShardLayout> ShardLayout::Make(const ModelConfig& c, int32_t tp_rank,
                                              int32_t tp_size, bool shard_lm_head) {
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
                                         const ShardLayout& shard, Backend& backend) {
  FileSource src(reader);
  return Loader(config, shard, backend, src).Load();
}

absl::StatusOr<ModelWeights> RandomWeights(const ModelConfig& config, uint64_t seed,
                                           const ShardLayout& shard, Backend& backend) {
  RandomSource src(seed);
  return Loader(config, shard, backend, src).Load();
}

}  // namespace lorc
