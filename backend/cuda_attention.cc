// CudaBackend's paged attention: the plan (split-KV work lists in a fixed device workspace),
// decode (kernels/attention_decode.cu), prefill (kernels/attention_prefill.cu) and LoRC latent
// attention over the same plan (kernels/attention_latent.cu). BF16 activations; the cache BF16
// or quantized (fp8 / int8 / int4 codes dequantized inside the kernels).
#include "backend/cuda_backend_impl.h"

#ifdef LORC_HAVE_CUDA
#include <algorithm>
#include <cstdlib>
#include <initializer_list>
#include <string_view>
#include <utility>
#include <vector>

#include "common/env_switch.h"
#include "kernels/attention_latent.cuh"
#include "kernels/attention_paged.cuh"
#include "kernels/elem_type.cuh"

namespace lorc::cuda_internal {

absl::Status QuantizedCacheGeometry(const char* op, const KvLayer& c, int32_t num_kv_heads, int64_t k_head,
                                    int64_t v_head, int32_t block_size, kernels::KvqSide* k_q, kernels::KvqSide* v_q) {
  RETURN_IF_ERROR(CheckQuantizedCache(op, c));
  if (c.num_kv_heads != num_kv_heads || c.block_size != block_size || c.k_width != num_kv_heads * k_head ||
      c.v_width != num_kv_heads * v_head) {
    return absl::InvalidArgumentError(absl::StrCat("cuda backend: ", op, ": quantized cache of ", c.num_kv_heads,
                                                   " KV heads, block_size ", c.block_size, ", widths ", c.k_width,
                                                   "/", c.v_width, " for ", num_kv_heads, " KV heads of ", k_head,
                                                   "/", v_head, " values and block_size ", block_size));
  }
  *k_q = kernels::MakeKvqSide(c.quant, c.block_size, num_kv_heads, k_head);
  *v_q = kernels::MakeKvqSide(c.quant, c.block_size, num_kv_heads, v_head);
  if (!kernels::KvqSideReadable(c.quant, *k_q, block_size) || !kernels::KvqSideReadable(c.quant, *v_q, block_size)) {
    return absl::UnimplementedError(absl::StrCat("cuda backend: ", op, ": quantized cache with head widths ", k_head,
                                                 "/", v_head, " and block_size ", c.block_size,
                                                 " not implemented (head widths multiples of 8, 16-byte blocks)"));
  }
  return absl::OkStatus();
}

namespace {

// Split-KV heuristic: aim for this many decode CTAs per SM (work items x KV heads), never cut a
// sequence into chunks shorter than kMinChunk keys, prefer chunks of at least kLongChunk keys
// whenever they still give 1.5 CTAs per SM (and no more items than the target), and hold at
// most kPartialsPerSm x SMs partial (out, lse) slots. The kLongChunk rule comes from
// LORC_DECODE_SPLIT A/Bs on an H200 (Llama-3-8B shape, 8 KV heads, 132 SMs, 2026-12-02,
// docs/PERFORMANCE.md), batch 1: 4,096 keys ran 4.75-4.88 ms a step in chunks of 128 (264 CTAs)
// against 4.98-5.07 in chunks of 82 (400 CTAs) and 5.06-5.08 in chunks of 256 (136 CTAs); 2,048
// keys 4.66-4.69 in chunks of 64 (264 CTAs) against 4.73-4.81 in chunks of 128 (136 CTAs); 1,024
// and 128 keys faster in chunks of 64.
constexpr int kTargetCtasPerSm = 3;
constexpr int kMinChunk = 64;
constexpr int kLongChunk = 128;
constexpr int kPartialsPerSm = 4;
// KV heads assumed by the first plan, before a decode call has shown the real count.
constexpr int kDefaultKvHeads = 8;
// Prefill split-KV (bf16 cache): a grid of fewer than kPrefillSplitBelowCtasPerSm x SMs CTAs (two
// flash CTAs are resident per SM) is split so that about kPrefillSplitTargetCtasPerSm x SMs run,
// no piece shorter than kPrefillMinSplitKeys keys (the merge's fp32 round trip must stay small
// next to the attention it spreads), as far as the partial buffers hold them.
constexpr int kPrefillSplitBelowCtasPerSm = 2;
constexpr int kPrefillSplitTargetCtasPerSm = 4;
constexpr int kPrefillMinSplitKeys = 512;

// The device workspace: [counts: 2 x int32, padded to 16 bytes][work items][merge items], one
// buffer so PlanAttention refreshes it with one copy; plus the fp32 partial outputs.
class CudaAttentionPlan final : public AttentionPlan {
 public:
  absl::Status Plan(Backend& be, const AttentionBatch& b);
  // Takes batch sequences `seqs` (ascending) out of the prefills the paged kernel runs.
  absl::Status ExcludePrefills(Backend& be, absl::Span<const int32_t> seqs);
  kernels::DecodeSchedule decode_schedule() const;
  // Tiles of rows / group query tokens (rows: kernels::PrefillTileRows, or kLatentRows for
  // latent attention), not split.
  kernels::PrefillSchedule prefill_schedule(int group, int rows) const;
  // PrefillAttention's schedule for `a`: its tiles and, over a bf16 cache, the split-KV choice.
  kernels::PrefillSchedule paged_prefill_schedule(const kernels::PagedAttentionArgs& a) const;

  AttentionLimits limits;
  int num_sms = 1;
  int max_work = 0, max_partials = 0;
  // Learned from the last decode call (the split heuristic only; correctness never depends on it):
  // KV heads, resident decode CTAs per SM and the shortest chunk worth a CTA (full-KV decode:
  // kTargetCtasPerSm / kMinChunk; latent decode: its own, set by LatentAttention).
  mutable int kv_heads_hint = kDefaultKvHeads;
  mutable int ctas_per_sm_hint = kTargetCtasPerSm;
  mutable int min_chunk_hint = kMinChunk;
  mutable int long_chunk_hint = kLongChunk;
  int num_work_ = 0;  // host: the work items of the latest Plan
  // The full-KV decode's split heuristic (LORC_DECODE_SPLIT="ctas_per_sm,min_chunk[,long_chunk]"
  // overrides it for A/B measurements; long_chunk defaults to min_chunk there, i.e. no rule).
  int decode_ctas_per_sm = kTargetCtasPerSm;
  int decode_min_chunk = kMinChunk;
  // DecodeSchedule::early_kv: -1 below kernels::kDecodeEarlyKvMaxSeqs decodes, 0 off, 1 on
  // (LORC_DECODE_EARLY_KV=0 / =1, A/B measurements; -1 by the decodes).
  int decode_early_kv = -1;
  int decode_long_chunk = kLongChunk;

  // Work items the split heuristic aims at when decodes are fewer.
  int target_work_items() const {
    return std::max(1, (ctas_per_sm_hint * num_sms + kv_heads_hint - 1) / kv_heads_hint);
  }
  // The most work items a plan of at most `num_seqs` sequences has: unsplit, one per decode;
  // split (fewer decodes than the target), ceil(len / chunk) per sequence with chunk >=
  // keys / target, so at most target + num_seqs.
  int max_work_items(int num_seqs) const {
    return static_cast<int>(std::min<int64_t>(max_work, int64_t{num_seqs} + target_work_items()));
  }
  DeviceBuffer workspace, partial_out, partial_lse, merge_counters;
  // Host staging of the workspace (pageable: CopyToDevice has consumed it when it returns).
  std::vector<char> host;
  std::vector<int32_t> prefill_q_lens;  // host, the prefills' q_len in prefill order
  int32_t prefill_max_seq_len = 0;      // host, the longest prefill's seq_len

  size_t work_offset() const { return 16; }
  size_t merge_offset() const { return 16 + sizeof(kernels::DecodeWorkItem) * max_work; }
  size_t prefill_offset() const { return merge_offset() + sizeof(kernels::DecodeMergeItem) * limits.max_num_seqs; }
  size_t workspace_bytes() const { return prefill_offset() + sizeof(int32_t) * limits.max_num_seqs; }
};

absl::Status CudaAttentionPlan::ExcludePrefills(Backend& be, absl::Span<const int32_t> seqs) {
  auto* counts = reinterpret_cast<int32_t*>(host.data());
  auto* prefill_seqs = reinterpret_cast<int32_t*>(host.data() + prefill_offset());
  int32_t kept = 0;
  prefill_q_lens.clear();
  prefill_max_seq_len = 0;
  for (int32_t i = 0; i < counts[2]; ++i) {
    const int32_t s = prefill_seqs[i];
    if (std::binary_search(seqs.begin(), seqs.end(), s)) continue;
    prefill_seqs[kept++] = s;
    prefill_q_lens.push_back(batch_.host_query_start[s + 1] - batch_.host_query_start[s]);
    prefill_max_seq_len = std::max(prefill_max_seq_len, batch_.host_seq_lens[s]);
  }
  counts[2] = kept;
  num_prefills_ = kept;
  return be.CopyToDevice(workspace.data(), host.data(), host.size());
}

absl::Status CudaAttentionPlan::Plan(Backend& be, const AttentionBatch& b) {
  if (b.num_seqs < 0 || b.num_seqs > limits.max_num_seqs) {
    return absl::InvalidArgumentError(absl::StrCat("attention plan: ", b.num_seqs,
                                                   " sequences exceed max_num_seqs ", limits.max_num_seqs));
  }
  if (b.num_tokens > limits.max_num_batched_tokens) {
    return absl::InvalidArgumentError(absl::StrCat("attention plan: ", b.num_tokens,
                                                   " tokens exceed max_num_batched_tokens ",
                                                   limits.max_num_batched_tokens));
  }
  if (b.max_blocks_per_seq > limits.max_blocks_per_seq || b.block_size <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("attention plan: max_blocks_per_seq ", b.max_blocks_per_seq,
                                                   " exceeds ", limits.max_blocks_per_seq, " or block_size ",
                                                   b.block_size, " <= 0"));
  }
  std::vector<int32_t> decodes, prefills;
  int64_t decode_keys = 0;
  prefill_q_lens.clear();
  prefill_max_seq_len = 0;
  for (int32_t s = 0; s < b.num_seqs; ++s) {
    const int32_t q_len = b.host_query_start[s + 1] - b.host_query_start[s];
    const int32_t len = b.host_seq_lens[s];
    if (q_len < 0 || len < q_len || len > static_cast<int64_t>(b.max_blocks_per_seq) * b.block_size) {
      return absl::InvalidArgumentError(absl::StrCat("attention plan: sequence ", s, " has ", q_len,
                                                     " queries and seq_len ", len));
    }
    if (q_len == 1) {
      decodes.push_back(s);
      decode_keys += len;
    } else if (q_len > 1) {
      prefills.push_back(s);
      prefill_q_lens.push_back(q_len);
      prefill_max_seq_len = std::max(prefill_max_seq_len, len);
    }
  }

  // Split-KV: with fewer decodes than the target work items, cut sequences into chunks of
  // `chunk` keys (the keys spread evenly over the target), doubling it until the partial slots fit.
  const int target_items = target_work_items();
  int64_t chunk = INT32_MAX;
  if (static_cast<int>(decodes.size()) < target_items && decode_keys > 0) {
    chunk = std::max<int64_t>(min_chunk_hint, (decode_keys + target_items - 1) / target_items);
    if (chunk < long_chunk_hint) {
      // Only to trade CTAs for length (fewer items than the target); never to re-cut many short
      // sequences (e.g. 32 x 129 keys: 128 + 1 instead of 83 + 46), which was not measured.
      int64_t long_items = 0;
      for (int32_t s : decodes) {
        long_items += (int64_t{b.host_seq_lens[s]} + long_chunk_hint - 1) / long_chunk_hint;
      }
      const bool enough_ctas = 2 * long_items * kv_heads_hint >= 3 * static_cast<int64_t>(num_sms);
      if (long_items <= target_items && enough_ctas) {
        chunk = long_chunk_hint;
      }
    }
    for (;;) {
      int64_t partials = 0;
      for (int32_t s : decodes) {
        const int64_t n = (b.host_seq_lens[s] + chunk - 1) / chunk;
        if (n > 1) partials += n;
      }
      if (partials <= max_partials) break;
      chunk *= 2;
    }
  }
  host.assign(workspace_bytes(), 0);
  auto* counts = reinterpret_cast<int32_t*>(host.data());
  auto* work = reinterpret_cast<kernels::DecodeWorkItem*>(host.data() + work_offset());
  auto* merge = reinterpret_cast<kernels::DecodeMergeItem*>(host.data() + merge_offset());
  auto* prefill_seqs = reinterpret_cast<int32_t*>(host.data() + prefill_offset());
  int num_work = 0, num_merge = 0, next_partial = 0;
  for (int32_t s : decodes) {
    const int64_t len = b.host_seq_lens[s];
    const int64_t n = (len + chunk - 1) / chunk;
    if (n <= 1) {
      work[num_work++] = {s, 0, static_cast<int32_t>(len), -1, -1};
      continue;
    }
    merge[num_merge++] = {s, next_partial, static_cast<int32_t>(n), 0};
    for (int64_t c = 0; c < n; ++c) {
      work[num_work++] = {s, static_cast<int32_t>(c * chunk), static_cast<int32_t>(std::min(len, (c + 1) * chunk)),
                          next_partial++, num_merge - 1};
    }
  }
  counts[0] = num_work;
  num_work_ = num_work;
  counts[1] = num_merge;
  counts[2] = static_cast<int32_t>(prefills.size());
  std::copy(prefills.begin(), prefills.end(), prefill_seqs);
  RETURN_IF_ERROR(be.CopyToDevice(workspace.data(), host.data(), host.size()));
  batch_ = b;
  num_decodes_ = static_cast<int32_t>(decodes.size());
  num_prefills_ = static_cast<int32_t>(prefills.size());
  return absl::OkStatus();
}

kernels::DecodeSchedule CudaAttentionPlan::decode_schedule() const {
  kernels::DecodeSchedule s;
  const char* base = workspace.as<char>();
  s.counts = reinterpret_cast<const int32_t*>(base);
  s.work = reinterpret_cast<const kernels::DecodeWorkItem*>(base + work_offset());
  s.merge = reinterpret_cast<const kernels::DecodeMergeItem*>(base + merge_offset());
  s.max_work = max_work;
  s.max_merge = limits.max_num_seqs;
  s.partial_out = partial_out.as<float>();
  s.partial_lse = partial_lse.as<float>();
  s.num_sms = num_sms;
  s.merge_counters = merge_counters.as<int32_t>();
  return s;
}

kernels::PrefillSchedule CudaAttentionPlan::prefill_schedule(int group, int rows) const {
  kernels::PrefillSchedule s;
  const char* base = workspace.as<char>();
  s.prefill_seqs = reinterpret_cast<const int32_t*>(base + prefill_offset());
  s.num_prefills = reinterpret_cast<const int32_t*>(base) + 2;
  const int tq = rows / group;
  for (int32_t q_len : prefill_q_lens) s.num_tiles += (q_len + tq - 1) / tq;
  return s;
}

kernels::PrefillSchedule CudaAttentionPlan::paged_prefill_schedule(const kernels::PagedAttentionArgs& a) const {
  const int group = a.num_heads / a.num_kv_heads;
  kernels::PrefillSchedule s = prefill_schedule(group, kernels::PrefillTileRows(a.kv_quant));
  const int64_t ctas = static_cast<int64_t>(s.num_tiles) * a.num_kv_heads;
  if (a.kv_quant != kernels::KvQuant::kNone || ctas == 0 || ctas >= kPrefillSplitBelowCtasPerSm * num_sms) return s;
  const int64_t rows = kernels::kPrefillRowsBf16;
  const int64_t max_ctas = std::min<int64_t>(
      static_cast<int64_t>(max_partials) * kernels::kMaxPartialWidth / (rows * a.head_dim),
      static_cast<int64_t>(max_partials) * kernels::kMaxPartialHeads / rows);
  const int64_t target = static_cast<int64_t>(kPrefillSplitTargetCtasPerSm) * num_sms;
  const int64_t splits = std::min({(target + ctas - 1) / ctas, int64_t{prefill_max_seq_len} / kPrefillMinSplitKeys,
                                   max_ctas / ctas});
  if (splits < 2) return s;
  s.num_splits = static_cast<int32_t>(splits);
  s.partial_out = partial_out.as<float>();
  s.partial_lse = partial_lse.as<float>();
  s.max_split_ctas = static_cast<int32_t>(max_ctas);
  return s;
}

// Unimplemented naming the op and the tensor unless every tensor is BF16 (the attention kernels'
// one element type).
absl::Status RequireBf16(const char* op, std::initializer_list<std::pair<const char*, DType>> tensors) {
  for (const auto& [name, dt] : tensors) {
    if (dt != DType::kBF16) {
      return absl::UnimplementedError(absl::StrCat("cuda backend: ", op, ": ", name, " dtype ", DTypeName(dt),
                                                   " not implemented (BF16)"));
    }
  }
  return absl::OkStatus();
}

// Fills kv_quant, k_q and v_q of the kernels' arguments (QuantizedCacheGeometry).
template <typename Args>
absl::Status QuantizedCacheArgs(const char* op, const KvLayer& c, int32_t num_kv_heads, int64_t k_head,
                                int64_t v_head, const AttentionBatch& b, Args& a) {
  RETURN_IF_ERROR(QuantizedCacheGeometry(op, c, num_kv_heads, k_head, v_head, b.block_size, &a.k_q, &a.v_q));
  a.kv_quant = c.quant;
  return absl::OkStatus();
}

// Checks what both paths need and fills the kernels' arguments.
absl::StatusOr<kernels::PagedAttentionArgs> KernelArgs(const char* op, const AttentionParams& p,
                                                       const AttentionBatch& b) {
  const bool quant = p.cache.quant != kernels::KvQuant::kNone;
  RETURN_IF_ERROR(quant ? RequireBf16(op, {{"query", p.q.dtype}, {"output", p.out.dtype}})
                        : RequireBf16(op, {{"query", p.q.dtype}, {"output", p.out.dtype}, {"cache", p.cache.dtype}}));
  if (p.num_kv_heads <= 0 || p.num_heads <= 0 || p.num_heads % p.num_kv_heads != 0) {
    return absl::InvalidArgumentError(absl::StrCat("cuda backend: ", op, ": ", p.num_heads, " query heads over ",
                                                   p.num_kv_heads, " KV heads"));
  }
  const int group = p.num_heads / p.num_kv_heads;
  if ((p.head_dim != 64 && p.head_dim != 128) || group > 8) {
    return absl::UnimplementedError(absl::StrCat("cuda backend: ", op, ": head_dim ", p.head_dim, " with ", group,
                                                 " query heads per KV head not implemented (64 or 128; at most 8)"));
  }
  const int64_t width = static_cast<int64_t>(p.num_heads) * p.head_dim;
  const int64_t kv_width = static_cast<int64_t>(p.num_kv_heads) * p.head_dim;
  if (p.q.cols != width || p.out.cols != width || p.cache.k_width < kv_width || p.cache.v_width < kv_width ||
      width > kernels::kMaxPartialWidth) {
    return absl::InvalidArgumentError(absl::StrCat("cuda backend: ", op, ": q[", p.q.rows, ",", p.q.cols, "] out[",
                                                   p.out.rows, ",", p.out.cols, "] cache widths ", p.cache.k_width,
                                                   "/", p.cache.v_width, " for ", p.num_heads, "x", p.head_dim,
                                                   " query and ", p.num_kv_heads, " KV heads"));
  }
  kernels::PagedAttentionArgs a;
  a.q = p.q.data;
  a.q_ld = p.q.stride();
  a.out = p.out.data;
  a.out_ld = p.out.stride();
  a.k_cache = p.cache.k;
  a.v_cache = p.cache.v;
  a.k_ld = p.cache.k_width;
  a.v_ld = p.cache.v_width;
  a.num_heads = p.num_heads;
  a.num_kv_heads = p.num_kv_heads;
  a.head_dim = p.head_dim;
  a.scale = p.scale;
  a.query_start = b.query_start;
  a.seq_lens = b.seq_lens;
  a.block_tables = b.block_tables;
  a.max_blocks_per_seq = b.max_blocks_per_seq;
  a.block_size = b.block_size;
  if (quant) RETURN_IF_ERROR(QuantizedCacheArgs(op, p.cache, p.num_kv_heads, p.head_dim, p.head_dim, b, a));
  if (!kernels::Aligned16(a.q) || !kernels::Aligned16(a.out) || !kernels::Aligned16(a.k_cache) ||
      !kernels::Aligned16(a.v_cache) || a.q_ld % 8 || a.out_ld % 8 || a.k_ld % 8 || a.v_ld % 8) {
    return absl::InvalidArgumentError(absl::StrCat("cuda backend: ", op, ": q, out and cache need 16-byte aligned "
                                                   "rows (row strides ", a.q_ld, ", ", a.out_ld, ", ", a.k_ld, ", ",
                                                   a.v_ld, " elements)"));
  }
  return a;
}

// LatentAttention's checks (errors name the field) and the kernels' arguments.
absl::StatusOr<kernels::LatentAttentionArgs> LatentKernelArgs(const LatentAttentionParams& p, const AttentionBatch& b) {
  const bool quant = p.cache.quant != kernels::KvQuant::kNone;
  RETURN_IF_ERROR(quant ? RequireBf16("LatentAttention",
                                      {{"query", p.q.dtype}, {"k_up", p.k_up.dtype}, {"output", p.out.dtype}})
                        : RequireBf16("LatentAttention", {{"query", p.q.dtype}, {"k_up", p.k_up.dtype},
                                                          {"output", p.out.dtype}, {"cache", p.cache.dtype}}));
  const int hd = p.head_dim, rk = p.k_rank, rv = p.v_rank;
  if (p.num_kv_heads <= 0 || p.num_heads <= 0 || p.num_heads % p.num_kv_heads != 0 || hd <= 0 || hd % 2 != 0 ||
      rk < 1 || rk > hd || rv < 1 || rv > hd) {
    return absl::InvalidArgumentError(absl::StrCat("cuda backend: LatentAttention: ", p.num_heads,
                                                   " query heads over ", p.num_kv_heads, " KV heads, head_dim ", hd,
                                                   ", k_rank ", rk, ", v_rank ", rv));
  }
  if (p.cache.k_width != static_cast<int64_t>(p.num_kv_heads) * rk ||
      p.cache.v_width != static_cast<int64_t>(p.num_kv_heads) * rv ||
      p.k_up.rows != static_cast<int64_t>(p.num_kv_heads) * hd || p.k_up.cols != rk ||
      p.q.cols != static_cast<int64_t>(p.num_heads) * hd || p.out.cols != static_cast<int64_t>(p.num_heads) * rv ||
      p.out.rows != p.q.rows) {
    return absl::InvalidArgumentError(absl::StrCat(
        "cuda backend: LatentAttention: shapes q[", p.q.rows, ",", p.q.cols, "] k_up[", p.k_up.rows, ",", p.k_up.cols,
        "] out[", p.out.rows, ",", p.out.cols, "] cache widths ", p.cache.k_width, "/", p.cache.v_width,
        " do not match ", p.num_heads, " query heads, ", p.num_kv_heads, " KV heads, head_dim ", hd, ", k_rank ", rk,
        ", v_rank ", rv));
  }
  if (!kernels::LatentShapeSupported(p.num_heads, p.num_kv_heads, hd, rk, rv)) {
    return absl::UnimplementedError(absl::StrCat(
        "cuda backend: LatentAttention: head_dim ", hd, ", ", p.num_heads / p.num_kv_heads,
        " query heads per KV head, k_rank ", rk, ", v_rank ", rv,
        " not implemented (head_dim 128; group 1, 2, 4, 8 or 16; ranks multiples of 8)"));
  }
  if (p.inv_freq == nullptr) return absl::InvalidArgumentError("cuda backend: LatentAttention: inv_freq is null");
  kernels::LatentAttentionArgs a;
  a.q = p.q.data;
  a.q_ld = p.q.stride();
  a.out = p.out.data;
  a.out_ld = p.out.stride();
  a.k_up = p.k_up.data;
  a.k_up_ld = p.k_up.stride();
  a.k_cache = p.cache.k;
  a.v_cache = p.cache.v;
  a.k_ld = p.cache.k_width;
  a.v_ld = p.cache.v_width;
  a.num_heads = p.num_heads;
  a.num_kv_heads = p.num_kv_heads;
  a.head_dim = hd;
  a.k_rank = rk;
  a.v_rank = rv;
  a.scale = p.scale;
  a.inv_freq = p.inv_freq;
  a.query_start = b.query_start;
  a.seq_lens = b.seq_lens;
  a.block_tables = b.block_tables;
  a.max_blocks_per_seq = b.max_blocks_per_seq;
  a.block_size = b.block_size;
  if (quant) RETURN_IF_ERROR(QuantizedCacheArgs("LatentAttention", p.cache, p.num_kv_heads, rk, rv, b, a));
  if (!kernels::Aligned16(a.q) || !kernels::Aligned16(a.out) || !kernels::Aligned16(a.k_up) ||
      !kernels::Aligned16(a.k_cache) || !kernels::Aligned16(a.v_cache) || a.q_ld % 8 || a.out_ld % 8 ||
      a.k_up_ld % 8) {
    return absl::InvalidArgumentError(absl::StrCat(
        "cuda backend: LatentAttention: q, out, k_up and cache need 16-byte aligned rows (row strides ", a.q_ld, ", ",
        a.out_ld, ", ", a.k_up_ld, " elements)"));
  }
  return a;
}

}  // namespace

absl::StatusOr<std::unique_ptr<AttentionPlan>> CudaBackend::CreateAttentionPlan(const AttentionLimits& limits) {
  if (limits.max_num_seqs <= 0 || limits.max_num_batched_tokens <= 0 || limits.max_blocks_per_seq <= 0) {
    return absl::InvalidArgumentError("cuda backend: attention limits must be positive");
  }
  auto plan = std::make_unique<CudaAttentionPlan>();
  plan->limits = limits;
  RETURN_IF_ERROR(CudaError(cudaDeviceGetAttribute(&plan->num_sms, cudaDevAttrMultiProcessorCount, device_),
                            "CreateAttentionPlan: SM count"));
  if (const char* e = std::getenv("LORC_DECODE_SPLIT"); e != nullptr && *e != '\0') {
    std::vector<int64_t> v;  // CTAS_PER_SM, MIN_CHUNK[, LONG_CHUNK]
    bool ok = true;
    for (std::string_view rest(e); ok;) {
      const size_t comma = rest.find(',');
      int64_t x = 0;
      ok = ParseEnvInt(rest.substr(0, comma), &x) && x > 0 && x <= (1 << 20);
      v.push_back(x);
      if (comma == std::string_view::npos) break;
      rest.remove_prefix(comma + 1);
    }
    if (ok && (v.size() == 2 || v.size() == 3)) {
      plan->decode_ctas_per_sm = static_cast<int>(v[0]);
      plan->decode_min_chunk = static_cast<int>(v[1]);
      plan->decode_long_chunk = static_cast<int>(v.back());
    } else {
      ReportEnvSwitch("LORC_DECODE_SPLIT", e, "CTAS_PER_SM,MIN_CHUNK[,LONG_CHUNK] (integers in [1, 1048576])");
    }
  }
  plan->decode_early_kv = static_cast<int>(EnvIntOf("LORC_DECODE_EARLY_KV", {-1, 0, 1}, plan->decode_early_kv));
  plan->max_partials = std::max(64, kPartialsPerSm * plan->num_sms);
  plan->max_work = limits.max_num_seqs + plan->max_partials;
  ASSIGN_OR_RETURN(plan->workspace, Allocate(plan->workspace_bytes()));
  RETURN_IF_ERROR(Memset(plan->workspace.data(), 0, plan->workspace_bytes()));
  ASSIGN_OR_RETURN(plan->partial_out,
                   Allocate(sizeof(float) * plan->max_partials * static_cast<size_t>(kernels::kMaxPartialWidth)));
  ASSIGN_OR_RETURN(plan->partial_lse,
                   Allocate(sizeof(float) * plan->max_partials * static_cast<size_t>(kernels::kMaxPartialHeads)));
  const size_t counter_bytes = sizeof(int32_t) * limits.max_num_seqs * static_cast<size_t>(kernels::kMaxPartialHeads);
  ASSIGN_OR_RETURN(plan->merge_counters, Allocate(counter_bytes));
  RETURN_IF_ERROR(Memset(plan->merge_counters.data(), 0, counter_bytes));
  return std::unique_ptr<AttentionPlan>(std::move(plan));
}

absl::Status CudaBackend::PlanAttention(const AttentionBatch& batch, AttentionPlan& plan) {
  return static_cast<CudaAttentionPlan&>(plan).Plan(*this, batch);
}

absl::Status CudaBackend::ExcludePlainPrefills(AttentionPlan& plan, absl::Span<const int32_t> seqs) {
  return static_cast<CudaAttentionPlan&>(plan).ExcludePrefills(*this, seqs);
}

absl::Status CudaBackend::DecodeAttention(const AttentionParams& p, const AttentionPlan& plan) {
  if (p.kv_policy.seqs != nullptr) return KvPolicyAttention(p, plan, /*decode=*/true);  // cuda_kv_policy.cc
  const auto& cp = static_cast<const CudaAttentionPlan&>(plan);
  ASSIGN_OR_RETURN(const kernels::PagedAttentionArgs a, KernelArgs("DecodeAttention", p, plan.batch()));
  cp.kv_heads_hint = p.num_kv_heads;
  cp.ctas_per_sm_hint = cp.decode_ctas_per_sm;
  cp.min_chunk_hint = cp.decode_min_chunk;
  cp.long_chunk_hint = cp.decode_long_chunk;
  kernels::DecodeSchedule s = cp.decode_schedule();
  // A captured launch replays over any later plan of its batch size (the capture's num_seqs);
  // an eager one runs this plan only.
  s.grid_work = capturing_ ? cp.max_work_items(plan.batch().num_seqs) : std::max(1, cp.num_work_);
  s.num_decodes = capturing_ ? plan.batch().num_seqs : cp.num_decodes();
  s.early_kv = cp.decode_early_kv >= 0 ? cp.decode_early_kv == 1 : s.num_decodes < kernels::kDecodeEarlyKvMaxSeqs;
  return CudaError(kernels::LaunchDecodeAttention(a, s, stream_), "DecodeAttention");
}

absl::Status CudaBackend::LatentAttention(const LatentAttentionParams& p, const AttentionPlan& plan) {
  const auto& cp = static_cast<const CudaAttentionPlan&>(plan);
  ASSIGN_OR_RETURN(const kernels::LatentAttentionArgs a, LatentKernelArgs(p, plan.batch()));
  if (p.kv_policy.seqs != nullptr) {
    // Under a KV policy (graphs off): the decodes and the prompt rows the policy reads
    // (cuda_kv_policy.cc), the other prompts' outputs by the plain prefill (KvPolicyBeginStep took
    // the prompts read through the slot map out of its schedule).
    if (cp.num_prefills() > 0) {
      RETURN_IF_ERROR(CudaError(kernels::LaunchLatentPrefill(
                                    a, cp.prefill_schedule(p.num_heads / p.num_kv_heads, kernels::kLatentRows), stream_),
                                "LatentAttention prefill"));
    }
    return KvPolicyLatentAttention(p, a);
  }
  cp.kv_heads_hint = p.num_kv_heads;
  cp.ctas_per_sm_hint = kernels::kLatentDecodeCtasPerSm;
  cp.min_chunk_hint = kernels::kLatentMinChunk;
  cp.long_chunk_hint = kernels::kLatentMinChunk;  // no long-chunk rule measured for latents
  // A captured step always launches the decode kernels (the replayed plan may hold decodes).
  if (cp.num_decodes() > 0 || capturing_) {
    RETURN_IF_ERROR(CudaError(kernels::LaunchLatentDecode(a, cp.decode_schedule(), stream_), "LatentAttention decode"));
  }
  if (cp.num_prefills() == 0) return absl::OkStatus();
  const int group = p.num_heads / p.num_kv_heads;
  return CudaError(kernels::LaunchLatentPrefill(a, cp.prefill_schedule(group, kernels::kLatentRows), stream_),
                   "LatentAttention prefill");
}

absl::Status CudaBackend::PrefillAttention(const AttentionParams& p, const AttentionPlan& plan) {
  const auto& cp = static_cast<const CudaAttentionPlan&>(plan);
  ASSIGN_OR_RETURN(const kernels::PagedAttentionArgs a, KernelArgs("PrefillAttention", p, plan.batch()));
  const int group = p.num_heads / p.num_kv_heads;
  if (kernels::PrefillTileRows(a.kv_quant) % group != 0) {
    return absl::UnimplementedError(absl::StrCat("cuda backend: PrefillAttention: ", group,
                                                 " query heads per KV head not implemented (1, 2, 4 or 8)"));
  }
  if (cp.num_prefills() > 0) {
    RETURN_IF_ERROR(
        CudaError(kernels::LaunchPrefillAttention(a, cp.paged_prefill_schedule(a), stream_), "PrefillAttention"));
  }
  // A KV policy's prompt rows (cuda_kv_policy.cc): importance, and the rows read by slot.
  if (p.kv_policy.seqs != nullptr) return KvPolicyAttention(p, plan, /*decode=*/false);
  return absl::OkStatus();
}

}  // namespace lorc::cuda_internal
#endif
