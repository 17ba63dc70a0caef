// The sampling contract of backend/sampling.h on the GPU (kernels/sampling.cu). Framework-free:
// the caller (backend/cuda_sampling.cc) packs per-row metadata and id lists into one device
// buffer, owns every workspace and turns cudaError_t into absl::Status.
//
// Pipeline of LaunchSample, all on one stream:
//  1. Mark: per row with a count slot, flags and counts per id in counts[slot][vocab] (int32,
//     all zero between calls): allowed ids, active stop ids, logit-bias ids, repetition-penalty
//     ids (bits) and output-token counts (low bits), by atomics over the lists.
//  2. Process: x[slot][id] = steps 0-5 in double for rows with an x slot (ids with a logit bias
//     are left to 3); NaN and -0 of the final value are stored as -inf and +0 (the contract's
//     comparisons treat them alike, the sort needs them alike).
//  3. Bias: per distinct bias id (entries grouped by id on the host, list order kept), steps 0-5
//     with the biases added one by one in list order, as the CPU reference does.
//  4. Unmark: counts back to zero at the listed ids.
//  5. Greedy rows: argmax (first index on ties) over x, or straight over the float logits for
//     rows with nothing to process; every row: whether its raw logits are all finite. Split over
//     SampleGreedyParts(vocab) CTAs a row, the row's last CTA reducing their parts.
//  6. Sampled rows (x slots [0, num_sorted)): the first num_sorted - num_selected by a CUB radix
//     sort of (x, id), descending, stable (ties keep ascending ids): a device-wide sort a row for
//     up to kSampleDeviceSortRows rows, else one segmented sort; the last num_selected (top-k rows
//     and prefix rows, see kSampleSelectMaxK) by a radix select of their first pairs, sorted in
//     the same order (sampling_select.cu; split over chunks of the row when they are few:
//     SampleSelectParts); then one block per row walks the sorted candidates:
//     top-k, temperature, min-p, top-p and the draw, in double (a prefix row whose cuts or draw
//     fall past its prefix gets token kSampleRedo, and no logprobs).
//  7. Logprobs rows: raw log-softmax in double, rank, top-N (ties by lower id).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace lorc::kernels {

// u in [0, 1) from (seed, offset): SplitMix64 of both, the top 53 bits; bit-identical to
// lorc::CounterUniform (backend/sampling.cc).
__host__ __device__ inline uint64_t SampleSplitMix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}
__host__ __device__ inline double SampleCounterUniform(uint64_t seed, uint64_t offset) {
  const uint64_t bits = SampleSplitMix64(SampleSplitMix64(seed) ^ offset);
  return static_cast<double>(bits >> 11) * (1.0 / 9007199254740992.0);
}

// Step 6's z of a sorted key v: (v - m) / t against the row's top key m at temperature t, 0 at
// v == m (so a top key of +inf weighs exp(0), not NaN); -inf for v = -inf < m. A key's weight
// is exp(z) and its probability exp(z) / (sum of the weights); the walk (sampling.cu) and the
// select's sums (sampling_select.cu) both weigh keys with this one definition.
__host__ __device__ inline double SampleZ(double v, double m, double t) { return v == m ? 0.0 : (v - m) / t; }

// Per-row flags (SampleRowMeta::flags).
enum : int32_t {
  kSampleAllowed = 1,      // allowed list non-empty
  kSampleStop = 2,         // stop ids active (num_output_tokens < min_tokens)
  kSampleBias = 4,         // logit bias entries
  kSampleRepetition = 8,   // repetition penalty != 1 over penalty tokens
  kSampleFreqPres = 16,    // frequency / presence penalty over output tokens
  kSampleGreedy = 32,      // step 6
  kSampleLogprobs = 64,    // logprobs >= 0
};

// One row, packed by the host. Offsets index the int32 / float pools of SampleArgs; counts are
// element counts; lists were not filtered for range (the kernels ignore ids outside the vocab).
struct SampleRowMeta {
  int32_t logits_row;
  int32_t flags;
  int32_t x_slot;      // row of the x workspace, -1: none (plain greedy)
  int32_t count_slot;  // row of the counts workspace, -1: none
  int32_t top_k;
  int32_t logprobs;    // top-N (>= 0 when kSampleLogprobs)
  float temperature, top_p, min_p;
  float repetition_penalty, frequency_penalty, presence_penalty;
  uint64_t seed, offset;
  int64_t allowed_off, num_allowed;
  int64_t stop_off, num_stop;
  int64_t bias_off, num_bias;   // ids at ints[bias_off..], values at floats[bias_off..], by id
  int64_t penalty_off, num_penalty;
  int64_t output_off, num_output;
};

struct SampleArgs {
  int32_t num_rows = 0;
  int32_t num_sorted = 0;             // sampled rows; they hold x slots [0, num_sorted)
  int32_t num_selected = 0;           // of those, the last num_selected x slots are selected, not
                                      // sorted whole (SampleSelectCount; the host's contract:
                                      // each such row SampleSelectable, unchecked here)
  bool any_counts = false;            // some row has a count slot
  bool any_x = false;                 // some row has an x slot
  bool any_logprobs = false;
  int64_t vocab = 0;
  const float* logits = nullptr;      // [n, vocab] F32, row stride logits_ld elements
  int64_t logits_ld = 0;
  const SampleRowMeta* rows = nullptr;  // [num_rows], device
  const int32_t* ints = nullptr;      // id pool, device
  const float* floats = nullptr;      // bias values, device (same offsets as ints)
  const int32_t* sort_offsets = nullptr;  // [num_sorted + 1]: s * vocab, device
  const int32_t* sorted_rows = nullptr;   // [num_sorted]: the row holding x slot s, device
  int32_t* counts = nullptr;          // [count slots, vocab], zero on entry and on return
  double* x = nullptr;                // [x slots, vocab]
  double* sorted_x = nullptr;         // [num_sorted, vocab]
  const int32_t* iota = nullptr;      // [num_sorted, vocab]: id i at s * vocab + i
  int32_t* sorted_ids = nullptr;      // [num_sorted, vocab]
  void* sort_temp = nullptr;          // SampleSortTempBytes bytes
  size_t sort_temp_bytes = 0;
  // Prefix rows' sums over the whole row (device, [num_selected], the j-th selected slot at j):
  // the sum of exp(z) over every id (z as the walk's, from the row's top) and the count of
  // finite candidates. Written by the select kernel, read by the walk; unused for top-k rows.
  double* select_sum = nullptr;
  int32_t* select_cand = nullptr;
  // A split selection's per-chunk results (device, [num_selected * kSampleSelectMaxParts]) and
  // the device's SM count that sizes the split (SampleSelectParts; 0: never split).
  struct SampleSelectPart* select_parts = nullptr;
  int32_t num_sms = 0;
  // Outputs (device): tokens [num_rows], non_finite [num_rows] (1: the row's raw logits hold a
  // NaN or an infinity; every row); for logprob rows: logprob, rank, top_ids and top_logprobs
  // [num_rows * top_stride].
  // Step 5's workspaces (device): greedy_counters [num_rows] int32, zero on entry and on return;
  // greedy_parts SampleGreedyPartsBytes(num_rows, vocab) bytes.
  int32_t* greedy_counters = nullptr;
  void* greedy_parts = nullptr;
  int32_t* tokens = nullptr;
  int32_t* non_finite = nullptr;
  float* logprob = nullptr;
  int32_t* rank = nullptr;
  int32_t* top_ids = nullptr;
  float* top_logprobs = nullptr;
  int32_t top_stride = 0;
};

// Step 5: ids a CTA scans, its threads; CTAs a row.
constexpr int kGreedyIds = 2048;
constexpr int kGreedyThreads = 256;
static_assert(kGreedyIds % kGreedyThreads == 0, "each thread scans kGreedyIds / kGreedyThreads ids");
constexpr int kSampleMaxGreedyParts = 65535;  // grid.y
__host__ __device__ inline int SampleGreedyParts(int64_t vocab) {
  return static_cast<int>((vocab + kGreedyIds - 1) / kGreedyIds);
}
// Step 5's partial results: 16 bytes a CTA, SampleGreedyParts(vocab) CTAs a row.
inline size_t SampleGreedyPartsBytes(int32_t num_rows, int64_t vocab) {
  return size_t{16} * static_cast<size_t>(num_rows) * static_cast<size_t>(SampleGreedyParts(vocab));
}

// Step 6 sorts each of at most this many sampled rows with a device-wide radix sort, more rows
// with one segmented sort (a CTA a row). At vocab 128,256 on an H100 (sampling_bench, top-p 0.9
// and top-k 50, docs/PERFORMANCE.md 2026-12-06 "Sampled rows sorted one by one"): 12 rows sorted
// one by one took 1,555 / 1,421 us a call, 13 rows in one segmented sort 2,232 / 2,093.
constexpr int32_t kSampleDeviceSortRows = 12;

// Step 6: a sampled row may be selected instead of sorted whole (SampleArgs::num_selected), one
// 1024-thread CTA a row (sampling_select.cu): its first SampleSelectCount pairs in the sort's
// order. Two kinds: a top-k row (top_k in [2, kSampleSelectMaxK], below the vocabulary) needs no
// more than its top_k pairs; a prefix row (no top-k cut, vocabulary above kSampleSelectMaxK)
// gets the first kSampleSelectMaxK pairs and its whole-row sums (SampleArgs::select_sum), and
// the walk draws from that prefix when its cuts and its draw fall inside it, else it marks the
// row's token -1 (kSampleRedo) and the host samples the row again, sorted whole. The token is
// the full sort's but for rounding: a prefix row's sum of weights is summed in id order (a split
// selection: per chunk from the chunk's maximum, then rescaled), not in the sorted order (the CPU
// reference's order differs from both).
constexpr int32_t kSampleSelectMaxK = 1024;
constexpr int32_t kSampleRedo = -1;  // a prefix row's token when the prefix was too short
__host__ __device__ inline bool SampleSelectTopK(int32_t top_k, int64_t vocab) {
  return top_k > 1 && top_k <= kSampleSelectMaxK && top_k < vocab;
}
__host__ __device__ inline bool SampleSelectPrefix(int32_t top_k, int64_t vocab) {
  return vocab > kSampleSelectMaxK && (top_k <= 0 || top_k >= vocab);
}
// Pairs a selected row gets (either kind; the host selects only rows of one of them).
__host__ __device__ inline int32_t SampleSelectCount(int32_t top_k, int64_t vocab) {
  return SampleSelectTopK(top_k, vocab) ? top_k : kSampleSelectMaxK;
}
// A selection split over chunks of the row when the selected rows are too few to fill the GPU:
// parts CTAs a row each keep their chunk's first pairs (and a prefix row's partial sums), then one
// CTA a row selects among those candidates. parts * kSampleSelectMaxK * 2 <= vocab keeps the
// candidates (stored in the tail of the row's sorted span) clear of the sorted output.
constexpr int32_t kSampleSelectMaxParts = 16;
struct SampleSelectPart {
  double max;    // the chunk's largest x (-inf: none finite)
  double sum;    // its sum of exp(z), z from that largest (sampling.cu Walk::Z)
  int32_t cand;  // its finite candidates
};
__host__ __device__ inline int SampleSelectParts(int32_t rows, int64_t vocab, int32_t num_sms) {
  if (rows <= 0 || num_sms <= 0) return 1;
  int64_t p = (num_sms + rows - 1) / rows;  // CTAs to fill the SMs once
  const int64_t most = vocab / (2 * kSampleSelectMaxK);
  if (p > kSampleSelectMaxParts) p = kSampleSelectMaxParts;
  if (p > most) p = most;
  return p < 2 ? 1 : static_cast<int>(p);
}
// Step 6's selection of the last num_selected sampled x slots (called by LaunchSample).
cudaError_t LaunchSampleSelect(const SampleArgs& a, cudaStream_t stream);

// CUB temporary storage for sorting num_sorted segments of vocab (x, id) pairs; 0 on error.
size_t SampleSortTempBytes(int32_t num_sorted, int64_t vocab);

// Runs the pipeline above. cudaErrorInvalidValue for vocab outside [1, 2^31 / max(1,
// num_sorted)), vocab past 65,535 greedy parts (2^27 ids), num_rows < 0 or null greedy
// workspaces; num_rows == 0 launches nothing.
cudaError_t LaunchSample(const SampleArgs& args, cudaStream_t stream);

// ids[s * vocab + i] = i for s < num_sorted (SampleArgs::iota; filled when it grows).
cudaError_t LaunchSampleIota(int32_t* ids, int32_t num_sorted, int64_t vocab, cudaStream_t stream);

}  // namespace lorc::kernels
