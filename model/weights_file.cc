// Weights read from a safetensors checkpoint, written piece by piece into the device buffers.
// Tensors stored in the backend's compute dtype (BF16 files on CUDA, F32 files on the CPU) go
// to the device as bytes; others are read as fp32 and converted on the host (BF16: rounded to
// nearest even, split over the cores).
#include <algorithm>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/parallel_for.h"
#include "common/status_macros.h"
#include "model/weights_source.h"

namespace lorc::weights_internal {
namespace {

class FileSource final : public WeightSource {
 public:
  FileSource(const CheckpointReader& r, Backend& b, const WeightsProgress& progress)
      : reader_(r), b_(b), dtype_(b.compute_dtype()), progress_(progress) {}

  // Checks every piece's tensor (shape as config.json implies, a float dtype) before anything is
  // allocated: a config whose vocab_size says 10^6 fails on the embedding's header, not after
  // 2 GB of buffers (found by a tester). Counts the pieces each file serves, so Write knows when
  // a file is finished; files are numbered by their place among the checkpoint's files sorted by
  // name.
  //
  // A checkpoint with LoRC up-projections (`lorcserve compress` output) that nothing reads is a
  // compressed directory without its lorc.json: at full rank its k_proj / v_proj / o_proj shapes
  // equal the original's, so it loaded and generated garbage (a tester). Refused.
  absl::Status Begin(absl::Span<const Piece> pieces) override {
    absl::flat_hash_set<std::string> planned;
    for (const Piece& p : pieces) planned.insert(p.name);
    for (const std::string& name : reader_.TensorNames()) {  // first: the shapes would differ too
      if (!planned.contains(name) && absl::EndsWith(name, ".self_attn.k_up_proj.weight")) {
        return absl::InvalidArgumentError(absl::StrCat(
            "weights: the checkpoint holds LoRC factors (", name,
            ") but the model directory has no lorc.json, which says how to read them: its "
            "k_proj / v_proj / o_proj are compressed (restore lorc.json from the `lorcserve "
            "compress` output, or load the uncompressed model)"));
      }
    }
    for (const Piece& p : pieces) RETURN_IF_ERROR(reader_.CheckFloatTensor(p.name, p.shape));
    for (const std::string& name : reader_.TensorNames()) {
      ASSIGN_OR_RETURN(const TensorInfo* t, reader_.Find(name));
      files_.emplace(t->file, FileProgress{});
    }
    int i = 0;
    for (auto& [path, f] : files_) f.number = ++i;
    for (const Piece& p : pieces) {
      ASSIGN_OR_RETURN(const TensorInfo* t, reader_.Find(p.name));
      ++files_[t->file].pieces_left;
    }
    return absl::OkStatus();
  }

  absl::Status Write(const Piece& p, void* dst) override {
    const auto t0 = std::chrono::steady_clock::now();
    ASSIGN_OR_RETURN(const TensorInfo* t, reader_.Find(p.name));
    if (t->dtype == dtype_ && t->shape == p.shape) {
      RETURN_IF_ERROR(CopyBytes(*t, p, dst));
    } else {
      RETURN_IF_ERROR(Convert(p, dst));
    }
    FileProgress& f = files_[t->file];
    f.bytes += static_cast<double>(p.numel()) * DTypeSize(t->dtype);
    f.seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (--f.pieces_left == 0 && progress_) {
      progress_(absl::StrCat("weights: ", std::filesystem::path(t->file).filename().string(), " (",
                             f.number, "/", files_.size(), ", ", Gigabytes(f.bytes), ") read in ",
                             Seconds(f.seconds)));
    }
    return absl::OkStatus();
  }

  absl::Status End() override { return absl::OkStatus(); }

 private:
  struct FileProgress {
    int number = 0;          // 1-based, among the checkpoint's files sorted by path
    int64_t pieces_left = 0;
    double bytes = 0;        // of this rank's slices, as stored in the file
    double seconds = 0;      // reading, converting and enqueueing its copies
  };

  // The piece's bytes as stored: one copy from the mapped file when its rows are whole, else
  // its rows gathered into host staging first. CopyToDevice has consumed pageable sources
  // when it returns (backend.h), so the staging is reused at once.
  absl::Status CopyBytes(const TensorInfo& t, const Piece& p, void* dst) {
    const size_t esz = DTypeSize(t.dtype);
    const int64_t full_cols = p.is_1d() ? 1 : p.shape[1];
    const size_t bytes = static_cast<size_t>(p.numel()) * esz;
    if (p.c0 == 0 && p.ncols == full_cols) {
      return b_.CopyToDevice(dst, t.data + static_cast<size_t>(p.r0 * full_cols) * esz, bytes);
    }
    raw_.resize(bytes);
    const size_t row_bytes = static_cast<size_t>(p.ncols) * esz;
    for (int64_t r = 0; r < p.nrows; ++r) {
      std::memcpy(raw_.data() + r * row_bytes,
                  t.data + static_cast<size_t>((p.r0 + r) * full_cols + p.c0) * esz, row_bytes);
    }
    return b_.CopyToDevice(dst, raw_.data(), bytes);
  }

  // Read as fp32 (validating shape and dtype), then stored as dtype_.
  absl::Status Convert(const Piece& p, void* dst) {
    const size_t n = static_cast<size_t>(p.numel());
    f32_.resize(n);
    RETURN_IF_ERROR(ReadF32(p, absl::MakeSpan(f32_)));
    if (dtype_ == DType::kF32) return b_.CopyToDevice(dst, f32_.data(), n * sizeof(float));
    bf16_.resize(n);
    ParallelFor(static_cast<int64_t>(n), 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) bf16_[i] = F32ToBf16(f32_[i]);
    });
    return b_.CopyToDevice(dst, bf16_.data(), n * sizeof(uint16_t));
  }

  absl::Status ReadF32(const Piece& p, absl::Span<float> out) const {
    const int64_t full_cols = p.is_1d() ? 1 : p.shape[1];
    const bool full_rows = p.r0 == 0 && p.nrows == p.shape[0];
    const bool full_cols_sel = p.c0 == 0 && p.ncols == full_cols;
    if (full_rows && full_cols_sel) return reader_.ReadF32(p.name, p.shape, out);
    if (full_cols_sel) {
      return reader_.ReadF32Slice(p.name, p.shape, TensorSlice{0, p.r0, p.r0 + p.nrows}, out);
    }
    if (full_rows) {
      return reader_.ReadF32Slice(p.name, p.shape, TensorSlice{1, p.c0, p.c0 + p.ncols}, out);
    }
    return absl::InternalError("row and column slice at once");
  }

  const CheckpointReader& reader_;
  Backend& b_;
  DType dtype_;  // on the device: the backend's compute dtype
  const WeightsProgress& progress_;
  std::map<std::string, FileProgress> files_;  // by path
  std::vector<float> f32_;                     // staging (pageable: consumed by CopyToDevice)
  std::vector<uint16_t> bf16_;
  std::vector<uint8_t> raw_;
};

}  // namespace

std::unique_ptr<WeightSource> NewFileSource(const CheckpointReader& reader, Backend& backend,
                                            const WeightsProgress& progress) {
  return std::make_unique<FileSource>(reader, backend, progress);
}

}  // namespace lorc::weights_internal
