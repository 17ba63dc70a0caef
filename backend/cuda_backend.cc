#include "backend/cuda_backend.h"

#include <initializer_list>
#include <memory>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "kvpolicy/kv_policy_config.h"

#ifdef LORC_HAVE_CUDA
#include "backend/cuda_backend_impl.h"
#include "kernels/copy_rows.cuh"
#include "kernels/device_query.cuh"
#include "kernels/elementwise.cuh"
#include "kernels/random_fill.cuh"
#include "kernels/rms_norm.cuh"
#include "kernels/rope.cuh"
#endif

namespace lorc {

absl::Status CudaKvPolicySupport(const kvpolicy::KvPolicyConfig& config, bool latent, int32_t query_group) {
  (void)latent;  // CORM and MiKV run over full-KV and LoRC latent layers alike
  if (query_group > 8) {
    return absl::UnimplementedError(absl::StrCat(
        "--kv-policy ", kvpolicy::KvPolicyKindName(config.kind), ": the cuda backend's policy kernels take up to 8 query "
        "heads per KV head; this model (this rank's shard) has ", query_group, " (the cpu backend runs it)"));
  }
  return absl::OkStatus();
}

#ifdef LORC_HAVE_CUDA

bool CudaCompiledIn() { return true; }

absl::StatusOr<std::vector<CudaDeviceInfo>> ListCudaDevices() {
  kernels::CudaDeviceProps props[16];
  int count = 0;
  const cudaError_t err = kernels::QueryCudaDevices(props, 16, &count);
  if (err != cudaSuccess) {
    return absl::UnavailableError(absl::StrCat("CUDA: ", cudaGetErrorString(err)));
  }
  std::vector<CudaDeviceInfo> out;
  for (int i = 0; i < count && i < 16; ++i) {
    out.push_back({i, props[i].name, static_cast<int64_t>(props[i].total_memory_bytes),
                   props[i].compute_major, props[i].compute_minor, props[i].multiprocessors});
  }
  return out;
}

std::string CudaVersionString() {
  int rt = 0, drv = 0;
  const cudaError_t err = kernels::QueryCudaVersions(&rt, &drv);
  const std::string runtime = absl::StrCat(rt / 1000, ".", (rt % 1000) / 10);
  if (err != cudaSuccess) return absl::StrCat("runtime ", runtime, ", driver: ", cudaGetErrorString(err));
  if (drv == 0) return absl::StrCat("runtime ", runtime, ", no driver");
  return absl::StrCat("runtime ", runtime, ", driver ", drv / 1000, ".", (drv % 1000) / 10);
}

namespace {


// --- element-wise and row ops -------------------------------------------------------------------

// "x[3,4]" for messages.
std::string ShapeOf(const char* name, const Tensor2D& t) {
  return absl::StrCat(name, "[", t.rows, ",", t.cols, "]");
}

absl::Status ShapeError(const char* op, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat("cuda backend: ", op, ": ", what));
}

struct Named {
  const char* name;
  DType dtype;
};

// The kernels' element type of an op whose tensors all share the first one's dtype: F32 or BF16.
// Unimplemented naming the op and the dtype for anything else (mixed dtypes included).
absl::StatusOr<kernels::ElemType> KernelType(const char* op, std::initializer_list<Named> tensors) {
  const Named& first = *tensors.begin();
  for (const Named& t : tensors) {
    if (t.dtype != first.dtype) {
      return absl::UnimplementedError(absl::StrCat("cuda backend: ", op, ": ", t.name, " dtype ",
                                                   DTypeName(t.dtype), " with ", first.name, " dtype ",
                                                   DTypeName(first.dtype), " not implemented (one dtype per op)"));
    }
  }
  if (first.dtype == DType::kF32) return kernels::ElemType::kF32;
  if (first.dtype == DType::kBF16) return kernels::ElemType::kBF16;
  return absl::UnimplementedError(absl::StrCat("cuda backend: ", op, ": ", first.name, " dtype ",
                                               DTypeName(first.dtype), " not implemented (F32, BF16)"));
}

// The launcher's arguments of out = RmsNorm(x) * weight (no residual), shapes already checked.
kernels::RmsNormArgs NormArgs(kernels::ElemType et, const Tensor2D& x, const Tensor2D& weight, float eps,
                              const Tensor2D& out) {
  kernels::RmsNormArgs a;
  a.dtype = et;
  a.rows = x.rows;
  a.cols = x.cols;
  a.x = x.data;
  a.x_ld = x.stride();
  a.weight = weight.data;
  a.out = out.data;
  a.out_ld = out.stride();
  a.eps = eps;
  return a;
}

// A dtype-free row copy of `cols` elements between two views.
kernels::RowCopy Rows(const Tensor2D& src, const Tensor2D& dst, int64_t cols) {
  const int64_t esz = static_cast<int64_t>(DTypeSize(src.dtype));
  return {src.data, src.stride() * esz, dst.data, dst.stride() * esz, cols * esz};
}

}  // namespace

namespace cuda_internal {

absl::Status CudaBackend::Embedding(const Tensor2D& table, const int32_t* ids, Tensor2D out) {
  if (table.dtype != out.dtype) {
    return absl::UnimplementedError(absl::StrCat("cuda backend: Embedding: output dtype ", DTypeName(out.dtype),
                                                 " with table dtype ", DTypeName(table.dtype), " not implemented"));
  }
  if (table.cols != out.cols) {
    return ShapeError("Embedding", absl::StrCat(ShapeOf("table", table), " vs ", ShapeOf("out", out)));
  }
  return CudaError(kernels::LaunchGatherRows(Rows(table, out, out.cols), ids, out.rows, stream_), "Embedding");
}

absl::Status CudaBackend::TakeDrawnTokens(int32_t* ids, const int32_t* drawn, const int32_t* pairs, int32_t n,
                                          int32_t vocab) {
  return CudaError(kernels::LaunchTakeDrawnTokens(ids, drawn, pairs, n, vocab, stream_), "TakeDrawnTokens");
}

absl::Status CudaBackend::GatherRows(const Tensor2D& x, const int32_t* rows, Tensor2D out) {
  if (x.dtype != out.dtype) {
    return absl::UnimplementedError(absl::StrCat("cuda backend: GatherRows: output dtype ", DTypeName(out.dtype),
                                                 " with input dtype ", DTypeName(x.dtype), " not implemented"));
  }
  if (x.cols != out.cols) {
    return ShapeError("GatherRows", absl::StrCat(ShapeOf("x", x), " vs ", ShapeOf("out", out)));
  }
  return CudaError(kernels::LaunchGatherRows(Rows(x, out, out.cols), rows, out.rows, stream_), "GatherRows");
}

absl::Status CudaBackend::RmsNorm(const Tensor2D& x, const Tensor2D& weight, float eps, Tensor2D out) {
  ASSIGN_OR_RETURN(const kernels::ElemType et,
                   KernelType("RmsNorm", {{"input", x.dtype}, {"weight", weight.dtype}, {"output", out.dtype}}));
  if (weight.cols != x.cols || out.rows != x.rows || out.cols != x.cols) {
    return ShapeError("RmsNorm", absl::StrCat(ShapeOf("x", x), ", ", ShapeOf("weight", weight), ", ",
                                              ShapeOf("out", out)));
  }
  return CudaError(kernels::LaunchRmsNorm(NormArgs(et, x, weight, eps, out), stream_), "RmsNorm");
}

absl::Status CudaBackend::FusedAddRmsNorm(Tensor2D residual, const Tensor2D& x, const Tensor2D& weight,
                                          float eps, Tensor2D out) {
  ASSIGN_OR_RETURN(const kernels::ElemType et,
                   KernelType("FusedAddRmsNorm", {{"residual", residual.dtype}, {"input", x.dtype},
                                                  {"weight", weight.dtype}, {"output", out.dtype}}));
  if (x.rows != residual.rows || x.cols != residual.cols || out.rows != residual.rows ||
      out.cols != residual.cols || weight.cols != residual.cols) {
    return ShapeError("FusedAddRmsNorm",
                      absl::StrCat(ShapeOf("residual", residual), ", ", ShapeOf("x", x), ", ",
                                   ShapeOf("weight", weight), ", ", ShapeOf("out", out)));
  }
  kernels::RmsNormArgs a = NormArgs(et, x, weight, eps, out);  // x's shape is residual's (checked)
  a.residual = residual.data;
  a.residual_ld = residual.stride();
  return CudaError(kernels::LaunchRmsNorm(a, stream_), "FusedAddRmsNorm");
}

absl::Status CudaBackend::AddInPlace(Tensor2D acc, const Tensor2D& x) {
  ASSIGN_OR_RETURN(const kernels::ElemType et,
                   KernelType("AddInPlace", {{"accumulator", acc.dtype}, {"input", x.dtype}}));
  if (acc.rows != x.rows || acc.cols != x.cols) {
    return ShapeError("AddInPlace", absl::StrCat(ShapeOf("acc", acc), " vs ", ShapeOf("x", x)));
  }
  return CudaError(kernels::LaunchAddInPlace(et, acc.data, acc.stride(), x.data, x.stride(), acc.rows,
                                             acc.cols, stream_),
                   "AddInPlace");
}

absl::Status CudaBackend::SumSquaresPartials(const Tensor2D& x, float* out) {
  if (x.dtype != DType::kBF16) {
    return absl::UnimplementedError(absl::StrCat("cuda backend: SumSquaresPartials: input dtype ", DTypeName(x.dtype),
                                                 " not implemented (BF16)"));
  }
  if (x.cols <= 0 || out == nullptr) return ShapeError("SumSquaresPartials", ShapeOf("x", x) + ", out set");
  return CudaError(kernels::LaunchSumSquaresPartials(x.rows, x.cols, x.data, x.stride(), out, stream_),
                   "SumSquaresPartials");
}

absl::Status CudaBackend::ScaleColumns(Tensor2D w, const Tensor2D& g) {
  ASSIGN_OR_RETURN(const kernels::ElemType et, KernelType("ScaleColumns", {{"w", w.dtype}, {"g", g.dtype}}));
  if (g.rows != 1 || g.cols != w.cols || g.stride() < g.cols) {
    return ShapeError("ScaleColumns", absl::StrCat(ShapeOf("w", w), " vs ", ShapeOf("g", g)));
  }
  return CudaError(kernels::LaunchScaleColumns(et, w.data, w.stride(), g.data, w.rows, w.cols, stream_),
                   "ScaleColumns");
}

absl::Status CudaBackend::SiluMul(const Tensor2D& gate_up, Tensor2D out) {
  ASSIGN_OR_RETURN(const kernels::ElemType et,
                   KernelType("SiluMul", {{"input", gate_up.dtype}, {"output", out.dtype}}));
  if (gate_up.rows != out.rows || gate_up.cols != 2 * out.cols) {
    return ShapeError("SiluMul", absl::StrCat(ShapeOf("gate_up", gate_up), " vs ", ShapeOf("out", out)));
  }
  return CudaError(kernels::LaunchSiluMul(et, gate_up.data, gate_up.stride(), out.data, out.stride(),
                                          out.rows, out.cols, stream_),
                   "SiluMul");
}

// head_dim even and positive, heads * head_dim == the view's columns.
absl::Status CheckHeads(const char* op, const char* name, const Tensor2D& t, int32_t heads, int32_t head_dim) {
  if (head_dim <= 0 || head_dim % 2 != 0 || heads < 0 ||
      static_cast<int64_t>(heads) * head_dim != t.cols) {
    return ShapeError(op, absl::StrCat(ShapeOf(name, t), " is not ", heads, " heads of head_dim ", head_dim,
                                       " (even, positive)"));
  }
  return absl::OkStatus();
}

absl::Status CudaBackend::Rope(const RopeParams& p) {
  ASSIGN_OR_RETURN(const kernels::ElemType et, KernelType("Rope", {{"input", p.x.dtype}}));
  RETURN_IF_ERROR(CheckHeads("Rope", "x", p.x, p.num_heads, p.head_dim));
  kernels::RopeArgs a;
  a.dtype = et;
  a.num_tokens = p.x.rows;
  a.head_dim = p.head_dim;
  a.positions = p.positions;
  a.inv_freq = p.inv_freq;
  a.q = p.x.data;
  a.q_ld = p.x.stride();
  a.num_heads = p.num_heads;
  return CudaError(kernels::LaunchRope(a, stream_), "Rope");
}

absl::Status CheckQuantizedCache(const char* op, const KvLayer& c) {
  if (c.num_kv_heads <= 0 || c.block_size <= 0 || c.k_width % c.num_kv_heads != 0 ||
      c.v_width % c.num_kv_heads != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "cuda backend: ", op, ": a quantized cache needs KV heads dividing its widths and a block size: ",
        c.num_kv_heads, " heads, widths ", c.k_width, "/", c.v_width, ", block_size ", c.block_size));
  }
  return absl::OkStatus();
}

namespace {

// The quantizing KV write (kernels/rope.cu; rotate_k false: k is stored as given): rows of
// `et` quantized per KV head into the cache's codes and scales.
kernels::RopeArgs QuantizedWriteArgs(kernels::ElemType et, const KvLayer& cache, const Tensor2D& k,
                                     const Tensor2D& v, const int32_t* slot_mapping) {
  kernels::RopeArgs a;
  a.dtype = et;
  a.num_tokens = k.rows;
  a.k = k.data;
  a.k_ld = k.stride();
  a.num_kv_heads = cache.num_kv_heads;
  a.slot_mapping = slot_mapping;
  a.v = v.data;
  a.v_ld = v.stride();
  a.k_cache = cache.k;
  a.v_cache = cache.v;
  a.v_width = cache.v_width;
  a.k_width = cache.k_width;
  a.kv_quant = cache.quant;
  a.block_size = cache.block_size;
  return a;
}

}  // namespace

absl::Status CudaBackend::WriteKv(const KvLayer& cache, const Tensor2D& k, const Tensor2D& v,
                                  const int32_t* slot_mapping) {
  if (cache.quant != kernels::KvQuant::kNone) {
    ASSIGN_OR_RETURN(const kernels::ElemType et, KernelType("WriteKv", {{"key", k.dtype}, {"value", v.dtype}}));
    RETURN_IF_ERROR(CheckQuantizedCache("WriteKv", cache));
    if (k.cols != cache.k_width || v.cols != cache.v_width || k.rows != v.rows) {
      return ShapeError("WriteKv", absl::StrCat(ShapeOf("k", k), ", ", ShapeOf("v", v), ", cache widths ",
                                                cache.k_width, "/", cache.v_width));
    }
    kernels::RopeArgs a = QuantizedWriteArgs(et, cache, k, v, slot_mapping);
    a.rotate_k = false;
    return CudaError(kernels::LaunchRope(a, stream_), "WriteKv");
  }
  RETURN_IF_ERROR(
      KernelType("WriteKv", {{"cache", cache.dtype}, {"key", k.dtype}, {"value", v.dtype}}).status());
  if (k.cols != cache.k_width || v.cols != cache.v_width || k.rows != v.rows) {
    return ShapeError("WriteKv", absl::StrCat(ShapeOf("k", k), ", ", ShapeOf("v", v), ", cache widths ",
                                              cache.k_width, "/", cache.v_width));
  }
  const int64_t esz = static_cast<int64_t>(DTypeSize(cache.dtype));
  const kernels::RowCopy kr{k.data, k.stride() * esz, cache.k, cache.k_width * esz, cache.k_width * esz};
  const kernels::RowCopy vr{v.data, v.stride() * esz, cache.v, cache.v_width * esz, cache.v_width * esz};
  return CudaError(kernels::LaunchScatterRows(kr, vr, slot_mapping, k.rows, stream_), "WriteKv");
}

absl::Status CudaBackend::RopeKvWrite(const RopeKvWriteParams& p) {
  const bool quant = p.cache.quant != kernels::KvQuant::kNone;
  // A quantized cache stores U8 codes: only the activations share one dtype then.
  ASSIGN_OR_RETURN(const kernels::ElemType et,
                   quant ? KernelType("RopeKvWrite", {{"query", p.q.dtype}, {"key", p.k.dtype}, {"value", p.v.dtype}})
                         : KernelType("RopeKvWrite", {{"query", p.q.dtype}, {"key", p.k.dtype}, {"value", p.v.dtype},
                                                      {"cache", p.cache.dtype}}));
  RETURN_IF_ERROR(CheckHeads("RopeKvWrite", "q", p.q, p.num_heads, p.head_dim));
  if (!p.rotate_k) {  // LoRC latents: rotate q only, store the key / value latents as given
    if (p.k.rows != p.q.rows) {
      return ShapeError("RopeKvWrite", absl::StrCat(ShapeOf("q", p.q), ", ", ShapeOf("k", p.k)));
    }
    RopeParams r{p.q, p.num_heads, p.head_dim, p.positions, p.inv_freq};
    RETURN_IF_ERROR(Rope(r));
    return WriteKv(p.cache, p.k, p.v, p.slot_mapping);
  }
  RETURN_IF_ERROR(CheckHeads("RopeKvWrite", "k", p.k, p.num_kv_heads, p.head_dim));
  if (p.k.cols != p.cache.k_width || p.v.cols != p.cache.v_width || p.k.rows != p.q.rows ||
      p.v.rows != p.q.rows) {
    return ShapeError("RopeKvWrite", absl::StrCat(ShapeOf("q", p.q), ", ", ShapeOf("k", p.k), ", ",
                                                  ShapeOf("v", p.v), ", cache widths ", p.cache.k_width, "/",
                                                  p.cache.v_width));
  }
  if (quant) {
    RETURN_IF_ERROR(CheckQuantizedCache("RopeKvWrite", p.cache));
    if (p.cache.num_kv_heads != p.num_kv_heads) {
      return ShapeError("RopeKvWrite", absl::StrCat("cache of ", p.cache.num_kv_heads, " KV heads, keys of ",
                                                    p.num_kv_heads));
    }
  }
  kernels::RopeArgs a = QuantizedWriteArgs(et, p.cache, p.k, p.v, p.slot_mapping);
  a.kv_quant = p.cache.quant;  // kNone: the element write
  a.num_kv_heads = p.num_kv_heads;
  a.head_dim = p.head_dim;
  a.positions = p.positions;
  a.inv_freq = p.inv_freq;
  a.q = p.q.data;
  a.q_ld = p.q.stride();
  a.num_heads = p.num_heads;
  return CudaError(kernels::LaunchRope(a, stream_), "RopeKvWrite");
}

absl::Status CudaBackend::FillWeights(const WeightFillParams& p) {
  ASSIGN_OR_RETURN(const kernels::ElemType et, KernelType("FillWeights", {{"output", p.out.dtype}}));
  RETURN_IF_ERROR(ValidateWeightFill(name(), p));
  kernels::WeightFillArgs a;
  a.dtype = et;
  a.out = p.out.data;
  a.ld = p.out.stride();
  a.rows = p.out.rows;
  a.cols = p.out.cols;
  a.constant = p.constant;
  a.value = p.value;
  a.key = p.key;
  a.row0 = p.row0;
  a.col0 = p.col0;
  a.full_cols = p.full_cols;
  a.scale = p.scale;
  return CudaError(kernels::LaunchWeightFill(a, stream_), "FillWeights");
}

}  // namespace cuda_internal

using cuda_internal::CudaBackend;
using cuda_internal::CudaError;

absl::StatusOr<std::unique_ptr<Backend>> CreatePartialCudaBackend(const BackendOptions& options) {
  ASSIGN_OR_RETURN(std::vector<CudaDeviceInfo> devices, ListCudaDevices());
  if (options.device < 0 || options.device >= static_cast<int>(devices.size())) {
    return absl::FailedPreconditionError(absl::StrCat("CUDA device ", options.device, " not present (",
                                                      devices.size(), " devices)"));
  }
  RETURN_IF_ERROR(CudaError(cudaSetDevice(options.device), "set device"));
  cudaStream_t stream = nullptr;
  RETURN_IF_ERROR(CudaError(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "create stream"));
  const CudaDeviceInfo& d = devices[options.device];
  auto backend = std::unique_ptr<CudaBackend>(new CudaBackend(
      options.device,
      absl::StrCat(d.name, " (device ", d.ordinal, ", sm_", d.compute_major, d.compute_minor, ", ",
                   d.multiprocessors, " SMs, ", d.memory_bytes >> 20, " MiB), CUDA ", CudaVersionString()),
      stream, options.fused_norm_rows));
  RETURN_IF_ERROR(backend->ReserveSampler());
  return std::unique_ptr<Backend>(std::move(backend));
}

absl::StatusOr<std::unique_ptr<Backend>> CreateCudaBackend(const BackendOptions& options) {
  // Every op of the contract has its kernel now: the partial backend is the whole backend.
  return CreatePartialCudaBackend(options);
}

#else  // !LORC_HAVE_CUDA

bool CudaCompiledIn() { return false; }
absl::StatusOr<std::vector<CudaDeviceInfo>> ListCudaDevices() {
  return absl::UnimplementedError("built without CUDA");
}
std::string CudaVersionString() { return "not compiled in"; }
absl::StatusOr<std::unique_ptr<Backend>> CreatePartialCudaBackend(const BackendOptions&) {
  return absl::UnimplementedError("the CUDA backend is not compiled into this binary (built without nvcc)");
}
absl::StatusOr<std::unique_ptr<Backend>> CreateCudaBackend(const BackendOptions&) {
  return absl::UnimplementedError("the CUDA backend is not compiled into this binary (built without nvcc)");
}
absl::StatusOr<CudaSampleCounters> GetCudaSampleCounters(const Backend&) {
  return absl::UnimplementedError("the CUDA backend is not compiled into this binary (built without nvcc)");
}

#endif

}  // namespace lorc
