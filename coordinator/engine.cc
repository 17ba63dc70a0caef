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


}  // namespace

struct Engine::Request {
  int64_t id = 0;
  std::vector<TokenLogprobs> prompt_logprobs;  // positions 1, 2, ... received so far
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
  u.prompt_logprobs = std::move(r.prompt_logprobs);
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

absl::Status Engine::Fail(const absl::Status& status) {
  for (; in_flight_ > 0; --in_flight_) (void)runner_->Await();  // drop what the runner still holds
  pipelined_.clear();
  AbortAll(status);
  return status;
}

absl::Status Engine::Step() {
  // Keep up to max_in_flight() plans at the workers (async scheduling): schedule and submit the
  // next plan before awaiting the oldest result, so the workers never wait for the coordinator's
  // round trip. Await when the queue is full or there is nothing new to submit.
  bool submitted = false;
  if (in_flight_ < runner_->max_in_flight()) {
    const auto t0 = Clock::now();
    StepPlan plan = scheduler_.Schedule();
    const auto t1 = Clock::now();
    stats_.schedule_s += Seconds(t0, t1);
    if (!plan.empty()) {
      if (absl::Status s = runner_->Submit(plan); !s.ok()) return Fail(s);
      pipelined_.push_back(in_flight_ > 0);
      ++in_flight_;
      submitted = true;
      stats_.run_s += Seconds(t1, Clock::now());
    }
  }
  if (in_flight_ == 0 || (submitted && in_flight_ < runner_->max_in_flight())) {
    return absl::OkStatus();
  }
  const auto t2 = Clock::now();
  absl::StatusOr<StepResult> result = runner_->Await();
  --in_flight_;
  const bool pipelined = pipelined_.front();
  pipelined_.pop_front();
  const auto t3 = Clock::now();
  stats_.run_s += Seconds(t2, t3);
  stats_.wait_s += Seconds(t2, t3);
  if (!result.ok()) return Fail(result.status());
  ++stats_.steps;
  stats_.worker_compute_s += static_cast<double>(result->compute_us) * 1e-6;
  if (pipelined) {
    stats_.worker_idle_s += static_cast<double>(result->idle_us) * 1e-6;
    ++stats_.pipelined_steps;
  }
  for (const PromptLogprobs& lp : result->prompt_logprobs) {
    auto it = requests_.find(lp.seq_id);
    if (it == requests_.end()) continue;
    // Positions arrive in order; a recomputation after preemption repeats known ones.
    std::vector<TokenLogprobs>& have = it->second->prompt_logprobs;
    const int64_t next = static_cast<int64_t>(have.size()) + 1;
    const int64_t skip = next - lp.first_position;
    if (skip < 0 || skip >= static_cast<int64_t>(lp.logprobs.size())) continue;
    have.insert(have.end(), lp.logprobs.begin() + skip, lp.logprobs.end());
  }
  for (SequenceEvent& e : scheduler_.Apply(*result)) {
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
      if (e.reason == FinishReason::kError) u.status = std::move(e.status);
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
  stats_.apply_s += Seconds(t3, Clock::now());
  return absl::OkStatus();
}

absl::StatusOr<std::vector<GenerationResult>> Engine::Generate(
    absl::Span<const GenerationRequest> requests) {
  std::vector<GenerationResult> results(requests.size());
  for (size_t i = 0; i < requests.size(); ++i) {
    GenerationResult* out = &results[i];
    out->prompt_tokens = static_cast<int64_t>(requests[i].prompt_ids.size());
    out->completions.resize(std::max(1, requests[i].params.n));
    const absl::Status s = Add(next_generate_id_++, requests[i], [out](const RequestUpdate& u) {
      if (u.index < 0 || u.index >= static_cast<int32_t>(out->completions.size())) return;
      CompletionOutput& c = out->completions[u.index];
      c.output_ids.insert(c.output_ids.end(), u.new_ids.begin(), u.new_ids.end());
      c.logprobs.insert(c.logprobs.end(), u.logprobs.begin(), u.logprobs.end());
      c.text += u.new_text;
      if (u.finished) {
        c.finish = u.reason;
        c.stop_reason = u.stop_reason;
        if (!u.status.ok()) out->status = u.status;
        out->prompt_logprobs = u.prompt_logprobs;
        out->time_to_first_token_s = u.time_to_first_token_s;
        out->total_time_s = u.total_time_s;
      }
    });
    if (!s.ok()) {
      out->status = s;
      for (CompletionOutput& c : out->completions) c.finish = FinishReason::kError;
    }
  }
  while (HasWork()) RETURN_IF_ERROR(Step());
  return results;
}

}  // namespace lorc
