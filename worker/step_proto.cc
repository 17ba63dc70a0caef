#include "worker/step_proto.h"

namespace lorc {

void StepPlanToProto(const StepPlan& plan, lorcserve::internal::StepPlan* out) {
  out->Clear();
  out->set_step_id(plan.step_id);
  for (const ScheduledSequence& s : plan.seqs) {
    auto* p = out->add_seqs();
    p->set_seq_id(s.seq_id);
    p->mutable_tokens()->Add(s.tokens.begin(), s.tokens.end());
    p->set_num_cached(s.num_cached);
    p->mutable_block_table()->Add(s.block_table.begin(), s.block_table.end());
    p->set_sample(s.sample);
    if (s.params.has_value()) {
      auto* sp = p->mutable_params();
      sp->set_temperature(s.params->temperature);
      sp->set_top_k(s.params->top_k);
      sp->set_top_p(s.params->top_p);
      sp->set_min_p(s.params->min_p);
      sp->set_repetition_penalty(s.params->repetition_penalty);
      sp->set_has_seed(s.params->seed.has_value());
      sp->set_seed(s.params->seed.value_or(0));
    }
  }
  for (const BlockCopy& c : plan.copies) {
    auto* p = out->add_copies();
    p->set_src(c.src);
    p->set_dst(c.dst);
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
    q.tokens.assign(s.tokens().begin(), s.tokens().end());
    q.num_cached = s.num_cached();
    q.block_table.assign(s.block_table().begin(), s.block_table().end());
    q.sample = s.sample();
    if (s.has_params()) {
      SamplingParams sp;
      sp.temperature = s.params().temperature();
      sp.top_k = s.params().top_k();
      sp.top_p = s.params().top_p();
      sp.min_p = s.params().min_p();
      sp.repetition_penalty = s.params().repetition_penalty();
      if (s.params().has_seed()) sp.seed = s.params().seed();
      q.params = sp;
    }
    plan.seqs.push_back(std::move(q));
  }
  for (const auto& c : p.copies()) plan.copies.push_back({c.src(), c.dst()});
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
  }
  out->set_compute_us(r.compute_us);
}

absl::StatusOr<StepResult> StepResultFromProto(const lorcserve::internal::StepResult& p) {
  if (p.error_code() != 0) {
    return absl::Status(static_cast<absl::StatusCode>(p.error_code()), p.error_message());
  }
  StepResult r;
  r.step_id = p.step_id();
  r.compute_us = p.compute_us();
  r.sampled.reserve(p.sampled_size());
  for (const auto& t : p.sampled()) r.sampled.push_back({t.seq_id(), t.token()});
  return r;
}

}  // namespace lorc
