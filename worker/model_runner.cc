#include "worker/model_runner.h"

#include <algorithm>
#include <cmath>
#include <utility>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "worker/comm/communicator.h"

namespace lorc {

absl::StatusOr<std::unique_ptr<ModelRunner>> ModelRunner::Create(const ModelConfig& config,
                                                                 ModelWeights weights,
                                                                 Backend* backend,
                                                                 Communicator* comm,
                                                                 const KvCacheOptions& kv) {
  if (weights.shard.tp_size > 1 && comm == nullptr) {
    return absl::InvalidArgumentError("tensor parallelism > 1 needs a communicator");
  }
  std::unique_ptr<ModelRunner> r(new ModelRunner(config, std::move(weights), backend, comm));
  RETURN_IF_ERROR(r->Init(kv));
  return r;
}

absl::Status ModelRunner::Init(const KvCacheOptions& kv) {
  kv_spec_.block_size = kv.block_size;
  kv_spec_.dtype = DType::kF32;
  const int64_t width = weights_.shard.num_kv_heads * config_.head_dim;
  kv_spec_.k_width.assign(config_.num_layers, width);
  kv_spec_.v_width.assign(config_.num_layers, width);
  if (kv.block_size <= 0) return absl::InvalidArgumentError("kv cache: block_size must be positive");
  kv_spec_.num_blocks = kv.num_blocks > 0
                            ? kv.num_blocks
                            : static_cast<int32_t>(kv.memory_bytes / kv_spec_.BytesPerBlock());
  if (kv_spec_.num_blocks <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("kv cache: ", kv.memory_bytes,
                                                   " bytes hold no block of ",
                                                   kv_spec_.BytesPerBlock(), " bytes"));
  }
  RETURN_IF_ERROR(kv_spec_.Validate());
  for (int l = 0; l < kv_spec_.num_layers(); ++l) {
    const size_t slots = static_cast<size_t>(kv_spec_.num_blocks) * kv_spec_.block_size;
    ASSIGN_OR_RETURN(DeviceBuffer k, backend_->Allocate(slots * kv_spec_.k_width[l] * sizeof(float)));
    ASSIGN_OR_RETURN(DeviceBuffer v, backend_->Allocate(slots * kv_spec_.v_width[l] * sizeof(float)));
    k_cache_.push_back(std::move(k));
    v_cache_.push_back(std::move(v));
  }
  const std::vector<float> inv_freq = RopeInverseFrequencies(config_);
  ASSIGN_OR_RETURN(inv_freq_, backend_->Allocate(inv_freq.size() * sizeof(float)));
  return backend_->CopyToDevice(inv_freq_.data(), inv_freq.data(), inv_freq.size() * sizeof(float));
}

absl::Status ModelRunner::Validate(absl::Span<const SequenceStep> steps) const {
  absl::flat_hash_set<int64_t> seen;
  for (const SequenceStep& s : steps) {
    if (!seen.insert(s.seq_id).second) {
      return absl::InvalidArgumentError(absl::StrCat("sequence ", s.seq_id, " appears twice in one step"));
    }
    if (s.tokens.empty()) {
      return absl::InvalidArgumentError(absl::StrCat("sequence ", s.seq_id, ": no tokens to compute"));
    }
    if (s.num_cached < 0) {
      return absl::InvalidArgumentError(absl::StrCat("sequence ", s.seq_id, ": negative num_cached"));
    }
    for (int32_t t : s.tokens) {
      if (t < 0 || t >= config_.vocab_size) {
        return absl::InvalidArgumentError(absl::StrCat("sequence ", s.seq_id, ": token id ", t,
                                                       " outside the vocabulary [0, ",
                                                       config_.vocab_size, ")"));
      }
    }
    const int64_t total = s.num_cached + static_cast<int64_t>(s.tokens.size());
    if (total > config_.max_position_embeddings) {
      return absl::InvalidArgumentError(absl::StrCat("sequence ", s.seq_id, ": ", total,
                                                     " tokens exceed the model context of ",
                                                     config_.max_position_embeddings));
    }
    const int64_t need = kv_spec_.BlocksForTokens(total);
    if (static_cast<int64_t>(s.block_table.size()) < need) {
      return absl::InvalidArgumentError(absl::StrCat("sequence ", s.seq_id, ": block table has ",
                                                     s.block_table.size(), " blocks, ", total,
                                                     " tokens need ", need));
    }
    for (int64_t i = 0; i < need; ++i) {
      const int32_t b = s.block_table[i];
      if (b < 0 || b >= kv_spec_.num_blocks) {
        return absl::InvalidArgumentError(absl::StrCat("sequence ", s.seq_id, ": block id ", b,
                                                       " outside the cache of ",
                                                       kv_spec_.num_blocks, " blocks"));
      }
    }
  }
  return absl::OkStatus();
}

absl::Status ModelRunner::EnsureScratch(int64_t t, int64_t r, int64_t meta_ints) {
  auto grow = [&](DeviceBuffer& b, int64_t elems, size_t esz) -> absl::Status {
    const size_t bytes = static_cast<size_t>(std::max<int64_t>(elems, 1)) * esz;
    if (b.bytes() >= bytes) return absl::OkStatus();
    b.Reset();
    ASSIGN_OR_RETURN(b, backend_->Allocate(bytes));
    return absl::OkStatus();
  };
  const ShardLayout& s = weights_.shard;
  const int64_t d = config_.hidden_size, hd = config_.head_dim;
  if (t > cap_tokens_) {
    const int64_t cap = std::max<int64_t>(t, 2 * cap_tokens_);
    RETURN_IF_ERROR(grow(x_, cap * d, 4));
    RETURN_IF_ERROR(grow(h_, cap * d, 4));
    RETURN_IF_ERROR(grow(qkv_, cap * (s.num_heads + 2 * s.num_kv_heads) * hd, 4));
    RETURN_IF_ERROR(grow(attn_, cap * s.num_heads * hd, 4));
    RETURN_IF_ERROR(grow(gate_up_, cap * 2 * s.inter_size, 4));
    RETURN_IF_ERROR(grow(act_, cap * s.inter_size, 4));
    cap_tokens_ = cap;
  }
  if (r > cap_rows_) {
    const int64_t cap = std::max<int64_t>(r, 2 * cap_rows_);
    RETURN_IF_ERROR(grow(rows_, cap * d, 4));
    RETURN_IF_ERROR(grow(logits_, cap * config_.vocab_size, 4));
    if (s.lm_head_sharded) RETURN_IF_ERROR(grow(logits_local_, cap * s.vocab_size, 4));
    cap_rows_ = cap;
  }
  if (meta_ints > cap_meta_) {
    const int64_t cap = std::max<int64_t>(meta_ints, 2 * cap_meta_);
    RETURN_IF_ERROR(grow(meta_, cap, 4));
    cap_meta_ = cap;
  }
  return absl::OkStatus();
}

absl::Status ModelRunner::AllReduce(Tensor2D t) {
  if (comm_ == nullptr || weights_.shard.tp_size == 1) return absl::OkStatus();
  return comm_->AllReduceSum(t.as<float>(), static_cast<size_t>(t.rows * t.cols));
}

Tensor2D ModelRunner::Weight(const DeviceBuffer& b, int64_t rows, int64_t cols) const {
  return Tensor2D{b.data(), weights_.dtype, rows, cols, cols};
}

absl::StatusOr<StepOutput> ModelRunner::Execute(absl::Span<const SequenceStep> steps) {
  RETURN_IF_ERROR(Validate(steps));
  const int32_t bs = kv_spec_.block_size;
  const int32_t num_seqs = static_cast<int32_t>(steps.size());

  // Host-side step metadata: ids, positions, slots, query offsets, context lengths, block
  // tables and the rows whose logits are wanted, laid out in one int32 array.
  int64_t num_tokens = 0;
  int32_t max_blocks = 1, max_ctx = 0;
  for (const SequenceStep& s : steps) {
    num_tokens += static_cast<int64_t>(s.tokens.size());
    const int64_t ctx = s.num_cached + static_cast<int64_t>(s.tokens.size());
    max_blocks = std::max(max_blocks, kv_spec_.BlocksForTokens(ctx));
    max_ctx = std::max<int32_t>(max_ctx, static_cast<int32_t>(ctx));
  }
  std::vector<int32_t> ids, positions, slots, qstart{0}, ctx_len, tables, logit_rows;
  ids.reserve(num_tokens);
  positions.reserve(num_tokens);
  slots.reserve(num_tokens);
  tables.assign(static_cast<size_t>(num_seqs) * max_blocks, 0);
  StepOutput out;
  out.vocab_size = config_.vocab_size;
  for (int32_t i = 0; i < num_seqs; ++i) {
    const SequenceStep& s = steps[i];
    const int64_t n = static_cast<int64_t>(s.tokens.size());
    for (int64_t j = 0; j < n; ++j) {
      const int64_t pos = s.num_cached + j;
      ids.push_back(s.tokens[j]);
      positions.push_back(static_cast<int32_t>(pos));
      slots.push_back(s.block_table[pos / bs] * bs + static_cast<int32_t>(pos % bs));
    }
    const int64_t ctx = s.num_cached + n;
    const int32_t nb = kv_spec_.BlocksForTokens(ctx);
    std::copy(s.block_table.begin(), s.block_table.begin() + nb,
              tables.begin() + static_cast<int64_t>(i) * max_blocks);
    ctx_len.push_back(static_cast<int32_t>(ctx));
    out.row_begin.push_back(static_cast<int32_t>(logit_rows.size()));
    const int32_t row0 = qstart.back();
    if (s.logits == SequenceStep::Logits::kAll) {
      for (int64_t j = 0; j < n; ++j) logit_rows.push_back(row0 + static_cast<int32_t>(j));
    } else if (s.logits == SequenceStep::Logits::kLast) {
      logit_rows.push_back(row0 + static_cast<int32_t>(n - 1));
    }
    qstart.push_back(row0 + static_cast<int32_t>(n));
  }
  out.row_begin.push_back(static_cast<int32_t>(logit_rows.size()));
  const int64_t num_rows = static_cast<int64_t>(logit_rows.size());

  std::vector<int32_t> meta;
  auto append = [&meta](const std::vector<int32_t>& v) {
    const size_t at = meta.size();
    meta.insert(meta.end(), v.begin(), v.end());
    return at;
  };
  const size_t o_ids = append(ids), o_pos = append(positions), o_slots = append(slots),
               o_qstart = append(qstart), o_ctx = append(ctx_len), o_tables = append(tables),
               o_rows = append(logit_rows);
  RETURN_IF_ERROR(EnsureScratch(num_tokens, num_rows, static_cast<int64_t>(meta.size())));
  RETURN_IF_ERROR(backend_->CopyToDevice(meta_.data(), meta.data(), meta.size() * sizeof(int32_t)));
  const int32_t* dmeta = meta_.as<int32_t>();

  const ShardLayout& sh = weights_.shard;
  const int64_t d = config_.hidden_size, hd = config_.head_dim;
  const int64_t q_sz = sh.num_heads * hd, kv_sz = sh.num_kv_heads * hd;
  const int64_t T = num_tokens;
  Tensor2D x{x_.data(), DType::kF32, T, d, d};
  Tensor2D h{h_.data(), DType::kF32, T, d, d};
  Tensor2D qkv{qkv_.data(), DType::kF32, T, q_sz + 2 * kv_sz, q_sz + 2 * kv_sz};
  Tensor2D attn{attn_.data(), DType::kF32, T, q_sz, q_sz};
  Tensor2D gate_up{gate_up_.data(), DType::kF32, T, 2 * sh.inter_size, 2 * sh.inter_size};
  Tensor2D act{act_.data(), DType::kF32, T, sh.inter_size, sh.inter_size};
  const Tensor2D q = qkv.ColSlice(0, q_sz), k = qkv.ColSlice(q_sz, kv_sz),
                 v = qkv.ColSlice(q_sz + kv_sz, kv_sz);

  AttentionParams ap;
  ap.q = q;
  ap.out = attn;
  ap.num_heads = static_cast<int32_t>(sh.num_heads);
  ap.num_kv_heads = static_cast<int32_t>(sh.num_kv_heads);
  ap.head_dim = static_cast<int32_t>(hd);
  ap.scale = 1.0f / std::sqrt(static_cast<float>(hd));
  ap.batch = AttentionBatch{num_seqs, static_cast<int32_t>(T), max_ctx, dmeta + o_qstart,
                            dmeta + o_ctx, dmeta + o_tables, max_blocks, bs};
  RopeParams rq{q, ap.num_heads, ap.head_dim, dmeta + o_pos, inv_freq_.as<float>()};
  RopeParams rk{k, ap.num_kv_heads, ap.head_dim, dmeta + o_pos, inv_freq_.as<float>()};

  const float eps = static_cast<float>(config_.rms_norm_eps);
  RETURN_IF_ERROR(backend_->Embedding(Weight(weights_.embed, config_.vocab_size, d), dmeta + o_ids, x));
  for (int64_t l = 0; l < config_.num_layers; ++l) {
    const LayerWeights& w = weights_.layers[l];
    RETURN_IF_ERROR(backend_->RmsNorm(x, Weight(w.input_norm, 1, d), eps, h));
    RETURN_IF_ERROR(backend_->Matmul(h, Weight(w.qkv, q_sz + 2 * kv_sz, d), qkv));
    RETURN_IF_ERROR(backend_->Rope(rq));
    RETURN_IF_ERROR(backend_->Rope(rk));
    ap.cache = KvLayer{k_cache_[l].data(), v_cache_[l].data(), kv_spec_.k_width[l],
                       kv_spec_.v_width[l], kv_spec_.dtype};
    RETURN_IF_ERROR(backend_->WriteKv(ap.cache, k, v, dmeta + o_slots, bs));
    RETURN_IF_ERROR(backend_->PagedAttention(ap));
    RETURN_IF_ERROR(backend_->Matmul(attn, Weight(w.o, d, q_sz), h));
    RETURN_IF_ERROR(AllReduce(h));
    RETURN_IF_ERROR(backend_->AddInPlace(x, h));
    RETURN_IF_ERROR(backend_->RmsNorm(x, Weight(w.post_norm, 1, d), eps, h));
    RETURN_IF_ERROR(backend_->Matmul(h, Weight(w.gate_up, 2 * sh.inter_size, d), gate_up));
    RETURN_IF_ERROR(backend_->SiluMul(gate_up, act));
    RETURN_IF_ERROR(backend_->Matmul(act, Weight(w.down, d, sh.inter_size), h));
    RETURN_IF_ERROR(AllReduce(h));
    RETURN_IF_ERROR(backend_->AddInPlace(x, h));
  }
  if (num_rows > 0) {
    Tensor2D rows{rows_.data(), DType::kF32, num_rows, d, d};
    RETURN_IF_ERROR(backend_->GatherRows(x, dmeta + o_rows, rows));
    RETURN_IF_ERROR(backend_->RmsNorm(rows, Weight(weights_.final_norm, 1, d), eps, rows));
    RETURN_IF_ERROR(ComputeLogits(rows, &out));
  }
  RETURN_IF_ERROR(backend_->Synchronize());
  return out;
}

absl::Status ModelRunner::ComputeLogits(const Tensor2D& rows, StepOutput* out) {
  const int64_t n = rows.rows, vocab = config_.vocab_size, d = config_.hidden_size;
  const ShardLayout& sh = weights_.shard;
  out->logits.resize(static_cast<size_t>(n * vocab));
  Tensor2D full{logits_.data(), DType::kF32, n, vocab, vocab};
  if (!sh.lm_head_sharded) {
    RETURN_IF_ERROR(backend_->Matmul(rows, Weight(weights_.lm_head_or_embed(), vocab, d), full));
    return backend_->CopyToHost(out->logits.data(), full.data, out->logits.size() * sizeof(float));
  }
  // Each rank: logits of its vocabulary slice [n, V/tp]; the all-gather stacks the slices rank
  // by rank ([tp][n][V/tp]), then the host puts each row's slices side by side.
  const int64_t vl = sh.vocab_size;
  Tensor2D local{logits_local_.data(), DType::kF32, n, vl, vl};
  RETURN_IF_ERROR(backend_->Matmul(rows, Weight(weights_.lm_head, vl, d), local));
  RETURN_IF_ERROR(comm_->AllGather(local.as<float>(), full.as<float>(), static_cast<size_t>(n * vl)));
  std::vector<float> gathered(static_cast<size_t>(n * vocab));
  RETURN_IF_ERROR(backend_->CopyToHost(gathered.data(), full.data, gathered.size() * sizeof(float)));
  for (int64_t r = 0; r < sh.tp_size; ++r) {
    for (int64_t i = 0; i < n; ++i) {
      std::copy_n(gathered.data() + (r * n + i) * vl, vl, out->logits.data() + i * vocab + r * vl);
    }
  }
  return absl::OkStatus();
}

absl::Status ModelRunner::CopyBlocks(absl::Span<const BlockCopy> copies) {
  // Check every copy before doing any, so a bad one changes nothing.
  for (size_t i = 0; i < copies.size(); ++i) {
    for (auto [field, b] : {std::pair{"src", copies[i].src}, std::pair{"dst", copies[i].dst}}) {
      if (b < 0 || b >= kv_spec_.num_blocks) {
        return absl::InvalidArgumentError(absl::StrCat("block copy ", i, ": ", field, " block ", b,
                                                       " outside the cache of ",
                                                       kv_spec_.num_blocks, " blocks"));
      }
    }
  }
  for (const BlockCopy& c : copies) {
    for (int l = 0; l < kv_spec_.num_layers(); ++l) {
      const KvLayer layer{k_cache_[l].data(), v_cache_[l].data(), kv_spec_.k_width[l],
                          kv_spec_.v_width[l], kv_spec_.dtype};
      RETURN_IF_ERROR(backend_->CopyBlock(layer, kv_spec_.block_size, c.src, c.dst));
    }
  }
  return absl::OkStatus();
}

}  // namespace lorc
