// Executes StepPlans on one tensor-parallel rank. Owns the per-request state the incremental
// step protocol (step/step.h) relies on: each request's token history, block table, number of
// computed tokens and sampler. Runs the forward pass for the requests that pass validation; a
// request that does not (unknown id, token or block id out of range, computed-token count that
// disagrees with this rank's, bad sampling params) is left out of the batch, its state dropped,
// and reported in StepResult::failed: it fails alone.
//
// Sampling: rank 0 samples, with the backend's sampler (Backend::Sample: one call per step for
// every sampling request, from each request's own counter-based stream, worker/sampler.h; the
// model's EOS ids come from the runner's config); with tensor parallelism it broadcasts the
// sampled ids to the other ranks (one small collective per sampling step), so every rank appends
// the same token to its history and a later plan never has to carry it (async scheduling).
// Validation depends only on the plans, so every rank drops the same requests and the
// collectives stay matched. Log-probabilities (sampled tokens and prompt tokens) follow
// backend/sampling.h (raw distribution, rank, top-N). A draw whose logits row holds a NaN or an
// infinity (SampleOutput::non_finite), or whose request's prompt log-probabilities came from such a
// row in this step or an earlier chunk, gives no token: the request fails alone, INTERNAL naming
// the position, on every rank (the broadcast carries the verdict), its fork children unmade.
//
// Parallel sampling (ScheduledSequence::fork_child_ids): on the request's sampling step, one row
// per completion reads the same logits; child i (1-based position in fork_child_ids) gets its
// own Sampler (seed + i when seeded), the parent's prompt, block table (shared blocks), computed
// count and prompt length, plus its own sampled token; every rank forks identically (the
// children's ids are in the broadcast). Copy-on-write: replace_last_block swaps the table's last
// entry before new_block_ids are appended (plan.copies have copied the data before the forward
// pass). Host KV tier: plan.kv_offloads then plan.kv_loads run before plan.copies
// (ModelRunner::TransferHostKv); a bad block id or slot fails the step as a whole (nothing copied,
// no state changed); every copy has completed when Execute returns. KV policy compactions
// (plan.kv_compactions) run first of all, after the host copies and block copies are checked.
// After the step, every scheduled sequence with a KV policy state and no session is reported in
// StepResult::kv_slots (this rank's KV heads).
//
// Used in-process by the local engine and inside every worker process (on its device thread).
// One thread at a time.
#pragma once

#include <chrono>
#include <cstdint>
#include <deque>
#include <memory>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "worker/model_runner.h"
#include "worker/sampler.h"
#include "step/step.h"

namespace lorc {

class Communicator;

class StepExecutor final : public StepRunner {
 public:
  // `runner` (and `comm`, which may be null when tensor parallelism is 1) must outlive the
  // executor. `max_in_flight`: plans Submit accepts before Await.
  explicit StepExecutor(ModelRunner* runner, Communicator* comm = nullptr, int max_in_flight = 2);

  // Runs one plan (Submit + Await; FailedPrecondition while submitted steps are not awaited).
  // Errors (the step as a whole failed; the per-request state is unchanged): FailedPrecondition
  // for a step_id that does not follow the previous one; whatever the runner, the backend or the
  // communicator returned.
  absl::StatusOr<StepResult> Execute(const StepPlan& plan);

  // StepRunner. A step runs in three phases: launch (checks, state, the forward pass enqueued),
  // draw begun (Backend::BeginSample, a placeholder token per drawing request), draw finished
  // (the tokens on the host, forks, failures: the result). Submit launches the plan; the step
  // before it, if still drawing, finishes first, unless the plan can be launched ahead of it
  // (launch-ahead, vLLM's async scheduling, ENGINE.md 1.3: one rank, max_in_flight >= 2, no KV
  // policy, LORC_DISABLE_LAUNCH_AHEAD unset; the plan moves no blocks, and ends, preempts, forks
  // or re-admits none of the drawing requests): then its forward pass takes those requests'
  // input ids from the draw on the device (ModelRunner::Execute's drawn_tokens), and its own draw
  // begins when the earlier step is awaited. Await finishes the oldest step and returns its
  // result (or the error that stopped it). Tokens, log-probabilities and per-request state are
  // the same as with one step at a time (each draw reads its request's complete history; parity
  // tests in step_executor_test and cuda_model_runner_test); one difference: a request whose draw
  // fails (non-finite logits) under a step launched ahead is dropped from that step silently,
  // where one step at a time that step would report it again as unknown. StepResult::compute_us
  // counts the step's own phases, idle_us the time since the step before finished (0 when
  // launched ahead of it).
  absl::Status Submit(const StepPlan& plan) override;
  absl::StatusOr<StepResult> Await() override;
  int max_in_flight() const override { return max_in_flight_; }

  size_t num_sequences() const { return seqs_.size(); }
  // Steps Submit launched ahead of the step before (tests, diagnostics).
  int64_t num_launched_ahead() const { return num_launched_ahead_; }
  // A request's token history on this rank (prompt + generated); empty when unknown.
  std::vector<int32_t> Tokens(int64_t seq_id) const;
  ModelRunner& runner() { return *runner_; }

 private:
  struct SeqState {
    std::unique_ptr<Sampler> sampler;
    std::vector<int32_t> tokens;       // every token known (prompt + generated)
    std::vector<int32_t> block_table;
    int64_t num_computed_tokens = 0;
    int64_t slot_offset = 0;        // positions minus cache slots (KV policy compactions)
    int64_t prompt_len = 0;         // tokens given on first sight (a fork: its parent's)
    bool session = false;           // ScheduledSequence::session on first sight (a fork: false)
    int32_t prompt_logprobs = -1;   // -1: off; N: the prompt tokens' log-probabilities + top N
    // Rank 0: the first position whose prompt log-probabilities came from logits with a NaN or an
    // infinity, or -1; the request fails at its next draw (every rank learns it from the broadcast).
    int64_t broken_logits_at = -1;
    // While a step's draw for this request is begun and not finished: its index among that draw's
    // rows (tokens.back() is a placeholder for it); -1 otherwise.
    int32_t pending_draw = -1;
  };
  // A submitted step until Await returns it.
  struct InFlight {
    enum class Phase : uint8_t { kLaunched, kDrawing, kDone } phase = Phase::kLaunched;
    absl::Status error;  // the step as a whole failed (in any phase): Await returns it
    StepResult result;
    std::chrono::steady_clock::time_point t0;
    std::vector<int64_t> scheduled;  // the plan's sequences that passed validation, step order
    Tensor2D device_logits;          // the forward pass's logits, for the draw
    struct Draw {
      int64_t seq_id;
      int64_t parent = -1;    // a fork child: its parent's id
      int32_t row = 0;        // its logits row
      int64_t position = -1;  // the drawn token's position (BeginDraw; named if the draw fails)
    };
    std::vector<Draw> draws;  // a request's, then its fork children's
    std::vector<std::unique_ptr<Sampler>> child_samplers;  // parallel to the children's draws
    const int32_t* drawn = nullptr;  // kDrawing: Backend::BeginSample's tokens (rank 0)
    std::chrono::steady_clock::duration busy{};  // in its phases (StepResult::compute_us)
  };
  // The phases (InFlight's comments). `drawn`: the drawing step's tokens when launched ahead.
  absl::Status Launch(const StepPlan& plan, InFlight* step, const int32_t* drawn);
  absl::Status BeginDraw(InFlight* step);
  absl::Status FinishDraw(InFlight* step);
  // BeginDraw / FinishDraw of a step in the phase before, its error recorded in the step.
  void StartDraw(InFlight* step);
  void EndDraw(InFlight* step);
  bool CanLaunchAhead(const StepPlan& plan, const InFlight& prev) const;
  // Rows of the chunk whose next token is a prompt token (positions before prompt_len - 1).
  static int64_t PromptLogprobRows(int64_t prompt_len, int64_t num_computed, int64_t n);
  // Checks one scheduled request against this rank's state; fills `step` on success. `claimed`:
  // how often each id occurs in the plan as a scheduled request or a fork child.
  absl::Status Prepare(const ScheduledSequence& s,
                       const absl::flat_hash_map<int64_t, int>& claimed, SequenceStep* step) const;
  // The checks of fork_child_ids and replace_last_block (part of Prepare).
  absl::Status PrepareFork(const ScheduledSequence& s, const SeqState* st, int64_t known,
                           const absl::flat_hash_map<int64_t, int>& claimed) const;
  absl::Status ShareSampled(std::vector<int32_t>* tokens);
  // plan.kv_compactions: every entry checked (InvalidArgument / FailedPrecondition naming it,
  // nothing moved), then run; each sequence's block table keeps the blocks its slots need.
  absl::Status Compact(const StepPlan& plan);

  ModelRunner* runner_;
  Communicator* comm_;
  bool samples_;
  int max_in_flight_;
  bool launch_ahead_;
  int64_t num_launched_ahead_ = 0;
  uint64_t last_step_id_ = 0;
  std::chrono::steady_clock::time_point last_end_{};
  absl::flat_hash_map<int64_t, SeqState> seqs_;
  std::deque<InFlight> in_flight_;  // submitted, oldest first
  // Reused between steps.
  std::vector<SequenceStep> steps_;
  std::vector<const ScheduledSequence*> scheduled_;
  std::vector<SamplingRow> sample_rows_;
  SampleOutput sample_out_;
  SampleScratch logprob_scratch_;  // prompt log-probabilities
  DeviceBuffer share_buf_;
  // Outgrown share buffers, freed with the executor: a free while serving synchronises the device
  // and, with two GPUs in one process, can deadlock against a peer's collective.
  std::vector<DeviceBuffer> retired_share_bufs_;
};

}  // namespace lorc
