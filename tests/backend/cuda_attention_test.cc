// Parity of the CUDA backend's paged attention (backend/cuda_attention.cc, kernels/attention_*)
// with the CPU backend, the reference: seeded mixed batches (decodes, whole-prompt prefills,
// chunked prefills over a cached prefix; GQA 32/8 and 8/2, MHA; head_dim 64 and 128; block_size
// 16; seq_lens 1 .. 12000, one long sequence among many short ones; prefill chunks over long
// cached contexts, split over CTAs), the decode path alone, the prefill path alone and both,
// plus a decode whose early K/V loads (LORC_DECODE_EARLY_KV) race a kernel writing the newest rows,
// plus a decode captured in a CUDA graph and replayed after PlanAttention refreshed the plan for
// another batch at the same addresses.
// CUDA runs BF16 (q, cache, out); the CPU runs F32 on exactly the bf16-rounded inputs.
// Tolerance: |cuda - cpu| <= 1e-2 * max(1, |cpu|) (outputs are convex combinations of values in
// [-1, 1]; bf16 output rounding alone is 2^-9 relative, P is rounded to bf16 in prefill, exp2
// on the SFU is ~2^-22 relative; split-KV partials and their merge stay fp32).
// Rows of the other path keep their sentinel on both backends. Quantized caches (fp8 / int8 /
// int4): the write's codes and scales and attention over them, tolerances at those tests.
// Skipped without a CUDA device.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>

#include "tests/backend/cuda_parity_fixture.h"
#include "tests/backend/backend_ops_fixture.h"

namespace lorc {
namespace backend_test {
namespace {

constexpr float kSentinel = 7.0f;  // exact in bf16
constexpr double kAttnTol = 1e-2;

struct Seq {
  int q_len, seq_len;
};

// One step's inputs on the host: bf16-rounded q and cache, block tables over shuffled blocks.
struct Problem {
  int heads = 0, kv_heads = 0, hd = 0, bs = 16;
  std::vector<Seq> seqs;
  std::vector<int32_t> query_start, seq_lens, tables;
  int max_blocks = 0, num_blocks = 0, num_tokens = 0;
  std::vector<float> q, k, v;
};

using parity::RoundBf16;

Problem MakeProblem(std::mt19937& rng, int heads, int kv_heads, int hd, std::vector<Seq> seqs,
                    int max_blocks = 0) {
  Problem p;
  p.heads = heads;
  p.kv_heads = kv_heads;
  p.hd = hd;
  p.seqs = std::move(seqs);
  p.query_start.push_back(0);
  int blocks = 0;
  for (const Seq& s : p.seqs) {
    p.query_start.push_back(p.query_start.back() + s.q_len);
    p.seq_lens.push_back(s.seq_len);
    p.max_blocks = std::max(p.max_blocks, (s.seq_len + p.bs - 1) / p.bs);
    blocks += (s.seq_len + p.bs - 1) / p.bs;
  }
  p.max_blocks = std::max(p.max_blocks, max_blocks);
  p.num_tokens = p.query_start.back();
  p.num_blocks = blocks + 3;
  std::vector<int32_t> ids(p.num_blocks);
  std::iota(ids.begin(), ids.end(), 0);
  std::shuffle(ids.begin(), ids.end(), rng);
  p.tables.assign(static_cast<size_t>(p.seqs.size()) * p.max_blocks, 0);
  int next = 0;
  for (size_t s = 0; s < p.seqs.size(); ++s) {
    for (int b = 0; b < (p.seqs[s].seq_len + p.bs - 1) / p.bs; ++b) p.tables[s * p.max_blocks + b] = ids[next++];
  }
  auto fill = [&](size_t n, float lo, float hi) {
    std::vector<float> x = RandomVec(rng, n, lo, hi);
    for (float& e : x) e = RoundBf16(e);
    return x;
  };
  // Larger queries than keys so the softmax is far from uniform.
  p.q = fill(static_cast<size_t>(p.num_tokens) * heads * hd, -3.f, 3.f);
  p.k = fill(static_cast<size_t>(p.num_blocks) * p.bs * kv_heads * hd, -1.f, 1.f);
  p.v = fill(p.k.size(), -1.f, 1.f);
  return p;
}

using parity::Get;
using parity::Put;
using parity::PutRaw;

// The problem's device state on one backend.
struct OnDevice {
  DeviceBuffer q, out, k, v, query_start, seq_lens, tables;
  AttentionBatch batch;
  AttentionParams params;
};

OnDevice Upload(Backend& be, DType d, const Problem& p) {
  OnDevice o;
  o.q = Put(be, p.q, d);
  o.out = Put(be, std::vector<float>(static_cast<size_t>(p.num_tokens) * p.heads * p.hd, kSentinel), d);
  o.k = Put(be, p.k, d);
  o.v = Put(be, p.v, d);
  o.query_start = PutRaw(be, p.query_start);
  o.seq_lens = PutRaw(be, p.seq_lens);
  o.tables = PutRaw(be, p.tables);
  AttentionBatch& b = o.batch;
  b.num_seqs = static_cast<int32_t>(p.seqs.size());
  b.num_tokens = p.num_tokens;
  b.max_seq_len = *std::max_element(p.seq_lens.begin(), p.seq_lens.end());
  b.max_blocks_per_seq = p.max_blocks;
  b.block_size = p.bs;
  b.query_start = o.query_start.as<int32_t>();
  b.seq_lens = o.seq_lens.as<int32_t>();
  b.block_tables = o.tables.as<int32_t>();
  b.host_query_start = p.query_start.data();
  b.host_seq_lens = p.seq_lens.data();
  const int64_t width = static_cast<int64_t>(p.heads) * p.hd, kv_width = static_cast<int64_t>(p.kv_heads) * p.hd;
  AttentionParams& a = o.params;
  a.q = Tensor2D{o.q.data(), d, p.num_tokens, width, 0};
  a.out = Tensor2D{o.out.data(), d, p.num_tokens, width, 0};
  a.cache = KvLayer{o.k.data(), o.v.data(), kv_width, kv_width, d};
  a.num_heads = p.heads;
  a.num_kv_heads = p.kv_heads;
  a.head_dim = p.hd;
  a.scale = 1.0f / std::sqrt(static_cast<float>(p.hd));
  return o;
}

enum Paths { kDecode = 1, kPrefill = 2, kBoth = 3 };

// Plans the problem's batch and runs the chosen paths over o's cache; returns the output.
std::vector<float> PlanAndRun(Backend& be, DType d, const Problem& p, const OnDevice& o, int paths) {
  auto plan = be.CreateAttentionPlan({static_cast<int32_t>(p.seqs.size()), p.num_tokens, p.max_blocks});
  CHECK(plan.ok()) << plan.status();
  CHECK_OK(be.PlanAttention(o.batch, **plan));
  if (paths & kDecode) CHECK_OK(be.DecodeAttention(o.params, **plan));
  if (paths & kPrefill) CHECK_OK(be.PrefillAttention(o.params, **plan));
  return Get(be, o.out, d);
}

std::vector<float> RunAttention(Backend& be, DType d, const Problem& p, int paths) {
  const OnDevice o = Upload(be, d, p);
  return PlanAndRun(be, d, p, o, paths);
}

void ExpectNear(const std::vector<float>& got, const std::vector<float>& want) {
  ASSERT_EQ(got.size(), want.size());
  int bad = 0;
  double worst = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double w = want[i], g = got[i];
    const double err = std::abs(g - w), lim = kAttnTol * std::max(1.0, std::abs(w));
    worst = std::max(worst, err);
    if (!(err <= lim) && ++bad <= 5) {
      ADD_FAILURE() << "element " << i << ": cuda " << g << ", cpu " << w << " (|err| " << err << ")";
    }
  }
  EXPECT_EQ(bad, 0) << "mismatches of " << want.size();
  std::printf("    %zu values, worst |cuda - cpu| %.2e\n", want.size(), worst);
}

class CudaAttentionTest : public CpuCudaPair<> {
 protected:
  void ExpectParity(const Problem& p, int paths) {
    ExpectNear(RunAttention(*cuda_, DType::kBF16, p, paths), RunAttention(*cpu_, DType::kF32, p, paths));
  }

  // Decodes with seq_lens in [lo, hi].
  std::vector<Seq> Decodes(int n, int lo, int hi) {
    std::uniform_int_distribution<int> len(lo, hi);
    std::vector<Seq> out;
    for (int i = 0; i < n; ++i) out.push_back({1, len(rng_)});
    return out;
  }

  std::mt19937 rng_{20261130};
};

// Decodes (one 8192 long, split over many chunks), whole prompts, chunked prefills; each path
// alone leaves the other path's rows untouched, both together fill every row.
TEST_F(CudaAttentionTest, MixedBatchGqa32x8Dim128) {
  std::vector<Seq> seqs = Decodes(20, 1, 600);
  seqs.insert(seqs.begin() + 3, {1, 8192});
  seqs.push_back({77, 77});      // a whole prompt
  seqs.push_back({64, 1064});    // a chunk over 1000 cached tokens
  seqs.push_back({1, 4097});
  seqs.push_back({2, 2});
  seqs.push_back({200, 3000});
  seqs.push_back({0, 5});        // no new tokens this step
  seqs.push_back({1, 1});
  const Problem p = MakeProblem(rng_, 32, 8, 128, seqs);
  for (const int paths : {kDecode, kPrefill, kBoth}) {
    SCOPED_TRACE(::testing::Message() << "paths " << paths);
    ExpectParity(p, paths);
  }
}

TEST_F(CudaAttentionTest, MixedBatchGqa8x2Dim64) {
  const Problem p = MakeProblem(rng_, 8, 2, 64,
                                {{1, 1}, {129, 129}, {1, 17}, {31, 500}, {1, 4096}, {1, 333}, {16, 16}, {5, 700}});
  ExpectParity(p, kBoth);
}

TEST_F(CudaAttentionTest, MixedBatchMhaDim128AndDim64) {
  const std::vector<Seq> seqs = {{1, 5}, {100, 100}, {1, 1000}, {17, 50}, {1, 2048}, {3, 3}};
  ExpectParity(MakeProblem(rng_, 8, 8, 128, seqs), kBoth);
  ExpectParity(MakeProblem(rng_, 4, 4, 64, seqs), kBoth);
}

TEST_F(CudaAttentionTest, GroupOf8AndOddGroupDecode) {
  // 64 query heads over 8 KV heads (Llama-70B), and a group of 3 on the decode path.
  ExpectParity(MakeProblem(rng_, 64, 8, 128, {{1, 3000}, {40, 300}, {1, 9}}), kBoth);
  ExpectParity(MakeProblem(rng_, 12, 4, 64, {{1, 3000}, {1, 9}, {1, 250}}), kDecode);
}

// One rank's heads under tensor parallelism at 4 and 8 GPUs (issues #12, #13): Llama-3-70B at
// TP = 8 holds 8 query heads over 1 KV head, the 8B shape 4 over 1, 70B at TP = 4 16 over 2.
// One KV head makes the smallest grids (the decode and prefill plans split the keys the most).
TEST_F(CudaAttentionTest, TensorParallelRankShapes) {
  const std::vector<Seq> seqs = {{1, 4096}, {1, 9}, {1, 300}, {64, 1064}, {129, 129}, {1, 1}, {3, 700}};
  for (const auto& [heads, kv_heads] : {std::pair<int, int>{8, 1}, {4, 1}, {16, 2}}) {
    SCOPED_TRACE(::testing::Message() << heads << "/" << kv_heads << " x 128");
    const Problem p = MakeProblem(rng_, heads, kv_heads, 128, seqs);
    for (const int paths : {kDecode, kPrefill, kBoth}) {
      SCOPED_TRACE(::testing::Message() << "paths " << paths);
      ExpectParity(p, paths);
    }
  }
}

// The bf16 flash prefill (kernels/attention_prefill.cu) alone over every instantiated shape:
// head_dim 64 and 128, groups 1, 4 and 8, several sequences of different lengths in one launch
// (whole prompts and chunks over cached context, lengths not multiples of the 128-row tile or
// the 64-key tile, a 2-token prompt, a decode row left alone). These grids are small, so the
// plan splits the key ranges (split-KV + merge) for the longer ones on a device of many SMs.
TEST_F(CudaAttentionTest, FlashPrefillShapesMatchCpu) {
  const std::vector<Seq> seqs = {{300, 300}, {77, 1077}, {129, 129}, {2, 2}, {1, 40}, {33, 700}, {130, 200}};
  for (const int hd : {64, 128}) {
    for (const auto& [heads, kv_heads] : {std::pair<int, int>{8, 8}, {16, 4}, {32, 4}}) {
      SCOPED_TRACE(::testing::Message() << heads << "/" << kv_heads << " x " << hd);
      ExpectParity(MakeProblem(rng_, heads, kv_heads, hd, seqs), kPrefill);
    }
  }
}

// Prefix-cache hits: short query chunks after long cached contexts. The grid (q tiles x KV heads)
// is far below the SM count, so the plan splits each tile's keys over many CTAs (on 132 SMs,
// 8/2 x 128: 6 tiles x 2 KV heads -> 23 pieces of ~512 keys) whose fp32 partials the merge
// kernel combines; the second sequence is shorter, so some of its pieces are empty (lse -inf).
// A Llama-3-8B-shaped chunk of 64 after 8936 tokens (17 pieces), and MHA at head_dim 64 with a
// long chunk beside a whole prompt and a decode (11 pieces).
TEST_F(CudaAttentionTest, ChunksOverLongContextSplitKv) {
  ExpectParity(MakeProblem(rng_, 8, 2, 128, {{128, 12000}, {40, 2100}}), kPrefill);
  ExpectParity(MakeProblem(rng_, 32, 8, 128, {{64, 9000}}), kPrefill);
  ExpectParity(MakeProblem(rng_, 8, 8, 64, {{100, 6000}, {50, 50}, {1, 3000}}), kBoth);
}

// One very long decode among many short ones: the long one is split, the short ones are not.
TEST_F(CudaAttentionTest, OneLongAmongManyShortDecodes) {
  std::vector<Seq> seqs = Decodes(63, 1, 64);
  seqs.insert(seqs.begin() + 17, {1, 8192});
  ExpectParity(MakeProblem(rng_, 32, 8, 128, seqs), kDecode);
}

// Large decode batches are not split; a batch of one is split over all SMs.
TEST_F(CudaAttentionTest, WideAndSingleDecodeBatches) {
  ExpectParity(MakeProblem(rng_, 32, 8, 128, Decodes(256, 1, 300)), kDecode);
  ExpectParity(MakeProblem(rng_, 32, 8, 128, {{1, 8192}}), kDecode);
  ExpectParity(MakeProblem(rng_, 8, 1, 128, {{1, 5000}}), kDecode);
}

// The merge of split chunks is done by the CTA that finishes a sequence's last chunk, counted in
// the plan's merge counters, which must be zero again after every launch: consecutive launches
// over one plan (as in the layers of a step) each match the CPU, the output cleared in between.
TEST_F(CudaAttentionTest, ConsecutiveSplitDecodesMatch) {
  const Problem p = MakeProblem(rng_, 32, 8, 128, {{1, 128}, {1, 3000}, {1, 9}});
  Backend& be = *cuda_;
  const DType d = DType::kBF16;
  const OnDevice o = Upload(be, d, p);
  const std::vector<float> want = RunAttention(*cpu_, DType::kF32, p, kDecode);
  auto plan = be.CreateAttentionPlan({static_cast<int32_t>(p.seqs.size()), p.num_tokens, p.max_blocks});
  ASSERT_OK(plan);
  ASSERT_OK(be.PlanAttention(o.batch, **plan));
  const std::vector<float> sentinel(want.size(), kSentinel);  // rows a launch left unwritten fail
  for (int launch = 0; launch < 3; ++launch) {
    DeviceBuffer z = Put(be, sentinel, d);
    ASSERT_OK(be.CopyOnDevice(o.out.data(), z.data(), z.bytes()));
    ASSERT_OK(be.DecodeAttention(o.params, **plan));
    std::vector<float> got = Get(be, o.out, d);
    ExpectNear(got, want);
  }
}

// Early K/V (DecodeSchedule::early_kv, forced off and on by LORC_DECODE_EARLY_KV): the tensor-core decode issues
// its first tiles' loads before its PDL wait, every key but an item's last. Here the kernel just
// before it (WriteKv, PDL-launched, triggering at its start) writes each sequence's newest row,
// which the uploaded cache holds as a wrong value (40: it would dominate the softmax): the
// outputs must be those of the written rows, the same bits as without early loads, and match the
// CPU. Batches: one short and one split sequence (2 ring stages), 8 mixed lengths, 40 (3
// stages); repeated, since a wrong order would only show when the two kernels overlap.
TEST_F(CudaAttentionTest, EarlyKvLoadsReadTheRowWrittenJustBefore) {
  std::vector<Problem> problems;
  problems.push_back(MakeProblem(rng_, 32, 8, 128, {{1, 129}}));
  problems.push_back(MakeProblem(rng_, 32, 8, 128, {{1, 5000}}));
  problems.push_back(MakeProblem(rng_, 32, 8, 128, Decodes(8, 1, 300)));
  problems.push_back(MakeProblem(rng_, 32, 8, 128, Decodes(40, 1, 2000)));
  problems.push_back(MakeProblem(rng_, 8, 2, 64, Decodes(5, 1, 700)));
  Backend& be = *cuda_;
  const DType d = DType::kBF16;
  for (const Problem& p : problems) {
    const int64_t kv_width = static_cast<int64_t>(p.kv_heads) * p.hd;
    const int n = static_cast<int>(p.seqs.size());
    // The newest row of each sequence: its slot, its true K / V, and a cache that holds 40 there.
    std::vector<int32_t> slots(n);
    std::vector<float> k_new(n * kv_width), v_new(n * kv_width);
    Problem stale = p;
    for (int s = 0; s < n; ++s) {
      const int pos = p.seq_lens[s] - 1;
      slots[s] = p.tables[static_cast<size_t>(s) * p.max_blocks + pos / p.bs] * p.bs + pos % p.bs;
      for (int64_t c = 0; c < kv_width; ++c) {
        k_new[s * kv_width + c] = p.k[slots[s] * kv_width + c];
        v_new[s * kv_width + c] = p.v[slots[s] * kv_width + c];
        stale.k[slots[s] * kv_width + c] = 40.f;
        stale.v[slots[s] * kv_width + c] = 40.f;
      }
    }
    const std::vector<float> want = RunAttention(*cpu_, DType::kF32, p, kDecode);
    const DeviceBuffer dk = Put(be, k_new, d), dv = Put(be, v_new, d), dslots = PutRaw(be, slots);
    std::vector<std::vector<float>> outs;
    for (const bool early : {false, true}) {
      setenv("LORC_DECODE_EARLY_KV", early ? "1" : "0", 1);
      const OnDevice o = Upload(be, d, stale);
      auto plan = be.CreateAttentionPlan({n, p.num_tokens, p.max_blocks});
      unsetenv("LORC_DECODE_EARLY_KV");
      ASSERT_OK(plan);
      ASSERT_OK(be.PlanAttention(o.batch, **plan));
      const DeviceBuffer k0 = Put(be, stale.k, d), v0 = Put(be, stale.v, d);
      for (int rep = 0; rep < 20; ++rep) {
        ASSERT_OK(be.CopyOnDevice(o.k.data(), k0.data(), k0.bytes()));
        ASSERT_OK(be.CopyOnDevice(o.v.data(), v0.data(), v0.bytes()));
        ASSERT_OK(be.WriteKv(o.params.cache, Tensor2D{dk.data(), d, n, kv_width, 0},
                             Tensor2D{dv.data(), d, n, kv_width, 0}, dslots.as<int32_t>()));
        ASSERT_OK(be.DecodeAttention(o.params, **plan));
        std::vector<float> got = Get(be, o.out, d);
        if (rep == 0) {
          ExpectNear(got, want);
          outs.push_back(got);
        } else if (got != outs.back()) {
          ADD_FAILURE() << "early " << early << ", repetition " << rep << ": output differs from the first";
          break;
        }
      }
    }
    EXPECT_TRUE(outs.size() == 2 && outs[0] == outs[1]) << "early K/V changed the output bits";
  }
}

// A decode captured in a graph replays over a new batch written in place (same addresses, the
// plan refreshed by PlanAttention) and matches the CPU on that batch.
TEST_F(CudaAttentionTest, CapturedDecodeReplaysAfterReplanning) {
  const int max_seqs = 16, max_blocks = 8192 / 16;
  const Problem a = MakeProblem(rng_, 32, 8, 128, {{1, 100}, {1, 5000}, {1, 7}, {1, 1}}, max_blocks);
  std::vector<Seq> seqs_b = Decodes(8, 1, 900);
  seqs_b.insert(seqs_b.begin() + 2, {1, 8000});
  Problem b = MakeProblem(rng_, 32, 8, 128, seqs_b, max_blocks);
  Backend& be = *cuda_;
  const DType d = DType::kBF16;
  // Buffers sized for either batch.
  Problem cap = b;
  cap.num_blocks = std::max(a.num_blocks, b.num_blocks);
  cap.k.resize(static_cast<size_t>(cap.num_blocks) * cap.bs * cap.kv_heads * cap.hd, 0.f);
  cap.v.resize(cap.k.size(), 0.f);
  cap.q.resize(static_cast<size_t>(max_seqs) * cap.heads * cap.hd, 0.f);
  cap.num_tokens = max_seqs;
  cap.query_start.resize(max_seqs + 1, cap.query_start.back());
  cap.seq_lens.resize(max_seqs, 1);
  cap.tables.resize(static_cast<size_t>(max_seqs) * max_blocks, 0);
  OnDevice o = Upload(be, d, cap);
  auto plan = be.CreateAttentionPlan({max_seqs, max_seqs, max_blocks});
  ASSERT_OK(plan);
  auto load = [&](const Problem& p) {
    DeviceBuffer q = Put(be, p.q, d), k = Put(be, p.k, d), v = Put(be, p.v, d);
    CHECK_OK(be.CopyOnDevice(o.q.data(), q.data(), q.bytes()));
    CHECK_OK(be.CopyOnDevice(o.k.data(), k.data(), k.bytes()));
    CHECK_OK(be.CopyOnDevice(o.v.data(), v.data(), v.bytes()));
    CHECK_OK(be.CopyToDevice(o.query_start.data(), p.query_start.data(), p.query_start.size() * 4));
    CHECK_OK(be.CopyToDevice(o.seq_lens.data(), p.seq_lens.data(), p.seq_lens.size() * 4));
    CHECK_OK(be.CopyToDevice(o.tables.data(), p.tables.data(), p.tables.size() * 4));
    AttentionBatch batch = o.batch;
    batch.num_seqs = static_cast<int32_t>(p.seqs.size());
    batch.num_tokens = p.num_tokens;
    batch.host_query_start = p.query_start.data();
    batch.host_seq_lens = p.seq_lens.data();
    CHECK_OK(be.PlanAttention(batch, **plan));
    CHECK_OK(be.Synchronize());
  };
  load(a);
  ASSERT_OK(be.BeginCapture());
  ASSERT_OK(be.DecodeAttention(o.params, **plan));
  auto graph = be.EndCapture();
  ASSERT_OK(graph);
  ASSERT_OK(be.ReplayGraph(**graph));
  std::vector<float> got = Get(be, o.out, d);
  got.resize(static_cast<size_t>(a.num_tokens) * a.heads * a.hd);
  ExpectNear(got, RunAttention(*cpu_, DType::kF32, a, kDecode));

  load(b);
  ASSERT_OK(be.ReplayGraph(**graph));
  got = Get(be, o.out, d);
  got.resize(static_cast<size_t>(b.num_tokens) * b.heads * b.hd);
  ExpectNear(got, RunAttention(*cpu_, DType::kF32, b, kDecode));
}

// --- quantized caches (--kv-cache-dtype fp8 / int8 / int4) ---------------------------------------

using kernels::KvQuant;
constexpr KvQuant kQuants[] = {KvQuant::kFp8E4m3, KvQuant::kInt8, KvQuant::kInt4};
const char* QuantName(KvQuant q) { return q == KvQuant::kFp8E4m3 ? "fp8" : q == KvQuant::kInt8 ? "int8" : "int4"; }

// The problem's K/V written by `be` itself into a quantized cache (WriteKv of every slot: the CPU
// from the fp32 values, CUDA from the same values in bf16), then attention over it; the cache's
// K and V bytes are returned in *k_bytes / *v_bytes.
std::vector<float> RunQuantAttention(Backend& be, DType d, const Problem& p, int paths, KvQuant q,
                                     std::vector<uint8_t>* k_bytes, std::vector<uint8_t>* v_bytes) {
  OnDevice o = Upload(be, d, p);
  const int64_t kv_width = static_cast<int64_t>(p.kv_heads) * p.hd;
  parity::QuantCache c = parity::MakeQuantCache(be, q, p.num_blocks, p.bs, p.kv_heads, kv_width, kv_width);
  parity::WriteAllSlots(be, d, c.layer, p.k, p.v, static_cast<int64_t>(p.num_blocks) * p.bs);
  o.params.cache = c.layer;
  std::vector<float> out = PlanAndRun(be, d, p, o, paths);
  *k_bytes = parity::GetBytes(be, c.k);
  *v_bytes = parity::GetBytes(be, c.v);
  return out;
}

// Per dtype: the caches the two backends write from equal inputs are byte-identical (no
// rotation: the same fp32 values through the same IEEE operations, kernels/kv_quant.cuh), and
// attention over them agrees within kAttnTol, the bf16 tolerance: both dequantize the same codes
// in fp32 (CUDA's int4 fuses zero + code x scale into one rounding; prefill rounds the
// dequantized K/V tile to bf16, 2^-9 relative, as a bf16 cache already is), so only the bf16
// rounding of q, P and out remains, as in the tests above. Mixed decode / prefill / chunked
// batches, GQA 32/8 at head_dim 128 and 8/2 at 64, a long split decode.
TEST_F(CudaAttentionTest, QuantizedCachesMatchCpu) {
  std::vector<Seq> seqs = Decodes(12, 1, 600);
  seqs.insert(seqs.begin() + 2, {1, 5000});
  seqs.push_back({77, 77});
  seqs.push_back({64, 1064});
  seqs.push_back({0, 5});
  seqs.push_back({200, 1500});
  const Problem big = MakeProblem(rng_, 32, 8, 128, seqs);
  const Problem small = MakeProblem(rng_, 8, 2, 64, {{1, 1}, {129, 129}, {1, 4096}, {31, 500}, {16, 16}, {1, 333}});
  for (const KvQuant q : kQuants) {
    for (const Problem* p : {&big, &small}) {
      SCOPED_TRACE(::testing::Message() << QuantName(q) << ", " << p->heads << "/" << p->kv_heads << " x " << p->hd);
      std::vector<uint8_t> ck, cv, gk, gv;
      const std::vector<float> want = RunQuantAttention(*cpu_, DType::kF32, *p, kBoth, q, &ck, &cv);
      const std::vector<float> got = RunQuantAttention(*cuda_, DType::kBF16, *p, kBoth, q, &gk, &gv);
      EXPECT_TRUE(gk == ck) << "K codes / scales differ";
      EXPECT_TRUE(gv == cv) << "V codes / scales differ";
      ExpectNear(got, want);
    }
  }
}

// The fused RoPE + quantized KV write (kernels/rope.cu) against the CPU's RopeKvWrite on the same
// (bf16-valued) q, k, v: V is stored from equal fp32 values, so its codes and scales are
// bit-equal. K is quantized from the fp32 rotation, whose cos / sin differ by an ulp or two
// between the CPU (double cos / sin rounded to fp32) and CUDA (sincosf): a code may then sit on
// the other side of a rounding boundary (off by one) and a head's fp16 scale, rounded up from
// absmax / qmax, may be one fp16 step apart. Allowed: at most 1% of K scales one step apart and,
// in heads with equal scales, at most 0.1% of codes one step apart (measured: 0 of ~80k).
TEST_F(CudaAttentionTest, QuantizedRopeKvWriteMatchesCpu) {
  for (const auto& [kv_heads, hd] : {std::pair<int, int>{8, 128}, {2, 64}}) {
    const int heads = 4 * kv_heads, tokens = 80, bs = 16, num_blocks = 8, slots = num_blocks * bs;
    std::vector<int32_t> positions(tokens), mapping(tokens);
    std::vector<int32_t> free_slots(slots);
    std::iota(free_slots.begin(), free_slots.end(), 0);
    std::shuffle(free_slots.begin(), free_slots.end(), rng_);
    std::uniform_int_distribution<int> pos(0, 32767);
    for (int t = 0; t < tokens; ++t) {
      positions[t] = pos(rng_);
      mapping[t] = t % 9 == 4 ? -1 : free_slots[t];
    }
    auto fill = [&](size_t n, float lo, float hi) {
      std::vector<float> x = RandomVec(rng_, n, lo, hi);
      for (float& e : x) e = RoundBf16(e);
      return x;
    };
    const std::vector<float> q = fill(static_cast<size_t>(tokens) * heads * hd, -2.f, 2.f);
    const std::vector<float> k = fill(static_cast<size_t>(tokens) * kv_heads * hd, -3.f, 3.f);
    const std::vector<float> v = fill(k.size(), -1.f, 1.f);
    std::vector<float> inv_freq;
    for (int i = 0; i < hd / 2; ++i) inv_freq.push_back(static_cast<float>(std::pow(500000.0, -2.0 * i / hd)));
    for (const KvQuant qt : kQuants) {
      SCOPED_TRACE(::testing::Message() << QuantName(qt) << ", " << kv_heads << " KV heads x " << hd);
      auto run = [&](Backend& be, DType d, std::vector<uint8_t>* kb, std::vector<uint8_t>* vb) {
        DeviceBuffer dq = Put(be, q, d), dk = Put(be, k, d), dv = Put(be, v, d);
        DeviceBuffer inv = Put(be, inv_freq, DType::kF32), dp = PutRaw(be, positions), dm = PutRaw(be, mapping);
        const int64_t kvw = static_cast<int64_t>(kv_heads) * hd;
        parity::QuantCache c = parity::MakeQuantCache(be, qt, num_blocks, bs, kv_heads, kvw, kvw);
        RopeKvWriteParams r;
        r.q = Tensor2D{dq.data(), d, tokens, static_cast<int64_t>(heads) * hd, 0};
        r.k = Tensor2D{dk.data(), d, tokens, kvw, 0};
        r.v = Tensor2D{dv.data(), d, tokens, kvw, 0};
        r.cache = c.layer;
        r.num_heads = heads;
        r.num_kv_heads = kv_heads;
        r.head_dim = hd;
        r.positions = dp.as<int32_t>();
        r.inv_freq = inv.as<float>();
        r.slot_mapping = dm.as<int32_t>();
        CHECK_OK(be.RopeKvWrite(r));
        *kb = parity::GetBytes(be, c.k);
        *vb = parity::GetBytes(be, c.v);
      };
      std::vector<uint8_t> ck, cv, gk, gv;
      run(*cpu_, DType::kF32, &ck, &cv);
      run(*cuda_, DType::kBF16, &gk, &gv);
      EXPECT_TRUE(gv == cv) << "V codes / scales differ";
      const parity::QuantDiff dk = parity::CompareQuantSide(qt, gk, ck, num_blocks, bs, kv_heads, hd);
      EXPECT_LE(dk.max_scale_dist, 1);
      EXPECT_LE(dk.scale_mismatch * 100, dk.scales);
      EXPECT_LE(dk.max_code_dist, 1);
      EXPECT_LE(dk.code_mismatch * 1000, dk.codes);
      std::printf("    %s K: %lld of %lld scales, %lld of %lld codes differ\n", QuantName(qt),
                  static_cast<long long>(dk.scale_mismatch), static_cast<long long>(dk.scales),
                  static_cast<long long>(dk.code_mismatch), static_cast<long long>(dk.codes));
    }
  }
}

TEST_F(CudaAttentionTest, RejectsWhatItDoesNotImplement) {
  Problem p = MakeProblem(rng_, 8, 2, 64, {{1, 10}, {4, 4}});
  OnDevice o = Upload(*cuda_, DType::kBF16, p);
  auto plan = cuda_->CreateAttentionPlan({2, 5, p.max_blocks});
  ASSERT_OK(plan);
  ASSERT_OK(cuda_->PlanAttention(o.batch, **plan));
  AttentionParams f32 = o.params;
  f32.q.dtype = DType::kF32;
  EXPECT_THAT(cuda_->DecodeAttention(f32, **plan),
              ::lorc::testing::StatusIs(absl::StatusCode::kUnimplemented, ::testing::HasSubstr("F32")));
  AttentionParams hd96 = o.params;
  hd96.head_dim = 96;
  EXPECT_THAT(cuda_->PrefillAttention(hd96, **plan),
              ::lorc::testing::StatusIs(absl::StatusCode::kUnimplemented, ::testing::HasSubstr("head_dim 96")));
  auto small = cuda_->CreateAttentionPlan({1, 5, p.max_blocks});
  ASSERT_OK(small);
  EXPECT_THAT(cuda_->PlanAttention(o.batch, **small),
              ::lorc::testing::StatusIs(absl::StatusCode::kInvalidArgument, ::testing::HasSubstr("max_num_seqs")));
}

}  // namespace
}  // namespace backend_test
}  // namespace lorc
