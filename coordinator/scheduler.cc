#include "coordinator/scheduler.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <deque>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/check.h"
#include "common/status_macros.h"
#include "kvpolicy/state_memory.h"

namespace lorc {
namespace {

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename C, typename T>
bool ContainsValue(const C& c, const T& v) {
  return std::find(c.begin(), c.end(), v) != c.end();
}

}  // namespace

const char* FinishReasonName(FinishReason r) {
  switch (r) {
    case FinishReason::kNone: return "none";
    case FinishReason::kLength: return "length";
    case FinishReason::kStop: return "stop";
    case FinishReason::kAborted: return "abort";
    case FinishReason::kError: return "error";
  }
  return "?";
}

absl::Status SchedulerConfig::Validate() const {
  auto positive = [](const char* field, int64_t v) -> absl::Status {
    if (v > 0) return absl::OkStatus();
    return absl::InvalidArgumentError(
        absl::StrCat("scheduler config: ", field, " must be > 0, got ", v));
  };
  RETURN_IF_ERROR(positive("block_size", block_size));
  RETURN_IF_ERROR(positive("num_blocks", num_blocks));
  RETURN_IF_ERROR(positive("max_num_batched_tokens", max_num_batched_tokens));
  RETURN_IF_ERROR(positive("max_num_seqs", max_num_seqs));
  RETURN_IF_ERROR(positive("max_waiting", max_waiting));
  RETURN_IF_ERROR(positive("max_model_len", max_model_len));
  RETURN_IF_ERROR(positive("vocab_size", vocab_size));
  if (kv_policy_max_positions < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "scheduler config: kv_policy_max_positions must be >= 0, got ", kv_policy_max_positions));
  }
  if (kv_policy_prefill_interval < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "scheduler config: kv_policy_prefill_interval must be >= 0, got ", kv_policy_prefill_interval));
  }
  if (num_host_blocks < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("scheduler config: num_host_blocks must be >= 0, got ", num_host_blocks));
  }
  if (!(session_ttl_s > 0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("scheduler config: session_ttl_s must be > 0, got ", session_ttl_s));
  }
  if (!(max_session_kv_fraction >= 0 && max_session_kv_fraction <= 1)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "scheduler config: max_session_kv_fraction must be in [0, 1], got ",
        max_session_kv_fraction));
  }
  for (int64_t id : eos_token_ids) {
    if (id < 0 || id >= vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat(
          "scheduler config: eos token id ", id, " outside the vocabulary [0, ", vocab_size, ")"));
    }
  }
  return absl::OkStatus();
}

struct Scheduler::Seq {
  int64_t id = 0;
  std::vector<int32_t> tokens;  // prompt + generated
  int64_t prompt_len = 0;
  SamplingParams params;
  int32_t priority = 0;
  SequenceState state = SequenceState::kWaiting;
  WaitKey wait_key;             // while waiting
  uint64_t admission = 0;       // order of the latest admission, while running
  int64_t num_computed = 0;     // tokens whose K/V are (being) computed; 0 while waiting
  int32_t num_generated = 0;
  int32_t num_preemptions = 0;
  // Steps in flight that sample a token for this sequence, oldest first. Each such token counts
  // as known for scheduling (the workers feed it to the next step themselves).
  std::deque<uint64_t> sample_steps;
  bool workers_have_tokens = false;  // the workers hold its history (since the latest admission)
  size_t blocks_sent = 0;            // block ids the workers hold for it
  bool seen_by_workers = false;      // ever scheduled: its end must be announced
  // Parallel sampling: a parent's completions 1..n-1 not forked yet (reserved ids); a forked
  // child's parent and the step that forked it (its first token is sampled there).
  std::vector<int64_t> child_ids;
  int64_t parent = -1;
  uint64_t fork_step = 0;
  // Prefix cache: the chain's root (salt + format), the hashes of the full blocks of `tokens`
  // computed so far (extended lazily), and per step in flight since the latest admission the
  // computed count after it (indexed when its result is applied).
  BlockHash root;
  std::vector<BlockHash> hashes;
  std::deque<std::pair<uint64_t, int64_t>> computing;
  // Session (empty session_id: none) and the session clock when it was added: a CloseSession
  // after that (SessionRequests::closed_at) stops it from keeping blocks.
  SessionKey session;
  uint64_t session_epoch = 0;
  // The session whose turn this sequence belongs to (a parent's `session`, and a forked child's
  // parent's): while any is live, the session is busy (SessionRequests::live counts each).
  SessionKey turn_session;
  int64_t num_cached_prompt_tokens = -1;
  int32_t num_bypassed = 0;  // times a request behind it was admitted first (prefix preference)
  // KV policy compaction (header comment): positions minus cache slots (what blocks_ counts),
  // the latest slot report since the latest admission (whose first step is admitted_step), and
  // the blocks from which its table is no longer indexed (compacted in place).
  int64_t slot_offset = 0;
  std::optional<KvSlotReport> kv_slots;
  uint64_t admitted_step = 0;
  size_t index_limit = SIZE_MAX;
  // Cache slots it holds (blocks_.NumTokens).
  int64_t slots() const { return num_computed - slot_offset; }

  int64_t num_pending() const { return static_cast<int64_t>(sample_steps.size()); }
  // Tokens the workers will have once the steps in flight are done.
  int64_t num_tokens() const { return static_cast<int64_t>(tokens.size()) + num_pending(); }
  // True when the steps in flight already sample this sequence's last allowed token.
  bool done_sampling() const { return num_generated + num_pending() >= params.max_tokens; }
};

struct Scheduler::Entry {
  Seq* seq = nullptr;
  int64_t n = 0;  // tokens computed this step
  std::vector<BlockCopy> copies;
};

absl::StatusOr<std::unique_ptr<Scheduler>> Scheduler::Create(const SchedulerConfig& config) {
  RETURN_IF_ERROR(config.Validate());
  return std::unique_ptr<Scheduler>(new Scheduler(config));
}

Scheduler::Scheduler(const SchedulerConfig& config)
    : config_(config),
      blocks_(config.block_size, config.num_blocks),
      sessions_(&blocks_, absl::Seconds(config.session_ttl_s),
                static_cast<int64_t>(config.max_session_kv_fraction *
                                     static_cast<double>(config.num_blocks))),
      host_(config.num_host_blocks) {
  blocks_.set_record_evictions(host_tier());
}

Scheduler::~Scheduler() = default;

int64_t Scheduler::Slots(const Seq& s) { return 1 + static_cast<int64_t>(s.child_ids.size()); }

absl::Status Scheduler::Add(int64_t seq_id, std::vector<int32_t> prompt,
                            const SamplingParams& params, int32_t priority,
                            std::vector<int64_t> child_ids, const PrefixOptions& prefix) {
  if (prompt.empty()) return absl::InvalidArgumentError("empty prompt");
  if (!prefix.session_id.empty() && !config_.enable_prefix_caching) {
    return absl::InvalidArgumentError(
        "session_id: sessions keep blocks in the prefix cache, which is off "
        "(--no-enable-prefix-caching)");
  }
  for (size_t i = 0; i < prompt.size(); ++i) {
    if (prompt[i] < 0 || prompt[i] >= config_.vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat("prompt token id ", prompt[i], " at position ",
                                                     i, " outside the vocabulary [0, ",
                                                     config_.vocab_size, ")"));
    }
  }
  RETURN_IF_ERROR(params.Validate(config_.vocab_size));
  const int64_t prompt_len = static_cast<int64_t>(prompt.size());
  const int64_t total = prompt_len + params.max_tokens;
  if (total > config_.max_model_len) {
    return absl::InvalidArgumentError(absl::StrCat(
        "prompt (", prompt_len, " tokens) + max_tokens (", params.max_tokens, ") = ", total,
        " exceeds the maximum model length of ", config_.max_model_len,
        " (max_model_len): lower max_tokens or shorten the prompt"));
  }
  if (params.min_tokens > 0 && !params.allowed_token_ids.empty()) {
    // The min_tokens mask would leave nothing to sample: reject rather than emit a masked id.
    auto stops = [&](int32_t id) {
      return ContainsValue(params.stop_token_ids, id) ||
             (!params.ignore_eos && ContainsValue(config_.eos_token_ids, static_cast<int64_t>(id)));
    };
    if (std::all_of(params.allowed_token_ids.begin(), params.allowed_token_ids.end(), stops)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "allowed_token_ids: every allowed id is an EOS or stop id, which min_tokens (",
          params.min_tokens, ") suppresses: nothing could be sampled"));
    }
  }
  const int64_t n = params.n;  // >= 1 (validated)
  if (static_cast<int64_t>(child_ids.size()) != n - 1) {
    return absl::InvalidArgumentError(absl::StrCat("n = ", n, " completions need ", n - 1,
                                                   " child sequence ids, got ", child_ids.size()));
  }
  if (n > config_.max_num_seqs) {
    return absl::InvalidArgumentError(absl::StrCat(
        "n (", n, ") exceeds max_num_seqs (", config_.max_num_seqs,
        "): the completions could never run together"));
  }
  // The n completions at full length together: the prompt's full blocks are shared, every other
  // block (the partial last prompt block included, copied on write) is each completion's own.
  // The last sampled token is never computed, so at most total - 1 tokens are ever cached.
  const int64_t cached = total - 1;
  const int64_t shared = n > 1 ? prompt_len / config_.block_size : 0;
  const int64_t blocks_needed = shared + n * (CeilDiv(cached, config_.block_size) - shared);
  if (blocks_needed > config_.num_blocks) {
    const int64_t prompt_blocks = CeilDiv(prompt_len, config_.block_size);
    if (prompt_blocks > config_.num_blocks) {  // not even max_tokens = 1 would fit
      return absl::InvalidArgumentError(absl::StrCat(
          "prompt: its ", prompt_len, " tokens need ", prompt_blocks, " KV blocks, the whole cache has ",
          config_.num_blocks, ": it can never fit (shorten the prompt)"));
    }
    if (n == 1) {
      return absl::InvalidArgumentError(absl::StrCat(
          "max_tokens: request needs ", blocks_needed, " KV blocks for ", cached,
          " cached tokens (prompt + max_tokens - 1), the whole cache has ", config_.num_blocks,
          ": it can never fit (lower max_tokens or shorten the prompt)"));
    }
    // The field to change: n when not even max_tokens = 1 would fit (prompt_len cached tokens each).
    const int64_t at_one_token = shared + n * (prompt_blocks - shared);
    return absl::InvalidArgumentError(absl::StrCat(
        at_one_token > config_.num_blocks ? "n" : "max_tokens", ": request needs ", blocks_needed,
        " KV blocks for n = ", n, " completions of ", cached,
        " cached tokens (prompt + max_tokens - 1; the prompt's ", shared,
        " full blocks shared), the whole cache has ", config_.num_blocks,
        ": it can never fit (lower n or max_tokens, or shorten the prompt)"));
  }
  // Their KV policy states at full length together (header comment "KV policy state memory").
  const int64_t positions = n * kvpolicy::DeviceStateCapacity(cached);
  if (config_.kv_policy_max_positions > 0 && positions > config_.kv_policy_max_positions) {
    return absl::InvalidArgumentError(absl::StrCat(
        "max_tokens: request needs KV policy state for ", positions, " positions (", n, " completion",
        n == 1 ? "" : "s", " of ", cached, " cached tokens, prompt + max_tokens - 1, in units of ",
        kvpolicy::kDeviceStateGranule, "), the workers hold ", config_.kv_policy_max_positions,
        ": it can never fit (lower n or max_tokens, or shorten the prompt)"));
  }
  auto in_use = [&](int64_t id) {
    return seqs_.contains(id) || ContainsValue(ended_, id) || reserved_.contains(id);
  };
  if (in_use(seq_id)) {
    return absl::AlreadyExistsError(absl::StrCat("sequence id ", seq_id, " is already in use"));
  }
  for (size_t i = 0; i < child_ids.size(); ++i) {
    const int64_t c = child_ids[i];
    if (in_use(c) || c == seq_id ||
        std::find(child_ids.begin(), child_ids.begin() + i, c) != child_ids.begin() + i) {
      return absl::AlreadyExistsError(
          absl::StrCat("child sequence id ", c, " is already in use"));
    }
  }
  if (waiting_.size() >= static_cast<size_t>(config_.max_waiting)) {
    return absl::ResourceExhaustedError(absl::StrCat("queue full (", waiting_.size(), " waiting)"));
  }
  auto seq = std::make_unique<Seq>();
  seq->id = seq_id;
  seq->tokens = std::move(prompt);
  seq->prompt_len = prompt_len;
  seq->params = params;
  seq->priority = priority;
  seq->root = PrefixRootHash(config_.kv_format_identity, prefix.cache_salt);
  seq->session = {prefix.cache_salt, prefix.session_id};
  if (!prefix.session_id.empty()) {
    ++session_requests_[seq->session].live;
    seq->session_epoch = session_clock_;
    seq->turn_session = seq->session;
  }
  reserved_.insert(child_ids.begin(), child_ids.end());
  seq->child_ids = std::move(child_ids);
  Enqueue(*seq, /*front=*/false);
  seqs_.emplace(seq_id, std::move(seq));
  return absl::OkStatus();
}

void Scheduler::Enqueue(Seq& s, bool front) {
  s.state = SequenceState::kWaiting;
  s.wait_key = {-static_cast<int64_t>(s.priority), front ? --next_front_ : next_back_++, s.id};
  waiting_.insert(s.wait_key);
}

void Scheduler::End(Seq& s, bool completed) {
  const int64_t id = s.id;
  bool kept = false;  // the session's blocks were replaced (Keep), which restarts its idle time
  if (s.state == SequenceState::kRunning) {
    running_.erase(std::find(running_.begin(), running_.end(), &s));
    if (completed && !s.session.session_id.empty() && s.parent < 0 && !SessionClosedSince(s)) {
      kept = true;
      // The conversation so far: the indexed blocks of its chain, which the next turn will hit.
      // They are its table's own blocks where it computed them first, and otherwise the equal
      // blocks another sequence indexed before it (CacheFullBlocks leaves a duplicate unindexed):
      // two sessions that start with the same text each keep it. A conversation shorter than a
      // block pins nothing, but its session starts (CloseSession finds it).
      std::vector<int32_t> keep = blocks_.MatchPrefix(s.hashes);
      if (keep.empty() && sessions_.Has(s.session)) {
        sessions_.Touch(s.session, Now());  // nothing new: a session keeps what it had
      } else {
        sessions_.Keep(s.session, std::move(keep), Now());
      }
    }
    blocks_.Free(id);
  } else {
    waiting_.erase(s.wait_key);
  }
  if (!s.turn_session.session_id.empty()) {
    // Any end of a turn's sequence (completed, cancelled, failed, a completion of n > 1) restarts
    // the session's idle time: the ttl counts from the turn's end, not from its admission.
    if (!kept && !SessionClosedSince(s.turn_session, s.session_epoch)) sessions_.Touch(s.turn_session, Now());
    auto it = session_requests_.find(s.turn_session);
    if (it != session_requests_.end() && --it->second.live <= 0) session_requests_.erase(it);
  }
  if (s.seen_by_workers) ended_.push_back(id);
  for (int64_t c : s.child_ids) reserved_.erase(c);  // never forked: they never start
  seqs_.erase(id);  // destroys `s`
}

void Scheduler::EndUnstartedChildren(const Seq& parent, uint64_t step_id,
                                     const absl::Status& status,
                                     std::vector<SequenceEvent>& events) {
  auto fail = [&](int64_t id) {
    SequenceEvent ev;
    ev.seq_id = id;
    ev.finished = true;
    ev.reason = FinishReason::kError;
    ev.status = status;
    events.push_back(std::move(ev));
  };
  for (int64_t c : parent.child_ids) fail(c);  // End(parent) releases the reservations
  std::vector<Seq*> forked;  // in a step whose result is not applied yet
  for (Seq* c : running_) {
    if (c->parent == parent.id && c->num_generated == 0 && c->fork_step >= step_id) {
      forked.push_back(c);
    }
  }
  for (Seq* c : forked) {
    fail(c->id);
    End(*c, /*completed=*/false);
  }
}

void Scheduler::Abort(int64_t seq_id) { Finish(seq_id, FinishReason::kAborted); }

void Scheduler::Finish(int64_t seq_id, FinishReason reason) {
  CHECK(reason != FinishReason::kNone) << "Finish(" << seq_id << ") needs a reason";
  auto it = seqs_.find(seq_id);
  if (it == seqs_.end()) return;
  End(*it->second, /*completed=*/reason == FinishReason::kStop || reason == FinishReason::kLength);
}

int64_t Scheduler::PolicyPositions(const Seq& s, int64_t computed) {
  return kvpolicy::DeviceStateCapacity(computed) * Slots(s);
}

int64_t Scheduler::num_kv_policy_positions() const {
  int64_t total = 0;
  for (const Seq* s : running_) total += PolicyPositions(*s, s->num_computed);
  return total;
}

int64_t Scheduler::PromptChunk(const Seq& s, int64_t n) const {
  const int64_t interval = config_.kv_policy_prefill_interval;
  if (interval <= 0 || s.num_computed >= s.prompt_len) return n;
  return std::min(n, interval - s.num_computed % interval);
}

int64_t Scheduler::TokensThatFit(const Seq& s, int64_t n, int64_t positions) const {
  if (config_.kv_policy_max_positions > 0) {
    // `s` and its unforked children (copies of it) within the positions the others leave.
    const int64_t room = config_.kv_policy_max_positions - (positions - PolicyPositions(s, s.num_computed));
    n = std::clamp<int64_t>(kvpolicy::PositionsWithin(room / Slots(s)) - s.num_computed, 0, n);
    if (n == 0) return 0;
  }
  const int32_t free = blocks_.num_free_blocks();
  auto fits = [&](int64_t m) { return blocks_.BlocksNeeded(s.id, s.slots() + m) <= free; };
  if (fits(n)) return n;
  int64_t lo = 0, hi = n;  // fits(lo), !fits(hi); BlocksNeeded grows with the token count
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (fits(mid)) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

Scheduler::Seq* Scheduler::PickVictim() const {
  Seq* victim = nullptr;
  for (Seq* s : running_) {
    if (s->num_pending() != 0) continue;  // a step in flight samples for it
    if (victim == nullptr || s->priority < victim->priority ||
        (s->priority == victim->priority && s->admission > victim->admission)) {
      victim = s;
    }
  }
  return victim;
}

Scheduler::Seq* Scheduler::ProtectedLowerVictim(const Seq& s) const {
  for (Seq* r : running_) {
    if (r == &s || r->num_pending() == 0) continue;
    if (r->priority < s.priority || (r->priority == s.priority && r->admission > s.admission)) return r;
  }
  return nullptr;
}

void Scheduler::Preempt(Seq& victim, std::vector<Entry>& entries, int64_t& budget,
                        StepPlan& plan) {
  auto e = std::find_if(entries.begin(), entries.end(),
                        [&](const Entry& x) { return x.seq == &victim; });
  if (e != entries.end()) {  // scheduled earlier in this step: take it back
    budget += e->n;
    entries.erase(e);
  }
  blocks_.Free(victim.id);
  running_.erase(std::find(running_.begin(), running_.end(), &victim));
  victim.num_computed = 0;
  victim.slot_offset = 0;
  victim.kv_slots.reset();
  victim.index_limit = SIZE_MAX;
  victim.computing.clear();
  victim.workers_have_tokens = false;  // they keep its sampler, so no params are re-sent
  victim.blocks_sent = 0;
  ++victim.num_preemptions;
  ++num_preemptions_;
  Enqueue(victim, /*front=*/true);
  if (victim.seen_by_workers) plan.preempted.push_back(victim.id);
}

void Scheduler::CompactKv(StepPlan& plan) {
  if (!config_.kv_compaction) return;
  const int64_t bs = config_.block_size;
  for (Seq* s : running_) {
    if (!s->kv_slots.has_value() || !s->session.session_id.empty() || !s->child_ids.empty()) continue;
    const KvSlotReport& r = *s->kv_slots;
    if (r.compact_from % bs != 0) continue;
    // Tokens computed since the reported step can only add kept keys.
    const int64_t bound = r.slots_needed + (s->num_computed - r.num_computed_tokens);
    const int64_t blocks = static_cast<int64_t>(blocks_.BlockTable(s->id).size());
    const int64_t freed = blocks - CeilDiv(bound, bs);
    const int64_t enough = std::max<int64_t>(
        1, static_cast<int64_t>(std::ceil(static_cast<double>(blocks) * defaults::kKvCompactMinFreedFraction)));
    // MiKV: keys demoted in their slots slow every decode step until packed (defaults.h, next to
    // kKvCompactMinFreedFraction).
    const bool pack = r.low_in_slots >= bs;
    if (bound >= s->slots() || (freed < enough && !pack)) continue;
    const int32_t from_block = static_cast<int32_t>(r.compact_from / bs);
    if (!blocks_.CanCompact(s->id, from_block)) continue;  // a block there is shared (a hit)
    CHECK_OK(blocks_.Compact(s->id, from_block, bound));
    plan.kv_compactions.push_back({s->id, bound});
    s->slot_offset = s->num_computed - bound;
    s->blocks_sent = blocks_.BlockTable(s->id).size();
    s->index_limit = std::min(s->index_limit, static_cast<size_t>(from_block));
    s->kv_slots.reset();
    ++num_kv_compactions_;
    num_kv_compaction_freed_blocks_ += freed;
  }
}

std::vector<int32_t> Scheduler::LookupPrefix(Seq& s) {
  if (!config_.enable_prefix_caching || s.params.prompt_logprobs.has_value()) return {};
  ExtendBlockHashes(s.root, s.tokens, config_.block_size, &s.hashes);
  // At least the last token is computed (its logits are sampled): only blocks before it.
  const size_t usable = (s.tokens.size() - 1) / static_cast<size_t>(config_.block_size);
  return blocks_.MatchPrefix(absl::MakeConstSpan(s.hashes).first(std::min(usable, s.hashes.size())));
}

Scheduler::Seq& Scheduler::PickWaiting(std::vector<Seq*>& bypassed) {
  bypassed.clear();
  Seq& head = *seqs_.at(std::get<2>(*waiting_.begin()));
  if (!config_.enable_prefix_caching) return head;
  std::vector<Seq*> window;
  for (auto it = waiting_.begin();
       it != waiting_.end() && window.size() < static_cast<size_t>(defaults::kPrefixPreferenceWindow) &&
       std::get<0>(*it) == std::get<0>(*waiting_.begin());
       ++it) {
    window.push_back(seqs_.at(std::get<2>(*it)).get());
  }
  size_t best = 0, best_hit = 0;
  for (size_t i = 0; i < window.size(); ++i) {
    // Looked up once per Schedule: within one, the index only loses blocks (evictions), so a
    // remembered hit may be stale upwards, which only affects the order (admission looks again).
    auto [it, fresh] = hit_memo_.try_emplace(window[i]->id, 0);
    if (fresh) it->second = LookupPrefix(*window[i]).size();
    const size_t hit = it->second;
    if (hit > best_hit) {
      best = i;
      best_hit = hit;
    }
  }
  for (size_t i = 0; i < best; ++i) {
    if (window[i]->num_bypassed >= defaults::kMaxPrefixBypass) return head;  // no more waiting
  }
  bypassed.assign(window.begin(), window.begin() + best);
  return *window[best];
}

void Scheduler::CacheComputed(Seq& s, int64_t num_computed) {
  if (!config_.enable_prefix_caching) return;
  const size_t known = std::min(static_cast<size_t>(num_computed), s.tokens.size());
  ExtendBlockHashes(s.root, absl::MakeConstSpan(s.tokens).first(known), config_.block_size,
                    &s.hashes);
  // Blocks a KV policy compaction rewrote in place (index_limit on) hold no prefix.
  const size_t full = std::min(known / static_cast<size_t>(config_.block_size), s.index_limit);
  blocks_.CacheFullBlocks(s.id, absl::MakeConstSpan(s.hashes).first(std::min(full, s.hashes.size())));
}

bool Scheduler::SessionClosedSince(const Seq& s) const { return SessionClosedSince(s.session, s.session_epoch); }

bool Scheduler::SessionClosedSince(const SessionKey& session, uint64_t epoch) const {
  auto it = session_requests_.find(session);
  return it != session_requests_.end() && it->second.closed_at > epoch;
}

absl::Status Scheduler::CloseSession(const std::string& cache_salt,
                                     const std::string& session_id) {
  if (!config_.enable_prefix_caching) {
    return absl::FailedPreconditionError(
        "session_id: sessions keep blocks in the prefix cache, which is off (--no-enable-prefix-caching): "
        "there are no sessions to close");
  }
  const SessionKey key{cache_salt, session_id};
  auto it = session_requests_.find(key);
  if (it == session_requests_.end()) return sessions_.Close(key);
  // Requests of the session are waiting or running: none of them may keep blocks for it when
  // it ends (a request added after this starts a new session).
  it->second.closed_at = ++session_clock_;
  if (sessions_.Has(key)) return sessions_.Close(key);
  return absl::OkStatus();
}

void Scheduler::ExpireSessions() {
  // A session whose turn is waiting or running is not idle, however long the turn takes.
  sessions_.Expire(Now(), [&](const SessionKey& key) { return session_requests_.contains(key); });
}

void Scheduler::ResetPrefixCache() {
  sessions_.Clear();
  blocks_.ClearPrefixCache();
  host_.Clear();
  host_pins_.clear();
}

void Scheduler::OffloadEvicted(StepPlan& plan) {
  if (!host_tier()) return;
  for (const EvictedBlock& e : blocks_.TakeEvicted()) {
    absl::StatusOr<HostKvPool::Insertion> ins = host_.Insert(e.hash);
    if (!ins.ok()) continue;  // every slot is pinned by this plan's loads: the block is lost
    if (!ins->copy) continue;  // the host tier holds this prefix already (inclusive)
    plan.kv_offloads.push_back({e.block, ins->slot});
    ++blocks_.prefix_cache_stats().host_offloads;
  }
}

size_t Scheduler::HostPrefix(const Seq& s, size_t start) const {
  if (!host_tier() || s.params.prompt_logprobs.has_value()) return 0;
  const size_t usable = std::min((s.tokens.size() - 1) / static_cast<size_t>(config_.block_size),
                                 s.hashes.size());
  size_t n = 0;
  while (start + n < usable && host_.Peek(s.hashes[start + n]) >= 0) ++n;
  return n;
}

PrefixCacheReport Scheduler::prefix_cache_report() const {
  PrefixCacheReport r;
  r.enabled = config_.enable_prefix_caching;
  r.stats = blocks_.prefix_cache().stats();
  r.cached_blocks = blocks_.prefix_cache().num_cached_blocks();
  r.sessions = sessions_.num_sessions();
  r.session_blocks = sessions_.num_pinned_blocks();
  r.sessions_expired = sessions_.num_expired();
  r.sessions_capped = sessions_.num_capped();
  r.sessions_closed = sessions_.num_closed();
  r.host_blocks_total = host_tier() ? host_.num_slots() : 0;
  r.host_blocks_used = host_.num_used();
  return r;
}

StepPlan Scheduler::Schedule() {
  ExpireSessions();
  StepPlan plan;
  plan.step_id = step_id_ + 1;
  plan.finished = std::move(ended_);
  ended_.clear();
  int64_t budget = config_.max_num_batched_tokens;
  std::vector<Entry> entries;
  CompactKv(plan);

  // 1. Running sequences: decodes, then prefill chunks; each group by priority, then admission.
  std::vector<Seq*> order = running_;
  std::stable_sort(order.begin(), order.end(), [](const Seq* a, const Seq* b) {
    const bool pa = a->num_tokens() - a->num_computed > 1;
    const bool pb = b->num_tokens() - b->num_computed > 1;
    if (pa != pb) return pb;
    return a->priority > b->priority;
  });
  bool preempted = false;
  // KV policy state positions of the running sequences once this plan's entries are computed
  // (header comment "KV policy state memory"); kept as entries are added and victims go.
  int64_t positions = num_kv_policy_positions();
  // Sequences left out of plans so that a later one can preempt them (below): those the previous
  // plan asked for and those this one asks for (a decode ahead of the waiting sequence in `order`
  // is in this plan already, so it sits the next one out).
  const absl::flat_hash_set<int64_t> held = std::move(held_);
  held_.clear();
  for (Seq* s : order) {
    if (budget == 0) break;
    if (s->state != SequenceState::kRunning || s->done_sampling() || held.contains(s->id) ||
        held_.contains(s->id)) {
      continue;
    }
    const int64_t n = PromptChunk(*s, std::min(s->num_tokens() - s->num_computed, budget));
    if (n == 0) continue;
    int64_t m = TokensThatFit(*s, n, positions);
    while (m == 0) {
      // Every candidate may have a step in flight (async scheduling): then `s` waits for the
      // next step, when the oldest results are in and victims can be chosen again.
      Seq* victim = PickVictim();
      if (victim == nullptr) break;
      if (victim == s) {
        // A sequence that ranks below `s` as a victim is protected only by its token in flight:
        // `s` waits, and that one sits this plan out, so that the next plan can preempt it.
        if (Seq* r = ProtectedLowerVictim(*s); r != nullptr) {
          held_.insert(r->id);
          break;
        }
      }
      int64_t victim_computed = victim->num_computed;  // with its entry of this plan, if any
      for (const Entry& e : entries) {
        if (e.seq == victim) victim_computed += e.n;
      }
      positions -= PolicyPositions(*victim, victim_computed);
      Preempt(*victim, entries, budget, plan);
      preempted = true;
      if (victim == s) break;
      m = TokensThatFit(*s, n, positions);
    }
    if (s->state != SequenceState::kRunning || m == 0) continue;
    positions += PolicyPositions(*s, s->num_computed + m) - PolicyPositions(*s, s->num_computed);
    absl::StatusOr<std::vector<BlockCopy>> copies = blocks_.Reserve(s->id, s->slots() + m);
    CHECK_OK(copies.status());  // TokensThatFit checked the blocks
    OffloadEvicted(plan);
    entries.push_back({s, m, *std::move(copies)});
    budget -= m;
  }

  // 2. Admissions, unless this step had to preempt.
  if (!preempted) {
    // Blocks the running sequences still need to finish their prefill (promised to them), with
    // one block per unforked child (its first token's copy-on-write or new block).
    int64_t promised = 0;
    int64_t slots = 0;  // against max_num_seqs
    // KV policy state positions the running sequences will hold once their known tokens are
    // computed (header comment "KV policy state memory"): `positions` and, for each one still in
    // its prompt after this plan, the rest of it.
    int64_t promised_positions = positions;
    const int64_t max_positions = config_.kv_policy_max_positions;
    for (const Seq* s : running_) {
      promised += blocks_.BlocksNeeded(s->id, static_cast<int64_t>(s->tokens.size()) - s->slot_offset) +
                  static_cast<int64_t>(s->child_ids.size());
      slots += Slots(*s);
    }
    if (max_positions > 0) {
      absl::flat_hash_map<const Seq*, int64_t> scheduled;
      for (const Entry& e : entries) scheduled[e.seq] = e.n;
      for (const Seq* s : running_) {
        auto it = scheduled.find(s);
        const int64_t after = s->num_computed + (it == scheduled.end() ? 0 : it->second);
        const int64_t prompt = static_cast<int64_t>(s->tokens.size());
        if (after < prompt) promised_positions += PolicyPositions(*s, prompt) - PolicyPositions(*s, after);
      }
    }
    std::vector<Seq*> bypassed;
    hit_memo_.clear();
    while (!waiting_.empty() && budget > 0) {
      Seq& s = PickWaiting(bypassed);
      if (slots + Slots(s) > config_.max_num_seqs) break;  // in order: no skipping ahead
      const int64_t num_tokens = static_cast<int64_t>(s.tokens.size());
      const int64_t children = static_cast<int64_t>(s.child_ids.size());
      const std::vector<int32_t> hit = LookupPrefix(s);
      const int64_t num_hit = static_cast<int64_t>(hit.size());
      // The host tier continues the chain past the device hit: those blocks are loaded (device
      // blocks allocated: counted in `need` below) but not computed (not in the token budget).
      const int64_t num_host = static_cast<int64_t>(HostPrefix(s, hit.size()));
      const int64_t hit_tokens = (num_hit + num_host) * config_.block_size;
      // Room for the next token it computes, unless the token it samples next is its last
      // (a sampled token is written to the cache only when a later step computes it). Cached
      // blocks cost nothing unless they are free (cached but unreferenced).
      const bool grows = s.num_generated + 1 < s.params.max_tokens;
      const int64_t need = CeilDiv(num_tokens + (grows ? 1 : 0), config_.block_size) - num_hit +
                           blocks_.NumFree(hit) + (grows ? children : 0);
      const int64_t reserve =
          running_.empty() ? 0 : promised + static_cast<int64_t>(running_.size());
      if (need + reserve > blocks_.num_free_blocks()) {
        // Nothing running: only sessions' pins can be in the way; release the oldest.
        if (running_.empty() && sessions_.ReleaseOldest()) continue;
        break;  // in order: no skipping ahead
      }
      // Its prompt and next token's policy state positions, a copy per unforked child (Add
      // checked that they fit in all of them).
      const int64_t need_positions = PolicyPositions(s, num_tokens + (grows ? 1 : 0));
      if (max_positions > 0 && !running_.empty() &&
          promised_positions + static_cast<int64_t>(running_.size()) * kvpolicy::kDeviceStateGranule +
                  need_positions > max_positions) {
        break;  // in order: no skipping ahead
      }
      waiting_.erase(s.wait_key);
      for (Seq* b : bypassed) ++b->num_bypassed;
      s.state = SequenceState::kRunning;
      s.admission = next_admission_++;
      s.admitted_step = plan.step_id;
      running_.push_back(&s);
      CHECK_OK(blocks_.AddSequence(s.id, hit));
      if (num_host > 0) {
        // Pin the slots until this plan is sent: an offload of the same plan (run before the
        // loads) must not overwrite them.
        const absl::Span<const BlockHash> loaded =
            absl::MakeConstSpan(s.hashes).subspan(hit.size(), static_cast<size_t>(num_host));
        std::vector<int32_t> slots;
        for (const BlockHash& h : loaded) {
          slots.push_back(host_.Lookup(h));  // refreshed as most recently used
          CHECK_OK(host_.Pin(h));
          host_pins_.push_back(h);
        }
        absl::StatusOr<std::vector<int32_t>> fresh = blocks_.AppendLoadedBlocks(s.id, loaded);
        CHECK_OK(fresh.status());  // need <= free
        for (size_t i = 0; i < fresh->size(); ++i) plan.kv_loads.push_back({(*fresh)[i], slots[i]});
        OffloadEvicted(plan);
      }
      if (config_.enable_prefix_caching && !s.params.prompt_logprobs.has_value()) {
        PrefixCacheStats& st = blocks_.prefix_cache_stats();
        // The query and its hit once per request (its first admission, the one that sets
        // num_cached_prompt_tokens), not again when a preempted request is readmitted.
        if (s.num_cached_prompt_tokens < 0) {
          ++st.queries;
          st.query_tokens += (num_tokens - 1) / config_.block_size * config_.block_size;
          st.hit_tokens += num_hit * config_.block_size;
          st.host_hit_tokens += num_host * config_.block_size;
        }
        st.host_loads += num_host;  // blocks actually loaded, on every admission
      }
      if (s.num_cached_prompt_tokens < 0) {
        s.num_cached_prompt_tokens = std::min(hit_tokens, s.prompt_len);
      }
      if (!s.session.session_id.empty() && !SessionClosedSince(s)) sessions_.Touch(s.session, Now());
      s.num_computed = hit_tokens;
      const int64_t n = PromptChunk(s, std::min(num_tokens - hit_tokens, budget));
      absl::StatusOr<std::vector<BlockCopy>> copies = blocks_.Reserve(s.id, hit_tokens + n);
      CHECK_OK(copies.status());  // need <= free
      OffloadEvicted(plan);
      entries.push_back({&s, n, *std::move(copies)});
      budget -= n;
      promised += blocks_.BlocksNeeded(s.id, num_tokens) + children;
      promised_positions += PolicyPositions(s, num_tokens);
      slots += Slots(s);
    }
  }

  // 3. The plan: only what the workers do not hold yet (step/step.h). The scheduled tokens
  // count as computed from here on.
  plan.seqs.reserve(entries.size());
  for (Entry& e : entries) {
    Seq& s = *e.seq;
    ScheduledSequence out;
    out.seq_id = s.id;
    if (!s.workers_have_tokens) {
      out.new_token_ids = s.tokens;  // no tokens are pending for a sequence being (re)admitted
      s.workers_have_tokens = true;
    }
    out.num_computed_tokens = s.num_computed;
    out.num_scheduled_tokens = static_cast<int32_t>(e.n);
    const absl::Span<const int32_t> table = blocks_.BlockTable(s.id);
    if (!e.copies.empty()) {
      // Copy-on-write: Reserve replaced the shared partial last block the workers hold.
      CHECK(e.copies.size() == 1 && s.blocks_sent > 0 &&
            table[s.blocks_sent - 1] == e.copies[0].dst)
          << "sequence " << s.id << ": unexpected copy-on-write";
      out.replace_last_block = e.copies[0].dst;
    }
    out.new_block_ids.assign(table.begin() + static_cast<int64_t>(s.blocks_sent), table.end());
    s.blocks_sent = table.size();
    s.num_computed += e.n;
    s.computing.emplace_back(plan.step_id, s.num_computed);
    out.sample = s.num_computed == s.num_tokens();
    if (out.sample) s.sample_steps.push_back(plan.step_id);
    if (!s.seen_by_workers) {  // first sight; kept across preemptions
      out.params = s.params;
      // Only completion 0 keeps blocks for its session (Finish).
      out.session = !s.session.session_id.empty() && s.parent < 0;
    }
    s.seen_by_workers = true;
    plan.copies.insert(plan.copies.end(), e.copies.begin(), e.copies.end());
    if (out.sample && !s.child_ids.empty()) Fork(s, plan.step_id, out);
    plan.seqs.push_back(std::move(out));
  }
  // The plan is built: later plans run after its loads, so their slots may be reused again.
  for (const BlockHash& h : host_pins_) CHECK_OK(host_.Unpin(h));
  host_pins_.clear();
  if (plan.empty()) {
    plan.step_id = 0;  // nothing to send: no step id is used up
  } else {
    step_id_ = plan.step_id;
  }
  return plan;
}

void Scheduler::Fork(Seq& parent, uint64_t step_id, ScheduledSequence& out) {
  // The parent samples its prompt's first token in this step: its children sample theirs from
  // the same logits and share its blocks from here on (step/step.h).
  const size_t table_size = blocks_.BlockTable(parent.id).size();
  out.fork_child_ids = parent.child_ids;
  for (int64_t id : parent.child_ids) {
    reserved_.erase(id);
    CHECK_OK(blocks_.Fork(parent.id, id));  // ids checked free by Add
    auto c = std::make_unique<Seq>();
    c->id = id;
    c->tokens = parent.tokens;  // the prompt: the parent has generated nothing yet
    c->prompt_len = parent.prompt_len;
    c->params = parent.params;
    c->priority = parent.priority;
    c->state = SequenceState::kRunning;
    c->admission = next_admission_++;
    c->num_computed = parent.num_computed;
    c->sample_steps.push_back(step_id);
    c->workers_have_tokens = true;
    c->blocks_sent = table_size;
    c->seen_by_workers = true;
    c->parent = parent.id;
    c->fork_step = step_id;
    c->root = parent.root;
    c->hashes = parent.hashes;
    if (!parent.turn_session.session_id.empty()) {  // the turn goes on while any completion runs
      c->turn_session = parent.turn_session;
      c->session_epoch = parent.session_epoch;
      ++session_requests_[c->turn_session].live;
    }
    c->computing = parent.computing;  // its blocks are the parent's up to here
    c->admitted_step = step_id;
    c->slot_offset = parent.slot_offset;  // 0: a parent with unforked children is never compacted
    c->index_limit = parent.index_limit;
    running_.push_back(c.get());
    seqs_.emplace(id, std::move(c));
  }
  parent.child_ids.clear();
}

std::vector<SequenceEvent> Scheduler::Apply(const StepResult& result) {
  std::vector<SequenceEvent> events;
  if (result.step_id == 0) return events;  // no plan has id 0
  // Requests the workers left out of the step end with the workers' status.
  for (const FailedSequence& f : result.failed) {
    auto it = seqs_.find(f.seq_id);
    if (it == seqs_.end()) continue;  // ended meanwhile
    Seq& s = *it->second;
    SequenceEvent ev;
    ev.seq_id = s.id;
    ev.finished = true;
    ev.reason = FinishReason::kError;
    ev.status = f.status.ok() ? absl::InternalError("worker failed the sequence") : f.status;
    const absl::Status status = ev.status;
    events.push_back(std::move(ev));
    EndUnstartedChildren(s, result.step_id, status, events);
    End(s, /*completed=*/false);
  }
  // The step's computed blocks are confirmed (for the sequences it did not fail): index them.
  for (Seq* s : running_) {
    while (!s->computing.empty() && s->computing.front().first < result.step_id) {
      s->computing.pop_front();  // not expected: results come in step order
    }
    if (s->computing.empty() || s->computing.front().first != result.step_id) continue;
    const int64_t done = s->computing.front().second;
    s->computing.pop_front();
    CacheComputed(*s, done);
  }
  for (const KvSlotReport& r : result.kv_slots) {
    auto it = seqs_.find(r.seq_id);
    if (it == seqs_.end()) continue;
    Seq& s = *it->second;
    // A report from before the latest admission describes a state the workers dropped.
    if (s.state != SequenceState::kRunning || result.step_id < s.admitted_step) continue;
    if (r.num_computed_tokens > s.num_computed || r.compact_from < 0 || r.slots_needed < r.compact_from) continue;
    s.kv_slots = r;
  }
  for (const SampledToken& t : result.sampled) {
    auto it = seqs_.find(t.seq_id);
    if (it == seqs_.end()) continue;  // ended meanwhile (an overrun step's token is dropped)
    Seq& s = *it->second;
    if (s.sample_steps.empty() || s.sample_steps.front() != result.step_id) continue;
    s.sample_steps.pop_front();
    SequenceEvent ev;
    ev.seq_id = s.id;
    if (t.token < 0 || t.token >= config_.vocab_size) {
      ev.finished = true;
      ev.reason = FinishReason::kError;
      ev.status = absl::InternalError(absl::StrCat("the worker sampled token id ", t.token,
                                                   ", outside the vocabulary"));
      events.push_back(std::move(ev));
      End(s, /*completed=*/false);
      continue;
    }
    if (s.params.logprobs.has_value() && !t.logprobs.has_value()) {
      ev.finished = true;
      ev.reason = FinishReason::kError;
      ev.status = absl::InternalError(absl::StrCat(
          "the worker sent no logprobs for token ", t.token, " of a request that asked for them"));
      events.push_back(std::move(ev));
      End(s, /*completed=*/false);
      continue;
    }
    ev.token = t.token;
    if (s.params.logprobs.has_value()) ev.logprobs = t.logprobs;
    s.tokens.push_back(t.token);
    ++s.num_generated;
    // Tokens 1..min_tokens never stop (the workers suppress EOS and stop ids there too).
    const bool may_stop = s.num_generated > s.params.min_tokens;
    const bool eos = !s.params.ignore_eos &&
                     ContainsValue(config_.eos_token_ids, static_cast<int64_t>(t.token));
    if (may_stop && (eos || ContainsValue(s.params.stop_token_ids, t.token))) {
      ev.reason = FinishReason::kStop;
      ev.stop_reason.token_id = t.token;
    } else if (s.num_generated >= s.params.max_tokens) {
      ev.reason = FinishReason::kLength;
    }
    ev.finished = ev.reason != FinishReason::kNone;
    events.push_back(ev);
    if (ev.finished) End(s, /*completed=*/true);
  }
  // Sequences that were to be sampled in that step but got no token (a forking parent's
  // children with it).
  std::vector<int64_t> missing;
  for (Seq* s : running_) {
    if (!s->sample_steps.empty() && s->sample_steps.front() == result.step_id) {
      missing.push_back(s->id);
    }
  }
  for (int64_t id : missing) {
    auto it = seqs_.find(id);
    if (it == seqs_.end()) continue;  // a child ended with its parent
    Seq& s = *it->second;
    SequenceEvent ev;
    ev.seq_id = s.id;
    ev.finished = true;
    ev.reason = FinishReason::kError;
    ev.status = absl::InternalError(
        absl::StrCat("step ", result.step_id, " sampled no token for the request"));
    const absl::Status status = ev.status;
    events.push_back(std::move(ev));
    EndUnstartedChildren(s, result.step_id, status, events);
    End(s, /*completed=*/false);
  }
  return events;
}

bool Scheduler::HasWork() const {
  return !waiting_.empty() || !running_.empty() || !ended_.empty();
}

std::optional<SequenceInfo> Scheduler::GetSequence(int64_t seq_id) const {
  auto it = seqs_.find(seq_id);
  if (it == seqs_.end()) return std::nullopt;
  const Seq& s = *it->second;
  SequenceInfo info;
  info.state = s.state;
  info.priority = s.priority;
  info.prompt_len = s.prompt_len;
  info.num_tokens = static_cast<int64_t>(s.tokens.size());
  info.num_computed = s.num_computed;
  info.num_generated = s.num_generated;
  info.num_blocks = s.state == SequenceState::kRunning
                        ? static_cast<int32_t>(blocks_.BlockTable(s.id).size())
                        : 0;
  info.num_preemptions = s.num_preemptions;
  info.num_cached_prompt_tokens = s.num_cached_prompt_tokens;
  return info;
}

absl::Span<const int32_t> Scheduler::Tokens(int64_t seq_id) const {
  auto it = seqs_.find(seq_id);
  if (it == seqs_.end()) return {};
  return it->second->tokens;
}

absl::Status Scheduler::Validate() const {
  auto bad = [](auto&&... args) { return absl::InternalError(absl::StrCat(args...)); };
  if (waiting_.size() + running_.size() != seqs_.size()) {
    return bad(waiting_.size(), " waiting + ", running_.size(), " running != ", seqs_.size(),
               " sequences");
  }
  int64_t slots = 0;
  for (const Seq* s : running_) slots += Slots(*s);
  if (slots > config_.max_num_seqs) {
    return bad(slots, " running (with unforked children) > max_num_seqs ", config_.max_num_seqs);
  }
  if (config_.kv_policy_max_positions > 0 && num_kv_policy_positions() > config_.kv_policy_max_positions) {
    return bad(num_kv_policy_positions(), " KV policy state positions > kv_policy_max_positions ",
               config_.kv_policy_max_positions);
  }
  size_t num_reserved = 0;
  for (const auto& [id, p] : seqs_) {
    for (int64_t c : p->child_ids) {
      ++num_reserved;
      if (!reserved_.contains(c) || seqs_.contains(c)) {
        return bad("child id ", c, " of sequence ", id, " is not reserved or is live");
      }
    }
  }
  if (num_reserved != reserved_.size()) {
    return bad(reserved_.size(), " reserved child ids, ", num_reserved, " unforked children");
  }
  if (blocks_.num_sequences() != running_.size()) {
    return bad("the block manager holds ", blocks_.num_sequences(), " sequences, ",
               running_.size(), " are running");
  }
  for (const auto& [id, p] : seqs_) {
    const Seq& s = *p;
    if (s.id != id) return bad("sequence ", s.id, " stored under id ", id);
    if (static_cast<int64_t>(s.tokens.size()) != s.prompt_len + s.num_generated) {
      return bad("sequence ", id, ": ", s.tokens.size(), " tokens != prompt ", s.prompt_len,
                 " + generated ", s.num_generated);
    }
    if (s.num_generated >= s.params.max_tokens) {
      return bad("sequence ", id, " is live with ", s.num_generated, " of max ",
                 s.params.max_tokens, " tokens generated");
    }
    if (s.num_computed < 0) return bad("sequence ", id, ": ", s.num_computed, " computed");
    if (s.num_pending() != 0 && s.state != SequenceState::kRunning) {
      return bad("sequence ", id, " awaits a token but is not running");
    }
    if (s.num_computed > s.num_tokens()) {
      return bad("sequence ", id, ": ", s.num_computed, " computed of ", s.num_tokens(),
                 " known and pending tokens");
    }
    if (s.state == SequenceState::kRunning && s.blocks_sent > blocks_.BlockTable(s.id).size()) {
      return bad("sequence ", id, ": ", s.blocks_sent, " blocks sent, it holds ",
                 blocks_.BlockTable(s.id).size());
    }
    if (ContainsValue(ended_, id)) return bad("sequence ", id, " is live and ended");
  }
  for (const WaitKey& k : waiting_) {
    auto it = seqs_.find(std::get<2>(k));
    if (it == seqs_.end()) return bad("waiting sequence ", std::get<2>(k), " is unknown");
    const Seq& s = *it->second;
    if (s.state != SequenceState::kWaiting || s.wait_key != k) {
      return bad("waiting sequence ", s.id, " has another state or queue key");
    }
    if (blocks_.Has(s.id) || s.num_computed != 0) {
      return bad("waiting sequence ", s.id, " holds KV blocks or computed tokens");
    }
  }
  std::vector<int32_t> holders(config_.num_blocks, 0);
  for (int32_t b : sessions_.AllPinnedBlocks()) {
    if (b < 0 || b >= config_.num_blocks) return bad("a session pins block ", b);
    ++holders[b];
  }
  for (size_t i = 0; i < running_.size(); ++i) {
    const Seq& s = *running_[i];
    auto it = seqs_.find(s.id);
    if (it == seqs_.end() || it->second.get() != &s || s.state != SequenceState::kRunning) {
      return bad("running sequence ", s.id, " is unknown or has another state");
    }
    if (i > 0 && running_[i - 1]->admission >= s.admission) {
      return bad("running set out of admission order at sequence ", s.id);
    }
    if (!blocks_.Has(s.id) || blocks_.NumTokens(s.id) != s.slots()) {
      return bad("running sequence ", s.id, ": block manager tokens != ", s.num_computed,
                 " computed - ", s.slot_offset, " compacted");
    }
    const absl::Span<const int32_t> table = blocks_.BlockTable(s.id);
    if (static_cast<int64_t>(table.size()) != CeilDiv(s.slots(), config_.block_size)) {
      return bad("running sequence ", s.id, ": ", table.size(), " blocks for ", s.slots(),
                 " cache slots");
    }
    for (int32_t b : table) {
      if (b < 0 || b >= config_.num_blocks) return bad("sequence ", s.id, " holds block ", b);
      ++holders[b];
    }
  }
  int32_t used = 0;
  for (int32_t b = 0; b < config_.num_blocks; ++b) {
    if (holders[b] != blocks_.pool().RefCount(b)) {
      return bad("block ", b, " has ref count ", blocks_.pool().RefCount(b), " but ", holders[b],
                 " holders");
    }
    if (holders[b] > 0) ++used;
  }
  if (used + blocks_.num_free_blocks() != config_.num_blocks) {
    return bad(used, " blocks held + ", blocks_.num_free_blocks(), " free != ",
               config_.num_blocks);
  }
  return absl::OkStatus();
}

}  // namespace lorc
