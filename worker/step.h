// The contract between the scheduler (coordinator) and the workers for one engine iteration:
// a StepPlan goes to every tensor-parallel rank; rank 0 answers with a StepResult.
// Plain structs; the internal gRPC protocol (proto/lorcserve/internal/) mirrors them.
#pragma once

#include <cstdint>
#include <optional>
#include <vector>

#include "absl/status/statusor.h"
#include "common/sampling_params.h"
#include "kvstore/kv_block_manager.h"

namespace lorc {

struct ScheduledSequence {
  int64_t seq_id = 0;
  // Tokens to compute this step, at positions [num_cached, num_cached + tokens.size()).
  std::vector<int32_t> tokens;
  int64_t num_cached = 0;
  // The sequence's whole block table, covering num_cached + tokens.size() tokens.
  std::vector<int32_t> block_table;
  // True when these are the last known tokens: sample the next one.
  bool sample = false;
  // Set the first time a worker sees the sequence (and again after a preemption, with
  // `num_cached` 0): the sequence's sampling options.
  std::optional<SamplingParams> params;
};

struct StepPlan {
  uint64_t step_id = 0;
  std::vector<ScheduledSequence> seqs;
  // Copy-on-write block copies to perform before the forward pass.
  std::vector<BlockCopy> copies;
  // Sequences that ended (finished, cancelled, failed): workers drop their state.
  std::vector<int64_t> finished;
  // Sequences preempted to be recomputed later: workers forget their tokens but keep sampler
  // state, so a seeded request draws the same random stream.
  std::vector<int64_t> preempted;
};

struct SampledToken {
  int64_t seq_id = 0;
  int32_t token = 0;
};

struct StepResult {
  uint64_t step_id = 0;
  std::vector<SampledToken> sampled;  // one per sequence with sample = true, in plan order
  int64_t compute_us = 0;             // time the executing rank spent on the step
};

// Runs steps: in-process (StepExecutor) or on remote workers (the coordinator's WorkerGroup).
class StepRunner {
 public:
  virtual ~StepRunner() = default;
  virtual absl::StatusOr<StepResult> Run(const StepPlan& plan) = 0;
};

}  // namespace lorc
