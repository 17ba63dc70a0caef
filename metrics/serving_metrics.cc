#include "metrics/serving_metrics.h"

#include <algorithm>

#include "prometheus/counter.h"
#include "prometheus/family.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"
#include "prometheus/text_serializer.h"

namespace lorc {
namespace {

using prometheus::Histogram;

// Latency buckets (seconds) wide enough for both the CPU fixture (tens of ms per token on two
// cores) and GPU serving (a few ms per token, sub-ms scheduling).
const Histogram::BucketBoundaries kTtftBuckets = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075,
                                                  0.1,   0.25,   0.5,   0.75, 1,     2.5,  5,
                                                  7.5,   10,     20,    40,   80};
const Histogram::BucketBoundaries kItlBuckets = {0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01,
                                                 0.015,  0.02,  0.025,  0.03,  0.04,   0.05,
                                                 0.075,  0.1,   0.15,   0.2,   0.3,    0.5,
                                                 0.75,   1,     2.5};
const Histogram::BucketBoundaries kE2eBuckets = {0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1,   2.5,
                                                 5,    10,    15,   20,  30,   40,  50,  60,
                                                 120,  240,   480,  960, 1920};
const Histogram::BucketBoundaries kStepBuckets = {0.00001, 0.000025, 0.00005, 0.0001, 0.00025,
                                                  0.0005,  0.001,    0.0025,  0.005,  0.01,
                                                  0.025,   0.05,     0.1,     0.25,   0.5,
                                                  1,       2.5};

constexpr absl::StatusCode kCodes[] = {
    absl::StatusCode::kCancelled,         absl::StatusCode::kUnknown,
    absl::StatusCode::kInvalidArgument,   absl::StatusCode::kDeadlineExceeded,
    absl::StatusCode::kNotFound,          absl::StatusCode::kAlreadyExists,
    absl::StatusCode::kPermissionDenied,  absl::StatusCode::kResourceExhausted,
    absl::StatusCode::kFailedPrecondition, absl::StatusCode::kAborted,
    absl::StatusCode::kOutOfRange,        absl::StatusCode::kUnimplemented,
    absl::StatusCode::kInternal,          absl::StatusCode::kUnavailable,
    absl::StatusCode::kDataLoss,          absl::StatusCode::kUnauthenticated,
};

prometheus::Counter* NewCounter(prometheus::Registry& r, const std::string& name,
                                const std::string& help) {
  return &prometheus::BuildCounter().Name(name).Help(help).Register(r).Add({});
}

prometheus::Gauge* NewGauge(prometheus::Registry& r, const std::string& name,
                            const std::string& help) {
  return &prometheus::BuildGauge().Name(name).Help(help).Register(r).Add({});
}

prometheus::Histogram* NewHistogram(prometheus::Registry& r, const std::string& name,
                                    const std::string& help,
                                    const Histogram::BucketBoundaries& buckets) {
  return &prometheus::BuildHistogram().Name(name).Help(help).Register(r).Add({}, buckets);
}

void Inc(prometheus::Counter* c, int64_t n) {
  if (n > 0) c->Increment(static_cast<double>(n));
}

}  // namespace

const char* ServingStateName(ServingState s) {
  switch (s) {
    case ServingState::kStarting: return "starting";
    case ServingState::kServing: return "serving";
    case ServingState::kDraining: return "draining";
    case ServingState::kRecovering: return "recovering";
    case ServingState::kFailed: return "failed";
  }
  return "unknown";
}

std::string_view ServingMetrics::OutcomeOfStatus(absl::StatusCode code) {
  switch (code) {
    case absl::StatusCode::kCancelled: return "cancelled";
    case absl::StatusCode::kDeadlineExceeded: return "deadline";
    case absl::StatusCode::kUnknown: return "unknown";
    case absl::StatusCode::kInvalidArgument: return "invalid_argument";
    case absl::StatusCode::kNotFound: return "not_found";
    case absl::StatusCode::kAlreadyExists: return "already_exists";
    case absl::StatusCode::kPermissionDenied: return "permission_denied";
    case absl::StatusCode::kResourceExhausted: return "resource_exhausted";
    case absl::StatusCode::kFailedPrecondition: return "failed_precondition";
    case absl::StatusCode::kAborted: return "aborted";
    case absl::StatusCode::kOutOfRange: return "out_of_range";
    case absl::StatusCode::kUnimplemented: return "unimplemented";
    case absl::StatusCode::kInternal: return "internal";
    case absl::StatusCode::kUnavailable: return "unavailable";
    case absl::StatusCode::kDataLoss: return "data_loss";
    case absl::StatusCode::kUnauthenticated: return "unauthenticated";
    default: return "other";
  }
}

ServingMetrics::ServingMetrics() : registry_(std::make_shared<prometheus::Registry>()) {
  prometheus::Registry& r = *registry_;
  auto& requests = prometheus::BuildCounter()
                       .Name("lorcserve_requests_total")
                       .Help("Generate calls ended, by outcome: finish reason (stop, length) of a "
                             "request served to the end, else its gRPC status (cancelled, "
                             "deadline, invalid_argument, unavailable, resource_exhausted, ...)")
                       .Register(r);
  for (std::string_view o : kFinishOutcomes) {
    requests_.emplace_back(o, &requests.Add({{"outcome", std::string(o)}}));
  }
  for (absl::StatusCode c : kCodes) {
    const std::string_view o = OutcomeOfStatus(c);
    requests_.emplace_back(o, &requests.Add({{"outcome", std::string(o)}}));
  }
  requests_other_ = &requests.Add({{"outcome", "other"}});
  requests_started_ = NewCounter(r, "lorcserve_requests_started_total",
                                 "Generate calls started (= the sum of lorcserve_requests_total + "
                                 "lorcserve_num_requests_in_flight)");
  requests_in_flight_ = NewGauge(r, "lorcserve_num_requests_in_flight",
                                 "Generate calls started and not yet ended (their handlers running)");

  prompt_tokens_ = NewCounter(r, "lorcserve_prompt_tokens_total",
                              "Prompt tokens of the requests the engine ended (cached ones included)");
  cached_prompt_tokens_ =
      NewCounter(r, "lorcserve_cached_prompt_tokens_total",
                 "Prompt tokens found in the prefix cache (device or host tier), not computed; counted "
                 "when the request ends (lorcserve_prefix_cache_hit_tokens_total: at its admission)");
  generation_tokens_ = NewCounter(r, "lorcserve_generation_tokens_total",
                                  "Tokens generated (sampled and delivered), all completions");
  ttft_ = NewHistogram(r, "lorcserve_time_to_first_token_seconds",
                       "From submission to the engine to the first generated token", kTtftBuckets);
  itl_ = NewHistogram(r, "lorcserve_inter_token_latency_seconds",
                      "Between consecutive tokens of one completion", kItlBuckets);
  e2e_ = NewHistogram(r, "lorcserve_e2e_request_latency_seconds",
                      "From submission to the engine to the last completion's end, requests "
                      "served to the end (stop / length)",
                      kE2eBuckets);
  auto& step = prometheus::BuildHistogram()
                   .Name("lorcserve_step_duration_seconds")
                   .Help("One engine iteration by phase: schedule (building the plan), workers "
                         "(blocked on submit + await), apply (applying a result)")
                   .Register(r);
  step_schedule_ = &step.Add({{"phase", "schedule"}}, kStepBuckets);
  step_workers_ = &step.Add({{"phase", "workers"}}, kStepBuckets);
  step_apply_ = &step.Add({{"phase", "apply"}}, kStepBuckets);
  engine_steps_ = NewCounter(r, "lorcserve_engine_steps_total", "Step results applied");
  waiting_ = NewGauge(r, "lorcserve_num_sequences_waiting",
                      "Sequences waiting for admission (the queue; a request with n > 1 waits as one "
                      "sequence: it forks after its prefill)");
  running_ = NewGauge(r, "lorcserve_num_sequences_running", "Sequences admitted (holding KV blocks)");
  kv_used_ = NewGauge(r, "lorcserve_kv_blocks_used", "Device KV cache blocks in use");
  kv_capacity_ = NewGauge(r, "lorcserve_kv_blocks_capacity", "Device KV cache blocks in all");
  kv_usage_ = NewGauge(r, "lorcserve_kv_cache_usage_perc",
                       "Device KV cache usage as a fraction in [0, 1]: lorcserve_kv_blocks_used / "
                       "lorcserve_kv_blocks_capacity (vLLM's kv_cache_usage_perc)");
  cached_blocks_ = NewGauge(r, "lorcserve_prefix_cache_blocks",
                            "Device KV cache blocks the prefix cache indexes (in use, or free and reusable "
                            "until evicted; 0 with prefix caching off)");
  host_kv_used_ = NewGauge(r, "lorcserve_host_kv_blocks_used",
                           "Host KV tier slots holding an offloaded block (0 without a tier)");
  host_kv_capacity_ = NewGauge(r, "lorcserve_host_kv_blocks_capacity",
                               "Host KV tier slots (--kv-offloading-size; 0 without a tier)");
  kv_policy_positions_used_ =
      NewGauge(r, "lorcserve_kv_policy_positions_used",
               "Positions the running sequences' device-resident KV policy states hold (--kv-policy on CUDA)");
  kv_policy_positions_capacity_ =
      NewGauge(r, "lorcserve_kv_policy_positions_capacity",
               "Positions the workers set KV policy state memory aside for (0: no such states)");
  preemptions_ = NewCounter(r, "lorcserve_preemptions_total",
                            "Running sequences preempted (blocks freed, recomputed later)");
  kv_compactions_ = NewCounter(r, "lorcserve_kv_compactions_total",
                               "Token-level KV policy compactions (--kv-policy; kvpolicy/README.md)");
  kv_compaction_freed_ = NewCounter(r, "lorcserve_kv_compaction_freed_blocks_total",
                                    "KV cache blocks those compactions gave back");
  pc_queries_ = NewCounter(r, "lorcserve_prefix_cache_queries_total",
                           "Admissions that looked the prefix cache up (once per request)");
  pc_query_tokens_ = NewCounter(r, "lorcserve_prefix_cache_query_tokens_total",
                                "Prompt tokens those lookups could have hit");
  auto& hits = prometheus::BuildCounter()
                   .Name("lorcserve_prefix_cache_hit_tokens_total")
                   .Help("Prompt tokens found cached, by tier (device, host); counted at admission "
                         "(lorcserve_cached_prompt_tokens_total: when the request ends)")
                   .Register(r);
  pc_hit_device_ = &hits.Add({{"tier", "device"}});
  pc_hit_host_ = &hits.Add({{"tier", "host"}});
  pc_evictions_ = NewCounter(r, "lorcserve_prefix_cache_evictions_total",
                             "Cached blocks evicted: handed out for new contents (with a host tier, copied "
                             "there first: lorcserve_host_kv_offloads_total)");
  host_offloads_ = NewCounter(r, "lorcserve_host_kv_offloads_total",
                              "KV blocks copied from the device to the host tier as they were evicted");
  host_loads_ = NewCounter(r, "lorcserve_host_kv_loads_total",
                           "KV blocks copied from the host tier back to the device (host-tier prefix hits)");
  sessions_ = NewGauge(r, "lorcserve_sessions", "Multi-turn sessions keeping KV blocks for their next turn");
  session_blocks_ = NewGauge(r, "lorcserve_session_kv_blocks", "Device KV cache blocks the sessions pin");
  auto& ended = prometheus::BuildCounter()
                    .Name("lorcserve_sessions_ended_total")
                    .Help("Sessions ended, by reason: expired (idle past --session-ttl-s), capped (released "
                          "for --max-session-kv-fraction or memory pressure, or a turn whose conversation alone "
                          "exceeds the cap: not kept, counted at each such turn), closed (CloseSession)")
                    .Register(r);
  sessions_expired_ = &ended.Add({{"reason", "expired"}});
  sessions_capped_ = &ended.Add({{"reason", "capped"}});
  sessions_closed_ = &ended.Add({{"reason", "closed"}});
  auto& state = prometheus::BuildGauge()
                    .Name("lorcserve_serving_state")
                    .Help("1 for the coordinator's current state (starting, serving, "
                          "draining, recovering, failed), 0 for the others")
                    .Register(r);
  for (ServingState s : {ServingState::kStarting, ServingState::kServing, ServingState::kDraining,
                         ServingState::kRecovering, ServingState::kFailed}) {
    state_[static_cast<size_t>(s)] = &state.Add({{"state", ServingStateName(s)}});
  }
  group_size_ = NewGauge(r, "lorcserve_worker_group_size",
                         "Ranks (workers) of the group serving now (0 while none is)");
  worker_failures_ = NewCounter(r, "lorcserve_worker_failures_total",
                                "Worker failures that turned health NOT_SERVING");
  worker_recoveries_ = NewCounter(r, "lorcserve_worker_recoveries_total",
                                  "Worker groups re-joined after a failure (serving again)");
  SetServingState(ServingState::kStarting);
}

ServingMetrics::~ServingMetrics() = default;

std::string ServingMetrics::Serialize() const {
  return prometheus::TextSerializer().Serialize(registry_->Collect());
}

std::vector<std::string> ServingMetrics::SampleNames() const {
  std::vector<std::string> names;
  for (const prometheus::MetricFamily& f : registry_->Collect()) {
    if (f.type == prometheus::MetricType::Histogram) {
      for (const char* suffix : {"_bucket", "_sum", "_count"}) names.push_back(f.name + suffix);
    } else {
      names.push_back(f.name);
    }
  }
  std::sort(names.begin(), names.end());
  return names;
}

void ServingMetrics::RequestStarted() {
  requests_started_->Increment();
  requests_in_flight_->Increment();
}

void ServingMetrics::CountRequest(std::string_view outcome) {
  prometheus::Counter* c = requests_other_;
  for (const auto& [label, counter] : requests_) {
    if (label == outcome) {
      c = counter;
      break;
    }
  }
  c->Increment();
  requests_in_flight_->Decrement();
}

void ServingMetrics::AddPromptTokens(int64_t n) { Inc(prompt_tokens_, n); }
void ServingMetrics::AddCachedPromptTokens(int64_t n) { Inc(cached_prompt_tokens_, n); }
void ServingMetrics::AddGenerationTokens(int64_t n) { Inc(generation_tokens_, n); }
void ServingMetrics::ObserveTimeToFirstToken(double s) { ttft_->Observe(s); }
void ServingMetrics::ObserveInterTokenLatency(double s) { itl_->Observe(s); }
void ServingMetrics::ObserveE2eLatency(double s) { e2e_->Observe(s); }

void ServingMetrics::ObserveStep(double schedule_s, double workers_s, double apply_s) {
  if (schedule_s >= 0) step_schedule_->Observe(schedule_s);
  if (workers_s >= 0) step_workers_->Observe(workers_s);
  if (apply_s >= 0) step_apply_->Observe(apply_s);
}

void ServingMetrics::AddEngineSteps(int64_t n) { Inc(engine_steps_, n); }

void ServingMetrics::SetScheduler(const SchedulerGauges& g) {
  waiting_->Set(static_cast<double>(g.num_waiting));
  running_->Set(static_cast<double>(g.num_running));
  kv_used_->Set(static_cast<double>(g.kv_blocks_used));
  kv_capacity_->Set(static_cast<double>(g.kv_blocks_capacity));
  host_kv_used_->Set(static_cast<double>(g.host_kv_blocks_used));
  host_kv_capacity_->Set(static_cast<double>(g.host_kv_blocks_capacity));
  kv_policy_positions_used_->Set(static_cast<double>(g.kv_policy_positions_used));
  kv_policy_positions_capacity_->Set(static_cast<double>(g.kv_policy_positions_capacity));
  sessions_->Set(static_cast<double>(g.sessions));
  session_blocks_->Set(static_cast<double>(g.session_blocks));
  kv_usage_->Set(g.kv_blocks_capacity > 0
                     ? static_cast<double>(g.kv_blocks_used) / static_cast<double>(g.kv_blocks_capacity)
                     : 0.0);
  cached_blocks_->Set(static_cast<double>(g.cached_blocks));
}

void ServingMetrics::AddScheduler(const SchedulerCounterDeltas& d) {
  Inc(preemptions_, d.preemptions);
  Inc(pc_queries_, d.prefix_cache_queries);
  Inc(pc_query_tokens_, d.prefix_cache_query_tokens);
  Inc(pc_hit_device_, d.prefix_cache_hit_tokens);
  Inc(pc_hit_host_, d.prefix_cache_host_hit_tokens);
  Inc(kv_compactions_, d.kv_compactions);
  Inc(kv_compaction_freed_, d.kv_compaction_freed_blocks);
  Inc(sessions_expired_, d.sessions_expired);
  Inc(sessions_capped_, d.sessions_capped);
  Inc(sessions_closed_, d.sessions_closed);
  Inc(pc_evictions_, d.prefix_cache_evictions);
  Inc(host_offloads_, d.host_kv_offloads);
  Inc(host_loads_, d.host_kv_loads);
}

void ServingMetrics::SetServingState(ServingState s) {
  for (size_t i = 0; i < state_.size(); ++i) {
    state_[i]->Set(i == static_cast<size_t>(s) ? 1.0 : 0.0);
  }
}

void ServingMetrics::SetWorkerGroupSize(int64_t ranks) {
  group_size_->Set(static_cast<double>(ranks));
}
void ServingMetrics::CountWorkerFailure() { worker_failures_->Increment(); }
void ServingMetrics::CountWorkerRecovery() { worker_recoveries_->Increment(); }

}  // namespace lorc
