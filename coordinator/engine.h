// The generation engine: one Scheduler, one StepRunner (in-process StepExecutor or the remote
// WorkerGroup) and per-request output processing (detokenisation, stop strings). Each Step()
// is one iteration: schedule, run on the workers, apply the sampled tokens, report updates.
//
// Not thread-safe: one thread owns it (the CLI's, or the server's engine thread, which feeds it
// from a queue).
#pragma once

#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "common/defaults.h"
#include "common/sampling_params.h"
#include "coordinator/output_processor.h"
#include "coordinator/scheduler.h"
#include "tokenizer/tokenizer.h"
#include "kvstore/kv_spec.h"
#include "model/model_config.h"
#include "step/step.h"

namespace lorc {

struct GenerationRequest {
  std::vector<int32_t> prompt_ids;
  SamplingParams params;
  int32_t priority = 0;
  std::string cache_salt;  // requests with different salts never share cached blocks
  std::string session_id;  // non-empty: keep the conversation's blocks for the next turn
};

// What a request gets after each step that touched it. With n > 1 completions each update
// belongs to one of them (`index`); each completion gets its own final update, and the request's
// callback lives until all n have had theirs.
struct RequestUpdate {
  int32_t index = 0;           // completion, [0, n)
  std::vector<int32_t> new_ids;
  // params.logprobs: one per new id, also for a token that ended the completion by id (EOS, stop
  // id: it is in new_ids too), as vLLM.
  std::vector<TokenLogprobs> logprobs;
  std::string new_text;        // whole UTF-8 characters; stop-string prefixes held back
  bool finished = false;       // this completion ended
  FinishReason reason = FinishReason::kNone;
  // reason kStop: what matched: the EOS / stop id (its token's text ends the text only with
  // params.include_stop_str_in_output, as vLLM; EOS decodes to nothing), or the stop string
  // (the text ends before it, or with it when params.include_stop_str_in_output). A stop string
  // that completes on the max_tokens-th token is a stop too.
  StopReason stop_reason;
  absl::Status status;         // non-OK: the request failed (every completion ends with it)
  // Prompt tokens found in the prefix cache (not computed), on every update once the request's
  // first admission is scheduled (so a request that ends by deadline or cancel reports it too).
  int64_t cached_prompt_tokens = 0;
  // params.prompt_logprobs: positions 1..prompt_len-1, with the request's first token (whichever
  // completion) and again with each completion's final update.
  std::vector<TokenLogprobs> prompt_logprobs;
  // Filled on the final update.
  int64_t prompt_tokens = 0;
  int64_t completion_tokens = 0;  // of this completion
  double time_to_first_token_s = 0;
  double total_time_s = 0;
};

// One completion of a request.
struct CompletionOutput {
  std::vector<int32_t> output_ids;
  std::string text;
  FinishReason finish = FinishReason::kNone;
  StopReason stop_reason;
  std::vector<TokenLogprobs> logprobs;  // params.logprobs: one per output id
};

struct GenerationResult {
  std::vector<CompletionOutput> completions;  // params.n of them, by index
  absl::Status status;          // non-OK only for a request that failed on its own
  // params.prompt_logprobs: log-probabilities of prompt token i given tokens [0, i), i >= 1.
  std::vector<TokenLogprobs> prompt_logprobs;
  int64_t prompt_tokens = 0;
  int64_t cached_prompt_tokens = 0;
  double time_to_first_token_s = 0;
  double total_time_s = 0;

  // Completion 0 (the only one when n = 1).
  const CompletionOutput& first() const { return completions.at(0); }
};

struct EngineOptions {
  int32_t max_num_batched_tokens = defaults::kMaxNumBatchedTokens;  // chunked-prefill budget per step
  int32_t max_num_seqs = defaults::kMaxNumSeqs;          // sequences decoding at once
  int32_t max_waiting = defaults::kMaxWaiting;          // bounded admission queue
  bool enable_prefix_caching = defaults::kEnablePrefixCaching;  // --enable-prefix-caching
  double session_ttl_s = defaults::kSessionTtlS;                 // --session-ttl-s
  double max_session_kv_fraction = defaults::kMaxSessionKvFraction;  // --max-session-kv-fraction
  // Host KV tier slots the workers hold (WorkerGroupInfo::num_host_blocks, from their
  // --kv-offloading-size; not a coordinator flag): 0 none. SchedulerConfig::num_host_blocks.
  int32_t num_host_blocks = 0;
  // The workers run a token-level KV policy (their --kv-policy; not a flag of its own): the
  // scheduler compacts its sequences (SchedulerConfig::kv_compaction).
  bool kv_compaction = false;
  // Positions the workers' device-resident KV policy states may hold together
  // (WorkerGroupInfo::kv_policy_max_positions; not a flag): 0 no limit.
  // SchedulerConfig::kv_policy_max_positions.
  int64_t kv_policy_max_positions = 0;
  // The workers' KvPolicyConfig::prefill_interval (every-chunk; not a flag of its own): 0 none.
  // SchedulerConfig::kv_policy_prefill_interval.
  int64_t kv_policy_prefill_interval = 0;
};

struct EngineStats {
  int64_t steps = 0;                              // results applied
  double schedule_s = 0, apply_s = 0;             // summed over steps
  double run_s = 0;   // in the runner's Submit and Await (blocked on the workers)
  double wait_s = 0;  // of which in Await
  double worker_compute_s = 0;                    // as reported by rank 0
  // Rank 0's wait for its next plan after finishing a step, over the steps submitted while
  // another was still in flight (so the wait is the pipeline's, not a lack of requests).
  double worker_idle_s = 0;
  int64_t pipelined_steps = 0;
};

class Engine {
 public:
  using UpdateFn = std::function<void(const RequestUpdate&)>;

  // `tokenizer` may be null (no text; stop strings rejected). Everything must outlive the engine.
  // INVALID_ARGUMENT naming the field when the model config, KV spec and options do not make a
  // valid SchedulerConfig (e.g. an eos id outside the vocabulary, a zero step budget).
  static absl::StatusOr<std::unique_ptr<Engine>> Create(StepRunner* runner,
                                                        const ModelConfig& config,
                                                        const KvCacheSpec& kv,
                                                        const Tokenizer* tokenizer,
                                                        const EngineOptions& options);
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // Validates and queues a request; `on_update` is called from Step() (and from Abort()).
  // params.n > 1: completion 0 is scheduled as sequence `id`, completions 1..n-1 under child ids
  // the engine takes from its own range (from 2^62 up; callers' ids must stay below it).
  // ALREADY_EXISTS for an id with a completion still live.
  absl::Status Add(int64_t id, const GenerationRequest& request, UpdateFn on_update);
  // Ends a request at once (cancellation, deadline): every live completion, each with a final
  // update carrying `status` (default: CANCELLED); all its KV blocks are free when they are
  // sent. Unknown ids are ignored.
  void Abort(int64_t id, absl::Status status = absl::CancelledError("request cancelled"));
  // Aborts every live request with `status`.
  void AbortAll(const absl::Status& status);
  // One iteration: schedules and submits the next plan while fewer than the runner's
  // max_in_flight() are at the workers, and awaits and applies the oldest result once that many
  // are (or nothing new could be submitted). A runner failure fails every live request with
  // that status and is returned.
  absl::Status Step();
  bool HasWork() const { return scheduler_.HasWork() || in_flight_ > 0; }
  // Sessions (Scheduler::CloseSession / ExpireSessions): NOT_FOUND for an unknown session.
  absl::Status CloseSession(const std::string& cache_salt, const std::string& session_id) {
    return scheduler_.CloseSession(cache_salt, session_id);
  }
  void ExpireSessions() { scheduler_.ExpireSessions(); }

  // Runs the requests to completion, batched together. Per-request problems end that request
  // with its status; the others continue.
  absl::StatusOr<std::vector<GenerationResult>> Generate(absl::Span<const GenerationRequest> requests);

  const Scheduler& scheduler() const { return scheduler_; }
  Scheduler& mutable_scheduler() { return scheduler_; }  // tests
  const EngineStats& stats() const { return stats_; }
  size_t num_requests() const { return requests_.size(); }

 private:
  struct Request;
  struct Completion;
  Engine(StepRunner* runner, const Tokenizer* tokenizer, std::unique_ptr<Scheduler> scheduler);
  // Sends completion `u.index`'s final update (u.finished set here); the request is dropped
  // after its last completion's. `r` may be gone when this returns.
  void EndCompletion(Request& r, RequestUpdate& u);
  // Ends every live completion of `r` (scheduler included) with `reason` and `status`; `r` is
  // gone when this returns.
  void EndRequest(Request& r, FinishReason reason, const absl::Status& status);
  // Fails every live request with `status` (the runner is broken) and returns it.
  absl::Status Fail(const absl::Status& status);

  StepRunner* runner_;
  const Tokenizer* tokenizer_;
  std::unique_ptr<Scheduler> scheduler_owner_;
  Scheduler& scheduler_;  // *scheduler_owner_
  absl::flat_hash_map<int64_t, std::unique_ptr<Request>> requests_;  // by request id
  // Live sequence id -> (request id, completion index).
  absl::flat_hash_map<int64_t, std::pair<int64_t, int32_t>> completion_of_;
  EngineStats stats_;
  int in_flight_ = 0;  // plans submitted and not yet awaited
  std::deque<bool> pipelined_;  // per plan in flight: submitted while another was in flight
  int64_t next_generate_id_ = int64_t{1} << 40;  // Generate()'s ids, apart from callers' ids
  int64_t next_child_id_ = int64_t{1} << 62;     // sequence ids of completions 1..n-1
};

// `kv` gives block_size, num_blocks and the format (KvFormatIdentity); a spec without per-layer
// widths (the coordinator knows only sizes and kv_cache_dtype) is completed by MakeKvCacheSpec.
SchedulerConfig MakeSchedulerConfig(const ModelConfig& config, const KvCacheSpec& kv,
                                    const EngineOptions& options);

}  // namespace lorc
