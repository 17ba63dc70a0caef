// CudaBackend::Sample: the sampling contract of backend/sampling.h on the GPU (kernels/sampling.cuh
// has the pipeline). Per call: the rows' metadata and the id lists the kernels need are packed
// into one pinned staging buffer and uploaded with one async copy; the tokens and the rows'
// non_finite flags (and, when some row asks, the log-probability arrays) come back with one async
// copy into a pinned buffer; then the host waits for an event recorded after that copy (Sample at
// once, BeginSample / FinishSample later; work enqueued after the draw is not waited for). Every
// buffer is kept and grown (never shrunk) when a call needs more, so a steady state allocates
// nothing.
#include "backend/cuda_backend_impl.h"

#ifdef LORC_HAVE_CUDA

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <vector>

#include "common/env_switch.h"
#include "kernels/sampling.cuh"

namespace lorc::cuda_internal {

namespace k = ::lorc::kernels;

// Whether sampled rows are selected rather than sorted whole (kernels/sampling.cuh step 6,
// kernels/sampling_select.cu): top-k rows (top_k 2..1024 below the vocabulary) and prefix rows
// (no top-k cut, a vocabulary above 1024). LORC_SAMPLE_SELECT: 0 off (the full sort, to compare:
// the same tokens), 2 on without the backoff below (tests), else on. Read once per backend, when
// its sampler is made (ReserveSampler or the first Sample call). Measured on an H100 2026-12-06
// (docs/PERFORMANCE.md "The sampled path selects"), token-exact by
// tests/backend/cuda_sampling_test.cc.
enum class SelectMode { kOff, kOn, kNoBackoff };
static bool SampleSelectSplit() { return EnvFlag("LORC_SAMPLE_SELECT_SPLIT", true); }
static SelectMode SampleSelectMode() {
  switch (EnvIntOf("LORC_SAMPLE_SELECT", {0, 1, 2}, 1)) {
    case 0:
      return SelectMode::kOff;
    case 2:
      return SelectMode::kNoBackoff;
    default:
      return SelectMode::kOn;
  }
}

// The backoff: the share of prefix rows sampled again, a running average weighted by each call's
// prefix rows n (weight n / (n + kRedoRateRows): one row moves it a little, a batch of 64 most of
// the way); past kRedoRateLimit (flat distributions: top-p nuclei or draws past the first 1,024
// candidates) prefix rows are off for kPrefixBackoffCalls calls, then on again with the share
// at the limit (a call with more rows sampled again than not backs off again at once). A row
// sampled again costs its selection, a second round trip and its full sort; one drawn from its
// prefix saves ~93 us (batch 1) to ~17 us a row (batch 256) of sorting on an H100 (2026-12-06,
// docs/PERFORMANCE.md "The sampled path selects").
constexpr double kRedoRateRows = 16;
constexpr double kRedoRateLimit = 0.5;
constexpr int32_t kPrefixBackoffCalls = 64;

// Device and pinned buffers of Sample, each grown to the largest call so far. A buffer that grows
// does not free its old allocation while serving: cudaFree and cudaFreeHost synchronise the device
// (cudaFreeHost every device of the process), and with tensor parallelism that can wait on a
// collective the peer ranks only reach after this rank's next step: a deadlock when two GPUs are
// driven from one process. Outgrown allocations are kept in `retired` (growth at least doubles, so
// they hold less than the live buffer) and freed with the sampler.
struct CudaSampler {
  struct Retired {
    void* p;
    bool pinned;
  };
  std::vector<Retired> retired;
  struct Buf {
    void* p = nullptr;
    size_t bytes = 0;
    bool pinned = false;
    // Grows to at least `need` bytes (contents lost); *grown tells whether it moved.
    cudaError_t Reserve(size_t need, std::vector<Retired>& retired, bool* grown = nullptr) {
      if (grown) *grown = false;
      if (need <= bytes) return cudaSuccess;
      const size_t n = std::max({need, 2 * bytes, static_cast<size_t>(4096)});
      void* q = nullptr;
      const cudaError_t e = pinned ? cudaMallocHost(&q, n) : cudaMalloc(&q, n);
      if (e != cudaSuccess) return e;  // the old buffer stays usable for smaller calls
      if (p != nullptr) retired.push_back({p, pinned});
      p = q;
      bytes = n;
      if (grown) *grown = true;
      return cudaSuccess;
    }
    // Zeroes a buffer that must hold zeros between calls (counters); on failure it is dropped
    // (retired, size 0), so that the next call grows and zeroes a new one rather than reading
    // garbage.
    cudaError_t Zero(std::vector<Retired>& retired, cudaStream_t stream) {
      const cudaError_t e = cudaMemsetAsync(p, 0, bytes, stream);
      if (e != cudaSuccess) {
        retired.push_back({p, pinned});
        p = nullptr;
        bytes = 0;
      }
      return e;
    }
  };
  Buf stage_host{nullptr, 0, true}, stage_dev;  // [metas][ints][floats]
  Buf out_host{nullptr, 0, true}, out_dev;      // [tokens][non_finite][logprob][rank][top_ids][top_logprobs]
  Buf counts, x, sorted_x, iota, sorted_ids, sort_temp;
  Buf greedy_counters, greedy_parts;  // step 5's (the counters zero between calls)
  Buf select_stats;                   // prefix rows' whole-row sums, candidate counts, chunk parts
  int32_t prefix_backoff = 0;         // calls left without prefix rows (kPrefixBackoffCalls)
  double redo_rate = 0;               // running share of prefix rows sampled again
  CudaSampleCounters counters;
  int64_t iota_vocab = 0;
  int32_t iota_rows = 0;
  std::vector<int32_t> bias_order;  // host scratch for grouping bias entries by id
  const SelectMode mode = SampleSelectMode();  // read once, when the sampler is made
  const bool select = mode != SelectMode::kOff;
  // The SM count that sizes a split selection (kernels::SampleSelectParts), read at the first
  // call; LORC_SAMPLE_SELECT_SPLIT=0 (read when the sampler is made) never splits (to compare).
  const bool split = SampleSelectSplit();
  int32_t num_sms = -1;
  // The pass enqueued last (SampleRowsLaunch), for SampleRowsFinish: rows, the vocabulary, and
  // each row's top-N count when some row asks for log-probabilities.
  struct Pass {
    int32_t n = 0;
    int64_t vocab = 0;
    bool any_logprobs = false;
    std::vector<int32_t> tops;
  } pass;
  // BeginSample's draw until FinishSample: enqueued (`begun_complete` false: the pass above) or
  // completed (`begun_out`, its tokens uploaded to `drawn_dev`).
  bool begun = false, begun_complete = false;
  SampleOutput begun_out;
  Buf drawn_dev;
  // Recorded after a pass's download: its finish waits for the draw, not for work enqueued after
  // it (a forward pass launched ahead).
  cudaEvent_t downloaded = nullptr;
  ~CudaSampler() {
    if (downloaded != nullptr) cudaEventDestroy(downloaded);
    for (Buf* b : {&stage_host, &stage_dev, &out_host, &out_dev, &counts, &x, &sorted_x, &iota, &sorted_ids,
                   &sort_temp, &greedy_counters, &greedy_parts, &select_stats, &drawn_dev}) {
      if (b->p != nullptr) retired.push_back({b->p, b->pinned});
    }
    for (const Retired& r : retired) r.pinned ? cudaFreeHost(r.p) : cudaFree(r.p);
  }
};

void CudaSamplerDeleter::operator()(CudaSampler* s) const { delete s; }

absl::Status CudaBackend::ReserveSampler() {
  if (!sampler_) sampler_.reset(new CudaSampler);
  CudaSampler& s = *sampler_;
  // 1 MiB each: the metadata and penalty histories of a few hundred rows, and the outputs of
  // 1,000+ rows with 20 log-probabilities each. Larger calls grow them (rare).
  constexpr size_t kBytes = size_t{1} << 20;
  for (CudaSampler::Buf* b : {&s.stage_host, &s.stage_dev, &s.out_host, &s.out_dev}) {
    RETURN_IF_ERROR(CudaError(b->Reserve(kBytes, s.retired), "sampler buffers"));
  }
  return absl::OkStatus();
}

CudaSampleCounters CudaBackend::sample_counters() const {
  return sampler_ ? sampler_->counters : CudaSampleCounters{};
}

namespace {

constexpr char kOp[] = "Sample";

size_t Align16(size_t n) { return (n + 15) / 16 * 16; }

constexpr int32_t kSelectedSlot = -2;  // placeholder while x slots are handed out

bool IsGreedy(const SamplingRow& r) {
  return r.temperature < defaults::kGreedyTemperature || r.top_k == 1;
}

// A sampled row selected (kernels/sampling.cuh kSampleSelectMaxK): a top-k row, or a prefix row
// when `prefix` (off for rows sampled again, and while the sampler backs off).
bool Selects(const SamplingRow& r, int64_t vocab, bool enabled, bool prefix) {
  return enabled && (k::SampleSelectTopK(r.top_k, vocab) || (prefix && k::SampleSelectPrefix(r.top_k, vocab)));
}

// One pass of the pipeline over `rows` (validated by CheckSampleArgs): enqueued by
// SampleRowsLaunch (prefix rows only when `prefix`, their count in *num_prefix; their tokens may
// come back kSampleRedo), waited for and unpacked into `out` (sized) by SampleRowsFinish.
absl::Status SampleRowsLaunch(CudaSampler& s, cudaStream_t stream, const Tensor2D& logits,
                              absl::Span<const SamplingRow> rows, bool prefix, int32_t* num_prefix);
absl::Status SampleRowsFinish(CudaSampler& s, SampleOutput* out);
absl::Status SampleRows(CudaSampler& s, cudaStream_t stream, const Tensor2D& logits,
                        absl::Span<const SamplingRow> rows, bool prefix, SampleOutput* out,
                        int32_t* num_prefix) {
  RETURN_IF_ERROR(SampleRowsLaunch(s, stream, logits, rows, prefix, num_prefix));
  return SampleRowsFinish(s, out);
}

// Sample's argument checks (InvalidArgument naming the row or the vocabulary).
absl::Status CheckSampleArgs(const Tensor2D& logits, absl::Span<const SamplingRow> rows) {
  RETURN_IF_ERROR(RequireF32("cuda", kOp, "logits", logits.dtype));
  for (size_t i = 0; i < rows.size(); ++i) {
    const int32_t r = rows[i].logits_row;
    if (r < 0 || r >= logits.rows) {
      return absl::InvalidArgumentError(absl::StrCat("cuda backend: Sample: row ", i, " reads logits row ",
                                                     r, " of ", logits.rows));
    }
    if (rows[i].logprobs < -1 || rows[i].logprobs > SampleOutput::kStride) {
      return absl::InvalidArgumentError(absl::StrCat("cuda backend: Sample: row ", i, " asks for ",
                                                     rows[i].logprobs, " logprobs (at most ",
                                                     SampleOutput::kStride, ")"));
    }
  }
  const int64_t vocab = logits.cols;
  if (!rows.empty() &&
      (vocab <= 0 || vocab >= INT32_MAX || k::SampleGreedyParts(vocab) > k::kSampleMaxGreedyParts)) {
    const int64_t most = int64_t{k::kSampleMaxGreedyParts} * k::kGreedyIds;
    return absl::InvalidArgumentError(
        absl::StrCat("cuda backend: Sample: vocabulary of ", vocab, " ids (1 to ", most, " supported)"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status CudaBackend::Sample(const Tensor2D& logits, absl::Span<const SamplingRow> rows,
                                 SampleOutput* out) {
  RETURN_IF_ERROR(CheckSampleArgs(logits, rows));
  if (!sampler_) sampler_.reset(new CudaSampler);
  if (sampler_->begun) return absl::FailedPreconditionError("cuda backend: Sample: a begun draw was not finished");
  out->Resize(rows.size());
  if (rows.empty()) return absl::OkStatus();
  int32_t num_prefix = 0;
  RETURN_IF_ERROR(SampleRowsLaunch(*sampler_, stream_, logits, rows, TakePrefix(), &num_prefix));
  RETURN_IF_ERROR(SampleRowsFinish(*sampler_, out));
  return RedoPrefixRows(logits, rows, num_prefix, out);
}

bool CudaBackend::TakePrefix() {
  CudaSampler& s = *sampler_;
  const bool prefix = s.prefix_backoff == 0;
  if (s.prefix_backoff > 0) --s.prefix_backoff;
  return prefix;
}

absl::Status CudaBackend::BeginSample(const Tensor2D& logits, absl::Span<const SamplingRow> rows,
                                      const int32_t** drawn_tokens) {
  RETURN_IF_ERROR(CheckSampleArgs(logits, rows));
  if (!sampler_) sampler_.reset(new CudaSampler);
  CudaSampler& s = *sampler_;
  if (s.begun) return absl::FailedPreconditionError("cuda backend: BeginSample: the last draw was not finished");
  const int32_t n = static_cast<int32_t>(rows.size());
  int32_t num_prefix = 0;
  if (n > 0) RETURN_IF_ERROR(SampleRowsLaunch(s, stream_, logits, rows, TakePrefix(), &num_prefix));
  if (n > 0 && num_prefix == 0) {
    // Enqueued: the tokens are the pass's first output array (out_dev, kept until the next pass).
    *drawn_tokens = static_cast<const int32_t*>(s.out_dev.p);
    s.begun = true;
    s.begun_complete = false;
    return absl::OkStatus();
  }
  // Prefix rows may have to be drawn again (on the host's word): completed here, the final
  // tokens uploaded (pageable: staged when the call returns).
  s.begun_out.Resize(rows.size());
  if (n > 0) {
    RETURN_IF_ERROR(SampleRowsFinish(s, &s.begun_out));
    RETURN_IF_ERROR(RedoPrefixRows(logits, rows, num_prefix, &s.begun_out));
  }
  RETURN_IF_ERROR(CudaError(s.drawn_dev.Reserve(sizeof(int32_t) * std::max(n, 1), s.retired), "drawn tokens"));
  RETURN_IF_ERROR(CopyToDevice(s.drawn_dev.p, s.begun_out.tokens.data(), sizeof(int32_t) * n));
  *drawn_tokens = static_cast<const int32_t*>(s.drawn_dev.p);
  s.begun = true;
  s.begun_complete = true;
  return absl::OkStatus();
}

absl::Status CudaBackend::FinishSample(SampleOutput* out) {
  if (!sampler_ || !sampler_->begun) return absl::FailedPreconditionError("cuda backend: FinishSample: no draw begun");
  CudaSampler& s = *sampler_;
  s.begun = false;
  if (s.begun_complete) {
    std::swap(*out, s.begun_out);
    return absl::OkStatus();
  }
  out->Resize(s.pass.n);
  return SampleRowsFinish(s, out);
}

absl::Status CudaBackend::RedoPrefixRows(const Tensor2D& logits, absl::Span<const SamplingRow> rows,
                                         int32_t num_prefix, SampleOutput* out) {
  CudaSampler& s = *sampler_;
  const int32_t n = static_cast<int32_t>(rows.size());
  if (num_prefix == 0) return absl::OkStatus();
  // Prefix rows whose cuts or draw fell past their prefix: sampled again, sorted whole (the
  // same seed and offset: the token the full sort gives in one pass). An error leaves their
  // tokens kSampleRedo: `out` is valid only when the call succeeds (backend.h).
  std::vector<int32_t> redo;
  for (int32_t i = 0; i < n; ++i) {
    if (out->tokens[i] == k::kSampleRedo) redo.push_back(i);
  }
  const double weight = num_prefix / (num_prefix + kRedoRateRows);
  s.redo_rate += weight * (static_cast<double>(redo.size()) / num_prefix - s.redo_rate);
  if (s.redo_rate > kRedoRateLimit && s.mode == SelectMode::kOn) {
    s.prefix_backoff = kPrefixBackoffCalls;
    s.redo_rate = kRedoRateLimit;  // measured afresh: the next call's share decides alone
    ++s.counters.backoffs;
  }
  if (redo.empty()) return absl::OkStatus();
  s.counters.redone += static_cast<int64_t>(redo.size());
  std::vector<SamplingRow> again;
  again.reserve(redo.size());
  for (int32_t i : redo) again.push_back(rows[i]);
  SampleOutput second;
  second.Resize(again.size());
  RETURN_IF_ERROR(SampleRows(s, stream_, logits, again, false, &second, &num_prefix));
  constexpr size_t kStride = SampleOutput::kStride;
  for (size_t j = 0; j < redo.size(); ++j) {
    const size_t i = static_cast<size_t>(redo[j]);
    out->tokens[i] = second.tokens[j];
    out->non_finite[i] = second.non_finite[j];
    out->logprobs[i] = second.logprobs[j];
    out->ranks[i] = second.ranks[j];
    std::copy_n(&second.top_ids[j * kStride], kStride, &out->top_ids[i * kStride]);
    std::copy_n(&second.top_logprobs[j * kStride], kStride, &out->top_logprobs[i * kStride]);
  }
  return absl::OkStatus();
}

namespace {

absl::Status SampleRowsLaunch(CudaSampler& s, cudaStream_t stream, const Tensor2D& logits,
                              absl::Span<const SamplingRow> rows, bool prefix, int32_t* num_prefix) {
  const int64_t vocab = logits.cols;
  const int32_t n = static_cast<int32_t>(rows.size());
  *num_prefix = 0;

  // Row metadata: which lists matter, and slots (sampled rows take x slots 0.. first: those
  // sorted whole, then the selected ones, each in row order).
  std::vector<k::SampleRowMeta> metas(n);
  int32_t num_sorted = 0, num_x = 0, num_counts = 0;
  int64_t num_ints = 0;
  bool any_logprobs = false;
  for (int32_t i = 0; i < n; ++i) {
    const SamplingRow& r = rows[i];
    k::SampleRowMeta& m = metas[i];
    std::memset(&m, 0, sizeof(m));
    m.logits_row = r.logits_row;
    m.top_k = r.top_k;
    m.logprobs = r.logprobs;
    m.temperature = r.temperature;
    m.top_p = r.top_p;
    m.min_p = r.min_p;
    m.repetition_penalty = r.repetition_penalty;
    m.frequency_penalty = r.frequency_penalty;
    m.presence_penalty = r.presence_penalty;
    m.seed = r.seed;
    m.offset = r.offset;
    auto take = [&](int64_t count, int32_t flag, int64_t* off, int64_t* num) {
      if (count <= 0) return;
      m.flags |= flag;
      *off = num_ints;
      *num = count;
      num_ints += count;
    };
    take(r.num_allowed_token_ids, k::kSampleAllowed, &m.allowed_off, &m.num_allowed);
    if (r.num_output_tokens < r.min_tokens) take(r.num_stop_ids, k::kSampleStop, &m.stop_off, &m.num_stop);
    take(r.num_logit_bias, k::kSampleBias, &m.bias_off, &m.num_bias);
    if (r.repetition_penalty != 1.0f) {
      take(r.num_penalty_tokens, k::kSampleRepetition, &m.penalty_off, &m.num_penalty);
    }
    if (r.frequency_penalty != 0.0f || r.presence_penalty != 0.0f) {
      take(r.num_output_tokens, k::kSampleFreqPres, &m.output_off, &m.num_output);
    }
    m.count_slot = m.flags != 0 ? num_counts++ : -1;
    if (IsGreedy(r)) m.flags |= k::kSampleGreedy;
    if (r.logprobs >= 0) {
      m.flags |= k::kSampleLogprobs;
      any_logprobs = true;
    }
    m.x_slot = IsGreedy(r) ? -1 : Selects(r, vocab, s.select, prefix) ? kSelectedSlot : num_sorted++;
    if (m.x_slot == kSelectedSlot) {
      if (k::SampleSelectTopK(r.top_k, vocab)) {
        ++s.counters.top_k_selected;
      } else {
        ++*num_prefix;
      }
    }
  }
  const int32_t num_full_sort = num_sorted;  // selected rows take the sorted slots after these
  s.counters.sorted_whole += num_full_sort;
  for (k::SampleRowMeta& m : metas) {
    if (m.x_slot == kSelectedSlot) m.x_slot = num_sorted++;
  }
  for (k::SampleRowMeta& m : metas) {  // greedy rows with processing: x slots after the sorted
    if (m.x_slot < 0 && m.count_slot >= 0) m.x_slot = num_sorted + num_x++;
  }
  num_x += num_sorted;
  if (static_cast<int64_t>(num_sorted) * vocab >= INT32_MAX) {
    return absl::InvalidArgumentError(absl::StrCat("cuda backend: Sample: ", num_sorted,
                                                   " sampled rows of ", vocab, " ids exceed 2^31 sort items"));
  }

  // Staging: [metas][ints: lists, sort offsets, sorted rows][floats: bias values by int offset].
  const int64_t sort_ints = num_sorted > 0 ? 2 * num_sorted + 1 : 0;
  const size_t meta_bytes = Align16(sizeof(k::SampleRowMeta) * n);
  const size_t ints_bytes = Align16(sizeof(int32_t) * (num_ints + sort_ints));
  const size_t stage_bytes = meta_bytes + ints_bytes + sizeof(float) * num_ints;
  RETURN_IF_ERROR(CudaError(s.stage_host.Reserve(stage_bytes, s.retired), "pinned staging"));
  RETURN_IF_ERROR(CudaError(s.stage_dev.Reserve(stage_bytes, s.retired), "staging"));
  char* host = static_cast<char*>(s.stage_host.p);
  std::memcpy(host, metas.data(), sizeof(k::SampleRowMeta) * n);
  int32_t* ints = reinterpret_cast<int32_t*>(host + meta_bytes);
  float* floats = reinterpret_cast<float*>(host + meta_bytes + ints_bytes);
  for (int32_t i = 0; i < n; ++i) {
    const SamplingRow& r = rows[i];
    const k::SampleRowMeta& m = metas[i];
    auto put = [&](const int32_t* src, int64_t off, int64_t num) {
      if (num > 0) std::memcpy(ints + off, src, sizeof(int32_t) * num);
    };
    put(r.allowed_token_ids, m.allowed_off, m.num_allowed);
    put(r.stop_ids, m.stop_off, m.num_stop);
    put(r.penalty_tokens, m.penalty_off, m.num_penalty);
    put(r.output_tokens, m.output_off, m.num_output);
    if (m.num_bias > 0) {  // grouped by id, list order kept within an id
      s.bias_order.resize(m.num_bias);
      std::iota(s.bias_order.begin(), s.bias_order.end(), 0);
      std::stable_sort(s.bias_order.begin(), s.bias_order.end(), [&](int32_t a, int32_t b) {
        return r.logit_bias_ids[a] < r.logit_bias_ids[b];
      });
      for (int64_t j = 0; j < m.num_bias; ++j) {
        ints[m.bias_off + j] = r.logit_bias_ids[s.bias_order[j]];
        floats[m.bias_off + j] = r.logit_bias_values[s.bias_order[j]];
      }
    }
  }
  int32_t* sort_offsets = ints + num_ints;
  for (int32_t j = 0; j <= num_sorted && num_sorted > 0; ++j) sort_offsets[j] = static_cast<int32_t>(j * vocab);
  int32_t* sorted_rows = sort_offsets + num_sorted + 1;
  for (int32_t i = 0; i < n; ++i) {
    if (!(metas[i].flags & k::kSampleGreedy)) sorted_rows[metas[i].x_slot] = i;
  }
  RETURN_IF_ERROR(CudaError(cudaMemcpyAsync(s.stage_dev.p, host, stage_bytes, cudaMemcpyHostToDevice, stream),
                            "upload sampling rows"));

  // Workspaces.
  const size_t v = static_cast<size_t>(vocab);
  bool grown = false;
  RETURN_IF_ERROR(CudaError(s.counts.Reserve(sizeof(int32_t) * v * num_counts, s.retired, &grown), "sampling counts"));
  if (grown) RETURN_IF_ERROR(CudaError(s.counts.Zero(s.retired, stream), "clear counts"));
  RETURN_IF_ERROR(CudaError(s.greedy_counters.Reserve(sizeof(int32_t) * n, s.retired, &grown), "argmax counters"));
  if (grown) RETURN_IF_ERROR(CudaError(s.greedy_counters.Zero(s.retired, stream), "clear argmax counters"));
  RETURN_IF_ERROR(
      CudaError(s.greedy_parts.Reserve(k::SampleGreedyPartsBytes(n, vocab), s.retired), "argmax parts"));
  RETURN_IF_ERROR(CudaError(s.x.Reserve(sizeof(double) * v * num_x, s.retired), "sampling logits"));
  RETURN_IF_ERROR(CudaError(s.sorted_x.Reserve(sizeof(double) * v * num_sorted, s.retired), "sorted logits"));
  RETURN_IF_ERROR(CudaError(s.sorted_ids.Reserve(sizeof(int32_t) * v * num_sorted, s.retired), "sorted ids"));
  RETURN_IF_ERROR(CudaError(s.iota.Reserve(sizeof(int32_t) * v * num_sorted, s.retired, &grown), "sort ids"));
  if (num_sorted > 0 && (grown || s.iota_vocab != vocab || s.iota_rows < num_sorted)) {
    s.iota_vocab = vocab;
    s.iota_rows = static_cast<int32_t>(s.iota.bytes / (sizeof(int32_t) * v));
    RETURN_IF_ERROR(CudaError(k::LaunchSampleIota(static_cast<int32_t*>(s.iota.p), s.iota_rows, vocab, stream),
                              "sort ids"));
  }
  const size_t temp = k::SampleSortTempBytes(num_full_sort, vocab);
  if (num_full_sort > 0 && temp == 0) return absl::InternalError("cuda backend: Sample: sort workspace query failed");
  RETURN_IF_ERROR(CudaError(s.sort_temp.Reserve(temp, s.retired), "sort workspace"));
  const int32_t num_selected = num_sorted - num_full_sort;
  s.counters.prefix += *num_prefix;
  const size_t parts_at = Align16((sizeof(double) + sizeof(int32_t)) * num_selected);
  RETURN_IF_ERROR(CudaError(
      s.select_stats.Reserve(parts_at + sizeof(k::SampleSelectPart) * k::kSampleSelectMaxParts * num_selected, s.retired),
      "selection sums"));
  if (s.num_sms < 0) {
    int device = 0, sms = 0;
    RETURN_IF_ERROR(CudaError(cudaGetDevice(&device), "get device"));
    RETURN_IF_ERROR(CudaError(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "SM count"));
    s.num_sms = s.split ? sms : 0;
  }
  const int32_t stride = SampleOutput::kStride;
  const size_t out_bytes = (4 + 2 * static_cast<size_t>(stride)) * sizeof(int32_t) * n;
  RETURN_IF_ERROR(CudaError(s.out_dev.Reserve(out_bytes, s.retired), "sampling outputs"));
  RETURN_IF_ERROR(CudaError(s.out_host.Reserve(out_bytes, s.retired), "pinned sampling outputs"));

  k::SampleArgs a;
  a.num_rows = n;
  a.num_sorted = num_sorted;
  a.num_selected = num_selected;
  a.any_counts = num_counts > 0;
  a.any_x = num_x > 0;
  a.any_logprobs = any_logprobs;
  a.vocab = vocab;
  a.logits = logits.as<const float>();
  a.logits_ld = logits.stride();
  char* dev = static_cast<char*>(s.stage_dev.p);
  a.rows = reinterpret_cast<const k::SampleRowMeta*>(dev);
  a.ints = reinterpret_cast<const int32_t*>(dev + meta_bytes);
  a.floats = reinterpret_cast<const float*>(dev + meta_bytes + ints_bytes);
  a.sort_offsets = a.ints + num_ints;
  a.sorted_rows = a.sort_offsets + num_sorted + 1;
  a.counts = static_cast<int32_t*>(s.counts.p);
  a.x = static_cast<double*>(s.x.p);
  a.sorted_x = static_cast<double*>(s.sorted_x.p);
  a.iota = static_cast<const int32_t*>(s.iota.p);
  a.sorted_ids = static_cast<int32_t*>(s.sorted_ids.p);
  a.sort_temp = s.sort_temp.p;
  a.sort_temp_bytes = s.sort_temp.bytes;
  a.greedy_counters = static_cast<int32_t*>(s.greedy_counters.p);
  a.greedy_parts = s.greedy_parts.p;
  a.select_sum = static_cast<double*>(s.select_stats.p);
  a.select_cand = reinterpret_cast<int32_t*>(a.select_sum + num_selected);
  a.select_parts = reinterpret_cast<k::SampleSelectPart*>(static_cast<char*>(s.select_stats.p) + parts_at);
  a.num_sms = s.num_sms;
  int32_t* od = static_cast<int32_t*>(s.out_dev.p);
  a.tokens = od;
  a.non_finite = od + n;
  a.logprob = reinterpret_cast<float*>(od + 2 * n);
  a.rank = od + 3 * n;
  a.top_ids = od + 4 * n;
  a.top_logprobs = reinterpret_cast<float*>(od + 4 * n + static_cast<size_t>(stride) * n);
  a.top_stride = stride;
  RETURN_IF_ERROR(CudaError(k::LaunchSample(a, stream), "sample kernels"));

  const size_t back = any_logprobs ? out_bytes : 2 * sizeof(int32_t) * n;  // tokens, non_finite
  RETURN_IF_ERROR(CudaError(cudaMemcpyAsync(s.out_host.p, s.out_dev.p, back, cudaMemcpyDeviceToHost, stream),
                            "download samples"));
  if (s.downloaded == nullptr) {
    RETURN_IF_ERROR(CudaError(cudaEventCreateWithFlags(&s.downloaded, cudaEventDisableTiming), "sample event"));
  }
  RETURN_IF_ERROR(CudaError(cudaEventRecord(s.downloaded, stream), "sample event"));
  s.pass.n = n;
  s.pass.vocab = vocab;
  s.pass.any_logprobs = any_logprobs;
  s.pass.tops.clear();
  if (any_logprobs) {
    for (const SamplingRow& r : rows) s.pass.tops.push_back(r.logprobs);
  }
  return absl::OkStatus();
}

absl::Status SampleRowsFinish(CudaSampler& s, SampleOutput* out) {
  RETURN_IF_ERROR(CudaError(cudaEventSynchronize(s.downloaded), "sample synchronize"));
  const int32_t n = s.pass.n;
  const int64_t vocab = s.pass.vocab;
  const int32_t stride = SampleOutput::kStride;
  const int32_t* oh = static_cast<const int32_t*>(s.out_host.p);
  std::memcpy(out->tokens.data(), oh, sizeof(int32_t) * n);
  for (int32_t i = 0; i < n; ++i) out->non_finite[i] = oh[n + i] != 0 ? 1 : 0;
  if (s.pass.any_logprobs) {
    const float* lp = reinterpret_cast<const float*>(oh + 2 * n);
    const int32_t* rank = oh + 3 * n;
    const int32_t* top_ids = oh + 4 * n;
    const float* top_lp = reinterpret_cast<const float*>(oh + 4 * n + static_cast<size_t>(stride) * n);
    for (int32_t i = 0; i < n; ++i) {
      const int32_t top = s.pass.tops[i];
      if (top < 0) continue;
      out->logprobs[i] = lp[i];
      out->ranks[i] = rank[i];
      const size_t at = static_cast<size_t>(i) * stride;
      const size_t cnt = static_cast<size_t>(std::min<int64_t>(top, vocab));
      std::memcpy(&out->top_ids[at], top_ids + at, sizeof(int32_t) * cnt);
      std::memcpy(&out->top_logprobs[at], top_lp + at, sizeof(float) * cnt);
    }
  }
  return absl::OkStatus();
}

}  // namespace

}  // namespace lorc::cuda_internal

namespace lorc {

absl::StatusOr<CudaSampleCounters> GetCudaSampleCounters(const Backend& backend) {
  const auto* cuda = dynamic_cast<const cuda_internal::CudaBackend*>(&backend);
  if (cuda == nullptr) return absl::InvalidArgumentError("GetCudaSampleCounters: not a CUDA backend");
  return cuda->sample_counters();
}

}  // namespace lorc
#endif
