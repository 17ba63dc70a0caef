#include "worker/step_executor.h"

#include <algorithm>
#include <memory>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "backend/sampling.h"
#include "common/env_switch.h"
#include "common/status_macros.h"
#include "worker/comm/communicator.h"

namespace lorc {
namespace {

using Clock = std::chrono::steady_clock;

int64_t Micros(Clock::duration d) {
  return std::chrono::duration_cast<std::chrono::microseconds>(d).count();
}

// In the sampled-id broadcast: the draw's logits row held a NaN or an infinity
// (SampleOutput::non_finite), so the request fails on every rank.
constexpr int32_t kBrokenLogits = -1;

}  // namespace

StepExecutor::StepExecutor(ModelRunner* runner, Communicator* comm, int max_in_flight)
    : runner_(runner),
      comm_(comm != nullptr && comm->world().world_size > 1 ? comm : nullptr),
      samples_(comm_ == nullptr || comm_->world().rank == 0),
      max_in_flight_(std::max(1, max_in_flight)),
      launch_ahead_(comm_ == nullptr && max_in_flight_ >= 2 && runner->kv_policy() == nullptr &&
                    !EnvFlag("LORC_DISABLE_LAUNCH_AHEAD", false)) {}

int64_t StepExecutor::PromptLogprobRows(int64_t prompt_len, int64_t num_computed, int64_t n) {
  return std::clamp<int64_t>(prompt_len - 1 - num_computed, 0, n);
}

std::vector<int32_t> StepExecutor::Tokens(int64_t seq_id) const {
  auto it = seqs_.find(seq_id);
  return it == seqs_.end() ? std::vector<int32_t>() : it->second.tokens;
}

absl::Status StepExecutor::PrepareFork(const ScheduledSequence& s, const SeqState* st,
                                       int64_t known,
                                       const absl::flat_hash_map<int64_t, int>& claimed) const {
  const int64_t id = s.seq_id;
  if (s.replace_last_block < -1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "sequence ", id, ": replace_last_block ", s.replace_last_block, " (-1: none)"));
  }
  if (s.replace_last_block >= 0 && (st == nullptr || st->block_table.empty())) {
    return absl::InvalidArgumentError(absl::StrCat(
        "sequence ", id, ": replace_last_block ", s.replace_last_block,
        " but its block table is empty"));
  }
  if (s.fork_child_ids.empty()) return absl::OkStatus();
  const SamplingParams& params = st == nullptr ? *s.params : st->sampler->params();
  const int64_t prompt_len =
      st == nullptr ? static_cast<int64_t>(s.new_token_ids.size()) : st->prompt_len;
  if (params.n != static_cast<int64_t>(s.fork_child_ids.size()) + 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "sequence ", id, ": forks ", s.fork_child_ids.size(), " children but its n is ", params.n,
        " (children must be n - 1)"));
  }
  if (!s.sample || known != prompt_len ||
      s.num_computed_tokens + s.num_scheduled_tokens != prompt_len) {
    return absl::InvalidArgumentError(absl::StrCat(
        "sequence ", id, ": forks only on the step that samples after the prompt's last token (",
        prompt_len, " prompt tokens; ", known, " known, ",
        s.num_computed_tokens + s.num_scheduled_tokens, " computed after this step)"));
  }
  for (int64_t child : s.fork_child_ids) {
    if (seqs_.contains(child)) {
      return absl::FailedPreconditionError(
          absl::StrCat("sequence ", id, ": fork child ", child, " is already known"));
    }
    auto it = claimed.find(child);
    if (it != claimed.end() && it->second > 1) {
      return absl::InvalidArgumentError(absl::StrCat(
          "sequence ", id, ": fork child ", child, " occurs ", it->second,
          " times in the step (as a request or a fork child)"));
    }
  }
  return absl::OkStatus();
}

absl::Status StepExecutor::Prepare(const ScheduledSequence& s,
                                   const absl::flat_hash_map<int64_t, int>& claimed,
                                   SequenceStep* step) const {
  const int64_t id = s.seq_id;
  auto it = seqs_.find(id);
  const SeqState* st = it == seqs_.end() ? nullptr : &it->second;
  if (st == nullptr && !s.params.has_value()) {
    return absl::FailedPreconditionError(
        absl::StrCat("sequence ", id, " is unknown to this worker and comes without sampling params"));
  }
  if (st != nullptr && s.params.has_value()) {
    return absl::FailedPreconditionError(absl::StrCat("sequence ", id, " is already known"));
  }
  if (st != nullptr && !st->tokens.empty() && !s.new_token_ids.empty()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "sequence ", id, ": tokens re-sent while this worker holds its history (only a new or a "
        "preempted sequence gets its tokens)"));
  }
  if (s.params.has_value()) RETURN_IF_ERROR(s.params->Validate(runner_->config().vocab_size));
  // Every token on arrival, not only those computed this step: a chunked prefill computes the
  // rest later, and prompt log-probabilities read the logit of the token after the chunk
  // (fuzz/corpus/step_plan_fuzz/crash-unscheduled-token: read past the logit row).
  const int64_t vocab = runner_->config().vocab_size;
  for (size_t k = 0; k < s.new_token_ids.size(); ++k) {
    if (const int32_t t = s.new_token_ids[k]; t < 0 || t >= vocab) {
      return absl::InvalidArgumentError(absl::StrCat("sequence ", id, ": new_token_ids[", k,
                                                     "]: token id ", t,
                                                     " outside the vocabulary [0, ", vocab, ")"));
    }
  }
  const int64_t have = st == nullptr ? 0 : st->num_computed_tokens;
  // A (re)admitted request brings its tokens; its first num_computed_tokens may already be in
  // the blocks of its table (a prefix-cache hit, decided by the coordinator).
  const bool admitted = !s.new_token_ids.empty() && have == 0;
  if (admitted ? s.num_computed_tokens < 0 : s.num_computed_tokens != have) {
    return absl::FailedPreconditionError(absl::StrCat(
        "sequence ", id, ": the plan says ", s.num_computed_tokens,
        " tokens are computed, this worker has ", have));
  }
  const size_t known = (st == nullptr ? 0 : st->tokens.size()) + s.new_token_ids.size();
  // num_computed_tokens >= 0 here; compared before adding, as a plan's value may be near
  // INT64_MAX (the sum overflowed; fuzz/corpus/step_plan_fuzz/crash-computed-overflow).
  if (s.num_scheduled_tokens <= 0 || s.num_computed_tokens > static_cast<int64_t>(known) ||
      s.num_scheduled_tokens > static_cast<int64_t>(known) - s.num_computed_tokens) {
    return absl::InvalidArgumentError(absl::StrCat(
        "sequence ", id, ": ", s.num_scheduled_tokens, " tokens scheduled after ",
        s.num_computed_tokens, " computed, but ", known, " are known"));
  }
  RETURN_IF_ERROR(PrepareFork(s, st, static_cast<int64_t>(known), claimed));
  step->seq_id = id;
  step->num_computed_tokens = s.num_computed_tokens;
  step->tokens.clear();
  for (int64_t p = s.num_computed_tokens; p < s.num_computed_tokens + s.num_scheduled_tokens; ++p) {
    const size_t old = st == nullptr ? 0 : st->tokens.size();
    step->tokens.push_back(static_cast<size_t>(p) < old ? st->tokens[p] : s.new_token_ids[p - old]);
  }
  // Launch-ahead: the scheduled range ends at the placeholder of a draw still on the device.
  step->draw_index = -1;
  if (st != nullptr && st->pending_draw >= 0 &&
      static_cast<int64_t>(st->tokens.size()) == s.num_computed_tokens + s.num_scheduled_tokens) {
    step->draw_index = st->pending_draw;
  }
  step->block_table.clear();
  step->slot_offset = st == nullptr ? 0 : st->slot_offset;
  if (st != nullptr) step->block_table = st->block_table;
  if (s.replace_last_block >= 0) step->block_table.back() = s.replace_last_block;
  step->block_table.insert(step->block_table.end(), s.new_block_ids.begin(), s.new_block_ids.end());
  // Every rank computes the same logit rows when the LM head is split (they all-gather them).
  const bool computes_logits = samples_ || runner_->lm_head_sharded();
  const bool prompt_lp =
      st == nullptr ? s.params->prompt_logprobs.has_value() : st->prompt_logprobs >= 0;
  const int64_t prompt_len =
      st == nullptr ? static_cast<int64_t>(s.new_token_ids.size()) : st->prompt_len;
  // A (re)computed request's prompt is its original prompt: a preempted request's generated
  // tokens come after it.
  step->prompt_len = prompt_len;
  step->session = st == nullptr ? s.session : st->session;
  if (computes_logits && prompt_lp &&
      PromptLogprobRows(prompt_len, s.num_computed_tokens, s.num_scheduled_tokens) > 0) {
    step->logits = SequenceStep::Logits::kAll;
  } else {
    step->logits = s.sample && computes_logits ? SequenceStep::Logits::kLast
                                               : SequenceStep::Logits::kNone;
  }
  return runner_->ValidateSequence(*step);
}

absl::Status StepExecutor::ShareSampled(std::vector<int32_t>* tokens) {
  if (comm_ == nullptr || tokens->empty()) return absl::OkStatus();
  // Through backend memory: NCCL broadcasts device buffers (the CPU backend's are host memory).
  const size_t bytes = tokens->size() * sizeof(int32_t);
  Backend& be = runner_->backend();
  if (share_buf_.bytes() < bytes) {
    // The outgrown buffer is kept, not freed: freeing device memory synchronises the device, which
    // can wait on a peer's collective (see retired_share_bufs_).
    ASSIGN_OR_RETURN(DeviceBuffer grown,
                     be.Allocate(std::max({bytes, 2 * share_buf_.bytes(), size_t{4096}})));
    retired_share_bufs_.push_back(std::move(share_buf_));
    share_buf_ = std::move(grown);
  }
  if (samples_) RETURN_IF_ERROR(be.CopyToDevice(share_buf_.data(), tokens->data(), bytes));
  RETURN_IF_ERROR(comm_->Broadcast(share_buf_.data(), bytes, /*root=*/0));
  RETURN_IF_ERROR(comm_->Sync());
  RETURN_IF_ERROR(be.CopyToHost(tokens->data(), share_buf_.data(), bytes));
  return be.Synchronize();  // a device-to-host copy is complete only after it
}

absl::Status StepExecutor::Launch(const StepPlan& plan, InFlight* step, const int32_t* drawn) {
  step->t0 = Clock::now();
  if (last_step_id_ != 0 && plan.step_id != last_step_id_ + 1) {
    return absl::FailedPreconditionError(absl::StrCat(
        "step_id ", plan.step_id, " follows step_id ", last_step_id_, " (expected ",
        last_step_id_ + 1, "): steps must arrive in order, each once"));
  }
  StepResult& result = step->result;
  result.step_id = plan.step_id;
  if (last_end_ != Clock::time_point{} && step->t0 > last_end_) result.idle_us = Micros(step->t0 - last_end_);
  // KV policy compactions, host KV tier, then copy-on-write: every list is checked before
  // anything is moved or copied, and a bad entry fails the step as a whole before any
  // per-request state changes. Compactions first: a block they free may be a load's or a copy's
  // target in this plan.
  if (!plan.kv_compactions.empty()) {
    RETURN_IF_ERROR(runner_->CheckHostKv(plan.kv_offloads, plan.kv_loads));
    RETURN_IF_ERROR(ValidateBlockCopies(plan.copies, runner_->kv_spec().num_blocks));
    RETURN_IF_ERROR(Compact(plan));
  }
  RETURN_IF_ERROR(runner_->TransferHostKv(plan.kv_offloads, plan.kv_loads));
  RETURN_IF_ERROR(runner_->CopyBlocks(plan.copies));
  last_step_id_ = plan.step_id;
  for (int64_t id : plan.finished) {
    seqs_.erase(id);
    runner_->ReleaseKvPolicy(id);
  }
  for (int64_t id : plan.preempted) {
    runner_->ReleaseKvPolicy(id);
    if (auto it = seqs_.find(id); it != seqs_.end()) {
      it->second.tokens.clear();
      it->second.block_table.clear();
      it->second.num_computed_tokens = 0;
      it->second.slot_offset = 0;
      it->second.pending_draw = -1;
    }
  }

  // Validate each request on its own; the bad ones are dropped and reported (once each).
  absl::flat_hash_map<int64_t, int> occurrences;
  absl::flat_hash_map<int64_t, int> claimed;  // as a request or a fork child
  for (const ScheduledSequence& s : plan.seqs) {
    ++occurrences[s.seq_id];
    ++claimed[s.seq_id];
    for (int64_t c : s.fork_child_ids) ++claimed[c];
  }
  steps_.resize(plan.seqs.size());
  scheduled_.clear();
  size_t n = 0;
  for (const ScheduledSequence& s : plan.seqs) {
    int& count = occurrences[s.seq_id];
    if (count == 0) continue;  // a duplicate already reported
    absl::Status st = count > 1 ? absl::InvalidArgumentError(absl::StrCat(
                                      "sequence ", s.seq_id, " appears ", count, " times in one step"))
                                : Prepare(s, claimed, &steps_[n]);
    if (!st.ok()) {
      result.failed.push_back({s.seq_id, std::move(st)});
      seqs_.erase(s.seq_id);
      runner_->ReleaseKvPolicy(s.seq_id);
      count = 0;
      continue;
    }
    scheduled_.push_back(&s);
    ++n;
  }
  steps_.resize(n);

  StepOutput out;
  if (n > 0) {
    // Logits stay in backend memory for Backend::Sample; only prompt log-probabilities (computed
    // on the host from all-token rows) need them copied back.
    bool host_logits = false;
    for (const SequenceStep& st : steps_) {
      host_logits |= samples_ && st.logits == SequenceStep::Logits::kAll;
    }
    // Enqueued when this rank draws in this step: the commit and the draw's rows are prepared
    // while the forward pass runs, and the draw (after it in the stream) is waited for before the
    // step is returned, so a device error stays this step's. Other ranks and steps without a draw
    // wait here.
    // Launched ahead, it is left enqueued either way (the step before is still being returned).
    bool enqueue = drawn != nullptr;
    for (size_t i = 0; i < n; ++i) enqueue |= samples_ && scheduled_[i]->sample;
    ASSIGN_OR_RETURN(out, runner_->Execute(steps_, host_logits,
                                           enqueue ? ModelRunner::StepSync::kEnqueued
                                                   : ModelRunner::StepSync::kComplete,
                                           drawn));
  }
  step->device_logits = out.device_logits;

  // Commit the new state (every entry first: inserting new requests rehashes seqs_).
  for (size_t i = 0; i < n; ++i) {
    const ScheduledSequence& s = *scheduled_[i];
    SeqState& st = seqs_[s.seq_id];
    if (s.params.has_value()) {
      st.sampler = std::make_unique<Sampler>(*s.params, runner_->config().eos_token_ids);
      st.prompt_len = static_cast<int64_t>(s.new_token_ids.size());
      st.session = s.session;
      st.prompt_logprobs = s.params->prompt_logprobs.value_or(-1);
    }
    st.tokens.insert(st.tokens.end(), s.new_token_ids.begin(), s.new_token_ids.end());
    if (s.replace_last_block >= 0) st.block_table.back() = s.replace_last_block;
    st.block_table.insert(st.block_table.end(), s.new_block_ids.begin(), s.new_block_ids.end());
    if (!s.new_token_ids.empty() && st.num_computed_tokens == 0) {
      st.num_computed_tokens = s.num_computed_tokens;  // a prefix-cache hit
    }
    const int64_t computed_before = st.num_computed_tokens;
    st.num_computed_tokens += s.num_scheduled_tokens;
    if (samples_ && steps_[i].logits == SequenceStep::Logits::kAll) {
      PromptLogprobs lp{s.seq_id, computed_before + 1, {}};
      const int64_t rows = PromptLogprobRows(st.prompt_len, computed_before, s.num_scheduled_tokens);
      for (int64_t j = 0; j < rows; ++j) {
        TokenLogprobs t;
        t.top_ids.resize(st.prompt_logprobs);
        t.top_logprobs.resize(st.prompt_logprobs);
        const absl::Span<const float> logits(out.Row(out.row_begin[i] + j), out.vocab_size);
        if (st.broken_logits_at < 0 && !RowIsFinite(logits)) st.broken_logits_at = computed_before + j + 1;
        ComputeLogprobs(logits,
                        st.tokens[computed_before + j + 1], st.prompt_logprobs, &logprob_scratch_,
                        &t.logprob, &t.rank, t.top_ids.data(), t.top_logprobs.data());
        lp.logprobs.push_back(std::move(t));
      }
      result.prompt_logprobs.push_back(std::move(lp));
    }
  }
  // One draw per sampled token: the request's, then its fork children's (sampled on every rank:
  // the ids come in the broadcast). What later phases need of the plan is copied (the plan may be
  // gone when the step finishes).
  step->scheduled.clear();
  step->draws.clear();
  step->child_samplers.clear();
  for (size_t i = 0; i < n; ++i) {
    const ScheduledSequence& s = *scheduled_[i];
    step->scheduled.push_back(s.seq_id);
    if (!s.sample) continue;
    const SeqState& st = seqs_.at(s.seq_id);
    const int32_t row = samples_ ? out.sample_row[i] : 0;  // the chunk's last logit row
    step->draws.push_back({s.seq_id, -1, row});
    for (size_t c = 0; c < s.fork_child_ids.size(); ++c) {
      SamplingParams p = st.sampler->params();
      if (p.seed.has_value()) *p.seed += c + 1;
      step->child_samplers.push_back(std::make_unique<Sampler>(p, runner_->config().eos_token_ids));
      step->draws.push_back({s.fork_child_ids[c], s.seq_id, row});
    }
  }
  step->phase = InFlight::Phase::kLaunched;
  step->busy += Clock::now() - step->t0;
  return absl::OkStatus();
}

absl::Status StepExecutor::BeginDraw(InFlight* step) {
  const Clock::time_point begin = Clock::now();
  // Rows from each request's own stream and full history (every earlier draw is finished). A
  // request gone since the launch (a later plan finished it, or failed it) draws nothing.
  sample_rows_.clear();
  std::vector<InFlight::Draw> kept;
  size_t next_child = 0;
  std::vector<std::unique_ptr<Sampler>> kept_children;
  for (const InFlight::Draw& d : step->draws) {
    const int64_t request = d.parent < 0 ? d.seq_id : d.parent;
    auto it = seqs_.find(request);
    std::unique_ptr<Sampler> child;
    if (d.parent >= 0) child = std::move(step->child_samplers[next_child++]);
    if (it == seqs_.end()) continue;
    SeqState& st = it->second;
    if (samples_) {
      Sampler& sampler = d.parent < 0 ? *st.sampler : *child;
      sample_rows_.push_back(sampler.NextRow(st.tokens, st.prompt_len, d.row));
    }
    if (child) kept_children.push_back(std::move(child));
    kept.push_back(d);
    kept.back().position = static_cast<int64_t>(st.tokens.size());
  }
  step->draws = std::move(kept);
  step->child_samplers = std::move(kept_children);
  step->drawn = nullptr;
  if (samples_ && !step->draws.empty()) {
    // The logits in backend memory (device memory on CUDA), never copied to the host for this.
    RETURN_IF_ERROR(runner_->backend().BeginSample(step->device_logits, sample_rows_, &step->drawn));
  }
  // A placeholder for each request's token until FinishDraw: the next plan may schedule it
  // (launch-ahead takes its input id from `drawn` on the device).
  for (size_t i = 0; i < step->draws.size(); ++i) {
    if (step->draws[i].parent >= 0) continue;
    SeqState& st = seqs_.at(step->draws[i].seq_id);
    st.tokens.push_back(0);
    st.pending_draw = static_cast<int32_t>(i);
  }
  step->phase = InFlight::Phase::kDrawing;
  step->busy += Clock::now() - begin;
  return absl::OkStatus();
}

absl::Status StepExecutor::FinishDraw(InFlight* step) {
  const Clock::time_point begin = Clock::now();
  StepResult& result = step->result;
  const std::vector<InFlight::Draw>& draws = step->draws;
  std::vector<int32_t> sampled(draws.size(), 0);
  if (samples_ && !sampled.empty()) {
    RETURN_IF_ERROR(runner_->backend().FinishSample(&sample_out_));
    for (size_t i = 0; i < sampled.size(); ++i) {
      const int64_t request = draws[i].parent < 0 ? draws[i].seq_id : draws[i].parent;
      auto it = seqs_.find(request);
      if (sample_out_.non_finite[i] != 0 || (it != seqs_.end() && it->second.broken_logits_at >= 0)) {
        sampled[i] = kBrokenLogits;  // the request fails on every rank, below
        continue;
      }
      sampled[i] = sample_out_.tokens[i];
      SampledToken t{draws[i].seq_id, sampled[i], std::nullopt};
      if (const int32_t top = sample_rows_[i].logprobs; top >= 0) {
        const size_t at = i * SampleOutput::kStride;
        t.logprobs = TokenLogprobs{sample_out_.logprobs[i], sample_out_.ranks[i],
                                   {sample_out_.top_ids.begin() + at,
                                    sample_out_.top_ids.begin() + at + top},
                                   {sample_out_.top_logprobs.begin() + at,
                                    sample_out_.top_logprobs.begin() + at + top}};
      }
      result.sampled.push_back(std::move(t));
    }
  }
  RETURN_IF_ERROR(ShareSampled(&sampled));
  // A draw from a logits row with a NaN or an infinity (rank 0's Sample said so; the broadcast
  // told the other ranks): no token; the request fails alone, its children are not forked.
  absl::flat_hash_map<int64_t, int64_t> broken;  // failed request -> the position it names
  for (size_t i = 0; i < draws.size(); ++i) {
    if (sampled[i] != kBrokenLogits) continue;
    const int64_t id = draws[i].parent < 0 ? draws[i].seq_id : draws[i].parent;
    auto it = seqs_.find(id);  // gone: a plan launched ahead failed it; its draw's failure is still said
    broken.emplace(id, it != seqs_.end() && it->second.broken_logits_at >= 0 ? it->second.broken_logits_at
                                                                             : draws[i].position);
  }
  // Each request's token replaces its placeholder; then its children fork (a child copies its
  // parent's state, its own token in place of the parent's).
  for (size_t i = 0; i < draws.size(); ++i) {
    if (draws[i].parent >= 0) continue;
    auto it = seqs_.find(draws[i].seq_id);
    if (it == seqs_.end() || it->second.pending_draw != static_cast<int32_t>(i)) continue;
    it->second.tokens.back() = sampled[i];
    it->second.pending_draw = -1;
  }
  size_t next_child = 0;
  for (size_t i = 0; i < draws.size(); ++i) {
    const InFlight::Draw& d = draws[i];
    if (d.parent < 0) continue;
    std::unique_ptr<Sampler>& sampler = step->child_samplers[next_child++];
    auto parent_it = seqs_.find(d.parent);
    if (broken.contains(d.parent) || parent_it == seqs_.end()) continue;
    const SeqState& parent = parent_it->second;
    SeqState child;
    child.sampler = std::move(sampler);
    child.tokens = parent.tokens;
    child.tokens.back() = sampled[i];
    child.block_table = parent.block_table;
    child.num_computed_tokens = parent.num_computed_tokens;
    child.slot_offset = parent.slot_offset;
    child.prompt_len = parent.prompt_len;
    seqs_.emplace(d.seq_id, std::move(child));  // may rehash: no reference kept across it
    runner_->ForkKvPolicy(d.parent, d.seq_id);  // the parent's choice so far
  }
  for (const auto& [id, position] : broken) {
    result.failed.push_back(
        {id, absl::InternalError(absl::StrCat(
                 "the logits for the token at position ", position,
                 " (0-based, counting the prompt) hold NaN or infinite values: the weights or "
                 "activations of the model overflowed; the request was stopped"))});
    seqs_.erase(id);
    runner_->ReleaseKvPolicy(id);
  }
  // This rank's KV slots of each scheduled sequence with a policy (not for sessions: their
  // blocks are kept for the conversation, never compacted).
  for (int64_t id : step->scheduled) {
    auto it = seqs_.find(id);
    if (it == seqs_.end() || it->second.session) continue;
    if (std::optional<KvSlotReport> r = runner_->KvSlots(id)) result.kv_slots.push_back(*r);
  }
  // Offloads that did not have to finish before the forward pass overlapped with it; every host
  // KV copy of the step is complete when the step ends.
  RETURN_IF_ERROR(runner_->FinishHostKvTransfers());

  last_end_ = Clock::now();
  step->busy += last_end_ - begin;
  result.compute_us = Micros(step->busy);
  step->phase = InFlight::Phase::kDone;
  return absl::OkStatus();
}

bool StepExecutor::CanLaunchAhead(const StepPlan& plan, const InFlight& prev) const {
  if (!launch_ahead_ || !prev.error.ok() || prev.phase != InFlight::Phase::kDrawing || prev.draws.empty()) {
    return false;
  }
  // What needs the previous draw's outcome on the host first: block moves and host KV copies (a
  // request failing there frees its blocks), a plan that ends, preempts or forks one of its
  // requests (a fork child is made when the draw finishes).
  if (!plan.copies.empty() || !plan.kv_offloads.empty() || !plan.kv_loads.empty() ||
      !plan.kv_compactions.empty()) {
    return false;
  }
  absl::flat_hash_set<int64_t> drawing;
  for (const InFlight::Draw& d : prev.draws) {
    // A fork copies its parent's state when the draw finishes: before this plan commits it.
    if (d.parent >= 0) return false;
    drawing.insert(d.seq_id);
  }
  for (int64_t id : plan.finished) {
    if (drawing.contains(id)) return false;
  }
  for (int64_t id : plan.preempted) {
    if (drawing.contains(id)) return false;
  }
  for (const ScheduledSequence& s : plan.seqs) {
    if (!s.new_token_ids.empty() && drawing.contains(s.seq_id)) return false;
  }
  return true;
}

absl::StatusOr<StepResult> StepExecutor::Execute(const StepPlan& plan) {
  if (!in_flight_.empty()) {
    return absl::FailedPreconditionError(absl::StrCat("step ", plan.step_id, ": ", in_flight_.size(),
                                                      " submitted steps not awaited"));
  }
  RETURN_IF_ERROR(Submit(plan));
  return Await();
}

absl::Status StepExecutor::Compact(const StepPlan& plan) {
  absl::flat_hash_map<int64_t, int> seen;
  for (size_t i = 0; i < plan.kv_compactions.size(); ++i) {
    const KvCompaction& c = plan.kv_compactions[i];
    auto it = seqs_.find(c.seq_id);
    absl::Status st;
    if (++seen[c.seq_id] > 1) {
      st = absl::InvalidArgumentError("the sequence is compacted twice");
    } else if (it == seqs_.end() || it->second.tokens.empty()) {
      st = absl::FailedPreconditionError("the sequence is not running on this worker");
    } else {
      st = runner_->CheckKvCompaction(c.seq_id, it->second.num_computed_tokens, c.num_slots);
    }
    if (!st.ok()) {
      return absl::Status(st.code(), absl::StrCat("kv_compactions[", i, "] (sequence ", c.seq_id,
                                                  ", ", c.num_slots, " slots): ", st.message()));
    }
  }
  const int32_t bs = runner_->kv_spec().block_size;
  for (const KvCompaction& c : plan.kv_compactions) {
    SeqState& st = seqs_.at(c.seq_id);
    RETURN_IF_ERROR(runner_->CompactKv(c.seq_id, st.block_table, c.num_slots));
    st.block_table.resize(std::min<size_t>(st.block_table.size(), (c.num_slots + bs - 1) / bs));
    st.slot_offset = st.num_computed_tokens - c.num_slots;
  }
  return absl::OkStatus();
}

absl::Status StepExecutor::Submit(const StepPlan& plan) {
  if (in_flight_.size() >= static_cast<size_t>(max_in_flight_)) {
    return absl::FailedPreconditionError(
        absl::StrCat("step ", plan.step_id, ": ", in_flight_.size(), " steps already in flight"));
  }
  // Every earlier step's draw is enqueued before this step's forward pass overwrites the logits
  // (a step's draw begins once the one before it has finished); the newest one still drawing
  // either lends this step its tokens on the device (launch-ahead) or finishes first.
  InFlight* prev = nullptr;  // the newest step still drawing
  for (InFlight& f : in_flight_) {
    if (!f.error.ok() || f.phase == InFlight::Phase::kDone) continue;
    if (prev != nullptr) EndDraw(prev);
    if (f.phase == InFlight::Phase::kLaunched) StartDraw(&f);
    prev = f.error.ok() ? &f : nullptr;
  }
  const bool ahead = prev != nullptr && CanLaunchAhead(plan, *prev);
  if (prev != nullptr && !ahead) EndDraw(prev);
  const int32_t* drawn = ahead ? prev->drawn : nullptr;
  num_launched_ahead_ += ahead ? 1 : 0;
  InFlight& step = in_flight_.emplace_back();  // deque: `prev` stays valid
  step.error = Launch(plan, &step, drawn);
  if (!ahead) StartDraw(&step);  // else once `prev` has finished (Await)
  return absl::OkStatus();
}

absl::StatusOr<StepResult> StepExecutor::Await() {
  if (in_flight_.empty()) return absl::FailedPreconditionError("no step in flight");
  InFlight& oldest = in_flight_.front();
  if (oldest.phase == InFlight::Phase::kLaunched) StartDraw(&oldest);
  EndDraw(&oldest);
  absl::StatusOr<StepResult> r =
      oldest.error.ok() ? absl::StatusOr<StepResult>(std::move(oldest.result)) : oldest.error;
  in_flight_.pop_front();
  // A step launched ahead of this one draws now: its history is complete.
  if (!in_flight_.empty() && in_flight_.front().phase == InFlight::Phase::kLaunched) {
    StartDraw(&in_flight_.front());
  }
  return r;
}

void StepExecutor::StartDraw(InFlight* step) {
  if (step->error.ok() && step->phase == InFlight::Phase::kLaunched) step->error = BeginDraw(step);
}

void StepExecutor::EndDraw(InFlight* step) {
  if (!step->error.ok() || step->phase != InFlight::Phase::kDrawing) return;
  step->error = FinishDraw(step);
  if (step->error.ok()) return;
  // A draw that failed as a whole leaves no placeholder behind (its requests' histories end
  // where they did before it began).
  for (size_t i = 0; i < step->draws.size(); ++i) {
    auto it = seqs_.find(step->draws[i].seq_id);
    if (it == seqs_.end() || it->second.pending_draw != static_cast<int32_t>(i)) continue;
    it->second.tokens.pop_back();
    it->second.pending_draw = -1;
  }
}

}  // namespace lorc
