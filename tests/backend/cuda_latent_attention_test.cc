// Parity of the CUDA backend's LoRC latent attention (backend/cuda_attention.cc,
// kernels/attention_latent.cu) and of RopeKvWrite with rotate_k false with the CPU backend, the
// reference (backend/cpu_latent_attention.cc): seeded mixed batches (decodes, one longer than a
// split-KV chunk, whole-prompt prefills, chunked prefills over a cached context, a sequence with
// no new tokens) at head_dim 128 and block_size 16 over shuffled blocks; GQA groups 2, 4 and 8
// (32 query / 8 KV heads: the 8B shape) and MHA; ranks 64/64, 48/80, 128/128 and 8/16; decode
// captured in a CUDA graph and replayed after the plan was refreshed for another batch.
// CUDA runs BF16 (q, k_up, latents, out); the CPU runs F32 on exactly the bf16-rounded inputs.
// Tolerance: |cuda - cpu| <= 1.5e-2 * max(1, |cpu|): outputs are convex combinations of value
// latents in [-1, 1]; the reconstructed, rotated keys and the probabilities are rounded to bf16
// before their tensor-core products (2^-9 relative each) and the output once more.
// Quantized latent caches (fp8 / int8 / int4): written codes and scales bit-equal, attention
// within the same tolerance (see QuantizedCachesMatchCpu). Skipped without a CUDA device.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <numeric>

#include "tests/backend/backend_ops_fixture.h"
#include "tests/backend/cuda_parity_fixture.h"

namespace lorc {
namespace backend_test {
namespace {

using parity::Get;
using parity::Put;
using parity::PutRaw;

constexpr float kSentinel = 7.0f;  // exact in bf16
constexpr double kTol = 1.5e-2;
constexpr int kHd = 128, kBs = 16;

struct Seq {
  int q_len, seq_len;
};

using parity::RoundBf16;

// One layer's step on the host: bf16-rounded q, B_K and latents; block tables over shuffled blocks.
struct Problem {
  int heads = 0, kv_heads = 0, rk = 0, rv = 0;
  std::vector<Seq> seqs;
  std::vector<int32_t> query_start, seq_lens, tables;
  int max_blocks = 0, num_blocks = 0, num_tokens = 0;
  std::vector<float> q, k_up, ck, cv, inv_freq;
};

Problem MakeProblem(std::mt19937& rng, int heads, int kv_heads, int rk, int rv, std::vector<Seq> seqs,
                    int max_blocks = 0, int num_blocks = 0) {
  Problem p;
  p.heads = heads, p.kv_heads = kv_heads, p.rk = rk, p.rv = rv;
  p.seqs = std::move(seqs);
  p.query_start.push_back(0);
  int blocks = 0;
  for (const Seq& s : p.seqs) {
    p.query_start.push_back(p.query_start.back() + s.q_len);
    p.seq_lens.push_back(s.seq_len);
    p.max_blocks = std::max(p.max_blocks, (s.seq_len + kBs - 1) / kBs);
    blocks += (s.seq_len + kBs - 1) / kBs;
  }
  p.max_blocks = std::max(p.max_blocks, max_blocks);
  p.num_tokens = p.query_start.back();
  p.num_blocks = std::max(blocks + 3, num_blocks);
  std::vector<int32_t> ids(p.num_blocks);
  std::iota(ids.begin(), ids.end(), 0);
  std::shuffle(ids.begin(), ids.end(), rng);
  p.tables.assign(p.seqs.size() * p.max_blocks, 0);
  int next = 0;
  for (size_t s = 0; s < p.seqs.size(); ++s) {
    for (int b = 0; b < (p.seqs[s].seq_len + kBs - 1) / kBs; ++b) p.tables[s * p.max_blocks + b] = ids[next++];
  }
  auto fill = [&](size_t n, float lo, float hi) {
    std::vector<float> x = RandomVec(rng, n, lo, hi);
    for (float& e : x) e = RoundBf16(e);
    return x;
  };
  const size_t slots = static_cast<size_t>(p.num_blocks) * kBs;
  p.q = fill(static_cast<size_t>(p.num_tokens) * heads * kHd, -3.f, 3.f);
  // Keys of unit scale whatever the rank: B_K entries in +-2 / sqrt(r_k).
  const float b = 2.0f / std::sqrt(static_cast<float>(rk));
  p.k_up = fill(static_cast<size_t>(kv_heads) * kHd * rk, -b, b);
  p.ck = fill(slots * kv_heads * rk, -1.f, 1.f);
  p.cv = fill(slots * kv_heads * rv, -1.f, 1.f);
  for (int i = 0; i < kHd / 2; ++i) {  // Llama-3 base frequencies (theta 500000)
    p.inv_freq.push_back(static_cast<float>(1.0 / std::pow(500000.0, 2.0 * i / kHd)));
  }
  return p;
}

struct OnDevice {
  DeviceBuffer q, k_up, out, ck, cv, inv_freq, query_start, seq_lens, tables;
  AttentionBatch batch;
  LatentAttentionParams params;
};

OnDevice Upload(Backend& be, DType d, const Problem& p) {
  OnDevice o;
  o.q = Put(be, p.q, d);
  o.k_up = Put(be, p.k_up, d);
  o.out = Put(be, std::vector<float>(static_cast<size_t>(p.num_tokens) * p.heads * p.rv, kSentinel), d);
  o.ck = Put(be, p.ck, d);
  o.cv = Put(be, p.cv, d);
  o.inv_freq = Put(be, p.inv_freq, DType::kF32);
  o.query_start = PutRaw(be, p.query_start);
  o.seq_lens = PutRaw(be, p.seq_lens);
  o.tables = PutRaw(be, p.tables);
  AttentionBatch& b = o.batch;
  b.num_seqs = static_cast<int32_t>(p.seqs.size());
  b.num_tokens = p.num_tokens;
  b.max_seq_len = *std::max_element(p.seq_lens.begin(), p.seq_lens.end());
  b.max_blocks_per_seq = p.max_blocks;
  b.block_size = kBs;
  b.query_start = o.query_start.as<int32_t>();
  b.seq_lens = o.seq_lens.as<int32_t>();
  b.block_tables = o.tables.as<int32_t>();
  b.host_query_start = p.query_start.data();
  b.host_seq_lens = p.seq_lens.data();
  LatentAttentionParams& a = o.params;
  a.q = Tensor2D{o.q.data(), d, p.num_tokens, static_cast<int64_t>(p.heads) * kHd, 0};
  a.k_up = Tensor2D{o.k_up.data(), d, static_cast<int64_t>(p.kv_heads) * kHd, p.rk, 0};
  a.out = Tensor2D{o.out.data(), d, p.num_tokens, static_cast<int64_t>(p.heads) * p.rv, 0};
  a.cache = KvLayer{o.ck.data(), o.cv.data(), static_cast<int64_t>(p.kv_heads) * p.rk,
                    static_cast<int64_t>(p.kv_heads) * p.rv, d};
  a.num_heads = p.heads;
  a.num_kv_heads = p.kv_heads;
  a.head_dim = kHd;
  a.k_rank = p.rk;
  a.v_rank = p.rv;
  a.scale = 1.0f / std::sqrt(static_cast<float>(kHd));
  a.inv_freq = o.inv_freq.as<float>();
  return o;
}

std::vector<float> RunLatent(Backend& be, DType d, const Problem& p) {
  OnDevice o = Upload(be, d, p);
  auto plan = be.CreateAttentionPlan({static_cast<int32_t>(p.seqs.size()), std::max(1, p.num_tokens), p.max_blocks});
  CHECK(plan.ok()) << plan.status();
  CHECK_OK(be.PlanAttention(o.batch, **plan));
  CHECK_OK(be.LatentAttention(o.params, **plan));
  return Get(be, o.out, d);
}

void ExpectNear(const std::vector<float>& got, const std::vector<float>& want) {
  ASSERT_EQ(got.size(), want.size());
  int bad = 0;
  double worst = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double w = want[i], g = got[i];
    const double err = std::abs(g - w), lim = kTol * std::max(1.0, std::abs(w));
    worst = std::max(worst, err);
    if (!(err <= lim) && ++bad <= 5) {
      ADD_FAILURE() << "element " << i << ": cuda " << g << ", cpu " << w << " (|err| " << err << ")";
    }
  }
  EXPECT_EQ(bad, 0) << "mismatches of " << want.size();
  std::printf("    %zu values, worst |cuda - cpu| %.2e\n", want.size(), worst);
}

class CudaLatentAttentionTest : public CpuCudaPair<> {
 protected:
  void ExpectParity(const Problem& p) {
    ExpectNear(RunLatent(*cuda_, DType::kBF16, p), RunLatent(*cpu_, DType::kF32, p));
  }
  // Decodes, one of them longer than a split-KV chunk, prompts, chunks over a cached context.
  std::vector<Seq> Mixed() {
    return {{1, 1}, {1, 37}, {77, 77}, {1, 5000}, {64, 1064}, {2, 2}, {0, 5}, {1, 600}, {200, 1500}, {1, 16}};
  }
  std::mt19937 rng_{20261201};
};

TEST_F(CudaLatentAttentionTest, Gqa32x8Ranks64x64) { ExpectParity(MakeProblem(rng_, 32, 8, 64, 64, Mixed())); }

TEST_F(CudaLatentAttentionTest, Gqa32x8UnequalRanks48x80) { ExpectParity(MakeProblem(rng_, 32, 8, 48, 80, Mixed())); }

TEST_F(CudaLatentAttentionTest, Gqa4x2AndGqa8x2Ranks64x64And48x80) {
  for (const int heads : {4, 8}) {
    ExpectParity(MakeProblem(rng_, heads, 2, 64, 64, Mixed()));
    ExpectParity(MakeProblem(rng_, heads, 2, 48, 80, Mixed()));
  }
}

TEST_F(CudaLatentAttentionTest, FullAndTinyRanksMhaAndGroup16) {
  ExpectParity(MakeProblem(rng_, 4, 4, 128, 128, {{1, 3000}, {33, 33}, {1, 7}, {9, 400}}));
  ExpectParity(MakeProblem(rng_, 32, 2, 8, 16, {{1, 3000}, {33, 33}, {1, 7}, {9, 400}}));
}

// Large decode batches are not split; a batch of one is split over all SMs.
TEST_F(CudaLatentAttentionTest, WideAndSingleDecodeBatches) {
  std::vector<Seq> wide;
  std::uniform_int_distribution<int> len(1, 700);
  for (int i = 0; i < 128; ++i) wide.push_back({1, len(rng_)});
  ExpectParity(MakeProblem(rng_, 32, 8, 64, 64, wide));
  ExpectParity(MakeProblem(rng_, 32, 8, 64, 64, {{1, 8192}}));
}

// A decode captured in a graph replays over a new batch written in place (same addresses, the
// plan refreshed by PlanAttention) and matches the CPU on that batch.
TEST_F(CudaLatentAttentionTest, CapturedDecodeReplaysAfterReplanning) {
  const int max_blocks = 6000 / kBs, num_blocks = 6 * max_blocks;
  const Problem a = MakeProblem(rng_, 32, 8, 64, 64, {{1, 100}, {1, 5000}, {1, 7}, {1, 1}}, max_blocks, num_blocks);
  const Problem b = MakeProblem(rng_, 32, 8, 64, 64, {{1, 900}, {1, 3}, {1, 6000}, {1, 64}}, max_blocks, num_blocks);
  Backend& be = *cuda_;
  const DType d = DType::kBF16;
  OnDevice o = Upload(be, d, a);
  auto plan = be.CreateAttentionPlan({4, 4, max_blocks});
  ASSERT_OK(plan);
  ASSERT_OK(be.PlanAttention(o.batch, **plan));
  ASSERT_OK(be.BeginCapture());
  ASSERT_OK(be.LatentAttention(o.params, **plan));
  auto graph = be.EndCapture();
  ASSERT_OK(graph);
  ASSERT_OK(be.ReplayGraph(**graph));
  ExpectNear(Get(be, o.out, d), RunLatent(*cpu_, DType::kF32, a));

  for (const auto& [dst, src] : {std::pair<DeviceBuffer*, const std::vector<float>*>{&o.q, &b.q}, {&o.k_up, &b.k_up},
                                 {&o.ck, &b.ck}, {&o.cv, &b.cv}}) {
    DeviceBuffer t = Put(be, *src, d);
    ASSERT_OK(be.CopyOnDevice(dst->data(), t.data(), t.bytes()));
  }
  ASSERT_OK(be.CopyToDevice(o.seq_lens.data(), b.seq_lens.data(), b.seq_lens.size() * 4));
  ASSERT_OK(be.CopyToDevice(o.tables.data(), b.tables.data(), b.tables.size() * 4));
  AttentionBatch batch = o.batch;
  batch.host_seq_lens = b.seq_lens.data();
  batch.host_query_start = b.query_start.data();
  ASSERT_OK(be.PlanAttention(batch, **plan));
  ASSERT_OK(be.ReplayGraph(**graph));
  ExpectNear(Get(be, o.out, d), RunLatent(*cpu_, DType::kF32, b));
}

// RoPE on q only; the key and value latents land in the cache unrotated (exact copies).
TEST_F(CudaLatentAttentionTest, RopeKvWriteWithoutKeyRotation) {
  const int tokens = 5, heads = 4, kv_heads = 2, rk = 48, rv = 80, slots = 64;
  const std::vector<int32_t> positions = {0, 1, 17, 1000, 4095}, slot_mapping = {3, -1, 40, 7, 63};
  const Problem p = MakeProblem(rng_, heads, kv_heads, rk, rv, {{tokens, tokens}});
  const std::vector<float> k = p.ck, v = p.cv;  // first tokens * width values used
  auto run = [&](Backend& be, DType d) {
    DeviceBuffer q = Put(be, p.q, d), dk = Put(be, k, d), dv = Put(be, v, d), inv = Put(be, p.inv_freq, DType::kF32);
    DeviceBuffer kc = Put(be, std::vector<float>(slots * kv_heads * rk, kSentinel), d);
    DeviceBuffer vc = Put(be, std::vector<float>(slots * kv_heads * rv, kSentinel), d);
    DeviceBuffer pos = PutRaw(be, positions), sm = PutRaw(be, slot_mapping);
    RopeKvWriteParams r;
    r.q = Tensor2D{q.data(), d, tokens, heads * kHd, 0};
    r.k = Tensor2D{dk.data(), d, tokens, kv_heads * rk, 0};
    r.v = Tensor2D{dv.data(), d, tokens, kv_heads * rv, 0};
    r.cache = KvLayer{kc.data(), vc.data(), kv_heads * rk, kv_heads * rv, d};
    r.num_heads = heads;
    r.num_kv_heads = kv_heads;
    r.head_dim = kHd;
    r.positions = pos.as<int32_t>();
    r.inv_freq = inv.as<float>();
    r.slot_mapping = sm.as<int32_t>();
    r.rotate_k = false;
    CHECK_OK(be.RopeKvWrite(r));
    return std::vector<std::vector<float>>{Get(be, q, d), Get(be, kc, d), Get(be, vc, d)};
  };
  const auto want = run(*cpu_, DType::kF32), got = run(*cuda_, DType::kBF16);
  ExpectNear(got[0], want[0]);
  EXPECT_EQ(got[1], want[1]);
  EXPECT_EQ(got[2], want[2]);
}

// --- quantized latent caches (--kv-cache-dtype fp8 / int8 / int4) ------------------------------

using kernels::KvQuant;

// The problem's latents written by `be` itself into a quantized cache (WriteKv of every slot, the
// write of RopeKvWrite with rotate_k false: the CPU from fp32 values, CUDA from the same values in
// bf16), then LatentAttention over it; the cache's bytes are returned in *k_bytes / *v_bytes.
std::vector<float> RunQuantLatent(Backend& be, DType d, const Problem& p, KvQuant q, std::vector<uint8_t>* k_bytes,
                                  std::vector<uint8_t>* v_bytes) {
  OnDevice o = Upload(be, d, p);
  parity::QuantCache c = parity::MakeQuantCache(be, q, p.num_blocks, kBs, p.kv_heads,
                                                static_cast<int64_t>(p.kv_heads) * p.rk,
                                                static_cast<int64_t>(p.kv_heads) * p.rv);
  parity::WriteAllSlots(be, d, c.layer, p.ck, p.cv, static_cast<int64_t>(p.num_blocks) * kBs);
  o.params.cache = c.layer;
  auto plan = be.CreateAttentionPlan({static_cast<int32_t>(p.seqs.size()), std::max(1, p.num_tokens), p.max_blocks});
  CHECK(plan.ok()) << plan.status();
  CHECK_OK(be.PlanAttention(o.batch, **plan));
  CHECK_OK(be.LatentAttention(o.params, **plan));
  *k_bytes = parity::GetBytes(be, c.k);
  *v_bytes = parity::GetBytes(be, c.v);
  return Get(be, o.out, d);
}

// Per dtype: the latent caches both backends write from equal inputs are byte-identical (a KV
// head's latent is one scale group; int4: groups of 32 of it, rank 48 ending on a group of 16),
// and latent attention over them agrees within kTol, the bf16 tolerance: both dequantize the same
// codes in fp32 and CUDA rounds them to bf16 for the tensor-core tiles (2^-9 relative, as a bf16
// cache already is); CUDA's int4 fuses zero + code x scale into one rounding. Shapes: the
// small-group decode (ranks <= 64: the fixed-layout loader; 128: the general one), group 16
// (ProcessItem decode), prefill and chunked prefill in the mixed batch, a split long decode.
TEST_F(CudaLatentAttentionTest, QuantizedCachesMatchCpu) {
  const std::vector<Problem> problems = {MakeProblem(rng_, 32, 8, 64, 64, Mixed()),
                                         MakeProblem(rng_, 8, 2, 48, 80, Mixed()),
                                         MakeProblem(rng_, 4, 4, 128, 128, {{1, 3000}, {33, 33}, {1, 7}, {9, 400}}),
                                         MakeProblem(rng_, 32, 2, 8, 16, {{1, 3000}, {33, 33}, {1, 7}, {9, 400}})};
  for (const KvQuant q : {KvQuant::kFp8E4m3, KvQuant::kInt8, KvQuant::kInt4}) {
    for (const Problem& p : problems) {
      SCOPED_TRACE(::testing::Message() << "quant " << static_cast<int>(q) << ", " << p.heads << "/" << p.kv_heads
                                        << " ranks " << p.rk << "/" << p.rv);
      std::vector<uint8_t> ck, cv, gk, gv;
      const std::vector<float> want = RunQuantLatent(*cpu_, DType::kF32, p, q, &ck, &cv);
      const std::vector<float> got = RunQuantLatent(*cuda_, DType::kBF16, p, q, &gk, &gv);
      EXPECT_TRUE(gk == ck) << "key latent codes / scales differ";
      EXPECT_TRUE(gv == cv) << "value latent codes / scales differ";
      ExpectNear(got, want);
    }
  }
}

TEST_F(CudaLatentAttentionTest, RejectsWhatItDoesNotImplement) {
  const Problem p = MakeProblem(rng_, 8, 2, 64, 64, {{1, 10}, {4, 4}});
  OnDevice o = Upload(*cuda_, DType::kBF16, p);
  auto plan = cuda_->CreateAttentionPlan({2, 5, p.max_blocks});
  ASSERT_OK(plan);
  ASSERT_OK(cuda_->PlanAttention(o.batch, **plan));
  LatentAttentionParams f32 = o.params;
  f32.k_up.dtype = DType::kF32;
  EXPECT_THAT(cuda_->LatentAttention(f32, **plan),
              ::lorc::testing::StatusIs(absl::StatusCode::kUnimplemented, ::testing::HasSubstr("k_up dtype F32")));
  LatentAttentionParams odd = o.params;
  odd.k_rank = 60;
  odd.k_up.cols = 60;
  odd.cache.k_width = 120;
  EXPECT_THAT(cuda_->LatentAttention(odd, **plan),
              ::lorc::testing::StatusIs(absl::StatusCode::kUnimplemented, ::testing::HasSubstr("k_rank 60")));
  LatentAttentionParams wrong = o.params;
  wrong.cache.v_width = 64;
  EXPECT_THAT(cuda_->LatentAttention(wrong, **plan),
              ::lorc::testing::StatusIs(absl::StatusCode::kInvalidArgument, ::testing::HasSubstr("cache widths 128/64")));
}

}  // namespace
}  // namespace backend_test
}  // namespace lorc
