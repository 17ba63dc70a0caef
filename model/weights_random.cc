// Seeded random weights generated where they live: Backend::FillWeights per piece (values of
// kernels/random_init.h; the CPU and CUDA backends make the same fp32 values).
#include <chrono>
#include <cmath>
#include <functional>
#include <string>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "kernels/random_init.h"
#include "model/weights_source.h"

namespace lorc::weights_internal {
namespace {

class RandomSource final : public WeightSource {
 public:
  RandomSource(uint64_t seed, Backend& b, const WeightsProgress& progress)
      : seed_(seed), b_(b), progress_(progress) {}

  absl::Status Begin(absl::Span<const Piece>) override {
    t0_ = std::chrono::steady_clock::now();
    return absl::OkStatus();
  }

  absl::Status Write(const Piece& p, void* dst) override {
    WeightFillParams f;
    f.out = Tensor2D{dst, b_.compute_dtype(), 1, p.numel()};
    if (p.is_1d()) {  // norms
      f.constant = true;
      f.value = 1.0f;
    } else {
      f.out.rows = p.nrows;
      f.out.cols = p.ncols;
      f.key = kernels::WeightInitKey(seed_, std::hash<std::string>{}(p.name));
      f.row0 = p.r0;
      f.col0 = p.c0;
      f.full_cols = p.shape[1];
      // Uniform on [-a, a] with a = 0.02 * sqrt(3): standard deviation 0.02.
      f.scale = 0.02f * std::sqrt(3.0f);
    }
    bytes_ += static_cast<double>(p.numel()) * DTypeSize(b_.compute_dtype());
    return b_.FillWeights(f);
  }

  absl::Status End() override {
    if (!progress_) return absl::OkStatus();
    RETURN_IF_ERROR(b_.Synchronize());  // so the time covers the generation, not its enqueueing
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0_).count();
    progress_(absl::StrCat("weights: random (seed ", seed_, "), ", Gigabytes(bytes_),
                           " generated on ", b_.name(), " in ", Seconds(s)));
    return absl::OkStatus();
  }

 private:
  uint64_t seed_;
  Backend& b_;
  const WeightsProgress& progress_;
  std::chrono::steady_clock::time_point t0_;
  double bytes_ = 0;
};

}  // namespace

std::unique_ptr<WeightSource> NewRandomSource(uint64_t seed, Backend& backend,
                                              const WeightsProgress& progress) {
  return std::make_unique<RandomSource>(seed, backend, progress);
}

}  // namespace lorc::weights_internal
