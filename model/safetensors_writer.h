// Writing a .safetensors file (the format model/safetensors.h reads): an 8-byte little-endian
// header length, a JSON header (dtype, shape, data_offsets per tensor, optional __metadata__),
// padded with spaces to 8 bytes, then the tensors' bytes in the order given. For test fixtures
// and tools that write model directories (LoRC factors); the whole file is written at once.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "common/dtype.h"

namespace lorc {

struct TensorToWrite {
  std::string name;
  DType dtype = DType::kF32;      // F32, BF16 or F16
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;     // numel * DTypeSize(dtype), row-major
};

// fp32 values encoded as `dtype`: F32 as is, BF16 and F16 rounded to nearest even.
// InvalidArgument for another dtype.
absl::Status EncodeF32(absl::Span<const float> values, DType dtype, std::vector<uint8_t>* out);

// Writes `tensors` to `path` (replacing it). InvalidArgument for a duplicate name or a byte count
// that does not match shape and dtype; Internal when the file cannot be written (naming it).
absl::Status WriteSafetensors(const std::string& path, absl::Span<const TensorToWrite> tensors,
                              const std::map<std::string, std::string>& metadata = {{"format", "pt"}});

}  // namespace lorc
