// ModelRunner's start-up over a probe cache (the matmul warm-up, the decode graphs' memory) and
// its decode graphs: the padded sizes, the capture and the choice of a graph for a step. See
// model_runner.h.
#include <algorithm>
#include <functional>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "worker/model_runner.h"

namespace lorc {

std::vector<int32_t> DecodeGraphSizes(int32_t max_rows) {
  std::vector<int32_t> sizes;
  for (int32_t n : {1, 2, 4}) {
    if (n <= max_rows) sizes.push_back(n);
  }
  for (int32_t n = 8; n <= max_rows; n += 8) sizes.push_back(n);
  if (max_rows > 0 && sizes.back() != max_rows) sizes.push_back(max_rows);
  return sizes;
}

int DecodeGraphIndex(absl::Span<const SequenceStep> steps, absl::Span<const int32_t> graph_sizes) {
  if (graph_sizes.empty() || steps.empty()) return -1;
  for (const SequenceStep& s : steps) {
    if (s.tokens.size() != 1) return -1;
  }
  const auto it = std::lower_bound(graph_sizes.begin(), graph_sizes.end(), static_cast<int32_t>(steps.size()));
  if (it == graph_sizes.end()) return -1;
  return static_cast<int>(it - graph_sizes.begin());
}

int ModelRunner::FindDecodeGraph(absl::Span<const SequenceStep> steps) const {
  return graphs_.empty() ? -1 : DecodeGraphIndex(steps, graph_sizes_);
}

std::vector<int32_t> MatmulWarmUpSizes(int32_t max_num_batched_tokens, int32_t max_rows) {
  std::vector<int32_t> sizes = {max_num_batched_tokens, max_rows};
  for (int64_t n = 1; n < max_num_batched_tokens; n *= 2) sizes.push_back(static_cast<int32_t>(n));
  std::sort(sizes.begin(), sizes.end(), std::greater<>());
  sizes.erase(std::unique(sizes.begin(), sizes.end()), sizes.end());
  return sizes;
}

absl::Status ModelRunner::PrepareDummyStep(int32_t tokens, int32_t seqs) {
  int32_t* hm = meta_host_.as<int32_t>();
  int32_t* dm = meta_.as<int32_t>();
  const MetaLayout& m = meta_at_;
  const int32_t mb = max_blocks_per_seq_;
  int32_t max_len = 0;
  hm[m.query_start] = 0;
  for (int32_t i = 0; i < seqs; ++i) {
    const int32_t begin = static_cast<int32_t>(static_cast<int64_t>(tokens) * i / seqs);
    const int32_t end = static_cast<int32_t>(static_cast<int64_t>(tokens) * (i + 1) / seqs);
    for (int32_t r = begin; r < end; ++r) {
      hm[m.ids + r] = 0;
      hm[m.positions + r] = r - begin;
      hm[m.slots + r] = -1;
    }
    hm[m.logit_rows + i] = end - 1;
    hm[m.query_start + i + 1] = end;
    hm[m.seq_lens + i] = end - begin;
    max_len = std::max(max_len, end - begin);
    std::fill(hm + m.tables + static_cast<int64_t>(i) * mb, hm + m.tables + static_cast<int64_t>(i + 1) * mb, 0);
  }
  // The whole used prefix of the metadata in one copy (the dummy step fills every region's head).
  RETURN_IF_ERROR(backend_->CopyToDevice(dm, hm, static_cast<size_t>(m.total) * sizeof(int32_t)));
  AttentionBatch batch;
  batch.num_seqs = seqs;
  batch.num_tokens = tokens;
  batch.max_seq_len = max_len;
  batch.max_blocks_per_seq = mb;
  batch.block_size = kv_spec_.block_size;
  batch.query_start = dm + m.query_start;
  batch.seq_lens = dm + m.seq_lens;
  batch.block_tables = dm + m.tables;
  batch.host_query_start = hm + m.query_start;
  batch.host_seq_lens = hm + m.seq_lens;
  return backend_->PlanAttention(batch, *plan_);
}

absl::StatusOr<std::vector<DeviceBuffer>> ModelRunner::AttachProbeCache() {
  std::vector<DeviceBuffer> probe;
  kv_layers_.clear();
  for (int l = 0; l < kv_spec_.num_layers(); ++l) {
    ASSIGN_OR_RETURN(DeviceBuffer k, backend_->Allocate(static_cast<size_t>(kv_spec_.block_size) * kv_spec_.KBytesPerToken(l)));
    ASSIGN_OR_RETURN(DeviceBuffer v, backend_->Allocate(static_cast<size_t>(kv_spec_.block_size) * kv_spec_.VBytesPerToken(l)));
    kv_layers_.push_back(CacheLayer(l, k.data(), v.data()));
    probe.push_back(std::move(k));
    probe.push_back(std::move(v));
  }
  return probe;
}

absl::Status ModelRunner::WarmUpMatmuls() {
  const int32_t max_len = limits_.max_model_len;
  for (int32_t n : MatmulWarmUpSizes(limits_.max_num_batched_tokens, max_logit_rows_)) {
    if (n <= max_logit_rows_) {
      RETURN_IF_ERROR(PrepareDummyStep(n, n));
      RETURN_IF_ERROR(Forward(n, n));
      continue;
    }
    const int32_t seqs = static_cast<int32_t>((static_cast<int64_t>(n) + max_len - 1) / max_len);
    if (seqs > limits_.max_num_seqs) continue;  // no step has n tokens
    RETURN_IF_ERROR(PrepareDummyStep(n, seqs));
    RETURN_IF_ERROR(Forward(n, 0));
  }
  return backend_->Synchronize();
}

absl::StatusOr<std::unique_ptr<Graph>> ModelRunner::CaptureDecode(int32_t n) {
  RETURN_IF_ERROR(PrepareDummyStep(n, n));
  RETURN_IF_ERROR(Forward(n, n));  // warm-up: matmul algorithms are picked (timed) outside capture
  RETURN_IF_ERROR(backend_->Synchronize());
  RETURN_IF_ERROR(backend_->BeginCapture());
  const absl::Status s = Forward(n, n);
  absl::StatusOr<std::unique_ptr<Graph>> g = backend_->EndCapture();
  if (!s.ok()) return s;
  if (!g.ok()) return g.status();
  RETURN_IF_ERROR(backend_->Synchronize());
  return g;
}

absl::StatusOr<int64_t> ModelRunner::MeasureGraphMemory() {
  // Over the probe cache (AttachProbeCache): the dummy step writes nothing and reads block 0.
  const int32_t largest = graph_sizes_.back();
  RETURN_IF_ERROR(backend_->Synchronize());
  const int64_t free0 = backend_->GetMemoryInfo().free_bytes;
  // The warm-up's own allocations (matmul workspaces, if any) stay for the process: count once.
  RETURN_IF_ERROR(PrepareDummyStep(largest, largest));
  RETURN_IF_ERROR(Forward(largest, largest));
  RETURN_IF_ERROR(backend_->Synchronize());
  const int64_t free1 = backend_->GetMemoryInfo().free_bytes;
  absl::StatusOr<std::unique_ptr<Graph>> g = CaptureDecode(largest);
  const int64_t free2 = backend_->GetMemoryInfo().free_bytes;
  if (!g.ok()) {
    return absl::Status(g.status().code(), absl::StrCat("decode graph of ", largest, " rows: ",
                                                        g.status().message(), " (--enforce-eager runs without graphs)"));
  }
  const int64_t per_graph = std::max<int64_t>(0, free1 - free2);
  return std::max<int64_t>(0, free0 - free1) + per_graph * static_cast<int64_t>(graph_sizes_.size());
}

absl::Status ModelRunner::CaptureDecodeGraphs() {
  const int64_t free0 = backend_->GetMemoryInfo().free_bytes;
  graphs_.clear();
  for (int32_t n : graph_sizes_) {
    absl::StatusOr<std::unique_ptr<Graph>> g = CaptureDecode(n);
    if (!g.ok()) {
      return absl::Status(g.status().code(), absl::StrCat("decode graph of ", n, " rows: ", g.status().message(),
                                                          " (--enforce-eager runs without graphs)"));
    }
    graphs_.push_back(*std::move(g));
  }
  graph_memory_bytes_ = std::max<int64_t>(0, free0 - backend_->GetMemoryInfo().free_bytes);
  return absl::OkStatus();
}

}  // namespace lorc
