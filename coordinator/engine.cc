#include "coordinator/engine.h"

#include <algorithm>
#include <chrono>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "common/check.h"
#include "common/status_macros.h"

namespace lorc {
namespace {

using Clock = std::chrono::steady_clock;
double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

double LogSumExp(const float* row, int64_t n) {
  float mx = row[0];
  for (int64_t i = 1; i < n; ++i) mx = std::max(mx, row[i]);
  double s = 0;
  for (int64_t i = 0; i < n; ++i) s += std::exp(static_cast<double>(row[i] - mx));
  return mx + std::log(s);
}

}  // namespace

struct Engine::Request {
  int64_t id = 0;
  int64_t prompt_tokens = 0;
  int64_t completion_tokens = 0;
  std::unique_ptr<OutputProcessor> output;
  UpdateFn on_update;
  Clock::time_point start;
  double ttft_s = 0;
};

SchedulerConfig MakeSchedulerConfig(const ModelConfig& config, const KvCacheSpec& kv,
                                    const EngineOptions& options) {
  SchedulerConfig c;
  c.block_size = kv.block_size;
  c.num_blocks = kv.num_blocks;
  c.max_step_tokens = options.max_step_tokens;
  c.max_running = options.max_running;
  c.max_waiting = options.max_waiting;
  c.max_model_len = config.max_position_embeddings;
  c.vocab_size = config.vocab_size;
  c.eos_token_ids = config.eos_token_ids;
  return c;
}

absl::StatusOr<std::unique_ptr<Engine>> Engine::Create(StepRunner* runner,
                                                        const ModelConfig& config,
                                                        const KvCacheSpec& kv,
                                                        const Tokenizer* tokenizer,
                                                        const EngineOptions& options) {
  ASSIGN_OR_RETURN(std::unique_ptr<Scheduler> scheduler,
                   Scheduler::Create(MakeSchedulerConfig(config, kv, options)));
  return std::unique_ptr<Engine>(new Engine(runner, tokenizer, std::move(scheduler)));
}

Engine::Engine(StepRunner* runner, const Tokenizer* tokenizer,
               std::unique_ptr<Scheduler> scheduler)
    : runner_(runner),
      tokenizer_(tokenizer),
      scheduler_owner_(std::move(scheduler)),
      scheduler_(*scheduler_owner_) {}

Engine::~Engine() = default;

absl::Status Engine::Add(int64_t id, const GenerationRequest& request, UpdateFn on_update) {
  if (!request.params.stop_strings.empty() && tokenizer_ == nullptr) {
    return absl::InvalidArgumentError("stop strings need a tokenizer");
  }
  RETURN_IF_ERROR(scheduler_.Add(id, request.prompt_ids, request.params, request.priority));
  auto r = std::make_unique<Request>();
  r->id = id;
  r->prompt_tokens = static_cast<int64_t>(request.prompt_ids.size());
  r->output = std::make_unique<OutputProcessor>(tokenizer_, request.params.stop_strings);
  r->on_update = std::move(on_update);
  r->start = Clock::now();
  requests_[id] = std::move(r);
  return absl::OkStatus();
}

void Engine::Complete(Request& r, RequestUpdate& u) {
  u.finished = true;
  u.new_text += r.output->Finish();
  u.prompt_tokens = r.prompt_tokens;
  u.completion_tokens = r.completion_tokens;
  u.time_to_first_token_s = r.ttft_s;
  u.total_time_s = Seconds(r.start, Clock::now());
}

void Engine::Abort(int64_t id, absl::Status status) {
  auto it = requests_.find(id);
  if (it == requests_.end()) return;
  scheduler_.Abort(id);
  std::unique_ptr<Request> r = std::move(it->second);
  requests_.erase(it);
  RequestUpdate u;
  u.reason = FinishReason::kAborted;
  u.status = std::move(status);
  Complete(*r, u);
  r->on_update(u);
}

void Engine::AbortAll(const absl::Status& status) {
  std::vector<int64_t> ids;
  for (const auto& [id, r] : requests_) ids.push_back(id);
  for (int64_t id : ids) Abort(id, status);
}

absl::Status Engine::Step() {
  const auto t0 = Clock::now();
  StepPlan plan = scheduler_.Schedule();
  if (plan.seqs.empty() && plan.finished.empty() && plan.preempted.empty()) return absl::OkStatus();
  const auto t1 = Clock::now();
  absl::StatusOr<StepResult> result = runner_->Run(plan);
  const auto t2 = Clock::now();
  ++stats_.steps;
  stats_.schedule_s += Seconds(t0, t1);
  stats_.run_s += Seconds(t1, t2);
  if (!result.ok()) {
    AbortAll(result.status());
    return result.status();
  }
  stats_.worker_compute_s += static_cast<double>(result->compute_us) * 1e-6;
  for (const SequenceEvent& e : scheduler_.Apply(*result)) {
    auto it = requests_.find(e.seq_id);
    if (it == requests_.end()) continue;
    Request& r = *it->second;
    RequestUpdate u;
    if (e.token >= 0) {
      u.new_ids.push_back(e.token);
      ++r.completion_tokens;
      if (r.completion_tokens == 1) r.ttft_s = Seconds(r.start, Clock::now());
      // A token that ended the request by id (EOS, stop id) adds no text.
      if (!(e.finished && e.reason == FinishReason::kStop)) {
        OutputProcessor::Delta d = r.output->Push(e.token);
        u.new_text = std::move(d.text);
        if (d.stopped && !e.finished) {
          scheduler_.Finish(e.seq_id, FinishReason::kStop);
          u.finished = true;
          u.reason = FinishReason::kStop;
        }
      }
    }
    if (e.finished) {
      u.reason = e.reason;
      if (e.reason == FinishReason::kError) u.status = absl::InternalError("no token sampled for the request");
    }
    if (e.finished || u.finished) {
      Complete(r, u);
      std::unique_ptr<Request> done = std::move(it->second);
      requests_.erase(it);
      done->on_update(u);
    } else {
      r.on_update(u);
    }
  }
  stats_.apply_s += Seconds(t2, Clock::now());
  return absl::OkStatus();
}

absl::StatusOr<std::vector<GenerationResult>> Engine::Generate(
    absl::Span<const GenerationRequest> requests) {
  std::vector<GenerationResult> results(requests.size());
  for (size_t i = 0; i < requests.size(); ++i) {
    GenerationResult* out = &results[i];
    out->prompt_tokens = static_cast<int64_t>(requests[i].prompt_ids.size());
    const absl::Status s = Add(next_generate_id_++, requests[i], [out](const RequestUpdate& u) {
      out->output_ids.insert(out->output_ids.end(), u.new_ids.begin(), u.new_ids.end());
      out->text += u.new_text;
      if (u.finished) {
        out->finish = u.reason;
        out->status = u.status;
        out->time_to_first_token_s = u.time_to_first_token_s;
        out->total_time_s = u.total_time_s;
      }
    });
    if (!s.ok()) {
      out->status = s;
      out->finish = FinishReason::kError;
    }
  }
  while (HasWork()) RETURN_IF_ERROR(Step());
  return results;
}

absl::StatusOr<std::vector<double>> ScorePromptNll(ModelRunner& runner, absl::Span<const int32_t> ids,
                                                   absl::Span<const int32_t> targets,
                                                   int32_t max_step_tokens) {
  if (ids.empty() || ids.size() != targets.size()) {
    return absl::InvalidArgumentError(absl::StrCat("score: ", ids.size(), " ids and ",
                                                   targets.size(), " targets"));
  }
  const int64_t vocab = runner.config().vocab_size;
  for (int32_t t : targets) {
    if (t < 0 || t >= vocab) return absl::InvalidArgumentError(absl::StrCat("target id ", t, " outside the vocabulary"));
  }
  KvBlockManager blocks(runner.kv_spec().block_size, runner.kv_spec().num_blocks);
  constexpr int64_t kSeq = 1;
  RETURN_IF_ERROR(blocks.AddSequence(kSeq));
  std::vector<double> nll;
  nll.reserve(ids.size());
  for (int64_t pos = 0; pos < static_cast<int64_t>(ids.size());) {
    const int64_t n = std::min<int64_t>(max_step_tokens, static_cast<int64_t>(ids.size()) - pos);
    RETURN_IF_ERROR(blocks.Reserve(kSeq, pos + n).status());
    SequenceStep s;
    s.seq_id = kSeq;
    s.tokens.assign(ids.begin() + pos, ids.begin() + pos + n);
    s.num_cached = pos;
    const auto table = blocks.BlockTable(kSeq);
    s.block_table.assign(table.begin(), table.end());
    s.logits = SequenceStep::Logits::kAll;
    ASSIGN_OR_RETURN(StepOutput out, runner.Execute({s}));
    for (int64_t j = 0; j < n; ++j) {
      const float* r = out.Row(j);
      nll.push_back(LogSumExp(r, vocab) - r[targets[pos + j]]);
    }
    pos += n;
  }
  return nll;
}

}  // namespace lorc
