// Op-by-op checks of a Backend against naive reference implementations written here (double
// accumulation, obviously correct loops). The CPU backend is the reference every CUDA kernel will
// be compared with, so these bodies are written against the Backend interface only and are
// parameterised by backend kind: all data goes through Allocate / CopyToDevice / CopyToHost, and
// every pointer handed to an op (ids, positions, slot mappings, block tables, ...) is device
// memory. The CUDA instantiation skips while CreateBackend({kCuda}) fails.
//
// Tolerance: an element passes when |got - want| <= kTol * max(1, scale) with kTol = 1e-4, where
// `scale` is |want| for elementwise ops and the magnitude of the summed terms (sum |x_k w_k|)
// for dot-product style ops (Matmul). Pure data movement (Embedding, GatherRows, WriteKv,
// CopyBlocks, RopeKvWrite's cache rows vs Rope's output) must be exact.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <ostream>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "common/check.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/status_matchers.h"
#include "worker/backend.h"
#include "worker/cuda_backend.h"

namespace lorc {

using ::lorc::testing::StatusIs;
using ::testing::AllOf;
using ::testing::HasSubstr;

// Readable parameter names in gtest output ("Cpu" instead of a byte dump).
void PrintTo(BackendKind k, std::ostream* os) { *os << (k == BackendKind::kCpu ? "Cpu" : "Cuda"); }

namespace {

constexpr double kTol = 1e-4;

// Compares element-wise with the tolerance above; reports the first few mismatches.
void ExpectClose(const std::vector<float>& got, const std::vector<double>& want,
                 const std::vector<double>& scale = {}) {
  ASSERT_EQ(got.size(), want.size());
  int bad = 0;
  double worst = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double s = scale.empty() ? std::abs(want[i]) : scale[i];
    const double err = std::abs(static_cast<double>(got[i]) - want[i]);
    const double lim = kTol * std::max(1.0, s);
    worst = std::max(worst, err / lim);
    if (!(err <= lim)) {  // NaN fails too
      if (++bad <= 5) {
        ADD_FAILURE() << "element " << i << ": got " << got[i] << ", want " << want[i]
                      << " (|err| " << err << " > " << lim << ")";
      }
    }
  }
  EXPECT_EQ(bad, 0) << "mismatches out of " << got.size() << "; worst err/limit " << worst;
}

std::vector<float> RandomVec(std::mt19937& rng, size_t n, float lo = -1.0f, float hi = 1.0f) {
  std::uniform_real_distribution<float> d(lo, hi);
  std::vector<float> v(n);
  for (float& x : v) x = d(rng);
  return v;
}

std::string KindName(const ::testing::TestParamInfo<BackendKind>& i) {
  return i.param == BackendKind::kCpu ? "Cpu" : "Cuda";
}

class BackendOpsTest : public ::testing::TestWithParam<BackendKind> {
 protected:
  void SetUp() override {
    BackendOptions opts;
    opts.kind = GetParam();
    auto b = CreateBackend(opts);
    if (!b.ok()) {
      if (GetParam() == BackendKind::kCpu) FAIL() << b.status();
      GTEST_SKIP() << "backend not available: " << b.status();
    }
    be_ = std::move(*b);
  }

  template <typename T>
  DeviceBuffer Upload(const std::vector<T>& host) {
    CHECK(!host.empty());
    auto buf = be_->Allocate(host.size() * sizeof(T));
    CHECK(buf.ok()) << buf.status();
    CHECK_OK(be_->CopyToDevice(buf->data(), host.data(), host.size() * sizeof(T)));
    return std::move(*buf);
  }

  template <typename T>
  std::vector<T> Download(const DeviceBuffer& buf, size_t n) {
    CHECK_OK(be_->Synchronize());
    std::vector<T> host(n);
    CHECK_LE(n * sizeof(T), buf.bytes());
    CHECK_OK(be_->CopyToHost(host.data(), buf.data(), n * sizeof(T)));
    return host;
  }

  static Tensor2D View(const DeviceBuffer& buf, int64_t rows, int64_t cols) {
    Tensor2D t;
    t.data = buf.data();
    t.dtype = DType::kF32;
    t.rows = rows;
    t.cols = cols;
    return t;
  }

  // One step of attention the way the model runner does it: plan, then both paths.
  absl::Status RunAttention(const AttentionParams& ap, const AttentionBatch& batch, int32_t max_blocks) {
    auto plan = be_->CreateAttentionPlan({batch.num_seqs, batch.num_tokens, max_blocks});
    if (!plan.ok()) return plan.status();
    if (absl::Status s = be_->PlanAttention(batch, **plan); !s.ok()) return s;
    if (absl::Status s = be_->DecodeAttention(ap, **plan); !s.ok()) return s;
    return be_->PrefillAttention(ap, **plan);
  }

  std::unique_ptr<Backend> be_;
  std::mt19937 rng_{20240611};
};

// --- Matmul -------------------------------------------------------------------------------------

// out[t, n] = sum_k x[t, k] * w[n, k]; also the per-element magnitude sum_k |x w|.
void RefMatmul(const std::vector<float>& x, int64_t x_ld, int64_t x_c0, const std::vector<float>& w,
               int64_t w_ld, int64_t w_c0, int64_t T, int64_t K, int64_t N,
               std::vector<double>* out, std::vector<double>* mag) {
  out->assign(T * N, 0.0);
  mag->assign(T * N, 0.0);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t n = 0; n < N; ++n) {
      double acc = 0, m = 0;
      for (int64_t k = 0; k < K; ++k) {
        const double p = static_cast<double>(x[t * x_ld + x_c0 + k]) * w[n * w_ld + w_c0 + k];
        acc += p;
        m += std::abs(p);
      }
      (*out)[t * N + n] = acc;
      (*mag)[t * N + n] = m;
    }
  }
}

TEST_P(BackendOpsTest, MatmulContiguous) {
  for (int64_t T : {1, 7}) {
    SCOPED_TRACE(T);
    const int64_t K = 37, N = 23;
    const std::vector<float> x = RandomVec(rng_, T * K), w = RandomVec(rng_, N * K);
    DeviceBuffer dx = Upload(x), dw = Upload(w), dout = Upload(std::vector<float>(T * N, 0.f));
    ASSERT_OK(be_->Matmul(View(dx, T, K), View(dw, N, K), View(dout, T, N)));
    std::vector<double> want, mag;
    RefMatmul(x, K, 0, w, K, 0, T, K, N, &want, &mag);
    ExpectClose(Download<float>(dout, T * N), want, mag);
  }
}

TEST_P(BackendOpsTest, MatmulStridedViews) {
  // x: columns [5, 5 + K) of a [T, 50] buffer; w: rows [2, 2 + N), columns [3, 3 + K) of a
  // [31, 41] buffer; out: columns [4, 4 + N) of a [T, 30] buffer whose other columns must stay.
  const int64_t T = 9, K = 37, N = 23;
  const int64_t x_ld = 50, w_ld = 41, o_ld = 30;
  const std::vector<float> x = RandomVec(rng_, T * x_ld), w = RandomVec(rng_, 31 * w_ld);
  const float sentinel = 1234.5f;
  DeviceBuffer dx = Upload(x), dw = Upload(w), dout = Upload(std::vector<float>(T * o_ld, sentinel));
  const Tensor2D xv = View(dx, T, x_ld).ColSlice(5, K);
  const Tensor2D wv = View(dw, 31, w_ld).RowSlice(2, N).ColSlice(3, K);
  const Tensor2D ov = View(dout, T, o_ld).ColSlice(4, N);
  ASSERT_EQ(xv.stride(), x_ld);
  ASSERT_EQ(wv.stride(), w_ld);
  ASSERT_OK(be_->Matmul(xv, wv, ov));

  std::vector<float> w_shift(w.begin() + 2 * w_ld, w.end());
  std::vector<double> want, mag;
  RefMatmul(x, x_ld, 5, w_shift, w_ld, 3, T, K, N, &want, &mag);
  const std::vector<float> out = Download<float>(dout, T * o_ld);
  std::vector<float> got;
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t c = 0; c < o_ld; ++c) {
      if (c >= 4 && c < 4 + N) {
        got.push_back(out[t * o_ld + c]);
      } else {
        EXPECT_EQ(out[t * o_ld + c], sentinel) << "row " << t << " col " << c << " overwritten";
      }
    }
  }
  ExpectClose(got, want, mag);
}

TEST_P(BackendOpsTest, MatmulRejectsShapeMismatch) {
  DeviceBuffer a = Upload(std::vector<float>(3 * 5, 1.f)), b = Upload(std::vector<float>(4 * 6, 1.f)),
               c = Upload(std::vector<float>(3 * 4, 0.f));
  EXPECT_FALSE(be_->Matmul(View(a, 3, 5), View(b, 4, 6), View(c, 3, 4)).ok());
  EXPECT_FALSE(be_->Matmul(View(a, 3, 5), View(b, 4, 5), View(c, 3, 3)).ok());
}

// --- RmsNorm ------------------------------------------------------------------------------------

std::vector<double> RefRmsNorm(const std::vector<float>& x, const std::vector<float>& w, int64_t T,
                               int64_t H, double eps) {
  std::vector<double> out(T * H);
  for (int64_t t = 0; t < T; ++t) {
    double ss = 0;
    for (int64_t j = 0; j < H; ++j) ss += static_cast<double>(x[t * H + j]) * x[t * H + j];
    const double inv = 1.0 / std::sqrt(ss / H + eps);
    for (int64_t j = 0; j < H; ++j) out[t * H + j] = w[j] * (x[t * H + j] * inv);
  }
  return out;
}

TEST_P(BackendOpsTest, RmsNorm) {
  const int64_t T = 5, H = 45;
  const float eps = 1e-5f;
  std::vector<float> x = RandomVec(rng_, T * H);
  // Rows of very different magnitude (the norm must be per row), one nearly zero (eps matters).
  const float row_scale[T] = {1.0f, 100.0f, 0.01f, 3.0f, 1e-4f};
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < H; ++j) x[t * H + j] *= row_scale[t];
  const std::vector<float> w = RandomVec(rng_, H, 0.5f, 1.5f);
  const std::vector<double> want = RefRmsNorm(x, w, T, H, eps);

  DeviceBuffer dx = Upload(x), dw = Upload(w), dout = Upload(std::vector<float>(T * H, 0.f));
  ASSERT_OK(be_->RmsNorm(View(dx, T, H), View(dw, 1, H), eps, View(dout, T, H)));
  ExpectClose(Download<float>(dout, T * H), want);
  EXPECT_EQ(Download<float>(dx, T * H), x) << "input modified";

  // In place (out aliases x).
  ASSERT_OK(be_->RmsNorm(View(dx, T, H), View(dw, 1, H), eps, View(dx, T, H)));
  ExpectClose(Download<float>(dx, T * H), want);
}

// --- SiluMul ------------------------------------------------------------------------------------

TEST_P(BackendOpsTest, SiluMul) {
  const int64_t T = 6, I = 19;
  std::vector<float> gu = RandomVec(rng_, T * 2 * I, -6.0f, 6.0f);
  // Saturated gates: silu(-100) ~ 0 (no NaN from exp overflow), silu(100) ~ 100.
  gu[0] = -100.0f;
  gu[1] = 100.0f;
  gu[2] = 0.0f;
  gu[2 * I + 5] = -30.0f;
  std::vector<double> want(T * I);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t j = 0; j < I; ++j) {
      const double g = gu[t * 2 * I + j], u = gu[t * 2 * I + I + j];
      want[t * I + j] = g / (1.0 + std::exp(-g)) * u;
    }
  }
  DeviceBuffer dgu = Upload(gu), dout = Upload(std::vector<float>(T * I, 0.f));
  ASSERT_OK(be_->SiluMul(View(dgu, T, 2 * I), View(dout, T, I)));
  ExpectClose(Download<float>(dout, T * I), want);
}

// --- AddInPlace ---------------------------------------------------------------------------------

TEST_P(BackendOpsTest, AddInPlace) {
  const int64_t T = 7, C = 29;
  const std::vector<float> a = RandomVec(rng_, T * C, -10.f, 10.f), b = RandomVec(rng_, T * C);
  std::vector<double> want(T * C);
  for (size_t i = 0; i < want.size(); ++i) want[i] = static_cast<double>(a[i]) + b[i];
  DeviceBuffer da = Upload(a), db = Upload(b);
  ASSERT_OK(be_->AddInPlace(View(da, T, C), View(db, T, C)));
  ExpectClose(Download<float>(da, T * C), want);
  EXPECT_EQ(Download<float>(db, T * C), b);
}

TEST_P(BackendOpsTest, AddInPlaceStrided) {
  // acc: columns [2, 2 + C) of a [T, 40] buffer; x: columns [7, 7 + C) of a [T, 37] buffer.
  const int64_t T = 5, C = 13, a_ld = 40, x_ld = 37;
  const std::vector<float> a = RandomVec(rng_, T * a_ld), x = RandomVec(rng_, T * x_ld);
  DeviceBuffer da = Upload(a), dx = Upload(x);
  ASSERT_OK(be_->AddInPlace(View(da, T, a_ld).ColSlice(2, C), View(dx, T, x_ld).ColSlice(7, C)));
  const std::vector<float> got_all = Download<float>(da, T * a_ld);
  std::vector<float> got;
  std::vector<double> want;
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t c = 0; c < a_ld; ++c) {
      if (c >= 2 && c < 2 + C) {
        got.push_back(got_all[t * a_ld + c]);
        want.push_back(static_cast<double>(a[t * a_ld + c]) + x[t * x_ld + 7 + (c - 2)]);
      } else {
        EXPECT_EQ(got_all[t * a_ld + c], a[t * a_ld + c]) << "row " << t << " col " << c;
      }
    }
  }
  ExpectClose(got, want);
}

// --- Embedding / GatherRows ---------------------------------------------------------------------

TEST_P(BackendOpsTest, Embedding) {
  const int64_t V = 29, H = 13;
  const std::vector<float> table = RandomVec(rng_, V * H);
  const std::vector<int32_t> ids = {5, 0, 28, 5, 17, 3, 28, 11, 1};
  const int64_t T = static_cast<int64_t>(ids.size());
  DeviceBuffer dt = Upload(table), di = Upload(ids), dout = Upload(std::vector<float>(T * H, 0.f));
  ASSERT_OK(be_->Embedding(View(dt, V, H), di.as<int32_t>(), View(dout, T, H)));
  const std::vector<float> out = Download<float>(dout, T * H);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < H; ++j)
      ASSERT_EQ(out[t * H + j], table[ids[t] * H + j]) << "token " << t << " col " << j;
}

TEST_P(BackendOpsTest, GatherRows) {
  // x is a strided view (columns [3, 3 + C) of an [R, 21] buffer); out is contiguous.
  const int64_t R = 11, ld = 21, C = 17;
  const std::vector<float> x = RandomVec(rng_, R * ld);
  const std::vector<int32_t> rows = {10, 0, 3, 3, 7};
  const int64_t n = static_cast<int64_t>(rows.size());
  DeviceBuffer dx = Upload(x), dr = Upload(rows), dout = Upload(std::vector<float>(n * C, 0.f));
  ASSERT_OK(be_->GatherRows(View(dx, R, ld).ColSlice(3, C), dr.as<int32_t>(), View(dout, n, C)));
  const std::vector<float> out = Download<float>(dout, n * C);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < C; ++j)
      ASSERT_EQ(out[i * C + j], x[rows[i] * ld + 3 + j]) << "row " << i << " col " << j;
}

// --- Rope ---------------------------------------------------------------------------------------

std::vector<float> InvFreq(int head_dim, double theta) {
  std::vector<float> f(head_dim / 2);
  for (int i = 0; i < head_dim / 2; ++i) {
    f[i] = static_cast<float>(1.0 / std::pow(theta, 2.0 * i / head_dim));
  }
  return f;
}

// Hugging Face apply_rotary_pos_emb: x * cos + rotate_half(x) * sin, rotate_half(x) =
// cat(-x2, x1), cos/sin = cat(freqs, freqs). The angle is the fp32 product position * inv_freq
// (as transformers computes it); cos and sin of that angle are taken in double.
std::vector<double> RefRope(const std::vector<float>& x, int64_t ld, int64_t c0, int64_t T,
                            int heads, int hd, const std::vector<int32_t>& pos,
                            const std::vector<float>& inv_freq) {
  const int half = hd / 2;
  std::vector<double> out(T * heads * hd);
  for (int64_t t = 0; t < T; ++t) {
    for (int h = 0; h < heads; ++h) {
      const float* v = &x[t * ld + c0 + h * hd];
      double* o = &out[(t * heads + h) * hd];
      for (int d = 0; d < hd; ++d) {
        const int i = d % half;
        const double angle = static_cast<float>(pos[t]) * inv_freq[i];  // fp32 product
        const double rot = d < half ? -static_cast<double>(v[d + half]) : v[d - half];
        o[d] = v[d] * std::cos(angle) + rot * std::sin(angle);
      }
    }
  }
  return out;
}

TEST_P(BackendOpsTest, RopeMatchesRotateHalfFormula) {
  // q heads of a fused [T, q + k + v] buffer, like the forward pass: x is a strided column view.
  const int heads = 3, hd = 14;
  const int64_t T = 6, width = heads * hd, ld = width + 2 * 2 * hd, c0 = 0;
  const std::vector<int32_t> pos = {0, 1, 2, 17, 300, 4095};
  const std::vector<float> inv_freq = InvFreq(hd, 10000.0);
  const std::vector<float> x = RandomVec(rng_, T * ld);
  DeviceBuffer dx = Upload(x), dpos = Upload(pos), dinv = Upload(inv_freq);
  RopeParams p;
  p.x = View(dx, T, ld).ColSlice(c0, width);
  p.num_heads = heads;
  p.head_dim = hd;
  p.positions = dpos.as<int32_t>();
  p.inv_freq = dinv.as<float>();
  ASSERT_OK(be_->Rope(p));

  const std::vector<double> want = RefRope(x, ld, c0, T, heads, hd, pos, inv_freq);
  const std::vector<float> all = Download<float>(dx, T * ld);
  std::vector<float> got;
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t c = 0; c < ld; ++c) {
      if (c >= c0 && c < c0 + width) {
        got.push_back(all[t * ld + c]);
      } else {
        EXPECT_EQ(all[t * ld + c], x[t * ld + c]) << "row " << t << " col " << c << " touched";
      }
    }
  }
  ExpectClose(got, want);

  for (int64_t t = 0; t < T; ++t) {
    for (int h = 0; h < heads; ++h) {
      for (int i = 0; i < hd / 2; ++i) {
        const int64_t a = t * ld + c0 + h * hd + i, b = a + hd / 2;
        if (pos[t] == 0) {
          // Position 0 is the identity.
          EXPECT_NEAR(all[a], x[a], 1e-6) << "t " << t << " h " << h << " i " << i;
          EXPECT_NEAR(all[b], x[b], 1e-6) << "t " << t << " h " << h << " i " << i;
        }
        // A rotation preserves the norm of each (i, i + half) pair.
        const double n0 = static_cast<double>(x[a]) * x[a] + static_cast<double>(x[b]) * x[b];
        const double n1 = static_cast<double>(all[a]) * all[a] + static_cast<double>(all[b]) * all[b];
        EXPECT_NEAR(n1, n0, kTol * std::max(1.0, n0)) << "t " << t << " h " << h << " i " << i;
      }
    }
  }
}

TEST_P(BackendOpsTest, RopeOnKeyHeadsOfFusedBuffer) {
  // The k part (columns [q, q + k)) with fewer heads and a different position set.
  const int q_heads = 6, kv_heads = 2, hd = 10;
  const int64_t T = 4, q = q_heads * hd, kw = kv_heads * hd, ld = q + 2 * kw;
  const std::vector<int32_t> pos = {13, 5, 6, 0};
  const std::vector<float> inv_freq = InvFreq(hd, 500000.0);
  const std::vector<float> x = RandomVec(rng_, T * ld);
  DeviceBuffer dx = Upload(x), dpos = Upload(pos), dinv = Upload(inv_freq);
  RopeParams p;
  p.x = View(dx, T, ld).ColSlice(q, kw);
  p.num_heads = kv_heads;
  p.head_dim = hd;
  p.positions = dpos.as<int32_t>();
  p.inv_freq = dinv.as<float>();
  ASSERT_OK(be_->Rope(p));
  const std::vector<double> want = RefRope(x, ld, q, T, kv_heads, hd, pos, inv_freq);
  const std::vector<float> all = Download<float>(dx, T * ld);
  std::vector<float> got;
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t c = 0; c < ld; ++c) {
      if (c >= q && c < q + kw) {
        got.push_back(all[t * ld + c]);
      } else {
        EXPECT_EQ(all[t * ld + c], x[t * ld + c]) << "row " << t << " col " << c << " touched";
      }
    }
  }
  ExpectClose(got, want);
}

// --- WriteKv / attention / CopyBlocks ----------------------------------------------------------

TEST_P(BackendOpsTest, WriteKvPlacesRowsAtFlatSlots) {
  // Different K and V widths (compressed-cache layout), strided sources.
  const int32_t bs = 4, num_blocks = 5;
  const int64_t kw = 7, vw = 3, T = 6, ld = kw + vw + 2;
  const std::vector<float> kv = RandomVec(rng_, T * ld);
  const std::vector<int32_t> slots = {17, 0, 3, 8, 19, 9};  // blocks 4, 0, 0, 2, 4, 2
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const size_t nslots = static_cast<size_t>(num_blocks) * bs;
  DeviceBuffer dkv = Upload(kv), dslots = Upload(slots);
  DeviceBuffer kc = Upload(std::vector<float>(nslots * kw, nan));
  DeviceBuffer vc = Upload(std::vector<float>(nslots * vw, nan));
  KvLayer cache{kc.data(), vc.data(), kw, vw, DType::kF32};
  const Tensor2D all = View(dkv, T, ld);
  ASSERT_OK(be_->WriteKv(cache, all.ColSlice(0, kw), all.ColSlice(kw, vw), dslots.as<int32_t>()));
  const std::vector<float> k = Download<float>(kc, nslots * kw), v = Download<float>(vc, nslots * vw);
  std::vector<int> row_of_slot(nslots, -1);
  for (int64_t t = 0; t < T; ++t) row_of_slot[slots[t]] = static_cast<int>(t);
  for (size_t s = 0; s < nslots; ++s) {
    const int t = row_of_slot[s];
    for (int64_t j = 0; j < kw; ++j) {
      if (t < 0) {
        EXPECT_TRUE(std::isnan(k[s * kw + j])) << "slot " << s << " written";
      } else {
        EXPECT_EQ(k[s * kw + j], kv[t * ld + j]) << "slot " << s << " col " << j;
      }
    }
    for (int64_t j = 0; j < vw; ++j) {
      if (t < 0) {
        EXPECT_TRUE(std::isnan(v[s * vw + j])) << "slot " << s << " written";
      } else {
        EXPECT_EQ(v[s * vw + j], kv[t * ld + kw + j]) << "slot " << s << " col " << j;
      }
    }
  }
}

TEST_P(BackendOpsTest, PagedAttentionMatchesDenseCausalAttention) {
  // Three sequences: (already cached, new this step) = (0, 7) prefill, (13, 1) decode,
  // (5, 9) chunked prefill on top of a cached prefix. GQA: 6 query heads over 2 KV heads.
  const int num_heads = 6, kv_heads = 2, hd = 10, group = num_heads / kv_heads;
  const int32_t bs = 4, num_blocks = 17, max_blocks = 5;  // one more table column than needed
  const int64_t qw = num_heads * hd, kw = kv_heads * hd, ld = qw + 2 * kw;
  struct SeqSpec {
    int cached, fresh;
  };
  const std::vector<SeqSpec> seqs = {{0, 7}, {13, 1}, {5, 9}};
  const int S = static_cast<int>(seqs.size());
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));

  // Shuffled, non-contiguous block ids; the unused ones stay NaN-filled (any read of a slot that
  // is not part of a sequence's context would poison the output).
  std::vector<int32_t> ids(num_blocks);
  std::iota(ids.begin(), ids.end(), 0);
  std::shuffle(ids.begin(), ids.end(), rng_);
  size_t next = 0;
  const int32_t pad_block = ids.back();  // never assigned: filler for unused table columns
  std::vector<int32_t> tables(S * max_blocks, pad_block);
  std::vector<std::vector<float>> K(S), V(S);  // dense per-sequence keys/values [ctx, kw]
  std::vector<int32_t> qstart = {0}, ctx_len;
  for (int s = 0; s < S; ++s) {
    const int ctx = seqs[s].cached + seqs[s].fresh;
    for (int b = 0; b < (ctx + bs - 1) / bs; ++b) tables[s * max_blocks + b] = ids[next++];
    K[s] = RandomVec(rng_, ctx * kw);
    V[s] = RandomVec(rng_, ctx * kw);
    qstart.push_back(qstart.back() + seqs[s].fresh);
    ctx_len.push_back(ctx);
  }
  ASSERT_LT(next, ids.size() - 1);  // the pad block stays unassigned
  const int T = qstart.back();
  auto slot_of = [&](int s, int pos) { return tables[s * max_blocks + pos / bs] * bs + pos % bs; };

  const float nan = std::numeric_limits<float>::quiet_NaN();
  const size_t nslots = static_cast<size_t>(num_blocks) * bs;
  DeviceBuffer kc = Upload(std::vector<float>(nslots * kw, nan));
  DeviceBuffer vc = Upload(std::vector<float>(nslots * kw, nan));
  KvLayer cache{kc.data(), vc.data(), kw, kw, DType::kF32};

  // Earlier steps: write the cached prefixes (contiguous k / v rows).
  for (int s = 0; s < S; ++s) {
    if (seqs[s].cached == 0) continue;
    const int n = seqs[s].cached;
    std::vector<int32_t> slots;
    for (int p = 0; p < n; ++p) slots.push_back(slot_of(s, p));
    DeviceBuffer dk = Upload(std::vector<float>(K[s].begin(), K[s].begin() + n * kw));
    DeviceBuffer dv = Upload(std::vector<float>(V[s].begin(), V[s].begin() + n * kw));
    DeviceBuffer ds = Upload(slots);
    ASSERT_OK(be_->WriteKv(cache, View(dk, n, kw), View(dv, n, kw), ds.as<int32_t>()));
  }

  // This step: a fused [T, q | k | v] buffer, as the forward pass produces it.
  std::vector<float> qkv(T * ld);
  std::vector<float> qhost = RandomVec(rng_, T * qw, -2.0f, 2.0f);  // peaky-ish softmax
  std::vector<int32_t> step_slots;
  for (int s = 0, row = 0; s < S; ++s) {
    for (int i = 0; i < seqs[s].fresh; ++i, ++row) {
      const int p = seqs[s].cached + i;
      std::copy_n(&qhost[row * qw], qw, &qkv[row * ld]);
      std::copy_n(&K[s][p * kw], kw, &qkv[row * ld + qw]);
      std::copy_n(&V[s][p * kw], kw, &qkv[row * ld + qw + kw]);
      step_slots.push_back(slot_of(s, p));
    }
  }
  DeviceBuffer dqkv = Upload(qkv), dslots = Upload(step_slots);
  const Tensor2D fused = View(dqkv, T, ld);
  ASSERT_OK(be_->WriteKv(cache, fused.ColSlice(qw, kw), fused.ColSlice(qw + kw, kw),
                         dslots.as<int32_t>()));

  DeviceBuffer dqs = Upload(qstart), dctx = Upload(ctx_len), dtab = Upload(tables);
  // Output written into a strided view too; the columns around it must stay.
  const int64_t o_ld = qw + 3;
  const float sentinel = -777.0f;
  DeviceBuffer dout = Upload(std::vector<float>(T * o_ld, sentinel));
  AttentionParams ap;
  ap.q = fused.ColSlice(0, qw);
  ap.out = View(dout, T, o_ld).ColSlice(1, qw);
  ap.cache = cache;
  AttentionBatch batch;
  batch.num_seqs = S;
  batch.num_tokens = T;
  batch.max_seq_len = *std::max_element(ctx_len.begin(), ctx_len.end());
  batch.query_start = dqs.as<int32_t>();
  batch.seq_lens = dctx.as<int32_t>();
  batch.block_tables = dtab.as<int32_t>();
  batch.max_blocks_per_seq = max_blocks;
  batch.block_size = bs;
  batch.host_query_start = qstart.data();
  batch.host_seq_lens = ctx_len.data();
  ap.num_heads = num_heads;
  ap.num_kv_heads = kv_heads;
  ap.head_dim = hd;
  ap.scale = scale;
  ASSERT_OK(RunAttention(ap, batch, max_blocks));

  // Dense reference straight from the un-paged K / V.
  std::vector<double> want(T * qw);
  for (int s = 0, row = 0; s < S; ++s) {
    for (int i = 0; i < seqs[s].fresh; ++i, ++row) {
      const int pos = seqs[s].cached + i;  // attends to keys [0, pos]
      for (int h = 0; h < num_heads; ++h) {
        const int g = h / group;
        std::vector<double> sc(pos + 1);
        double mx = -std::numeric_limits<double>::infinity();
        for (int j = 0; j <= pos; ++j) {
          double d = 0;
          for (int e = 0; e < hd; ++e) {
            d += static_cast<double>(qhost[row * qw + h * hd + e]) * K[s][j * kw + g * hd + e];
          }
          sc[j] = d * scale;
          mx = std::max(mx, sc[j]);
        }
        double z = 0;
        for (double& x : sc) z += x = std::exp(x - mx);
        for (int e = 0; e < hd; ++e) {
          double acc = 0;
          for (int j = 0; j <= pos; ++j) acc += sc[j] / z * V[s][j * kw + g * hd + e];
          want[row * qw + h * hd + e] = acc;
        }
      }
    }
  }
  const std::vector<float> out_all = Download<float>(dout, T * o_ld);
  std::vector<float> got;
  for (int t = 0; t < T; ++t) {
    for (int64_t c = 0; c < o_ld; ++c) {
      if (c >= 1 && c < 1 + qw) {
        got.push_back(out_all[t * o_ld + c]);
      } else {
        EXPECT_EQ(out_all[t * o_ld + c], sentinel) << "row " << t << " col " << c << " written";
      }
    }
  }
  ExpectClose(got, want);

  // The paged cache holds exactly the dense rows at the slots the block tables name.
  const std::vector<float> kh = Download<float>(kc, nslots * kw), vh = Download<float>(vc, nslots * kw);
  for (int s = 0; s < S; ++s) {
    for (int p = 0; p < ctx_len[s]; ++p) {
      const int64_t slot = slot_of(s, p);
      for (int64_t j = 0; j < kw; ++j) {
        ASSERT_EQ(kh[slot * kw + j], K[s][p * kw + j]) << "seq " << s << " pos " << p;
        ASSERT_EQ(vh[slot * kw + j], V[s][p * kw + j]) << "seq " << s << " pos " << p;
      }
    }
  }
}

TEST_P(BackendOpsTest, PagedAttentionSingleTokenContextIsTheValue) {
  // With one key the softmax is 1: the output is that token's value, for every head in the group.
  const int num_heads = 4, kv_heads = 2, hd = 6;
  const int32_t bs = 4;
  const int64_t qw = num_heads * hd, kw = kv_heads * hd;
  const std::vector<float> q = RandomVec(rng_, qw, -5.f, 5.f), k = RandomVec(rng_, kw),
                           v = RandomVec(rng_, kw);
  const std::vector<int32_t> slots = {2 * bs + 0}, qstart = {0, 1}, ctx = {1}, table = {2};
  DeviceBuffer kc = Upload(std::vector<float>(3 * bs * kw, 0.f));
  DeviceBuffer vc = Upload(std::vector<float>(3 * bs * kw, 0.f));
  KvLayer cache{kc.data(), vc.data(), kw, kw, DType::kF32};
  DeviceBuffer dq = Upload(q), dk = Upload(k), dv = Upload(v), ds = Upload(slots),
               dqs = Upload(qstart), dctx = Upload(ctx), dtab = Upload(table),
               dout = Upload(std::vector<float>(qw, 0.f));
  ASSERT_OK(be_->WriteKv(cache, View(dk, 1, kw), View(dv, 1, kw), ds.as<int32_t>()));
  AttentionParams ap;
  ap.q = View(dq, 1, qw);
  ap.out = View(dout, 1, qw);
  ap.cache = cache;
  const AttentionBatch batch{1, 1, 1, 1, bs, dqs.as<int32_t>(), dctx.as<int32_t>(),
                             dtab.as<int32_t>(), qstart.data(), ctx.data()};
  ap.num_heads = num_heads;
  ap.num_kv_heads = kv_heads;
  ap.head_dim = hd;
  ap.scale = 1.0f / std::sqrt(static_cast<float>(hd));
  ASSERT_OK(RunAttention(ap, batch, 1));
  std::vector<double> want(qw);
  for (int h = 0; h < num_heads; ++h)
    for (int e = 0; e < hd; ++e) want[h * hd + e] = v[(h / (num_heads / kv_heads)) * hd + e];
  ExpectClose(Download<float>(dout, qw), want);
}

TEST_P(BackendOpsTest, CopyBlocksCopiesWholeBlockOfKAndV) {
  const int32_t bs = 4, num_blocks = 6;
  const int64_t kw = 7, vw = 5;
  const size_t nslots = static_cast<size_t>(num_blocks) * bs;
  const std::vector<float> k = RandomVec(rng_, nslots * kw), v = RandomVec(rng_, nslots * vw);
  DeviceBuffer kc = Upload(k), vc = Upload(v);
  KvLayer cache{kc.data(), vc.data(), kw, vw, DType::kF32};
  const int32_t src = 4, dst = 1;
  const BlockCopy copy{src, dst};
  ASSERT_OK(be_->CopyBlocks({cache}, bs, num_blocks, {copy}));
  const std::vector<float> k2 = Download<float>(kc, nslots * kw), v2 = Download<float>(vc, nslots * vw);
  auto check = [&](const std::vector<float>& before, const std::vector<float>& after, int64_t w,
                   const char* what) {
    const size_t per_block = static_cast<size_t>(bs) * w;
    for (int32_t b = 0; b < num_blocks; ++b) {
      for (size_t i = 0; i < per_block; ++i) {
        const float want = b == dst ? before[src * per_block + i] : before[b * per_block + i];
        ASSERT_EQ(after[b * per_block + i], want) << what << " block " << b << " element " << i;
      }
    }
  };
  check(k, k2, kw, "K");
  check(v, v2, vw, "V");
}

// --- Backend v2: fused ops, plan limits, batched block copies, memory, stream hooks -----------

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
  RopeKvWriteParams p;
  const Tensor2D fused = View(dqkv, T, ld);
  p.q = fused.ColSlice(0, qw);
  p.k = fused.ColSlice(qw, kw);
  p.v = fused.ColSlice(qw + kw, kw);
  p.cache = KvLayer{kc.data(), vc.data(), kw, kw, DType::kF32};
  p.num_heads = heads;
  p.num_kv_heads = kv_heads;
  p.head_dim = hd;
  p.positions = dpos.as<int32_t>();
  p.inv_freq = dinv.as<float>();
  p.slot_mapping = dslots.as<int32_t>();
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
    if (!written[sl]) EXPECT_TRUE(std::isnan(k[sl * kw]) && std::isnan(v[sl * kw])) << "slot " << sl;
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
  auto be = CreateCudaBackendWithoutKernels(BackendOptions{BackendKind::kCuda});
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
  EXPECT_THAT(b.Matmul(Tensor2D{}, Tensor2D{}, Tensor2D{}),
              StatusIs(absl::StatusCode::kUnimplemented, HasSubstr("Matmul")));
}

INSTANTIATE_TEST_SUITE_P(Backends, BackendOpsTest,
                         ::testing::Values(BackendKind::kCpu, BackendKind::kCuda), KindName);

TEST(BackendFactoryTest, CpuBackendIsAvailable) {
  auto b = CreateBackend(BackendOptions{BackendKind::kCpu});
  ASSERT_OK(b);
  EXPECT_STREQ((*b)->name(), "cpu");
  EXPECT_FALSE((*b)->Describe().empty());
}

}  // namespace
}  // namespace lorc
