#include "coordinator/engine.h"

#include <algorithm>
#include <chrono>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "common/check.h"
#include "common/status_macros.h"
#include "tokenizer/tokenizer_unicode.h"

namespace lorc {
namespace {

using Clock = std::chrono::steady_clock;
double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}


}  // namespace

struct Engine::Completion {
  int64_t seq_id = 0;
  std::unique_ptr<OutputProcessor> output;
  int64_t completion_tokens = 0;
  bool ended = false;  // its final update was sent
};

struct Engine::Request {
  int64_t id = 0;
  std::vector<TokenLogprobs> prompt_logprobs;  // positions 1, 2, ... received so far
  int64_t prompt_tokens = 0;
  int64_t cached_prompt_tokens = 0;
  std::vector<Completion> completions;  // params.n, by index
  int32_t num_live = 0;                 // completions without their final update
  UpdateFn on_update;
  Clock::time_point start;
  double ttft_s = 0;  // to the first token of any completion
};

SchedulerConfig MakeSchedulerConfig(const ModelConfig& config, const KvCacheSpec& kv,
                                    const EngineOptions& options) {
  SchedulerConfig c;
  c.block_size = kv.block_size;
  c.num_blocks = kv.num_blocks;
  c.max_num_batched_tokens = options.max_num_batched_tokens;
  c.max_num_seqs = options.max_num_seqs;
  c.max_waiting = options.max_waiting;
  c.max_model_len = config.max_position_embeddings;
  c.vocab_size = config.vocab_size;
  c.eos_token_ids = config.eos_token_ids;
  c.enable_prefix_caching = options.enable_prefix_caching;
  c.session_ttl_s = options.session_ttl_s;
  c.max_session_kv_fraction = options.max_session_kv_fraction;
  c.num_host_blocks = options.num_host_blocks;
  c.kv_compaction = options.kv_compaction;
  c.kv_policy_max_positions = options.kv_policy_max_positions;
  c.kv_policy_prefill_interval = options.kv_policy_prefill_interval;
  KvCacheSpec format = kv;
  if (format.k_width.empty()) {
    KvSpecOptions o;
    o.block_size = kv.block_size;
    o.dtype = kv.dtype;
    o.kv_cache_dtype = kv.kv_cache_dtype;
    format = MakeKvCacheSpec(config, o).value_or(kv);
  }
  c.kv_format_identity = KvFormatIdentity(config, format);
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
  // Stop strings match decoded text, which is valid UTF-8 (the gRPC layer checks its own bytes
  // with the same words; this covers the in-process callers).
  for (size_t i = 0; i < request.params.stop_strings.size(); ++i) {
    RETURN_IF_ERROR(tokenizer_internal::CheckUtf8(absl::StrCat("sampling.stop[", i, "]"),
                                                  request.params.stop_strings[i]));
  }
  if (requests_.contains(id)) {
    return absl::AlreadyExistsError(absl::StrCat("request id ", id, " is already in use"));
  }
  const int32_t n = std::max(1, request.params.n);  // the scheduler validates it
  std::vector<int64_t> child_ids;
  for (int32_t i = 1; i < n; ++i) child_ids.push_back(next_child_id_++);
  RETURN_IF_ERROR(scheduler_.Add(id, request.prompt_ids, request.params, request.priority,
                                 child_ids, {request.cache_salt, request.session_id}));
  auto r = std::make_unique<Request>();
  r->id = id;
  r->prompt_tokens = static_cast<int64_t>(request.prompt_ids.size());
  r->completions.resize(n);
  for (int32_t i = 0; i < n; ++i) {
    Completion& c = r->completions[i];
    c.seq_id = i == 0 ? id : child_ids[i - 1];
    c.output = std::make_unique<OutputProcessor>(tokenizer_, request.params.stop_strings,
                                                 request.params.include_stop_str_in_output,
                                                 request.params.min_tokens);
    completion_of_[c.seq_id] = {id, i};
  }
  r->num_live = n;
  r->on_update = std::move(on_update);
  r->start = Clock::now();
  requests_[id] = std::move(r);
  return absl::OkStatus();
}

void Engine::EndCompletion(Request& r, RequestUpdate& u) {
  Completion& c = r.completions[u.index];
  c.ended = true;
  completion_of_.erase(c.seq_id);
  u.finished = true;
  u.new_text += c.output->Finish();
  u.prompt_logprobs = r.prompt_logprobs;  // complete: every completion starts after the prompt
  u.prompt_tokens = r.prompt_tokens;
  u.cached_prompt_tokens = r.cached_prompt_tokens;
  u.completion_tokens = c.completion_tokens;
  u.time_to_first_token_s = r.ttft_s;
  u.total_time_s = Seconds(r.start, Clock::now());
  if (--r.num_live > 0) {
    r.on_update(u);
    return;
  }
  auto it = requests_.find(r.id);
  std::unique_ptr<Request> done = std::move(it->second);
  requests_.erase(it);
  done->on_update(u);  // the callback lives until the last completion's final update
}

void Engine::EndRequest(Request& r, FinishReason reason, const absl::Status& status) {
  std::vector<int32_t> live;
  for (int32_t i = 0; i < static_cast<int32_t>(r.completions.size()); ++i) {
    if (r.completions[i].ended) continue;
    live.push_back(i);
    scheduler_.Abort(r.completions[i].seq_id);  // unforked children: released with the parent
  }
  for (int32_t i : live) {  // all blocks are free before the first update goes out
    RequestUpdate u;
    u.index = i;
    u.reason = reason;
    u.status = status;
    EndCompletion(r, u);  // `r` is gone after the last one
  }
}

void Engine::Abort(int64_t id, absl::Status status) {
  auto it = requests_.find(id);
  if (it == requests_.end()) return;
  EndRequest(*it->second, FinishReason::kAborted, status);
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
  // The workers' cache contents are unknown now: no later hit may serve them (after AbortAll,
  // so the ended requests' sessions pin nothing either).
  scheduler_.ResetPrefixCache();
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
    for (const ScheduledSequence& s : plan.seqs) {
      if (!s.params.has_value()) continue;  // first sight only: its first admission's hit
      auto where = completion_of_.find(s.seq_id);
      if (where == completion_of_.end()) continue;
      std::optional<SequenceInfo> info = scheduler_.GetSequence(s.seq_id);
      if (info.has_value() && info->num_cached_prompt_tokens > 0) {
        requests_.at(where->second.first)->cached_prompt_tokens = info->num_cached_prompt_tokens;
      }
    }
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
    auto where = completion_of_.find(e.seq_id);
    if (where == completion_of_.end()) continue;  // its request ended meanwhile
    Request& r = *requests_.at(where->second.first);
    Completion& c = r.completions[where->second.second];
    RequestUpdate u;
    u.index = where->second.second;
    u.cached_prompt_tokens = r.cached_prompt_tokens;
    if (e.token >= 0) {
      u.new_ids.push_back(e.token);
      if (e.logprobs.has_value()) u.logprobs.push_back(*std::move(e.logprobs));
      ++c.completion_tokens;
      if (r.ttft_s == 0) {
        r.ttft_s = Seconds(r.start, Clock::now());
        // The request's first token: its prompt was computed whole, so its prompt logprobs are
        // complete; they go out with it (a stream that echoes the prompt need not wait for the
        // first completion to end). EndCompletion carries them again.
        u.prompt_logprobs = r.prompt_logprobs;
      }
      // A token that ended the completion by id (EOS, stop id) adds its text only with
      // include_stop_str_in_output (EndCompletion's Finish() sends it).
      if (e.finished && e.reason == FinishReason::kStop) {
        c.output->PushStopToken(e.token);
      } else {
        OutputProcessor::Delta d = c.output->Push(e.token);
        u.new_text = std::move(d.text);
        if (d.stopped) {
          // A matched stop string is a stop, also on the max_tokens-th token (kLength event).
          if (!e.finished) scheduler_.Finish(e.seq_id, FinishReason::kStop);
          u.finished = true;
          u.reason = FinishReason::kStop;
          u.stop_reason.stop_string = std::move(d.stop_string);
        }
      }
    }
    if (e.finished && !u.finished) {
      u.finished = true;
      u.reason = e.reason;
      u.stop_reason = e.stop_reason;
      if (e.reason == FinishReason::kError) u.status = std::move(e.status);
    }
    if (!u.finished) {
      r.on_update(u);
    } else if (u.status.ok() || r.num_live == 1) {
      EndCompletion(r, u);
    } else {
      // An error fails the whole request: this completion first, then the others.
      const absl::Status status = u.status;
      EndCompletion(r, u);
      EndRequest(r, FinishReason::kError, status);
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
        out->cached_prompt_tokens = u.cached_prompt_tokens;
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
