#include "worker/step_executor.h"

#include <chrono>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace lorc {

absl::StatusOr<StepResult> StepExecutor::Run(const StepPlan& plan) {
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t id : plan.finished) seqs_.erase(id);
  for (int64_t id : plan.preempted) {
    if (auto it = seqs_.find(id); it != seqs_.end()) it->second.tokens.clear();
  }
  for (const ScheduledSequence& s : plan.seqs) {
    if (!s.params.has_value() && !seqs_.contains(s.seq_id)) {
      return absl::InvalidArgumentError(
          absl::StrCat("step ", plan.step_id, ": sequence ", s.seq_id, " has no sampling params"));
    }
  }
  RETURN_IF_ERROR(runner_->CopyBlocks(plan.copies));
  StepResult result;
  result.step_id = plan.step_id;
  if (plan.seqs.empty()) return result;

  steps_.resize(plan.seqs.size());
  for (size_t i = 0; i < plan.seqs.size(); ++i) {
    const ScheduledSequence& s = plan.seqs[i];
    SequenceStep& step = steps_[i];
    step.seq_id = s.seq_id;
    step.tokens = s.tokens;
    step.num_computed_tokens = s.num_cached;
    step.block_table = s.block_table;
    const bool logits = s.sample && (samples_ || runner_->lm_head_sharded());
    step.logits = logits ? SequenceStep::Logits::kLast : SequenceStep::Logits::kNone;
  }
  ASSIGN_OR_RETURN(StepOutput out, runner_->Execute(steps_));

  for (size_t i = 0; i < plan.seqs.size(); ++i) {
    const ScheduledSequence& s = plan.seqs[i];
    SeqState& st = seqs_[s.seq_id];
    if (s.params.has_value() && st.sampler == nullptr) st.sampler = std::make_unique<Sampler>(*s.params);
    if (s.num_cached == 0) st.tokens.clear();
    st.tokens.insert(st.tokens.end(), s.tokens.begin(), s.tokens.end());
    if (!s.sample || !samples_) continue;
    const float* r = out.Row(out.row_begin[i]);
    row_.assign(r, r + out.vocab_size);
    result.sampled.push_back({s.seq_id, st.sampler->Sample(absl::MakeSpan(row_), st.tokens)});
  }
  result.compute_us = std::chrono::duration_cast<std::chrono::microseconds>(
                          std::chrono::steady_clock::now() - t0)
                          .count();
  return result;
}

}  // namespace lorc
