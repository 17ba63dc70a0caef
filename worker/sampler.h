// A request's sampling stream: its options, its seed (the request's, or drawn at random when it
// gave none) and how many draws it has made. The draws themselves follow the backend sampling
// contract (backend/sampling.h: Backend::Sample, counter-based), so a seeded request is
// reproducible whatever else runs in the same batch, across preemptions and on every backend.
#pragma once

#include <cstdint>

#include "absl/types/span.h"
#include "backend/sampling.h"
#include "common/sampling_params.h"

namespace lorc {

class Sampler {
 public:
  explicit Sampler(const SamplingParams& params);

  // The row for this request's next draw (advances the draw counter). `context` (prompt and
  // generated tokens, for the repetition penalty) must stay valid while the row is used.
  SamplingRow NextRow(absl::Span<const int32_t> context, int32_t logits_row = 0);

  // NextRow + the CPU reference (backend/sampling.h) on one logit row, which it modifies.
  int32_t Sample(absl::Span<float> logits, absl::Span<const int32_t> context);

 private:
  SamplingParams params_;
  uint64_t seed_;
  uint64_t offset_ = 0;
  SampleScratch scratch_;
};

}  // namespace lorc
