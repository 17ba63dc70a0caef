// The sampling contract every backend implements (Backend::Sample), and its CPU reference.
// A GPU sampler must choose the same token as the CPU reference for every row (the arithmetic
// below is specified in double; a sampler that computes in float must still agree on the
// choice for every accepted value, and is checked against SampleRow by parity tests).
//
// One token per SamplingRow, reading row `logits_row` of a logits matrix [n, vocab] (F32, the
// model's raw logits; never modified). Processing, in this order (vLLM v1's), over a copy
// x[0..vocab) in double:
//  0. NaN logits count as -inf.
//  1. allowed_token_ids: when the row has any, every other id gets -inf.
//  2. min_tokens: while num_output_tokens < min_tokens, every id of stop_ids (the model's EOS
//     ids unless ignore_eos, and the request's stop_token_ids; the worker builds the list) gets
//     -inf.
//  3. logit_bias: x[id] += bias.
//  4. Repetition penalty (Hugging Face), each distinct id of penalty_tokens (prompt and
//     generated) once: x > 0 ? x / repetition_penalty : x * repetition_penalty.
//  5. Frequency and presence penalties (OpenAI), over output_tokens (generated only): with c the
//     id's count there, x -= frequency_penalty * c + presence_penalty * (c > 0).
//  6. Greedy: when temperature < defaults::kGreedyTemperature or top_k == 1 the token is
//     ArgMax(x) (first index on ties) and steps 7-10 do not run (no draw is consumed either: the
//     offset is the caller's).
//  7. Candidates: the ids with x > -inf, sorted by x (highest first, ties by lower id). None:
//     the token is ArgMax(x). Top-k (top_k > 0): the first top_k candidates.
//  8. Temperature: z = 0 when x equals the first candidate's x (m), else (x - m) / temperature
//     (<= 0, no overflow for any temperature and any x); weight w = exp(z); probability
//     p = w / (sum of the kept candidates' w) (the sum is >= 1, so never 0/0).
//  9. Top-p (top_p < 1): keep the shortest prefix whose cumulative p reaches top_p (at least
//     one candidate). Min-p (min_p > 0): keep the prefix of candidates with z >= log(min_p)
//     (p >= min_p * p[0], compared in log space so that min_p = 1 keeps exactly the ties of
//     the top logit at any temperature). The kept set is the shorter of the two prefixes; p
//     is not renormalised between them.
// 10. One draw: u = CounterUniform(seed, offset) (a pure function of the request's seed and of
//     how many draws it made before, so a GPU sampler draws the same u whatever else is in the
//     batch, and a seeded request is reproducible across batches, preemptions and backends);
//     r = u * (sum of the kept p); the token is the first kept candidate at which the running
//     sum of p exceeds r (the last kept one if rounding leaves none).
// Every accepted SamplingParams value (common/sampling_params.h) gives a valid id this way.
//
// Log-probabilities (row.logprobs >= 0): of the RAW distribution, log_softmax of the row's
// logits before any step above (vLLM's default), in double, NaN as -inf: the sampled token's
// log-probability, its rank (1 + number of ids with a strictly higher logit) and the
// row.logprobs most likely ids with their log-probabilities (highest logit first, ties by
// lower id). The same function (ComputeLogprobs) scores prompt tokens.
//
// Broken rows: a backend also reports, per row, whether its raw logits hold a NaN or an infinity
// (SampleOutput::non_finite; bf16 or fp32 overflow, NaN weights). The token steps 0-10 give for
// such a row is meaningless (all NaN: id 0); the worker fails the request instead of emitting it
// (worker/step_executor.h).
#pragma once

#include <cstdint>
#include <vector>

#include "absl/types/span.h"
#include "common/defaults.h"

namespace lorc {

// One row to sample. A plain struct a GPU sampler can copy: every pointer is host memory that
// stays valid during the Backend::Sample call; counts are in elements; ids outside
// [0, vocab) in any list are ignored.
struct SamplingRow {
  int32_t logits_row = 0;           // row of the logits matrix this sample reads
  // Step 1. Empty: all ids allowed.
  const int32_t* allowed_token_ids = nullptr;
  int64_t num_allowed_token_ids = 0;
  // Step 2: stop_ids get -inf while num_output_tokens < min_tokens.
  int32_t min_tokens = 0;
  const int32_t* stop_ids = nullptr;
  int64_t num_stop_ids = 0;
  // Step 3: logit_bias_values[j] is added to id logit_bias_ids[j].
  const int32_t* logit_bias_ids = nullptr;
  const float* logit_bias_values = nullptr;
  int64_t num_logit_bias = 0;
  // Step 4, over penalty_tokens: prompt and generated tokens.
  float repetition_penalty = 1.0f;  // 1: off
  const int32_t* penalty_tokens = nullptr;
  int64_t num_penalty_tokens = 0;
  // Step 5, over output_tokens: generated tokens only (their count also drives step 2).
  float frequency_penalty = 0.0f;   // 0: off
  float presence_penalty = 0.0f;    // 0: off
  const int32_t* output_tokens = nullptr;
  int64_t num_output_tokens = 0;
  // Steps 6-9.
  float temperature = 0.0f;         // below defaults::kGreedyTemperature: greedy
  int32_t top_k = 0;                // 0: off; 1: greedy
  float top_p = 1.0f;               // 1: off
  float min_p = 0.0f;               // 0: off
  // Step 10.
  uint64_t seed = 0;                // the request's random stream
  uint64_t offset = 0;              // draws the request made before this one
  // -1: no log-probabilities; N in [0, kMaxLogprobs]: the token's own and the top N.
  int32_t logprobs = -1;
};

// What Backend::Sample returns for rows.size() rows, in host memory. Flat arrays, so that a GPU
// kernel can fill device buffers of the same layout and copy them back in one go.
struct SampleOutput {
  static constexpr int32_t kStride = defaults::kMaxLogprobs;  // top_* entries per row
  std::vector<int32_t> tokens;        // [rows]
  // Rows with logprobs >= 0 only (others: 0):
  std::vector<float> logprobs;        // [rows] raw log-probability of the sampled token
  std::vector<int32_t> ranks;         // [rows] its rank, >= 1
  std::vector<int32_t> top_ids;       // [rows * kStride]: row r's first rows[r].logprobs entries
  std::vector<float> top_logprobs;    // [rows * kStride]
  // [rows] 1 when the row's raw logits hold a NaN or an infinity (every row; RowIsFinite).
  std::vector<uint8_t> non_finite;

  // Sizes every array for `rows` rows, zero-filled.
  void Resize(size_t rows);
};

// u in [0, 1) from (seed, offset): SplitMix64 of both, the top 53 bits as a double.
double CounterUniform(uint64_t seed, uint64_t offset);

// Index of the largest value, the first one on ties (as torch.argmax); NaN counts as -inf;
// 0 when every value is -inf or NaN.
int32_t ArgMax(absl::Span<const float> v);
int32_t ArgMax(absl::Span<const double> v);

// False when any of `logits` is a NaN or an infinity (SampleOutput::non_finite).
bool RowIsFinite(absl::Span<const float> logits);

// Reusable buffers of SampleRow / ComputeLogprobs (so that a batch allocates once).
struct SampleScratch {
  std::vector<double> x;
  std::vector<int32_t> order;
  std::vector<double> probs;
  std::vector<int32_t> counts;
  std::vector<uint8_t> flags;
};

// Steps 0-5 of the contract: x = the processed logits [vocab] (before temperature).
void ProcessLogits(absl::Span<const float> logits, const SamplingRow& row, SampleScratch* scratch,
                   std::vector<double>* x);

// The CPU reference of one row (steps 0-10): the token, in [0, logits.size()).
int32_t SampleRow(absl::Span<const float> logits, const SamplingRow& row, SampleScratch* scratch);

// Raw log-probabilities at one position: of `token` (its log-probability and rank) and of the
// top_n most likely ids (top_ids / top_logprobs must hold top_n entries; top_n is clamped to
// the vocabulary). logits: one row [vocab].
void ComputeLogprobs(absl::Span<const float> logits, int32_t token, int32_t top_n,
                     SampleScratch* scratch, float* logprob, int32_t* rank, int32_t* top_ids,
                     float* top_logprobs);

}  // namespace lorc
