// Writing a .safetensors file (the format model/safetensors.h reads): an 8-byte little-endian
// header length, a JSON header (dtype, shape, data_offsets per tensor, `__metadata__`), padded
// with spaces to 8 bytes, then the tensors' bytes in header order. For tools that write model
// directories (`lorcserve compress`) and test fixtures; the whole file is written at once.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "common/dtype.h"

namespace lorc {

// One file's tensors, held until Write: bytes owned by the writer (AddBytes) or a view of the
// caller's memory (AddView, e.g. a source checkpoint's mapping, valid until Write returns).
class SafetensorsWriter {
 public:
  explicit SafetensorsWriter(std::map<std::string, std::string> metadata = {{"format", "pt"}})
      : metadata_(std::move(metadata)) {}
  // InvalidArgument naming the tensor for a duplicate name or nbytes != numel * DTypeSize(dtype).
  absl::Status AddView(const std::string& name, DType dtype, std::vector<int64_t> shape,
                       const uint8_t* data, size_t nbytes);
  absl::Status AddBytes(const std::string& name, DType dtype, std::vector<int64_t> shape,
                        std::vector<uint8_t> bytes);
  // Writes `path` (replacing it), tensors in name order. Internal naming the path on I/O errors.
  absl::Status Write(const std::string& path) const;

 private:
  struct Entry {
    DType dtype;
    std::vector<int64_t> shape;
    const uint8_t* view = nullptr;
    size_t nbytes = 0;
    std::vector<uint8_t> owned;
  };
  absl::Status Add(const std::string& name, Entry e);
  std::map<std::string, std::string> metadata_;
  std::map<std::string, Entry> entries_;
};

struct TensorToWrite {
  std::string name;
  DType dtype = DType::kF32;      // F32, BF16 or F16
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;     // numel * DTypeSize(dtype), row-major
};

// fp32 values encoded as `dtype`: F32 as is, BF16 and F16 rounded to nearest even.
// InvalidArgument for another dtype.
absl::Status EncodeF32(absl::Span<const float> values, DType dtype, std::vector<uint8_t>* out);

// Writes `tensors` to `path` through SafetensorsWriter (same errors, naming the path).
absl::Status WriteSafetensors(const std::string& path, absl::Span<const TensorToWrite> tensors,
                              const std::map<std::string, std::string>& metadata = {{"format", "pt"}});

// Lower-case hex SHA-256 of `data` (OpenSSL), e.g. lorc.json's source_model.config_sha256.
std::string Sha256Hex(const std::string& data);

}  // namespace lorc
