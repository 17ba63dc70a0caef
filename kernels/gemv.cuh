// Small-M BF16 GEMM for decode (kernels/gemv.cu): out[M, N] = x[M, K] * w[N, K]^T with fp32
// accumulation, M <= kGemvMaxRows. Bandwidth-bound by design: every weight byte is read once, as
// 16-byte vectors streamed past L1, several per thread issued before any arithmetic.
// Framework-free: plain CUDA runtime types.
//
// Layout of the work: a CTA of 8 warps owns 16 rows of w (16 output columns); its warps take
// interleaved chunks of K (each chunk `k_steps` x 32 columns), multiply with tensor-core
// mma.m16n8k16 (bf16 in, fp32 accumulate; the k order inside an mma is permuted the same way in
// w and x so each thread feeds it from its own 16-byte loads), and sum their partials in shared
// memory. With `splits` > 1 the K range is also split over a thread-block cluster of `splits` CTAs
// (sm_90+) whose partials rank 0 adds through distributed shared memory: one launch, no
// workspace, no atomics, deterministic (capturable in CUDA graphs).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/elem_type.cuh"

namespace lorc::kernels {

// Largest token count M (rows of x and out) LaunchGemvBf16 takes.
inline constexpr int64_t kGemvMaxRows = 16;
// Largest token count M LaunchGemvNorm takes: one 8-token tile (its loads of a chunk's x, add and
// norm weight come before the math; with two tiles they spill past the 128 registers a thread
// has at two CTAs an SM).
inline constexpr int64_t kGemvNormMaxRows = 8;
// Largest cluster split of K (the portable cluster size).
inline constexpr int kGemvMaxSplits = 8;

// One launch configuration: `splits` CTAs of a cluster share a tile's K range (1..kGemvMaxSplits;
// > 1 needs sm_90), `k_steps` 32-wide k steps per warp chunk (4 or 8: 8 or 16 16-byte weight
// loads in flight per thread).
struct GemvConfig {
  int splits = 1;
  int k_steps = 4;
};

// True when LaunchGemvBf16 takes these operands: 1 <= m <= kGemvMaxRows, k a positive multiple
// of 8, x and w 16-byte aligned with row pitches (elements) multiples of 8. n and ldo are free.
bool GemvSupported(int64_t m, int64_t k, const void* x, int64_t ldx, const void* w, int64_t ldw);

// out[i, j] = sum_k x[i, k] * w[j, k] for i < m, j < n: x [m, k] BF16 (row pitch ldx elements),
// w [n, k] BF16 (pitch ldw), out [m, n] of `out_type` (F32 or BF16, pitch ldo >= n, rounded once
// from fp32). Only out's [m, n] view is written; out must not overlap x or w. n == 0 launches
// nothing. Launched with programmatic dependent launch (pdl.cuh): each warp loads its first chunk
// of w into registers before waiting for the previous kernel,
// so w must not be written by the kernel just before this one on the stream (weights never are);
// x is read after the wait. cudaErrorInvalidValue when !GemvSupported(...), n < 0, ldo < n, n or k >= 2^31, or
// `cfg` is out of range; a cluster split on a device without clusters fails at launch.
cudaError_t LaunchGemvBf16(int64_t m, int64_t n, int64_t k, const void* x, int64_t ldx, const void* w,
                           int64_t ldw, ElemType out_type, void* out, int64_t ldo, GemvConfig cfg,
                           cudaStream_t stream);

// acc[i, j] = bf16(acc[i, j] + bf16(sum_k x[i, k] * w[j, k])) for i < m, j < n: LaunchGemvBf16's
// BF16 output added into acc [m, n] BF16 (pitch ld_acc >= n) with AddInPlace's arithmetic (fp32
// sum, one rounding): the bits of LaunchGemvBf16 with the same `cfg` into a scratch buffer then
// LaunchAddInPlace, in one launch (the residual add after the o and down projections at decode).
// sum_squares (or null): also the partial sums of squares of the updated rows, fp32 [m,
// ceil(n / 16)] dense, as LaunchSumSquaresPartials writes them (rms_norm.cuh; the same bits):
// the next projection's 1 / rms (GemvNormArgs::sum_squares). Each output element is read and
// written by the one CTA that owns its row; acc must not overlap x, w or sum_squares. Same errors
// and programmatic dependent launch as LaunchGemvBf16 (acc and sum_squares are touched after the
// wait).
cudaError_t LaunchGemvAddBf16(int64_t m, int64_t n, int64_t k, const void* x, int64_t ldx, const void* w,
                              int64_t ldw, void* acc, int64_t ld_acc, GemvConfig cfg, float* sum_squares,
                              cudaStream_t stream);

// The decode QKV projection fused with RoPE and the KV write (the CUDA backend's
// MatmulRopeKvWrite): out [m, n] = x [m, k] * w [n, k]^T, n = (num_heads + 2 * num_kv_heads) *
// head_dim (q heads, then k heads, then v heads, each head_dim columns), every element rounded
// to bf16 once; then q and k heads rotated in place as kernels/rope.cu does (rotate_half pairs i
// and i + head_dim / 2, angle float(positions[t]) * inv_freq[i] in fp32, each value rounded once)
// and, for slot_mapping[t] >= 0, the rotated k row and the v row stored into the BF16 caches
// ([slots, num_kv_heads * head_dim]). Each CTA owns 8 dims of one head and their rotation
// partners, so the rotation needs no second kernel. k_steps 4; unsplit unless the tiles leave SMs
// idle (LaunchGemvRopeKvWrite's splits).
struct GemvRopeArgs {
  int32_t head_dim = 0;  // a multiple of 16
  int32_t num_heads = 0;
  int32_t num_kv_heads = 0;
  const int32_t* positions = nullptr;     // [m], device
  const float* inv_freq = nullptr;        // [head_dim / 2], device, fp32 (scaling applied)
  const int32_t* slot_mapping = nullptr;  // [m], device, flat slot or -1
  void* k_cache = nullptr;                // BF16 [slots, num_kv_heads * head_dim]
  void* v_cache = nullptr;                // BF16 [slots, num_kv_heads * head_dim]
};

// True when LaunchGemvRopeKvWrite takes these operands: GemvSupported, head_dim a positive
// multiple of 16, num_kv_heads > 0, n as above (< 2^31), every pointer of `rope` set.
bool GemvRopeSupported(int64_t m, int64_t n, int64_t k, const void* x, int64_t ldx, const void* w, int64_t ldw,
                       const GemvRopeArgs& rope);

// Launches it (programmatic dependent launch as LaunchGemvBf16: w is read before the wait; the
// metadata, x and the caches after it). out must not overlap x, w or the caches. `splits`: CTAs
// of a cluster sharing a tile's K range (1..kGemvMaxSplits, reduced through distributed shared
// memory as LaunchGemvBf16's splits; sm_90 and up), 0: GemvRopeSplits(n). cudaErrorInvalidValue
// unless GemvRopeSupported, ldo >= n and splits in [0, kGemvMaxSplits]; cudaErrorNotSupported for
// splits > 1 where GemvRopeSplits would not split (no clusters for this kernel on this device).
cudaError_t LaunchGemvRopeKvWrite(int64_t m, int64_t n, int64_t k, const void* x, int64_t ldx, const void* w,
                                  int64_t ldw, void* out, int64_t ldo, const GemvRopeArgs& rope,
                                  cudaStream_t stream, int splits = 0);

// The fused QKV GEMV's default splits on the current device for n output rows (n / 16 tiles):
// 1 when the tiles fill the SMs; below that as many as keep every CTA in one wave of two CTAs an
// SM (floor(2 x SMs / tiles), at most kGemvMaxSplits), e.g. 3 for one Llama-3-70B rank's qkv at
// TP = 8 (n = 1,280: 80 tiles) on 132 SMs, where the unsplit GEMV read its 21 MB at half the
// weight-read ceiling (13.5 us a layer against 6.7, one H100, docs/PERFORMANCE.md 2026-12-07).
// 1 on devices before sm_90 (no clusters), in a build whose kernel for this device came from an
// earlier architecture's PTX, or when the device cannot be queried (cached per device).
int GemvRopeSplits(int64_t n);

// The decode gate_up projection fused with SiLU-and-multiply (the CUDA backend's
// MatmulSiluMul): out [m, n / 2] BF16 (pitch ldo >= n / 2) = silu(gate) * up of the projection
// x [m, k] * w [n, k]^T = [gate | up] (w's rows [0, n/2) gate, [n/2, n) up), each of gate and up
// rounded to bf16 first, then kernels/elementwise.cu's SiluMul formula: the bits of
// LaunchGemvBf16 with GemvConfig{1, 4} (unsplit, k_steps 4) then LaunchSiluMul. Each CTA owns 8
// gate rows and the 8 up rows they pair with, so the product needs no second kernel and the
// [m, n] projection is never stored. Unsplit, k_steps 4.
// True when LaunchGemvSiluMul takes these operands: GemvSupported, n a positive multiple of 16
// below 2^31, ldo >= n / 2.
bool GemvSiluMulSupported(int64_t m, int64_t n, int64_t k, const void* x, int64_t ldx, const void* w, int64_t ldw,
                          int64_t ldo);
// Launches it (programmatic dependent launch as LaunchGemvBf16: w is read before the wait, x
// after it). out must not overlap x or w. cudaErrorInvalidValue unless GemvSiluMulSupported.
cudaError_t LaunchGemvSiluMul(int64_t m, int64_t n, int64_t k, const void* x, int64_t ldx, const void* w, int64_t ldw,
                              void* out, int64_t ldo, cudaStream_t stream);

// The decode projections fused with the RMSNorm before them (LaunchGemvNorm): the GEMV's input
// is RMSNorm(r) * weight with r = x + add (the residual stream after a sub-layer's output is
// added, rounded to bf16 once and stored into residual_out by the launch) or r = x (no add), as
// kernels/rms_norm.cu computes it, except that the 1 / rms scale multiplies the fp32 sums at the
// end instead of each input element before its bf16 rounding (the inputs are bf16(r_k * weight_k);
// out = sum_k w[j, k] bf16(r_k * weight_k) / rms, rms = sqrt(mean_k r_k^2 + eps), the squares
// summed in fp32 over the stored r). So out differs from RmsNorm then the GEMV by bf16 rounding
// order only; residual_out is bit for bit FusedAddRmsNorm's residual.
struct GemvNormArgs {
  const void* add = nullptr;     // BF16 [m, k], pitch ld_add elements; null: r = x
  int64_t ld_add = 0;
  void* residual_out = nullptr;  // BF16 [m, k], pitch ld_residual_out: r (required with add)
  int64_t ld_residual_out = 0;
  const void* weight = nullptr;  // BF16 [k], the RMSNorm weight; null: none (folded into w)
  float eps = 1e-6f;
  // The folded form (kRopeKvWrite / kSiluMul epilogues, no add): the input is x as given and each
  // row's 1 / rms = rsqrt(sum_p sum_squares[i, p] / k + eps) multiplies its fp32 sums, p < ceil(k /
  // 16) (fp32 [m, ceil(k / 16)] dense, LaunchGemvAddBf16's or LaunchSumSquaresPartials's); the
  // weight is not read (fold it into w: W' = W diag(weight)). No per-element work on x.
  const float* sum_squares = nullptr;
  float* sum_squares_out = nullptr;  // internal (LaunchGemvAddBf16's); leave null
};

// What a fused-norm launch writes after the GEMV:
// - kStore: out [m, n] BF16 (pitch ldo >= n), as LaunchGemvBf16;
// - kRopeKvWrite: LaunchGemvRopeKvWrite's out, rotation and cache rows (`rope` required);
// - kSiluMul: out [m, n / 2] BF16 (pitch ldo >= n / 2) = silu(gate) * up of the projection
//   [gate | up] (w's rows [0, n/2) gate, [n/2, n) up), each of gate and up rounded to bf16 first:
//   the bits of LaunchGemvBf16 then LaunchSiluMul (when the projection sums alike). n % 16 == 0.
enum class GemvEpilogue { kStore, kRopeKvWrite, kSiluMul };

// True when LaunchGemvNorm takes these operands: GemvSupported and m <= kGemvNormMaxRows; norm.weight null or 16-byte
// aligned; with add: add and residual_out 16-byte aligned, pitches >= k and multiples of 8; the
// epilogue's conditions above (kRopeKvWrite: GemvRopeSupported); n < 2^31; with sum_squares: no add
// and not kStore.
bool GemvNormSupported(int64_t m, int64_t n, int64_t k, const void* x, int64_t ldx, const void* w, int64_t ldw,
                       int64_t ldo, const GemvNormArgs& norm, GemvEpilogue epilogue, const GemvRopeArgs* rope);

// out = epilogue(RMSNorm(r) * norm.weight * w^T), r as above; unsplit, k_steps 4 (the fastest
// configuration of the 8B qkv and gate_up shapes at M = 1..8 on an H200, 2026-12-01). Launched with
// programmatic dependent launch as LaunchGemvBf16 (w before the wait; x, add, the metadata and
// the outputs after it). residual_out must not overlap x, add, w or out; out must not overlap
// x, add or w. cudaErrorInvalidValue unless GemvNormSupported.
cudaError_t LaunchGemvNorm(int64_t m, int64_t n, int64_t k, const void* x, int64_t ldx, const void* w, int64_t ldw,
                           void* out, int64_t ldo, const GemvNormArgs& norm, GemvEpilogue epilogue,
                           const GemvRopeArgs* rope, cudaStream_t stream);

}  // namespace lorc::kernels
