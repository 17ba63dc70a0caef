// The request scheduler: decides, step by step, which sequences the workers compute, under a
// per-step token budget (chunked prefill) and the KV cache's blocks. Pure bookkeeping, no device
// and no threads: one engine thread owns it, feeds it requests (Add / Abort / Finish), asks it for
// the next StepPlan (Schedule), runs the plan on the workers and hands rank 0's StepResult back
// (Apply). Contract with the workers: step/step.h.
//
// Lifecycle of a sequence: Add -> waiting -> (admitted) running -> ended (EOS / stop id /
// max_tokens in Apply, or Abort / Finish). A running sequence can be preempted: its KV blocks are
// freed and it goes back to the front of its priority class in the waiting queue, to be
// recomputed later from all its tokens (prompt + generated so far).
//
// Parallel sampling (params.n > 1; step/step.h): Add takes the request as one sequence (the
// parent, completion 0) plus n - 1 child ids reserved for completions 1..n-1. The parent
// prefills like any sequence; the plan entry that computes its prompt's last token (sample =
// true) carries the child ids in fork_child_ids, and the scheduler forks the KV bookkeeping
// there (KvBlockManager::Fork: the children share every block, a partially filled last one
// included). From that plan on each child is an ordinary running sequence whose first token is
// in flight (its own max_tokens / min_tokens count, finish reason, preemption = recompute from its
// own tokens). The first sharer that writes into a shared partial block gets a private copy:
// plan.copies carries the BlockCopy, its entry's replace_last_block the new block. A parent that
// ends before its fork step's result (worker failure, missing token) ends its children with the
// same status (events with token -1); Abort / Finish of a parent whose fork is not planned yet
// drops the reserved ids (the caller ends those completions itself).
//
// Policy of Schedule():
//  1. Running sequences first: decoding ones (one token each), then partially prefilled ones
//     (their next prefill chunk), each group by (priority desc, admission asc), while the token
//     budget lasts. A prefill chunk shrinks to the blocks that are free. A sequence that cannot
//     get a block for even one token preempts the lowest-priority, most recently admitted running
//     sequence, repeatedly, until it fits or it is the victim itself.
//  2. If nothing was preempted, waiting sequences are admitted by (priority desc, arrival asc),
//     strictly in that order (no skipping ahead, so large requests are not starved), while the
//     budget, max_num_seqs and the blocks allow. Admission needs blocks for the whole prompt plus
//     one token (plus one block per unforked child: its first token's copy-on-write or new
//     block; neither when the next sampled token is the last, which is never cached), on top of the blocks that admitted sequences still need to finish their prefill
//     (their unforked children included), plus a watermark of one spare block per running
//     sequence (so that admitting does not force an immediate preemption). With nothing running,
//     anything that fits is admitted. A parent with unforked children counts as 1 + children
//     against max_num_seqs.
//  Each newly admitted sequence takes a prefill chunk from what is left of the budget.
//
// Prefix caching (enable_prefix_caching; kvstore/prefix_cache.h): on admission the scheduler
// looks up the longest indexed prefix of the sequence's full blocks (hash chain over its tokens,
// its cache_salt and the KV format identity) among the first (num_tokens - 1) tokens, so at least
// the last token is computed and its logits exist (as vLLM). A hit starts the sequence with those
// blocks (referenced, shared) and num_computed = hit blocks x block_size; the workers get the
// whole block table and compute only the rest. Admission counts blocks for the rest only, plus
// the hit blocks that are free (cached but unreferenced: taking them uses free blocks). Requests
// asking for prompt_logprobs skip the lookup (every prompt position is computed), as vLLM.
// Full blocks enter the index when the result of the step that computed them is applied (a step
// that failed for a sequence never indexes garbage); unreferenced indexed blocks stay in the
// pool's free queue and are evicted in its LRU order (a sequence's tail blocks first) when the
// pool hands them out. Waiting requests: within the first kPrefixPreferenceWindow of the
// highest waiting priority class, the one with the longest cached prefix goes first (ties: queue
// order), but no request is bypassed more than kMaxPrefixBypass times (then strict order again):
// bounded unfairness, a cheap form of SGLang's longest-prefix-match policy.
// Host KV tier (num_host_blocks > 0 with prefix caching; kvstore/host_kv_pool.h): when the pool
// hands out an indexed, unreferenced block for new contents (Reserve, a load's block), the plan
// being built gets an offload {block -> slot} (HostKvPool::Insert, least recently used host entry
// replaced; none when the hash is on the host already), which the workers run before the step's
// writes. On admission, past the device hit, the chain continues into the host pool: each
// consecutive host hit gets a fresh device block, a load {slot -> block} in this plan, its slot
// pinned until the plan is built (an offload of the same plan runs first and must not take it),
// and the block is indexed under its hash at once; those tokens count as computed (and in
// cached_prompt_tokens) but not against the token budget; admission counts their blocks. The
// preference among waiting requests looks at device hits only. Plans run in step order, so a
// slot read by a load of one plan may take an offload of a later plan (the pin ends when the
// plan is built). ResetPrefixCache clears the host pool too.
// Sessions (keyed by cache_salt + session_id; kvstore/session_store.h): when a sequence
// (completion 0) with a session ends, unless CloseSession closed the session after it was
// added, the leading indexed blocks of its table (its computed prompt + output) are pinned for the
// session, replacing what the session pinned before; they end by ttl, cap, CloseSession, memory
// pressure (a waiting request that cannot be admitted while nothing runs releases the oldest
// session) and ResetPrefixCache.
//
// KV policy compaction (kv_compaction; kvpolicy/README.md "Compaction"): the workers report,
// after each step, the cache slots each policy sequence would need if compacted
// (StepResult::kv_slots: from compact_from, a block boundary, the most over the ranks). A
// sequence's upper bound at plan time is that plus the tokens computed since the reported step
// (evictions only lower it). When the bound frees at least kKvCompactMinFreedFraction of its
// blocks (and one), or (MiKV) block_size of its keys demoted since the last compaction are still
// in their slots (and the bound is below its slots), the blocks from compact_from on are held by it alone and it is neither in a
// session nor has unforked children, Schedule puts a KvCompaction first in the plan and releases
// the blocks past the bound at once (the workers compact before anything else in that step);
// from then on the sequence holds num_computed - slot_offset slots (blocks_ counts slots) and
// its blocks from compact_from on are never indexed again. Preemption resets both.
// KV policy state memory (kv_policy_max_positions > 0; kvpolicy/state_memory.h): each running
// sequence's policy state holds DeviceStateCapacity(num_computed) positions on every worker (a
// parent's unforked children count as copies of it, which the fork makes). That sum stays within
// kv_policy_max_positions: a running sequence's chunk shrinks to the positions left, and one that
// cannot grow by a token preempts as for blocks; admission needs the positions of the whole prompt
// plus one token (x the completions) on top of what the running sequences' prompts will take, plus
// a watermark of kDeviceStateGranule per running sequence. Add refuses a request whose n
// completions at full length could never hold their positions together.
// Steps in flight (async scheduling, design/ENGINE.md §1.3): Schedule may be called again before
// the previous plans' results are applied. A decoding sequence whose next token is being sampled
// by a step in flight is scheduled as if that token were known (the workers feed it themselves),
// unless the steps in flight already sample its last allowed token (max_tokens). A sequence with
// a token in flight is never chosen as a preemption victim; when no victim is left, the sequence
// that needs blocks waits for a later step. When the only victim left is the sequence itself but
// one ranking below it is protected by a token in flight, it waits too, and that one is left out
// of the plan, so the next plan preempts it rather than the higher-ranked sequence. Since EOS and stop conditions are seen only when a
// result is applied, a finished sequence may have one more step in flight; its token is dropped.
// Apply the results in step order.
//
// Invariants (checked by Validate()): every sequence is in exactly one of waiting / running;
// running sequences own exactly the blocks for their cache slots (computed tokens - slot_offset),
// waiting ones own none;
// a block's ref count = the number of block tables holding it + the sessions pinning it; blocks in use + free blocks =
// num_blocks; running sequences + their unforked children <= max_num_seqs; their KV policy
// state positions <= kv_policy_max_positions (when set); reserved child ids are
// exactly the unforked children of live parents and none is a live id.
//
// Thread safety: none. Owned by the engine thread.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <tuple>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "common/defaults.h"
#include <functional>
#include "common/sampling_params.h"
#include "kvstore/host_kv_pool.h"
#include "kvstore/kv_block_manager.h"
#include "kvstore/prefix_cache.h"
#include "kvstore/session_store.h"
#include "step/step.h"

namespace lorc {

enum class FinishReason { kNone, kLength, kStop, kAborted, kError };
const char* FinishReasonName(FinishReason r);

// What ended a request with FinishReason::kStop: a token id (an EOS id or one of the request's
// stop_token_ids; the token is the last of the output ids, as in vLLM, and adds its text only
// with include_stop_str_in_output) or one of its stop strings.
struct StopReason {
  int32_t token_id = -1;    // >= 0: this id
  std::string stop_string;  // non-empty: this string
  bool empty() const { return token_id < 0 && stop_string.empty(); }
};

struct SchedulerConfig {
  int32_t block_size = defaults::kBlockSize;
  int32_t num_blocks = 0;  // KV cache blocks (the smallest over the workers)
  // Tokens computed per step over all sequences (chunked prefill).
  int32_t max_num_batched_tokens = defaults::kMaxNumBatchedTokens;
  int32_t max_num_seqs = defaults::kMaxNumSeqs;  // sequences in the running set
  int32_t max_waiting = defaults::kMaxWaiting;  // bounded queue: past it Add: RESOURCE_EXHAUSTED
  int64_t max_model_len = 4096;    // prompt + max_tokens must fit
  int64_t vocab_size = 0;
  std::vector<int64_t> eos_token_ids;
  // Prefix caching and sessions (header comment). kv_format_identity: KvFormatIdentity() of the
  // model and KV cache (part of every block's hash).
  bool enable_prefix_caching = defaults::kEnablePrefixCaching;
  std::string kv_format_identity;
  double session_ttl_s = defaults::kSessionTtlS;                      // > 0
  double max_session_kv_fraction = defaults::kMaxSessionKvFraction;   // [0, 1]
  // Host KV tier (kvstore/host_kv_pool.h): slots every worker holds (WorkerGroupInfo's
  // num_host_blocks, from --kv-offloading-size; the smallest over the ranks), >= 0. 0, or prefix
  // caching off: no tier.
  int32_t num_host_blocks = 0;
  // The workers run a token-level KV policy (--kv-policy): compact sequences from their slot
  // reports (header comment "KV policy compaction").
  bool kv_compaction = false;
  // Positions the workers' device-resident KV policy states may hold together (the smallest
  // kv_policy_max_positions over the ranks; kvpolicy/state_memory.h), >= 0; 0: no limit (no
  // policy, or states in host memory). Header comment "KV policy state memory".
  int64_t kv_policy_max_positions = 0;
  // The workers' policy chooses during prompts at multiples of this position (--kv-policy-prefill
  // every-chunk: KvPolicyConfig::prefill_interval), >= 0: a prompt's chunks end there, so what a
  // choice sees does not depend on the sequences sharing its steps. 0: chunks end anywhere.
  int64_t kv_policy_prefill_interval = 0;
  // The sessions' clock; null: absl::Now (tests pass a fake one).
  std::function<absl::Time()> clock;

  // InvalidArgument naming the field for any out-of-range value.
  absl::Status Validate() const;
};

// What Apply reports for one sequence.
struct SequenceEvent {
  int64_t seq_id = 0;
  int32_t token = -1;  // the sampled token, appended to the output; -1: none (kError only)
  // The token's log-probabilities (the request asked for them: params.logprobs set). Also for
  // a token that ends the sequence by id (EOS, stop id), which is part of the output ids.
  std::optional<TokenLogprobs> logprobs;
  bool finished = false;
  FinishReason reason = FinishReason::kNone;  // set when finished
  StopReason stop_reason;  // kStop: the EOS / stop id (stop strings are the caller's)
  absl::Status status;  // kError: why (the worker's status for a request it failed)
};

enum class SequenceState { kWaiting, kRunning };

// A snapshot of one live sequence (introspection for tests, metrics and health).
struct SequenceInfo {
  SequenceState state = SequenceState::kWaiting;
  int32_t priority = 0;
  int64_t prompt_len = 0;
  int64_t num_tokens = 0;     // prompt + generated
  int64_t num_computed = 0;   // tokens whose K/V the workers hold (or compute in the last plan)
  int32_t num_generated = 0;
  int32_t num_blocks = 0;     // KV blocks held
  int32_t num_preemptions = 0;
  // Prompt tokens found in the prefix cache at its first admission (-1: not admitted yet).
  int64_t num_cached_prompt_tokens = -1;
};

// A request's prefix-cache inputs (lorcserve.proto GenerateRequest).
struct PrefixOptions {
  std::string cache_salt;  // different salts never share blocks
  std::string session_id;  // non-empty: keep the conversation's blocks after the request ends
};

// Prefix cache and sessions state, for ModelInfo.
struct PrefixCacheReport {
  bool enabled = false;
  PrefixCacheStats stats;
  int64_t cached_blocks = 0;    // indexed blocks (in use or evictable)
  int64_t sessions = 0;         // live sessions
  int64_t session_blocks = 0;   // blocks they pin
  int64_t sessions_expired = 0, sessions_capped = 0, sessions_closed = 0;
  int64_t host_blocks_total = 0;  // host tier slots (0: no tier)
  int64_t host_blocks_used = 0;   // slots holding an evicted block
};

class Scheduler {
 public:
  // INVALID_ARGUMENT naming the field when `config` fails SchedulerConfig::Validate (values come
  // from config files and flags, so a bad one is an error, never a crash).
  static absl::StatusOr<std::unique_ptr<Scheduler>> Create(const SchedulerConfig& config);
  Scheduler(const Scheduler&) = delete;
  Scheduler& operator=(const Scheduler&) = delete;
  ~Scheduler();

  // Validates and enqueues a request; higher `priority` is served first. `child_ids`: exactly
  // params.n - 1 distinct ids for completions 1..n-1 (header comment), reserved from here on.
  // Errors (nothing enqueued): INVALID_ARGUMENT for an empty prompt, a prompt id outside the
  // vocabulary, bad sampling values, prompt + max_tokens > max_model_len (naming the three
  // numbers), a wrong number of child ids, n > max_num_seqs, a request whose n completions could
  // never fit in the whole KV cache together (the prompt's full blocks shared, each completion's
  // other blocks its own; not retryable); RESOURCE_EXHAUSTED (retryable) only when max_waiting
  // requests are waiting ("queue full (N waiting)"); ALREADY_EXISTS for an id (or child id) in
  // use or reserved (also one whose end the workers have not yet been told of).
  // `prefix`: cache salt and session (INVALID_ARGUMENT for a session with prefix caching off).
  absl::Status Add(int64_t seq_id, std::vector<int32_t> prompt, const SamplingParams& params,
                   int32_t priority = 0, std::vector<int64_t> child_ids = {},
                   const PrefixOptions& prefix = {});

  // Cancellation, deadline, failure: ends the sequence (waiting or running) and frees its KV
  // blocks at once. Its id goes into the next plan's `finished` if any worker has seen it; a
  // token sampled for it meanwhile is dropped by Apply. Unknown ids are ignored. Ends only this
  // sequence: a forked child is independent (abort a whole group by aborting every id); the
  // reserved ids of a parent not forked yet are released.
  void Abort(int64_t seq_id);
  // Ends a sequence for a reason found outside the scheduler (a stop string): same as Abort.
  // `reason` must not be kNone.
  void Finish(int64_t seq_id, FinishReason reason);

  // Builds the next step (policy above) in the incremental form of step/step.h: tokens only
  // for (re)admitted sequences, params on first sight, block ids the workers do not hold yet.
  // The plan may carry only `finished` / `preempted` ids, which the workers must get; when it
  // carries nothing at all (StepPlan::empty()) its step_id is 0 and it must not be sent. Step ids
  // of sent plans are consecutive. The scheduled tokens count as computed from here on.
  StepPlan Schedule();

  // Applies rank 0's result for plan `result.step_id` (results in step order): first the
  // sequences the workers failed (kError with the worker's status; a parent's children that have
  // no token yet, forked or not, end with it too), then each sampled token is appended to its
  // sequence, ending it on EOS (unless ignore_eos) or a stop id (kStop, stop_reason.token_id) once
  // more than min_tokens tokens are generated, or at max_tokens (kLength), freeing its blocks.
  // One event per failed sequence and per applied token, in that order. Tokens for sequences not
  // awaiting one from that step (ended meanwhile, unknown) are dropped. A sequence that was to be
  // sampled in that step but got no token, a token outside the vocabulary, or no logprobs when the
  // request asked for them, ends with kError (event token -1).
  std::vector<SequenceEvent> Apply(const StepResult& result);

  // --- Prefix cache and sessions ---
  // Ends the session (cache_salt, session_id) now (its blocks unpinned). When requests of it are
  // waiting or running, OK even if it keeps nothing yet, and none of them keeps blocks for it when
  // it ends (a request added after the close starts a new session). NOT_FOUND naming the id when
  // there is neither such a session nor a request of it; FAILED_PRECONDITION with the prefix cache
  // off (no sessions exist).
  absl::Status CloseSession(const std::string& cache_salt, const std::string& session_id);
  // Ends the sessions idle past the ttl (also done at the start of every Schedule); a session with
  // a request waiting or running is not idle (its idle time restarts when the turn ends).
  void ExpireSessions();
  // Drops the whole prefix index, every session and the host tier's bookkeeping: the workers'
  // cache contents (device and host) can no longer be trusted (a failed runner, a restarted
  // worker group, whose host memory is new). Sequences keep their blocks.
  void ResetPrefixCache();
  PrefixCacheReport prefix_cache_report() const;
  const SessionStore& sessions() const { return sessions_; }

  // --- Introspection ---
  const SchedulerConfig& config() const { return config_; }
  int32_t num_waiting() const { return static_cast<int32_t>(waiting_.size()); }
  int32_t num_running() const { return static_cast<int32_t>(running_.size()); }
  int32_t num_blocks() const { return config_.num_blocks; }
  int32_t num_free_blocks() const { return blocks_.num_free_blocks(); }
  int64_t num_preemptions() const { return num_preemptions_; }  // since construction
  // KV policy compactions planned and the blocks they released, since construction.
  int64_t num_kv_compactions() const { return num_kv_compactions_; }
  int64_t num_kv_compaction_freed_blocks() const { return num_kv_compaction_freed_blocks_; }
  // KV policy state positions the running sequences hold (header comment; counted whether or not
  // kv_policy_max_positions is set).
  int64_t num_kv_policy_positions() const;
  // Waiting or running sequences, or ended ones the workers still have to be told of.
  bool HasWork() const;
  bool Contains(int64_t seq_id) const { return seqs_.contains(seq_id); }
  std::optional<SequenceInfo> GetSequence(int64_t seq_id) const;
  // Prompt + generated tokens of a live sequence; empty for unknown ids.
  absl::Span<const int32_t> Tokens(int64_t seq_id) const;
  const KvBlockManager& blocks() const { return blocks_; }
  const HostKvPool& host_pool() const { return host_; }

  // Checks the invariants listed at the top; Internal naming the first broken one. Debug aid,
  // O(sequences + blocks).
  absl::Status Validate() const;

 private:
  struct Seq;
  struct Entry;  // one sequence's share of the plan being built
  // (-priority, queue position, id): iteration order is admission order.
  using WaitKey = std::tuple<int64_t, int64_t, int64_t>;

  explicit Scheduler(const SchedulerConfig& config);  // `config` validated by Create

  // Ends `s` (its blocks freed or back to the prefix cache). completed: it ended by stop or
  // length, so a session turn's conversation is kept for the next turn; an aborted or failed
  // turn leaves its session as it was.
  void End(Seq& s, bool completed);
  // Ends the children of `parent` that have no token yet (unforked reserved ids, or forked at a
  // step whose result is not applied) with `status`, one kError event each.
  void EndUnstartedChildren(const Seq& parent, uint64_t step_id, const absl::Status& status,
                            std::vector<SequenceEvent>& events);
  // Forks `parent`'s reserved children in plan `step_id` (its entry `out`).
  void Fork(Seq& parent, uint64_t step_id, ScheduledSequence& out);
  // Running slots a sequence takes against max_num_seqs: itself + its unforked children.
  static int64_t Slots(const Seq& s);
  void Enqueue(Seq& s, bool front);
  // n, or less so that a chunk of `s`'s prompt ends at the next multiple of
  // kv_policy_prefill_interval (when set): where the workers' every-chunk policy chooses.
  int64_t PromptChunk(const Seq& s, int64_t n) const;
  // Largest m <= n such that `s` can grow by m tokens with the blocks now free and the KV policy
  // state positions left of kv_policy_max_positions when the running sequences (`s` included,
  // not yet grown) hold `positions`.
  int64_t TokensThatFit(const Seq& s, int64_t n, int64_t positions) const;
  // KV policy state positions (header comment) of `s` and its unforked children at `computed`
  // tokens.
  static int64_t PolicyPositions(const Seq& s, int64_t computed);
  Seq* PickVictim() const;
  // A running sequence other than `s` with a token in flight that ranks below `s` as a victim
  // (lower priority, or the same and admitted later); null when none.
  Seq* ProtectedLowerVictim(const Seq& s) const;
  absl::Time Now() const { return config_.clock ? config_.clock() : absl::Now(); }
  // The indexed blocks a sequence (being admitted) can start with: its chain's longest cached
  // prefix within its first num_tokens - 1 tokens; empty when caching is off or it wants prompt
  // logprobs.
  std::vector<int32_t> LookupPrefix(Seq& s);
  // The waiting sequence to admit next (policy in the header comment) and the ones it bypasses.
  Seq& PickWaiting(std::vector<Seq*>& bypassed);
  // Indexes `s`'s full blocks among its first `num_computed` tokens (a step's result applied).
  void CacheComputed(Seq& s, int64_t num_computed);
  bool host_tier() const { return host_.num_slots() > 0 && config_.enable_prefix_caching; }
  // The device blocks just handed out for new contents that held an indexed prefix: each gets a
  // host slot (HostKvPool::Insert) and, unless its hash is there already, an offload in `plan`
  // (offloads run before the step writes). A block is dropped when every slot is pinned.
  void OffloadEvicted(StepPlan& plan);
  // How many blocks of `s`'s chain, from block `start` on (past the device hit), the host tier
  // holds consecutively, within the first num_tokens - 1 tokens.
  size_t HostPrefix(const Seq& s, size_t start) const;
  void Preempt(Seq& victim, std::vector<Entry>& entries, int64_t& budget, StepPlan& plan);
  // KV policy compactions of running sequences into `plan` (header comment).
  void CompactKv(StepPlan& plan);
  // True when `s`'s session was closed after `s` was added (the second form: `session` closed
  // after the session clock read `epoch`).
  bool SessionClosedSince(const Seq& s) const;
  bool SessionClosedSince(const SessionKey& session, uint64_t epoch) const;

  SchedulerConfig config_;
  KvBlockManager blocks_;
  SessionStore sessions_;  // pins blocks_'s blocks: declared after it, destroyed before it
  absl::flat_hash_map<int64_t, std::unique_ptr<Seq>> seqs_;
  std::set<WaitKey> waiting_;
  std::vector<Seq*> running_;          // in admission order
  std::vector<int64_t> ended_;         // ended ids the workers have seen: next plan's `finished`
  absl::flat_hash_set<int64_t> reserved_;  // child ids of parents not forked yet
  // Running sequences to leave out of the next plan, so that it can preempt them (Schedule).
  absl::flat_hash_set<int64_t> held_;
  absl::flat_hash_map<int64_t, size_t> hit_memo_;  // PickWaiting's lookups in this Schedule
  HostKvPool host_;                    // host tier bookkeeping (slots: num_host_blocks)
  std::vector<BlockHash> host_pins_;   // host entries loaded by the plan being built
  uint64_t step_id_ = 0;
  int64_t next_back_ = 0;              // queue positions of new requests: 0, 1, 2, ...
  int64_t next_front_ = 0;             // of requeued (preempted) ones: -1, -2, ...
  uint64_t next_admission_ = 0;
  int64_t num_preemptions_ = 0;
  int64_t num_kv_compactions_ = 0;
  int64_t num_kv_compaction_freed_blocks_ = 0;
  // Per session with requests waiting or running: how many (parents and forked completions), and
  // the session clock at its latest CloseSession (0: none). Erased when the last of them ends.
  struct SessionRequests {
    int64_t live = 0;
    uint64_t closed_at = 0;
  };
  absl::flat_hash_map<SessionKey, SessionRequests> session_requests_;
  uint64_t session_clock_ = 0;  // bumped by each CloseSession that finds requests
};

}  // namespace lorc
