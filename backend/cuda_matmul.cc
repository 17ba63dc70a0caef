// CudaBackend::Matmul through cuBLASLt: out = x * w^T (backend.h) as one cublasLtMatmul with fp32
// accumulation (CUBLAS_COMPUTE_32F, fp32 alpha/beta).
//
// Dtypes (x and w alike; out the same or F32):
//   F32 x F32 -> F32 (true fp32, no TF32), BF16 x BF16 -> BF16 | F32, F16 x F16 -> F16 | F32.
// The "-> F32" forms serve the LM head (bf16 hidden states, fp32 logits). Anything else is
// Unimplemented naming the three dtypes; shape mismatches (and strides below cols) are
// InvalidArgument naming the three shapes.
//
// Row-major -> cuBLASLt's column-major: out^T [N, T] = (w [K, N] col-major)^T * (x [K, T]
// col-major), i.e. m = N, n = T, k = K, A = w transposed ("TN"), every ld taken from the views.
//
// Algorithms: chosen once per (token-count bucket, N, K, dtypes, alignments): cuBLASLt's heuristic
// gives up to kCandidates; when a key is first seen outside graph capture each candidate is timed
// on the call's own operands, each timed run after the L2 cache was overwritten (TimeCold: decode
// weights come from HBM; a one-off stream synchronization) and the fastest is cached. Seen
// first inside a capture, the heuristic's first choice is used (host-only work) and cached
// untimed; the next eager call of that key times it. Buckets are powers of two of the token count
// T (1, 2, 4, ..., 256, ... : decode batches matter most); a bucket is timed at the token count
// of its first call, so the model runner warms every bucket up at its largest reachable count at
// start-up (TimesMatmulAtFirstUse; worker/README.md). The workspace (kWorkspaceBytes) is
// allocated with the backend, the L2 flush buffer (twice the L2 size) at the first timing (with
// CUDA graphs that is in start-up's warm-up, before the KV cache is sized; when it cannot be
// allocated, timing runs hot), so Matmul is capturable. `out` must not
// overlap x or w (timing runs the GEMM several times on the call's own operands).
//
// Small M: where the GEMV of cuda_gemv.h applies (BF16, T <= 16, aligned, K % 8 == 0; part of the
// key), its configurations are timed the same way after cuBLASLt's candidates and the fastest of
// all is cached (CudaMatmulPolicy kAuto);
// kCublasLtOnly / kGemvFirst pin one path (benchmarks, tests). Seen first inside a capture:
// cuBLASLt's heuristic pick (kGemvFirst: the GEMV's first configuration), timed later as above.
// LORC_LOG_MATMUL=1 prints each choice (shape, kernel, cuBLASLt's and the GEMV's times) to stderr.
#include "backend/cuda_backend_impl.h"

#ifdef LORC_HAVE_CUDA

#include <cublasLt.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <string_view>

#include "absl/container/flat_hash_map.h"
#include "backend/cublaslt_loader.h"
#include "backend/cuda_gemv.h"
#include "common/env_switch.h"
#include "kernels/gemv.cuh"

namespace lorc::cuda_internal {
namespace {

constexpr size_t kWorkspaceBytes = size_t{32} << 20;
constexpr int kCandidates = 8;  // heuristic results considered per key
constexpr int kTimedReps = 5;   // timed runs per candidate (after one warm-up run)

struct GemmKey {
  int64_t t_bucket, n, k;
  DType ab, out;
  uint32_t align_w, align_x, align_out;  // pointer alignment, bytes (<= 256)
  uint32_t ld_align;                     // alignment of the three row pitches, bytes (<= 16)
  bool gemv;                             // GemvApplies (the same for every call of the key)
  bool operator==(const GemmKey&) const = default;
  template <typename H>
  friend H AbslHashValue(H h, const GemmKey& g) {
    return H::combine(std::move(h), g.t_bucket, g.n, g.k, g.ab, g.out, g.align_w, g.align_x,
                      g.align_out, g.ld_align, g.gemv);
  }
};

struct AlgoChoice {
  cublasLtMatmulAlgo_t algo;
  bool timed = false;
  int gemv = -1;  // >= 0: the GEMV with this configuration (cuda_gemv.h) instead of `algo`
  // MatmulSiluMul where `gemv` is not the fused kernel's configuration: -1 not timed yet, 0 the two
  // ops, 1 the fused kernel (it timed faster than this choice then SiluMul).
  int silu = -1;
};

uint32_t PtrAlign(const void* p) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p) | 256;
  return static_cast<uint32_t>(a & (~a + 1));
}

int64_t Bucket(int64_t t) {
  int64_t b = 1;
  while (b < t) b <<= 1;
  return b;
}

cudaDataType_t CudaType(DType d) {
  switch (d) {
    case DType::kBF16: return CUDA_R_16BF;
    case DType::kF16: return CUDA_R_16F;
    default: return CUDA_R_32F;
  }
}

std::string Shape(const Tensor2D& t) {
  return absl::StrCat("[", t.rows, ",", t.cols, t.ld ? absl::StrCat(" ld ", t.ld) : "", "]");
}

absl::Status LtError(const CublasLtApi& lt, cublasStatus_t s, const std::string& what) {
  if (s == CUBLAS_STATUS_SUCCESS) return absl::OkStatus();
  return absl::InternalError(absl::StrCat("cuda backend: Matmul: ", what, ": ", lt.GetStatusString(s)));
}

}  // namespace

struct MatmulState {
  absl::Status init;  // OK, or why cuBLASLt cannot be used (returned by every Matmul)
  const CublasLtApi* lt = nullptr;  // set when init is OK (cublaslt_loader.h)
  CudaMatmulPolicy policy = GetCudaMatmulPolicy();
  int64_t fused_norm_rows = GetCudaFusedNormRows();  // FusesNormMatmul's limit, fixed at creation
  bool folded_norms = GetCudaFoldedNorms();          // FoldedNormRows > 0, fixed at creation
  cublasLtHandle_t handle = nullptr;
  void* workspace = nullptr;
  cudaEvent_t start = nullptr, stop = nullptr;  // for timing candidates
  // Overwritten before each timed run so that its operands come from HBM, as a decode step's
  // weights do (twice the L2 size; allocated at the first timing; null: timing runs hot).
  void* flush = nullptr;
  size_t flush_bytes = 0;
  bool flush_tried = false;
  absl::flat_hash_map<GemmKey, AlgoChoice> algos;

  ~MatmulState() {
    if (start != nullptr) cudaEventDestroy(start);
    if (stop != nullptr) cudaEventDestroy(stop);
    if (workspace != nullptr) cudaFree(workspace);
    if (flush != nullptr) cudaFree(flush);
    if (handle != nullptr) lt->Destroy(handle);
  }
};

std::shared_ptr<MatmulState> NewMatmulState() {
  auto s = std::make_shared<MatmulState>();
  absl::StatusOr<const CublasLtApi*> lt = LoadCublasLt();
  if (!lt.ok()) {
    s->init = lt.status();
    return s;
  }
  s->lt = *lt;
  s->init = LtError(*s->lt, s->lt->Create(&s->handle), "cublasLtCreate");
  if (s->init.ok()) s->init = CudaError(cudaMalloc(&s->workspace, kWorkspaceBytes), "Matmul workspace");
  if (s->init.ok()) s->init = CudaError(cudaEventCreate(&s->start), "Matmul timing event");
  if (s->init.ok()) s->init = CudaError(cudaEventCreate(&s->stop), "Matmul timing event");
  return s;
}

namespace {

// One GEMM's descriptors, initialised in place (no allocation), and its operands.
struct Gemm {
  cublasLtMatmulDescOpaque_t desc_storage;
  cublasLtMatrixLayoutOpaque_t a_storage, b_storage, d_storage;
  cublasLtMatmulDesc_t desc = reinterpret_cast<cublasLtMatmulDesc_t>(&desc_storage);
  cublasLtMatrixLayout_t a = reinterpret_cast<cublasLtMatrixLayout_t>(&a_storage);
  cublasLtMatrixLayout_t b = reinterpret_cast<cublasLtMatrixLayout_t>(&b_storage);
  cublasLtMatrixLayout_t d = reinterpret_cast<cublasLtMatrixLayout_t>(&d_storage);
  const void* w = nullptr;
  const void* x = nullptr;
  void* out = nullptr;

  absl::Status Init(const CublasLtApi& lt, const Tensor2D& xt, const Tensor2D& wt, const Tensor2D& ot) {
    w = wt.data;
    x = xt.data;
    out = ot.data;
    const cublasOperation_t trans_a = CUBLAS_OP_T, trans_b = CUBLAS_OP_N;
    RETURN_IF_ERROR(LtError(lt, lt.MatmulDescInit(desc, CUBLAS_COMPUTE_32F, CUDA_R_32F), "descriptor"));
    RETURN_IF_ERROR(LtError(lt, lt.MatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &trans_a,
                                                           sizeof(trans_a)), "descriptor"));
    RETURN_IF_ERROR(LtError(lt, lt.MatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &trans_b,
                                                           sizeof(trans_b)), "descriptor"));
    const auto rows = [](int64_t r) { return static_cast<uint64_t>(r); };
    RETURN_IF_ERROR(LtError(lt, lt.MatrixLayoutInit(a, CudaType(wt.dtype), rows(wt.cols), rows(wt.rows),
                                                     wt.stride()), "layout of w"));
    RETURN_IF_ERROR(LtError(lt, lt.MatrixLayoutInit(b, CudaType(xt.dtype), rows(xt.cols), rows(xt.rows),
                                                     xt.stride()), "layout of x"));
    return LtError(lt, lt.MatrixLayoutInit(d, CudaType(ot.dtype), rows(ot.cols), rows(ot.rows), ot.stride()),
                   "layout of out");
  }

  cublasStatus_t Run(const MatmulState& s, const cublasLtMatmulAlgo_t& algo, cudaStream_t stream) const {
    static const float kOne = 1.0f, kZero = 0.0f;
    return s.lt->Matmul(s.handle, desc, &kOne, w, a, x, b, &kZero, out, d, out, d, &algo, s.workspace,
                          kWorkspaceBytes, stream);
  }
};

// Up to kCandidates algorithms for `g`, best estimate first (none: an error naming the problem).
absl::Status Heuristics(const MatmulState& s, const Gemm& g, const GemmKey& key,
                        cublasLtMatmulHeuristicResult_t* results, int* count) {
  cublasLtMatmulPreferenceOpaque_t pref_storage;
  auto pref = reinterpret_cast<cublasLtMatmulPreference_t>(&pref_storage);
  RETURN_IF_ERROR(LtError(*s.lt, s.lt->MatmulPreferenceInit(pref), "preference"));
  const uint64_t ws = kWorkspaceBytes;
  const auto set = [&](cublasLtMatmulPreferenceAttributes_t attr, const void* v, size_t n) {
    return LtError(*s.lt, s.lt->MatmulPreferenceSetAttribute(pref, attr, v, n), "preference");
  };
  RETURN_IF_ERROR(set(CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)));
  RETURN_IF_ERROR(set(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &key.align_w, sizeof(uint32_t)));
  RETURN_IF_ERROR(set(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &key.align_x, sizeof(uint32_t)));
  RETURN_IF_ERROR(set(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &key.align_out, sizeof(uint32_t)));
  RETURN_IF_ERROR(set(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &key.align_out, sizeof(uint32_t)));
  *count = 0;
  const cublasStatus_t st = s.lt->MatmulAlgoGetHeuristic(s.handle, g.desc, g.a, g.b, g.d, g.d, pref,
                                                           kCandidates, results, count);
  if (st != CUBLAS_STATUS_SUCCESS || *count == 0) {
    return absl::InternalError(absl::StrCat(
        "cuda backend: Matmul: cuBLASLt has no algorithm for T=", key.t_bucket, " (bucket) N=", key.n,
        " K=", key.k, " ", DTypeName(key.ab), " -> ", DTypeName(key.out), " (alignments w ", key.align_w,
        " x ", key.align_x, " out ", key.align_out, ", pitch ", key.ld_align, "): ", s.lt->GetStatusString(st)));
  }
  return absl::OkStatus();
}

// The summed milliseconds of kTimedReps runs of `run`, each after the L2 cache was overwritten:
// decode GEMMs read their weights from HBM once a step, and timed with the weights hot in L2 close
// candidates rank wrongly (on an H200, 2026-12-01: the 8B qkv GEMM at M = 1 picked a 16.4 us
// configuration over a 14.9 us one). Infinity when `run` refused.
absl::StatusOr<float> TimeCold(MatmulState& s, cudaStream_t stream, const std::function<bool()>& run) {
  if (!s.flush_tried) {
    s.flush_tried = true;
    int device = 0, l2 = 0;
    if (cudaGetDevice(&device) == cudaSuccess &&
        cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, device) == cudaSuccess && l2 > 0 &&
        cudaMalloc(&s.flush, 2 * static_cast<size_t>(l2)) == cudaSuccess) {
      s.flush_bytes = 2 * static_cast<size_t>(l2);
    } else {
      s.flush = nullptr;
      cudaGetLastError();  // no memory to spare: time hot rather than fail
    }
  }
  float total = 0;
  for (int r = 0; r < kTimedReps; ++r) {
    if (s.flush != nullptr) {
      RETURN_IF_ERROR(CudaError(cudaMemsetAsync(s.flush, r & 0xff, s.flush_bytes, stream), "Matmul timing"));
    }
    RETURN_IF_ERROR(CudaError(cudaEventRecord(s.start, stream), "Matmul timing"));
    if (!run()) return std::numeric_limits<float>::infinity();
    RETURN_IF_ERROR(CudaError(cudaEventRecord(s.stop, stream), "Matmul timing"));
    RETURN_IF_ERROR(CudaError(cudaEventSynchronize(s.stop), "Matmul timing"));
    float ms = 0;
    RETURN_IF_ERROR(CudaError(cudaEventElapsedTime(&ms, s.start, s.stop), "Matmul timing"));
    total += ms;
  }
  return total;
}

// The fastest of `results` on g's own operands (enqueues runs on `stream` and waits for them);
// *best_ms: its TimeCold time (infinite when none ran).
absl::StatusOr<int> TimeCandidates(MatmulState& s, const Gemm& g,
                                   const cublasLtMatmulHeuristicResult_t* results, int count,
                                   cudaStream_t stream, float* best_ms_out) {
  int best = 0;
  float& best_ms = *best_ms_out;
  best_ms = std::numeric_limits<float>::infinity();
  for (int i = 0; i < count; ++i) {
    if (results[i].state != CUBLAS_STATUS_SUCCESS) continue;
    if (g.Run(s, results[i].algo, stream) != CUBLAS_STATUS_SUCCESS) continue;  // warm-up
    ASSIGN_OR_RETURN(const float ms, TimeCold(s, stream, [&] {
                       return g.Run(s, results[i].algo, stream) == CUBLAS_STATUS_SUCCESS;
                     }));
    // The heuristic's order wins near-ties (TimedFaster), so that timing noise does not pick different
    // algorithms, hence different roundings, in different processes.
    if (best_ms == std::numeric_limits<float>::infinity() || TimedFaster(ms, best_ms)) {
      best_ms = ms;
      best = i;
    }
  }
  return best;
}

// Matmul's cache key for these operands (shapes already checked).
GemmKey KeyOf(const Tensor2D& x, const Tensor2D& w, const Tensor2D& out) {
  const size_t ab_esz = DTypeSize(x.dtype), out_esz = DTypeSize(out.dtype);
  const uint64_t pitches = (x.stride() * ab_esz) | (w.stride() * ab_esz) | (out.stride() * out_esz) | 16;
  return GemmKey{Bucket(x.rows),     w.rows,           x.cols,
                 x.dtype,             out.dtype,        PtrAlign(w.data),
                 PtrAlign(x.data),    PtrAlign(out.data), static_cast<uint32_t>(pitches & (~pitches + 1)),
                 GemvApplies(x, w, out)};
}

// LORC_LOG_MATMUL=1: each choice Matmul makes is printed to stderr (shape, kernel, timings).
bool LogChoices() {
  static const bool on = EnvFlag("LORC_LOG_MATMUL", false);
  return on;
}

absl::Status CheckMatmul(const Tensor2D& x, const Tensor2D& w, const Tensor2D& out) {
  if (x.cols != w.cols || out.rows != x.rows || out.cols != w.rows || x.rows < 0 || w.rows < 0 ||
      x.cols < 0 || x.stride() < x.cols || w.stride() < w.cols || out.stride() < out.cols) {
    return absl::InvalidArgumentError(absl::StrCat("cuda backend: Matmul: shape mismatch x", Shape(x), " w",
                                                   Shape(w), " out", Shape(out),
                                                   " (want x[T,K] w[N,K] out[T,N], ld >= cols)"));
  }
  const bool ab_ok = x.dtype == w.dtype &&
                     (x.dtype == DType::kF32 || x.dtype == DType::kBF16 || x.dtype == DType::kF16);
  if (!ab_ok || (out.dtype != x.dtype && out.dtype != DType::kF32)) {
    return absl::UnimplementedError(absl::StrCat(
        "cuda backend: Matmul: dtypes x ", DTypeName(x.dtype), ", w ", DTypeName(w.dtype), ", out ",
        DTypeName(out.dtype), " not implemented (x and w both F32, BF16 or F16; out the same or F32)"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status CudaBackend::Matmul(const Tensor2D& x, const Tensor2D& w, Tensor2D out) {
  RETURN_IF_ERROR(CheckMatmul(x, w, out));
  if (x.rows == 0 || w.rows == 0) return absl::OkStatus();
  const size_t out_esz = DTypeSize(out.dtype);
  if (x.cols == 0) {  // an empty sum
    return CudaError(cudaMemset2DAsync(out.data, out.stride() * out_esz, 0, out.cols * out_esz, out.rows, stream_),
                     "Matmul (K = 0)");
  }
  MatmulState& s = *matmul_;
  RETURN_IF_ERROR(s.init);

  Gemm g;
  RETURN_IF_ERROR(g.Init(*s.lt, x, w, out));
  const GemmKey key = KeyOf(x, w, out);

  auto it = s.algos.find(key);
  if (it == s.algos.end() || !it->second.timed) {
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    RETURN_IF_ERROR(CudaError(cudaStreamIsCapturing(stream_, &capture), "Matmul"));
    const bool can_time = capture == cudaStreamCaptureStatusNone;
    if (it == s.algos.end() || can_time) {
      cublasLtMatmulHeuristicResult_t results[kCandidates] = {};
      int count = 0;
      RETURN_IF_ERROR(Heuristics(s, g, key, results, &count));
      const bool try_gemv = key.gemv && s.policy != CudaMatmulPolicy::kCublasLtOnly;
      int pick = 0;
      float lt_ms = 0;
      if (can_time && (count > 1 || try_gemv)) {
        ASSIGN_OR_RETURN(pick, TimeCandidates(s, g, results, count, stream_, &lt_ms));
      }
      AlgoChoice choice{results[pick].algo, can_time};
      GemvTiming gt{-1, 0.f};
      if (try_gemv && can_time) {
        ASSIGN_OR_RETURN(gt, TimeGemv(x, w, out, [&](const std::function<bool()>& run) { return TimeCold(s, stream_, run); },
                                      stream_));
        // The GEMV unless cuBLASLt is faster by the margin: near a tie the GEMV wins, because it
        // takes part in programmatic dependent launch and cuBLASLt does not, which the timing of the
        // GEMM alone cannot see: behind a cuBLASLt o projection the next kernel (the RMSNorm)
        // advanced 0.93 us more a layer (one Llama-3-70B rank at TP = 8 on an H100, 2026-12-07,
        // docs/PERFORMANCE.md). Still a margin rule, so processes pick alike.
        if (gt.config >= 0 && (!TimedFaster(lt_ms, gt.ms) || s.policy == CudaMatmulPolicy::kGemvFirst)) {
          choice.gemv = gt.config;
        }
      } else if (try_gemv && s.policy == CudaMatmulPolicy::kGemvFirst) {
        choice.gemv = 0;  // inside a capture: untimed
      }
      if (LogChoices()) {
        std::fprintf(stderr, "lorcserve: Matmul T=%lld (bucket %lld) N=%lld K=%lld %s: %s (cuBLASLt %.2f us, GEMV %s %.2f us)\n",
                     static_cast<long long>(x.rows), static_cast<long long>(key.t_bucket), static_cast<long long>(key.n),
                     static_cast<long long>(key.k), can_time ? "timed" : "in a capture, untimed",
                     choice.gemv >= 0 ? GemvConfigName(choice.gemv).c_str() : "cuBLASLt", 1e3 * lt_ms / kTimedReps,
                     gt.config >= 0 ? GemvConfigName(gt.config).c_str() : "-", 1e3 * gt.ms / kTimedReps);
      }
      it = s.algos.insert_or_assign(key, choice).first;
    }
  }
  if (it->second.gemv >= 0) return RunGemv(x, w, out, it->second.gemv, stream_);
  cublasStatus_t st = g.Run(s, it->second.algo, stream_);
  if (st == CUBLAS_STATUS_NOT_SUPPORTED || st == CUBLAS_STATUS_INVALID_VALUE) {
    // The bucket's algorithm does not fit this token count: the heuristic's pick for exactly it.
    cublasLtMatmulHeuristicResult_t results[kCandidates] = {};
    int count = 0;
    RETURN_IF_ERROR(Heuristics(s, g, key, results, &count));
    st = g.Run(s, results[0].algo, stream_);
  }
  return LtError(*s.lt, st, absl::StrCat("x", Shape(x), " w", Shape(w), " out", Shape(out)));
}

namespace {

// The fused QKV path's conditions: Matmul's shapes, BF16 everywhere (a quantized cache needs
// per-head scales over all of a head's dims: not one CTA's), q, k and v the consecutive column
// blocks of out, the GEMV's operand rules and a policy that allows the GEMV.
bool FusedQkvApplies(const Tensor2D& x, const Tensor2D& w, const Tensor2D& out, const RopeKvWriteParams& p,
                     CudaMatmulPolicy policy, kernels::GemvRopeArgs* r) {
  // LORC_DISABLE_FUSED_QKV=1: never (the two ops; A/B measurements).
  static const bool disabled = EnvFlag("LORC_DISABLE_FUSED_QKV", false);
  if (disabled || policy == CudaMatmulPolicy::kCublasLtOnly || !p.rotate_k || p.cache.quant != kernels::KvQuant::kNone ||
      p.cache.dtype != DType::kBF16 || !CheckMatmul(x, w, out).ok() || !GemvApplies(x, w, out) ||
      out.dtype != DType::kBF16 || x.rows < 1) {
    return false;
  }
  const int64_t hd = p.head_dim, q_w = int64_t{p.num_heads} * hd, kv_w = int64_t{p.num_kv_heads} * hd;
  auto at = [&](const Tensor2D& t, int64_t col, int64_t cols) {
    return t.dtype == DType::kBF16 && t.rows == out.rows && t.cols == cols && t.stride() == out.stride() &&
           t.data == static_cast<void*>(out.as<char>() + col * 2);
  };
  if (p.num_heads < 0 || p.num_kv_heads <= 0 || hd <= 0 || out.cols != q_w + 2 * kv_w || !at(p.q, 0, q_w) ||
      !at(p.k, q_w, kv_w) || !at(p.v, q_w + kv_w, kv_w) || p.cache.k_width != kv_w || p.cache.v_width != kv_w) {
    return false;
  }
  r->head_dim = p.head_dim;
  r->num_heads = p.num_heads;
  r->num_kv_heads = p.num_kv_heads;
  r->positions = p.positions;
  r->inv_freq = p.inv_freq;
  r->slot_mapping = p.slot_mapping;
  r->k_cache = p.cache.k;
  r->v_cache = p.cache.v;
  return kernels::GemvRopeSupported(x.rows, w.rows, x.cols, x.data, x.stride(), w.data, w.stride(), *r);
}

}  // namespace

absl::Status CudaBackend::MatmulRopeKvWrite(const Tensor2D& x, const Tensor2D& w, Tensor2D out,
                                            const RopeKvWriteParams& p) {
  kernels::GemvRopeArgs r;
  if (!FusedQkvApplies(x, w, out, p, matmul_->policy, &r)) return Backend::MatmulRopeKvWrite(x, w, out, p);
  // LORC_GEMV_ROPE_SPLITS=N: N K splits a tile (1: unsplit) instead of kernels::GemvRopeSplits
  // (A/B measurements).
  static const int splits = static_cast<int>(EnvInt("LORC_GEMV_ROPE_SPLITS", 0, kernels::kGemvMaxSplits, 0));
  return CudaError(kernels::LaunchGemvRopeKvWrite(x.rows, w.rows, x.cols, x.data, x.stride(), w.data, w.stride(),
                                                  out.data, out.stride(), r, stream_, splits),
                   "MatmulRopeKvWrite");
}

namespace {

// The GEMV configuration kernels::LaunchGemvSiluMul shares (cuda_gemv.cc's kConfigs[0]: unsplit,
// k_steps 4).
constexpr int kFusedSiluConfig = 0;

// LORC_DISABLE_FUSED_SILU=1: never fuse the gate_up GEMV with SiluMul (the two ops; A/B runs).
bool FusedSiluDisabled() {
  static const bool disabled = EnvFlag("LORC_DISABLE_FUSED_SILU", false);
  return disabled;
}

// act fits the SiLU epilogue of x w^T (w = [gate; up], 2 * act.cols rows): BF16, one row per token.
bool SiluOperandsFit(const Tensor2D& x, const Tensor2D& w, const Tensor2D& act) {
  return act.dtype == DType::kBF16 && act.rows == x.rows && 2 * act.cols == w.rows;
}

}  // namespace

absl::Status CudaBackend::MatmulSiluMul(const Tensor2D& x, const Tensor2D& w, Tensor2D gate_up, Tensor2D act) {
  // The fused kernel (kernels::LaunchGemvSiluMul) or the two ops, per Matmul key:
  // - Matmul chose the GEMV configuration the fused kernel shares: fused, and act is the bits of
  //   the two ops;
  // - Matmul chose cuBLASLt or another configuration: the fused kernel against Matmul's choice
  //   then SiluMul, timed once on these operands (TimeCold, cold L2; launches only), fused where
  //   TimedFaster (by kSwitchMargin: the choice then follows real differences, so processes and
  //   ranks choose alike); act then has the fused kernel's bits. (On an H100, 2026-12-06, Matmul
  //   chose cuBLASLt for the 8B gate_up at M = 1, 79.5 us, leaving SiluMul's 4.1 us a layer on the
  //   critical path; the GEMV with the SiLU epilogue advanced the step by 74-76 us.)
  // The call that meets a key first runs the two ops (Matmul times its choice there) and, outside
  // a capture, makes the second choice in the same call, so a forward pass's layers all take the
  // same path. A key met first inside a capture runs the two ops there, untimed.
  // Disabled (LORC_DISABLE_FUSED_SILU=1), under kCublasLtOnly or where the kernel does not take
  // the operands: the two ops.
  if (FusedSiluDisabled() || matmul_->policy == CudaMatmulPolicy::kCublasLtOnly || !matmul_->init.ok() ||
      !CheckMatmul(x, w, gate_up).ok() || !GemvApplies(x, w, gate_up) || gate_up.dtype != DType::kBF16 ||
      !SiluOperandsFit(x, w, act) ||
      !kernels::GemvSiluMulSupported(x.rows, w.rows, x.cols, x.data, x.stride(), w.data, w.stride(), act.stride())) {
    return Backend::MatmulSiluMul(x, w, gate_up, act);
  }
  const auto fused = [&] {
    return CudaError(kernels::LaunchGemvSiluMul(x.rows, w.rows, x.cols, x.data, x.stride(), w.data, w.stride(),
                                                act.data, act.stride(), stream_),
                     "MatmulSiluMul");
  };
  MatmulState& s = *matmul_;
  const GemmKey key = KeyOf(x, w, gate_up);
  auto it = s.algos.find(key);
  bool ran_pair = false;  // act already holds the two ops' result
  if (it == s.algos.end() || !it->second.timed) {
    RETURN_IF_ERROR(Backend::MatmulSiluMul(x, w, gate_up, act));  // Matmul chooses here
    ran_pair = true;
    it = s.algos.find(key);
    if (it == s.algos.end() || !it->second.timed) return absl::OkStatus();  // inside a capture
  }
  if (it->second.gemv == kFusedSiluConfig) return ran_pair ? absl::OkStatus() : fused();  // the same bits
  if (it->second.silu < 0) {
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    RETURN_IF_ERROR(CudaError(cudaStreamIsCapturing(stream_, &capture), "MatmulSiluMul"));
    if (capture != cudaStreamCaptureStatusNone) {  // untimed: the two ops, decided by a later call
      return ran_pair ? absl::OkStatus() : Backend::MatmulSiluMul(x, w, gate_up, act);
    }
    // Matmul's choice then SiluMul as launches (the descriptors made once, outside the timing).
    Gemm g;
    RETURN_IF_ERROR(g.Init(*s.lt, x, w, gate_up));
    const AlgoChoice choice = it->second;
    absl::Status pair_status;
    const auto pair = [&] {
      if (choice.gemv >= 0) {
        pair_status = RunGemv(x, w, gate_up, choice.gemv, stream_);
      } else if (g.Run(s, choice.algo, stream_) != CUBLAS_STATUS_SUCCESS) {
        pair_status = Matmul(x, w, gate_up);  // the bucket's algorithm refused this T: Matmul's fallback
      } else {
        pair_status = absl::OkStatus();
      }
      if (pair_status.ok()) pair_status = SiluMul(gate_up, act);
      return pair_status.ok();
    };
    RETURN_IF_ERROR(fused());  // warm-up
    ASSIGN_OR_RETURN(const float fused_ms, TimeCold(s, stream_, [&] { return fused().ok(); }));
    ASSIGN_OR_RETURN(const float pair_ms, TimeCold(s, stream_, pair));
    RETURN_IF_ERROR(pair_status);
    it = s.algos.find(key);  // the choice timed above (nothing inserts a timed key again)
    it->second.silu = TimedFaster(fused_ms, pair_ms) ? 1 : 0;
    ran_pair = true;  // the last timed run was the pair
    if (LogChoices()) {
      std::fprintf(stderr, "lorcserve: MatmulSiluMul T=%lld N=%lld K=%lld: %s (fused %.2f us, Matmul + SiluMul %.2f us)\n",
                   static_cast<long long>(x.rows), static_cast<long long>(key.n), static_cast<long long>(key.k),
                   it->second.silu == 1 ? "fused" : "two ops", 1e3 * fused_ms / kTimedReps,
                   1e3 * pair_ms / kTimedReps);
    }
  }
  if (it->second.silu == 1) return fused();
  return ran_pair ? absl::OkStatus() : Backend::MatmulSiluMul(x, w, gate_up, act);
}

absl::Status CudaBackend::MatmulAdd(const Tensor2D& x, const Tensor2D& w, Tensor2D acc, Tensor2D scratch,
                                    float* sum_squares) {
  int config = -1;
  if (matmul_->policy != CudaMatmulPolicy::kCublasLtOnly && matmul_->init.ok() && CheckMatmul(x, w, scratch).ok() &&
      GemvApplies(x, w, scratch) && scratch.dtype == DType::kBF16 && acc.dtype == DType::kBF16 &&
      acc.rows == scratch.rows && acc.cols == scratch.cols && acc.stride() >= acc.cols) {
    const auto it = matmul_->algos.find(KeyOf(x, w, scratch));
    if (it != matmul_->algos.end() && it->second.timed) config = it->second.gemv;
  }
  if (config < 0) return Backend::MatmulAdd(x, w, acc, scratch, sum_squares);
  return RunGemvAdd(x, w, acc, config, sum_squares, stream_);
}

int64_t CudaBackend::FoldedNormRows() const {
  return matmul_->folded_norms && matmul_->policy != CudaMatmulPolicy::kCublasLtOnly ? kernels::kGemvNormMaxRows : 0;
}

namespace {

// The kernel's view of a NormedInput that CheckNormedInput accepted, when its tensors are BF16
// and, with an add, the sum goes to another buffer (the kernel reads the stream while it stores
// the sum); false otherwise (the unfused ops then run).
bool NormArgsOf(const NormedInput& in, kernels::GemvNormArgs* a) {
  if (in.residual.dtype != DType::kBF16 || in.weight.dtype != DType::kBF16) return false;
  *a = kernels::GemvNormArgs{};
  a->weight = in.weight.data;
  a->eps = in.eps;
  if (in.add.data != nullptr) {
    if (in.next.data == in.residual.data) return false;
    a->add = in.add.data;
    a->ld_add = in.add.stride();
    a->residual_out = in.next.data;
    a->ld_residual_out = in.next.stride();
  }
  return true;
}

// The folded form's kernel arguments (NormedInput::sum_squares set): BF16, no add, the partials;
// the weight (all ones: folded into w) is not passed.
bool FoldedArgsOf(const NormedInput& in, kernels::GemvNormArgs* a) {
  if (in.residual.dtype != DType::kBF16 || in.add.data != nullptr) return false;
  *a = kernels::GemvNormArgs{};
  a->eps = in.eps;
  a->sum_squares = in.sum_squares;
  return true;
}

// The kernel's norm arguments for a NormedInput that CheckNormedInput accepted: the folded form
// (NormedInput::sum_squares set: the partials, no weight; at most `folded_rows` tokens, the
// backend's FoldedNormRows()) or the fused one (`fuses`, the backend's FusesNormMatmul for the
// token count: the weight and the add); false where neither applies (the unfused ops then run).
bool GemvNormArgsFor(const NormedInput& in, int64_t folded_rows, bool fuses, kernels::GemvNormArgs* a) {
  return in.sum_squares != nullptr ? folded_rows >= in.residual.rows && FoldedArgsOf(in, a)
                                   : fuses && NormArgsOf(in, a);
}

}  // namespace

bool CudaBackend::FusesNormMatmul(int64_t tokens) const {
  const int64_t limit = fused_norm_rows_ >= 0 ? fused_norm_rows_ : matmul_->fused_norm_rows;
  return tokens >= 1 && tokens <= limit && tokens <= kernels::kGemvNormMaxRows &&
         matmul_->policy != CudaMatmulPolicy::kCublasLtOnly;
}

absl::Status CudaBackend::NormMatmulRopeKvWrite(const NormedInput& in, const Tensor2D& w, Tensor2D out,
                                                const RopeKvWriteParams& p) {
  RETURN_IF_ERROR(CheckNormedInput("NormMatmulRopeKvWrite", in));
  kernels::GemvNormArgs a;
  const Tensor2D& x = in.residual;
  if (!GemvNormArgsFor(in, FoldedNormRows(), FusesNormMatmul(x.rows), &a) || !CheckMatmul(x, w, out).ok() ||
      out.dtype != DType::kBF16 || w.dtype != DType::kBF16) {
    return Backend::NormMatmulRopeKvWrite(in, w, out, p);
  }
  const auto supported = [&](kernels::GemvEpilogue epilogue, const kernels::GemvRopeArgs* r) {
    return kernels::GemvNormSupported(x.rows, w.rows, x.cols, x.data, x.stride(), w.data, w.stride(), out.stride(), a,
                                      epilogue, r);
  };
  const auto launch = [&](kernels::GemvEpilogue epilogue, const kernels::GemvRopeArgs* r) {
    return CudaError(kernels::LaunchGemvNorm(x.rows, w.rows, x.cols, x.data, x.stride(), w.data, w.stride(), out.data,
                                             out.stride(), a, epilogue, r, stream_),
                     "NormMatmulRopeKvWrite");
  };
  kernels::GemvRopeArgs r;
  if (FusedQkvApplies(x, w, out, p, matmul_->policy, &r) && supported(kernels::GemvEpilogue::kRopeKvWrite, &r)) {
    return launch(kernels::GemvEpilogue::kRopeKvWrite, &r);
  }
  // The projection alone, then RoPE and the KV write (never folded: kStore takes no partials).
  if (!supported(kernels::GemvEpilogue::kStore, nullptr)) return Backend::NormMatmulRopeKvWrite(in, w, out, p);
  RETURN_IF_ERROR(launch(kernels::GemvEpilogue::kStore, nullptr));
  return RopeKvWrite(p);
}

absl::Status CudaBackend::NormMatmulSiluMul(const NormedInput& in, const Tensor2D& w, Tensor2D gate_up,
                                            Tensor2D act) {
  RETURN_IF_ERROR(CheckNormedInput("NormMatmulSiluMul", in));
  kernels::GemvNormArgs a;
  const Tensor2D& x = in.residual;
  if (!GemvNormArgsFor(in, FoldedNormRows(), FusesNormMatmul(x.rows), &a) || !CheckMatmul(x, w, gate_up).ok() ||
      !GemvApplies(x, w, gate_up) || !SiluOperandsFit(x, w, act) ||
      !kernels::GemvNormSupported(x.rows, w.rows, x.cols, x.data, x.stride(), w.data, w.stride(), act.stride(), a,
                                  kernels::GemvEpilogue::kSiluMul, nullptr)) {
    return Backend::NormMatmulSiluMul(in, w, gate_up, act);
  }
  return CudaError(kernels::LaunchGemvNorm(x.rows, w.rows, x.cols, x.data, x.stride(), w.data, w.stride(), act.data,
                                           act.stride(), a, kernels::GemvEpilogue::kSiluMul, nullptr, stream_),
                   "NormMatmulSiluMul");
}

}  // namespace lorc::cuda_internal
#endif
