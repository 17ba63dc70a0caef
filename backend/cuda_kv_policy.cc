// CudaBackend's token-level KV policies (issue #17; kvpolicy/README.md "On the GPU"): the states'
// per-position arrays live on the device (CudaPolicyArrays, owned by each
// kvpolicy::SequenceKvPolicy), attention reads the kept keys through the slot map and records
// CORM's importance (kernels/kv_policy.cuh), the choice and the counts run once per step, and a
// compaction moves the kept keys on the device. MiKV: the choice demotes instead of dropping
// (fixing a head's key balance at its first demotion from the queries the attention calls
// observed), the decode reads demoted keys quantized on the fly and packed ones from their runs,
// and a compaction packs each head's low entries after its full run. The CPU backend
// (cpu_kv_policy.cc, kvpolicy::SelectVictims, SequenceKvPolicy::Compact / Apply) is the
// reference.
//
// What runs where, per step (KvPolicyBeginStep builds the lists):
//  - decodes: the policy decode over each sequence's kept keys (one entry per sequence);
//  - a prompt chunk of a state that has not chosen yet (every key is kFull, slots = positions):
//    the plain paged prefill kernel for the output, and the policy decode for the importance of
//    the rows that can matter only (output not written): the step's last w when it chooses, else
//    (after-prompt) the rows among the prompt's last w, so the importance of a long prompt costs
//    w query rows, not one per token. Exact: a query at position i can only matter to a choice at
//    a length L with i >= L - w (CORM's rule; the budget ranks survivors of that rule, whose
//    last_hit came from such queries), and the next choice is at this step's length (choosing)
//    or at the prompt's end, every later one beyond;
//  - a prompt chunk of a state that has chosen (every-chunk mode, a recomputed request past its
//    prompt): every row through the policy decode (one entry per row), and not the paged kernel.
#include "backend/cuda_backend_impl.h"
#include "backend/cuda_backend.h"

#ifdef LORC_HAVE_CUDA
#include <algorithm>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include "kernels/kv_policy.cuh"
#include "kvpolicy/sequence_policy.h"
#include "kvpolicy/state_memory.h"

namespace lorc::cuda_internal {
namespace {

// Scratch of one policy decode launch at most (scores [entries][heads][keys] fp32 dominate): a
// step whose entries need more runs them in groups.
constexpr size_t kMaxPolicyScratchBytes = size_t{512} << 20;
// cudaMalloc's rounding of one allocation, at most (what KvPolicyMemory sets aside per array).
constexpr int64_t kAllocationRounding = int64_t{2} << 20;

// One state's device arrays, [layers x KV heads][capacity] each, in one allocation: slot,
// last_hit and pos (int32; kernels/kv_policy.cuh KvPolicySeq), then state (uint8): 13 bytes per
// position, layer and KV head; MiKV over LoRC latents then packed_pos (int32: 17 bytes). MiKV
// adds, per (layer, KV head), low_base, num_packed and balance_set (int32) and balance and
// q_absmax (fp32 [head_dim]) in a second allocation, zeroed.
class CudaPolicyArrays final : public kvpolicy::DeviceArrays {
 public:
  ~CudaPolicyArrays() override {
    if (base_ != nullptr) cudaFree(base_);
    if (heads_base_ != nullptr) cudaFree(heads_base_);
  }
  // head_dim > 0: with MiKV's per-head arrays; packed_pos: with packed_pos (MiKV over latents).
  static absl::StatusOr<std::unique_ptr<CudaPolicyArrays>> Make(int64_t rows, int64_t capacity, int64_t head_dim,
                                                                bool packed_pos, cudaStream_t stream) {
    auto a = std::make_unique<CudaPolicyArrays>();
    a->rows_ = rows;
    a->capacity_ = capacity;
    a->head_dim_ = head_dim;
    a->packed_pos_ = packed_pos;
    a->stream_ = stream;
    RETURN_IF_ERROR(CudaError(cudaMalloc(&a->base_, static_cast<size_t>(rows * capacity) * BytesPerEntry(packed_pos)),
                              "KV policy state arrays"));
    if (head_dim > 0) {
      RETURN_IF_ERROR(CudaError(cudaMalloc(&a->heads_base_, a->HeadsBytes()), "KV policy MiKV arrays"));
      RETURN_IF_ERROR(CudaError(cudaMemsetAsync(a->heads_base_, 0, a->HeadsBytes(), stream), "KV policy MiKV arrays"));
    }
    return a;
  }
  std::unique_ptr<kvpolicy::DeviceArrays> Clone() const override {
    absl::StatusOr<std::unique_ptr<CudaPolicyArrays>> c = Make(rows_, capacity_, head_dim_, packed_pos_, stream_);
    if (!c.ok()) return nullptr;
    if (cudaMemcpyAsync((*c)->base_, base_, static_cast<size_t>(rows_ * capacity_) * BytesPerEntry(packed_pos_),
                        cudaMemcpyDeviceToDevice, stream_) != cudaSuccess) {
      return nullptr;
    }
    if (head_dim_ > 0 &&
        cudaMemcpyAsync((*c)->heads_base_, heads_base_, HeadsBytes(), cudaMemcpyDeviceToDevice, stream_) != cudaSuccess) {
      return nullptr;
    }
    (*c)->length_ = length_;
    return *std::move(c);
  }
  // Capacity for `positions` at least: kvpolicy::DeviceStateCapacity(positions), the rule the
  // coordinator counts by (growing copies the arrays' first length() positions; the per-head
  // arrays stay).
  absl::Status Reserve(int64_t positions) {
    if (positions <= capacity_) return absl::OkStatus();
    const int64_t cap = kvpolicy::DeviceStateCapacity(positions);
    ASSIGN_OR_RETURN(std::unique_ptr<CudaPolicyArrays> n, Make(rows_, cap, /*head_dim=*/0, packed_pos_, stream_));
    if (length_ > 0) {
      for (int part = 0; part < (packed_pos_ ? 5 : 4); ++part) {
        const size_t elem = part != 3 ? 4 : 1;
        RETURN_IF_ERROR(CudaError(cudaMemcpy2DAsync(n->Part(part), cap * elem, Part(part), capacity_ * elem,
                                                    length_ * elem, rows_, cudaMemcpyDeviceToDevice, stream_),
                                  "KV policy state arrays: grow"));
      }
    }
    std::swap(base_, n->base_);
    capacity_ = cap;
    // `n` frees the old arrays: cudaFree waits for the device to finish with them (the copies
    // above and any kernel still reading them), as it does for Ensure's buffers below.
    return absl::OkStatus();
  }
  int32_t* slot() const { return static_cast<int32_t*>(Part(0)); }
  int32_t* last_hit() const { return static_cast<int32_t*>(Part(1)); }
  int32_t* pos() const { return static_cast<int32_t*>(Part(2)); }
  uint8_t* state() const { return static_cast<uint8_t*>(Part(3)); }
  int32_t* packed_pos() const { return packed_pos_ ? static_cast<int32_t*>(Part(4)) : nullptr; }
  // A kernels' entry over these arrays for a sequence of `seq_len` positions (other fields
  // default).
  kernels::KvPolicySeq Entry(int64_t seq_len) const {
    kernels::KvPolicySeq e;
    e.state = state();
    e.slot = slot();
    e.last_hit = last_hit();
    e.pos = pos();
    e.capacity = static_cast<int32_t>(capacity_);
    e.seq_len = static_cast<int32_t>(seq_len);
    e.packed_pos = packed_pos();
    if (heads_base_ != nullptr) {
      int32_t* ints = static_cast<int32_t*>(heads_base_);
      e.low_base = ints;
      e.num_packed = ints + rows_;
      e.balance_set = ints + 2 * rows_;
      float* floats = reinterpret_cast<float*>(static_cast<char*>(heads_base_) + IntsBytes());
      e.balance = floats;
      e.q_absmax = floats + rows_ * head_dim_;
    }
    return e;
  }
  static constexpr size_t BytesPerEntry(bool packed_pos) { return packed_pos ? 17 : 13; }
  int64_t capacity() const override { return capacity_; }
  int64_t length() const { return length_; }  // positions extended so far
  void set_length(int64_t n) { length_ = n; }

 private:
  // Parts 0-2 (int32), 3 (uint8), 4 (int32; rows x capacity is a multiple of 256, so aligned).
  void* Part(int part) const {
    const size_t at = part == 4 ? 13 : 4 * static_cast<size_t>(part);  // bytes per row x capacity before it
    return static_cast<char*>(base_) + at * static_cast<size_t>(rows_ * capacity_);
  }
 public:
  static size_t IntsBytes(int64_t rows) { return (3 * sizeof(int32_t) * static_cast<size_t>(rows) + 255) / 256 * 256; }
  static size_t HeadsBytes(int64_t rows, int64_t head_dim) {
    return IntsBytes(rows) + 2 * sizeof(float) * static_cast<size_t>(rows * head_dim);
  }

 private:
  size_t IntsBytes() const { return IntsBytes(rows_); }
  size_t HeadsBytes() const { return HeadsBytes(rows_, head_dim_); }
  void* base_ = nullptr;
  void* heads_base_ = nullptr;
  int64_t rows_ = 0, capacity_ = 0, head_dim_ = 0, length_ = 0;
  bool packed_pos_ = false;
  cudaStream_t stream_ = nullptr;
};

bool IsMikv(const kvpolicy::KvPolicyConfig& c) { return c.kind == kvpolicy::KvPolicyKind::kMikv; }

}  // namespace

// What one step's policy attention and choice use (KvPolicyBeginStep to KvPolicyEndStep).
struct CudaKvPolicyStep {
  // Per state, batch order: its arrays and the step's scalars (extend, choose, counts).
  std::vector<kernels::KvPolicySeq> seqs;
  // Attention entries: decodes first, then prompt rows (see the file comment).
  std::vector<kernels::KvPolicySeq> entries;
  int32_t num_decode_entries = 0;
  // Entry groups of one launch each (scratch at most kMaxPolicyScratchBytes), decode and prompt
  // groups apart; made at the step's first attention call (the head shape is known there).
  struct Group {
    int32_t begin = 0, count = 0, max_seq_len = 0;
  };
  std::vector<Group> decode_groups, prefill_groups;
  bool groups_ready = false;
  // MiKV: what the choice's balance reads, recorded by the step's attention calls: each layer's K
  // cache, the batch's block tables (device, batch order), the head shape.
  std::vector<const void*> k_layers;
  const int32_t* block_tables = nullptr;
  int32_t max_blocks = 0, block_size = 0, head_dim = 0;
  kernels::KvPolicyCacheLayout layout;  // the cache's (MiKV's balance reads its keys)
  DeviceBuffer seqs_dev, entries_dev, counts_dev, counts_host, scratch, compact_dev, k_layers_dev, stage;
  bool active = false;
};

void CudaKvPolicyStepDeleter::operator()(CudaKvPolicyStep* s) const { delete s; }

namespace {

// A device buffer of at least `bytes` (grown, never shrunk): doubling, but not past `limit`
// unless `bytes` is (the scratch and stage buffers stay within what KvPolicyMemory set aside).
absl::Status Ensure(Backend& be, DeviceBuffer& b, size_t bytes, bool host = false,
                    size_t limit = std::numeric_limits<size_t>::max()) {
  if (b.bytes() >= bytes) return absl::OkStatus();
  const size_t n = std::max(bytes, std::min(2 * b.bytes(), limit));
  ASSIGN_OR_RETURN(b, host ? be.AllocateHost(n) : be.Allocate(n));
  return absl::OkStatus();
}

// The step's entry groups (one launch each, scratch at most kMaxPolicyScratchBytes), made at its
// first attention call (the head shape is known there; every layer of a model has the same).
absl::Status PrepareGroups(Backend& be, CudaKvPolicyStep& st, int32_t num_heads, int32_t num_kv_heads,
                           int32_t head_dim) {
  if (st.groups_ready) return absl::OkStatus();
  // Entries in order, a group closing when the next entry would pass the scratch cap.
  size_t most = 0;
  auto make = [&](int32_t begin, int32_t end, std::vector<CudaKvPolicyStep::Group>* out) {
    CudaKvPolicyStep::Group g{begin, 0, 0};
    for (int32_t e = begin; e < end; ++e) {
      // What it walks: its slots, then (MiKV) its heads' packed entries.
      const int32_t slots = st.entries[e].seq_len - st.entries[e].slot_offset + st.entries[e].packed_max;
      const int32_t len = std::max(g.max_seq_len, slots);
      const size_t bytes =
          kernels::KvPolicyDecodeScratchBytes(g.count + 1, num_heads, num_kv_heads, head_dim, len);
      if (g.count > 0 && bytes > kMaxPolicyScratchBytes) {
        out->push_back(g);
        g = {e, 0, 0};
      }
      g.max_seq_len = std::max(g.max_seq_len, slots);
      ++g.count;
      most = std::max(most, kernels::KvPolicyDecodeScratchBytes(g.count, num_heads, num_kv_heads, head_dim,
                                                                g.max_seq_len));
    }
    if (g.count > 0) out->push_back(g);
  };
  make(0, st.num_decode_entries, &st.decode_groups);
  make(st.num_decode_entries, static_cast<int32_t>(st.entries.size()), &st.prefill_groups);
  RETURN_IF_ERROR(Ensure(be, st.scratch, std::max<size_t>(most, 256), false, kMaxPolicyScratchBytes));
  st.groups_ready = true;
  return absl::OkStatus();
}

}  // namespace

Backend::KvPolicyStateMemory CudaBackend::KvPolicyMemory(int64_t rows, int64_t mikv_head_dim, bool mikv_latent,
                                                        int64_t max_model_len, int64_t max_num_seqs) const {
  KvPolicyStateMemory m;
  m.bytes_per_position = rows * static_cast<int64_t>(CudaPolicyArrays::BytesPerEntry(mikv_latent));
  // Per state: the arrays' rounding, and MiKV's per-head arrays with theirs.
  int64_t per_state = kAllocationRounding;
  if (mikv_head_dim > 0) {
    per_state += static_cast<int64_t>(CudaPolicyArrays::HeadsBytes(rows, mikv_head_dim)) + kAllocationRounding;
  }
  // A growing state's old arrays until the copy is done (one at a time), and the decode scratch
  // and compaction stage (Ensure's limit; a single entry past it is far smaller: kernels' scratch
  // per query row is heads x positions x 4 bytes), with the small per-step lists.
  const int64_t growing = kvpolicy::DeviceStateCapacity(max_model_len) * m.bytes_per_position + kAllocationRounding;
  const int64_t scratch = 2 * static_cast<int64_t>(kMaxPolicyScratchBytes) + (int64_t{16} << 20);
  m.reserve_bytes = max_num_seqs * per_state + growing + scratch;
  return m;
}

absl::Status CudaBackend::CheckKvPolicy(const kvpolicy::KvPolicyConfig& config, KvCacheDtype kv_cache_dtype,
                                        bool latent, int32_t query_group) const {
  (void)kv_cache_dtype;  // bf16 and quantized caches alike (kernels/kv_policy.cuh KvPolicyCacheLayout)
  return CudaKvPolicySupport(config, latent, query_group);  // cuda_backend.cc
}

absl::Status CudaBackend::KvPolicyBeginStep(absl::Span<kvpolicy::SequenceKvPolicy* const> seqs,
                                            AttentionPlan& plan) {
  if (!kv_policy_step_) kv_policy_step_.reset(new CudaKvPolicyStep());
  CudaKvPolicyStep& st = *kv_policy_step_;
  st.active = false;
  st.seqs.clear();
  st.entries.clear();
  st.decode_groups.clear();
  st.prefill_groups.clear();
  st.groups_ready = false;
  st.k_layers.clear();  // recorded again by this step's attention calls (MiKV)
  st.block_tables = nullptr;
  const AttentionBatch& b = plan.batch();
  if (static_cast<int32_t>(seqs.size()) != b.num_seqs) {
    return absl::InternalError(absl::StrCat("KvPolicyBeginStep: ", seqs.size(), " states for ", b.num_seqs,
                                            " sequences"));
  }
  if (seqs.empty()) return absl::OkStatus();
  std::vector<kernels::KvPolicySeq> prompt_rows;
  std::vector<int32_t> read_by_slot;  // prompts the plain kernel must not read
  // The arrays' new lengths, taken only once the extend is enqueued (an error before leaves them).
  std::vector<std::pair<CudaPolicyArrays*, int64_t>> extended;
  for (int32_t i = 0; i < b.num_seqs; ++i) {
    kvpolicy::SequenceKvPolicy* s = seqs[i];
    if (s == nullptr) return absl::InternalError(absl::StrCat("KvPolicyBeginStep: sequence ", i, " has no state"));
    const kvpolicy::KvPolicyConfig& cfg = s->config();
    const int64_t len = s->seq_len();
    if (len != b.host_seq_lens[i] || len >= (int64_t{1} << 24)) {
      return absl::InvalidArgumentError(absl::StrCat("KV policy: sequence ", i, " of ", len,
                                                     " tokens (the plan's ", b.host_seq_lens[i],
                                                     "; at most 2^24 - 1 under a policy on the GPU)"));
    }
    auto* arr = static_cast<CudaPolicyArrays*>(s->device());
    if (arr == nullptr) {
      // MiKV over LoRC latents (layers that do not balance keys: kvstore/kv_spec.cc makes a model's
      // layers all latent or all full KV) keeps packed_pos, as KvPolicyMemory counted.
      ASSIGN_OR_RETURN(std::unique_ptr<CudaPolicyArrays> made,
                       CudaPolicyArrays::Make(int64_t{s->num_layers()} * s->num_kv_heads(),
                                              kvpolicy::DeviceStateCapacity(len),
                                              IsMikv(cfg) ? s->layer_shape(0).k_width : 0,
                                              IsMikv(cfg) && !s->layer_shape(0).balance_keys, stream_));
      arr = made.get();
      s->set_device(std::move(made));
    }
    RETURN_IF_ERROR(arr->Reserve(len));
    kernels::KvPolicySeq e = arr->Entry(len);
    e.pinned = static_cast<int32_t>(std::min<int64_t>(s->pinned(), len));
    e.budget = cfg.has_budget() ? static_cast<int32_t>(std::min<int64_t>(cfg.BudgetFor(len), INT32_MAX)) : -1;
    e.slot_offset = static_cast<int32_t>(s->slot_offset());
    e.extend_from = static_cast<int32_t>(std::min(arr->length(), len));
    e.choose = s->choose() ? 1 : 0;
    e.count_from = static_cast<int32_t>(s->CompactFrom(b.block_size));
    e.packed_max = static_cast<int32_t>(std::min<int64_t>(s->DevicePackedBound(), len));
    const int32_t q0 = b.host_query_start[i], q_len = b.host_query_start[i + 1] - q0;
    e.q_row = q0;  // MiKV's query observation (KvPolicyAttention); entries below set their own
    e.q_len = q_len;
    extended.emplace_back(arr, len);
    st.seqs.push_back(e);
    // Attention entries (the file comment).
    kernels::KvPolicySeq row = e;
    row.table_row = i;
    row.q_len = 0;
    if (q_len == 1) {
      row.q_row = q0;
      st.entries.push_back(row);
    } else if (q_len > 1) {
      const bool by_slot = s->has_chosen() || s->slot_offset() != 0;
      if (by_slot) read_by_slot.push_back(i);
      // The first row whose importance can matter: this step's last w when it chooses, else
      // (after-prompt, before the prompt's end) the prompt's last w.
      const int64_t next_choice = s->choose() ? len : std::max(len, s->prompt_len());
      const int32_t first = by_slot ? 0
                                    : static_cast<int32_t>(std::clamp<int64_t>(next_choice - cfg.window - (len - q_len),
                                                                                0, q_len));
      for (int32_t j = first; j < q_len; ++j) {
        row.q_row = q0 + j;
        row.seq_len = static_cast<int32_t>(len - q_len + j + 1);
        row.no_out = by_slot ? 0 : 1;
        prompt_rows.push_back(row);
      }
    }
  }
  st.num_decode_entries = static_cast<int32_t>(st.entries.size());
  st.entries.insert(st.entries.end(), prompt_rows.begin(), prompt_rows.end());
  if (!read_by_slot.empty()) RETURN_IF_ERROR(ExcludePlainPrefills(plan, read_by_slot));

  const size_t seq_bytes = sizeof(kernels::KvPolicySeq) * st.seqs.size();
  const size_t entry_bytes = sizeof(kernels::KvPolicySeq) * st.entries.size();
  RETURN_IF_ERROR(Ensure(*this, st.seqs_dev, seq_bytes));
  RETURN_IF_ERROR(Ensure(*this, st.entries_dev, std::max<size_t>(entry_bytes, 1)));
  RETURN_IF_ERROR(CopyToDevice(st.seqs_dev.data(), st.seqs.data(), seq_bytes));  // pageable: staged
  RETURN_IF_ERROR(CopyToDevice(st.entries_dev.data(), st.entries.data(), entry_bytes));
  RETURN_IF_ERROR(CudaError(kernels::LaunchKvPolicyExtend(st.seqs_dev.as<kernels::KvPolicySeq>(),
                                                          static_cast<int>(st.seqs.size()), seqs[0]->num_layers(),
                                                          seqs[0]->num_kv_heads(), stream_),
                            "KV policy: extend"));
  for (const auto& [arr, len] : extended) arr->set_length(len);
  st.active = true;
  return absl::OkStatus();
}

absl::Status CudaBackend::KvPolicyAttention(const AttentionParams& p, const AttentionPlan& plan, bool decode) {
  if (!kv_policy_step_ || !kv_policy_step_->active) {
    return absl::FailedPreconditionError("cuda backend: attention with a KV policy before KvPolicyBeginStep");
  }
  CudaKvPolicyStep& st = *kv_policy_step_;
  const AttentionBatch& b = plan.batch();
  const bool quant = p.cache.quant != kernels::KvQuant::kNone;
  if ((!quant && p.cache.dtype != DType::kBF16) || p.q.dtype != DType::kBF16 || p.out.dtype != DType::kBF16 ||
      p.cache.k_width != p.cache.v_width || p.cache.k_width != static_cast<int64_t>(p.num_kv_heads) * p.head_dim) {
    return absl::UnimplementedError(absl::StrCat("cuda backend: KV policy attention: a bf16 or quantized cache of ",
                                                 p.num_kv_heads, " x ", p.head_dim,
                                                 " K and V values per slot and bf16 queries (got widths ",
                                                 p.cache.k_width, "/", p.cache.v_width, ")"));
  }
  kernels::KvPolicyCacheLayout layout;
  if (quant) {
    RETURN_IF_ERROR(QuantizedCacheGeometry("KV policy attention", p.cache, p.num_kv_heads, p.head_dim, p.head_dim,
                                           b.block_size, &layout.k_q, &layout.v_q));
    layout.kv_quant = p.cache.quant;
  }
  RETURN_IF_ERROR(PrepareGroups(*this, st, p.num_heads, p.num_kv_heads, p.head_dim));
  kernels::KvPolicyDecodeArgs a;
  a.q = static_cast<const __nv_bfloat16*>(p.q.data);
  a.q_stride = p.q.stride();
  a.out = static_cast<__nv_bfloat16*>(p.out.data);
  a.out_stride = p.out.stride();
  a.k_cache = static_cast<const __nv_bfloat16*>(p.cache.k);
  a.v_cache = static_cast<const __nv_bfloat16*>(p.cache.v);
  a.kv_stride = p.cache.k_width;
  a.layout = layout;
  a.block_tables = b.block_tables;
  a.max_blocks = b.max_blocks_per_seq;
  a.block_size = b.block_size;
  a.layer = p.kv_policy.layer;
  a.num_heads = p.num_heads;
  a.num_kv_heads = p.num_kv_heads;
  a.head_dim = p.head_dim;
  a.scale = p.scale;
  a.record_hits = true;
  a.scratch = st.scratch.data();
  const kvpolicy::KvPolicyConfig& cfg = p.kv_policy.seqs[0]->config();
  if (IsMikv(cfg)) {
    a.low_bits = cfg.low_bits;
    // The choice's balance reads this layer's keys (KvPolicyEndStep); the queries seen until a
    // head's first demotion, once per layer (the decode call comes first).
    const int32_t layers = p.kv_policy.seqs[0]->num_layers();
    if (static_cast<int32_t>(st.k_layers.size()) != layers) st.k_layers.assign(layers, nullptr);
    if (a.layer < 0 || a.layer >= layers) {
      return absl::InvalidArgumentError(absl::StrCat("KV policy attention: layer ", a.layer, " of ", layers));
    }
    st.k_layers[a.layer] = p.cache.k;
    st.layout = layout;
    st.block_tables = b.block_tables;
    st.max_blocks = b.max_blocks_per_seq;
    st.block_size = b.block_size;
    st.head_dim = p.head_dim;
    if (decode) {
      RETURN_IF_ERROR(CudaError(kernels::LaunchKvPolicyObserveQueries(
                                    st.seqs_dev.as<kernels::KvPolicySeq>(), static_cast<int>(st.seqs.size()), a.layer,
                                    a.q, a.q_stride, p.num_heads, p.num_kv_heads, p.head_dim, stream_),
                                "KV policy: MiKV query statistics"));
    }
  }
  for (const CudaKvPolicyStep::Group& g : decode ? st.decode_groups : st.prefill_groups) {
    a.seqs = st.entries_dev.as<kernels::KvPolicySeq>() + g.begin;
    a.num_seqs = g.count;
    a.max_seq_len = g.max_seq_len;
    RETURN_IF_ERROR(CudaError(kernels::LaunchKvPolicyDecode(a, stream_), "KV policy attention"));
  }
  return absl::OkStatus();
}

absl::Status CudaBackend::KvPolicyLatentAttention(const LatentAttentionParams& p, const kernels::LatentAttentionArgs& a) {
  if (!kv_policy_step_ || !kv_policy_step_->active) {
    return absl::FailedPreconditionError("cuda backend: latent attention with a KV policy before KvPolicyBeginStep");
  }
  CudaKvPolicyStep& st = *kv_policy_step_;
  const kvpolicy::KvPolicyConfig& cfg = p.kv_policy.seqs[0]->config();
  const int32_t low_bits = IsMikv(cfg) ? cfg.low_bits : 0;
  const int32_t layers = p.kv_policy.seqs[0]->num_layers();
  if (p.kv_policy.layer < 0 || p.kv_policy.layer >= layers) {
    return absl::InvalidArgumentError(absl::StrCat("KV policy latent attention: layer ", p.kv_policy.layer, " of ", layers));
  }
  RETURN_IF_ERROR(PrepareGroups(*this, st, p.num_heads, p.num_kv_heads, p.head_dim));
  kernels::KvPolicyLatentDecodeArgs la;
  la.latent = a;
  la.layer = p.kv_policy.layer;
  la.record_hits = true;
  la.low_bits = low_bits;
  la.scratch = st.scratch.data();
  // Decode entries, then prompt rows (their outputs only where read by slot: no_out otherwise).
  for (const auto* groups : {&st.decode_groups, &st.prefill_groups}) {
    for (const CudaKvPolicyStep::Group& g : *groups) {
      la.seqs = st.entries_dev.as<kernels::KvPolicySeq>() + g.begin;
      la.num_seqs = g.count;
      la.max_seq_len = g.max_seq_len;
      RETURN_IF_ERROR(CudaError(kernels::LaunchKvPolicyLatentDecode(la, stream_), "KV policy latent attention"));
    }
  }
  return absl::OkStatus();
}

absl::Status CudaBackend::KvPolicyEndStep(absl::Span<kvpolicy::SequenceKvPolicy* const> seqs) {
  if (seqs.empty()) return absl::OkStatus();
  if (!kv_policy_step_ || !kv_policy_step_->active || kv_policy_step_->seqs.size() != seqs.size()) {
    return absl::FailedPreconditionError("cuda backend: KvPolicyEndStep without its KvPolicyBeginStep");
  }
  CudaKvPolicyStep& st = *kv_policy_step_;
  st.active = false;
  const kvpolicy::KvPolicyConfig& cfg = seqs[0]->config();
  const int32_t heads = seqs[0]->num_layers() * seqs[0]->num_kv_heads();
  const size_t n = static_cast<size_t>(heads) * seqs.size();
  const bool mikv = IsMikv(cfg);
  const size_t parts = mikv ? 4 : 2;  // full, from (, low, low_from)
  RETURN_IF_ERROR(Ensure(*this, st.counts_dev, parts * n * sizeof(int32_t)));
  RETURN_IF_ERROR(Ensure(*this, st.counts_host, parts * n * sizeof(int32_t), /*host=*/true));
  kernels::KvPolicyChooseArgs c;
  c.seqs = st.seqs_dev.as<kernels::KvPolicySeq>();
  c.num_seqs = static_cast<int32_t>(seqs.size());
  c.num_layers = seqs[0]->num_layers();
  c.num_kv_heads = seqs[0]->num_kv_heads();
  c.sinks = cfg.sinks;
  c.recent = cfg.recent;
  c.window = cfg.window;
  c.victim_state = mikv ? kernels::kKvPolicyLow : kernels::kKvPolicyDead;
  c.full_counts = st.counts_dev.as<int32_t>();
  c.from_counts = st.counts_dev.as<int32_t>() + n;
  if (mikv) {
    c.low_counts = st.counts_dev.as<int32_t>() + 2 * n;
    c.low_from_counts = st.counts_dev.as<int32_t>() + 3 * n;
    c.balance_keys = seqs[0]->layer_shape(0).balance_keys;
    if (c.balance_keys) {
      if (static_cast<int32_t>(st.k_layers.size()) != c.num_layers ||
          std::find(st.k_layers.begin(), st.k_layers.end(), nullptr) != st.k_layers.end()) {
        return absl::FailedPreconditionError("cuda backend: KvPolicyEndStep: a layer's attention did not run this step");
      }
      const size_t bytes = st.k_layers.size() * sizeof(void*);
      RETURN_IF_ERROR(Ensure(*this, st.k_layers_dev, bytes));
      RETURN_IF_ERROR(CopyToDevice(st.k_layers_dev.data(), st.k_layers.data(), bytes));
      c.k_layers = st.k_layers_dev.as<const __nv_bfloat16* const>();
      c.kv_stride = static_cast<int64_t>(seqs[0]->num_kv_heads()) * st.head_dim;
      c.layout = st.layout;
      c.block_tables = st.block_tables;
      c.max_blocks = st.max_blocks;
      c.block_size = st.block_size;
      c.head_dim = st.head_dim;
    }
  }
  RETURN_IF_ERROR(CudaError(kernels::LaunchKvPolicyChoose(c, stream_), "KV policy: choose"));
  RETURN_IF_ERROR(CopyToHost(st.counts_host.data(), st.counts_dev.data(), parts * n * sizeof(int32_t)));
  RETURN_IF_ERROR(Synchronize());
  const int32_t* counts = st.counts_host.as<int32_t>();
  for (size_t i = 0; i < seqs.size(); ++i) {
    seqs[i]->SetDeviceCounts(st.seqs[i].count_from, counts + i * heads, counts + n + i * heads,
                             mikv ? counts + 2 * n + i * heads : nullptr, mikv ? counts + 3 * n + i * heads : nullptr);
    if (seqs[i]->choose()) seqs[i]->set_has_chosen();
  }
  return absl::OkStatus();
}

absl::Status CudaBackend::KvPolicyCompact(kvpolicy::SequenceKvPolicy& seq, absl::Span<const KvLayer> layers,
                                          int32_t block_size, absl::Span<const int32_t> block_table, int64_t from) {
  auto* arr = static_cast<CudaPolicyArrays*>(seq.device());
  if (arr == nullptr || arr->length() != seq.seq_len()) {
    return absl::FailedPreconditionError("KV policy compaction: the sequence has no device state of its length");
  }
  if (static_cast<int32_t>(layers.size()) != seq.num_layers() || layers.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("KV policy compaction: ", layers.size(), " cache layers for ",
                                                   seq.num_layers()));
  }
  const int32_t heads = seq.num_kv_heads();
  const int64_t width = layers[0].k_width;
  const int64_t head_dim = width / heads;
  const kernels::KvQuant quant = layers[0].quant;
  // Every layer of layer 0's kind and widths, 64 or 128 (a full-KV model), or per-layer sides (a
  // LoRC model: each latent layer's r_k / r_v).
  bool uniform = head_dim == 64 || head_dim == 128;  // the head widths the uniform kernels take
  for (const KvLayer& c : layers) uniform &= c.k_width == width && c.v_width == width;
  kernels::KvPolicyCacheLayout layout;
  layout.kv_quant = quant;
  if (quant != kernels::KvQuant::kNone && uniform) {
    RETURN_IF_ERROR(QuantizedCacheGeometry("KV policy compaction", layers[0], heads, head_dim, head_dim, block_size,
                                           &layout.k_q, &layout.v_q));
  }
  std::vector<kernels::KvPolicyLayerSides> sides(uniform ? 0 : layers.size());
  std::vector<__nv_bfloat16*> ptrs(2 * layers.size());
  for (size_t l = 0; l < layers.size(); ++l) {
    const KvLayer& c = layers[l];
    if (c.quant != quant || (quant == kernels::KvQuant::kNone && c.dtype != DType::kBF16) ||
        (quant != kernels::KvQuant::kNone && c.block_size != block_size) || c.k_width % heads != 0 ||
        c.v_width % heads != 0) {
      return absl::UnimplementedError(absl::StrCat("KV policy compaction: layer ", l,
                                                   " is not a bf16 or quantized cache of layer 0's kind"));
    }
    if (!uniform) {
      kernels::KvPolicyLayerSides& ls = sides[l];
      ls.k_dim = static_cast<int32_t>(c.k_width / heads);
      ls.v_dim = static_cast<int32_t>(c.v_width / heads);
      ls.k_stride = c.k_width;
      ls.v_stride = c.v_width;
      if (quant != kernels::KvQuant::kNone) {
        RETURN_IF_ERROR(QuantizedCacheGeometry("KV policy compaction", c, heads, ls.k_dim, ls.v_dim, block_size,
                                               &ls.k_q, &ls.v_q));
      }
    }
    ptrs[l] = static_cast<__nv_bfloat16*>(c.k);  // or a quantized layout's bytes (`layout`)
    ptrs[layers.size() + l] = static_cast<__nv_bfloat16*>(c.v);
  }
  if (static_cast<int64_t>(block_table.size()) * block_size < seq.num_slots() || from < 0 || from > seq.num_slots()) {
    return absl::InvalidArgumentError(absl::StrCat("KV policy compaction: a block table of ", block_table.size(),
                                                   " blocks for ", seq.num_slots(), " slots, from slot ", from));
  }
  CudaKvPolicyStep* st = kv_policy_step_.get();
  if (st == nullptr) {
    kv_policy_step_.reset(new CudaKvPolicyStep());
    st = kv_policy_step_.get();
  }
  // One upload: [KvPolicySeq][K pointers][V pointers][sides][block table], 16-byte aligned parts.
  const kernels::KvPolicySeq e = arr->Entry(seq.seq_len());
  auto up16 = [](size_t n) { return (n + 15) / 16 * 16; };
  const size_t at_ptrs = up16(sizeof(e));
  const size_t at_sides = at_ptrs + up16(ptrs.size() * sizeof(void*));
  const size_t at_table = at_sides + up16(sides.size() * sizeof(kernels::KvPolicyLayerSides));
  const size_t bytes = at_table + block_table.size() * sizeof(int32_t);
  std::vector<char> host(bytes);
  std::memcpy(host.data(), &e, sizeof(e));
  std::memcpy(host.data() + at_ptrs, ptrs.data(), ptrs.size() * sizeof(void*));
  if (!sides.empty()) std::memcpy(host.data() + at_sides, sides.data(), sides.size() * sizeof(sides[0]));
  std::memcpy(host.data() + at_table, block_table.data(), block_table.size() * sizeof(int32_t));
  // A compaction's upload must not overwrite the previous one's before its kernel ran: the copy
  // is stream-ordered after it.
  RETURN_IF_ERROR(Ensure(*this, st->compact_dev, bytes));
  RETURN_IF_ERROR(CopyToDevice(st->compact_dev.data(), host.data(), bytes));
  char* dev = st->compact_dev.as<char>();
  kernels::KvPolicyCompactArgs a;
  a.seq = reinterpret_cast<const kernels::KvPolicySeq*>(dev);
  a.k_layers = reinterpret_cast<__nv_bfloat16* const*>(dev + at_ptrs);
  a.v_layers = a.k_layers + layers.size();
  a.kv_stride = width;
  a.layout = layout;
  a.block_table = reinterpret_cast<const int32_t*>(dev + at_table);
  a.block_size = block_size;
  a.num_layers = seq.num_layers();
  a.num_kv_heads = seq.num_kv_heads();
  a.head_dim = static_cast<int32_t>(head_dim);
  a.from = static_cast<int32_t>(from);
  a.old_slots = static_cast<int32_t>(seq.num_slots());
  if (!sides.empty()) {
    a.sides = reinterpret_cast<const kernels::KvPolicyLayerSides*>(dev + at_sides);
    a.host_sides = sides.data();
  }
  if (!IsMikv(seq.config())) return CudaError(kernels::LaunchKvPolicyCompact(a, stream_), "KV policy compaction");
  // MiKV: each (layer, head) stages its low entries (at most DeviceLowToPack, the latest counts)
  // in a slice of `stage`; as many layers per launch as kMaxPolicyScratchBytes of staging holds.
  a.low_bits = seq.config().low_bits;
  int64_t entry = 0;  // K + V bytes of one key's entries, the widest layer's
  for (const KvLayer& c : layers) {
    entry = std::max(entry, kvpolicy::LowEntryBytes(c.k_width / heads, a.low_bits) +
                                kvpolicy::LowEntryBytes(c.v_width / heads, a.low_bits));
  }
  a.stage_head_bytes = std::max<int64_t>(seq.DeviceLowToPack(from), 1) * entry;
  const int64_t per_layer = a.stage_head_bytes * seq.num_kv_heads();
  const int32_t layers_per_launch = static_cast<int32_t>(
      std::clamp<int64_t>(static_cast<int64_t>(kMaxPolicyScratchBytes) / per_layer, 1, seq.num_layers()));
  RETURN_IF_ERROR(
      Ensure(*this, st->stage, static_cast<size_t>(per_layer * layers_per_launch), false, kMaxPolicyScratchBytes));
  a.stage = st->stage.as<uint8_t>();
  for (int32_t l = 0; l < seq.num_layers(); l += layers_per_launch) {
    a.layer0 = l;
    a.num_layers = std::min(layers_per_launch, seq.num_layers() - l);
    RETURN_IF_ERROR(CudaError(kernels::LaunchKvPolicyCompact(a, stream_), "KV policy compaction"));
  }
  return absl::OkStatus();
}

}  // namespace lorc::cuda_internal
#endif  // LORC_HAVE_CUDA
