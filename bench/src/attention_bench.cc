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
// --kv-cache-dtype bf16|fp8|int8|int4: instead, the decode at context 4096, batch 1 and 64, and
// the causal prefill of 4096 tokens over a cache of that dtype (kernels/kv_quant.h: codes and
// fp16 scales), full KV and LoRC latents (ranks 64/64), each decode with its DRAM floor (the
// cache's bytes, scales included, plus B_K for latents, at kFloorGBs). Table, then one JSON line.
// --prefill: only the bf16 prefill cases: causal prompts of 512 and 4096 tokens, 8 x 512, and
// chunks of 256 / 512 query tokens after 16k cached tokens (prefix-cache hits; the TFLOP/s count
// the pairs q_len x (ctx - q_len) + q_len (q_len + 1) / 2).
// --kv-policy: token-level KV policies (kernels/kv_policy.cuh, issue #17) at contexts 16k and 32k,
// batch 1, 8 and 64: the paged decode over full KV, then the policy decode (its tensor-core and
// its CUDA-core kernels, a row each) with every key kept,
// with 30 % kept (sinks, the recent 32 and a random 30 % of the rest; the KV bytes it reads
// fall with it), and the same without recording importance (the statistics' cost is the
// difference); and CORM's choice over 32 layers x 8 KV heads at a 30 % budget with 64 positions
// over it a step (the new positions re-marked first: the steady state of one token a step, with
// margin). Table, then one JSON line. With --kv-cache-dtype fp8|int8|int4 as well: the same over
// a cache of that dtype (paged and policy decode reading codes and scales; MiKV's columns run the
// CUDA-core kernels on either row: MiKV over a quantized cache has no tensor-core kernel).
// --kv-policy --lorc: CORM and MiKV over LoRC latents of ranks 64/64 (kernels/kv_policy.cuh
// LaunchKvPolicyLatentDecode) at the same contexts and batches: the paged latent decode, then
// CORM's with every key kept, 30 % kept, 30 % compacted and 30 % without recording importance,
// then MiKV's (int4; int2 over an int4 cache) at 30 % kept with the others demoted in their slots
// and compacted (the others packed in runs), each with its DRAM floor (the latents and entries
// read, scales included, at kFloorGBs).
// Usage: build/bin/attention_bench [--kv-cache-dtype D] [--prefill | --kv-policy [--lorc]] (needs
// a CUDA device).
#include <algorithm>
#include <cstdio>
#include <cmath>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "backend/cuda_backend.h"
#include "bench/src/graph_timer.h"
#include "common/check.h"
#include "kernels/kv_policy.cuh"
#include "kernels/kv_quant.h"

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

using kernels::KvQuant;

// Bytes of one token's K (or V) of one layer: bf16 elements or codes and scales.
int64_t SideBytesPerToken(KvQuant q, int64_t head_width) {
  return q == KvQuant::kNone ? kKvHeads * head_width * 2 : kernels::KvqTokenBytes(q, kKvHeads, head_width);
}

// `batch` sequences of `ctx` cached tokens each, q_len `q_len` (1: decode), one cache per layer
// of the cycle; returns microseconds per layer. rank > 0: LoRC latents of ranks rank/rank
// through LatentAttention (decode and prefill in one call). quant: the cache's storage (kNone:
// bf16); its bytes are filled with 0x3c (finite codes and scales).
double Run(Backend& be, int batch, int ctx, int q_len, bool decode, int rank = 0, KvQuant quant = KvQuant::kNone) {
  const int blocks_per_seq = (ctx + kBlock - 1) / kBlock;
  const int64_t kv_width = kKvHeads * (rank > 0 ? rank : kDim), width = kHeads * kDim;
  const int64_t out_width = rank > 0 ? kHeads * rank : width;
  const int64_t layer_bytes =
      int64_t{batch} * blocks_per_seq * kBlock * SideBytesPerToken(quant, rank > 0 ? rank : kDim);
  const DType cache_dtype = quant == KvQuant::kNone ? DType::kBF16 : DType::kU8;
  auto layer = [&](void* kp, void* vp) {
    return KvLayer{kp, vp, kv_width, kv_width, cache_dtype, quant, kKvHeads, kBlock};
  };
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
    lp.cache = layer(k.data(), v.data());
    CHECK_OK(be.LatentAttention(lp, **plan));  // teaches the plan the KV head count
    CHECK_OK(be.PlanAttention(b, **plan));
    return TimeUs(be, [&](int i) {
      const int64_t off = (i % layers) * layer_bytes;
      lp.cache = layer(k.as<char>() + off, v.as<char>() + off);
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
    p.cache = layer(k.data(), v.data());
    CHECK_OK(be.DecodeAttention(p, **plan));
    CHECK_OK(be.PlanAttention(b, **plan));
  }
  return TimeUs(be, [&](int i) {
    const int64_t off = (i % layers) * layer_bytes;
    p.cache = layer(k.as<char>() + off, v.as<char>() + off);
    CHECK_OK(decode ? be.DecodeAttention(p, **plan) : be.PrefillAttention(p, **plan));
  });
}

// --kv-cache-dtype: decode at ctx 4096 (batch 1, 64) and prefill 1 x 4096 over a cache of
// `name`'s dtype, full KV and latents of ranks 64/64, with the decode floors.
int DtypeTable(Backend& be, const std::string& name, KvQuant q) {
  constexpr int kRank = 64, kCtx = 4096;
  std::printf("%s\nLlama-3-8B attention (32 q / 8 kv heads x 128, block_size 16), kv cache %s; floor = cache bytes "
              "(scales included) / %.0f GB/s\n",
              be.Describe().c_str(), name.c_str(), kFloorGBs);
  std::printf("  decode batch x ctx   full us  floor us  latent us  floor us\n");
  std::string json = "{\"bench\":\"attention_kv_cache_dtype\",\"kv_cache_dtype\":\"" + name + "\",\"device\":\"" +
                     be.Describe() + "\",\"k_rank\":64,\"v_rank\":64,\"floor_gbs\":" + std::to_string(kFloorGBs) +
                     ",\"decode\":[";
  for (const int batch : {1, 64}) {
    const double full = Run(be, batch, kCtx, 1, true, 0, q), lat = Run(be, batch, kCtx, 1, true, kRank, q);
    const double tokens = double{1.0} * batch * kCtx;
    const double full_floor = tokens * 2 * SideBytesPerToken(q, kDim) / kFloorGBs * 1e-3;
    const double lat_floor =
        (tokens * 2 * SideBytesPerToken(q, kRank) + double{1.0} * kKvHeads * kDim * kRank * 2) / kFloorGBs * 1e-3;
    std::printf("  %3d x %5d         %9.2f %9.2f  %9.2f %9.2f\n", batch, kCtx, full, full_floor, lat, lat_floor);
    char buf[256];
    std::snprintf(buf, sizeof(buf),
                  "%s{\"batch\":%d,\"ctx\":%d,\"full_us\":%.2f,\"full_floor_us\":%.2f,\"latent_us\":%.2f,"
                  "\"latent_floor_us\":%.2f}",
                  batch == 1 ? "" : ",", batch, kCtx, full, full_floor, lat, lat_floor);
    json += buf;
  }
  const double pf = Run(be, 1, kCtx, kCtx, false, 0, q), pl = Run(be, 1, kCtx, kCtx, false, kRank, q);
  std::printf("  prefill 1 x %d (causal): full %.2f us, latent %.2f us\n", kCtx, pf, pl);
  char buf[128];
  std::snprintf(buf, sizeof(buf), "],\"prefill_4096\":{\"full_us\":%.2f,\"latent_us\":%.2f}}", pf, pl);
  std::printf("%s%s\n", json.c_str(), buf);
  return 0;
}

// Causal prefill TFLOP/s: `batch` sequences of seq_len `ctx`, the last `q_len` tokens queried.
int PrefillTable(Backend& be) {
  std::printf("%s\nLlama-3-8B prefill attention: %d q / %d kv heads, head_dim %d, block_size %d, bf16\n",
              be.Describe().c_str(), kHeads, kKvHeads, kDim, kBlock);
  std::printf("prefill (per layer, causal)        us      TFLOP/s\n");
  std::string json = "{\"bench\":\"attention_prefill\",\"device\":\"" + be.Describe() + "\",\"cases\":[";
  const int cases[][3] = {{1, 512, 512}, {1, 4096, 4096}, {8, 512, 512}, {1, 8192, 8192},
                          {1, 16384 + 256, 256}, {1, 16384 + 512, 512}};
  bool first = true;
  for (const auto& c : cases) {
    const int batch = c[0], ctx = c[1], q_len = c[2];
    const double us = Run(be, batch, ctx, q_len, false);
    const double pairs = double{1.0} * q_len * (ctx - q_len) + double{1.0} * q_len * (q_len + 1) / 2;
    const double tflops = batch * 4.0 * kHeads * kDim * pairs / us * 1e-6;
    std::printf("  %d x %5d queries, seq_len %5d  %9.2f  %9.1f\n", batch, q_len, ctx, us, tflops);
    char buf[160];
    std::snprintf(buf, sizeof(buf), "%s{\"batch\":%d,\"q_len\":%d,\"seq_len\":%d,\"us\":%.2f,\"tflops\":%.1f}",
                  first ? "" : ",", batch, q_len, ctx, us, tflops);
    json += buf;
    first = false;
  }
  std::printf("%s]}\n", json.c_str());
  return 0;
}

// The policy states RunPolicy and RunLatentPolicy decode over: per sequence [layers][kv heads][ctx]
// positions with identity slots (slot -> position the same map), last_hit = position, kFull for
// sinks 4, the recent 32 and a random share `kept` of the rest, the others `other` (kDead, or
// MiKV's kKvPolicyLow). `seqs` point into the device arrays, which the struct owns.
struct BenchStates {
  DeviceBuffer state, slot, last_hit;
  std::vector<kernels::KvPolicySeq> seqs;
};
BenchStates MakeBenchStates(Backend& be, int batch, int ctx, int layers, double kept, uint8_t other) {
  BenchStates b;
  const size_t per_seq = static_cast<size_t>(layers) * kKvHeads * ctx;
  std::vector<uint8_t> state(per_seq * batch);
  std::vector<int32_t> slot(per_seq * batch);
  std::mt19937 rng(1);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  for (size_t i = 0; i < state.size(); ++i) {
    const int p = static_cast<int>(i % ctx);
    state[i] = p < 4 || p >= ctx - 32 || u(rng) < kept ? kernels::kKvPolicyFull : other;
    slot[i] = p;
  }
  b.state = Put(be, state);
  b.slot = Put(be, slot);
  b.last_hit = Put(be, slot);
  b.seqs.resize(batch);
  for (int s = 0; s < batch; ++s) {
    b.seqs[s].state = b.state.as<uint8_t>() + s * per_seq;
    b.seqs[s].slot = b.slot.as<int32_t>() + s * per_seq;
    b.seqs[s].pos = b.slot.as<int32_t>() + s * per_seq;
    b.seqs[s].last_hit = b.last_hit.as<int32_t>() + s * per_seq;
    b.seqs[s].capacity = ctx;
    b.seqs[s].seq_len = ctx;
  }
  return b;
}

// --kv-policy: one layer's policy decode (the tensor-core kernels, or with `cuda_cores` the
// CUDA-core ones), `batch` sequences of `ctx` keys, a fraction `kept` of them kFull (sinks 4 and
// the recent 32 always); cycles over layer caches as Run does. MiKV (low_bits 4 / 2): the others
// kLow (read quantized on the fly), and `packed` entries per head in a packed run after the ctx
// slots (what a compacted sequence's demoted keys become).
double RunPolicy(Backend& be, bool cuda_cores, int batch, int ctx, double kept, bool record_hits, int low_bits = 0,
                 int packed = 0, KvQuant quant = KvQuant::kNone) {
  // A packed run's slots: entries over the head's region of a slot (bf16 row, or its codes).
  const int64_t region = quant == KvQuant::kNone ? 2 * kDim : kernels::KvqHeadCodeBytes(quant, kDim);
  const int64_t run_slots = low_bits > 0 ? (int64_t{packed} * (kDim * low_bits / 8 + 4) + region - 1) / region : 0;
  const int blocks_per_seq = static_cast<int>((ctx + run_slots + kBlock - 1) / kBlock);
  const int64_t kv_width = kKvHeads * kDim, width = kHeads * kDim;
  const int64_t layer_bytes = int64_t{batch} * blocks_per_seq * kBlock * SideBytesPerToken(quant, kDim);
  const int layers = static_cast<int>(std::clamp<int64_t>(kCycleBytes / layer_bytes, 1, 16));
  DeviceBuffer k = Filled(be, layer_bytes * layers, 0x3c), v = Filled(be, layer_bytes * layers, 0x3c);
  DeviceBuffer q = Filled(be, int64_t{batch} * width * 2, 0x3c), out = Filled(be, int64_t{batch} * width * 2, 0);
  std::vector<int32_t> tables(int64_t{batch} * blocks_per_seq);
  for (size_t i = 0; i < tables.size(); ++i) tables[i] = static_cast<int32_t>(i);
  DeviceBuffer dtables = Put(be, tables);
  BenchStates bs =
      MakeBenchStates(be, batch, ctx, layers, kept, low_bits > 0 ? kernels::kKvPolicyLow : kernels::kKvPolicyDead);
  // MiKV's per-head arrays (read only here, shared by the sequences): runs at slot ctx, balance 1.
  const size_t lheads = static_cast<size_t>(layers) * kKvHeads;
  std::vector<int32_t> ints(3 * lheads);
  for (size_t i = 0; i < lheads; ++i) {
    ints[i] = ctx;
    ints[lheads + i] = packed;
    ints[2 * lheads + i] = kernels::kKvBalanceFixed;
  }
  DeviceBuffer dints = Put(be, ints), dbalance = Put(be, std::vector<float>(lheads * kDim, 1.0f));
  for (kernels::KvPolicySeq& e : bs.seqs) {
    if (low_bits == 0) break;
    e.low_base = dints.as<int32_t>();
    e.num_packed = dints.as<int32_t>() + lheads;
    e.balance_set = dints.as<int32_t>() + 2 * lheads;
    e.balance = dbalance.as<float>();
    e.packed_max = packed;
  }
  DeviceBuffer dseqs = Put(be, bs.seqs);
  auto scratch = be.Allocate(kernels::KvPolicyDecodeScratchBytes(batch, kHeads, kKvHeads, kDim, ctx + packed));
  CHECK(scratch.ok()) << scratch.status();
  kernels::KvPolicyDecodeArgs a;
  a.q = q.as<__nv_bfloat16>();
  a.q_stride = a.out_stride = width;
  a.out = out.as<__nv_bfloat16>();
  a.kv_stride = kv_width;
  if (quant != KvQuant::kNone) {
    a.layout.kv_quant = quant;
    a.layout.k_q = a.layout.v_q = kernels::MakeKvqSide(quant, kBlock, kKvHeads, kDim);
  }
  a.block_tables = dtables.as<int32_t>();
  a.max_blocks = blocks_per_seq;
  a.block_size = kBlock;
  a.seqs = dseqs.as<kernels::KvPolicySeq>();
  a.num_seqs = batch;
  a.num_heads = kHeads;
  a.num_kv_heads = kKvHeads;
  a.head_dim = kDim;
  a.max_seq_len = ctx + packed;
  a.scale = 0.08838834764f;
  a.record_hits = record_hits;
  a.low_bits = low_bits;
  a.scratch = scratch->data();
  a.cuda_cores = cuda_cores;
  const auto stream = static_cast<cudaStream_t>(be.stream_handle());
  return TimeUs(be, [&](int i) {
    const int64_t off = (i % layers) * layer_bytes;
    a.k_cache = reinterpret_cast<const __nv_bfloat16*>(k.as<char>() + off);
    a.v_cache = reinterpret_cast<const __nv_bfloat16*>(v.as<char>() + off);
    a.layer = i % layers;
    CHECK_EQ(kernels::LaunchKvPolicyDecode(a, stream), cudaSuccess);
  });
}

// --kv-policy --lorc: one layer's policy decode over LoRC latents of ranks `rank` / `rank` (the
// tensor-core latent policy kernel), `batch` sequences of `ctx` keys, a fraction `kept` kFull as
// RunPolicy's; cycles over layer caches as Run does. MiKV (low_bits 4 / 2): the others kLow in
// their slots, or (`compacted`) the kept keys in slots [0, F) and the others packed in a run after
// them, what a compaction leaves (the walk: F + run slots, then the run's entries).
double RunLatentPolicy(Backend& be, int batch, int ctx, double kept, bool record_hits, int rank, KvQuant quant,
                       int low_bits = 0, bool compacted = false) {
  // The compacted MiKV layout, the same for every (sequence, layer, head): position p kFull when
  // p < 4, p >= ctx - 32 or p % 10 < 10 x kept, else packed.
  std::vector<int32_t> full_pos, low_pos;
  for (int p = 0; compacted && p < ctx; ++p) {
    (p < 4 || p >= ctx - 32 || p % 10 < static_cast<int>(10 * kept) ? full_pos : low_pos).push_back(p);
  }
  const int64_t region = quant == KvQuant::kNone ? 2 * rank : kernels::KvqHeadCodeBytes(quant, rank);
  const int64_t entry = int64_t{rank} * low_bits / 8 + 4;
  const int slots = compacted ? static_cast<int>(full_pos.size() + (low_pos.size() * entry + region - 1) / region) : ctx;
  const int blocks_per_seq = (slots + kBlock - 1) / kBlock;
  const int64_t width = kHeads * kDim;
  const int64_t layer_bytes = int64_t{batch} * blocks_per_seq * kBlock * SideBytesPerToken(quant, rank);
  const int layers = static_cast<int>(std::clamp<int64_t>(kCycleBytes / layer_bytes, 1, 16));
  DeviceBuffer k = Filled(be, layer_bytes * layers, 0x3c), v = Filled(be, layer_bytes * layers, 0x3c);
  DeviceBuffer q = Filled(be, int64_t{batch} * width * 2, 0x3c), out = Filled(be, int64_t{batch} * kHeads * rank * 2, 0);
  DeviceBuffer k_up = Filled(be, int64_t{kKvHeads} * kDim * rank * 2, 0x3c);
  std::vector<float> inv_freq(kDim / 2);
  for (int i = 0; i < kDim / 2; ++i) inv_freq[i] = static_cast<float>(std::pow(500000.0, -2.0 * i / kDim));
  DeviceBuffer freq = Put(be, inv_freq);
  std::vector<int32_t> tables(int64_t{batch} * blocks_per_seq);
  for (size_t i = 0; i < tables.size(); ++i) tables[i] = static_cast<int32_t>(i);
  DeviceBuffer dtables = Put(be, tables);
  BenchStates bs = MakeBenchStates(be, batch, ctx, layers, kept, low_bits > 0 ? kernels::kKvPolicyLow : kernels::kKvPolicyDead);
  const size_t lheads = static_cast<size_t>(layers) * kKvHeads;
  DeviceBuffer dpos, dpacked, dints;
  if (compacted) {  // the states rewritten as a compaction leaves them (separate pos and packed_pos)
    const size_t per_seq = lheads * ctx;
    std::vector<uint8_t> state(per_seq * batch, kernels::kKvPolicyLowPacked);
    std::vector<int32_t> slot(per_seq * batch), pos(per_seq * batch, -1), packed(per_seq * batch, -1);
    for (size_t row = 0; row < lheads * batch; ++row) {
      for (size_t i = 0; i < full_pos.size(); ++i) {
        state[row * ctx + full_pos[i]] = kernels::kKvPolicyFull;
        slot[row * ctx + full_pos[i]] = static_cast<int32_t>(i);
        pos[row * ctx + i] = full_pos[i];
      }
      for (size_t i = 0; i < low_pos.size(); ++i) {
        slot[row * ctx + low_pos[i]] = static_cast<int32_t>(i);
        packed[row * ctx + i] = low_pos[i];
      }
    }
    CHECK_OK(be.CopyToDevice(bs.state.data(), state.data(), state.size()));
    CHECK_OK(be.CopyToDevice(bs.slot.data(), slot.data(), slot.size() * 4));
    dpos = Put(be, pos);
    dpacked = Put(be, packed);
    std::vector<int32_t> ints(3 * lheads);
    for (size_t i = 0; i < lheads; ++i) {
      ints[i] = static_cast<int32_t>(full_pos.size());
      ints[lheads + i] = static_cast<int32_t>(low_pos.size());
      ints[2 * lheads + i] = kernels::kKvBalanceUnset;
    }
    dints = Put(be, ints);
    for (int s = 0; s < batch; ++s) {
      kernels::KvPolicySeq& e = bs.seqs[s];
      e.pos = dpos.as<int32_t>() + s * per_seq;
      e.packed_pos = dpacked.as<int32_t>() + s * per_seq;
      e.slot_offset = ctx - slots;
      e.low_base = dints.as<int32_t>();
      e.num_packed = dints.as<int32_t>() + lheads;
      e.balance_set = dints.as<int32_t>() + 2 * lheads;
      e.packed_max = static_cast<int32_t>(low_pos.size());
    }
  }
  DeviceBuffer dseqs = Put(be, bs.seqs);
  const int walk = bs.seqs[0].seq_len - bs.seqs[0].slot_offset + bs.seqs[0].packed_max;
  auto scratch = be.Allocate(kernels::KvPolicyDecodeScratchBytes(batch, kHeads, kKvHeads, kDim, walk));
  CHECK(scratch.ok()) << scratch.status();
  kernels::KvPolicyLatentDecodeArgs a;
  kernels::LatentAttentionArgs& l = a.latent;
  l.q = q.data();
  l.q_ld = width;
  l.out = out.data();
  l.out_ld = int64_t{kHeads} * rank;
  l.k_up = k_up.data();
  l.k_up_ld = rank;
  l.k_ld = l.v_ld = int64_t{kKvHeads} * rank;
  l.num_heads = kHeads;
  l.num_kv_heads = kKvHeads;
  l.head_dim = kDim;
  l.k_rank = l.v_rank = rank;
  l.scale = 0.08838834764f;
  l.inv_freq = freq.as<float>();
  l.block_tables = dtables.as<int32_t>();
  l.max_blocks_per_seq = blocks_per_seq;
  l.block_size = kBlock;
  if (quant != KvQuant::kNone) {
    l.kv_quant = quant;
    l.k_q = l.v_q = kernels::MakeKvqSide(quant, kBlock, kKvHeads, rank);
  }
  a.seqs = dseqs.as<kernels::KvPolicySeq>();
  a.num_seqs = batch;
  a.max_seq_len = walk;
  a.record_hits = record_hits;
  a.low_bits = low_bits;
  a.scratch = scratch->data();
  const auto stream = static_cast<cudaStream_t>(be.stream_handle());
  return TimeUs(be, [&](int i) {
    const int64_t off = (i % layers) * layer_bytes;
    l.k_cache = k.as<char>() + off;
    l.v_cache = v.as<char>() + off;
    a.layer = i % layers;
    CHECK_EQ(kernels::LaunchKvPolicyLatentDecode(a, stream), cudaSuccess);
  });
}

int LatentPolicyTable(Backend& be, KvQuant quant, const char* dtype) {
  constexpr int kRank = 64;
  // MiKV int2 over latents of an int4 cache: int4 entries (36 bytes) exceed its 32-byte regions.
  const int mikv_bits = quant == KvQuant::kInt4 ? 2 : 4;
  std::printf("%s\nCORM and MiKV int%d over LoRC latents (ranks %d/%d), Llama-3-8B attention (32 q / 8 kv heads x "
              "128, block_size 16), %s cache, per layer; floor = latent bytes read / %.0f GB/s\n",
              be.Describe().c_str(), mikv_bits, kRank, kRank, dtype, kFloorGBs);
  std::printf("  batch x ctx  latent paged us  floor us  policy all us  policy 30%% us  30%% compacted us  floor us  "
              "30%% no-hits us  mikv 30%% us  mikv 30%% compacted us  floor us\n");
  std::string json = "{\"bench\":\"attention_kv_policy_latent\",\"device\":\"" + be.Describe() +
                     "\",\"kv_cache_dtype\":\"" + dtype + "\",\"rank\":64,\"kept\":0.3,\"cases\":[";
  bool first = true;
  for (const int ctx : {16384, 32768}) {
    for (const int batch : {1, 8, 64}) {
      const int kept = static_cast<int>(0.3 * ctx);
      const double paged = Run(be, batch, ctx, 1, true, kRank, quant);
      const double all = RunLatentPolicy(be, batch, ctx, 1.0, true, kRank, quant);
      const double part = RunLatentPolicy(be, batch, ctx, 0.3, true, kRank, quant);
      const double compacted = RunLatentPolicy(be, batch, kept, 1.0, true, kRank, quant);
      const double nohits = RunLatentPolicy(be, batch, ctx, 0.3, false, kRank, quant);
      const double mikv = RunLatentPolicy(be, batch, ctx, 0.3, true, kRank, quant, mikv_bits);
      const double mikv_packed = RunLatentPolicy(be, batch, ctx, 0.3, true, kRank, quant, mikv_bits, true);
      auto floor_us = [&](int keys) {
        return 2.0 * batch * keys * SideBytesPerToken(quant, kRank) / (kFloorGBs * 1e3);
      };
      // MiKV compacted: the kept 30 % of rows plus the others' entries (K and V), and the states
      // walked (about 5 bytes a position and KV head: pos and state, or packed_pos).
      const double mikv_floor =
          floor_us(kept) + (2.0 * (ctx - kept) * (kRank * mikv_bits / 8 + 4) * kKvHeads + 5.0 * ctx * kKvHeads) *
                               batch / (kFloorGBs * 1e3);
      std::printf("  %3d x %5d  %15.2f  %8.2f  %13.2f  %13.2f  %16.2f  %8.2f  %14.2f  %11.2f  %20.2f  %8.2f\n", batch,
                  ctx, paged, floor_us(ctx), all, part, compacted, floor_us(kept), nohits, mikv, mikv_packed,
                  mikv_floor);
      char buf[600];
      std::snprintf(buf, sizeof(buf),
                    "%s{\"batch\":%d,\"ctx\":%d,\"latent_paged_us\":%.2f,\"paged_floor_us\":%.2f,"
                    "\"policy_all_us\":%.2f,\"policy_30_us\":%.2f,\"policy_30_compacted_us\":%.2f,"
                    "\"compacted_floor_us\":%.2f,\"policy_30_no_hits_us\":%.2f,\"mikv_bits\":%d,"
                    "\"mikv_30_us\":%.2f,\"mikv_30_compacted_us\":%.2f,\"mikv_compacted_floor_us\":%.2f}",
                    first ? "" : ",", batch, ctx, paged, floor_us(ctx), all, part, compacted, floor_us(kept), nohits,
                    mikv_bits, mikv, mikv_packed, mikv_floor);
      json += buf;
      first = false;
    }
  }
  std::printf("%s]}\n", json.c_str());
  return 0;
}

// --kv-policy: CORM's choice after one step over `num_layers` x 8 KV heads of `batch` sequences
// of `ctx` keys at a 30 % budget (window and recent 32, sinks 4), each call preceded by
// re-marking the last 64 positions kFull (KvPolicyExtend), so that every (layer, head) is over
// its budget and runs the radix select. Microseconds per step: {extend + choose, extend alone}.
std::pair<double, double> RunChoose(Backend& be, int batch, int ctx, int num_layers) {
  const size_t per_seq = static_cast<size_t>(num_layers) * kKvHeads * ctx;
  std::vector<int32_t> ramp(per_seq);
  for (size_t i = 0; i < per_seq; ++i) ramp[i] = static_cast<int32_t>(i % ctx);
  DeviceBuffer dstate = Filled(be, per_seq * batch, kernels::kKvPolicyFull);
  auto dslot = be.Allocate(per_seq * batch * 4), dlast = be.Allocate(per_seq * batch * 4);
  CHECK(dslot.ok() && dlast.ok());
  for (int s = 0; s < batch; ++s) {
    CHECK_OK(be.CopyToDevice(dslot->as<int32_t>() + s * per_seq, ramp.data(), per_seq * 4));
    CHECK_OK(be.CopyToDevice(dlast->as<int32_t>() + s * per_seq, ramp.data(), per_seq * 4));
  }
  CHECK_OK(be.Synchronize());
  std::vector<kernels::KvPolicySeq> seqs(batch);
  for (int s = 0; s < batch; ++s) {
    seqs[s].state = dstate.as<uint8_t>() + s * per_seq;
    seqs[s].slot = dslot->as<int32_t>() + s * per_seq;
    seqs[s].pos = dslot->as<int32_t>() + s * per_seq;  // identity (Extend writes the same values)
    seqs[s].last_hit = dlast->as<int32_t>() + s * per_seq;
    seqs[s].capacity = ctx;
    seqs[s].seq_len = ctx;
    seqs[s].budget = static_cast<int32_t>(std::ceil(0.3 * ctx));
    seqs[s].extend_from = ctx - 64;
    seqs[s].choose = 1;
  }
  DeviceBuffer dseqs = Put(be, seqs);
  kernels::KvPolicyChooseArgs c;
  c.seqs = dseqs.as<kernels::KvPolicySeq>();
  c.num_seqs = batch;
  c.num_layers = num_layers;
  c.num_kv_heads = kKvHeads;
  c.sinks = 4;
  c.recent = 32;
  c.window = 32;
  const auto stream = static_cast<cudaStream_t>(be.stream_handle());
  const double both = TimeUs(be, [&](int) {
    CHECK_EQ(kernels::LaunchKvPolicyExtend(c.seqs, batch, num_layers, kKvHeads, stream), cudaSuccess);
    CHECK_EQ(kernels::LaunchKvPolicyChoose(c, stream), cudaSuccess);
  });
  const double extend = TimeUs(be, [&](int) {
    CHECK_EQ(kernels::LaunchKvPolicyExtend(c.seqs, batch, num_layers, kKvHeads, stream), cudaSuccess);
  });
  return {both, extend};
}

int PolicyTable(Backend& be, KvQuant quant) {
  constexpr int kLayers = 32;
  const char* dtype = quant == KvQuant::kNone      ? "bf16"
                      : quant == KvQuant::kFp8E4m3 ? "fp8"
                      : quant == KvQuant::kInt8    ? "int8"
                                                   : "int4";
  std::printf("%s\nToken-level KV policies, Llama-3-8B attention (32 q / 8 kv heads x 128, block_size 16), %s "
              "cache, per layer; kept = sinks 4 + recent 32 + a random share of the rest\n",
              be.Describe().c_str(), dtype);
  // "30% compacted": the slots a compacted sequence walks (its kept 30 %, every one live).
  // MiKV int4: the other 70 % read quantized from their slots, or (compacted) from packed runs.
  std::printf("  batch x ctx  kernel        paged us  policy all us  policy 30%% us  30%% compacted us  30%% no-hits us  "
              "hits cost us  choose us/step (%d layers)  extend us  mikv 30%% us  mikv 30%% compacted us\n", kLayers);
  std::string json = "{\"bench\":\"attention_kv_policy\",\"device\":\"" + be.Describe() +
                     "\",\"kv_cache_dtype\":\"" + dtype + "\",\"heads\":32,\"kv_heads\":8,\"head_dim\":128,\"kept\":0.3,\"layers\":32,\"cases\":[";
  bool first = true;
  for (const int ctx : {16384, 32768}) {
    for (const int batch : {1, 8, 64}) {
      const double paged = Run(be, batch, ctx, 1, true, 0, quant);
      const auto [choose, extend] = RunChoose(be, batch, ctx, kLayers);
      const int kept = static_cast<int>(0.3 * ctx);
      // The policy decode's two kernels (kv_policy.cuh KvPolicyDecodeArgs::cuda_cores), each case.
      for (const bool cuda_cores : {false, true}) {
        const double all = RunPolicy(be, cuda_cores, batch, ctx, 1.0, true, 0, 0, quant);
        const double part = RunPolicy(be, cuda_cores, batch, ctx, 0.3, true, 0, 0, quant);
        const double compacted = RunPolicy(be, cuda_cores, batch, kept, 1.0, true, 0, 0, quant);
        const double nohits = RunPolicy(be, cuda_cores, batch, ctx, 0.3, false, 0, 0, quant);
        // MiKV int4 entries (68 bytes) do not fit an int4 cache's 64-byte regions: not run there.
        const bool mikv_fits = quant != KvQuant::kInt4;
        const double mikv = mikv_fits ? RunPolicy(be, cuda_cores, batch, ctx, 0.3, true, 4, 0, quant) : 0.0;
        const double mikv_packed =
            mikv_fits ? RunPolicy(be, cuda_cores, batch, kept, 1.0, true, 4, ctx - kept, quant) : 0.0;
        const char* kernel = cuda_cores ? "cuda_cores" : "tensor_cores";
        std::printf("  %3d x %5d  %-12s  %9.2f  %13.2f  %13.2f  %16.2f  %14.2f  %12.2f  %25.2f  %9.2f  %11.2f  %20.2f\n",
                    batch, ctx, kernel, paged, all, part, compacted, nohits, part - nohits, choose - extend, extend,
                    mikv, mikv_packed);
        char buf[460];
        std::snprintf(buf, sizeof(buf),
                      "%s{\"batch\":%d,\"ctx\":%d,\"kernel\":\"%s\",\"paged_us\":%.2f,\"policy_all_us\":%.2f,"
                      "\"policy_30_us\":%.2f,\"policy_30_compacted_us\":%.2f,\"policy_30_no_hits_us\":%.2f,"
                      "\"choose_step_us\":%.2f,\"extend_step_us\":%.2f,\"mikv4_30_us\":%.2f,"
                      "\"mikv4_30_compacted_us\":%.2f}",
                      first ? "" : ",", batch, ctx, kernel, paged, all, part, compacted, nohits, choose - extend, extend,
                      mikv, mikv_packed);
        json += buf;
        first = false;
      }
    }
  }
  std::printf("%s]}\n", json.c_str());
  return 0;
}

int Main(int argc, char** argv) {
  std::string dtype;
  bool prefill_only = false, policy = false, lorc = false;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--prefill") {
      prefill_only = true;
    } else if (arg == "--kv-policy") {
      policy = true;
    } else if (arg == "--lorc") {
      lorc = true;
    } else if (arg == "--kv-cache-dtype" && i + 1 < argc) {
      dtype = argv[++i];
    } else if (arg.rfind("--kv-cache-dtype=", 0) == 0) {
      dtype = arg.substr(17);
    } else {
      std::fprintf(stderr, "attention_bench: unknown argument %s (usage: [--kv-cache-dtype bf16|fp8|int8|int4] [--prefill] [--kv-policy [--lorc]])\n",
                   arg.c_str());
      return 2;
    }
  }
  KvQuant quant = KvQuant::kNone;
  if (dtype == "fp8" || dtype == "fp8_e4m3") {
    quant = KvQuant::kFp8E4m3;
  } else if (dtype == "int8") {
    quant = KvQuant::kInt8;
  } else if (dtype == "int4") {
    quant = KvQuant::kInt4;
  } else if (!dtype.empty() && dtype != "bf16" && dtype != "auto") {
    std::fprintf(stderr, "attention_bench: --kv-cache-dtype %s: expected auto, bf16, fp8, int8 or int4\n",
                 dtype.c_str());
    return 2;
  }
  if (lorc && !policy) {
    std::fprintf(stderr, "attention_bench: --lorc needs --kv-policy\n");
    return 2;
  }
  auto made = CreatePartialCudaBackend(BackendOptions{BackendKind::kCuda});
  if (!made.ok()) {
    std::fprintf(stderr, "%s\n", std::string(made.status().message()).c_str());
    return 1;
  }
  Backend& be = **made;
  if (prefill_only) return PrefillTable(be);
  if (policy && lorc) return LatentPolicyTable(be, quant, dtype.empty() || dtype == "auto" ? "bf16" : dtype.c_str());
  if (policy) return PolicyTable(be, quant);
  if (!dtype.empty()) return DtypeTable(be, dtype == "auto" ? "bf16" : dtype, quant);
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

int main(int argc, char** argv) { return lorc::Main(argc, argv); }
