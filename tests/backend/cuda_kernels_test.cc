// Parity of the CUDA backend's element-wise and row kernels (kernels/) and of its cuBLASLt Matmul
// (tolerances stated at its tests) with the CPU backend, the reference: the same seeded inputs
// run through both, for F32 and BF16 tensors and several shapes (odd sizes, strided and unaligned views that take the scalar paths). BF16 inputs are
// rounded to bf16 first, and the CPU runs on exactly those values in fp32.
// Tolerances, |cuda - cpu| <= tol * max(1, |cpu|): F32 1e-5; BF16 1e-2 (one bf16 rounding of
// each output is 2^-9 relative); copies (Embedding, GatherRows, WriteKv, v rows) exact.
// Skipped without a CUDA device.
#include <cstring>

#include "tests/backend/cuda_parity_fixture.h"
#include "model/model_config.h"
#include "tests/backend/backend_ops_fixture.h"

namespace lorc {
namespace backend_test {
namespace {

using ::lorc::testing::StatusIs;
using ::testing::AllOf;
using ::testing::HasSubstr;
using parity::Get;
using parity::Put;
using parity::PutRaw;

std::vector<float> RoundTo(DType dt, std::vector<float> v) {
  if (dt == DType::kBF16) {
    for (float& x : v) x = Bf16ToF32(F32ToBf16(x));
  } else if (dt == DType::kF16) {
    for (float& x : v) x = F16ToF32(F32ToF16(x));
  }
  return v;
}

std::string DTypeParamName(const ::testing::TestParamInfo<DType>& i) { return DTypeName(i.param); }

class CudaKernelParityTest : public CpuCudaPair<::testing::TestWithParam<DType>> {
 protected:
  DType dt() const { return GetParam(); }
  double tol() const { return dt() == DType::kF32 ? 1e-5 : 1e-2; }
  // Seeded random values, already representable in the test's dtype.
  std::vector<float> Random(size_t n, float lo = -1.f, float hi = 1.f) {
    return RoundTo(dt(), RandomVec(rng_, n, lo, hi));
  }

  // rows x cols of `b` from element `offset` on, row stride `ld` (0: cols).
  static Tensor2D View(const DeviceBuffer& b, DType d, int64_t rows, int64_t cols, int64_t ld = 0,
                       int64_t offset = 0) {
    return Tensor2D{static_cast<char*>(b.data()) + offset * DTypeSize(d), d, rows, cols, ld};
  }

  // Runs `op(backend, dtype)` (which returns its outputs as host floats) on the CPU in F32 and on
  // CUDA in the test's dtype, and compares every output.
  template <typename Op>
  void ExpectParity(Op op, double tol) {
    const std::vector<std::vector<float>> want = op(*cpu_, DType::kF32);
    const std::vector<std::vector<float>> got = op(*cuda_, dt());
    ASSERT_EQ(got.size(), want.size());
    for (size_t o = 0; o < want.size(); ++o) {
      SCOPED_TRACE(::testing::Message() << "output " << o);
      ASSERT_EQ(got[o].size(), want[o].size());
      int bad = 0;
      double worst = 0;
      for (size_t i = 0; i < want[o].size(); ++i) {
        const double w = want[o][i], g = got[o][i];
        if (std::isnan(w) && std::isnan(g)) continue;  // untouched NaN-filled slots
        const double err = std::abs(g - w), lim = tol * std::max(1.0, std::abs(w));
        worst = std::max(worst, lim > 0 ? err / lim : err);
        if (!(err <= lim) && ++bad <= 5) {
          ADD_FAILURE() << "element " << i << ": cuda " << g << ", cpu " << w << " (|err| " << err
                        << " > " << lim << ")";
        }
      }
      EXPECT_EQ(bad, 0) << "mismatches of " << want[o].size() << "; worst err/limit " << worst;
    }
  }

  std::mt19937 rng_{20261130};
};

// Shapes: decode-like single rows of Llama widths, odd widths (scalar paths) and several rows.
struct RowShape {
  int64_t rows, cols;
};
const RowShape kRowShapes[] = {{1, 4096}, {5, 45}, {3, 8192}, {4, 1000}, {2, 7}};

// Launch-ahead's input ids from a draw on the device (Backend::TakeDrawnTokens): exact, ids
// outside the vocabulary (a non-finite draw's) written as 0, rows without a pair untouched.
TEST_P(CudaKernelParityTest, TakeDrawnTokensCopiesDrawsExactly) {
  if (dt() != DType::kF32) GTEST_SKIP() << "int32 ids: one dtype";
  const int32_t vocab = 1000;
  const std::vector<int32_t> ids(300, 5), drawn = {3, -1, 999, 1000, 42, 7, 0};
  std::vector<int32_t> pairs;
  for (int32_t row = 1; row < 300; row += 3) {  // 100 pairs: more than one block's threads
    pairs.push_back(row);
    pairs.push_back(row % 7);
  }
  const int32_t n = static_cast<int32_t>(pairs.size() / 2);
  auto run = [&](Backend& be, DType) {
    DeviceBuffer id = PutRaw(be, ids), dr = PutRaw(be, drawn), pr = PutRaw(be, pairs);
    CHECK_OK(be.TakeDrawnTokens(id.as<int32_t>(), dr.as<int32_t>(), pr.as<int32_t>(), n, vocab));
    std::vector<int32_t> got(ids.size());
    CHECK_OK(be.CopyToHost(got.data(), id.data(), got.size() * sizeof(int32_t)));
    CHECK_OK(be.Synchronize());
    return std::vector<std::vector<float>>{std::vector<float>(got.begin(), got.end())};
  };
  ExpectParity(run, 0.0);
  const std::vector<float> cpu = run(*cpu_, DType::kF32)[0];
  EXPECT_EQ(cpu[0], 5.f);    // no pair
  EXPECT_EQ(cpu[1], 0.f);    // drawn[1] = -1
  EXPECT_EQ(cpu[4], 42.f);   // drawn[4]
  EXPECT_EQ(cpu[7], 3.f);    // drawn[0]
  EXPECT_EQ(cpu[10], 0.f);   // drawn[3] = vocab
  EXPECT_EQ(cpu[16], 999.f);  // drawn[2]
}

TEST_P(CudaKernelParityTest, EmbeddingAndGatherRowsCopyRowsExactly) {
  for (const RowShape s : kRowShapes) {
    SCOPED_TRACE(::testing::Message() << s.rows << "x" << s.cols);
    const int64_t vocab = 37, out_ld = s.cols + 3;  // a strided output too
    const std::vector<float> table = Random(vocab * s.cols);
    std::vector<int32_t> ids(s.rows);
    for (int32_t& id : ids) id = static_cast<int32_t>(rng_() % vocab);
    ids[0] = vocab - 1;
    ExpectParity([&](Backend& be, DType d) {
      DeviceBuffer t = Put(be, table, d), id = PutRaw(be, ids);
      DeviceBuffer e = Put(be, std::vector<float>(s.rows * s.cols, 0.f), d);
      DeviceBuffer g = Put(be, std::vector<float>(s.rows * out_ld, 0.f), d);
      CHECK_OK(be.Embedding(View(t, d, vocab, s.cols), id.as<int32_t>(), View(e, d, s.rows, s.cols)));
      CHECK_OK(be.GatherRows(View(t, d, vocab, s.cols), id.as<int32_t>(), View(g, d, s.rows, s.cols, out_ld)));
      return std::vector<std::vector<float>>{Get(be, e, d), Get(be, g, d)};
    }, 0.0);
  }
}

TEST_P(CudaKernelParityTest, RmsNormAndFusedAddRmsNorm) {
  const float eps = 1e-5f;
  for (const RowShape s : kRowShapes) {
    for (const int64_t offset : {0, 1}) {  // 1: unaligned views with a padded stride
      SCOPED_TRACE(::testing::Message() << s.rows << "x" << s.cols << " offset " << offset);
      const int64_t ld = s.cols + 2 * offset;
      const std::vector<float> x = Random(s.rows * ld, -2.f, 2.f), r = Random(s.rows * ld, -3.f, 3.f);
      const std::vector<float> w = Random(s.cols + offset, 0.5f, 1.5f);
      ExpectParity([&](Backend& be, DType d) {
        DeviceBuffer dx = Put(be, x, d), dr = Put(be, r, d), dw = Put(be, w, d);
        DeviceBuffer out = Put(be, std::vector<float>(s.rows * ld, 0.f), d);
        DeviceBuffer fx = Put(be, x, d);
        const Tensor2D wv = View(dw, d, 1, s.cols, 0, offset);
        CHECK_OK(be.RmsNorm(View(dx, d, s.rows, s.cols, ld, offset), wv, eps, View(out, d, s.rows, s.cols, ld, offset)));
        // Fused, with `out` aliasing `x` as the forward pass calls it.
        const Tensor2D fxv = View(fx, d, s.rows, s.cols, ld, offset);
        CHECK_OK(be.FusedAddRmsNorm(View(dr, d, s.rows, s.cols, ld, offset), fxv, wv, eps, fxv));
        return std::vector<std::vector<float>>{Get(be, out, d), Get(be, dr, d), Get(be, fx, d)};
      }, tol());
    }
  }
}

TEST_P(CudaKernelParityTest, AddInPlaceAndSiluMul) {
  for (const RowShape s : kRowShapes) {
    for (const int64_t offset : {0, 1}) {
      SCOPED_TRACE(::testing::Message() << s.rows << "x" << s.cols << " offset " << offset);
      const int64_t ld = 2 * s.cols + offset;
      const std::vector<float> acc = Random(s.rows * ld, -3.f, 3.f), gu = Random(s.rows * ld, -6.f, 6.f);
      ExpectParity([&](Backend& be, DType d) {
        DeviceBuffer da = Put(be, acc, d), dg = Put(be, gu, d);
        DeviceBuffer out = Put(be, std::vector<float>(s.rows * s.cols, 0.f), d);
        CHECK_OK(be.AddInPlace(View(da, d, s.rows, s.cols, ld, offset), View(dg, d, s.rows, s.cols, ld, offset)));
        CHECK_OK(be.SiluMul(View(dg, d, s.rows, 2 * s.cols, ld, offset), View(out, d, s.rows, s.cols)));
        return std::vector<std::vector<float>>{Get(be, da, d), Get(be, out, d)};
      }, tol());
    }
  }
  // Llama-3-8B's intermediate size at decode, the widest SiluMul.
  const int64_t inter = 14336;
  const std::vector<float> gu = Random(2 * inter, -8.f, 8.f);
  ExpectParity([&](Backend& be, DType d) {
    DeviceBuffer dg = Put(be, gu, d), out = Put(be, std::vector<float>(inter, 0.f), d);
    CHECK_OK(be.SiluMul(View(dg, d, 1, 2 * inter), View(out, d, 1, inter)));
    return std::vector<std::vector<float>>{Get(be, out, d)};
  }, tol());
}

// Inverse frequencies of the three RoPE types, from the model code (model_config.h).
std::vector<float> ScaledInvFreq(RopeType type, int head_dim) {
  ModelConfig c;
  c.head_dim = head_dim;
  c.rope.type = type;
  c.rope.theta = 500000.0;
  c.rope.factor = type == RopeType::kLlama3 ? 8.0 : 4.0;
  c.rope.low_freq_factor = 1.0;
  c.rope.high_freq_factor = 4.0;
  c.rope.original_max_position_embeddings = 8192;
  return RopeInverseFrequencies(c);
}

struct HeadShape {
  int heads, kv_heads, head_dim;
  int64_t tokens;
};
// Llama-3-8B per rank (32/8 x 128), a 64-wide head, an odd tiny one (scalar path).
const HeadShape kHeadShapes[] = {{32, 8, 128, 3}, {8, 2, 64, 6}, {3, 1, 10, 5}};

TEST_P(CudaKernelParityTest, RopeDefaultLinearAndLlama3) {
  for (const HeadShape s : kHeadShapes) {
    for (const RopeType type : {RopeType::kDefault, RopeType::kLinear, RopeType::kLlama3}) {
      SCOPED_TRACE(::testing::Message() << s.heads << "x" << s.head_dim << " rope type " << static_cast<int>(type));
      const std::vector<float> inv_freq = ScaledInvFreq(type, s.head_dim);
      std::vector<int32_t> pos(s.tokens);
      for (int32_t& p : pos) p = static_cast<int32_t>(rng_() % 131072);
      pos[0] = 0;
      const int64_t width = static_cast<int64_t>(s.heads) * s.head_dim;
      const std::vector<float> x = Random(s.tokens * (width + 1), -2.f, 2.f);
      ExpectParity([&](Backend& be, DType d) {
        DeviceBuffer dx = Put(be, x, d), dp = PutRaw(be, pos), df = PutRaw(be, inv_freq);
        DeviceBuffer ux = Put(be, x, d);  // the same rows one element off: the scalar path
        CHECK_OK(be.Rope({View(dx, d, s.tokens, width), s.heads, s.head_dim, dp.as<int32_t>(), df.as<float>()}));
        CHECK_OK(be.Rope({View(ux, d, s.tokens, width, width + 1, 1), s.heads, s.head_dim, dp.as<int32_t>(),
                          df.as<float>()}));
        return std::vector<std::vector<float>>{Get(be, dx, d), Get(be, ux, d)};
      }, tol());
    }
  }
}

TEST_P(CudaKernelParityTest, WriteKvAndRopeKvWrite) {
  for (const HeadShape s : kHeadShapes) {
    SCOPED_TRACE(::testing::Message() << s.heads << "/" << s.kv_heads << "x" << s.head_dim);
    const int64_t qw = static_cast<int64_t>(s.heads) * s.head_dim, kw = static_cast<int64_t>(s.kv_heads) * s.head_dim;
    const int64_t ld = qw + 2 * kw, T = s.tokens, nslots = 4 * T;
    std::vector<int32_t> pos(T), slots(T);
    for (int64_t t = 0; t < T; ++t) {
      pos[t] = static_cast<int32_t>(rng_() % 9000);
      slots[t] = static_cast<int32_t>((t * 3 + 1) % nslots);
    }
    slots[1] = -1;  // a padding row: no write
    const std::vector<float> inv_freq = ScaledInvFreq(RopeType::kLlama3, s.head_dim);
    const std::vector<float> qkv = Random(T * ld, -2.f, 2.f);
    const std::vector<float> empty(nslots * kw, std::numeric_limits<float>::quiet_NaN());
    ExpectParity([&](Backend& be, DType d) {
      DeviceBuffer dqkv = Put(be, qkv, d), dp = PutRaw(be, pos), ds = PutRaw(be, slots), df = PutRaw(be, inv_freq);
      DeviceBuffer kc = Put(be, empty, d), vc = Put(be, empty, d);
      DeviceBuffer kc2 = Put(be, empty, d), vc2 = Put(be, empty, d);
      const Tensor2D all = View(dqkv, d, T, ld);
      // WriteKv of the unrotated rows into a second cache.
      CHECK_OK(be.WriteKv(KvLayer{kc2.data(), vc2.data(), kw, kw, d}, all.ColSlice(qw, kw), all.ColSlice(qw + kw, kw),
                          ds.as<int32_t>()));
      RopeKvWriteParams p;
      p.q = all.ColSlice(0, qw);
      p.k = all.ColSlice(qw, kw);
      p.v = all.ColSlice(qw + kw, kw);
      p.cache = KvLayer{kc.data(), vc.data(), kw, kw, d};
      p.num_heads = s.heads;
      p.num_kv_heads = s.kv_heads;
      p.head_dim = s.head_dim;
      p.positions = dp.as<int32_t>();
      p.inv_freq = df.as<float>();
      p.slot_mapping = ds.as<int32_t>();
      CHECK_OK(be.RopeKvWrite(p));
      return std::vector<std::vector<float>>{Get(be, dqkv, d), Get(be, kc, d), Get(be, vc, d), Get(be, kc2, d),
                                             Get(be, vc2, d)};
    }, tol());
  }
}

// On the GPU the fused op stores exactly what Rope + WriteKv store (BF16 included).
TEST_P(CudaKernelParityTest, RopeKvWriteEqualsRopeThenWriteKvBitForBit) {
  const HeadShape s = kHeadShapes[0];
  const int64_t qw = static_cast<int64_t>(s.heads) * s.head_dim, kw = static_cast<int64_t>(s.kv_heads) * s.head_dim;
  const int64_t ld = qw + 2 * kw, T = 4, nslots = 16;
  const std::vector<int32_t> pos = {0, 5, 9000, 131000}, slots = {3, -1, 0, 15};
  const std::vector<float> inv_freq = ScaledInvFreq(RopeType::kLlama3, s.head_dim);
  const std::vector<float> qkv = Random(T * ld, -2.f, 2.f), zeros(nslots * kw, 0.f);
  Backend& be = *cuda_;
  const DType d = dt();
  DeviceBuffer dp = PutRaw(be, pos), ds = PutRaw(be, slots), df = PutRaw(be, inv_freq);
  DeviceBuffer a = Put(be, qkv, d), b = Put(be, qkv, d);
  DeviceBuffer kc = Put(be, zeros, d), vc = Put(be, zeros, d), kc2 = Put(be, zeros, d), vc2 = Put(be, zeros, d);
  const Tensor2D fa = View(a, d, T, ld), fb = View(b, d, T, ld);
  ASSERT_OK(be.RopeKvWrite({fa.ColSlice(0, qw), fa.ColSlice(qw, kw), fa.ColSlice(qw + kw, kw),
                            KvLayer{kc.data(), vc.data(), kw, kw, d}, s.heads, s.kv_heads, s.head_dim,
                            dp.as<int32_t>(), df.as<float>(), ds.as<int32_t>()}));
  ASSERT_OK(be.Rope({fb.ColSlice(0, qw), s.heads, s.head_dim, dp.as<int32_t>(), df.as<float>()}));
  ASSERT_OK(be.Rope({fb.ColSlice(qw, kw), s.kv_heads, s.head_dim, dp.as<int32_t>(), df.as<float>()}));
  ASSERT_OK(be.WriteKv(KvLayer{kc2.data(), vc2.data(), kw, kw, d}, fb.ColSlice(qw, kw), fb.ColSlice(qw + kw, kw),
                       ds.as<int32_t>()));
  EXPECT_EQ(Get(be, a, d), Get(be, b, d));
  EXPECT_EQ(Get(be, kc, d), Get(be, kc2, d));
  EXPECT_EQ(Get(be, vc, d), Get(be, vc2, d));
  const std::vector<float> k = Get(be, kc, d);
  EXPECT_EQ(k[1 * kw], 0.f) << "slot 1 was never written";
  EXPECT_NE(k[3 * kw], 0.f) << "slot 3 holds token 0's key";
}

// A captured norm + RoPE/KV write replays over refreshed inputs at the same addresses, and gives
// what the eager ops give.
TEST_P(CudaKernelParityTest, CapturedOpsReplayWithRefreshedInputs) {
  const int heads = 4, kv_heads = 2, hd = 64;
  const int64_t T = 3, qw = heads * hd, kw = kv_heads * hd, ld = qw + 2 * kw, nslots = 8;
  const std::vector<float> inv_freq = ScaledInvFreq(RopeType::kDefault, hd);
  const std::vector<float> x0 = Random(T * ld), w = Random(ld, 0.5f, 1.5f), zeros(nslots * kw, 0.f);
  Backend& be = *cuda_;
  const DType d = dt();
  DeviceBuffer dx = Put(be, x0, d), dw = Put(be, w, d), df = PutRaw(be, inv_freq);
  DeviceBuffer dp = PutRaw(be, std::vector<int32_t>{1, 2, 3}), ds = PutRaw(be, std::vector<int32_t>{0, 1, 2});
  DeviceBuffer kc = Put(be, zeros, d), vc = Put(be, zeros, d);
  const Tensor2D xv = View(dx, d, T, ld);
  auto step = [&] {
    CHECK_OK(be.RmsNorm(xv, View(dw, d, 1, ld), 1e-5f, xv));
    CHECK_OK(be.RopeKvWrite({xv.ColSlice(0, qw), xv.ColSlice(qw, kw), xv.ColSlice(qw + kw, kw),
                             KvLayer{kc.data(), vc.data(), kw, kw, d}, heads, kv_heads, hd, dp.as<int32_t>(),
                             df.as<float>(), ds.as<int32_t>()}));
  };
  ASSERT_OK(be.BeginCapture());
  step();
  auto graph = be.EndCapture();
  ASSERT_OK(graph);
  // New inputs in place, then replay; then the same inputs eagerly.
  const std::vector<float> x1 = Random(T * ld);
  const std::vector<int32_t> pos1 = {40, 41, 7000}, slots1 = {7, -1, 4};
  auto refresh = [&] {
    DeviceBuffer tmp = Put(be, x1, d);
    CHECK_OK(be.CopyOnDevice(dx.data(), tmp.data(), tmp.bytes()));
    CHECK_OK(be.CopyToDevice(dp.data(), pos1.data(), pos1.size() * 4));
    CHECK_OK(be.CopyToDevice(ds.data(), slots1.data(), slots1.size() * 4));
    CHECK_OK(be.Memset(kc.data(), 0, kc.bytes()));
    CHECK_OK(be.Memset(vc.data(), 0, vc.bytes()));
    CHECK_OK(be.Synchronize());
  };
  refresh();
  ASSERT_OK(be.ReplayGraph(**graph));
  const std::vector<float> rx = Get(be, dx, d), rk = Get(be, kc, d), rv = Get(be, vc, d);
  refresh();
  step();
  EXPECT_EQ(rx, Get(be, dx, d));
  EXPECT_EQ(rk, Get(be, kc, d));
  EXPECT_EQ(rv, Get(be, vc, d));
  EXPECT_NE(rk[7 * kw], 0.f) << "slot 7 written by the replay";
}

TEST_P(CudaKernelParityTest, RejectsOtherDtypesAndShapes) {
  DeviceBuffer a = Put(*cuda_, std::vector<float>(64, 1.f), DType::kF32);
  const Tensor2D x{a.data(), DType::kF16, 2, 8, 0};
  const Tensor2D w{a.data(), DType::kF16, 1, 8, 0};
  EXPECT_THAT(cuda_->RmsNorm(x, w, 1e-5f, x),
              StatusIs(absl::StatusCode::kUnimplemented, AllOf(HasSubstr("RmsNorm"), HasSubstr("F16"))));
  const Tensor2D xf{a.data(), dt(), 2, 8, 0};
  const Tensor2D mixed{a.data(), dt() == DType::kF32 ? DType::kBF16 : DType::kF32, 2, 8, 0};
  EXPECT_THAT(cuda_->AddInPlace(xf, mixed),
              StatusIs(absl::StatusCode::kUnimplemented, HasSubstr("AddInPlace")));
  EXPECT_THAT(cuda_->SiluMul(xf, xf), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("SiluMul")));
  EXPECT_THAT(cuda_->Rope({xf, 3, 2, nullptr, nullptr}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("head_dim")));
  EXPECT_THAT(cuda_->Matmul(xf, xf, xf),
              StatusIs(absl::StatusCode::kInvalidArgument, AllOf(HasSubstr("Matmul"), HasSubstr("x[2,8]"))));
}

// --- Matmul (cuBLASLt) ---------------------------------------------------------------------------
// Tolerance: |cuda - cpu| <= rel * |cpu| + 1e-6 * sum_k |x_k w_k|, where rel = 2^-8 for a 16-bit
// output (its one rounding is at most 2^-9 relative) and 1e-6 for an F32 output; the second term
// covers fp32 accumulation in another order (its error scales with the summed magnitudes: about
// sqrt(K) of them for random signs, K at worst). A wrong layout, stride or dtype is off by O(1).

struct MatmulCase {
  int64_t T, K, N;
  int64_t x_off = 0, w_row0 = 0, w_off = 0, out_off = 0, pad = 0;  // strided views when non-zero
};

class CudaMatmulParityTest : public CudaKernelParityTest {
 protected:
  // Runs one case on both backends (the CPU on the same rounded inputs, in F32) and compares the
  // whole output buffer: the view within tolerance, every element outside it untouched.
  void ExpectMatmulParity(DType ab, DType od, const MatmulCase& c);
};

void CudaMatmulParityTest::ExpectMatmulParity(DType ab, DType od, const MatmulCase& c) {
  Backend &cpu = *cpu_, &cuda = *cuda_;
  std::mt19937& rng = rng_;
  SCOPED_TRACE(::testing::Message() << "T=" << c.T << " K=" << c.K << " N=" << c.N << " " << DTypeName(ab)
                                    << " -> " << DTypeName(od) << (c.pad ? " strided" : ""));
  const int64_t x_ld = c.K + c.x_off + c.pad, w_ld = c.K + c.w_off + c.pad, o_ld = c.N + c.out_off + c.pad;
  const int64_t w_rows = c.N + c.w_row0;
  const std::vector<float> x = RoundTo(ab, RandomVec(rng, c.T * x_ld)), w = RoundTo(ab, RandomVec(rng, w_rows * w_ld));
  const float sentinel = 1024.f;
  const std::vector<float> out0(c.T * o_ld, sentinel);
  auto run = [&](Backend& be, DType in_t, DType out_t, const std::vector<float>& xs, const std::vector<float>& ws) {
    DeviceBuffer dx = Put(be, xs, in_t), dw = Put(be, ws, in_t);
    DeviceBuffer dout = Put(be, out0, out_t);
    const Tensor2D xv = View(dx, in_t, c.T, x_ld).ColSlice(c.x_off, c.K);
    const Tensor2D wv = View(dw, in_t, w_rows, w_ld).RowSlice(c.w_row0, c.N).ColSlice(c.w_off, c.K);
    const Tensor2D ov = View(dout, out_t, c.T, o_ld).ColSlice(c.out_off, c.N);
    CHECK_OK(be.Matmul(xv, wv, ov));
    return Get(be, dout, out_t);
  };
  std::vector<float> ax = x, aw = w;
  for (float& v : ax) v = std::abs(v);
  for (float& v : aw) v = std::abs(v);
  const std::vector<float> want = run(cpu, DType::kF32, DType::kF32, x, w);
  const std::vector<float> mag = run(cpu, DType::kF32, DType::kF32, ax, aw);
  const std::vector<float> got = run(cuda, ab, od, x, w);
  const double rel = od == DType::kF32 ? 1e-6 : 1.0 / 256;
  int bad = 0;
  double worst = 0;
  for (int64_t t = 0; t < c.T; ++t) {
    for (int64_t j = 0; j < o_ld; ++j) {
      const size_t i = t * o_ld + j;
      if (j < c.out_off || j >= c.out_off + c.N) {
        if (got[i] != sentinel && ++bad <= 5) ADD_FAILURE() << "row " << t << " col " << j << " overwritten";
        continue;
      }
      const double err = std::abs(static_cast<double>(got[i]) - want[i]);
      const double lim = rel * std::abs(want[i]) + 1e-6 * mag[i];
      worst = std::max(worst, err / lim);
      if (!(err <= lim) && ++bad <= 5) {
        ADD_FAILURE() << "out[" << t << "," << j - c.out_off << "]: cuda " << got[i] << ", cpu " << want[i]
                      << " (|err| " << err << " > " << lim << ")";
      }
    }
  }
  EXPECT_EQ(bad, 0) << "worst err/limit " << worst;
}

// Decode (T = 1..256, the token-count buckets and numbers between them), prefill, odd K and N
// (unaligned rows), and strided views (column slices of wider buffers, as the qkv split makes).
const MatmulCase kMatmulCases[] = {
    {1, 4096, 6144}, {2, 1024, 1536}, {3, 1024, 1536}, {8, 1024, 1536}, {17, 1024, 1536},
    {64, 1024, 1536}, {100, 1024, 1536}, {256, 1024, 1536}, {33, 512, 768}, {64, 512, 768},
    {40, 512, 768},  // 33, 64 and 40 share a bucket: its cached algorithm serves all three
    {512, 512, 768}, {1000, 384, 1000}, {3, 37, 23}, {7, 129, 1001}, {5, 4095, 7}, {1, 1, 1},
    {9, 37, 23, 5, 2, 3, 4, 7},                 // unaligned strided views
    {64, 256, 384, 8, 8, 8, 8, 8},              // 16-byte aligned strided views
    {1, 4096, 1024, 0, 0, 0, 2048, 3072},       // an output column slice
};

TEST_P(CudaMatmulParityTest, MatmulMatchesCpuOnDecodePrefillOddAndStridedShapes) {
  std::vector<DType> outs = {dt()};
  if (dt() != DType::kF32) outs.push_back(DType::kF32);  // bf16 hidden states -> fp32 logits
  for (const DType od : outs) {
    for (const MatmulCase& c : kMatmulCases) ExpectMatmulParity(dt(), od, c);
  }
}

TEST_P(CudaMatmulParityTest, MatmulF16) {
  if (dt() == DType::kF32) GTEST_SKIP() << "the F16 cases run once, in the BF16 instance";
  for (const DType od : {DType::kF16, DType::kF32}) {
    for (const MatmulCase& c : {MatmulCase{1, 4096, 1024}, MatmulCase{64, 512, 768}, MatmulCase{7, 129, 1001},
                                MatmulCase{9, 37, 23, 5, 2, 3, 4, 7}}) {
      ExpectMatmulParity(DType::kF16, od, c);
    }
  }
}

// Captured GEMMs replay over refreshed inputs: one shape seen eagerly before the capture (its
// algorithm timed and cached), one seen first inside it (the heuristic's pick, nothing timed or
// allocated); then the latter eagerly again (now timed) gives the same result within tolerance.
TEST_P(CudaMatmulParityTest, MatmulCapturesAndReplays) {
  Backend& be = *cuda_;
  const DType d = dt();
  const MatmulCase a{8, 512, 640}, b{3, 320, 200};
  struct Operands {
    DeviceBuffer x, w, out;
  };
  auto alloc = [&](const MatmulCase& c) {
    return Operands{Put(be, std::vector<float>(c.T * c.K, 0.f), d), Put(be, Random(c.N * c.K), d),
                    Put(be, std::vector<float>(c.T * c.N, 0.f), d)};
  };
  Operands A = alloc(a), B = alloc(b);
  auto gemm = [&](const MatmulCase& c, const Operands& m) {
    return be.Matmul(View(m.x, d, c.T, c.K), View(m.w, d, c.N, c.K), View(m.out, d, c.T, c.N));
  };
  ASSERT_OK(gemm(a, A));
  ASSERT_OK(be.Synchronize());
  ASSERT_OK(be.BeginCapture());
  ASSERT_OK(gemm(a, A));
  ASSERT_OK(gemm(b, B));
  auto graph = be.EndCapture();
  ASSERT_OK(graph);
  auto expect = [&](const MatmulCase& c, const Operands& m, const std::vector<float>& x) {
    const std::vector<float> w = Get(be, m.w, d), got = Get(be, m.out, d);
    DeviceBuffer cx = Put(*cpu_, x, DType::kF32), cw = Put(*cpu_, w, DType::kF32);
    DeviceBuffer co = Put(*cpu_, std::vector<float>(c.T * c.N, 0.f), DType::kF32);
    ASSERT_OK(cpu_->Matmul(View(cx, DType::kF32, c.T, c.K), View(cw, DType::kF32, c.N, c.K),
                           View(co, DType::kF32, c.T, c.N)));
    const std::vector<float> want = Get(*cpu_, co, DType::kF32);
    for (size_t i = 0; i < want.size(); ++i) {
      // |x|, |w| <= 1: the summed magnitudes are at most K.
      ASSERT_NEAR(got[i], want[i], (d == DType::kF32 ? 1e-6 : 1.0 / 256) * std::abs(want[i]) + 1e-6 * c.K)
          << "element " << i;
    }
  };
  for (int round = 0; round < 2; ++round) {
    SCOPED_TRACE(round);
    const std::vector<float> xa = Random(a.T * a.K), xb = Random(b.T * b.K);
    DeviceBuffer ta = Put(be, xa, d), tb = Put(be, xb, d);
    ASSERT_OK(be.CopyOnDevice(A.x.data(), ta.data(), ta.bytes()));
    ASSERT_OK(be.CopyOnDevice(B.x.data(), tb.data(), tb.bytes()));
    ASSERT_OK(be.Memset(A.out.data(), 0, A.out.bytes()));
    ASSERT_OK(be.Memset(B.out.data(), 0, B.out.bytes()));
    ASSERT_OK(be.ReplayGraph(**graph));
    ASSERT_OK(be.Synchronize());
    expect(a, A, xa);
    expect(b, B, xb);
    if (round == 1) {
      ASSERT_OK(be.Memset(B.out.data(), 0, B.out.bytes()));
      ASSERT_OK(gemm(b, B));
      expect(b, B, xb);
    }
  }
}

TEST_P(CudaMatmulParityTest, MatmulRejectsShapesAndDtypesNamingThem) {
  DeviceBuffer buf = Put(*cuda_, std::vector<float>(256, 1.f), DType::kF32);
  const DType d = dt();
  auto t = [&](DType dtype, int64_t rows, int64_t cols, int64_t ld = 0) {
    return Tensor2D{buf.data(), dtype, rows, cols, ld};
  };
  EXPECT_THAT(cuda_->Matmul(t(d, 3, 5), t(d, 4, 6), t(d, 3, 4)),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       AllOf(HasSubstr("Matmul"), HasSubstr("x[3,5]"), HasSubstr("w[4,6]"), HasSubstr("out[3,4]"))));
  EXPECT_THAT(cuda_->Matmul(t(d, 3, 5), t(d, 4, 5), t(d, 3, 3)),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("out[3,3]")));
  EXPECT_THAT(cuda_->Matmul(t(d, 3, 5, 4), t(d, 4, 5), t(d, 3, 4)),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("x[3,5 ld 4]")));
  const DType other = d == DType::kF32 ? DType::kBF16 : DType::kF32;
  EXPECT_THAT(cuda_->Matmul(t(d, 3, 5), t(other, 4, 5), t(d, 3, 4)),
              StatusIs(absl::StatusCode::kUnimplemented,
                       AllOf(HasSubstr("Matmul"), HasSubstr(DTypeName(d)), HasSubstr(DTypeName(other)))));
  EXPECT_THAT(cuda_->Matmul(t(DType::kF32, 3, 5), t(DType::kF32, 4, 5), t(DType::kBF16, 3, 4)),
              StatusIs(absl::StatusCode::kUnimplemented, HasSubstr("out BF16")));
  EXPECT_THAT(cuda_->Matmul(t(DType::kI32, 3, 5), t(DType::kI32, 4, 5), t(DType::kI32, 3, 4)),
              StatusIs(absl::StatusCode::kUnimplemented, HasSubstr("I32")));
  // Empty cases: T = 0 and N = 0 do nothing; K = 0 writes zeros (an empty sum).
  EXPECT_OK(cuda_->Matmul(t(d, 0, 5), t(d, 4, 5), t(d, 0, 4)));
  EXPECT_OK(cuda_->Matmul(t(d, 3, 5), t(d, 0, 5), t(d, 3, 0)));
  DeviceBuffer z = Put(*cuda_, std::vector<float>(12, 7.f), d);
  ASSERT_OK(cuda_->Matmul(t(d, 3, 0), t(d, 4, 0), View(z, d, 3, 4)));
  EXPECT_EQ(Get(*cuda_, z, d), std::vector<float>(12, 0.f));
}

INSTANTIATE_TEST_SUITE_P(Dtypes, CudaKernelParityTest, ::testing::Values(DType::kF32, DType::kBF16),
                         DTypeParamName);
INSTANTIATE_TEST_SUITE_P(Dtypes, CudaMatmulParityTest, ::testing::Values(DType::kF32, DType::kBF16),
                         DTypeParamName);

}  // namespace
}  // namespace backend_test
}  // namespace lorc
