// Read-only access to safetensors checkpoints: one `model.safetensors` file or a set of shards
// listed in `model.safetensors.index.json`. Files are memory-mapped; tensors are converted to
// fp32 on read, optionally only a slice of them (tensor-parallel shards read only their part).
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "common/dtype.h"

namespace lorc {

struct TensorInfo {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  const uint8_t* data = nullptr;  // into the mapped file
  size_t nbytes = 0;
  std::string file;               // path of the file holding it (for error messages)

  int64_t numel() const;
};

// One mapped .safetensors file. Validates the header fully on Open (JSON, dtypes, shapes,
// offsets inside the data section, no overlaps, sizes = numel * dtype size).
class SafetensorsFile {
 public:
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Open(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  const std::map<std::string, TensorInfo>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

 private:
  SafetensorsFile() = default;
  std::string path_;
  void* map_ = nullptr;
  size_t map_size_ = 0;
  std::map<std::string, TensorInfo> tensors_;
  std::map<std::string, std::string> metadata_;
};

// A half-open range [begin, end) along one dimension of a 2-D (or 1-D) tensor.
struct TensorSlice {
  int dim = 0;          // 0: rows, 1: columns
  int64_t begin = 0;
  int64_t end = -1;     // -1: to the end
};

// All tensors of a model directory.
class CheckpointReader {
 public:
  // DIR/model.safetensors, or the shards named by DIR/model.safetensors.index.json (every
  // tensor named in the index must be found in the shard the index names).
  static absl::StatusOr<std::unique_ptr<CheckpointReader>> Open(const std::string& model_dir);

  bool Has(const std::string& name) const;
  // NotFound naming the tensor and the directory when absent.
  absl::StatusOr<const TensorInfo*> Find(const std::string& name) const;
  std::vector<std::string> TensorNames() const;
  // Whether `name` can be read as fp32 with `expected_shape`: present, that shape, a float dtype
  // (F32, F16, BF16). InvalidArgument naming file, tensor and both shapes (or the dtype);
  // NotFound as Find. Reads only the header.
  absl::Status CheckFloatTensor(const std::string& name, absl::Span<const int64_t> expected_shape) const;

  // Reads `name` as fp32 into `out`. `expected_shape` must equal the tensor's shape
  // (InvalidArgument naming file, tensor, both shapes otherwise). With `slice`, only that part is
  // read and `out` has the slice's size; the result is row-major and contiguous.
  absl::Status ReadF32(const std::string& name, absl::Span<const int64_t> expected_shape,
                       absl::Span<float> out) const;
  absl::Status ReadF32Slice(const std::string& name, absl::Span<const int64_t> expected_shape,
                            const TensorSlice& slice, absl::Span<float> out) const;

 private:
  std::string dir_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, const TensorInfo*> index_;
};

}  // namespace lorc
