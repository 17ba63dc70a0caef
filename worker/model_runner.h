// Runs the Llama forward pass for one step of a batch of sequences over the paged KV cache.
//
// A step carries, per sequence, the new tokens to compute (a prefill chunk or one decode token),
// how many tokens of it are already computed (cached), and its block table (covering all of
// them). The runner writes the new tokens' K/V into the cache and returns logits for the rows
// asked for. It owns the cache memory, the weights and the step buffers; block allocation belongs
// to the caller (kvstore/KvBlockManager). One thread calls it at a time.
//
// Step buffers at fixed addresses: every scratch activation and every metadata array (ids,
// positions, slot_mapping, query_start, seq_lens, block tables, logit rows) is allocated ONCE in
// Create for max_num_seqs / max_num_batched_tokens / max_model_len and never moves, so a decode
// step can be captured as a CUDA graph and replayed with refreshed contents. A step over those
// limits fails with InvalidArgument naming the limit.
//
// CUDA graphs (backends with SupportsGraphs(), unless KvCacheOptions::enforce_eager): at start-up
// the forward pass of a pure-decode step (every sequence one new token, one logit row) is captured
// once per padded batch size (DecodeGraphSizes); their memory is measured before the KV cache is
// sized (a probe capture of the largest size) so it counts against gpu_memory_utilization. A pure-decode step of n sequences replays the
// graph of the smallest size >= n with its metadata copied into the fixed buffers; padding rows
// have token 0, position 0, slot -1 (no KV write) and are not attention sequences; their logit
// rows are computed and ignored. Prefill and mixed steps run eagerly.
// LoRC layers (kvstore KvRope::kAtAttention; ModelConfig::lorc; model_runner_latent.cc): qkv
// matmul (q, key latents, value latents) -> RoPE on q only + the latents written unrotated ->
// Backend::LatentAttention (keys reconstructed and rotated per position) -> o matmul over the
// r_v-wide outputs. Backends without latent attention (CUDA for now) fail Create with
// Unimplemented naming the backend.
// With tensor parallelism every rank must take the same path for a step (a graph of n padded rows
// and an eager step of fewer rows all-reduce different sizes: NCCL hangs), so the choice depends
// only on the plan's shape (DecodeGraphIndex), never on which logits this rank wants: a graph step
// computes a logit row for every sequence, also on ranks that do not sample.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <vector>

#include "kvpolicy/sequence_policy.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "common/defaults.h"
#include "kvstore/kv_block_manager.h"
#include "kvstore/kv_spec.h"
#include "backend/backend.h"
#include "model/model_config.h"
#include "model/weights.h"
#include "step/step.h"

namespace lorc {

class Communicator;

struct SequenceStep {
  int64_t seq_id = 0;
  std::vector<int32_t> tokens;       // new tokens, computed at positions [num_computed_tokens, ...)
  int64_t num_computed_tokens = 0;   // tokens already in the cache for this sequence
  std::vector<int32_t> block_table;  // covers num_computed_tokens + tokens.size() - slot_offset slots
  // Positions minus cache slots: the slots a token-level KV policy's compactions gave back
  // (kvpolicy/README.md "Compaction"); token p is written to slot p - slot_offset of the table.
  int64_t slot_offset = 0;
  enum class Logits : uint8_t { kNone, kLast, kAll } logits = Logits::kLast;
  // For a token-level KV policy (kvpolicy/; StepExecutor fills both). prompt_len: the request's
  // prompt tokens; with --kv-policy-prefill after-prompt the policy chooses only after steps
  // that reach it (prompt_done()); 0 (callers without a notion of a prompt): every step does.
  // session: the request's prompt is pinned (ScheduledSequence::session).
  int64_t prompt_len = 0;
  bool session = false;
  // Launch-ahead (StepExecutor): >= 0 when the last of `tokens` is a placeholder for the previous
  // step's draw `draw_index`, still on the device (Execute's `drawn_tokens`); -1: every token is
  // known on the host.
  int32_t draw_index = -1;
  bool prompt_done() const {
    return num_computed_tokens + static_cast<int64_t>(tokens.size()) >= prompt_len;
  }
};

struct StepOutput {
  int64_t vocab_size = 0;
  // Host logit rows in step order: for each sequence, none, its last token's, or one per new
  // token. Filled when Execute is asked for host logits, or when the rows take more than one
  // LM-head pass (max_num_seqs rows); empty otherwise.
  std::vector<float> logits;
  std::vector<int32_t> row_begin;  // per sequence: first row in `logits` (rows of s: [begin[s], begin[s+1]))
  // The logits for sampling, in backend memory (device memory on CUDA; what Backend::Sample
  // reads): F32 [rows, vocab_size]. Valid until the runner's next Execute.
  Tensor2D device_logits;
  // Per sequence: the row of `device_logits` holding its last logit row; -1 when it has none.
  // When all rows fit one LM-head pass, device_logits holds every row and this is
  // row_begin[s + 1] - 1; otherwise it holds only these last rows, one per sequence.
  std::vector<int32_t> sample_row;
  const float* Row(int64_t r) const { return logits.data() + r * vocab_size; }
};

class ModelRunner {
 public:
  // `comm` may be null when tp_size is 1; it must outlive the runner. `spec` gives the KV
  // geometry (kvstore/MakeKvCacheSpec); its num_blocks is ignored: the runner sizes the cache from
  // `kv`. InvalidArgument for limits that are not positive, a max_model_len over the model's
  // context, or a spec that does not match this rank's KV heads; ResourceExhausted when memory
  // is short.
  // Waits for host KV copies still in flight (a failed step's) before the memory goes.
  ~ModelRunner();
  static absl::StatusOr<std::unique_ptr<ModelRunner>> Create(const ModelConfig& config,
                                                             ModelWeights weights,
                                                             Backend* backend, Communicator* comm,
                                                             const KvCacheSpec& spec,
                                                             const KvCacheOptions& kv);

  // Runs the step on the backend's stream and, with StepSync::kComplete, waits for it.
  // `host_logits`: also copy every logit row to StepOutput::logits (tests, prompt
  // log-probabilities); without it the logits stay in backend memory (StepOutput::device_logits)
  // for Backend::Sample. StepSync::kEnqueued (StepExecutor, on a step it draws from): a step whose
  // results all stay in backend memory (no host logits, one LM-head pass, no KV policy) returns
  // once it is enqueued, so the caller prepares the draw while the forward pass runs;
  // device_logits are then valid in the stream's order (Backend::Sample, which waits for its own
  // results), and the next Execute waits for the metadata uploads (an event recorded after them)
  // before it rewrites the staged metadata.
  // Other steps complete either way.
  // InvalidArgument for malformed steps (token ids outside the vocabulary, block tables that do
  // not cover the tokens or name blocks outside the cache, positions past max_model_len) and for
  // steps over max_num_seqs or max_num_batched_tokens.
  // `drawn_tokens` (backend memory, Backend::BeginSample's): where the input ids of steps with a
  // draw_index >= 0 are taken from on the device (Backend::TakeDrawnTokens, after the metadata
  // upload); InvalidArgument when a step has one and it is null.
  enum class StepSync : uint8_t { kComplete, kEnqueued };
  absl::StatusOr<StepOutput> Execute(absl::Span<const SequenceStep> steps, bool host_logits = true,
                                     StepSync sync = StepSync::kComplete,
                                     const int32_t* drawn_tokens = nullptr);
  // The per-sequence checks of Execute (everything but duplicate ids across the batch), so a
  // caller can leave a bad sequence out of the batch instead of failing all of it.
  absl::Status ValidateSequence(const SequenceStep& s) const;
  // Copy-on-write block copies requested by the block manager, all layers, one backend call.
  absl::Status CopyBlocks(absl::Span<const BlockCopy> copies);

  // Host KV tier (issue #10; StepPlan::kv_offloads / kv_loads). Enqueues device block -> host
  // slot copies, then slot -> block copies (Backend::OffloadKvBlocks / LoadKvBlocks: each list in
  // order, every layer, K and V, the blocks' exact bytes). Both lists are checked first:
  // FailedPrecondition when the runner has no host tier and a list is not empty, InvalidArgument
  // naming the list and entry for a block outside [0, num_blocks) or a slot outside [0,
  // num_host_blocks); nothing is copied then. The copies run on the backend's copy stream; the
  // next CopyBlocks waits for all of them, the next Execute for all of them when its sequences
  // read or write a loaded block or write an offloaded one (otherwise they overlap with its
  // forward pass, e.g. loads for a request the next plan schedules). Call
  // FinishHostKvTransfers() at the end of the step (StepExecutor does): every copy of a step is
  // complete when it ends.
  absl::Status TransferHostKv(absl::Span<const HostBlockCopy> offloads,
                              absl::Span<const HostBlockCopy> loads);
  // TransferHostKv's checks alone (nothing copied).
  absl::Status CheckHostKv(absl::Span<const HostBlockCopy> offloads,
                           absl::Span<const HostBlockCopy> loads) const;
  // The host waits for the copies of TransferHostKv (no-op when none is pending).
  absl::Status FinishHostKvTransfers();
  // Slots of the host tier (KvCacheOptions::kv_offloading_bytes / kv_spec().BytesPerBlock()); 0:
  // none. What the worker reports as LoadModelResponse.num_host_blocks.
  int32_t num_host_blocks() const { return host_kv_.num_slots(); }
  // The host tier's memory (tests read slots after FinishHostKvTransfers).
  const HostKvStorage& host_kv() const { return host_kv_; }

  const KvCacheSpec& kv_spec() const { return kv_spec_; }
  // Layer l's KV cache arrays (backend memory: host memory on the CPU backend) in the layout of
  // kv_spec() (kvstore/kv_spec.h), for tests that read the cache bytes. l in [0, num_layers).
  const KvLayer& kv_cache_layer(int l) const { return kv_layers_[l]; }
  const KvCacheOptions& limits() const { return limits_; }
  const ModelConfig& config() const { return config_; }
  const ShardLayout& shard() const { return weights_.shard; }
  // With a sharded LM head every rank must ask for the same logit rows (they all-gather them).
  bool lm_head_sharded() const { return weights_.shard.lm_head_sharded; }
  Backend& backend() { return *backend_; }
  // Device addresses of every step buffer (activations, metadata, logits), for tests and graph
  // debugging: constant for the runner's lifetime.
  std::vector<const void*> StepBufferAddresses() const;
  // Steps of at most this many tokens hand their norms to the backend's fused projections
  // (Backend::FusesNormMatmul; 0: none).
  int64_t fused_norm_rows() const { return fused_norm_rows_; }
  // Decode steps of at most this many tokens take the folded norms (FoldNormWeights; 0: none).
  int64_t fold_rows() const { return fold_rows_; }
  // Padded batch sizes captured as decode graphs (ascending; empty when running eagerly).
  const std::vector<int32_t>& decode_graph_sizes() const { return graph_sizes_; }
  // Steps of this runner's lifetime replayed from a graph / run eagerly.
  int64_t num_graph_steps() const { return num_graph_steps_; }
  int64_t num_eager_steps() const { return num_eager_steps_; }
  // Device memory the start-up capture took out of the KV budget (0 without graphs).
  int64_t graph_memory_bytes() const { return graph_memory_bytes_; }
  // Offline calibration (compress/): called in Forward after layer `layer`'s input norm with its
  // output, F32 [T, hidden] in host memory (row stride normed_input.stride()), valid only during
  // the call. CPU backend only (FailedPrecondition otherwise); an empty function removes it.
  using LayerInputObserver = std::function<void(int layer, const Tensor2D& normed_input)>;
  absl::Status SetLayerInputObserver(LayerInputObserver observer);
  // Token-level KV policy (KvCacheOptions::kv_policy, kvpolicy/): the per-sequence states, made
  // by Execute for each sequence it runs; null when the policy is none.
  kvpolicy::KvPolicyStore* kv_policy() { return kv_policy_.get(); }
  // Positions this rank's device-resident policy states may hold together, set aside from the KV
  // budget at load (kvpolicy/state_memory.h; LoadModelResponse::kv_policy_max_positions); 0: no
  // limit (no policy, or states in host memory).
  int64_t kv_policy_max_positions() const { return kv_policy_max_positions_; }
  // The request ended, was preempted or failed: its policy state goes (its counts into the
  // store's stats). No-op without a policy or for an unknown id.
  void ReleaseKvPolicy(int64_t seq_id) {
    if (kv_policy_) kv_policy_->Release(seq_id);
  }
  // A fork child continues its parent's policy state (KvPolicyStore::Fork); no-op without one.
  void ForkKvPolicy(int64_t parent, int64_t child) {
    if (kv_policy_) kv_policy_->Fork(parent, child);
  }
  // Compaction (StepPlan::kv_compactions; kvpolicy/README.md "Compaction") of sequence `seq_id`,
  // `num_computed_tokens` computed, to `num_slots` cache slots. CheckKvCompaction: FailedPrecondition
  // without a policy, for a sequence without a state or whose state disagrees with
  // num_computed_tokens, or num_slots outside [the slots its kept keys need on this rank, the
  // slots it holds]. CompactKv (after the check) moves the keys within `block_table` (the
  // sequence's table before the compaction; Backend::CompactKvHeads, MiKV's low entries packed
  // after each head's full run) and updates the state.
  absl::Status CheckKvCompaction(int64_t seq_id, int64_t num_computed_tokens, int64_t num_slots) const;
  absl::Status CompactKv(int64_t seq_id, absl::Span<const int32_t> block_table, int64_t num_slots);
  // The report (step/step.h KvSlotReport) of a sequence with a policy state; nullopt without one.
  std::optional<KvSlotReport> KvSlots(int64_t seq_id) const;

 private:
  ModelRunner(const ModelConfig& config, ModelWeights weights, Backend* backend, Communicator* comm)
      : config_(config), weights_(std::move(weights)), backend_(backend), comm_(comm) {}
  absl::Status Init(const KvCacheSpec& spec, const KvCacheOptions& kv);
  absl::Status AllocateStepBuffers();
  // Backend::FoldedNormRows > 0, BF16 weights, one rank: the input norms' weights folded into the
  // qkv projections of full-attention layers and the post-attention norms' into gate_up
  // (Backend::ScaleColumns), ones_ and sum_squares_ allocated, fold_rows_ set. Otherwise nothing.
  absl::Status FoldNormWeights();
  absl::Status AllocateCache(const KvCacheOptions& kv, int64_t reserve_bytes);
  // After AllocateCache: the host tier of kv.kv_offloading_bytes (none when 0).
  absl::Status AllocateHostKv(const KvCacheOptions& kv);
  // Before a forward pass over `steps`: the compute stream waits for the pending host KV copies
  // when the step reads or writes a loaded block or writes an offloaded one.
  absl::Status WaitHostKvBefore(absl::Span<const SequenceStep> steps);
  void ForgetHostKvBlocks();
  // Layer l's KvLayer over the arrays k and v (dtype, quantization, heads, block size of the spec).
  KvLayer CacheLayer(int l, void* k, void* v) const;
  absl::Status Validate(absl::Span<const SequenceStep> steps) const;
  absl::Status AllReduce(Tensor2D t);
  // Logits of the rows `x[rows[i]]` for i in [0, n) (n <= max_logit_rows_) into `logits_` (F32
  // [n, vocab], backend memory): gather, final norm, one matmul, or with a sharded LM head a
  // matmul over this rank's vocabulary slice, an all-gather and a row gather that puts each row's
  // slices side by side.
  absl::Status ComputeLogits(const Tensor2D& x, const int32_t* rows, int64_t n);
  // Enqueues the forward pass over the uploaded metadata: T token rows, logits of the first
  // `num_rows` entries of the logit-row list (num_rows <= max_logit_rows_) into logits_. The
  // residual stream ends in final_x_ (x_, or x_alt_ when the add + norms were fused into the
  // GEMVs: Backend::FusesNormMatmul, T <= fused_norm_rows_, with an all-reduce across ranks; on
  // one rank the o and down projections add into x_ instead, Backend::MatmulAdd).
  absl::Status Forward(int32_t T, int32_t num_rows);
  // Start-up (model_runner_graphs.cc). Writes, uploads and plans a dummy step of `tokens` padding
  // rows (slot -1: no KV write) in `seqs` attention sequences of (nearly) equal length, each a
  // prefill from position 0 whose block table is all block 0; seqs == tokens: a decode step (one
  // sequence of length 1 per row). tokens <= max_num_batched_tokens, seqs <= max_num_seqs,
  // tokens / seqs (rounded up) <= max_model_len.
  absl::Status PrepareDummyStep(int32_t tokens, int32_t seqs);
  // A one-block cache per layer in kv_layers_ (the returned buffers), standing in for the real
  // cache before AllocateCache: dummy steps write nothing and read block 0.
  absl::StatusOr<std::vector<DeviceBuffer>> AttachProbeCache();
  // Backends with TimesMatmulAtFirstUse(): one dummy forward pass per MatmulWarmUpSizes entry,
  // largest first, so that each of the backend's token-count buckets is timed at the largest
  // count a step of that bucket can have, whatever max_num_seqs is and whichever step comes
  // first (bucket 64 timed at the decode graph of 40 rows made the 8B batch-64 step 13 % slower
  // on an H200; docs/PERFORMANCE.md). Counts up to max_logit_rows_ run as
  // decode steps with their LM head; larger ones as prefill steps without (LM-head rows never
  // exceed max_logit_rows_). Over the probe cache.
  absl::Status WarmUpMatmuls();
  // Runs the dummy step of size n eagerly once (matmul algorithms are chosen outside capture),
  // then captures it.
  absl::StatusOr<std::unique_ptr<Graph>> CaptureDecode(int32_t n);
  // Before AllocateCache, over the probe cache: the memory of the largest graph times the number
  // of sizes; subtracted from the KV budget.
  absl::StatusOr<int64_t> MeasureGraphMemory();
  absl::Status CaptureDecodeGraphs();
  // The graph index for a step of `steps` when it is pure decode and fits; -1 otherwise.
  int FindDecodeGraph(absl::Span<const SequenceStep> steps) const;
  // LoRC latent layers (model_runner_latent.cc).
  bool IsLatent(int layer) const { return kv_spec_.rope_at(layer) == KvRope::kAtAttention; }
  // At Init: the backend runs latent attention (Unimplemented naming it otherwise), the layer's
  // widths are this rank's KV heads x the ranks of config.lorc, its k_up was loaded.
  absl::Status CheckLatentLayer(int layer) const;
  // The attention block of latent layer `layer` over T rows: reads h, writes o(attention) to h.
  absl::Status LatentAttentionBlock(int layer, int32_t T, const Tensor2D& h);
  Tensor2D Weight(const DeviceBuffer& b, int64_t rows, int64_t cols) const;
  Tensor2D Act(const DeviceBuffer& b, int64_t rows, int64_t cols) const;

  ModelConfig config_;
  ModelWeights weights_;
  Backend* backend_;
  Communicator* comm_;
  KvCacheSpec kv_spec_;
  KvCacheOptions limits_;
  DType act_dtype_ = DType::kF32;  // activations (and the auto KV cache): the weights' dtype (Backend::compute_dtype)
  int32_t max_blocks_per_seq_ = 0;
  int32_t max_logit_rows_ = 0;     // logit rows per LM-head pass
  std::vector<DeviceBuffer> k_cache_, v_cache_;
  std::vector<KvLayer> kv_layers_;
  // Host KV tier: its memory; transfers enqueued and not yet waited for by the host
  // (host_kv_pending_); the blocks offloaded / loaded by them that the compute stream has not
  // waited for yet.
  HostKvStorage host_kv_;
  bool host_kv_pending_ = false;
  absl::flat_hash_set<int32_t> host_kv_offloaded_, host_kv_loaded_;
  DeviceBuffer inv_freq_;
  std::unique_ptr<AttentionPlan> plan_;
  std::unique_ptr<kvpolicy::KvPolicyStore> kv_policy_;
  std::vector<kvpolicy::SequenceKvPolicy*> policy_seqs_;  // this step's, batch order
  // Device-resident states (InitKvPolicy, AllocateCache): their memory per position and the
  // backend's reserve (Backend::KvPolicyMemory), the positions per cache slot they are sized for,
  // and the resulting limit.
  Backend::KvPolicyStateMemory kv_policy_memory_;
  double kv_policy_positions_per_slot_ = 0;
  int64_t kv_policy_max_positions_ = 0;
  // At Init: the store for kv.kv_policy (none: nothing), or Unimplemented / InvalidArgument.
  absl::Status InitKvPolicy(const KvCacheOptions& kv);
  // After the forward pass of a step: a device-resident policy's choice and counts
  // (Backend::KvPolicyEndStep); no-op otherwise.
  absl::Status EndKvPolicyStep();

  // Step buffers, allocated once (see the header comment). `meta_` holds the int32 metadata at
  // fixed offsets; `meta_host_` is its pinned host staging mirror.
  struct MetaLayout {
    int64_t ids, positions, slots, query_start, seq_lens, tables, logit_rows, drawn_pairs, total;
  } meta_at_{};
  DeviceBuffer x_, h_, qkv_, attn_, gate_up_, act_, rows_, logits_, logits_local_, meta_, meta_host_;
  // The residual stream's second buffer for steps whose norms are fused into the projections
  // (each fused add stores the stream into the other buffer; used only across ranks):
  // fused_norm_rows_ rows, the most tokens for which the backend FusesNormMatmul (0: none, not
  // allocated).
  DeviceBuffer x_alt_;
  int64_t fused_norm_rows_ = 0;
  // Folded norms (FoldNormWeights): decode steps of at most fold_rows_ tokens pass MatmulAdd's
  // partial sums of squares of the stream (sum_squares_, fp32 [fold_rows_, ceil(H / 16)]) to the
  // qkv and gate_up projections; every norm whose weight was folded runs with ones_ ([H], all
  // ones) instead. fold_rows_ 0: not folded.
  int64_t fold_rows_ = 0;
  DeviceBuffer ones_, sum_squares_;
  Tensor2D final_x_;  // where the last Forward left the residual stream
  // Sharded LM head only: the all-gather's output ([tp][n][V/tp], F32) and the row indices
  // 0 .. tp * R - 1 (int32) that GatherRows uses to interleave it into logits_.
  DeviceBuffer gathered_, gather_iota_;

  std::vector<int32_t> graph_sizes_;
  std::vector<std::unique_ptr<Graph>> graphs_;  // graphs_[i] runs a decode step of graph_sizes_[i] rows
  int64_t num_graph_steps_ = 0, num_eager_steps_ = 0, graph_memory_bytes_ = 0;
  // Execute's metadata uploads from meta_host_ may still be pending (set before them, cleared by
  // the Synchronize of a completed step): a step that returned enqueued (StepSync::kEnqueued) or
  // failed after the uploads. The next Execute waits for them before it rewrites the mirror.
  bool meta_in_flight_ = false;
  // Recorded after the uploads (meta_recorded_: in this step, after the last uploads began).
  std::unique_ptr<Event> meta_uploaded_;
  bool meta_recorded_ = false;
  LayerInputObserver layer_input_observer_;
};

// Token counts of ModelRunner's start-up matmul warm-up, descending: `max_num_batched_tokens`,
// every power of two below it and `max_rows` (the largest decode step), each once.
std::vector<int32_t> MatmulWarmUpSizes(int32_t max_num_batched_tokens, int32_t max_rows);

// Padded batch sizes for decode graphs, vLLM-style: 1, 2, 4, then multiples of 8 up to
// `max_rows`, and `max_rows` itself (the largest decode step).
std::vector<int32_t> DecodeGraphSizes(int32_t max_rows);

// The index into `graph_sizes` (ascending) of the graph that runs `steps`: the smallest size >=
// steps.size() when every sequence has exactly one new token; -1 when the step must run eagerly
// (empty, a prefill chunk, more sequences than the largest graph). It depends only on token
// counts, which every tensor-parallel rank sees alike, never on the logits a rank asks for (kNone
// on ranks that do not sample, kAll for prompt log-probabilities on the sampling rank): with one
// new token, kLast and kAll are the same single row, which the graph computes for every sequence.
int DecodeGraphIndex(absl::Span<const SequenceStep> steps, absl::Span<const int32_t> graph_sizes);

}  // namespace lorc
