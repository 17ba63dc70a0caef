#include "worker/model_runner.h"

#include "kvpolicy/state_memory.h"

#include <algorithm>
#include <cmath>
#include <limits>
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
                                                                 const KvCacheSpec& spec,
                                                                 const KvCacheOptions& kv) {
  if (weights.shard.tp_size > 1 && comm == nullptr) {
    return absl::InvalidArgumentError("tensor parallelism > 1 needs a communicator");
  }
  std::unique_ptr<ModelRunner> r(new ModelRunner(config, std::move(weights), backend, comm));
  RETURN_IF_ERROR(r->Init(spec, kv));
  return r;
}

absl::Status ModelRunner::Init(const KvCacheSpec& spec, const KvCacheOptions& kv) {
  limits_ = kv;
  if (limits_.max_model_len == 0) {
    limits_.max_model_len = static_cast<int32_t>(
        std::min<int64_t>(config_.max_position_embeddings, std::numeric_limits<int32_t>::max()));
  }
  if (limits_.max_num_seqs <= 0 || limits_.max_num_batched_tokens <= 0 || limits_.max_model_len <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "step limits must be positive: max_num_seqs ", limits_.max_num_seqs,
        ", max_num_batched_tokens ", limits_.max_num_batched_tokens, ", max_model_len ",
        limits_.max_model_len));
  }
  if (limits_.max_model_len > config_.max_position_embeddings) {
    return absl::InvalidArgumentError(absl::StrCat("max_model_len ", limits_.max_model_len,
                                                   " exceeds the model context of ",
                                                   config_.max_position_embeddings));
  }
  if (kv.gpu_memory_utilization < 0 || kv.gpu_memory_utilization > 1) {
    return absl::InvalidArgumentError(absl::StrCat("gpu_memory_utilization ",
                                                   kv.gpu_memory_utilization, " outside [0, 1]"));
  }
  kv_spec_ = spec;
  RETURN_IF_ERROR(kv_spec_.Validate());
  // One dtype per op: activations and the cache in the weights' dtype (the backend's
  // compute_dtype(): F32 on the CPU, BF16 on CUDA); logits are F32 everywhere.
  act_dtype_ = weights_.dtype;
  // --kv-cache-dtype other than auto stores BF16 or quantized codes (the backend converts).
  if (kv_spec_.kv_cache_dtype == KvCacheDtype::kAuto && kv_spec_.dtype != act_dtype_) {
    return absl::InvalidArgumentError(absl::StrCat("kv spec dtype ", DTypeName(kv_spec_.dtype),
                                                   " differs from the weights' ",
                                                   DTypeName(act_dtype_)));
  }
  if (kv_spec_.quant() != kernels::KvQuant::kNone && !backend_->SupportsQuantizedKvCache()) {
    return absl::UnimplementedError(absl::StrCat(
        "--kv-cache-dtype ", KvCacheDtypeName(kv_spec_.kv_cache_dtype), ": the ", backend_->name(),
        " backend does not implement quantized KV caches (auto or bf16 there; cpu and cuda have all)"));
  }
  if (kv_spec_.num_layers() != config_.num_layers) {
    return absl::InvalidArgumentError(absl::StrCat("kv spec has ", kv_spec_.num_layers(),
                                                   " layers, the model ", config_.num_layers));
  }
  const int64_t full = weights_.shard.num_kv_heads * config_.head_dim;
  for (int l = 0; l < kv_spec_.num_layers(); ++l) {
    if (IsLatent(l)) {
      RETURN_IF_ERROR(CheckLatentLayer(l));  // model_runner_latent.cc
      continue;
    }
    if (kv_spec_.k_width[l] != full || kv_spec_.v_width[l] != full) {
      return absl::InvalidArgumentError(absl::StrCat("kv spec layer ", l, ": widths ",
                                                     kv_spec_.k_width[l], "/", kv_spec_.v_width[l],
                                                     ", this rank's KV heads need ", full));
    }
  }
  RETURN_IF_ERROR(InitKvPolicy(kv));
  max_blocks_per_seq_ = kv_spec_.BlocksForTokens(limits_.max_model_len);
  max_logit_rows_ = std::min(limits_.max_num_seqs, limits_.max_num_batched_tokens);
  RETURN_IF_ERROR(AllocateStepBuffers());
  RETURN_IF_ERROR(FoldNormWeights());
  const std::vector<float> inv_freq = RopeInverseFrequencies(config_);
  ASSIGN_OR_RETURN(inv_freq_, backend_->Allocate(inv_freq.size() * sizeof(float)));
  RETURN_IF_ERROR(backend_->CopyToDevice(inv_freq_.data(), inv_freq.data(), inv_freq.size() * sizeof(float)));
  int64_t reserve = 0;
  // A KV policy's steps run eagerly (its per-step lists and choice are not captured).
  const bool graphs = backend_->SupportsGraphs() && !kv.enforce_eager && kv_policy_ == nullptr;
  if (graphs) graph_sizes_ = DecodeGraphSizes(max_logit_rows_);
  if (graphs || backend_->TimesMatmulAtFirstUse()) {
    // Before the KV cache is sized, over a one-block probe cache (model_runner_graphs.cc).
    ASSIGN_OR_RETURN(std::vector<DeviceBuffer> probe, AttachProbeCache());
    if (backend_->TimesMatmulAtFirstUse()) RETURN_IF_ERROR(WarmUpMatmuls());
    if (graphs) {
      ASSIGN_OR_RETURN(reserve, MeasureGraphMemory());
    }
    kv_layers_.clear();
  }
  RETURN_IF_ERROR(AllocateCache(kv, reserve));
  RETURN_IF_ERROR(AllocateHostKv(kv));
  if (!graph_sizes_.empty()) RETURN_IF_ERROR(CaptureDecodeGraphs());
  return backend_->Synchronize();
}

ModelRunner::~ModelRunner() { (void)FinishHostKvTransfers(); }

absl::Status ModelRunner::InitKvPolicy(const KvCacheOptions& kv) {
  if (!kv.kv_policy.enabled()) return kvpolicy::ValidateKvPolicyConfig(kv.kv_policy);
  RETURN_IF_ERROR(kvpolicy::ValidateKvPolicyConfig(kv.kv_policy));
  if (!backend_->SupportsKvPolicy()) {
    return absl::UnimplementedError(absl::StrCat(
        "--kv-policy ", kvpolicy::KvPolicyKindName(kv.kv_policy.kind), ": the ", backend_->name(),
        " backend does not implement token-level KV policies yet (cpu does)"));
  }
  bool latent = false;
  for (int l = 0; l < kv_spec_.num_layers(); ++l) latent |= IsLatent(l);
  const int64_t group = weights_.shard.num_heads / std::max<int64_t>(weights_.shard.num_kv_heads, 1);
  RETURN_IF_ERROR(backend_->CheckKvPolicy(kv.kv_policy, kv_spec_.kv_cache_dtype, latent, static_cast<int32_t>(group)));
  const int64_t heads = weights_.shard.num_kv_heads;
  std::vector<kvpolicy::LayerShape> layers(kv_spec_.num_layers());
  for (int l = 0; l < kv_spec_.num_layers(); ++l) {
    layers[l].k_width = kv_spec_.k_width[l] / heads;
    layers[l].v_width = kv_spec_.v_width[l] / heads;
    layers[l].balance_keys = !IsLatent(l);
    layers[l].full_bytes = (kv_spec_.KBytesPerToken(l) + kv_spec_.VBytesPerToken(l)) / heads;
    const KvLayer cache = CacheLayer(l, nullptr, nullptr);
    layers[l].k_slot_bytes = KvHeadSlotBytes(cache, false);
    layers[l].v_slot_bytes = KvHeadSlotBytes(cache, true);
    // A packed low entry must fit in the slot region it replaces, or a demotion would need more
    // memory than it frees (and the coordinator's compaction bound would not hold).
    const int bits = kv.kv_policy.low_bits;
    const int64_t kb = kvpolicy::LowEntryBytes(layers[l].k_width, bits);
    const int64_t vb = kvpolicy::LowEntryBytes(layers[l].v_width, bits);
    if (kv.kv_policy.kind == kvpolicy::KvPolicyKind::kMikv &&
        (kb > layers[l].k_slot_bytes || vb > layers[l].v_slot_bytes)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--kv-policy mikv --kv-policy-low-bits ", bits, " with --kv-cache-dtype ",
          KvCacheDtypeName(kv_spec_.kv_cache_dtype), ": layer ", l, "'s low entries (", kb, " / ", vb,
          " bytes per KV head, K / V) are larger than its cache entries (", layers[l].k_slot_bytes,
          " / ", layers[l].v_slot_bytes, " bytes): demoting would save nothing (",
          bits > 2 ? "use --kv-policy-low-bits 2, a wider --kv-cache-dtype or --kv-policy corm"
                   : "use a wider --kv-cache-dtype or --kv-policy corm",
          ")"));
    }
  }
  if (backend_->KvPolicyOnDevice()) {
    // Their memory comes out of the KV budget (AllocateCache).
    kv_policy_positions_per_slot_ = kvpolicy::PositionsPerSlot(kv.kv_policy, layers);
    const bool mikv = kv.kv_policy.kind == kvpolicy::KvPolicyKind::kMikv;
    kv_policy_memory_ = backend_->KvPolicyMemory(int64_t{kv_spec_.num_layers()} * heads, mikv ? layers[0].k_width : 0,
                                                 mikv && latent, limits_.max_model_len, limits_.max_num_seqs);
  }
  kv_policy_ = std::make_unique<kvpolicy::KvPolicyStore>(kv.kv_policy, std::move(layers),
                                                          static_cast<int32_t>(heads), backend_->KvPolicyOnDevice());
  return absl::OkStatus();
}

absl::Status ModelRunner::AllocateHostKv(const KvCacheOptions& kv) {
  if (kv.kv_offloading_bytes < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("--kv-offloading-size: ", kv.kv_offloading_bytes, " bytes is negative"));
  }
  if (kv.kv_offloading_bytes == 0) return absl::OkStatus();
  const int64_t tp = std::max<int64_t>(1, weights_.shard.tp_size);
  const int64_t rank_bytes = kv.kv_offloading_bytes / tp;  // the group's share of this rank
  const int64_t slots = std::min<int64_t>(rank_bytes / kv_spec_.BytesPerBlock(),
                                          std::numeric_limits<int32_t>::max());
  if (slots <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--kv-offloading-size: ", kv.kv_offloading_bytes, " bytes over ", tp, " rank(s) leave ",
        rank_bytes, " a rank, less than one KV block of ", kv_spec_.BytesPerBlock(), " bytes"));
  }
  absl::StatusOr<HostKvStorage> host =
      backend_->CreateHostKvStorage(kv_layers_, kv_spec_.block_size, static_cast<int32_t>(slots));
  if (!host.ok()) {  // name the flag that sized it (the backend cannot)
    return absl::Status(host.status().code(),
                        absl::StrCat("--kv-offloading-size: ", slots, " host slots of ",
                                     kv_spec_.BytesPerBlock(), " bytes: ", host.status().message()));
  }
  host_kv_ = *std::move(host);
  return absl::OkStatus();
}

absl::Status ModelRunner::CheckHostKv(absl::Span<const HostBlockCopy> offloads,
                                      absl::Span<const HostBlockCopy> loads) const {
  if (offloads.empty() && loads.empty()) return absl::OkStatus();
  if (host_kv_.num_slots() == 0) {
    return absl::FailedPreconditionError(absl::StrCat(
        offloads.empty() ? "kv_loads" : "kv_offloads",
        ": this worker has no host KV tier (--kv-offloading-size 0)"));
  }
  RETURN_IF_ERROR(ValidateHostBlockCopies("kv_offloads", offloads, kv_spec_.num_blocks, host_kv_.num_slots()));
  return ValidateHostBlockCopies("kv_loads", loads, kv_spec_.num_blocks, host_kv_.num_slots());
}

absl::Status ModelRunner::CheckKvCompaction(int64_t seq_id, int64_t num_computed_tokens,
                                            int64_t num_slots) const {
  const kvpolicy::SequenceKvPolicy* st = kv_policy_ ? kv_policy_->Find(seq_id) : nullptr;
  if (st == nullptr || st->seq_len() != num_computed_tokens) {
    return absl::FailedPreconditionError(absl::StrCat(
        "sequence ", seq_id, ": no KV policy state of ", num_computed_tokens, " tokens on this worker (",
        kv_policy_ ? (st == nullptr ? "none" : absl::StrCat(st->seq_len(), " tokens")) : "no --kv-policy", ")"));
  }
  const int64_t from = st->CompactFrom(kv_spec_.block_size);
  const int64_t needed = st->SlotsNeeded(from);
  if (num_slots < needed || num_slots > st->num_slots()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "sequence ", seq_id, ": compaction to ", num_slots, " cache slots, its kept keys need ",
        needed, " on this worker and it holds ", st->num_slots()));
  }
  return absl::OkStatus();
}

absl::Status ModelRunner::CompactKv(int64_t seq_id, absl::Span<const int32_t> block_table,
                                    int64_t num_slots) {
  kvpolicy::SequenceKvPolicy* st = kv_policy_ ? kv_policy_->FindMutable(seq_id) : nullptr;
  if (st == nullptr) return absl::FailedPreconditionError(absl::StrCat("sequence ", seq_id, ": no KV policy state"));
  const int32_t bs = kv_spec_.block_size;
  if (static_cast<int64_t>(block_table.size()) < kv_spec_.BlocksForTokens(st->num_slots())) {
    return absl::InvalidArgumentError(absl::StrCat("sequence ", seq_id, ": block table of ",
                                                   block_table.size(), " blocks for ", st->num_slots(), " slots"));
  }
  if (st->on_device()) {  // the backend moves the keys, then the state takes the new slots
    const int64_t from = st->CompactFrom(bs);
    RETURN_IF_ERROR(st->CheckCompaction(from, num_slots));
    RETURN_IF_ERROR(backend_->KvPolicyCompact(*st, kv_layers_, bs, block_table, from));
    return st->MarkCompacted(from, num_slots);
  }
  std::vector<kvpolicy::SlotMove> moves;
  std::vector<kvpolicy::LowRepack> low;
  RETURN_IF_ERROR(st->Compact(st->CompactFrom(bs), num_slots, &moves, &low));
  const KvCacheCompaction c = ToCacheCompaction(*st, moves, low, block_table.data(), bs);
  return backend_->CompactKvHeads(kv_layers_, bs, kv_spec_.num_blocks, c.moves, c.runs, st->config().low_bits);
}

std::optional<KvSlotReport> ModelRunner::KvSlots(int64_t seq_id) const {
  const kvpolicy::SequenceKvPolicy* st = kv_policy_ ? kv_policy_->Find(seq_id) : nullptr;
  if (st == nullptr) return std::nullopt;
  const int64_t from = st->CompactFrom(kv_spec_.block_size);
  const kvpolicy::SequenceKvPolicy::CompactionCounts c = st->CountForCompaction(from);
  return KvSlotReport{seq_id, st->seq_len(), from, c.slots_needed, c.low_in_slots};
}

absl::Status ModelRunner::TransferHostKv(absl::Span<const HostBlockCopy> offloads,
                                         absl::Span<const HostBlockCopy> loads) {
  RETURN_IF_ERROR(FinishHostKvTransfers());  // a failed step may have left some
  if (offloads.empty() && loads.empty()) return absl::OkStatus();
  RETURN_IF_ERROR(CheckHostKv(offloads, loads));  // the tier, both lists, before anything is copied
  const int32_t bs = kv_spec_.block_size, nb = kv_spec_.num_blocks;
  if (!offloads.empty()) RETURN_IF_ERROR(backend_->OffloadKvBlocks(kv_layers_, bs, nb, host_kv_, offloads));
  if (!loads.empty()) RETURN_IF_ERROR(backend_->LoadKvBlocks(kv_layers_, bs, nb, host_kv_, loads));
  host_kv_pending_ = true;
  for (const HostBlockCopy& c : offloads) host_kv_offloaded_.insert(c.block);
  for (const HostBlockCopy& c : loads) host_kv_loaded_.insert(c.block);
  return absl::OkStatus();
}

void ModelRunner::ForgetHostKvBlocks() {
  host_kv_offloaded_.clear();
  host_kv_loaded_.clear();
}

absl::Status ModelRunner::WaitHostKvBefore(absl::Span<const SequenceStep> steps) {
  if (!host_kv_pending_ || (host_kv_loaded_.empty() && host_kv_offloaded_.empty())) {
    return absl::OkStatus();
  }
  // A loaded block must have arrived before the forward reads (or writes) it; an offloaded one
  // must have left before the forward writes it. Other copies overlap with the forward pass
  // (e.g. a load for a request scheduled in the next step).
  bool wait = false;
  const int32_t bs = kv_spec_.block_size;
  for (size_t i = 0; i < steps.size() && !wait; ++i) {
    const SequenceStep& s = steps[i];
    if (s.tokens.empty()) continue;
    const int64_t end = s.num_computed_tokens - s.slot_offset + static_cast<int64_t>(s.tokens.size());
    const int64_t first_written = (s.num_computed_tokens - s.slot_offset) / bs;
    for (int64_t b = 0; b < kv_spec_.BlocksForTokens(end) && !wait; ++b) {
      wait = host_kv_loaded_.contains(s.block_table[b]) ||
             (b >= first_written && host_kv_offloaded_.contains(s.block_table[b]));
    }
  }
  if (!wait) return absl::OkStatus();
  RETURN_IF_ERROR(backend_->WaitKvTransfers());
  ForgetHostKvBlocks();
  return absl::OkStatus();
}

absl::Status ModelRunner::FinishHostKvTransfers() {
  if (!host_kv_pending_) return absl::OkStatus();
  host_kv_pending_ = false;
  ForgetHostKvBlocks();
  return backend_->SynchronizeKvTransfers();
}

absl::Status ModelRunner::FoldNormWeights() {
  const int64_t rows = std::min<int64_t>(backend_->FoldedNormRows(), limits_.max_num_batched_tokens);
  if (rows <= 0 || weights_.dtype != DType::kBF16 || (comm_ != nullptr && weights_.shard.tp_size > 1)) {
    return absl::OkStatus();
  }
  const ShardLayout& sh = weights_.shard;
  const int64_t d = config_.hidden_size, hd = config_.head_dim;
  for (int64_t l = 0; l < config_.num_layers; ++l) {
    const LayerWeights& w = weights_.layers[l];
    if (!IsLatent(static_cast<int>(l))) {
      const int64_t n = (sh.num_heads + 2 * sh.num_kv_heads) * hd;
      RETURN_IF_ERROR(backend_->ScaleColumns(Weight(w.qkv, n, d), Weight(w.input_norm, 1, d)));
    }
    RETURN_IF_ERROR(backend_->ScaleColumns(Weight(w.gate_up, 2 * sh.inter_size, d), Weight(w.post_norm, 1, d)));
  }
  const std::vector<uint16_t> ones(d, 0x3f80);  // bf16 1.0
  ASSIGN_OR_RETURN(ones_, backend_->Allocate(ones.size() * sizeof(uint16_t)));
  RETURN_IF_ERROR(backend_->CopyToDevice(ones_.data(), ones.data(), ones.size() * sizeof(uint16_t)));
  ASSIGN_OR_RETURN(sum_squares_, backend_->Allocate(static_cast<size_t>(rows * ((d + 15) / 16)) * sizeof(float)));
  fold_rows_ = rows;
  return backend_->Synchronize();
}

absl::Status ModelRunner::AllocateStepBuffers() {
  const ShardLayout& s = weights_.shard;
  const int64_t T = limits_.max_num_batched_tokens, S = limits_.max_num_seqs, R = max_logit_rows_;
  const int64_t d = config_.hidden_size, hd = config_.head_dim;
  const size_t esz = DTypeSize(act_dtype_);
  auto alloc = [&](DeviceBuffer& b, int64_t elems, size_t elem_bytes) -> absl::Status {
    ASSIGN_OR_RETURN(b, backend_->Allocate(static_cast<size_t>(elems) * elem_bytes));
    return absl::OkStatus();
  };
  RETURN_IF_ERROR(alloc(x_, T * d, esz));
  fused_norm_rows_ = 0;
  while (fused_norm_rows_ < T && backend_->FusesNormMatmul(fused_norm_rows_ + 1)) ++fused_norm_rows_;
  if (fused_norm_rows_ > 0) RETURN_IF_ERROR(alloc(x_alt_, fused_norm_rows_ * d, esz));
  RETURN_IF_ERROR(alloc(h_, T * d, esz));
  // Sized for the widest layer (LoRC layers: latent K/V widths, r_v-wide attention outputs).
  int64_t qkv_cols = 0, attn_cols = 0;
  for (int l = 0; l < kv_spec_.num_layers(); ++l) {
    qkv_cols = std::max(qkv_cols, s.num_heads * hd + kv_spec_.k_width[l] + kv_spec_.v_width[l]);
    attn_cols = std::max(attn_cols, s.num_heads * (IsLatent(l) ? kv_spec_.v_rank[l] : hd));
  }
  RETURN_IF_ERROR(alloc(qkv_, T * qkv_cols, esz));
  RETURN_IF_ERROR(alloc(attn_, T * attn_cols, esz));
  RETURN_IF_ERROR(alloc(gate_up_, T * 2 * s.inter_size, esz));
  RETURN_IF_ERROR(alloc(act_, T * s.inter_size, esz));
  RETURN_IF_ERROR(alloc(rows_, R * d, esz));
  RETURN_IF_ERROR(alloc(logits_, R * config_.vocab_size, sizeof(float)));
  if (s.lm_head_sharded) {
    RETURN_IF_ERROR(alloc(logits_local_, R * s.vocab_size, sizeof(float)));
    RETURN_IF_ERROR(alloc(gathered_, R * config_.vocab_size, sizeof(float)));
    std::vector<int32_t> iota(static_cast<size_t>(s.tp_size * R));
    for (size_t i = 0; i < iota.size(); ++i) iota[i] = static_cast<int32_t>(i);
    RETURN_IF_ERROR(alloc(gather_iota_, static_cast<int64_t>(iota.size()), sizeof(int32_t)));
    RETURN_IF_ERROR(backend_->CopyToDevice(gather_iota_.data(), iota.data(),
                                           iota.size() * sizeof(int32_t)));  // pageable: staged
  }
  MetaLayout& m = meta_at_;
  m.ids = 0;
  m.positions = m.ids + T;
  m.slots = m.positions + T;
  m.query_start = m.slots + T;
  m.seq_lens = m.query_start + S + 1;
  m.tables = m.seq_lens + S;
  m.logit_rows = m.tables + S * max_blocks_per_seq_;
  m.drawn_pairs = m.logit_rows + T;  // (row, draw) pairs of SequenceStep::draw_index, at most S
  m.total = m.drawn_pairs + 2 * S;
  RETURN_IF_ERROR(alloc(meta_, m.total, sizeof(int32_t)));
  ASSIGN_OR_RETURN(meta_host_, backend_->AllocateHost(static_cast<size_t>(m.total) * sizeof(int32_t)));
  ASSIGN_OR_RETURN(meta_uploaded_, backend_->CreateEvent());
  ASSIGN_OR_RETURN(plan_, backend_->CreateAttentionPlan(
                              {limits_.max_num_seqs, limits_.max_num_batched_tokens, max_blocks_per_seq_}));
  return absl::OkStatus();
}

absl::Status ModelRunner::AllocateCache(const KvCacheOptions& kv, int64_t reserve_bytes) {
  if (kv.block_size != kv_spec_.block_size) {
    return absl::InvalidArgumentError(absl::StrCat("kv cache: block_size ", kv.block_size,
                                                   " differs from the spec's ", kv_spec_.block_size));
  }
  int64_t budget = kv.memory_bytes;
  if (kv.gpu_memory_utilization > 0) {
    const MemoryInfo mem = backend_->GetMemoryInfo();
    const int64_t used = mem.total_bytes - mem.free_bytes;
    budget = static_cast<int64_t>(static_cast<double>(mem.total_bytes) * kv.gpu_memory_utilization) - used -
             reserve_bytes - kv_policy_memory_.reserve_bytes;
    if (budget <= 0) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "kv cache: gpu_memory_utilization ", kv.gpu_memory_utilization, " of ", mem.total_bytes,
          " bytes leaves nothing after the ", used, " bytes in use (weights, step buffers, others), ",
          reserve_bytes, " bytes for decode graphs and ", kv_policy_memory_.reserve_bytes,
          " bytes for the KV policy's buffers"));
    }
  }
  // Device-resident KV policy states take kv_policy_positions_per_slot_ positions per slot out of
  // the same budget (kvpolicy/state_memory.h).
  const int64_t blocks = kv.num_blocks > 0 ? kv.num_blocks
                                           : kvpolicy::BlocksWithStates(budget, kv_spec_.BytesPerBlock(),
                                                                        kv_spec_.block_size,
                                                                        kv_policy_positions_per_slot_,
                                                                        kv_policy_memory_.bytes_per_position);
  kv_spec_.num_blocks = static_cast<int32_t>(std::min<int64_t>(blocks, std::numeric_limits<int32_t>::max()));
  if (kv_spec_.num_blocks <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "kv cache: ", budget, " bytes hold no block of ", kv_spec_.BytesPerBlock(), " bytes",
        kv_policy_memory_.bytes_per_position > 0
            ? absl::StrCat(" with its KV policy state (", kv_policy_positions_per_slot_, " positions of ",
                           kv_policy_memory_.bytes_per_position, " bytes per slot)")
            : ""));
  }
  if (kv_policy_memory_.bytes_per_position > 0) {
    kv_policy_max_positions_ =
        kvpolicy::MaxPositions(kv_spec_.num_blocks, kv_spec_.block_size, kv_policy_positions_per_slot_);
  }
  // A --num-blocks cache that cannot be held names the flag and its total size (the backend's
  // own message names only the bytes of one layer's buffer).
  const double kv_bytes = static_cast<double>(kv.num_blocks) * static_cast<double>(kv_spec_.BytesPerBlock());
  const std::string sized_by_flag = absl::StrCat("--num-blocks: ", kv.num_blocks, " KV blocks of ",
                                                 kv_spec_.BytesPerBlock(), " bytes (", kv_bytes / (1 << 30), " GiB)");
  if (kv.num_blocks > 0) {
    // Host memory is committed lazily: a --num-blocks cache larger than the machine would start
    // and be killed under load. Refused up front against the device's total memory, as
    // --kv-cache-mb is against the machine's (cli/session.cc).
    const MemoryInfo mem = backend_->GetMemoryInfo();
    if (mem.total_bytes > 0 && kv_bytes > static_cast<double>(mem.total_bytes)) {
      return absl::ResourceExhaustedError(absl::StrCat(sized_by_flag, " are more than this device's memory (",
                                                       mem.total_bytes / double{1 << 30}, " GiB)"));
    }
  }
  const size_t slots = static_cast<size_t>(kv_spec_.num_blocks) * kv_spec_.block_size;
  auto allocate = [&](size_t bytes) -> absl::StatusOr<DeviceBuffer> {
    absl::StatusOr<DeviceBuffer> b = backend_->Allocate(bytes);
    if (b.ok() || kv.num_blocks <= 0) return b;
    return absl::Status(b.status().code(), absl::StrCat(sized_by_flag, " do not fit: ", b.status().message()));
  };
  for (int l = 0; l < kv_spec_.num_layers(); ++l) {
    ASSIGN_OR_RETURN(DeviceBuffer k, allocate(slots * kv_spec_.KBytesPerToken(l)));
    ASSIGN_OR_RETURN(DeviceBuffer v, allocate(slots * kv_spec_.VBytesPerToken(l)));
    kv_layers_.push_back(CacheLayer(l, k.data(), v.data()));
    k_cache_.push_back(std::move(k));
    v_cache_.push_back(std::move(v));
  }
  return absl::OkStatus();
}

KvLayer ModelRunner::CacheLayer(int l, void* k, void* v) const {
  KvLayer c{k, v, kv_spec_.k_width[l], kv_spec_.v_width[l], kv_spec_.dtype};
  c.quant = kv_spec_.quant();
  c.num_kv_heads = static_cast<int32_t>(kv_spec_.num_kv_heads);
  c.block_size = kv_spec_.block_size;
  return c;
}

std::vector<const void*> ModelRunner::StepBufferAddresses() const {
  return {x_.data(),           h_.data(),     qkv_.data(),       attn_.data(),
          gate_up_.data(),     act_.data(),   rows_.data(),      logits_.data(),
          logits_local_.data(), gathered_.data(), gather_iota_.data(), meta_.data(),
          meta_host_.data(),   x_alt_.data()};
}

absl::Status ModelRunner::Validate(absl::Span<const SequenceStep> steps) const {
  if (static_cast<int64_t>(steps.size()) > limits_.max_num_seqs) {
    return absl::InvalidArgumentError(absl::StrCat("step has ", steps.size(),
                                                   " sequences, over max_num_seqs ",
                                                   limits_.max_num_seqs));
  }
  int64_t num_tokens = 0;
  for (const SequenceStep& s : steps) num_tokens += static_cast<int64_t>(s.tokens.size());
  if (num_tokens > limits_.max_num_batched_tokens) {
    return absl::InvalidArgumentError(absl::StrCat("step has ", num_tokens,
                                                   " tokens, over max_num_batched_tokens ",
                                                   limits_.max_num_batched_tokens));
  }
  absl::flat_hash_set<int64_t> seen;
  for (const SequenceStep& s : steps) {
    if (!seen.insert(s.seq_id).second) {
      return absl::InvalidArgumentError(absl::StrCat("sequence ", s.seq_id, " appears twice in one step"));
    }
    RETURN_IF_ERROR(ValidateSequence(s));
  }
  return absl::OkStatus();
}

absl::Status ModelRunner::ValidateSequence(const SequenceStep& s) const {
  if (s.tokens.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("sequence ", s.seq_id, ": no tokens to compute"));
  }
  if (s.num_computed_tokens < 0) {
    return absl::InvalidArgumentError(absl::StrCat("sequence ", s.seq_id, ": negative num_computed_tokens"));
  }
  for (int32_t t : s.tokens) {
    if (t < 0 || t >= config_.vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat("sequence ", s.seq_id, ": token id ", t,
                                                     " outside the vocabulary [0, ",
                                                     config_.vocab_size, ")"));
    }
  }
  const int64_t total = s.num_computed_tokens + static_cast<int64_t>(s.tokens.size());
  if (total > limits_.max_model_len) {
    return absl::InvalidArgumentError(absl::StrCat("sequence ", s.seq_id, ": ", total,
                                                   " tokens exceed the model context of ",
                                                   limits_.max_model_len, " (max_model_len)"));
  }
  if (s.slot_offset < 0 || s.slot_offset > s.num_computed_tokens) {
    return absl::InvalidArgumentError(absl::StrCat("sequence ", s.seq_id, ": slot_offset ", s.slot_offset,
                                                   " outside [0, ", s.num_computed_tokens, "]"));
  }
  const int64_t need = kv_spec_.BlocksForTokens(total - s.slot_offset);
  if (static_cast<int64_t>(s.block_table.size()) < need) {
    return absl::InvalidArgumentError(absl::StrCat("sequence ", s.seq_id, ": block table has ",
                                                   s.block_table.size(), " blocks, ", total - s.slot_offset,
                                                   " cache slots need ", need));
  }
  for (int64_t i = 0; i < need; ++i) {
    const int32_t b = s.block_table[i];
    if (b < 0 || b >= kv_spec_.num_blocks) {
      return absl::InvalidArgumentError(absl::StrCat("sequence ", s.seq_id, ": block id ", b,
                                                     " outside the cache of ",
                                                     kv_spec_.num_blocks, " blocks"));
    }
  }
  return absl::OkStatus();
}

absl::Status ModelRunner::AllReduce(Tensor2D t) {
  if (comm_ == nullptr || weights_.shard.tp_size == 1) return absl::OkStatus();
  // Row-contiguous activations (ld == cols): one collective in the activations' dtype.
  return comm_->AllReduceSum(t.data, static_cast<size_t>(t.rows * t.cols), t.dtype);
}

Tensor2D ModelRunner::Weight(const DeviceBuffer& b, int64_t rows, int64_t cols) const {
  return Tensor2D{b.data(), weights_.dtype, rows, cols, cols};
}

Tensor2D ModelRunner::Act(const DeviceBuffer& b, int64_t rows, int64_t cols) const {
  return Tensor2D{b.data(), act_dtype_, rows, cols, cols};
}

absl::StatusOr<StepOutput> ModelRunner::Execute(absl::Span<const SequenceStep> steps,
                                                bool host_logits, StepSync sync,
                                                const int32_t* drawn_tokens) {
  RETURN_IF_ERROR(Validate(steps));
  for (const SequenceStep& s : steps) {
    if (s.draw_index >= 0 && drawn_tokens == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat("sequence ", s.seq_id, ": its input is draw ", s.draw_index,
                                                     " of the previous step, but no drawn tokens were given"));
    }
  }
  if (meta_in_flight_) {
    // The last step's uploads from meta_host_, long done when it returned enqueued (an event
    // recorded after them: the forward pass and draw behind them keep running); after a failure
    // between the first upload and the record, the whole stream.
    RETURN_IF_ERROR(meta_recorded_ ? backend_->SynchronizeEvent(*meta_uploaded_) : backend_->Synchronize());
    meta_in_flight_ = false;
  }
  // Whether this step may return enqueued: its results stay in backend memory (a KV policy's
  // host-side state and host logit rows need the step complete).
  const bool enqueue = sync == StepSync::kEnqueued && !host_logits && !kv_policy_;
  const int32_t bs = kv_spec_.block_size;
  const int32_t num_seqs = static_cast<int32_t>(steps.size());
  const int32_t mb = max_blocks_per_seq_;

  // A pure-decode step that fits a captured size replays that graph over padded metadata; any
  // other step is enqueued op by op (eager).
  const int graph = FindDecodeGraph(steps);
  // Host metadata, written straight into the pinned staging mirror at the fixed offsets. The
  // previous step's uploads have completed: Execute ends with a Synchronize, or (an enqueued or a
  // failed step) the next one starts with it.
  int32_t* hm = meta_host_.as<int32_t>();
  const MetaLayout& m = meta_at_;
  int32_t* ids = hm + m.ids;
  int32_t* positions = hm + m.positions;
  int32_t* slots = hm + m.slots;
  int32_t* qstart = hm + m.query_start;
  int32_t* seq_lens = hm + m.seq_lens;
  int32_t* tables = hm + m.tables;
  int32_t* logit_rows = hm + m.logit_rows;
  int32_t* drawn_pairs = hm + m.drawn_pairs;
  int32_t num_drawn = 0;
  StepOutput out;
  out.vocab_size = config_.vocab_size;
  out.row_begin.reserve(num_seqs + 1);
  int32_t T = 0, num_rows = 0, max_len = 0;
  qstart[0] = 0;
  for (int32_t i = 0; i < num_seqs; ++i) {
    const SequenceStep& s = steps[i];
    const int32_t n = static_cast<int32_t>(s.tokens.size());
    const int32_t c0 = static_cast<int32_t>(s.num_computed_tokens);
    const int32_t off = static_cast<int32_t>(s.slot_offset);  // a KV policy's compactions
    for (int32_t j = 0; j < n; ++j) {
      const int32_t pos = c0 + j;
      ids[T + j] = s.tokens[j];
      positions[T + j] = pos;
      slots[T + j] = s.block_table[(pos - off) / bs] * bs + (pos - off) % bs;
    }
    if (s.draw_index >= 0) {  // the last token is on the device (taken after the upload)
      drawn_pairs[2 * num_drawn] = T + n - 1;
      drawn_pairs[2 * num_drawn + 1] = s.draw_index;
      ++num_drawn;
    }
    const int32_t len = c0 + n;
    const int32_t nb = kv_spec_.BlocksForTokens(len - off);
    std::copy(s.block_table.begin(), s.block_table.begin() + nb, tables + static_cast<int64_t>(i) * mb);
    seq_lens[i] = len;
    max_len = std::max(max_len, len);
    out.row_begin.push_back(num_rows);
    if (s.logits == SequenceStep::Logits::kAll) {
      for (int32_t j = 0; j < n; ++j) logit_rows[num_rows++] = T + j;
    } else if (s.logits == SequenceStep::Logits::kLast) {
      logit_rows[num_rows++] = T + n - 1;
    }
    T += n;
    qstart[i + 1] = T;
  }
  out.row_begin.push_back(num_rows);
  // The rows the forward pass runs: the step's, or the graph's padded size (padding rows: token
  // 0 at position 0, slot -1 so nothing is written, their own logit row; not attention sequences).
  const int32_t rows_run = graph >= 0 ? graph_sizes_[graph] : T;
  for (int32_t r = T; r < rows_run; ++r) {
    ids[r] = 0;
    positions[r] = 0;
    slots[r] = -1;
  }
  if (graph >= 0) {
    // A graph computes row r's logits into logits_ row r for every row (one token per sequence),
    // whichever rows this rank asked for (DecodeGraphIndex): sequence i's logits are row i.
    for (int32_t r = 0; r < rows_run; ++r) logit_rows[r] = r;
    num_rows = num_seqs;
    for (int32_t i = 0; i <= num_seqs; ++i) out.row_begin[i] = i;
  }

  // Host KV transfers of this step: loads complete before the forward, offloads before it
  // overwrites one of their blocks (otherwise they overlap with it).
  RETURN_IF_ERROR(WaitHostKvBefore(steps));
  // One copy per region, of the used prefix only; the device addresses never change.
  int32_t* dm = meta_.as<int32_t>();
  meta_in_flight_ = true;  // the copies below read meta_host_ asynchronously
  meta_recorded_ = false;
  auto upload = [&](int64_t at, int64_t count) {
    return backend_->CopyToDevice(dm + at, hm + at, static_cast<size_t>(count) * sizeof(int32_t));
  };
  RETURN_IF_ERROR(upload(m.ids, rows_run));
  RETURN_IF_ERROR(upload(m.positions, rows_run));
  RETURN_IF_ERROR(upload(m.slots, rows_run));
  RETURN_IF_ERROR(upload(m.query_start, num_seqs + 1));
  RETURN_IF_ERROR(upload(m.seq_lens, num_seqs));
  RETURN_IF_ERROR(upload(m.tables, static_cast<int64_t>(num_seqs) * mb));
  RETURN_IF_ERROR(upload(m.logit_rows, graph >= 0 ? rows_run : num_rows));
  if (num_drawn > 0) RETURN_IF_ERROR(upload(m.drawn_pairs, 2 * num_drawn));
  RETURN_IF_ERROR(backend_->RecordEvent(*meta_uploaded_));
  meta_recorded_ = true;
  if (num_drawn > 0) {
    RETURN_IF_ERROR(backend_->TakeDrawnTokens(dm + m.ids, drawn_tokens, dm + m.drawn_pairs, num_drawn,
                                              static_cast<int32_t>(config_.vocab_size)));
  }

  AttentionBatch batch;
  batch.num_seqs = num_seqs;
  batch.num_tokens = T;
  batch.max_seq_len = max_len;
  batch.max_blocks_per_seq = mb;
  batch.block_size = bs;
  batch.query_start = dm + m.query_start;
  batch.seq_lens = dm + m.seq_lens;
  batch.block_tables = dm + m.tables;
  batch.host_query_start = qstart;
  batch.host_seq_lens = seq_lens;
  RETURN_IF_ERROR(backend_->PlanAttention(batch, *plan_));
  policy_seqs_.clear();
  if (kv_policy_) {
    for (int32_t i = 0; i < num_seqs; ++i) {
      const SequenceStep& st = steps[i];
      policy_seqs_.push_back(kv_policy_->Prepare(st.seq_id, st.num_computed_tokens, seq_lens[i],
                                                 st.prompt_len, st.session));
      if (policy_seqs_.back()->slot_offset() != st.slot_offset) {
        return absl::InternalError(absl::StrCat("sequence ", st.seq_id, ": slot_offset ", st.slot_offset,
                                                " but its KV policy state's is ",
                                                policy_seqs_.back()->slot_offset()));
      }
    }
    if (kv_policy_->on_device()) RETURN_IF_ERROR(backend_->KvPolicyBeginStep(policy_seqs_, *plan_));
  }

  const int64_t vocab = config_.vocab_size;
  const size_t row_bytes = static_cast<size_t>(vocab) * sizeof(float);
  out.device_logits = Tensor2D{logits_.data(), DType::kF32, num_rows, vocab, vocab};
  out.sample_row.assign(num_seqs, -1);
  if (graph >= 0) {
    // One row per sequence, row i of logits_ (DecodeGraphIndex checked); a sequence that asked
    // for none (a rank that does not sample, a one-token prompt chunk) has no sample row.
    RETURN_IF_ERROR(backend_->ReplayGraph(*graphs_[graph]));
    ++num_graph_steps_;
    for (int32_t i = 0; i < num_seqs; ++i) {
      out.sample_row[i] = steps[i].logits == SequenceStep::Logits::kNone ? -1 : i;
    }
    if (host_logits) {
      out.logits.resize(static_cast<size_t>(num_rows) * vocab);
      RETURN_IF_ERROR(backend_->CopyToHost(out.logits.data(), logits_.data(), num_rows * row_bytes));
    }
    if (enqueue) return out;
    RETURN_IF_ERROR(backend_->Synchronize());
    meta_in_flight_ = false;
    return out;
  }
  ++num_eager_steps_;
  if (num_rows <= max_logit_rows_) {
    // One LM-head pass: every row stays in logits_ for the sampler.
    RETURN_IF_ERROR(Forward(T, num_rows));
    RETURN_IF_ERROR(EndKvPolicyStep());
    for (int32_t i = 0; i < num_seqs; ++i) {
      if (out.row_begin[i + 1] > out.row_begin[i]) out.sample_row[i] = out.row_begin[i + 1] - 1;
    }
    if (host_logits) {
      out.logits.resize(static_cast<size_t>(num_rows) * vocab);
      RETURN_IF_ERROR(backend_->CopyToHost(out.logits.data(), logits_.data(), num_rows * row_bytes));
    }
    if (enqueue) return out;
  } else {
    // More rows than one pass holds (all-token logits of long chunks, for prompt
    // log-probabilities): every pass goes to the host, then each sequence's last row comes back
    // to logits_ for the sampler (at most num_seqs <= max_logit_rows_ rows).
    RETURN_IF_ERROR(Forward(T, 0));
    RETURN_IF_ERROR(EndKvPolicyStep());
    const Tensor2D x = final_x_;
    out.logits.resize(static_cast<size_t>(num_rows) * vocab);
    for (int32_t r0 = 0; r0 < num_rows; r0 += max_logit_rows_) {
      const int32_t n = std::min(max_logit_rows_, num_rows - r0);
      RETURN_IF_ERROR(ComputeLogits(x, dm + m.logit_rows + r0, n));
      RETURN_IF_ERROR(backend_->CopyToHost(out.logits.data() + static_cast<int64_t>(r0) * vocab,
                                           logits_.data(), n * row_bytes));
    }
    RETURN_IF_ERROR(backend_->Synchronize());  // the host rows are complete
    int32_t k = 0;
    for (int32_t i = 0; i < num_seqs; ++i) {
      if (out.row_begin[i + 1] == out.row_begin[i]) continue;
      // Pageable source: staged by the time the call returns.
      RETURN_IF_ERROR(backend_->CopyToDevice(logits_.as<float>() + static_cast<int64_t>(k) * vocab,
                                             out.Row(out.row_begin[i + 1] - 1), row_bytes));
      out.sample_row[i] = k++;
    }
    out.device_logits.rows = k;
  }
  RETURN_IF_ERROR(backend_->Synchronize());
  meta_in_flight_ = false;
  return out;
}

absl::Status ModelRunner::EndKvPolicyStep() {
  if (!kv_policy_ || !kv_policy_->on_device()) return absl::OkStatus();
  return backend_->KvPolicyEndStep(policy_seqs_);
}

absl::Status ModelRunner::SetLayerInputObserver(LayerInputObserver observer) {
  if (observer && !IsBackendKind(backend_->name(), BackendKind::kCpu)) {
    return absl::FailedPreconditionError("SetLayerInputObserver: needs the CPU backend");
  }
  layer_input_observer_ = std::move(observer);
  return absl::OkStatus();
}

absl::Status ModelRunner::Forward(int32_t T, int32_t num_rows) {
  const int32_t* dm = meta_.as<int32_t>();
  const MetaLayout& m = meta_at_;
  const ShardLayout& sh = weights_.shard;
  const int64_t d = config_.hidden_size, hd = config_.head_dim;
  const int64_t q_sz = sh.num_heads * hd, kv_sz = sh.num_kv_heads * hd;
  const Tensor2D x = Act(x_, T, d), h = Act(h_, T, d), qkv = Act(qkv_, T, q_sz + 2 * kv_sz),
                 attn = Act(attn_, T, q_sz), gate_up = Act(gate_up_, T, 2 * sh.inter_size),
                 act = Act(act_, T, sh.inter_size);

  RopeKvWriteParams rk;
  rk.q = qkv.ColSlice(0, q_sz);
  rk.k = qkv.ColSlice(q_sz, kv_sz);
  rk.v = qkv.ColSlice(q_sz + kv_sz, kv_sz);
  rk.num_heads = static_cast<int32_t>(sh.num_heads);
  rk.num_kv_heads = static_cast<int32_t>(sh.num_kv_heads);
  rk.head_dim = static_cast<int32_t>(hd);
  rk.positions = dm + m.positions;
  rk.inv_freq = inv_freq_.as<float>();
  rk.slot_mapping = dm + m.slots;
  AttentionParams ap;
  ap.q = rk.q;
  ap.out = attn;
  ap.num_heads = rk.num_heads;
  ap.num_kv_heads = rk.num_kv_heads;
  ap.head_dim = rk.head_dim;
  ap.scale = 1.0f / std::sqrt(static_cast<float>(hd));

  // `stream` is the residual stream; h carries each sub-layer's output into the next add + norm.
  // Fused (decode-sized steps on CUDA): each norm runs inside the projection after it. Without an
  // all-reduce between a projection and its residual add (one rank), the o and down projections
  // add into the stream themselves (MatmulAdd) and the norm projections take the stream as it is;
  // with one, each add + norm runs inside the projection after it, which stores the stream into
  // the other buffer (it reads the old one meanwhile). Unfused, the stream is updated in place.
  // Latent layers and a layer-input observer take the unfused input norm. Folded norms
  // (FoldNormWeights; one rank): every norm whose weight went into w runs with a unit weight,
  // and in steps of at most fold_rows_ tokens the o and down projections add into the stream and
  // write its partial sums of squares, from which the qkv and gate_up projections after them
  // take the rms (no norm op; the first layer's qkv and a latent layer's MLP run the norm).
  const float eps = static_cast<float>(config_.rms_norm_eps);
  const bool fuse = T <= fused_norm_rows_;  // FusesNormMatmul(t) held for every t up to it
  const bool folded = T <= fold_rows_;
  const bool add_in_proj = (fuse || folded) && (comm_ == nullptr || sh.tp_size == 1);  // AllReduce is a no-op
  Tensor2D stream = x, other = fuse && !add_in_proj ? Act(x_alt_, T, d) : x;
  float* sum_squares = folded ? sum_squares_.as<float>() : nullptr;
  bool have_sum_squares = false;  // sum_squares holds the stream's partials (the last MatmulAdd's)
  const bool norms_folded = fold_rows_ > 0;  // FoldNormWeights ran
  const Tensor2D ones = norms_folded ? Weight(ones_, 1, d) : Tensor2D{};
  auto normed = [&](bool add, const Tensor2D& weight) {
    NormedInput in;
    in.residual = stream;
    if (add) in.add = h;
    in.next = add && fuse ? other : stream;
    in.weight = weight;
    in.eps = eps;
    in.normed = h;
    if (!add && have_sum_squares) in.sum_squares = sum_squares;
    return in;
  };
  auto advance = [&](const NormedInput& in) {
    if (in.add.data != nullptr && in.next.data != in.residual.data) std::swap(stream, other);
  };
  RETURN_IF_ERROR(backend_->Embedding(Weight(weights_.embed, config_.vocab_size, d), dm + m.ids, x));
  for (int64_t l = 0; l < config_.num_layers; ++l) {
    const LayerWeights& w = weights_.layers[l];
    const bool latent = IsLatent(static_cast<int>(l));
    // The weights folded into qkv (full-attention layers) and gate_up run as ones here.
    const Tensor2D input_norm = norms_folded && !latent ? ones : Weight(w.input_norm, 1, d);
    const Tensor2D post_norm = norms_folded ? ones : Weight(w.post_norm, 1, d);
    if (latent || layer_input_observer_) {
      if (l == 0 || add_in_proj) {
        RETURN_IF_ERROR(backend_->RmsNorm(stream, input_norm, eps, h));
      } else {
        RETURN_IF_ERROR(backend_->FusedAddRmsNorm(stream, h, input_norm, eps, h));
      }
      if (layer_input_observer_) layer_input_observer_(static_cast<int>(l), h);
    }
    if (latent) {
      RETURN_IF_ERROR(LatentAttentionBlock(static_cast<int>(l), T, h));  // h = o(attention(h))
    } else {
      rk.cache = ap.cache = kv_layers_[l];
      ap.kv_policy = {policy_seqs_.empty() ? nullptr : policy_seqs_.data(), static_cast<int32_t>(l)};
      const Tensor2D w_qkv = Weight(w.qkv, q_sz + 2 * kv_sz, d);
      if (layer_input_observer_) {
        RETURN_IF_ERROR(backend_->MatmulRopeKvWrite(h, w_qkv, qkv, rk));
      } else {
        const NormedInput in = normed(l > 0 && !add_in_proj, input_norm);
        RETURN_IF_ERROR(backend_->NormMatmulRopeKvWrite(in, w_qkv, qkv, rk));
        advance(in);
      }
      RETURN_IF_ERROR(backend_->DecodeAttention(ap, *plan_));
      RETURN_IF_ERROR(backend_->PrefillAttention(ap, *plan_));
      if (add_in_proj) {
        RETURN_IF_ERROR(backend_->MatmulAdd(attn, Weight(w.o, d, q_sz), stream, h, sum_squares));
        have_sum_squares = sum_squares != nullptr;
      } else {
        RETURN_IF_ERROR(backend_->Matmul(attn, Weight(w.o, d, q_sz), h));
      }
    }
    if (latent && add_in_proj) {
      RETURN_IF_ERROR(backend_->AddInPlace(stream, h));
      have_sum_squares = false;
    }
    RETURN_IF_ERROR(AllReduce(h));
    const NormedInput post = normed(!add_in_proj, post_norm);
    RETURN_IF_ERROR(backend_->NormMatmulSiluMul(post, Weight(w.gate_up, 2 * sh.inter_size, d), gate_up, act));
    advance(post);
    if (add_in_proj) {
      RETURN_IF_ERROR(backend_->MatmulAdd(act, Weight(w.down, d, sh.inter_size), stream, h, sum_squares));
      have_sum_squares = sum_squares != nullptr;
    } else {
      RETURN_IF_ERROR(backend_->Matmul(act, Weight(w.down, d, sh.inter_size), h));
      RETURN_IF_ERROR(AllReduce(h));
    }
  }
  if (!add_in_proj) RETURN_IF_ERROR(backend_->AddInPlace(stream, h));
  final_x_ = stream;
  if (num_rows > 0) RETURN_IF_ERROR(ComputeLogits(stream, dm + m.logit_rows, num_rows));
  return absl::OkStatus();
}

absl::Status ModelRunner::ComputeLogits(const Tensor2D& x, const int32_t* rows_at, int64_t n) {
  const int64_t vocab = config_.vocab_size, d = config_.hidden_size;
  const ShardLayout& sh = weights_.shard;
  const Tensor2D rows = Act(rows_, n, d);
  RETURN_IF_ERROR(backend_->GatherRows(x, rows_at, rows));
  RETURN_IF_ERROR(backend_->RmsNorm(rows, Weight(weights_.final_norm, 1, d),
                                    static_cast<float>(config_.rms_norm_eps), rows));
  const Tensor2D full{logits_.data(), DType::kF32, n, vocab, vocab};
  if (!sh.lm_head_sharded) {
    return backend_->Matmul(rows, Weight(weights_.lm_head_or_embed(), vocab, d), full);
  }
  // Each rank: logits of its vocabulary slice [n, V/tp]; the all-gather stacks the slices rank
  // by rank ([tp][n][V/tp]); one row gather per rank puts its slice into columns
  // [r * V/tp, (r + 1) * V/tp) of every row.
  const int64_t vl = sh.vocab_size;
  const Tensor2D local{logits_local_.data(), DType::kF32, n, vl, vl};
  RETURN_IF_ERROR(backend_->Matmul(rows, Weight(weights_.lm_head, vl, d), local));
  RETURN_IF_ERROR(comm_->AllGather(local.as<float>(), gathered_.as<float>(), static_cast<size_t>(n * vl)));
  const Tensor2D stacked{gathered_.data(), DType::kF32, sh.tp_size * n, vl, vl};
  for (int64_t r = 0; r < sh.tp_size; ++r) {
    RETURN_IF_ERROR(backend_->GatherRows(stacked, gather_iota_.as<int32_t>() + r * n,
                                         full.ColSlice(r * vl, vl)));
  }
  return absl::OkStatus();
}

absl::Status ModelRunner::CopyBlocks(absl::Span<const BlockCopy> copies) {
  // The backend checks every copy (ValidateBlockCopies) before doing any.
  if (copies.empty()) return absl::OkStatus();
  if (host_kv_pending_) {
    // Rare (copy-on-write in a step with host transfers): order the copies after them all.
    RETURN_IF_ERROR(ValidateBlockCopies(copies, kv_spec_.num_blocks));
    RETURN_IF_ERROR(backend_->WaitKvTransfers());
    ForgetHostKvBlocks();
  }
  return backend_->CopyBlocks(kv_layers_, kv_spec_.block_size, kv_spec_.num_blocks, copies);
}

}  // namespace lorc
