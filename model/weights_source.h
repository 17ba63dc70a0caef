// Internal to model/: where the pieces of a rank's weight buffers come from. weights.cc plans
// the buffers (which rows / columns of which tensors, in which order) and allocates them;
// a WeightSource writes each piece in place on the device: weights_file.cc from a checkpoint,
// weights_random.cc through Backend::FillWeights.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "backend/backend.h"
#include "model/safetensors.h"
#include "model/weights.h"

namespace lorc::weights_internal {

// Rows [r0, r0 + nrows) x columns [c0, c0 + ncols) of the full tensor `name` whose shape is
// `shape` (1-D tensors: shape {n}, c0 = 0, ncols = 1).
struct Piece {
  std::string name;
  std::vector<int64_t> shape;
  int64_t r0 = 0;
  int64_t nrows = 0;
  int64_t c0 = 0;
  int64_t ncols = 1;

  int64_t numel() const { return nrows * ncols; }
  bool is_1d() const { return shape.size() == 1; }
};

class WeightSource {
 public:
  virtual ~WeightSource() = default;
  // Once, before the first Write, with every piece the loader will write (in order).
  virtual absl::Status Begin(absl::Span<const Piece> pieces) = 0;
  // Writes `piece` row-major and contiguous ([nrows, ncols]) in the backend's compute dtype at
  // the device address `dst` (enqueued on the backend's stream).
  virtual absl::Status Write(const Piece& piece, void* dst) = 0;
  // After the last Write.
  virtual absl::Status End() = 0;
};

// Reads the checkpoint: tensors already in the compute dtype are copied as bytes, others read
// as fp32 and converted on the host; one progress line per file when its last piece is written.
std::unique_ptr<WeightSource> NewFileSource(const CheckpointReader& reader, Backend& backend,
                                            const WeightsProgress& progress);
// Generates on the backend (FillWeights); one progress line at the end (after a Synchronize).
std::unique_ptr<WeightSource> NewRandomSource(uint64_t seed, Backend& backend,
                                              const WeightsProgress& progress);

// For progress lines: "4.98 GB" (decimal gigabytes, two decimals) and "3.14 s" (two decimals).
std::string Gigabytes(double bytes);
std::string Seconds(double seconds);

}  // namespace lorc::weights_internal
