// cuBLASLt, loaded at first use with dlopen instead of linked.
//
// Why: linking libcublasLt costs every process that links the backend (lorcserve's coordinator,
// CPU workers, `lorcserve --help`, every test executable) its static initialization at start,
// whether or not a GPU is ever used: 0.45 s of CPU and 207 MB of resident memory for an empty
// `int main` linked against libcublasLt.so.13 (CUDA 13, Debian 12 VM, 2026-12-01), against 0.01 s
// and 4 MB for one linked against cudart and NCCL only. Loaded here, only a CUDA backend's first
// Matmul state pays it.
//
// The table holds the entry points cuda_matmul.cc calls, typed from cublasLt.h itself (a mismatch
// does not compile). The header's inline *Init helpers call the exported *_internal functions with
// the opaque structures' sizes; the table does the same.
//
// Threads: LoadCublasLt is safe to call from any thread; the library is loaded once per process
// and never unloaded.
#pragma once

#ifdef LORC_HAVE_CUDA

#include <cublasLt.h>

#include "absl/status/statusor.h"

namespace lorc::cuda_internal {

struct CublasLtApi {
  decltype(&::cublasLtCreate) Create;
  decltype(&::cublasLtDestroy) Destroy;
  decltype(&::cublasLtGetStatusString) GetStatusString;
  decltype(&::cublasLtMatmul) Matmul;
  decltype(&::cublasLtMatmulAlgoGetHeuristic) MatmulAlgoGetHeuristic;
  decltype(&::cublasLtMatmulDescInit_internal) MatmulDescInitInternal;
  decltype(&::cublasLtMatmulDescSetAttribute) MatmulDescSetAttribute;
  decltype(&::cublasLtMatrixLayoutInit_internal) MatrixLayoutInitInternal;
  decltype(&::cublasLtMatmulPreferenceInit_internal) MatmulPreferenceInitInternal;
  decltype(&::cublasLtMatmulPreferenceSetAttribute) MatmulPreferenceSetAttribute;

  // cublasLt.h's inline initializers, through the table.
  cublasStatus_t MatmulDescInit(cublasLtMatmulDesc_t desc, cublasComputeType_t compute,
                                cudaDataType_t scale) const {
    return MatmulDescInitInternal(desc, sizeof(*desc), compute, scale);
  }
  cublasStatus_t MatrixLayoutInit(cublasLtMatrixLayout_t layout, cudaDataType type, uint64_t rows,
                                  uint64_t cols, int64_t ld) const {
    return MatrixLayoutInitInternal(layout, sizeof(*layout), type, rows, cols, ld);
  }
  cublasStatus_t MatmulPreferenceInit(cublasLtMatmulPreference_t pref) const {
    return MatmulPreferenceInitInternal(pref, sizeof(*pref));
  }
};

// The table, loading libcublasLt.so.<CUBLAS_VER_MAJOR> (the major version compiled against) on the
// first call: from the directory libcudart was loaded from, then the dynamic linker's search path
// (LD_LIBRARY_PATH, the executable's runpath, ld.so.cache). Errors (the same on every call):
// FailedPrecondition naming the library and dlerror()'s reason, or a missing symbol.
absl::StatusOr<const CublasLtApi*> LoadCublasLt();

}  // namespace lorc::cuda_internal

#endif  // LORC_HAVE_CUDA
