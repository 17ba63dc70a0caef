// The contract between the scheduler (coordinator) and the workers for one engine iteration:
// a StepPlan goes to every tensor-parallel rank; every rank answers with a StepResult (rank 0's
// carries the sampled tokens). Plain structs; the internal gRPC protocol
// (proto/lorcserve/internal/worker.proto) mirrors them (step/step_proto.h converts).
//
// Incremental protocol (as vLLM v1's SchedulerOutput; design/ENGINE.md §1.1): the workers keep
// per-request state between steps (token history, block table, num_computed_tokens, sampler),
// so a plan carries only what changed:
//  - a request seen for the first time (or re-admitted after preemption) brings its tokens and,
//    on first sight, its sampling params;
//  - every scheduled request names how many tokens to compute and the block ids appended to its
//    block table;
//  - ids that ended (finished, cancelled, failed) or were preempted.
// A decoding request's step message is therefore O(1) in its context length: no block table, no
// token history.
//
// Async scheduling (design/ENGINE.md §1.3): the coordinator may send plan N+1 before it has seen
// plan N's result. A request scheduled in N+1 whose last token is sampled in N computes that
// token: the worker appends each sampled token to its own history, so the plan never carries it.
// Workers execute plans strictly in step_id order (consecutive ids).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/sampling_params.h"
#include "kvstore/host_kv_pool.h"
#include "kvstore/kv_block_manager.h"

namespace lorc {

// One request's share of a step.
struct ScheduledSequence {
  int64_t seq_id = 0;
  // Tokens the worker does not have yet, appended to its history before the step: the whole
  // prompt on first sight, the whole history (prompt + generated) when re-admitted after a
  // preemption, empty otherwise (the worker's history already ends with every token up to this
  // step, sampled ones included).
  std::vector<int32_t> new_token_ids;
  // Tokens already in the cache before this step; the worker checks it against its own count,
  // except on (re)admission (new_token_ids set): then the first num_computed_tokens positions are
  // a prefix-cache hit, already in the first blocks of new_block_ids (the coordinator's prefix
  // index; kvstore/prefix_cache.h), and the worker starts from there.
  int64_t num_computed_tokens = 0;
  // Tokens to compute this step: history positions [num_computed_tokens, + this).
  int32_t num_scheduled_tokens = 0;
  // Appended to the request's block table before the step (the table then covers
  // num_computed_tokens + num_scheduled_tokens tokens). On (re)admission: the whole table.
  std::vector<int32_t> new_block_ids;
  // True when the computed tokens end at the last token of the history: sample the next one.
  bool sample = false;
  // First sight only: the request's sampling options. The worker keeps its sampler (and so a
  // seeded random stream) across preemptions.
  std::optional<SamplingParams> params;
  // First sight only (read with params, kept across preemptions): the request belongs to a
  // session (coordinator/scheduler.h "Sessions"), so when it ends its blocks stay pinned, at
  // full precision, for the conversation's later turns. A token-level KV policy then never
  // evicts or demotes the request's prompt (kvpolicy/README.md "Sessions": evicting from blocks
  // the session keeps returns no memory and only costs this turn its accuracy).
  bool session = false;
  // Parallel sampling (params.n > 1), with `sample` on the step that computes the prompt's last
  // token: the ids of completions 1..n-1. The worker samples one token for this request and one
  // for each child from the same logit row, each child with its own sampler (the params with
  // seed + index when seeded), and forks its state: a child starts with this request's prompt,
  // its block table (the blocks are shared) and computed count, plus its sampled token.
  std::vector<int64_t> fork_child_ids;
  // Copy-on-write: the block that replaces the last entry of the block table before
  // new_block_ids are appended (its contents are copied by a BlockCopy of the same plan); -1:
  // none. Happens when a sequence that shares a partially filled block with a fork writes to it.
  int32_t replace_last_block = -1;
};

// A token-level KV policy's compaction (kvpolicy/README.md "Compaction"): before anything else
// in the step, the worker moves the kept keys of every (layer, KV head) of the sequence at cache
// slots >= its compact_from (KvSlotReport) into a dense run from there; the sequence then holds
// `num_slots` slots (its block table: the first ceil(num_slots / block_size) blocks; the
// coordinator has freed the others) and writes its next token at slot num_slots.
struct KvCompaction {
  int64_t seq_id = 0;
  int64_t num_slots = 0;
};

struct StepPlan {
  uint64_t step_id = 0;  // 1, 2, 3, ...: consecutive
  std::vector<ScheduledSequence> seqs;
  // Host KV tier (kvstore/host_kv_pool.h decides, every rank executes): device block -> host slot
  // copies, then host slot -> device block copies, all before `copies` and the forward pass, each
  // list in order. So a block offloaded here may be reused in the same step (by a load or by a
  // new write), and a slot loaded here must not be the target of an offload of the same step.
  // A block id outside the device cache or a slot outside the host pool (or any entry when the
  // worker has no host pool, --kv-offloading-size 0) fails the step as a whole with
  // InvalidArgument / FailedPrecondition naming the list and the entry; nothing is copied then.
  std::vector<HostBlockCopy> kv_offloads;
  std::vector<HostBlockCopy> kv_loads;
  // Compactions, run first (before the host tier's copies: a freed block may be a load's target
  // in this very plan). Each names a known sequence with a policy state, and num_slots between
  // the slots its kept keys need on this rank and the slots it holds; otherwise the step fails
  // as a whole (InvalidArgument / FailedPrecondition naming the entry) and nothing is moved.
  std::vector<KvCompaction> kv_compactions;
  // Copy-on-write block copies to perform before the forward pass.
  std::vector<BlockCopy> copies;
  // Requests that ended (finished, cancelled, failed): workers drop their state.
  std::vector<int64_t> finished;
  // Requests preempted to be recomputed later: workers drop their token history, block table
  // and computed count but keep the sampler.
  std::vector<int64_t> preempted;

  bool empty() const {
    return seqs.empty() && finished.empty() && preempted.empty() && kv_offloads.empty() &&
           kv_loads.empty() && kv_compactions.empty();
  }
};

// Log-probabilities at one position (SamplingParams::logprobs / prompt_logprobs): of the model's
// raw distribution, log_softmax(logits), before any sampling option is applied.
struct TokenLogprobs {
  float logprob = 0.0f;  // of the token at this position (the sampled one, or the prompt's)
  int32_t rank = 0;      // 1 + number of tokens with a higher logit
  // The N most likely tokens, most likely first (ties by id); N = the request's logprobs value.
  std::vector<int32_t> top_ids;
  std::vector<float> top_logprobs;
};

struct SampledToken {
  int64_t seq_id = 0;
  int32_t token = 0;
  std::optional<TokenLogprobs> logprobs;  // when the request asked for them
};

// A request the worker could not run (bad token or block id, unknown id, bad params): it was
// left out of the batch, its state dropped; the other requests of the step ran.
struct FailedSequence {
  int64_t seq_id = 0;
  absl::Status status;
};

// Log-probabilities of prompt tokens of a request that asked for them (params.prompt_logprobs):
// logprobs[i] is that of the prompt token at position first_position + i given the tokens
// before it (first_position >= 1). After a preemption the recomputed positions come again.
struct PromptLogprobs {
  int64_t seq_id = 0;
  int64_t first_position = 0;
  std::vector<TokenLogprobs> logprobs;
};

// A running sequence's cache slots under a token-level KV policy, after a step (every rank, for
// its own KV heads; sequences of a session are not reported): compaction from compact_from (a
// block boundary; slots below it are never moved) would leave slots_needed slots. The
// coordinator takes the largest over the ranks (WorkerGroup) and compacts when that frees blocks
// (Scheduler). num_computed_tokens: the sequence's computed tokens after the step. low_in_slots
// (MiKV): the most, over the (layer, KV head) pairs, of keys demoted to low precision since the
// last compaction and still in their full-width slots (read quantized on the fly until a
// compaction packs them); 0 for CORM.
struct KvSlotReport {
  int64_t seq_id = 0;
  int64_t num_computed_tokens = 0;
  int64_t compact_from = 0;
  int64_t slots_needed = 0;
  int64_t low_in_slots = 0;
};

struct StepResult {
  uint64_t step_id = 0;
  // Rank 0: one per sequence with sample = true, plan order; a forking sequence's token is
  // followed by its children's, in fork_child_ids order.
  std::vector<SampledToken> sampled;
  std::vector<FailedSequence> failed;
  std::vector<PromptLogprobs> prompt_logprobs;  // rank 0
  std::vector<KvSlotReport> kv_slots;  // per scheduled sequence with a KV policy state, plan order
  int64_t compute_us = 0;  // time the rank spent executing the step
  int64_t idle_us = 0;     // time the rank waited between the end of the previous step and this one
};

// Runs steps in order: in-process (StepExecutor) or on remote workers (the coordinator's
// WorkerGroup). Up to `max_in_flight()` plans may be submitted before the oldest result is
// awaited (async scheduling).
class StepRunner {
 public:
  virtual ~StepRunner() = default;
  // Sends a plan; its result is returned by a later Await, in submission order. An error means
  // the runner is broken (the plan may or may not have run).
  virtual absl::Status Submit(const StepPlan& plan) = 0;
  // The oldest submitted plan's result. FailedPrecondition when nothing is in flight.
  virtual absl::StatusOr<StepResult> Await() = 0;
  // Plans that may be in flight at once (1: synchronous).
  virtual int max_in_flight() const { return 2; }

  // Submit + Await.
  absl::StatusOr<StepResult> Run(const StepPlan& plan) {
    if (absl::Status s = Submit(plan); !s.ok()) return s;
    return Await();
  }
};

}  // namespace lorc
