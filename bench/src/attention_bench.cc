// Timings of the CUDA backend's paged attention in BF16 for Llama-3-8B heads (32 query / 8 KV
// heads, head_dim 128, block_size 16); not a test. Each measurement is a CUDA graph of kReps
// calls cycling over several layer caches (as a forward pass does; at least 256 MiB of KV in the
// cycle where memory allows, so small contexts are not served from the 60 MB L2), replayed after
// a warm-up; the best of 3 replays is kept.
// Decode: microseconds per layer (DecodeAttention: split-KV partial + merge kernels) and the KV
// read bandwidth (batch x context x 8 heads x 128 x 2 (K, V) x 2 bytes per layer time).
// Prefill: one whole causal prompt of T tokens, TFLOP/s counted as 4 x heads x head_dim x the
// number of (query, key) pairs attended (T (T + 1) / 2).
// LoRC: the latent decode (LatentAttention, kernels/attention_latent.cu) at ranks 64/64 (half the
// KV bytes) next to the full-KV decode at context 4k/16k/32k, batch 1 and 64, with each one's
// DRAM floor: its KV bytes (plus B_K, per KV head and CTA) at kFloorGBs, the H200's measured copy
// bandwidth (/work/shared/device/README.md). Table, then one JSON line.
// Usage: build/bin/attention_bench (needs a CUDA device).
#include <algorithm>
#include <cstdio>
#include <cmath>
#include <functional>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "backend/cuda_backend.h"
#include "bench/src/graph_timer.h"
#include "common/check.h"

namespace lorc {
namespace {

constexpr int kHeads = 32, kKvHeads = 8, kDim = 128, kBlock = 16, kReps = 32;
constexpr int64_t kCycleBytes = int64_t{256} << 20;
constexpr double kFloorGBs = 4275.0;

DeviceBuffer Filled(Backend& be, size_t bytes, int value) {
  auto b = be.Allocate(bytes);
  CHECK(b.ok()) << b.status();
  CHECK_OK(be.Memset(b->data(), value, bytes));
  return std::move(*b);
}

template <typename T>
DeviceBuffer Put(Backend& be, const std::vector<T>& v) {
  auto b = be.Allocate(v.size() * sizeof(T));
  CHECK(b.ok()) << b.status();
  CHECK_OK(be.CopyToDevice(b->data(), v.data(), v.size() * sizeof(T)));
  return std::move(*b);
}

// Microseconds per call: `op(i)` for i in [0, kReps) captured once, best of 3 replays.
double TimeUs(Backend& be, const std::function<void(int)>& op) {
  op(0);  // warm-up (and lazy kernel attributes) outside the capture
  return GraphMicrosPerCall(be, kReps, 3, ReplayStat::kBest, op);
}

// `batch` sequences of `ctx` cached tokens each, q_len `q_len` (1: decode), one cache per layer
// of the cycle; returns microseconds per layer. rank > 0: LoRC latents of ranks rank/rank
// through LatentAttention (decode and prefill in one call).
double Run(Backend& be, int batch, int ctx, int q_len, bool decode, int rank = 0) {
  const int blocks_per_seq = (ctx + kBlock - 1) / kBlock;
  const int64_t kv_width = kKvHeads * (rank > 0 ? rank : kDim), width = kHeads * kDim;
  const int64_t out_width = rank > 0 ? kHeads * rank : width;
  const int64_t layer_bytes = int64_t{batch} * blocks_per_seq * kBlock * kv_width * 2;
  const int layers = static_cast<int>(std::clamp<int64_t>(kCycleBytes / layer_bytes, 1, 16));
  DeviceBuffer k = Filled(be, layer_bytes * layers, 0x3c), v = Filled(be, layer_bytes * layers, 0x3c);
  const int tokens = batch * q_len;
  DeviceBuffer q = Filled(be, int64_t{tokens} * width * 2, 0x3c), out = Filled(be, int64_t{tokens} * out_width * 2, 0);
  std::vector<int32_t> qs(batch + 1), lens(batch, ctx), tables(int64_t{batch} * blocks_per_seq);
  for (int s = 0; s <= batch; ++s) qs[s] = s * q_len;
  for (size_t i = 0; i < tables.size(); ++i) tables[i] = static_cast<int32_t>(i);
  DeviceBuffer dqs = Put(be, qs), dlens = Put(be, lens), dtables = Put(be, tables);
  AttentionBatch b;
  b.num_seqs = batch;
  b.num_tokens = tokens;
  b.max_seq_len = ctx;
  b.max_blocks_per_seq = blocks_per_seq;
  b.block_size = kBlock;
  b.query_start = dqs.as<int32_t>();
  b.seq_lens = dlens.as<int32_t>();
  b.block_tables = dtables.as<int32_t>();
  b.host_query_start = qs.data();
  b.host_seq_lens = lens.data();
  auto plan = be.CreateAttentionPlan({std::max(batch, 256), std::max(tokens, 8192), blocks_per_seq});
  CHECK(plan.ok()) << plan.status();
  CHECK_OK(be.PlanAttention(b, **plan));
  if (rank > 0) {
    std::vector<float> inv_freq(kDim / 2);
    for (int i = 0; i < kDim / 2; ++i) inv_freq[i] = static_cast<float>(std::pow(500000.0, -2.0 * i / kDim));
    DeviceBuffer k_up = Filled(be, int64_t{kKvHeads} * kDim * rank * 2, 0x3c), freq = Put(be, inv_freq);
    LatentAttentionParams lp;
    lp.q = Tensor2D{q.data(), DType::kBF16, tokens, width, 0};
    lp.k_up = Tensor2D{k_up.data(), DType::kBF16, int64_t{kKvHeads} * kDim, rank, 0};
    lp.out = Tensor2D{out.data(), DType::kBF16, tokens, out_width, 0};
    lp.num_heads = kHeads;
    lp.num_kv_heads = kKvHeads;
    lp.head_dim = kDim;
    lp.k_rank = lp.v_rank = rank;
    lp.scale = 0.08838834764f;
    lp.inv_freq = freq.as<float>();
    lp.cache = KvLayer{k.data(), v.data(), kv_width, kv_width, DType::kBF16};
    CHECK_OK(be.LatentAttention(lp, **plan));  // teaches the plan the KV head count
    CHECK_OK(be.PlanAttention(b, **plan));
    return TimeUs(be, [&](int i) {
      const int64_t off = (i % layers) * layer_bytes;
      lp.cache = KvLayer{k.as<char>() + off, v.as<char>() + off, kv_width, kv_width, DType::kBF16};
      CHECK_OK(be.LatentAttention(lp, **plan));
    });
  }
  AttentionParams p;
  p.q = Tensor2D{q.data(), DType::kBF16, tokens, width, 0};
  p.out = Tensor2D{out.data(), DType::kBF16, tokens, width, 0};
  p.num_heads = kHeads;
  p.num_kv_heads = kKvHeads;
  p.head_dim = kDim;
  p.scale = 0.08838834764f;
  if (decode) {  // a first call teaches the plan the KV head count, then plan again
    p.cache = KvLayer{k.data(), v.data(), kv_width, kv_width, DType::kBF16};
    CHECK_OK(be.DecodeAttention(p, **plan));
    CHECK_OK(be.PlanAttention(b, **plan));
  }
  return TimeUs(be, [&](int i) {
    const int64_t off = (i % layers) * layer_bytes;
    p.cache = KvLayer{k.as<char>() + off, v.as<char>() + off, kv_width, kv_width, DType::kBF16};
    CHECK_OK(decode ? be.DecodeAttention(p, **plan) : be.PrefillAttention(p, **plan));
  });
}

int Main() {
  auto made = CreatePartialCudaBackend(BackendOptions{BackendKind::kCuda});
  if (!made.ok()) {
    std::fprintf(stderr, "%s\n", std::string(made.status().message()).c_str());
    return 1;
  }
  Backend& be = **made;
  std::printf("%s\nLlama-3-8B attention: %d q / %d kv heads, head_dim %d, block_size %d, bf16\n",
              be.Describe().c_str(), kHeads, kKvHeads, kDim, kBlock);
  std::printf("decode (per layer)          us      KV GB/s\n");
  const std::pair<int, int> decode_cases[] = {{1, 128}, {8, 128}, {64, 128}, {256, 128}, {1, 4096},
                                              {8, 4096}, {64, 4096}, {256, 4096}, {1, 32768}};
  for (const auto& [batch, ctx] : decode_cases) {
    const double us = Run(be, batch, ctx, 1, true);
    const double bytes = double{1.0} * batch * ctx * kKvHeads * kDim * 2 * 2;
    std::printf("  batch %3d x ctx %5d  %9.2f  %9.0f\n", batch, ctx, us, bytes / us * 1e-3);
  }
  std::printf("prefill (per layer, causal) us      TFLOP/s\n");
  for (const int t : {512, 4096}) {
    const double us = Run(be, 1, t, t, false);
    const double flops = 4.0 * kHeads * kDim * (double{1.0} * t * (t + 1) / 2);
    std::printf("  1 x %5d tokens        %9.2f  %9.1f\n", t, us, flops / us * 1e-6);
  }
  {
    const double us = Run(be, 8, 512, 512, false);
    const double flops = 8 * 4.0 * kHeads * kDim * (512.0 * 513 / 2);
    std::printf("  8 x   512 tokens        %9.2f  %9.1f\n", us, flops / us * 1e-6);
  }
  // LoRC latent decode vs full KV, ranks 64/64: per layer, and each one's DRAM floor.
  constexpr int kRank = 64;
  std::printf("LoRC latent decode (ranks %d/%d) vs full-KV decode, per layer; floor = KV bytes / %.0f GB/s\n",
              kRank, kRank, kFloorGBs);
  std::printf("  batch x ctx        full us  floor us  latent us  floor us  latent/full\n");
  std::string json = "{\"bench\":\"attention_latent_decode\",\"device\":\"" + be.Describe() +
                     "\",\"heads\":32,\"kv_heads\":8,\"head_dim\":128,\"k_rank\":64,\"v_rank\":64,"
                     "\"floor_gbs\":" + std::to_string(kFloorGBs) + ",\"cases\":[";
  bool first = true;
  for (const int batch : {1, 64}) {
    for (const int ctx : {4096, 16384, 32768}) {
      const double full = Run(be, batch, ctx, 1, true);
      const double lat = Run(be, batch, ctx, 1, true, kRank);
      const double tokens = double{1.0} * batch * ctx * kKvHeads;
      const double full_floor = tokens * kDim * 2 * 2 / kFloorGBs * 1e-3;
      const double lat_floor = (tokens * kRank * 2 * 2 + double{1.0} * kKvHeads * kDim * kRank * 2) / kFloorGBs * 1e-3;
      std::printf("  %3d x %5d      %9.2f %9.2f  %9.2f %9.2f  %9.3f\n", batch, ctx, full, full_floor, lat, lat_floor,
                  lat / full);
      char buf[256];
      std::snprintf(buf, sizeof(buf),
                    "%s{\"batch\":%d,\"ctx\":%d,\"full_us\":%.2f,\"full_floor_us\":%.2f,\"latent_us\":%.2f,"
                    "\"latent_floor_us\":%.2f}",
                    first ? "" : ",", batch, ctx, full, full_floor, lat, lat_floor);
      json += buf;
      first = false;
    }
  }
  {
    const double full = Run(be, 1, 4096, 4096, false), lat = Run(be, 1, 4096, 4096, false, kRank);
    std::printf("  prefill 1 x 4096 (causal): full %.2f us, latent %.2f us\n", full, lat);
    char buf[128];
    std::snprintf(buf, sizeof(buf), "],\"prefill_4096\":{\"full_us\":%.2f,\"latent_us\":%.2f}}", full, lat);
    json += buf;
  }
  std::printf("%s\n", json.c_str());
  return 0;
}

}  // namespace
}  // namespace lorc

int main() { return lorc::Main(); }
