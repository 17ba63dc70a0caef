// The CUDA backend entry points. Without CUDA in the build, creating it reports Unimplemented.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "backend/backend.h"

namespace lorc {

struct CudaDeviceInfo {
  int ordinal = 0;
  std::string name;
  int64_t memory_bytes = 0;
  int compute_major = 0, compute_minor = 0;
  int multiprocessors = 0;
};

// True when this binary was built with CUDA.
bool CudaCompiledIn();
// Devices the CUDA runtime sees; Unimplemented without CUDA in the build, Unavailable with the
// runtime's message when there is no usable driver or device.
absl::StatusOr<std::vector<CudaDeviceInfo>> ListCudaDevices();
// "runtime 13.0, driver 13.0" or why it is unknown.
std::string CudaVersionString();

// What the CUDA backend runs under a token-level KV policy (kvpolicy/README.md "On the GPU"):
// CORM and MiKV over a full-KV cache or a LoRC latent model (`latent`), bf16 or `--kv-cache-dtype
// fp8|int8|int4`, up to 8 query heads per KV head (`query_group`, the policy kernels' limit);
// Unimplemented naming the flags otherwise (larger groups).
// CudaBackend::CheckKvPolicy at load; host logic, defined with or without CUDA in the build.
absl::Status CudaKvPolicySupport(const kvpolicy::KvPolicyConfig& config, bool latent, int32_t query_group);

// The CUDA backend (serving computes in BF16: compute_dtype()). Unimplemented without CUDA in the
// build, Unavailable without a driver, FailedPrecondition for a device ordinal that is not present.
absl::StatusOr<std::unique_ptr<Backend>> CreateCudaBackend(const BackendOptions& options);

// The same backend under its older name (its parity tests use it): a non-blocking stream on
// the device (made current on the calling thread), events, graph capture/replay, cudaMalloc /
// cudaMallocHost memory, async copies with backend.h's lifetime rules, GetMemoryInfo,
// CopyBlocks, and the kernels/ ops Embedding, GatherRows, RmsNorm, FusedAddRmsNorm, AddInPlace,
// SiluMul, Rope, WriteKv and RopeKvWrite (F32 and BF16, one dtype per op; others Unimplemented
// naming the op and dtype; the KV cache may also be quantized: fp8 / int8 / int4 codes written
// by WriteKv / RopeKvWrite), Matmul (cuBLASLt: F32, BF16 or F16 x and w, out the same or F32),
// paged and latent attention (BF16, cache BF16 or quantized; head_dim 64/128) and Sample. Errors
// as CreateCudaBackend.
absl::StatusOr<std::unique_ptr<Backend>> CreatePartialCudaBackend(const BackendOptions& options);

// Rows by the path CudaBackend::Sample took, counted since the backend was made (kernels/sampling.cuh
// step 6; tests and benchmarks read them): sampled rows sorted whole (a second pass's included),
// top-k rows selected, prefix rows selected, prefix rows sampled again (sorted whole, also counted
// in sorted_whole) and calls that turned prefix rows off for a while (the backoff).
struct CudaSampleCounters {
  int64_t sorted_whole = 0;
  int64_t top_k_selected = 0;
  int64_t prefix = 0;
  int64_t redone = 0;
  int64_t backoffs = 0;
};
// The counters of a backend made by CreateCudaBackend / CreatePartialCudaBackend; InvalidArgument
// for another backend, Unimplemented without CUDA in the build.
absl::StatusOr<CudaSampleCounters> GetCudaSampleCounters(const Backend& backend);

}  // namespace lorc
