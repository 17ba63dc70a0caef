// backend/cublaslt_loader: cuBLASLt is not loaded at process start (linking it costs every process
// 0.45 s and ~200 MB; cublaslt_loader.h) and loads, with every entry point the CUDA Matmul calls,
// at first use. Needs the CUDA toolkit's libraries (present wherever the CUDA code is built), not a
// device: nothing here calls into a GPU.
#include "backend/cublaslt_loader.h"

#include <fstream>
#include <string>
#include <string_view>

#include "gtest/gtest.h"

namespace lorc::cuda_internal {
namespace {

bool Mapped(std::string_view library) {
  std::ifstream maps("/proc/self/maps");
  std::string line;
  while (std::getline(maps, line)) {
    if (line.find(library) != std::string::npos) return true;
  }
  return false;
}

// One test: a single process must see the library unmapped before the first load.
TEST(CudaCublasLtLoaderTest, LoadedAtFirstUseNotAtStartWithEveryEntryPoint) {
  ASSERT_TRUE(std::ifstream("/proc/self/maps").good());
  EXPECT_FALSE(Mapped("libcublasLt.so")) << "cuBLASLt is linked again: every process pays its start-up";

  absl::StatusOr<const CublasLtApi*> lt = LoadCublasLt();
  ASSERT_TRUE(lt.ok()) << lt.status();
  EXPECT_TRUE(Mapped("libcublasLt.so"));
  const CublasLtApi& api = **lt;
  for (const void* fn : {reinterpret_cast<const void*>(api.Create),
                         reinterpret_cast<const void*>(api.Destroy),
                         reinterpret_cast<const void*>(api.GetStatusString),
                         reinterpret_cast<const void*>(api.Matmul),
                         reinterpret_cast<const void*>(api.MatmulAlgoGetHeuristic),
                         reinterpret_cast<const void*>(api.MatmulDescInitInternal),
                         reinterpret_cast<const void*>(api.MatmulDescSetAttribute),
                         reinterpret_cast<const void*>(api.MatrixLayoutInitInternal),
                         reinterpret_cast<const void*>(api.MatmulPreferenceInitInternal),
                         reinterpret_cast<const void*>(api.MatmulPreferenceSetAttribute)}) {
    EXPECT_NE(fn, nullptr);
  }
  // A host-only entry point answers (no device needed).
  EXPECT_STREQ(api.GetStatusString(CUBLAS_STATUS_SUCCESS), "success");
  EXPECT_STREQ(api.GetStatusString(CUBLAS_STATUS_NOT_SUPPORTED),
               "the requested functionality is not supported");
  // A descriptor initialises through the *_internal entry (host memory only).
  cublasLtMatmulPreferenceOpaque_t storage;
  EXPECT_EQ(api.MatmulPreferenceInit(reinterpret_cast<cublasLtMatmulPreference_t>(&storage)),
            CUBLAS_STATUS_SUCCESS);

  // Loaded once: the same table on every call.
  absl::StatusOr<const CublasLtApi*> again = LoadCublasLt();
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(*again, *lt);
}

}  // namespace
}  // namespace lorc::cuda_internal
