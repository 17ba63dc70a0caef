// The small-M GEMV (kernels/gemv.cuh) as a second Matmul path of the CUDA backend, next to
// cuBLASLt (backend/cuda_matmul.cc): which shapes it takes, its timed configurations, and the
// process-wide policy that benchmarks and tests use to pin one path.
#pragma once

#include <cstdint>
#include <functional>
#include <string>

#ifdef LORC_HAVE_CUDA
#include <cuda_runtime.h>

#include "absl/status/statusor.h"
#include "backend/backend.h"
#endif

namespace lorc {

// Which kernels CudaBackend::Matmul picks from, per shape key (cuda_matmul.cc):
enum class CudaMatmulPolicy : uint8_t {
  kAuto,          // the fastest of cuBLASLt's candidates and the GEMV's configurations (timed)
  kCublasLtOnly,  // cuBLASLt only (the behaviour before the GEMV)
  kGemvFirst,     // the GEMV (its fastest configuration) wherever it applies, cuBLASLt elsewhere
};

// Sets the policy of the CUDA backends created after the call (default kAuto; serving never sets
// it). For benchmarks and tests; call it before creating backends, not concurrently with that.
void SetCudaMatmulPolicy(CudaMatmulPolicy policy);
CudaMatmulPolicy GetCudaMatmulPolicy();

// Steps of at most this many tokens run each residual add + RMSNorm inside the projection after
// it (CudaBackend::FusesNormMatmul, kernels/gemv.cuh LaunchGemvNorm; capped at
// kGemvNormMaxRows, 8). 0 turns it off. Off by default: measured on an H200 on 2026-12-05 it made
// the 8B decode step 1.8 ms slower at batch 1 and 2.7 ms at batch 8, with parity and the golden
// prompts holding (docs/PERFORMANCE.md "Batch-1 decode, 8B on one H200, 2026-12-05"). The kernel
// has since been changed (its residual store, which kept every next load behind it, moved after
// the loop; not yet measured). BackendOptions::fused_norm_rows >= 0
// overrides it per backend. LORC_FUSED_NORM_ROWS=N in the environment sets it at start-up (A/B runs);
// SetCudaFusedNormRows sets it for the CUDA backends created after the call (benchmarks, tests).
inline constexpr int64_t kDefaultFusedNormRows = 0;
void SetCudaFusedNormRows(int64_t rows);
int64_t GetCudaFusedNormRows();

// Folded norms (Backend::FoldedNormRows; the runner folds the RMSNorm weights into the qkv and
// gate_up projections at load, and decode steps of at most kGemvNormMaxRows tokens at one rank
// take the rms from the o / down GEMVs' partial sums of squares instead of running the norms).
// kDefaultFoldedNorms, or LORC_FOLDED_NORMS=0/1 in the environment at start-up (A/B runs);
// SetCudaFoldedNorms sets it for the CUDA backends created after the call (tests, benchmarks).
inline constexpr bool kDefaultFoldedNorms = false;
void SetCudaFoldedNorms(bool on);
bool GetCudaFoldedNorms();

}  // namespace lorc

#ifdef LORC_HAVE_CUDA
namespace lorc::cuda_internal {

// True when the GEMV can compute out = x * w^T (backend.h Matmul, shapes already checked): x and w
// BF16, out BF16 or F32, 1 <= T <= kernels::kGemvMaxRows, K a multiple of 8, x and w 16-byte
// aligned with 16-byte row pitches (kernels::GemvSupported).
bool GemvApplies(const Tensor2D& x, const Tensor2D& w, const Tensor2D& out);

// acc += bf16(x * w^T) with configuration `config` (kernels::LaunchGemvAddBf16; GemvApplies(x, w,
// out) for a BF16 out of acc's shape must hold): the bits of RunGemv into a scratch then AddInPlace.
// Errors as RunGemv's.
// sum_squares (or null): also the updated rows' partial sums of squares (kernels::LaunchGemvAddBf16).
absl::Status RunGemvAdd(const Tensor2D& x, const Tensor2D& w, const Tensor2D& acc, int config, float* sum_squares,
                        cudaStream_t stream);

// Number of GEMV configurations (kernels::GemvConfig: cluster splits x k steps); RunGemv's
// `config` is an index below it. Matmul times the first two (unsplit, k_steps 4 and 8).
int GemvConfigCount();
// "splits 2, k_steps 4" for config `config` (benchmarks print it).
std::string GemvConfigName(int config);

// Enqueues the GEMV with configuration `config` on `stream` (GemvApplies must hold). Internal
// naming the shapes when the launch fails (e.g. a cluster split on a device without clusters).
absl::Status RunGemv(const Tensor2D& x, const Tensor2D& w, const Tensor2D& out, int config,
                     cudaStream_t stream);

// A timed kernel replaces the current choice only when it is faster by more than kSwitchMargin:
// choices then follow real differences, not timing noise, so two processes (two runs, the eager
// and the graph path, two tensor-parallel ranks) pick the same kernels for a shape and round alike
// (on an H200, 2026-12-01, noise-level picks made the graph and eager runs part on a golden prompt).
constexpr float kSwitchMargin = 0.03f;
inline bool TimedFaster(float ms, float than_ms) { return ms < than_ms * (1.0f - kSwitchMargin); }

// Matmul's timer (cuda_matmul.cc): the summed milliseconds of its repetitions of `run` (which
// enqueues one run and returns false when it could not), each on a cold L2 cache; infinity when
// `run` refused.
using ColdTimer = std::function<absl::StatusOr<float>(const std::function<bool()>& run)>;

// The fastest of Matmul's candidate configurations (those without a cluster split; see
// cuda_gemv.cc) on the call's own operands: each one run once (warm-up), then timed by `time`.
// config -1 (ms infinite) when none launches; an Internal error only for a failing event.
struct GemvTiming {
  int config = -1;
  float ms = 0;  // as `time` returned it
};
absl::StatusOr<GemvTiming> TimeGemv(const Tensor2D& x, const Tensor2D& w, const Tensor2D& out,
                                    const ColdTimer& time, cudaStream_t stream);

}  // namespace lorc::cuda_internal
#endif
