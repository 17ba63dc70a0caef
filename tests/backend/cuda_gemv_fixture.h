// The fixture of the small-M BF16 GEMV parity tests (cuda_gemv_test.cc, cuda_gemv_norm_test.cc):
// a CPU and a CUDA backend side by side (CpuCudaPair), the Matmul policy pinned to the GEMV
// (kGemvFirst unless a subclass sets policy_), the fused norm GEMVs on for every step size the
// kernel takes, and Expect(): one problem through the CUDA backend against the CPU Matmul within
// the tolerance stated in cuda_gemv_test.cc, the rest of the output buffer untouched.
#pragma once

#include <cmath>
#include <cstdint>
#include <random>
#include <tuple>
#include <vector>

#include "backend/cuda_gemv.h"
#ifdef LORC_HAVE_CUDA
#include "kernels/gemv.cuh"
#endif
#include "tests/backend/backend_ops_fixture.h"
#include "tests/backend/cuda_parity_fixture.h"

namespace lorc {
namespace backend_test {

// v rounded to bf16 (nearest even) and back.
inline float Bf16(float v) { return Bf16ToF32(F32ToBf16(v)); }


// One problem: x [M, K] at column x_off of rows of pitch K + pad, w [N, K] likewise, out [M, N] at
// column out_off of rows of pitch N + out_off + pad (pad, offsets in elements).
struct Case {
  int64_t M, N, K;
  int64_t x_off = 0, pad = 0, out_off = 0;
};

class CudaGemvTest : public CpuCudaPair<> {
 protected:
  // The fused norm GEMVs are on for every step size the kernel takes (off by default, cuda_gemv.h).
  void SetUp() override {
    SetCudaMatmulPolicy(policy_);
    saved_fused_norm_rows_ = GetCudaFusedNormRows();
    SetCudaFusedNormRows(kernels::kGemvNormMaxRows);
    CpuCudaPair<>::SetUp();
  }
  void TearDown() override {
    SetCudaMatmulPolicy(CudaMatmulPolicy::kAuto);
    SetCudaFusedNormRows(saved_fused_norm_rows_);
  }
  int64_t saved_fused_norm_rows_ = 0;

  // Runs `c` through `run(x, w, out)` on the CUDA backend (bf16 operands, `od` output) and the
  // CPU Matmul, and compares the whole output buffer: the view within tolerance, the rest
  // untouched.
  template <typename Run>
  void Expect(const Case& c, DType od, Run run) {
    SCOPED_TRACE(::testing::Message() << "M=" << c.M << " N=" << c.N << " K=" << c.K << " -> " << DTypeName(od)
                                      << (c.pad || c.x_off || c.out_off ? " strided" : ""));
    const int64_t x_ld = c.K + c.x_off + c.pad, w_ld = c.K + c.pad, o_ld = c.N + c.out_off + c.pad;
    std::vector<float> x = RandomVec(rng_, c.M * x_ld), w = RandomVec(rng_, c.N * w_ld);
    for (float& v : x) v = Bf16(v);
    for (float& v : w) v = Bf16(v);
    const float sentinel = 1024.f;
    auto views = [&](const DeviceBuffer& dx, const DeviceBuffer& dw, const DeviceBuffer& dout, DType in_t,
                     DType out_t) {
      return std::tuple<Tensor2D, Tensor2D, Tensor2D>{
          Tensor2D{dx.data(), in_t, c.M, x_ld}.ColSlice(c.x_off, c.K),
          Tensor2D{dw.data(), in_t, c.N, w_ld}.ColSlice(0, c.K),
          Tensor2D{dout.data(), out_t, c.M, o_ld}.ColSlice(c.out_off, c.N)};
    };
    auto cpu = [&](const std::vector<float>& xs, const std::vector<float>& ws) {
      DeviceBuffer dx = parity::Put(*cpu_, xs, DType::kF32), dw = parity::Put(*cpu_, ws, DType::kF32);
      DeviceBuffer dout = parity::Put(*cpu_, std::vector<float>(c.M * o_ld, sentinel), DType::kF32);
      auto [xv, wv, ov] = views(dx, dw, dout, DType::kF32, DType::kF32);
      CHECK_OK(cpu_->Matmul(xv, wv, ov));
      return parity::Get(*cpu_, dout, DType::kF32);
    };
    std::vector<float> ax = x, aw = w;
    for (float& v : ax) v = std::abs(v);
    for (float& v : aw) v = std::abs(v);
    const std::vector<float> want = cpu(x, w), mag = cpu(ax, aw);

    DeviceBuffer dx = parity::Put(*cuda_, x, DType::kBF16), dw = parity::Put(*cuda_, w, DType::kBF16);
    DeviceBuffer dout = parity::Put(*cuda_, std::vector<float>(c.M * o_ld, sentinel), od);
    auto [xv, wv, ov] = views(dx, dw, dout, DType::kBF16, od);
    ASSERT_OK(run(xv, wv, ov));
    const std::vector<float> got = parity::Get(*cuda_, dout, od);

    const double rel = od == DType::kF32 ? 1e-6 : 1.0 / 256;
    int bad = 0;
    for (int64_t t = 0; t < c.M; ++t) {
      for (int64_t j = 0; j < o_ld; ++j) {
        const size_t i = t * o_ld + j;
        if (j < c.out_off || j >= c.out_off + c.N) {
          if (got[i] != sentinel && ++bad <= 5) ADD_FAILURE() << "row " << t << " col " << j << " overwritten";
          continue;
        }
        const double err = std::abs(static_cast<double>(got[i]) - want[i]);
        const double lim = rel * std::abs(want[i]) + 1e-5 * mag[i];
        if (!(err <= lim) && ++bad <= 5) {
          ADD_FAILURE() << "out[" << t << "," << j - c.out_off << "]: cuda " << got[i] << ", cpu " << want[i]
                        << " (|err| " << err << " > " << lim << ")";
        }
      }
    }
    EXPECT_EQ(bad, 0);
  }

  CudaMatmulPolicy policy_ = CudaMatmulPolicy::kGemvFirst;
  std::mt19937 rng_{20261201};
};

}  // namespace backend_test
}  // namespace lorc
