// The sampling contract every backend implements (Backend::Sample), and its CPU reference.
//
// One token per row of a logits matrix, with Hugging Face semantics and order: repetition penalty
// (over the row's penalty tokens: prompt and generated), temperature, top-k, top-p, min-p, then
// one draw from what is left; greedy (temperature 0) is the argmax, first index on ties. The
// draw is counter-based: row r uses the uniform u = CounterUniform(seed, offset) in [0, 1), a
// pure function of the request's seed and of how many draws it made before, so a GPU sampler
// draws exactly the same u whatever else is in the batch, and a seeded request is reproducible
// across batches, preemptions and backends. The token is the first candidate (by logit, highest
// first, ties by id) at which the cumulative probability of the kept candidates exceeds
// u * (their total mass).
#pragma once

#include <cstdint>
#include <vector>

#include "absl/types/span.h"

namespace lorc {

struct SamplingRow {
  int32_t logits_row = 0;           // row of the logits matrix this sample reads
  float temperature = 0.0f;         // 0: greedy
  int32_t top_k = 0;                // 0: off
  float top_p = 1.0f;               // 1: off
  float min_p = 0.0f;               // 0: off
  float repetition_penalty = 1.0f;  // 1: off
  const int32_t* penalty_tokens = nullptr;  // host memory, valid during the call
  int64_t num_penalty_tokens = 0;
  uint64_t seed = 0;                // the request's random stream
  uint64_t offset = 0;              // draws the request made before this one
};

// u in [0, 1) from (seed, offset): SplitMix64 of both, the top 53 bits as a double.
double CounterUniform(uint64_t seed, uint64_t offset);

// Index of the largest value, the first one on ties (as torch.argmax).
int32_t ArgMax(absl::Span<const float> v);

// Reusable buffers of SampleRow (so that a batch allocates once).
struct SampleScratch {
  std::vector<int32_t> order;
  std::vector<float> probs;
};

// The CPU reference of one row: modifies `logits` (penalties, temperature) and returns the token.
int32_t SampleRow(absl::Span<float> logits, const SamplingRow& row, SampleScratch* scratch);

}  // namespace lorc
