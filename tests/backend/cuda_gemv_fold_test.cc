// The residual add fused into the decode GEMV and the folded norms (kernels::LaunchGemvAddBf16,
// LaunchSumSquaresPartials, LaunchScaleColumns, GemvNormArgs::sum_squares; Backend::MatmulAdd,
// SumSquaresPartials, ScaleColumns, NormMatmulSiluMul / NormMatmulRopeKvWrite with
// NormedInput::sum_squares):
// - acc += bf16(x * w^T) is, bit for bit, the GEMV with the same configuration into a scratch
//   buffer then AddInPlace, for every configuration (cluster splits 1-4, k_steps 4 and 8), every M
//   of both token tiles, N = 37 (a partial 16-row tile), K with and without a masked tail, acc a
//   strided view (columns outside it untouched); its partial sums of squares are bit for bit
//   LaunchSumSquaresPartials's of the result, which are the host's fp32 sums in column order
//   (no fused multiply-add on either side: the host build has no -mfma).
// - Backend::MatmulAdd (fused where Matmul chose a GEMV configuration for the operands, else the
//   two ops) gives the bits of Matmul then AddInPlace on its first call (which makes the choice)
//   and after; the base class refuses acc and scratch of different shapes.
// - ScaleColumns is bf16(w * g) per element, as the host computes it.
// - The folded projections (weights W' = ScaleColumns(W, g), the rms from the partials, no norm
//   op) are within bounds of the CPU's RmsNorm(x) * g then W in fp32: a projection element y_j,
//   S_j = sum_k |W_jk g_k x_k| / rms: |cuda - cpu| <= 2^-8 (S_j + |y_j|) (W' rounded once, 2^-9
//   of each term, and y once, with room for fp32 accumulation and the rsqrt); silu(g) * u within
//   ActLimit of those; rotated q / k elements within 2^-7 of both partners' terms; and the errors'
//   RMS under 2^-6 of the reference's. The bounds reject a missing 1 / rms (x's rms is about 3.5)
//   and a missing weight g (in [0.5, 1.5]).
// Skipped without a CUDA device (except the refusal).
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "backend/cuda_gemv.h"
#ifdef LORC_HAVE_CUDA
#include "kernels/gemv.cuh"
#endif
#include "tests/backend/backend_ops_fixture.h"
#include "tests/backend/cuda_parity_fixture.h"

namespace lorc {
namespace backend_test {
namespace {

using parity::Get;
using parity::GetBytes;
using parity::Put;

std::vector<float> Bf16Values(std::mt19937 &rng, size_t n, float lo, float hi) {
  std::vector<float> v = RandomVec(rng, n, lo, hi);
  for (float &e : v) e = Bf16ToF32(F32ToBf16(e));
  return v;
}

// The partial sums of squares of rows [0, rows) of v (pitch ld), columns [col0, col0 + cols), in
// groups of 16: fp32, column order, a product and a sum rounded each (no FMA on this build).
std::vector<float> HostPartials(const std::vector<float>& v, int64_t rows, int64_t ld, int64_t col0, int64_t cols) {
  const int64_t parts = (cols + 15) / 16;
  std::vector<float> out(rows * parts);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t p = 0; p < parts; ++p) {
      float s = 0.f;
      for (int64_t c = 16 * p; c < std::min(cols, 16 * p + 16); ++c) {
        const float e = v[r * ld + col0 + c];
        const float sq = e * e;
        s = s + sq;
      }
      out[r * parts + p] = s;
    }
  }
  return out;
}

class CudaGemvAddTest : public CpuCudaPair<> {
 protected:
  void SetUp() override {
    SetCudaMatmulPolicy(CudaMatmulPolicy::kGemvFirst);
    CpuCudaPair<>::SetUp();
  }
  void TearDown() override { SetCudaMatmulPolicy(CudaMatmulPolicy::kAuto); }
  std::mt19937 rng_{20261206};
};

#ifdef LORC_HAVE_CUDA
TEST_F(CudaGemvAddTest, EveryConfigurationIsTheGemvThenAddInPlace) {
  const auto stream = static_cast<cudaStream_t>(cuda_->stream_handle());
  const int64_t N = 37, ld = 48, col0 = 5;  // acc: columns [5, 42) of rows of 48
  for (const int64_t K : {264, 1032}) {
    for (const int64_t M : {1, 5, 8, 11, 16}) {
      const std::vector<float> x = Bf16Values(rng_, M * K, -1.f, 1.f), w = Bf16Values(rng_, N * K, -1.f, 1.f);
      const std::vector<float> acc0 = Bf16Values(rng_, M * ld, -4.f, 4.f);
      DeviceBuffer dx = Put(*cuda_, x, DType::kBF16), dw = Put(*cuda_, w, DType::kBF16);
      const Tensor2D xv{dx.data(), DType::kBF16, M, K}, wv{dw.data(), DType::kBF16, N, K};
      for (int config = 0; config < cuda_internal::GemvConfigCount(); ++config) {
        SCOPED_TRACE(::testing::Message() << "M=" << M << " K=" << K << " " << cuda_internal::GemvConfigName(config));
        DeviceBuffer fused = Put(*cuda_, acc0, DType::kBF16), ops = Put(*cuda_, acc0, DType::kBF16);
        DeviceBuffer scratch = Put(*cuda_, std::vector<float>(M * N, 0.f), DType::kBF16);
        const auto view = [&](const DeviceBuffer& b) {
          return Tensor2D{b.data(), DType::kBF16, M, ld}.ColSlice(col0, N);
        };
        const int64_t parts = (N + 15) / 16;
        DeviceBuffer sums = Put(*cuda_, std::vector<float>(M * parts, -1.f), DType::kF32);
        const absl::Status s = cuda_internal::RunGemvAdd(xv, wv, view(fused), config, sums.as<float>(), stream);
        if (!s.ok()) {  // a cluster split on a device without clusters: the
                        // plain GEMV refuses it too
          EXPECT_FALSE(
              cuda_internal::RunGemv(xv, wv, Tensor2D{scratch.data(), DType::kBF16, M, N}, config, stream).ok());
          continue;
        }
        ASSERT_OK(cuda_internal::RunGemv(xv, wv, Tensor2D{scratch.data(), DType::kBF16, M, N}, config, stream));
        ASSERT_OK(cuda_->AddInPlace(view(ops), Tensor2D{scratch.data(), DType::kBF16, M, N}));
        EXPECT_EQ(GetBytes(*cuda_, fused), GetBytes(*cuda_, ops));
        EXPECT_NE(GetBytes(*cuda_, fused), GetBytes(*cuda_, Put(*cuda_, acc0, DType::kBF16))) << "nothing added";
        // The partials: SumSquaresPartials's of the result, and the host's.
        DeviceBuffer want = Put(*cuda_, std::vector<float>(M * parts, -2.f), DType::kF32);
        ASSERT_OK(cuda_->SumSquaresPartials(view(ops), want.as<float>()));
        EXPECT_EQ(GetBytes(*cuda_, sums), GetBytes(*cuda_, want)) << "partials vs SumSquaresPartials";
        EXPECT_EQ(Get(*cuda_, want, DType::kF32), HostPartials(Get(*cuda_, ops, DType::kBF16), M, ld, col0, N))
            << "SumSquaresPartials vs the host";
      }
    }
  }
}

TEST_F(CudaGemvAddTest, MatmulAddIsMatmulThenAddInPlace) {
  for (const int64_t M : {1, 3, 8, 16, 17}) {  // 17: past the GEMV (cuBLASLt, the two ops)
    SCOPED_TRACE(::testing::Message() << "M=" << M);
    const int64_t N = 96, K = 512;
    const std::vector<float> x = Bf16Values(rng_, M * K, -1.f, 1.f), w = Bf16Values(rng_, N * K, -1.f, 1.f);
    const std::vector<float> acc0 = Bf16Values(rng_, M * N, -4.f, 4.f);
    DeviceBuffer dx = Put(*cuda_, x, DType::kBF16), dw = Put(*cuda_, w, DType::kBF16);
    DeviceBuffer scratch = Put(*cuda_, std::vector<float>(M * N, 0.f), DType::kBF16);
    const Tensor2D xv{dx.data(), DType::kBF16, M, K}, wv{dw.data(), DType::kBF16, N, K};
    const Tensor2D sv{scratch.data(), DType::kBF16, M, N};
    DeviceBuffer want = Put(*cuda_, acc0, DType::kBF16);
    ASSERT_OK(cuda_->Matmul(xv, wv, sv));
    ASSERT_OK(cuda_->AddInPlace({want.data(), DType::kBF16, M, N}, sv));
    for (int call = 0; call < 2; ++call) {
      SCOPED_TRACE(::testing::Message() << "call " << call);
      DeviceBuffer acc = Put(*cuda_, acc0, DType::kBF16);
      ASSERT_OK(cuda_->MatmulAdd(xv, wv, {acc.data(), DType::kBF16, M, N}, sv));
      EXPECT_EQ(GetBytes(*cuda_, acc), GetBytes(*cuda_, want));
    }
  }
}

TEST_F(CudaGemvAddTest, ScaleColumnsIsTheBf16Product) {
  const int64_t R = 5, C = 40, ld = 48;
  const std::vector<float> w = Bf16Values(rng_, R * ld, -2.f, 2.f), g = Bf16Values(rng_, C, 0.5f, 1.5f);
  DeviceBuffer dw = Put(*cuda_, w, DType::kBF16), dg = Put(*cuda_, g, DType::kBF16);
  ASSERT_OK(cuda_->ScaleColumns(Tensor2D{dw.data(), DType::kBF16, R, ld}.ColSlice(0, C), {dg.data(), DType::kBF16, 1, C}));
  std::vector<float> want = w;
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t c = 0; c < C; ++c) want[r * ld + c] = Bf16ToF32(F32ToBf16(w[r * ld + c] * g[c]));
  }
  EXPECT_EQ(Get(*cuda_, dw, DType::kBF16), want);
  EXPECT_EQ(cuda_->ScaleColumns({dw.data(), DType::kBF16, R, C}, {dg.data(), DType::kBF16, 1, C - 1}).code(),
            absl::StatusCode::kInvalidArgument);
}

double Silu(double v) { return v / (1.0 + std::exp(-v)); }

// The folded projections against the CPU: x [M, K] in [-6, 6] (rms about 3.5), g in [0.5, 1.5],
// W' = ScaleColumns(W, g) on the device, the partials of x from SumSquaresPartials; the CUDA
// backend with folded norms on takes the GEMV (NormedInput::normed and gate_up stay untouched:
// no norm op ran). Bounds in the header comment.
class CudaFoldedNormTest : public CudaGemvAddTest {
 protected:
  void SetUp() override {
    saved_ = GetCudaFoldedNorms();
    SetCudaFoldedNorms(true);
    CudaGemvAddTest::SetUp();
  }
  void TearDown() override {
    SetCudaFoldedNorms(saved_);
    CudaGemvAddTest::TearDown();
  }
  bool saved_ = false;
};

TEST_F(CudaFoldedNormTest, FoldedProjectionsMatchCpu) {
  constexpr float kEps = 1e-5f, kSentinel = 1024.f;
  ASSERT_EQ(cuda_->FoldedNormRows(), kernels::kGemvNormMaxRows);
  const int heads = 4, kv_heads = 2, hd = 64;
  const int64_t I = 40, NS = 2 * I, NQ = (heads + 2 * kv_heads) * hd, kw = kv_heads * hd;
  for (const int64_t K : {256, 1048}) {
    for (const int64_t M : {1, 3, 8}) {
      SCOPED_TRACE(::testing::Message() << "M=" << M << " K=" << K);
      const std::vector<float> x = Bf16Values(rng_, M * K, -6.f, 6.f), g = Bf16Values(rng_, K, 0.5f, 1.5f);
      const std::vector<float> ws = Bf16Values(rng_, NS * K, -1.f, 1.f), wq = Bf16Values(rng_, NQ * K, -1.f, 1.f);
      // The CPU reference: normed = RmsNorm(x) * g in fp32, y = normed W^T, mag = |normed| |W|^T.
      DeviceBuffer cx = Put(*cpu_, x, DType::kF32), cg = Put(*cpu_, g, DType::kF32);
      DeviceBuffer cn = Put(*cpu_, std::vector<float>(M * K, 0.f), DType::kF32);
      ASSERT_OK(cpu_->RmsNorm({cx.data(), DType::kF32, M, K}, {cg.data(), DType::kF32, 1, K}, kEps,
                              {cn.data(), DType::kF32, M, K}));
      const std::vector<float> normed = Get(*cpu_, cn, DType::kF32);
      auto cpu_proj = [&](const std::vector<float>& a, const std::vector<float>& w, int64_t n) {
        DeviceBuffer da = Put(*cpu_, a, DType::kF32), dw = Put(*cpu_, w, DType::kF32);
        DeviceBuffer o = Put(*cpu_, std::vector<float>(M * n, 0.f), DType::kF32);
        CHECK_OK(cpu_->Matmul({da.data(), DType::kF32, M, K}, {dw.data(), DType::kF32, n, K}, {o.data(), DType::kF32, M, n}));
        return Get(*cpu_, o, DType::kF32);
      };
      auto abs_of = [](std::vector<float> v) {
        for (float& e : v) e = std::abs(e);
        return v;
      };

      // The device operands: x, its partials, the folded weights, a ones weight, sentinel outputs.
      DeviceBuffer dx = Put(*cuda_, x, DType::kBF16), dg = Put(*cuda_, g, DType::kBF16);
      DeviceBuffer ones = Put(*cuda_, std::vector<float>(K, 1.f), DType::kBF16);
      DeviceBuffer sums = Put(*cuda_, std::vector<float>(M * ((K + 15) / 16), 0.f), DType::kF32);
      const Tensor2D xv{dx.data(), DType::kBF16, M, K};
      ASSERT_OK(cuda_->SumSquaresPartials(xv, sums.as<float>()));
      auto folded = [&](const std::vector<float>& w, int64_t n) {
        DeviceBuffer dw = Put(*cuda_, w, DType::kBF16);
        CHECK_OK(cuda_->ScaleColumns({dw.data(), DType::kBF16, n, K}, {dg.data(), DType::kBF16, 1, K}));
        return dw;
      };
      DeviceBuffer scratch = Put(*cuda_, std::vector<float>(M * K, kSentinel), DType::kBF16);
      NormedInput in;
      in.residual = xv;
      in.next = xv;
      in.weight = Tensor2D{ones.data(), DType::kBF16, 1, K};
      in.eps = kEps;
      in.normed = Tensor2D{scratch.data(), DType::kBF16, M, K};
      in.sum_squares = sums.as<float>();

      {  // NormMatmulSiluMul
        SCOPED_TRACE("NormMatmulSiluMul");
        DeviceBuffer dw = folded(ws, NS);
        DeviceBuffer gu = Put(*cuda_, std::vector<float>(M * NS, kSentinel), DType::kBF16);
        DeviceBuffer act = Put(*cuda_, std::vector<float>(M * I, kSentinel), DType::kBF16);
        ASSERT_OK(cuda_->NormMatmulSiluMul(in, {dw.data(), DType::kBF16, NS, K}, {gu.data(), DType::kBF16, M, NS},
                                           {act.data(), DType::kBF16, M, I}));
        EXPECT_EQ(Get(*cuda_, gu, DType::kBF16), std::vector<float>(M * NS, kSentinel)) << "gate_up written: unfused";
        EXPECT_EQ(Get(*cuda_, scratch, DType::kBF16), std::vector<float>(M * K, kSentinel)) << "a norm op ran";
        const std::vector<float> got = Get(*cuda_, act, DType::kBF16);
        const std::vector<float> y = cpu_proj(normed, ws, NS), mag = cpu_proj(abs_of(normed), abs_of(ws), NS);
        auto act_of = [&](const std::vector<float>& yy) {
          std::vector<float> a(M * I);
          for (int64_t t = 0; t < M; ++t) {
            for (int64_t j = 0; j < I; ++j) a[t * I + j] = static_cast<float>(Silu(yy[t * NS + j]) * yy[t * NS + I + j]);
          }
          return a;
        };
        const std::vector<float> want = act_of(y);
        std::vector<double> lim(M * I);
        double err2 = 0, want2 = 0;
        int bad = 0;
        for (int64_t t = 0; t < M; ++t) {
          for (int64_t j = 0; j < I; ++j) {
            const int64_t gi = t * NS + j, ui = gi + I;
            const double tg = std::ldexp(mag[gi] + std::abs(y[gi]), -8), tu = std::ldexp(mag[ui] + std::abs(y[ui]), -8);
            const double sg = Silu(y[gi]);
            lim[t * I + j] = (1 + std::ldexp(1.0, -7)) * (1.1 * tg * (std::abs(y[ui]) + tu) + std::abs(sg) * tu +
                                                          std::ldexp(std::abs(sg * y[ui]), -8));
            const double e = got[t * I + j] - static_cast<double>(want[t * I + j]);
            err2 += e * e;
            want2 += static_cast<double>(want[t * I + j]) * want[t * I + j];
            if (!(std::abs(e) <= lim[t * I + j]) && ++bad <= 5) {
              ADD_FAILURE() << "act[" << t << "," << j << "]: cuda " << got[t * I + j] << ", cpu " << want[t * I + j]
                            << " (limit " << lim[t * I + j] << ")";
            }
          }
        }
        EXPECT_EQ(bad, 0);
        EXPECT_LE(std::sqrt(err2 / want2), 1.0 / 64);
        // What the bounds reject: the projection without 1 / rms, and without the weight g.
        auto outside = [&](const std::vector<float>& wrong) {
          int64_t n = 0;
          for (size_t i = 0; i < wrong.size(); ++i) n += !(std::abs(wrong[i] - static_cast<double>(want[i])) <= lim[i]);
          return n;
        };
        std::vector<float> unscaled = y;
        for (int64_t t = 0; t < M; ++t) {
          double ss = 0;
          for (int64_t k = 0; k < K; ++k) ss += static_cast<double>(x[t * K + k]) * x[t * K + k];
          const double rms = std::sqrt(ss / K + kEps);
          for (int64_t j = 0; j < NS; ++j) unscaled[t * NS + j] = static_cast<float>(y[t * NS + j] * rms);
        }
        std::vector<float> unweighted_in(M * K);
        for (int64_t i = 0; i < M * K; ++i) unweighted_in[i] = normed[i] / g[i % K];
        EXPECT_GE(10 * outside(act_of(unscaled)), M * I) << "the bounds would pass a missing 1 / rms";
        EXPECT_GE(10 * outside(act_of(cpu_proj(unweighted_in, ws, NS))), M * I) << "the bounds would pass no weight";
      }

      {  // NormMatmulRopeKvWrite
        SCOPED_TRACE("NormMatmulRopeKvWrite");
        DeviceBuffer dw = folded(wq, NQ);
        std::vector<int32_t> pos(M), slots(M);
        for (int64_t t = 0; t < M; ++t) {
          pos[t] = static_cast<int32_t>(rng_() % 9000);
          slots[t] = static_cast<int32_t>(M - 1 - t);
        }
        const std::vector<float> freq = InvFreq(hd, 10000.0);
        auto run = [&](Backend& be, DType d, const Tensor2D* w_cpu) {
          DeviceBuffer out = Put(be, std::vector<float>(M * NQ, kSentinel), d);
          DeviceBuffer kc = Put(be, std::vector<float>(M * kw, kSentinel), d), vc = Put(be, std::vector<float>(M * kw, kSentinel), d);
          DeviceBuffer dp = parity::PutRaw(be, pos), ds = parity::PutRaw(be, slots), df = parity::PutRaw(be, freq);
          const Tensor2D ov{out.data(), d, M, NQ};
          const RopeKvWriteParams p{ov.ColSlice(0, heads * hd), ov.ColSlice(heads * hd, kw), ov.ColSlice(heads * hd + kw, kw),
                                    KvLayer{kc.data(), vc.data(), kw, kw, d}, heads, kv_heads, hd,
                                    dp.as<int32_t>(), df.as<float>(), ds.as<int32_t>()};
          if (w_cpu == nullptr) {
            CHECK_OK(cuda_->NormMatmulRopeKvWrite(in, {dw.data(), DType::kBF16, NQ, K}, ov, p));
          } else {
            DeviceBuffer dn = Put(be, normed, DType::kF32);
            CHECK_OK(be.MatmulRopeKvWrite({dn.data(), DType::kF32, M, K}, *w_cpu, ov, p));
          }
          return std::vector<std::vector<float>>{Get(be, out, d), Get(be, kc, d), Get(be, vc, d)};
        };
        const auto got = run(*cuda_, DType::kBF16, nullptr);
        EXPECT_EQ(Get(*cuda_, scratch, DType::kBF16), std::vector<float>(M * K, kSentinel)) << "a norm op ran";
        DeviceBuffer cw = Put(*cpu_, wq, DType::kF32);
        const Tensor2D cwv{cw.data(), DType::kF32, NQ, K};
        const auto want = run(*cpu_, DType::kF32, &cwv);
        const std::vector<float> y = cpu_proj(normed, wq, NQ), mag = cpu_proj(abs_of(normed), abs_of(wq), NQ);
        auto limit = [&](int64_t t, int64_t col) {
          const int64_t in_head = col % hd, partner = col - in_head + (in_head + hd / 2) % hd;
          return std::ldexp(std::abs(y[t * NQ + col]) + std::abs(y[t * NQ + partner]) + mag[t * NQ + col] +
                                mag[t * NQ + partner], -7);
        };
        int bad = 0;
        for (int64_t t = 0; t < M; ++t) {
          for (int64_t c = 0; c < NQ; ++c) {
            const double e = std::abs(got[0][t * NQ + c] - static_cast<double>(want[0][t * NQ + c]));
            if (!(e <= limit(t, c)) && ++bad <= 5) {
              ADD_FAILURE() << "out[" << t << "," << c << "]: cuda " << got[0][t * NQ + c] << ", cpu " << want[0][t * NQ + c];
            }
          }
          for (int side = 1; side <= 2; ++side) {  // the cache rows: slot M - 1 - t, out's k / v columns
            const int64_t slot = M - 1 - t;
            for (int64_t c = 0; c < kw; ++c) {
              EXPECT_EQ(got[side][slot * kw + c], got[0][t * NQ + heads * hd + (side - 1) * kw + c]) << "cache row";
            }
          }
        }
        EXPECT_EQ(bad, 0);
      }
    }
  }
}
#endif

// The base class (the CPU backend) refuses an acc and a scratch of different
// shapes or dtypes, naming both, and writes nothing.
TEST(MatmulAddOperandsTest, BaseClassRefusesMismatchedScratch) {
  auto cpu = CreateBackend(BackendOptions{BackendKind::kCpu});
  ASSERT_OK(cpu);
  Backend &be = **cpu;
  std::vector<float> x(2 * 8, 1.f), w(4 * 8, 1.f), acc(2 * 4, 3.f), scratch(2 * 5, 0.f);
  const Tensor2D xv{x.data(), DType::kF32, 2, 8}, wv{w.data(), DType::kF32, 4, 8}, av{acc.data(), DType::kF32, 2, 4};
  const absl::Status s = be.MatmulAdd(xv, wv, av, Tensor2D{scratch.data(), DType::kF32, 2, 5});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_NE(s.message().find("scratch [2, 5]"), std::string_view::npos) << s;
  EXPECT_EQ(acc, std::vector<float>(2 * 4, 3.f));
  ASSERT_OK(be.MatmulAdd(xv, wv, av, Tensor2D{scratch.data(), DType::kF32, 2, 4}));
  EXPECT_EQ(acc, std::vector<float>(2 * 4, 11.f));  // 3 + 8 ones
}

}  // namespace
}  // namespace backend_test
}  // namespace lorc
