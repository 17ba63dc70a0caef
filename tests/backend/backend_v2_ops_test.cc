// Backend v2 ops over every backend (same fixture and tolerances as cpu_backend_test.cc): fused
// residual-add + RMSNorm, RoPE fused with the KV write, the norm-then-projection ops
// (NormMatmulSiluMul / NormMatmulRopeKvWrite: their default, unfused path), the attention plan's
// split and limits, batched block copies across layers, MemoryInfo, pinned memory and events,
// capture hooks, dtype rejection, the CUDA runtime half (skipped without a device), and what the
// CUDA backend's KV policies run (host logic, no device needed).
#include "tests/backend/backend_ops_fixture.h"
#include "backend/cuda_backend.h"
#include "kvpolicy/kv_policy_config.h"

namespace lorc {
namespace backend_test {
namespace {

using ::lorc::testing::StatusIs;
using ::testing::AllOf;
using ::testing::HasSubstr;

// RopeKvWrite's parameters for the qkv rows `qkv` ([T, q | k | v], head_dim hd) into the F32
// caches kc / vc, with the device positions, inverse frequencies and slot mapping.
RopeKvWriteParams F32RopeParams(const Tensor2D& qkv, int heads, int kv_heads, int hd, const DeviceBuffer& kc,
                                const DeviceBuffer& vc, const DeviceBuffer& pos, const DeviceBuffer& inv_freq,
                                const DeviceBuffer& slots) {
  const int64_t qw = int64_t{heads} * hd, kw = int64_t{kv_heads} * hd;
  RopeKvWriteParams p;
  p.q = qkv.ColSlice(0, qw);
  p.k = qkv.ColSlice(qw, kw);
  p.v = qkv.ColSlice(qw + kw, kw);
  p.cache = KvLayer{kc.data(), vc.data(), kw, kw, DType::kF32};
  p.num_heads = heads;
  p.num_kv_heads = kv_heads;
  p.head_dim = hd;
  p.positions = pos.as<int32_t>();
  p.inv_freq = inv_freq.as<float>();
  p.slot_mapping = slots.as<int32_t>();
  return p;
}

TEST_P(BackendOpsTest, FusedAddRmsNormMatchesAddThenNorm) {
  const int64_t T = 5, H = 45;
  const float eps = 1e-5f;
  const std::vector<float> r = RandomVec(rng_, T * H, -3.f, 3.f), x = RandomVec(rng_, T * H);
  const std::vector<float> w = RandomVec(rng_, H, 0.5f, 1.5f);
  std::vector<float> sum(T * H);
  std::vector<double> want_sum(T * H);
  for (size_t i = 0; i < sum.size(); ++i) {
    sum[i] = r[i] + x[i];
    want_sum[i] = static_cast<double>(r[i]) + x[i];
  }
  const std::vector<double> want = RefRmsNorm(sum, w, T, H, eps);
  DeviceBuffer dr = Upload(r), dx = Upload(x), dw = Upload(w), dout = Upload(std::vector<float>(T * H, 0.f));
  ASSERT_OK(be_->FusedAddRmsNorm(View(dr, T, H), View(dx, T, H), View(dw, 1, H), eps, View(dout, T, H)));
  ExpectClose(Download<float>(dr, T * H), want_sum);
  ExpectClose(Download<float>(dout, T * H), want);
  EXPECT_EQ(Download<float>(dx, T * H), x) << "input modified";

  // `out` aliasing `x`, as the forward pass calls it.
  DeviceBuffer dr2 = Upload(r), dx2 = Upload(x);
  ASSERT_OK(be_->FusedAddRmsNorm(View(dr2, T, H), View(dx2, T, H), View(dw, 1, H), eps, View(dx2, T, H)));
  ExpectClose(Download<float>(dr2, T * H), want_sum);
  ExpectClose(Download<float>(dx2, T * H), want);
}

TEST_P(BackendOpsTest, RopeKvWriteRotatesQAndKAndWritesTheCache) {
  const int heads = 6, kv_heads = 2, hd = 10;
  const int32_t bs = 4, num_blocks = 4;
  const int64_t T = 5, qw = heads * hd, kw = kv_heads * hd, ld = qw + 2 * kw;
  const std::vector<int32_t> pos = {0, 7, 8, 33, 2};
  const std::vector<int32_t> slots = {5, 12, -1, 0, 15};  // -1: a padding row, no write
  const std::vector<float> inv_freq = InvFreq(hd, 10000.0);
  const std::vector<float> qkv = RandomVec(rng_, T * ld);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const size_t nslots = static_cast<size_t>(num_blocks) * bs;
  DeviceBuffer dqkv = Upload(qkv), dpos = Upload(pos), dslots = Upload(slots), dinv = Upload(inv_freq);
  DeviceBuffer kc = Upload(std::vector<float>(nslots * kw, nan)), vc = Upload(std::vector<float>(nslots * kw, nan));
  RopeKvWriteParams p = F32RopeParams(View(dqkv, T, ld), heads, kv_heads, hd, kc, vc, dpos, dinv, dslots);
  ASSERT_OK(be_->RopeKvWrite(p));

  // q in place: the rotate-half formula.
  const std::vector<float> all = Download<float>(dqkv, T * ld);
  std::vector<float> got_q;
  for (int64_t t = 0; t < T; ++t) got_q.insert(got_q.end(), &all[t * ld], &all[t * ld + qw]);
  ExpectClose(got_q, RefRope(qkv, ld, 0, T, heads, hd, pos, inv_freq));
  // The cache holds the rotated keys and the untouched values at the slots; -1 wrote nothing.
  const std::vector<double> want_k = RefRope(qkv, ld, qw, T, kv_heads, hd, pos, inv_freq);
  const std::vector<float> k = Download<float>(kc, nslots * kw), v = Download<float>(vc, nslots * kw);
  std::vector<float> got_k;
  std::vector<double> want_k_written;
  std::vector<bool> written(nslots, false);
  for (int64_t t = 0; t < T; ++t) {
    if (slots[t] < 0) continue;
    written[slots[t]] = true;
    for (int64_t j = 0; j < kw; ++j) {
      got_k.push_back(k[slots[t] * kw + j]);
      want_k_written.push_back(want_k[t * kw + j]);
      ASSERT_EQ(v[slots[t] * kw + j], qkv[t * ld + qw + kw + j]) << "token " << t << " col " << j;
    }
  }
  ExpectClose(got_k, want_k_written);
  for (size_t sl = 0; sl < nslots; ++sl) {
    if (!written[sl]) {
      EXPECT_TRUE(std::isnan(k[sl * kw]) && std::isnan(v[sl * kw])) << "slot " << sl;
    }
  }

  // Exactly what the unfused Rope + WriteKv produce.
  DeviceBuffer dqkv2 = Upload(qkv);
  DeviceBuffer kc2 = Upload(std::vector<float>(nslots * kw, nan)), vc2 = Upload(std::vector<float>(nslots * kw, nan));
  const Tensor2D fused2 = View(dqkv2, T, ld);
  ASSERT_OK(be_->Rope({fused2.ColSlice(0, qw), heads, hd, dpos.as<int32_t>(), dinv.as<float>()}));
  ASSERT_OK(be_->Rope({fused2.ColSlice(qw, kw), kv_heads, hd, dpos.as<int32_t>(), dinv.as<float>()}));
  const KvLayer cache2{kc2.data(), vc2.data(), kw, kw, DType::kF32};
  ASSERT_OK(be_->WriteKv(cache2, fused2.ColSlice(qw, kw), fused2.ColSlice(qw + kw, kw), dslots.as<int32_t>()));
  const std::vector<float> k2 = Download<float>(kc2, nslots * kw);
  for (size_t i = 0; i < k.size(); ++i) {
    if (std::isnan(k[i])) {
      ASSERT_TRUE(std::isnan(k2[i])) << i;
    } else {
      ASSERT_EQ(k[i], k2[i]) << i;
    }
  }
  EXPECT_EQ(Download<float>(dqkv2, T * ld), all);
}

// Backend::NormMatmulSiluMul / NormMatmulRopeKvWrite (the stream's add + RMSNorm before a
// projection; the CUDA backend fuses them for BF16 decode steps, so on F32 every backend takes the
// default path): exactly the unfused ops (RmsNorm or FusedAddRmsNorm, Matmul, then SiluMul or
// MatmulRopeKvWrite) on a copy of the stream -- bit for bit on the CPU, within kTol on CUDA. The
// stream ends in `next` (residual untouched) when they differ, in residual in place; without an
// add `next` is untouched. A `next` not shaped like the stream: InvalidArgument naming
// NormedInput, nothing written.
TEST_P(BackendOpsTest, NormMatmulMatchesTheUnfusedOps) {
  const int64_t T = 5, H = 48, I = 6, N = 2 * I;
  const int heads = 2, kv_heads = 1, hd = 8;
  const int64_t qw = heads * hd, kw = kv_heads * hd, NQ = qw + 2 * kw;
  const float eps = 1e-5f, sentinel = 7.f;
  const std::vector<float> r = RandomVec(rng_, T * H, -3.f, 3.f), a = RandomVec(rng_, T * H);
  const std::vector<float> g = RandomVec(rng_, H, 0.5f, 1.5f), w = RandomVec(rng_, N * H), wq = RandomVec(rng_, NQ * H);
  const std::vector<int32_t> pos = {0, 7, 8, 33, 2}, slots = {5, 1, -1, 0, 3};
  const std::vector<float> inv_freq = InvFreq(hd, 10000.0), cache0(6 * kw, sentinel);
  if (GetParam() == BackendKind::kCpu) {
    for (int64_t t = 0; t <= 17; ++t) EXPECT_FALSE(be_->FusesNormMatmul(t)) << t;
  }
  DeviceBuffer dg = Upload(g), dw = Upload(w), dwq = Upload(wq), dpos = Upload(pos), dslots = Upload(slots),
               dinv = Upload(inv_freq);
  auto same = [&](const std::vector<float>& got, const std::vector<float>& want, const char* what) {
    SCOPED_TRACE(what);
    if (GetParam() == BackendKind::kCpu) {
      EXPECT_TRUE(got == want) << "not bit for bit";
    } else {
      ExpectClose(got, std::vector<double>(want.begin(), want.end()));
    }
  };
  // The rotation and cache write of the qkv rows `out` into the caches kc / vc.
  auto rope_params = [&](const Tensor2D& out, const DeviceBuffer& kc, const DeviceBuffer& vc) {
    return F32RopeParams(out, heads, kv_heads, hd, kc, vc, dpos, dinv, dslots);
  };
  // One call on fresh buffers: mode 0 no add, 1 add with `next` distinct, 2 add in place; fused:
  // the Norm op, else the unfused ops. Returns residual, next, normed, out, act, k and v caches.
  auto run = [&](int mode, bool silu, bool fused) {
    DeviceBuffer dr = Upload(r), da = Upload(a), dnext = Upload(std::vector<float>(T * H, sentinel));
    DeviceBuffer dn = Upload(std::vector<float>(T * H, sentinel));
    DeviceBuffer dout = Upload(std::vector<float>(T * NQ, sentinel));
    DeviceBuffer dact = Upload(std::vector<float>(T * I, sentinel));
    DeviceBuffer kc = Upload(cache0), vc = Upload(cache0);
    NormedInput in;
    in.residual = View(dr, T, H);
    if (mode > 0) in.add = View(da, T, H);
    in.next = mode == 2 ? in.residual : View(dnext, T, H);
    in.weight = View(dg, 1, H);
    in.eps = eps;
    in.normed = View(dn, T, H);
    const Tensor2D out = View(dout, T, silu ? N : NQ);
    const RopeKvWriteParams p = rope_params(out, kc, vc);
    if (fused) {
      CHECK_OK(silu ? be_->NormMatmulSiluMul(in, View(dw, N, H), out, View(dact, T, I))
                    : be_->NormMatmulRopeKvWrite(in, View(dwq, NQ, H), out, p));
    } else {
      // The unfused ops, in place on the stream.
      if (mode > 0) {
        CHECK_OK(be_->FusedAddRmsNorm(in.residual, in.add, in.weight, eps, in.normed));
      } else {
        CHECK_OK(be_->RmsNorm(in.residual, in.weight, eps, in.normed));
      }
      if (silu) {
        CHECK_OK(be_->Matmul(in.normed, View(dw, N, H), out));
        CHECK_OK(be_->SiluMul(out, View(dact, T, I)));
      } else {
        CHECK_OK(be_->MatmulRopeKvWrite(in.normed, View(dwq, NQ, H), out, p));
      }
    }
    EXPECT_EQ(Download<float>(da, T * H), a) << "add written";
    return std::vector<std::vector<float>>{Download<float>(dr, T * H),        Download<float>(dnext, T * H),
                                           Download<float>(dn, T * H),        Download<float>(dout, T * NQ),
                                           Download<float>(dact, T * I),      Download<float>(kc, cache0.size()),
                                           Download<float>(vc, cache0.size())};
  };
  for (const bool silu : {true, false}) {
    for (const int mode : {0, 1, 2}) {
      SCOPED_TRACE(::testing::Message() << (silu ? "NormMatmulSiluMul" : "NormMatmulRopeKvWrite") << " mode " << mode);
      const auto got = run(mode, silu, true), want = run(mode, silu, false);
      // Where the stream ends: next with a distinct next and an add, else residual.
      same(got[mode == 1 ? 1 : 0], want[0], "stream");
      if (mode == 1) {
        EXPECT_EQ(got[0], r) << "residual written with a distinct next";
        std::vector<float> sum(T * H);
        for (size_t i = 0; i < sum.size(); ++i) sum[i] = r[i] + a[i];
        same(got[1], sum, "next = residual + add");
      } else {
        EXPECT_EQ(got[1], std::vector<float>(T * H, sentinel)) << "next written";
      }
      if (mode == 0) {
        EXPECT_EQ(got[0], r) << "residual written without an add";
      }
      const char* names[] = {"", "", "normed", "out", "act", "k cache", "v cache"};
      for (size_t i = 2; i < got.size(); ++i) same(got[i], want[i], names[i]);
    }
  }

  // A next that is not the stream's rows, columns, pitch or dtype.
  DeviceBuffer dr = Upload(r), da = Upload(a), dnext = Upload(std::vector<float>(T * (H + 8), sentinel));
  DeviceBuffer dn = Upload(std::vector<float>(T * H, sentinel)), dout = Upload(std::vector<float>(T * NQ, sentinel));
  DeviceBuffer dact = Upload(std::vector<float>(T * I, sentinel)), kc = Upload(cache0), vc = Upload(cache0);
  NormedInput in;
  in.residual = View(dr, T, H);
  in.add = View(da, T, H);
  in.weight = View(dg, 1, H);
  in.eps = eps;
  in.normed = View(dn, T, H);
  const Tensor2D out = View(dout, T, NQ);
  const RopeKvWriteParams p = rope_params(out, kc, vc);
  const Tensor2D bad_next[] = {View(dnext, T - 1, H), View(dnext, T, H - 8),
                               Tensor2D{dnext.data(), DType::kF32, T, H, H + 8},
                               Tensor2D{dnext.data(), DType::kBF16, T, H}};
  for (const Tensor2D& next : bad_next) {
    SCOPED_TRACE(::testing::Message() << "next [" << next.rows << ", " << next.cols << "] pitch " << next.stride()
                                      << (next.dtype == DType::kBF16 ? " BF16" : ""));
    in.next = next;
    EXPECT_THAT(be_->NormMatmulSiluMul(in, View(dw, N, H), out.ColSlice(0, N), View(dact, T, I)),
                StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("NormedInput")));
    EXPECT_THAT(be_->NormMatmulRopeKvWrite(in, View(dwq, NQ, H), out, p),
                StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("NormedInput")));
  }
  EXPECT_EQ(Download<float>(dr, T * H), r) << "residual written";
  EXPECT_EQ(Download<float>(dnext, T * (H + 8)), std::vector<float>(T * (H + 8), sentinel)) << "next written";
  EXPECT_EQ(Download<float>(dn, T * H), std::vector<float>(T * H, sentinel)) << "normed written";
  EXPECT_EQ(Download<float>(dact, T * I), std::vector<float>(T * I, sentinel)) << "act written";
  EXPECT_EQ(Download<float>(kc, cache0.size()), cache0) << "k cache written";
}

TEST_P(BackendOpsTest, PlanSplitsDecodesAndPrefillsAndEnforcesLimits) {
  // q_len per sequence: 1, 4, 1, 0 (a sequence with nothing this step), 2.
  const std::vector<int32_t> qstart = {0, 1, 5, 6, 6, 8}, lens = {9, 4, 1, 3, 10};
  AttentionBatch b;
  b.num_seqs = 5;
  b.num_tokens = 8;
  b.max_seq_len = 10;
  b.max_blocks_per_seq = 3;
  b.block_size = 4;
  b.host_query_start = qstart.data();
  b.host_seq_lens = lens.data();
  auto plan = be_->CreateAttentionPlan({5, 8, 3});
  ASSERT_OK(plan);
  ASSERT_OK(be_->PlanAttention(b, **plan));
  EXPECT_EQ((*plan)->num_decodes(), 2);
  EXPECT_EQ((*plan)->num_prefills(), 2);

  auto small = be_->CreateAttentionPlan({4, 8, 3});
  ASSERT_OK(small);
  EXPECT_THAT(be_->PlanAttention(b, **small),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("max_num_seqs")));
  auto few_tokens = be_->CreateAttentionPlan({5, 7, 3});
  ASSERT_OK(few_tokens);
  EXPECT_THAT(be_->PlanAttention(b, **few_tokens),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("max_num_batched_tokens")));
  const std::vector<int32_t> bad_lens = {9, 3, 1, 3, 10};  // 4 queries in a sequence of 3
  b.host_seq_lens = bad_lens.data();
  EXPECT_THAT(be_->PlanAttention(b, **plan), StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST_P(BackendOpsTest, CopyBlocksCopiesManyBlocksInEveryLayer) {
  const int32_t bs = 3, num_blocks = 7;
  const size_t nslots = static_cast<size_t>(num_blocks) * bs;
  const std::vector<std::pair<int64_t, int64_t>> widths = {{8, 8}, {5, 2}, {1, 9}};
  std::vector<std::vector<float>> k0, v0;
  std::vector<DeviceBuffer> kb, vb;
  std::vector<KvLayer> layers;
  for (const auto& [kw, vw] : widths) {
    k0.push_back(RandomVec(rng_, nslots * kw));
    v0.push_back(RandomVec(rng_, nslots * vw));
    kb.push_back(Upload(k0.back()));
    vb.push_back(Upload(v0.back()));
    layers.push_back(KvLayer{kb.back().data(), vb.back().data(), kw, vw, DType::kF32});
  }
  const std::vector<BlockCopy> copies = {{4, 1}, {0, 5}, {2, 3}};
  // A bad pair anywhere rejects the whole call before any copy.
  const std::vector<BlockCopy> bad = {{4, 1}, {0, num_blocks}};
  EXPECT_THAT(be_->CopyBlocks(layers, bs, num_blocks, bad),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("outside")));
  EXPECT_EQ(Download<float>(kb[0], nslots * 8), k0[0]);
  ASSERT_OK(be_->CopyBlocks(layers, bs, num_blocks, copies));
  for (size_t l = 0; l < widths.size(); ++l) {
    for (int kv = 0; kv < 2; ++kv) {
      const int64_t w = kv == 0 ? widths[l].first : widths[l].second;
      const std::vector<float>& before = kv == 0 ? k0[l] : v0[l];
      const std::vector<float> after = Download<float>(kv == 0 ? kb[l] : vb[l], nslots * w);
      const size_t per_block = static_cast<size_t>(bs) * w;
      for (int32_t b = 0; b < num_blocks; ++b) {
        int32_t from = b;
        for (const BlockCopy& c : copies) if (c.dst == b) from = c.src;
        for (size_t i = 0; i < per_block; ++i) {
          ASSERT_EQ(after[b * per_block + i], before[from * per_block + i])
              << "layer " << l << (kv == 0 ? " K" : " V") << " block " << b << " element " << i;
        }
      }
    }
  }
}

TEST_P(BackendOpsTest, MemoryInfoIsSane) {
  const MemoryInfo m = be_->GetMemoryInfo();
  EXPECT_GT(m.total_bytes, int64_t{64} << 20);
  EXPECT_GT(m.free_bytes, 0);
  EXPECT_LE(m.free_bytes, m.total_bytes);
}

TEST_P(BackendOpsTest, PinnedHostMemoryRoundTrips) {
  const std::vector<float> data = RandomVec(rng_, 100);
  auto pinned = be_->AllocateHost(data.size() * sizeof(float));
  ASSERT_OK(pinned);
  EXPECT_EQ(pinned->kind(), MemoryKind::kPinnedHost);
  std::copy(data.begin(), data.end(), pinned->as<float>());
  auto dev = be_->Allocate(data.size() * sizeof(float));
  ASSERT_OK(dev);
  ASSERT_OK(be_->CopyToDevice(dev->data(), pinned->data(), data.size() * sizeof(float)));
  auto ev = be_->CreateEvent();
  ASSERT_OK(ev);
  ASSERT_OK(be_->RecordEvent(**ev));
  ASSERT_OK(be_->SynchronizeEvent(**ev));  // now the pinned source may be reused
  std::fill_n(pinned->as<float>(), data.size(), 0.f);
  EXPECT_EQ(Download<float>(*dev, data.size()), data);
}

TEST_P(BackendOpsTest, CaptureHooksNestAndReplay) {
  ASSERT_OK(be_->BeginCapture());
  EXPECT_THAT(be_->BeginCapture(), StatusIs(absl::StatusCode::kFailedPrecondition));
  auto g = be_->EndCapture();
  ASSERT_OK(g);
  ASSERT_OK(be_->ReplayGraph(**g));
  EXPECT_THAT(be_->EndCapture(), StatusIs(absl::StatusCode::kFailedPrecondition));
}

TEST(CpuBackendDtypeTest, RejectsNonF32WithUnimplementedNamingOpAndDtype) {
  auto be = CreateBackend(BackendOptions{BackendKind::kCpu});
  ASSERT_OK(be);
  EXPECT_EQ((*be)->stream_handle(), nullptr);
  EXPECT_FALSE((*be)->SupportsGraphs());
  std::vector<float> a(12, 1.f), b(12, 1.f), c(9, 0.f);
  const Tensor2D x{a.data(), DType::kF32, 3, 4, 4};
  const Tensor2D w_bf16{b.data(), DType::kBF16, 3, 4, 4};
  const Tensor2D out{c.data(), DType::kF32, 3, 3, 3};
  EXPECT_THAT((*be)->Matmul(x, w_bf16, out),
              StatusIs(absl::StatusCode::kUnimplemented, AllOf(HasSubstr("Matmul"), HasSubstr("BF16"))));
  const Tensor2D x_f16{a.data(), DType::kF16, 3, 4, 4};
  const Tensor2D norm_w{b.data(), DType::kF32, 1, 4, 4};
  EXPECT_THAT((*be)->FusedAddRmsNorm(x_f16, x, norm_w, 1e-5f, x),
              StatusIs(absl::StatusCode::kUnimplemented, AllOf(HasSubstr("FusedAddRmsNorm"), HasSubstr("F16"))));
}

// The CUDA backend's runtime half (stream, pinned memory, events, graphs, CopyBlocks) works before
// its kernels do. Skips only when there is no device.
TEST(CudaRuntimeTest, StreamCopiesEventsGraphsAndBlockCopies) {
  auto devices = ListCudaDevices();
  if (!devices.ok() || devices->empty()) GTEST_SKIP() << "no CUDA device: " << devices.status();
  auto be = CreatePartialCudaBackend(BackendOptions{BackendKind::kCuda});
  ASSERT_OK(be);
  Backend& b = **be;
  EXPECT_NE(b.stream_handle(), nullptr);
  EXPECT_TRUE(b.SupportsGraphs());
  const MemoryInfo m = b.GetMemoryInfo();
  EXPECT_GT(m.free_bytes, 0);
  EXPECT_LE(m.free_bytes, m.total_bytes);

  const int n = 1000;
  auto pinned = b.AllocateHost(n * sizeof(float));
  auto src = b.Allocate(n * sizeof(float)), dst = b.Allocate(n * sizeof(float));
  ASSERT_OK(pinned);
  ASSERT_OK(src);
  ASSERT_OK(dst);
  for (int i = 0; i < n; ++i) pinned->as<float>()[i] = static_cast<float>(i);
  ASSERT_OK(b.CopyToDevice(src->data(), pinned->data(), n * sizeof(float)));
  auto ev = b.CreateEvent();
  ASSERT_OK(ev);
  ASSERT_OK(b.RecordEvent(**ev));
  ASSERT_OK(b.SynchronizeEvent(**ev));

  // Capture "zero dst, then copy src into it"; replay after changing src in place.
  ASSERT_OK(b.BeginCapture());
  ASSERT_OK(b.Memset(dst->data(), 0, n * sizeof(float)));
  ASSERT_OK(b.CopyOnDevice(dst->data(), src->data(), n / 2 * sizeof(float)));
  auto g = b.EndCapture();
  ASSERT_OK(g);
  std::vector<float> host(n, -1.f);
  for (int i = 0; i < n; ++i) pinned->as<float>()[i] = static_cast<float>(2 * i);
  ASSERT_OK(b.CopyToDevice(src->data(), pinned->data(), n * sizeof(float)));
  ASSERT_OK(b.ReplayGraph(**g));
  ASSERT_OK(b.CopyToHost(host.data(), dst->data(), n * sizeof(float)));
  ASSERT_OK(b.Synchronize());
  for (int i = 0; i < n; ++i) ASSERT_EQ(host[i], i < n / 2 ? 2.f * i : 0.f) << i;

  // CopyBlocks over two layers: block 3 -> 0 (4 slots of width 5 per block, 4 blocks).
  const int32_t bs = 4, blocks = 4, w = 5;
  KvLayer l0{src->data(), dst->data(), w, w, DType::kF32};
  KvLayer l1{static_cast<float*>(src->data()) + 500, static_cast<float*>(dst->data()) + 500, w, w, DType::kF32};
  ASSERT_OK(b.CopyBlocks({l0, l1}, bs, blocks, {BlockCopy{3, 0}}));
  std::vector<float> after(n);
  ASSERT_OK(b.CopyToHost(after.data(), src->data(), n * sizeof(float)));
  ASSERT_OK(b.Synchronize());
  for (int i = 0; i < bs * w; ++i) {
    ASSERT_EQ(after[i], 2.f * (3 * bs * w + i)) << "layer 0 element " << i;
    ASSERT_EQ(after[500 + i], 2.f * (500 + 3 * bs * w + i)) << "layer 1 element " << i;
  }
  EXPECT_THAT(b.CopyBlocks({l0}, bs, blocks, {BlockCopy{0, 4}}),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(b.Matmul(Tensor2D{}, Tensor2D{nullptr, DType::kBF16}, Tensor2D{}),
              StatusIs(absl::StatusCode::kUnimplemented, HasSubstr("Matmul")));
}

INSTANTIATE_TEST_SUITE_P(Backends, BackendOpsTest,
                         ::testing::Values(BackendKind::kCpu, BackendKind::kCuda), KindName);

// CudaKvPolicySupport (CudaBackend::CheckKvPolicy at load): CORM and MiKV (int4 and int2) over full
// KV and over LoRC latents; groups above 8 refused, naming the flag, latent or not.
TEST(CudaKvPolicySupportTest, RefusesWhatTheKernelsDoNotRunNamingTheFlag) {
  kvpolicy::KvPolicyConfig corm, mikv, mikv2;
  corm.kind = kvpolicy::KvPolicyKind::kCorm;
  mikv.kind = kvpolicy::KvPolicyKind::kMikv;
  mikv2 = mikv;
  mikv2.low_bits = 2;
  EXPECT_OK(CudaKvPolicySupport(corm, /*latent=*/false, 4));
  EXPECT_OK(CudaKvPolicySupport(mikv, /*latent=*/false, 8));
  EXPECT_OK(CudaKvPolicySupport(corm, /*latent=*/true, 8));
  EXPECT_OK(CudaKvPolicySupport(mikv, /*latent=*/true, 4));
  EXPECT_OK(CudaKvPolicySupport(mikv, /*latent=*/true, 8));
  EXPECT_OK(CudaKvPolicySupport(mikv2, /*latent=*/true, 1));
  EXPECT_THAT(CudaKvPolicySupport(corm, /*latent=*/true, 16),
              StatusIs(absl::StatusCode::kUnimplemented,
                       AllOf(HasSubstr("--kv-policy corm"), HasSubstr("up to 8 query heads per KV head"), HasSubstr("16"))));
  EXPECT_THAT(CudaKvPolicySupport(mikv, /*latent=*/true, 16),
              StatusIs(absl::StatusCode::kUnimplemented,
                       AllOf(HasSubstr("--kv-policy mikv"), HasSubstr("up to 8 query heads per KV head"), HasSubstr("16"))));
  EXPECT_THAT(CudaKvPolicySupport(mikv2, /*latent=*/false, 12),
              StatusIs(absl::StatusCode::kUnimplemented, AllOf(HasSubstr("--kv-policy mikv"), HasSubstr("12"))));
}

}  // namespace
}  // namespace backend_test
}  // namespace lorc
