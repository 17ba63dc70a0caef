// The residual add fused into the decode GEMV (kernels::LaunchGemvAddBf16,
// Backend::MatmulAdd): acc += bf16(x * w^T) must be, bit for bit, the GEMV with
// the same configuration into a scratch buffer then AddInPlace, for every
// configuration (cluster splits 1-4, k_steps 4 and 8), every M of both token
// tiles, N = 37 (a partial 16-row tile), K with and without a masked tail, acc
// a strided view (columns outside it untouched). Backend::MatmulAdd (fused
// where Matmul chose a GEMV configuration for the operands, else the two ops)
// gives the bits of Matmul then AddInPlace on its first call (which makes the
// choice) and after; the base class refuses acc and scratch of different
// shapes. An exact comparison needs no tolerance: the GEMV's own parity with
// the CPU is cuda_gemv_test.cc's. Skipped without a CUDA device (except the
// refusal).
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
        const absl::Status s = cuda_internal::RunGemvAdd(xv, wv, view(fused), config, stream);
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
