// The small-M GEMV path of CudaBackend::Matmul (see cuda_gemv.h): applicability, configurations,
// launch and timing over kernels/gemv.cuh. The choice between it and cuBLASLt is cuda_matmul.cc's.
#include "backend/cuda_gemv.h"

#include <atomic>
#include <cstdlib>
#include <iterator>
#include <limits>

#include "common/env_switch.h"

namespace lorc {
namespace {
std::atomic<CudaMatmulPolicy> g_policy{CudaMatmulPolicy::kAuto};

// LORC_FUSED_NORM_ROWS=N (an integer in [0, 2^31 - 1]) at start-up, else kDefaultFusedNormRows.
int64_t FusedNormRowsFromEnv() {
  return EnvInt("LORC_FUSED_NORM_ROWS", 0, std::numeric_limits<int32_t>::max(), kDefaultFusedNormRows);
}
std::atomic<int64_t> g_fused_norm_rows{FusedNormRowsFromEnv()};

// LORC_FOLDED_NORMS=1 / 0 at start-up, else kDefaultFoldedNorms.
bool FoldedNormsFromEnv() { return EnvFlag("LORC_FOLDED_NORMS", kDefaultFoldedNorms); }
std::atomic<bool> g_folded_norms{FoldedNormsFromEnv()};
}  // namespace

void SetCudaMatmulPolicy(CudaMatmulPolicy policy) { g_policy.store(policy); }
CudaMatmulPolicy GetCudaMatmulPolicy() { return g_policy.load(); }
void SetCudaFusedNormRows(int64_t rows) { g_fused_norm_rows.store(rows < 0 ? 0 : rows); }
int64_t GetCudaFusedNormRows() { return g_fused_norm_rows.load(); }
void SetCudaFoldedNorms(bool on) { g_folded_norms.store(on); }
bool GetCudaFoldedNorms() { return g_folded_norms.load(); }

}  // namespace lorc

#ifdef LORC_HAVE_CUDA

#include "absl/strings/str_cat.h"
#include "backend/cuda_backend_impl.h"
#include "kernels/gemv.cuh"

namespace lorc::cuda_internal {
namespace {

// Cluster splits of K (few-row shapes fill the SMs with more CTAs) x loads in flight per thread.
constexpr kernels::GemvConfig kConfigs[] = {{1, 4}, {1, 8}, {2, 4}, {2, 8}, {3, 4}, {4, 4}};
// The first kTimedConfigs are Matmul's candidates. On an H200 (2026-12-01, `gemm_bench decode`,
// 9 shapes x M = 1, 2, 4, 8, cold weights) the fastest configuration was unsplit at every point
// (k_steps 4 or 8 by shape) and every split one slower (by 1.7 us or more). Matmul times them on
// the call's own operands after overwriting the L2 cache (cuda_matmul.cc TimeCold); fewer
// candidates still mean fewer misranked near-ties. The split ones stay for the parity tests and
// the benchmark.
constexpr int kTimedConfigs = 2;

}  // namespace

bool GemvApplies(const Tensor2D& x, const Tensor2D& w, const Tensor2D& out) {
  return x.dtype == DType::kBF16 && w.dtype == DType::kBF16 &&
         (out.dtype == DType::kBF16 || out.dtype == DType::kF32) &&
         kernels::GemvSupported(x.rows, x.cols, x.data, x.stride(), w.data, w.stride());
}

int GemvConfigCount() { return static_cast<int>(std::size(kConfigs)); }

std::string GemvConfigName(int config) {
  const kernels::GemvConfig& c = kConfigs[config];
  return absl::StrCat("splits ", c.splits, ", k_steps ", c.k_steps);
}

absl::Status RunGemv(const Tensor2D& x, const Tensor2D& w, const Tensor2D& out, int config,
                     cudaStream_t stream) {
  const cudaError_t e = kernels::LaunchGemvBf16(
      x.rows, w.rows, x.cols, x.data, x.stride(), w.data, w.stride(),
      out.dtype == DType::kF32 ? kernels::ElemType::kF32 : kernels::ElemType::kBF16, out.data, out.stride(),
      kConfigs[config], stream);
  if (e == cudaSuccess) return absl::OkStatus();
  cudaGetLastError();  // a refused launch is not sticky; do not leave it for the next check
  return absl::InternalError(absl::StrCat("cuda backend: Matmul (GEMV, ", GemvConfigName(config), ") x[",
                                          x.rows, ",", x.cols, "] w[", w.rows, ",", w.cols, "]: ",
                                          cudaGetErrorString(e)));
}

absl::Status RunGemvAdd(const Tensor2D& x, const Tensor2D& w, const Tensor2D& acc, int config, float* sum_squares,
                        cudaStream_t stream) {
  const cudaError_t e = kernels::LaunchGemvAddBf16(x.rows, w.rows, x.cols, x.data, x.stride(), w.data, w.stride(),
                                                   acc.data, acc.stride(), kConfigs[config], sum_squares, stream);
  if (e == cudaSuccess) return absl::OkStatus();
  cudaGetLastError();  // not sticky, as RunGemv
  return absl::InternalError(absl::StrCat("cuda backend: MatmulAdd (GEMV, ", GemvConfigName(config), ") x[", x.rows,
                                          ",", x.cols, "] w[", w.rows, ",", w.cols, "]: ", cudaGetErrorString(e)));
}

absl::StatusOr<GemvTiming> TimeGemv(const Tensor2D& x, const Tensor2D& w, const Tensor2D& out,
                                    const ColdTimer& time, cudaStream_t stream) {
  GemvTiming best{-1, std::numeric_limits<float>::infinity()};
  for (int c = 0; c < kTimedConfigs; ++c) {
    if (!RunGemv(x, w, out, c, stream).ok()) continue;  // warm-up; unavailable here (no clusters)
    ASSIGN_OR_RETURN(const float ms, time([&] { return RunGemv(x, w, out, c, stream).ok(); }));
    if (best.config < 0 || TimedFaster(ms, best.ms)) best = GemvTiming{c, ms};
  }
  return best;
}

}  // namespace lorc::cuda_internal
#endif
