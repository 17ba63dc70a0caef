// A minimal safetensors writer for the compressor's output (one file). It lives in compress/ and
// not in model/ so that it cannot clash with a writer another change may add there; model/'s
// SafetensorsFile reads what it writes. Tensors are held until Write: either bytes owned here
// (new tensors, converted from fp64) or a view of the source's mapped data (copied tensors).
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "common/dtype.h"
#include "compress/linalg.h"

namespace lorc::compress {

class SafetensorsWriter {
 public:
  // A tensor whose bytes stay owned by the caller (e.g. the source checkpoint's mapping) until
  // Write returns. InvalidArgument for a duplicate name or nbytes != numel * dtype size.
  absl::Status AddView(const std::string& name, DType dtype, std::vector<int64_t> shape,
                       const uint8_t* data, size_t nbytes);
  // The fp64 matrix `m` written as `dtype` (F32, BF16 or F16; round to nearest even), shape
  // [m.rows, m.cols].
  absl::Status AddMatrix(const std::string& name, DType dtype, const MatD& m);
  // Writes the file: 8-byte little-endian header size, the JSON header (names sorted, padded with
  // spaces to a multiple of 8), the data in header order. Internal naming the path on I/O errors.
  absl::Status Write(const std::string& path) const;

 private:
  struct Entry {
    DType dtype;
    std::vector<int64_t> shape;
    const uint8_t* view = nullptr;
    size_t nbytes = 0;
    std::vector<uint8_t> owned;
  };
  std::map<std::string, Entry> entries_;
};

// Lower-case hex SHA-256 of `data` (lorc.json's source_model.config_sha256).
std::string Sha256Hex(const std::string& data);

}  // namespace lorc::compress
