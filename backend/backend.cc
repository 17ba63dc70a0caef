#include "backend/backend.h"

#include <limits>
#include <string>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "backend/cpu_backend.h"
#include "backend/cuda_backend.h"

namespace lorc {

DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& o) noexcept {
  if (this != &o) {
    Reset();
    owner_ = std::exchange(o.owner_, nullptr);
    data_ = std::exchange(o.data_, nullptr);
    bytes_ = std::exchange(o.bytes_, 0);
    kind_ = o.kind_;
  }
  return *this;
}

void DeviceBuffer::Reset() {
  if (data_ != nullptr && owner_ != nullptr) owner_->Free(data_, kind_);
  data_ = nullptr;
  bytes_ = 0;
  owner_ = nullptr;
}

Tensor2D Tensor2D::ColSlice(int64_t c0, int64_t n) const {
  Tensor2D t = *this;
  t.data = static_cast<char*>(data) + c0 * static_cast<int64_t>(DTypeSize(dtype));
  t.cols = n;
  t.ld = stride();
  return t;
}

Tensor2D Tensor2D::RowSlice(int64_t r0, int64_t n) const {
  Tensor2D t = *this;
  t.data = static_cast<char*>(data) + r0 * stride() * static_cast<int64_t>(DTypeSize(dtype));
  t.rows = n;
  t.ld = stride();
  return t;
}

absl::StatusOr<BackendKind> ParseBackendKind(absl::string_view s) {
  const std::string lower = absl::AsciiStrToLower(s);
  if (lower == "cpu") return BackendKind::kCpu;
  if (lower == "cuda") return BackendKind::kCuda;
  return absl::InvalidArgumentError(absl::StrCat("unknown backend '", s, "' (expected cpu or cuda)"));
}

absl::Status RequireF32(const char* backend, const char* op, const char* what, DType dtype) {
  if (dtype == DType::kF32) return absl::OkStatus();
  return absl::UnimplementedError(absl::StrCat(backend, " backend: ", op, ": ", what, " dtype ",
                                               DTypeName(dtype), " not implemented"));
}

absl::Status ValidateBlockCopies(absl::Span<const BlockCopy> copies, int32_t num_blocks) {
  for (size_t i = 0; i < copies.size(); ++i) {
    for (auto [field, b] : {std::pair{"src", copies[i].src}, std::pair{"dst", copies[i].dst}}) {
      if (b < 0 || b >= num_blocks) {
        return absl::InvalidArgumentError(absl::StrCat("block copy ", i, ": ", field, " block ", b,
                                                       " outside the cache of ", num_blocks,
                                                       " blocks"));
      }
    }
  }
  return absl::OkStatus();
}

absl::Status ValidateWeightFill(const char* backend, const WeightFillParams& p) {
  const Tensor2D& o = p.out;
  auto bad = [&](const std::string& what) {
    return absl::InvalidArgumentError(absl::StrCat(backend, " backend: FillWeights: ", what));
  };
  if (o.rows < 0 || o.cols < 0 || o.stride() < o.cols) {
    return bad(absl::StrCat("out [", o.rows, ", ", o.cols, "] with ld ", o.ld));
  }
  if (o.data == nullptr && o.rows > 0 && o.cols > 0) return bad("out.data is null");
  if (p.constant) return absl::OkStatus();
  if (p.row0 < 0 || p.col0 < 0 || p.full_cols < 0 || p.col0 + o.cols > p.full_cols) {
    return bad(absl::StrCat("block at row0 ", p.row0, ", col0 ", p.col0, " of ", o.cols,
                            " columns outside a tensor of full_cols ", p.full_cols));
  }
  if (p.full_cols > 0 && p.row0 + o.rows > std::numeric_limits<int64_t>::max() / p.full_cols) {
    return bad(absl::StrCat("rows up to ", p.row0 + o.rows, " x full_cols ", p.full_cols,
                            " overflow a 64-bit index"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<Backend>> CreateBackend(const BackendOptions& options) {
  switch (options.kind) {
    case BackendKind::kCpu:
      return CreateCpuBackend(options);
    case BackendKind::kCuda:
      return CreateCudaBackend(options);
  }
  return absl::InvalidArgumentError("unknown backend kind");
}

}  // namespace lorc
