// ModelRunner's decode graphs: the padded sizes, the start-up capture (and its memory, measured
// before the KV cache is sized) and the choice of a graph for a step. See model_runner.h.
#include <algorithm>
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

absl::Status ModelRunner::PrepareDummyDecode(int32_t n) {
  int32_t* hm = meta_host_.as<int32_t>();
  int32_t* dm = meta_.as<int32_t>();
  const MetaLayout& m = meta_at_;
  const int32_t mb = max_blocks_per_seq_;
  for (int32_t i = 0; i < n; ++i) {
    hm[m.ids + i] = 0;
    hm[m.positions + i] = 0;
    hm[m.slots + i] = -1;
    hm[m.logit_rows + i] = i;
    hm[m.query_start + i] = i;
    hm[m.seq_lens + i] = 1;
    std::fill(hm + m.tables + static_cast<int64_t>(i) * mb, hm + m.tables + static_cast<int64_t>(i + 1) * mb, 0);
  }
  hm[m.query_start + n] = n;
  // The whole used prefix of the metadata in one copy (the dummy step fills every region's head).
  RETURN_IF_ERROR(backend_->CopyToDevice(dm, hm, static_cast<size_t>(m.total) * sizeof(int32_t)));
  AttentionBatch batch;
  batch.num_seqs = n;
  batch.num_tokens = n;
  batch.max_seq_len = 1;
  batch.max_blocks_per_seq = mb;
  batch.block_size = kv_spec_.block_size;
  batch.query_start = dm + m.query_start;
  batch.seq_lens = dm + m.seq_lens;
  batch.block_tables = dm + m.tables;
  batch.host_query_start = hm + m.query_start;
  batch.host_seq_lens = hm + m.seq_lens;
  return backend_->PlanAttention(batch, *plan_);
}

absl::StatusOr<std::unique_ptr<Graph>> ModelRunner::CaptureDecode(int32_t n) {
  RETURN_IF_ERROR(PrepareDummyDecode(n));
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
  // A one-block cache per layer stands in for the real one: the dummy step writes nothing
  // (slot -1) and its attention reads block 0.
  std::vector<DeviceBuffer> probe;
  for (int l = 0; l < kv_spec_.num_layers(); ++l) {
    ASSIGN_OR_RETURN(DeviceBuffer k, backend_->Allocate(static_cast<size_t>(kv_spec_.block_size) * kv_spec_.KBytesPerToken(l)));
    ASSIGN_OR_RETURN(DeviceBuffer v, backend_->Allocate(static_cast<size_t>(kv_spec_.block_size) * kv_spec_.VBytesPerToken(l)));
    kv_layers_.push_back(CacheLayer(l, k.data(), v.data()));
    probe.push_back(std::move(k));
    probe.push_back(std::move(v));
  }
  const int32_t largest = graph_sizes_.back();
  RETURN_IF_ERROR(backend_->Synchronize());
  const int64_t free0 = backend_->GetMemoryInfo().free_bytes;
  // The warm-up's own allocations (matmul workspaces, if any) stay for the process: count once.
  RETURN_IF_ERROR(PrepareDummyDecode(largest));
  RETURN_IF_ERROR(Forward(largest, largest));
  RETURN_IF_ERROR(backend_->Synchronize());
  const int64_t free1 = backend_->GetMemoryInfo().free_bytes;
  absl::StatusOr<std::unique_ptr<Graph>> g = CaptureDecode(largest);
  const int64_t free2 = backend_->GetMemoryInfo().free_bytes;
  kv_layers_.clear();
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
