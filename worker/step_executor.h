// Executes StepPlans on one rank: keeps each sequence's sampler and token history, runs the
// forward pass, and (on the sampling rank, tensor-parallel rank 0) samples the next tokens.
// Used in-process by the local engine and inside every worker process. One thread at a time.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "worker/model_runner.h"
#include "worker/sampler.h"
#include "worker/step.h"

namespace lorc {

class StepExecutor final : public StepRunner {
 public:
  // `samples`: whether this rank computes logits and samples (rank 0); other ranks return an
  // empty result. `runner` must outlive the executor.
  StepExecutor(ModelRunner* runner, bool samples) : runner_(runner), samples_(samples) {}

  // InvalidArgument for a plan that names a sequence this rank has never been given params for,
  // or that the runner rejects; the executor's state is unchanged for the failed step's new
  // sequences.
  absl::StatusOr<StepResult> Run(const StepPlan& plan) override;

  size_t num_sequences() const { return seqs_.size(); }
  ModelRunner& runner() { return *runner_; }

 private:
  struct SeqState {
    std::unique_ptr<Sampler> sampler;
    std::vector<int32_t> tokens;  // every token computed so far (prompt + generated)
  };

  ModelRunner* runner_;
  bool samples_;
  absl::flat_hash_map<int64_t, SeqState> seqs_;
  std::vector<SequenceStep> steps_;  // reused between steps
  std::vector<float> row_;
};

}  // namespace lorc
