// Parity of the small-M BF16 GEMV (kernels/gemv.cu, backend/cuda_gemv.cc) with the CPU backend's
// Matmul, the reference: every configuration the dispatcher may pick, M = 1..8, 11 and 16, odd N,
// K multiples of 8 that are not multiples of a warp chunk, strided views; Matmul under each
// policy, falling back to cuBLASLt where the GEMV does not apply; graph capture.
// Inputs are bf16 values; the CPU runs on exactly those values in fp32.
// Tolerance: |cuda - cpu| <= rel * |cpu| + 1e-5 * sum_k |x_k w_k|, rel = 2^-8 for a BF16 output
// (one rounding to nearest: at most 2^-8 relative, bf16 having 8 significant bits) and 1e-6 for
// F32. The second term covers fp32 accumulation in another order (tensor-core tiles, warp and
// cluster partial sums); one missing or repeated product (a layout, split or tail bug) is about
// 1 / K of the summed magnitudes, above it for every K tested (K <= 14336, 1 / K >= 7e-5).
// Skipped without a CUDA device.
#include <cmath>
#include <cstdlib>
#include <functional>
#include <string_view>
#include <tuple>
#include <utility>

#include "common/env_switch.h"
#include "tests/backend/cuda_gemv_fixture.h"

namespace lorc {
namespace backend_test {
namespace {

using parity::Get;
using parity::Put;

#ifdef LORC_HAVE_CUDA
// Every configuration (cluster splits 1-4, 4 or 8 k steps) on every M, odd N (a partial 16-row
// tile), K = 264 and 1032 (multiples of 8, not of a 128/256-wide warp chunk: masked tail loads),
// K = 8 (fewer chunks than warps and splits), a long K (14336, the down projection) and strided
// views. BF16 and F32 outputs.
TEST_F(CudaGemvTest, EveryConfigurationMatchesCpu) {
  const auto stream = static_cast<cudaStream_t>(cuda_->stream_handle());
  for (int config = 0; config < cuda_internal::GemvConfigCount(); ++config) {
    SCOPED_TRACE(cuda_internal::GemvConfigName(config));
    auto gemv = [&](const Tensor2D& x, const Tensor2D& w, const Tensor2D& out) {
      EXPECT_TRUE(cuda_internal::GemvApplies(x, w, out));
      return cuda_internal::RunGemv(x, w, out, config, stream);
    };
    for (const int64_t m : {1, 2, 3, 4, 5, 6, 7, 8, 11, 16}) {
      for (const DType od : {DType::kBF16, DType::kF32}) {
        Expect(Case{m, 37, 264}, od, gemv);
        Expect(Case{m, 130, 1032, 8, 16, 3}, od, gemv);
      }
    }
    Expect(Case{3, 21, 8}, DType::kBF16, gemv);
    Expect(Case{8, 48, 14336}, DType::kBF16, gemv);
    Expect(Case{16, 17, 4096, 0, 8, 1}, DType::kF32, gemv);
  }
}

// Where the GEMV does not apply, GemvApplies says so and Matmul (preferring the GEMV) falls back
// to cuBLASLt with correct results: K not a multiple of 8, an x view 2 bytes off 16-byte
// alignment, a row pitch that is not a multiple of 8 elements, M = 17.
TEST_F(CudaGemvTest, MatmulFallsBackToCublasLtWhereTheGemvDoesNotApply) {
  int checked = 0;
  auto matmul = [&](bool applies) {
    return [this, applies, &checked](const Tensor2D& x, const Tensor2D& w, const Tensor2D& out) {
      EXPECT_EQ(cuda_internal::GemvApplies(x, w, out), applies);
      ++checked;
      return cuda_->Matmul(x, w, out);
    };
  };
  for (const DType od : {DType::kBF16, DType::kF32}) {
    Expect(Case{4, 33, 100}, od, matmul(false));
    Expect(Case{4, 33, 96, 1}, od, matmul(false));  // x starts one element into its row
    Expect(Case{4, 33, 96, 0, 3}, od, matmul(false));
    Expect(Case{17, 33, 96}, od, matmul(false));
    Expect(Case{16, 33, 96}, od, matmul(true));
    Expect(Case{1, 4096, 4096}, od, matmul(true));
  }
  EXPECT_EQ(checked, 12);
}

// The fused QKV projection + RoPE + KV write (MatmulRopeKvWrite on a BF16 cache, decode-sized
// batches): (a) bit for bit what the GEMV's same configuration (unsplit, k_steps 4) followed by
// RopeKvWrite stores, out and both caches; (b) within tolerance of the CPU's Matmul then
// RopeKvWrite in fp32 (F32 cache): |cuda - cpu| <= 2^-7 * (|u_i| + |u_p|) + 1e-5 * (mag_i +
// mag_p), u the unrotated projection of the element and of its rotation partner, mag the same
// over |x| and |w| (two bf16 roundings of the rotated inputs and one of the result: at most
// 2^-9 each, relative to |u_i| + |u_p|; the accumulation term as above). Slots not in
// slot_mapping (and slot -1) stay untouched. Shapes: GQA 4/2 x 64, 8/2 x 128, MHA 2/2 x 128, one
// KV head (8/1 x 128: a Llama-3-70B rank at TP = 8), K with a masked tail (264) and 1024, M = 1..16;
// each but 32/8 x 128 (384 tiles: unsplit on GPUs of up to 384 SMs) has too few tiles to fill the
// SMs, so its K is split (kernels::GemvRopeSplits) and the unfused GEMV runs the same splits.
TEST_F(CudaGemvTest, FusedQkvRopeKvWriteMatchesUnfusedAndCpu) {
  struct Shape {
    int heads, kv_heads, hd;
  };
  const auto stream = static_cast<cudaStream_t>(cuda_->stream_handle());
  const float sentinel = 1024.f;
  for (const Shape sh : {Shape{4, 2, 64}, Shape{8, 2, 128}, Shape{2, 2, 128}, Shape{8, 1, 128}, Shape{32, 8, 128}}) {
    for (const int64_t K : {264, 1024}) {
      for (const int64_t M : {1, 2, 5, 8, 11, 16}) {
        SCOPED_TRACE(::testing::Message() << sh.heads << "/" << sh.kv_heads << "x" << sh.hd << " K=" << K << " M=" << M);
        const int64_t qw = int64_t{sh.heads} * sh.hd, kw = int64_t{sh.kv_heads} * sh.hd, N = qw + 2 * kw;
        const int64_t nslots = 2 * M + 3;
        std::vector<float> x = RandomVec(rng_, M * K), w = RandomVec(rng_, N * K);
        for (float& v : x) v = Bf16(v);
        for (float& v : w) v = Bf16(v);
        std::vector<int32_t> pos(M), slots(M);
        for (int64_t t = 0; t < M; ++t) {
          pos[t] = static_cast<int32_t>(rng_() % 9000);
          slots[t] = static_cast<int32_t>((2 * t + 1) % nslots);
        }
        if (M > 1) slots[1] = -1;  // a padding row: no write
        std::vector<float> inv_freq(sh.hd / 2);
        for (int i = 0; i < sh.hd / 2; ++i) {
          inv_freq[i] = static_cast<float>(1.0 / std::pow(10000.0, 2.0 * i / sh.hd));
        }
        const std::vector<float> out0(M * N, sentinel), cache0(nslots * kw, sentinel);

        // Runs on `be` with elements of dtype d; fused: MatmulRopeKvWrite, else `matmul` then RopeKvWrite.
        auto run = [&](Backend& be, DType d, const std::vector<float>& xs, const std::vector<float>& ws,
                       const std::function<absl::Status(const Tensor2D&, const Tensor2D&, const Tensor2D&)>& matmul) {
          DeviceBuffer dx = Put(be, xs, d), dw = Put(be, ws, d), dout = Put(be, out0, d);
          DeviceBuffer kc = Put(be, cache0, d), vc = Put(be, cache0, d);
          DeviceBuffer dp = parity::PutRaw(be, pos), ds = parity::PutRaw(be, slots), df = parity::PutRaw(be, inv_freq);
          const Tensor2D xv{dx.data(), d, M, K}, wv{dw.data(), d, N, K}, ov{dout.data(), d, M, N};
          RopeKvWriteParams p{ov.ColSlice(0, qw), ov.ColSlice(qw, kw), ov.ColSlice(qw + kw, kw),
                              KvLayer{kc.data(), vc.data(), kw, kw, d}, sh.heads, sh.kv_heads, sh.hd,
                              dp.as<int32_t>(), df.as<float>(), ds.as<int32_t>()};
          if (matmul) {
            CHECK_OK(matmul(xv, wv, ov));
            CHECK_OK(be.RopeKvWrite(p));
          } else {
            CHECK_OK(be.MatmulRopeKvWrite(xv, wv, ov, p));
          }
          return std::vector<std::vector<float>>{Get(be, dout, d), Get(be, kc, d), Get(be, vc, d)};
        };
        const auto fused = run(*cuda_, DType::kBF16, x, w, nullptr);
        // The backend's splits: LORC_GEMV_ROPE_SPLITS when set (A/B runs), else GemvRopeSplits.
        const int forced = static_cast<int>(EnvInt("LORC_GEMV_ROPE_SPLITS", 0, kernels::kGemvMaxSplits, 0));
        const int splits = forced > 0 ? forced : kernels::GemvRopeSplits(N);
        if (M == 1) std::printf("    %d/%d x %d: %d K split(s)\n", sh.heads, sh.kv_heads, sh.hd, splits);
        const auto unfused = run(*cuda_, DType::kBF16, x, w, [&](const Tensor2D& a, const Tensor2D& b, const Tensor2D& o) {
          const cudaError_t e = kernels::LaunchGemvBf16(a.rows, b.rows, a.cols, a.data, a.stride(), b.data, b.stride(),
                                                        kernels::ElemType::kBF16, o.data, o.stride(),
                                                        kernels::GemvConfig{splits, 4}, stream);
          return e == cudaSuccess ? absl::OkStatus() : absl::InternalError(cudaGetErrorString(e));
        });
        EXPECT_EQ(fused[0], unfused[0]) << "out";
        EXPECT_EQ(fused[1], unfused[1]) << "k cache";
        EXPECT_EQ(fused[2], unfused[2]) << "v cache";

        auto cpu_matmul = [&](const Tensor2D& a, const Tensor2D& b, const Tensor2D& o) { return cpu_->Matmul(a, b, o); };
        const auto want = run(*cpu_, DType::kF32, x, w, cpu_matmul);
        std::vector<float> ax = x, aw = w;
        for (float& v : ax) v = std::abs(v);
        for (float& v : aw) v = std::abs(v);
        // The unrotated projections and their magnitudes (the limits).
        const auto plain = [&] {
          DeviceBuffer dx = Put(*cpu_, x, DType::kF32), dw = Put(*cpu_, w, DType::kF32), o = Put(*cpu_, out0, DType::kF32);
          DeviceBuffer mx = Put(*cpu_, ax, DType::kF32), mw = Put(*cpu_, aw, DType::kF32), mo = Put(*cpu_, out0, DType::kF32);
          CHECK_OK(cpu_->Matmul({dx.data(), DType::kF32, M, K}, {dw.data(), DType::kF32, N, K}, {o.data(), DType::kF32, M, N}));
          CHECK_OK(cpu_->Matmul({mx.data(), DType::kF32, M, K}, {mw.data(), DType::kF32, N, K}, {mo.data(), DType::kF32, M, N}));
          return std::pair{Get(*cpu_, o, DType::kF32), Get(*cpu_, mo, DType::kF32)};
        }();
        const std::vector<float>&u = plain.first, &mag = plain.second;
        const int half = sh.hd / 2;
        auto limit = [&](int64_t t, int64_t col) {  // col in [0, N)
          const int64_t in_head = col % sh.hd, partner = col - in_head + (in_head + half) % sh.hd;
          return std::ldexp(std::abs(u[t * N + col]) + std::abs(u[t * N + partner]), -7) +
                 1e-5 * (mag[t * N + col] + mag[t * N + partner]);
        };
        int bad = 0;
        auto check = [&](float got, float cpu, double lim, const char* what, int64_t r, int64_t c) {
          if (!(std::abs(static_cast<double>(got) - cpu) <= lim) && ++bad <= 5) {
            ADD_FAILURE() << what << "[" << r << "," << c << "]: cuda " << got << ", cpu " << cpu << " (limit " << lim << ")";
          }
        };
        for (int64_t t = 0; t < M; ++t) {
          for (int64_t c = 0; c < N; ++c) check(fused[0][t * N + c], want[0][t * N + c], limit(t, c), "out", t, c);
        }
        for (int64_t slot = 0; slot < nslots; ++slot) {
          int64_t token = -1;
          for (int64_t t = 0; t < M; ++t) token = slots[t] == slot ? t : token;
          for (int side = 1; side <= 2; ++side) {
            for (int64_t c = 0; c < kw; ++c) {
              const float got = fused[side][slot * kw + c];
              if (token < 0) {
                if (got != sentinel && ++bad <= 5) ADD_FAILURE() << "slot " << slot << " written";
                continue;
              }
              check(got, want[side][slot * kw + c], limit(token, qw + (side - 1) * kw + c), side == 1 ? "k" : "v", slot, c);
            }
          }
        }
        EXPECT_EQ(bad, 0);
      }
    }
  }
}

#endif

// Decode shapes of an 8B layer through Matmul with the default policy (whichever path its timing
// picks) and with cuBLASLt pinned: both match the CPU.
class CudaGemvAutoTest : public CudaGemvTest {
 protected:
  CudaGemvAutoTest() { policy_ = CudaMatmulPolicy::kAuto; }
};
TEST_F(CudaGemvAutoTest, MatmulOnDecodeShapesMatchesCpu) {
  auto matmul = [this](const Tensor2D& x, const Tensor2D& w, const Tensor2D& out) {
    return cuda_->Matmul(x, w, out);
  };
  for (const int64_t m : {1, 3, 8, 16}) Expect(Case{m, 6144, 4096}, DType::kBF16, matmul);
  for (const int64_t m : {1, 16}) Expect(Case{m, 4096, 14336}, DType::kBF16, matmul);
  Expect(Case{2, 16384, 4096}, DType::kF32, matmul);  // an LM-head-like F32 output
}

// A GEMV seen first inside a capture (its first configuration, untimed) and one timed eagerly
// before it replay over refreshed inputs and match the CPU; the untimed one, called eagerly
// again, is timed and still matches.
TEST_F(CudaGemvTest, CapturesAndReplays) {
  Backend& be = *cuda_;
  const Case a{8, 640, 512}, b{3, 200, 1024};
  struct Operands {
    DeviceBuffer x, w, out;
    std::vector<float> wh;
  };
  auto alloc = [&](const Case& c) {
    std::vector<float> w = RandomVec(rng_, c.N * c.K);
    for (float& v : w) v = Bf16(v);
    return Operands{Put(be, std::vector<float>(c.M * c.K, 0.f), DType::kBF16), Put(be, w, DType::kBF16),
                    Put(be, std::vector<float>(c.M * c.N, 0.f), DType::kBF16), w};
  };
  Operands A = alloc(a), B = alloc(b);
  auto gemm = [&](const Case& c, const Operands& o) {
    return be.Matmul(Tensor2D{o.x.data(), DType::kBF16, c.M, c.K, 0}, Tensor2D{o.w.data(), DType::kBF16, c.N, c.K, 0},
                     Tensor2D{o.out.data(), DType::kBF16, c.M, c.N, 0});
  };
  auto expect = [&](const Case& c, const Operands& o, const std::vector<float>& x) {
    DeviceBuffer cx = Put(*cpu_, x, DType::kF32), cw = Put(*cpu_, o.wh, DType::kF32);
    DeviceBuffer co = Put(*cpu_, std::vector<float>(c.M * c.N, 0.f), DType::kF32);
    ASSERT_OK(cpu_->Matmul(Tensor2D{cx.data(), DType::kF32, c.M, c.K, 0}, Tensor2D{cw.data(), DType::kF32, c.N, c.K, 0},
                           Tensor2D{co.data(), DType::kF32, c.M, c.N, 0}));
    const std::vector<float> want = Get(*cpu_, co, DType::kF32), got = Get(be, o.out, DType::kBF16);
    for (size_t i = 0; i < want.size(); ++i) {
      ASSERT_NEAR(got[i], want[i], std::abs(want[i]) / 256 + 1e-5 * c.K) << "element " << i;  // |x|,|w| <= 1
    }
  };
  auto fresh_x = [&](const Case& c, Operands& o) {
    std::vector<float> x = RandomVec(rng_, c.M * c.K);
    for (float& v : x) v = Bf16(v);
    DeviceBuffer t = Put(be, x, DType::kBF16);
    CHECK_OK(be.CopyOnDevice(o.x.data(), t.data(), t.bytes()));
    CHECK_OK(be.Memset(o.out.data(), 0, o.out.bytes()));
    CHECK_OK(be.Synchronize());
    return x;
  };
  ASSERT_OK(gemm(a, A));
  ASSERT_OK(be.Synchronize());
  ASSERT_OK(be.BeginCapture());
  ASSERT_OK(gemm(a, A));
  ASSERT_OK(gemm(b, B));
  auto graph = be.EndCapture();
  ASSERT_OK(graph);
  for (int round = 0; round < 2; ++round) {
    SCOPED_TRACE(round);
    const std::vector<float> xa = fresh_x(a, A), xb = fresh_x(b, B);
    ASSERT_OK(be.ReplayGraph(**graph));
    ASSERT_OK(be.Synchronize());
    expect(a, A, xa);
    expect(b, B, xb);
  }
  const std::vector<float> xb = fresh_x(b, B);
  ASSERT_OK(gemm(b, B));
  expect(b, B, xb);
}

}  // namespace
}  // namespace backend_test
}  // namespace lorc
