#include "backend/cublaslt_loader.h"

#ifdef LORC_HAVE_CUDA

#include <cuda_runtime_api.h>
#include <dlfcn.h>

#include <filesystem>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace lorc::cuda_internal {
namespace {

const std::string kSoname = absl::StrCat("libcublasLt.so.", CUBLAS_VER_MAJOR);

// The directory of the loaded shared libcudart (empty when unknown, or when cudart is linked
// statically and dladdr names the executable): cuBLASLt sits beside it in a CUDA toolkit, which
// need not be on the dynamic linker's path when the executable found cudart through its runpath.
std::string CudartDir() {
  Dl_info info{};
  if (dladdr(reinterpret_cast<const void*>(&cudaGetDeviceCount), &info) == 0 ||
      info.dli_fname == nullptr) {
    return "";
  }
  const std::filesystem::path lib(info.dli_fname);
  if (!lib.is_absolute() || !lib.filename().string().starts_with("libcudart")) return "";
  return lib.parent_path().string();
}

template <typename Fn>
absl::Status Bind(void* lib, const char* name, Fn* out) {
  dlerror();
  void* sym = dlsym(lib, name);
  if (sym == nullptr) {
    const char* why = dlerror();
    return absl::FailedPreconditionError(absl::StrCat("cuda backend: ", kSoname, " has no symbol ",
                                                      name, why != nullptr ? ": " : "",
                                                      why != nullptr ? why : ""));
  }
  *out = reinterpret_cast<Fn>(sym);
  return absl::OkStatus();
}

absl::StatusOr<CublasLtApi> Load() {
  void* lib = nullptr;
  std::string tried;
  if (const std::string dir = CudartDir(); !dir.empty()) {
    const std::string path = dir + "/" + kSoname;
    lib = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (lib == nullptr) tried = absl::StrCat(path, ": ", dlerror(), "; ");
  }
  if (lib == nullptr) lib = dlopen(kSoname.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (lib == nullptr) {
    const char* why = dlerror();
    return absl::FailedPreconditionError(absl::StrCat(
        "cuda backend: cannot load cuBLASLt (", tried, kSoname, ": ", why != nullptr ? why : "?",
        "); install the CUDA ", CUBLAS_VER_MAJOR, " cuBLAS libraries or add their directory to "
        "LD_LIBRARY_PATH"));
  }
  CublasLtApi api{};
  absl::Status s = Bind(lib, "cublasLtCreate", &api.Create);
  if (s.ok()) s = Bind(lib, "cublasLtDestroy", &api.Destroy);
  if (s.ok()) s = Bind(lib, "cublasLtGetStatusString", &api.GetStatusString);
  if (s.ok()) s = Bind(lib, "cublasLtMatmul", &api.Matmul);
  if (s.ok()) s = Bind(lib, "cublasLtMatmulAlgoGetHeuristic", &api.MatmulAlgoGetHeuristic);
  if (s.ok()) s = Bind(lib, "cublasLtMatmulDescInit_internal", &api.MatmulDescInitInternal);
  if (s.ok()) s = Bind(lib, "cublasLtMatmulDescSetAttribute", &api.MatmulDescSetAttribute);
  if (s.ok()) s = Bind(lib, "cublasLtMatrixLayoutInit_internal", &api.MatrixLayoutInitInternal);
  if (s.ok()) {
    s = Bind(lib, "cublasLtMatmulPreferenceInit_internal", &api.MatmulPreferenceInitInternal);
  }
  if (s.ok()) {
    s = Bind(lib, "cublasLtMatmulPreferenceSetAttribute", &api.MatmulPreferenceSetAttribute);
  }
  if (!s.ok()) {
    dlclose(lib);
    return s;
  }
  return api;  // `lib` stays loaded for the process's life
}

}  // namespace

absl::StatusOr<const CublasLtApi*> LoadCublasLt() {
  static const absl::StatusOr<CublasLtApi>* const loaded = new absl::StatusOr<CublasLtApi>(Load());
  if (!loaded->ok()) return loaded->status();
  return &**loaded;
}

}  // namespace lorc::cuda_internal

#endif  // LORC_HAVE_CUDA
