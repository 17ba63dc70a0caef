// Shared by the backend op tests (cpu_backend_test.cc: the original ops; backend_v2_ops_test.cc:
// the Backend v2 ops): the backend-parameterised fixture, tolerances and reference helpers.
// Test-only header; each test binary includes it from one file.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <ios>
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
#include "backend/backend.h"
#include "backend/cuda_backend.h"

namespace lorc {

// Readable parameter names in gtest output ("Cpu" instead of a byte dump).
inline void PrintTo(BackendKind k, std::ostream* os) { *os << (k == BackendKind::kCpu ? "Cpu" : "Cuda"); }

namespace backend_test {

constexpr double kTol = 1e-4;

// Compares element-wise with the tolerance above; reports the first few mismatches.
inline void ExpectClose(const std::vector<float>& got, const std::vector<double>& want,
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

// An op on a column slice of a row-major [rows, ld] buffer: returns columns [c0, c0 + width) of
// every row of `after` (row by row, ready for ExpectClose) and expects every other element to be
// bit-equal to `before` (the buffer as uploaded: the op must leave it alone); reports the first
// few that are not.
inline std::vector<float> ColumnsOfSliceRestUnchanged(const std::vector<float>& after,
                                                      const std::vector<float>& before, int64_t rows,
                                                      int64_t ld, int64_t c0, int64_t width) {
  std::vector<float> got;
  const size_t n = static_cast<size_t>(rows * ld);
  if (after.size() < n || before.size() < n) {
    ADD_FAILURE() << "buffers of " << after.size() << " and " << before.size() << " elements, want " << n;
    return got;
  }
  got.reserve(static_cast<size_t>(rows * width));
  int bad = 0;
  for (int64_t t = 0; t < rows; ++t) {
    for (int64_t c = 0; c < ld; ++c) {
      const float a = after[t * ld + c], b = before[t * ld + c];
      if (c >= c0 && c < c0 + width) {
        got.push_back(a);
      } else if (std::memcmp(&a, &b, sizeof(float)) != 0 && ++bad <= 5) {
        ADD_FAILURE() << "row " << t << " col " << c << " outside the slice changed: " << std::hexfloat << b
                      << " -> " << a;
      }
    }
  }
  EXPECT_EQ(bad, 0) << "elements outside columns [" << c0 << ", " << c0 + width << ") changed";
  return got;
}

inline std::vector<float> RandomVec(std::mt19937& rng, size_t n, float lo = -1.0f, float hi = 1.0f) {
  std::uniform_real_distribution<float> d(lo, hi);
  std::vector<float> v(n);
  for (float& x : v) x = d(rng);
  return v;
}

inline std::string KindName(const ::testing::TestParamInfo<BackendKind>& i) {
  return i.param == BackendKind::kCpu ? "Cpu" : "Cuda";
}

class BackendOpsTest : public ::testing::TestWithParam<BackendKind> {
 protected:
  void SetUp() override {
    BackendOptions opts;
    opts.kind = GetParam();
    // CUDA: CreatePartialCudaBackend is now the same backend as CreateCudaBackend (every op has
    // its kernel); unsupported dtypes fail with Unimplemented naming the op.
    auto b = GetParam() == BackendKind::kCuda ? CreatePartialCudaBackend(opts) : CreateBackend(opts);
    if (!b.ok()) {
      // CUDA cases skip only for want of a device (or of CUDA in the build).
      if (GetParam() == BackendKind::kCuda) {
        auto devices = ListCudaDevices();
        if (!devices.ok() || devices->empty()) {
          GTEST_SKIP() << "no CUDA device (" << b.status() << ")";
        }
      }
      FAIL() << b.status();
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

inline std::vector<double> RefRmsNorm(const std::vector<float>& x, const std::vector<float>& w, int64_t T,
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


inline std::vector<float> InvFreq(int head_dim, double theta) {
  std::vector<float> f(head_dim / 2);
  for (int i = 0; i < head_dim / 2; ++i) {
    f[i] = static_cast<float>(1.0 / std::pow(theta, 2.0 * i / head_dim));
  }
  return f;
}

// Hugging Face apply_rotary_pos_emb: x * cos + rotate_half(x) * sin, rotate_half(x) =
// cat(-x2, x1), cos/sin = cat(freqs, freqs). The angle is the fp32 product position * inv_freq
// (as transformers computes it); cos and sin of that angle are taken in double.
inline std::vector<double> RefRope(const std::vector<float>& x, int64_t ld, int64_t c0, int64_t T,
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


}  // namespace backend_test
}  // namespace lorc
