#include "step/step_proto.h"

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace lorc {
namespace {

void ParamsToProto(const SamplingParams& p, lorcserve::internal::SamplingParams* out) {
  out->set_temperature(p.temperature);
  out->set_top_k(p.top_k);
  out->set_top_p(p.top_p);
  out->set_min_p(p.min_p);
  out->set_repetition_penalty(p.repetition_penalty);
  out->set_has_seed(p.seed.has_value());
  out->set_seed(p.seed.value_or(0));
  out->set_prompt_logprobs(p.prompt_logprobs.has_value());
  out->set_prompt_logprobs_top(p.prompt_logprobs.value_or(0));
  out->set_has_logprobs(p.logprobs.has_value());
  out->set_logprobs_top(p.logprobs.value_or(0));
  out->set_n(p.n);
  out->set_min_tokens(p.min_tokens);
  out->mutable_allowed_token_ids()->Add(p.allowed_token_ids.begin(), p.allowed_token_ids.end());
  for (const auto& [id, bias] : p.logit_bias) {
    out->add_logit_bias_ids(id);
    out->add_logit_bias_values(bias);
  }
  out->set_presence_penalty(p.presence_penalty);
  out->set_frequency_penalty(p.frequency_penalty);
  out->mutable_stop_token_ids()->Add(p.stop_token_ids.begin(), p.stop_token_ids.end());
  out->set_ignore_eos(p.ignore_eos);
  out->set_max_tokens(p.max_tokens);
}

// Stop strings stay with the coordinator (it detokenises); the worker gets what it samples with.
SamplingParams ParamsFromProto(const lorcserve::internal::SamplingParams& p) {
  SamplingParams sp;
  sp.temperature = p.temperature();
  sp.top_k = p.top_k();
  sp.top_p = p.top_p();
  sp.min_p = p.min_p();
  sp.repetition_penalty = p.repetition_penalty();
  if (p.has_seed()) sp.seed = p.seed();
  if (p.prompt_logprobs()) sp.prompt_logprobs = p.prompt_logprobs_top();
  if (p.has_logprobs()) sp.logprobs = p.logprobs_top();
  sp.n = p.n() == 0 ? 1 : p.n();
  sp.min_tokens = p.min_tokens();
  sp.allowed_token_ids.assign(p.allowed_token_ids().begin(), p.allowed_token_ids().end());
  const int nb = std::min(p.logit_bias_ids_size(), p.logit_bias_values_size());
  for (int i = 0; i < nb; ++i) sp.logit_bias.emplace_back(p.logit_bias_ids(i), p.logit_bias_values(i));
  sp.presence_penalty = p.presence_penalty();
  sp.frequency_penalty = p.frequency_penalty();
  sp.stop_token_ids.assign(p.stop_token_ids().begin(), p.stop_token_ids().end());
  sp.ignore_eos = p.ignore_eos();
  if (p.max_tokens() > 0) sp.max_tokens = p.max_tokens();
  return sp;
}

void LogprobsToProto(const TokenLogprobs& l, lorcserve::internal::TokenLogprobs* out) {
  out->set_logprob(l.logprob);
  out->set_rank(l.rank);
  out->mutable_top_ids()->Add(l.top_ids.begin(), l.top_ids.end());
  out->mutable_top_logprobs()->Add(l.top_logprobs.begin(), l.top_logprobs.end());
}

TokenLogprobs LogprobsFromProto(const lorcserve::internal::TokenLogprobs& p) {
  TokenLogprobs l;
  l.logprob = p.logprob();
  l.rank = p.rank();
  l.top_ids.assign(p.top_ids().begin(), p.top_ids().end());
  l.top_logprobs.assign(p.top_logprobs().begin(), p.top_logprobs().end());
  return l;
}

}  // namespace

void StepPlanToProto(const StepPlan& plan, lorcserve::internal::StepPlan* out) {
  out->Clear();
  out->set_step_id(plan.step_id);
  out->mutable_seqs()->Reserve(static_cast<int>(plan.seqs.size()));
  for (const ScheduledSequence& s : plan.seqs) {
    auto* p = out->add_seqs();
    p->set_seq_id(s.seq_id);
    p->mutable_new_token_ids()->Add(s.new_token_ids.begin(), s.new_token_ids.end());
    p->set_num_computed_tokens(s.num_computed_tokens);
    p->set_num_scheduled_tokens(s.num_scheduled_tokens);
    p->mutable_new_block_ids()->Add(s.new_block_ids.begin(), s.new_block_ids.end());
    p->set_sample(s.sample);
    if (s.params.has_value()) ParamsToProto(*s.params, p->mutable_params());
    p->mutable_fork_child_ids()->Add(s.fork_child_ids.begin(), s.fork_child_ids.end());
    if (s.replace_last_block >= 0) p->set_replace_last_block(s.replace_last_block);
    p->set_session(s.session);
  }
  for (const BlockCopy& c : plan.copies) {
    auto* p = out->add_copies();
    p->set_src(c.src);
    p->set_dst(c.dst);
  }
  for (const HostBlockCopy& c : plan.kv_offloads) {
    auto* p = out->add_kv_offloads();
    p->set_block(c.block);
    p->set_slot(c.slot);
  }
  for (const HostBlockCopy& c : plan.kv_loads) {
    auto* p = out->add_kv_loads();
    p->set_block(c.block);
    p->set_slot(c.slot);
  }
  for (const KvCompaction& c : plan.kv_compactions) {
    auto* p = out->add_kv_compactions();
    p->set_seq_id(c.seq_id);
    p->set_num_slots(c.num_slots);
  }
  out->mutable_finished()->Add(plan.finished.begin(), plan.finished.end());
  out->mutable_preempted()->Add(plan.preempted.begin(), plan.preempted.end());
}

StepPlan StepPlanFromProto(const lorcserve::internal::StepPlan& p) {
  StepPlan plan;
  plan.step_id = p.step_id();
  plan.seqs.reserve(p.seqs_size());
  for (const auto& s : p.seqs()) {
    ScheduledSequence q;
    q.seq_id = s.seq_id();
    q.new_token_ids.assign(s.new_token_ids().begin(), s.new_token_ids().end());
    q.num_computed_tokens = s.num_computed_tokens();
    q.num_scheduled_tokens = s.num_scheduled_tokens();
    q.new_block_ids.assign(s.new_block_ids().begin(), s.new_block_ids().end());
    q.sample = s.sample();
    if (s.has_params()) q.params = ParamsFromProto(s.params());
    q.fork_child_ids.assign(s.fork_child_ids().begin(), s.fork_child_ids().end());
    q.replace_last_block = s.has_replace_last_block() ? s.replace_last_block() : -1;
    q.session = s.session();
    plan.seqs.push_back(std::move(q));
  }
  for (const auto& c : p.copies()) plan.copies.push_back({c.src(), c.dst()});
  for (const auto& c : p.kv_offloads()) plan.kv_offloads.push_back({c.block(), c.slot()});
  for (const auto& c : p.kv_loads()) plan.kv_loads.push_back({c.block(), c.slot()});
  for (const auto& c : p.kv_compactions()) plan.kv_compactions.push_back({c.seq_id(), c.num_slots()});
  plan.finished.assign(p.finished().begin(), p.finished().end());
  plan.preempted.assign(p.preempted().begin(), p.preempted().end());
  return plan;
}

void StepResultToProto(const StepResult& r, lorcserve::internal::StepResult* out) {
  out->Clear();
  out->set_step_id(r.step_id);
  for (const SampledToken& t : r.sampled) {
    auto* p = out->add_sampled();
    p->set_seq_id(t.seq_id);
    p->set_token(t.token);
    if (t.logprobs.has_value()) LogprobsToProto(*t.logprobs, p->mutable_logprobs());
  }
  for (const FailedSequence& f : r.failed) {
    auto* p = out->add_failed();
    p->set_seq_id(f.seq_id);
    p->set_code(static_cast<int32_t>(f.status.code()));
    p->set_message(std::string(f.status.message()));
  }
  for (const PromptLogprobs& l : r.prompt_logprobs) {
    auto* p = out->add_prompt_logprobs();
    p->set_seq_id(l.seq_id);
    p->set_first_position(l.first_position);
    for (const TokenLogprobs& t : l.logprobs) LogprobsToProto(t, p->add_positions());
  }
  for (const KvSlotReport& k : r.kv_slots) KvSlotReportToProto(k, out->add_kv_slots());
  out->set_compute_us(r.compute_us);
  out->set_idle_us(r.idle_us);
}

void KvSlotReportToProto(const KvSlotReport& k, lorcserve::internal::KvSlotReport* out) {
  out->set_seq_id(k.seq_id);
  out->set_num_computed_tokens(k.num_computed_tokens);
  out->set_compact_from(k.compact_from);
  out->set_slots_needed(k.slots_needed);
  out->set_low_in_slots(k.low_in_slots);
}

KvSlotReport KvSlotReportFromProto(const lorcserve::internal::KvSlotReport& p) {
  return {p.seq_id(), p.num_computed_tokens(), p.compact_from(), p.slots_needed(), p.low_in_slots()};
}

StepResult StepResultFromProto(const lorcserve::internal::StepResult& p) {
  StepResult r;
  r.step_id = p.step_id();
  r.compute_us = p.compute_us();
  r.idle_us = p.idle_us();
  r.sampled.reserve(p.sampled_size());
  for (const auto& t : p.sampled()) {
    SampledToken s{t.seq_id(), t.token(), std::nullopt};
    if (t.has_logprobs()) s.logprobs = LogprobsFromProto(t.logprobs());
    r.sampled.push_back(std::move(s));
  }
  for (const auto& f : p.failed()) {
    // A worker never reports OK for a failed sequence; an out-of-range code still fails it.
    absl::StatusCode code = static_cast<absl::StatusCode>(f.code());
    if (code == absl::StatusCode::kOk) code = absl::StatusCode::kInternal;
    r.failed.push_back({f.seq_id(), absl::Status(code, f.message())});
  }
  for (const auto& l : p.prompt_logprobs()) {
    PromptLogprobs lp{l.seq_id(), l.first_position(), {}};
    for (const auto& t : l.positions()) lp.logprobs.push_back(LogprobsFromProto(t));
    r.prompt_logprobs.push_back(std::move(lp));
  }
  for (const auto& k : p.kv_slots()) r.kv_slots.push_back(KvSlotReportFromProto(k));
  return r;
}

void KvPolicyToProto(const kvpolicy::KvPolicyConfig& c, lorcserve::internal::KvPolicy* out) {
  out->set_kind(kvpolicy::KvPolicyKindName(c.kind));
  out->set_window(c.window);
  out->set_recent(c.recent);
  out->set_sinks(c.sinks);
  out->set_budget_fraction(c.budget_fraction);
  out->set_budget_tokens(c.budget_tokens);
  out->set_low_bits(c.low_bits);
  out->set_prefill(kvpolicy::KvPolicyPrefillName(c.prefill));
  out->set_prefill_interval(c.prefill_interval);
}

absl::StatusOr<kvpolicy::KvPolicyConfig> KvPolicyFromProto(const lorcserve::internal::KvPolicy& p) {
  kvpolicy::KvPolicyConfig c;
  absl::StatusOr<kvpolicy::KvPolicyKind> kind = kvpolicy::ParseKvPolicyKind(p.kind());
  if (!kind.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("kv_policy.kind: ", kind.status().message()));
  }
  absl::StatusOr<kvpolicy::KvPolicyPrefill> prefill = kvpolicy::ParseKvPolicyPrefill(p.prefill());
  if (!prefill.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("kv_policy.prefill: ", prefill.status().message()));
  }
  c.kind = *kind;
  c.prefill = *prefill;
  c.window = p.window();
  c.recent = p.recent();
  c.sinks = p.sinks();
  c.budget_fraction = p.budget_fraction();
  c.budget_tokens = p.budget_tokens();
  c.low_bits = p.low_bits();
  c.prefill_interval = p.prefill_interval();
  const absl::Status s = kvpolicy::ValidateKvPolicyConfig(c);
  if (!s.ok()) return absl::InvalidArgumentError(absl::StrCat("kv_policy: ", s.message()));
  return c;
}

}  // namespace lorc
