// The CPU backend: fp32 compute (other dtypes: Unimplemented naming the op), GEMMs through OpenBLAS.
// reference implementation that every CUDA kernel's parity test compares against.
#pragma once

#include <memory>

#include "absl/status/statusor.h"
#include "backend/backend.h"

namespace lorc {

absl::StatusOr<std::unique_ptr<Backend>> CreateCpuBackend(const BackendOptions& options);

}  // namespace lorc
