// The coordinator's Prometheus metrics: one prometheus::Registry with every `lorcserve_*` family
// (metrics/README.md lists them with types, labels and meaning), and small update methods for the
// threads that see each event.
//
// Threads: every method is safe from any thread; updates are prometheus-cpp's own atomics on
// metrics created in the constructor (no lookup, no lock on the hot path). The registry is
// scraped by the exposer's threads (metrics_exposer.h) while updates go on.
//
// Lifetime: one ServingMetrics per coordinator process, shared by every generation of workers
// and engine (a worker recovery builds a new Engine / EngineLoop over the same object, so the
// counters keep counting across it).
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"

namespace prometheus {
class Counter;
class Gauge;
class Histogram;
class Registry;
}  // namespace prometheus

namespace lorc {

// The coordinator's serving state (lorcserve_serving_state's `state` label). kDraining: from a
// graceful drain's start (SIGTERM) to the exit, whatever the workers do meanwhile.
enum class ServingState { kStarting, kServing, kDraining, kRecovering, kFailed };
const char* ServingStateName(ServingState s);

// Scheduler occupancy, published by the engine thread after every iteration.
struct SchedulerGauges {
  int64_t num_waiting = 0;          // sequences waiting for admission (queue depth)
  int64_t num_running = 0;          // sequences admitted (holding KV blocks)
  int64_t kv_blocks_used = 0;
  int64_t kv_blocks_capacity = 0;
  int64_t host_kv_blocks_used = 0;      // host tier (0 / 0 without one)
  int64_t host_kv_blocks_capacity = 0;
  // Device-resident KV policy states (kvpolicy/state_memory.h): positions held / set aside (0 / 0
  // without such states).
  int64_t kv_policy_positions_used = 0;
  int64_t kv_policy_positions_capacity = 0;
  // Multi-turn sessions (kvstore/session_store.h): those keeping blocks now and the distinct
  // blocks they pin (0 / 0 with the prefix cache off).
  int64_t sessions = 0;
  int64_t session_blocks = 0;
  // Prefix cache: blocks its index holds (in use or free but reusable; 0 with it off).
  int64_t cached_blocks = 0;
};

// Increments of the scheduler's cumulative counters since the last publication.
struct SchedulerCounterDeltas {
  int64_t preemptions = 0;
  int64_t prefix_cache_queries = 0;
  int64_t prefix_cache_query_tokens = 0;
  int64_t prefix_cache_hit_tokens = 0;       // device tier
  int64_t prefix_cache_host_hit_tokens = 0;  // host tier, past the device hit
  int64_t kv_compactions = 0;                // KV policy compactions (Scheduler::CompactKv)
  int64_t kv_compaction_freed_blocks = 0;    // blocks they released
  int64_t sessions_expired = 0;              // sessions ended: idle past --session-ttl-s,
  int64_t sessions_capped = 0;               // released for the cap or memory pressure,
  int64_t sessions_closed = 0;               // closed by CloseSession
  int64_t prefix_cache_evictions = 0;        // indexed blocks handed out for new contents
  int64_t host_kv_offloads = 0;              // blocks copied device -> host tier
  int64_t host_kv_loads = 0;                 // blocks copied host tier -> device (host hits)
};

class ServingMetrics {
 public:
  // The outcome labels of lorcserve_requests_total, all created (at 0) up front: the finish
  // reasons of requests served to the end, then one per gRPC status code of a failed one.
  static constexpr std::array<std::string_view, 2> kFinishOutcomes = {"stop", "length"};

  ServingMetrics();
  ~ServingMetrics();
  ServingMetrics(const ServingMetrics&) = delete;
  ServingMetrics& operator=(const ServingMetrics&) = delete;

  std::shared_ptr<prometheus::Registry> registry() const { return registry_; }
  // The exposition text of every family (what /metrics serves).
  std::string Serialize() const;
  // Every sample name the registry exposes (histograms: _bucket, _sum, _count too), sorted.
  std::vector<std::string> SampleNames() const;

  // ---- gRPC handler threads: RequestStarted when a Generate call starts (every call, also one
  // refused at once), CountRequest when it returns.
  // lorcserve_requests_started_total +1, lorcserve_num_requests_in_flight +1.
  void RequestStarted();
  // Ends a call RequestStarted counted: lorcserve_requests_total{outcome} +1, then
  // lorcserve_num_requests_in_flight -1 (a scrape between the two sees the call in both).
  // `outcome`: "stop" / "length" (served to the end; "length" when any completion hit its
  // limit) or OutcomeOfStatus(status) for a failed call.
  void CountRequest(std::string_view outcome);
  // "cancelled", "deadline", or the lower-case status code name ("invalid_argument", ...).
  static std::string_view OutcomeOfStatus(absl::StatusCode code);

  // ---- The engine thread.
  void AddPromptTokens(int64_t n);
  void AddCachedPromptTokens(int64_t n);
  void AddGenerationTokens(int64_t n);
  void ObserveTimeToFirstToken(double seconds);
  void ObserveInterTokenLatency(double seconds);
  void ObserveE2eLatency(double seconds);
  // One engine iteration (Engine::Step): time scheduling (< 0: none), blocked on the workers
  // (submit + await; < 0: none), applying a result (< 0: none applied).
  void ObserveStep(double schedule_s, double workers_s, double apply_s);
  void AddEngineSteps(int64_t n);
  void SetScheduler(const SchedulerGauges& g);
  void AddScheduler(const SchedulerCounterDeltas& d);

  // ---- The coordinator (start, monitor, recovery).
  void SetServingState(ServingState s);
  void SetWorkerGroupSize(int64_t ranks);
  void CountWorkerFailure();
  void CountWorkerRecovery();

 private:
  std::shared_ptr<prometheus::Registry> registry_;
  // Outcome label -> counter (kFinishOutcomes, then OutcomeOfStatus of every non-OK code).
  std::vector<std::pair<std::string_view, prometheus::Counter*>> requests_;
  prometheus::Counter* requests_other_ = nullptr;
  prometheus::Counter* requests_started_ = nullptr;
  prometheus::Gauge* requests_in_flight_ = nullptr;
  prometheus::Counter *prompt_tokens_, *cached_prompt_tokens_, *generation_tokens_;
  prometheus::Histogram *ttft_, *itl_, *e2e_;
  prometheus::Histogram *step_schedule_, *step_workers_, *step_apply_;
  prometheus::Counter* engine_steps_;
  prometheus::Gauge *waiting_, *running_, *kv_used_, *kv_capacity_, *host_kv_used_,
      *host_kv_capacity_, *kv_policy_positions_used_, *kv_policy_positions_capacity_, *sessions_, *session_blocks_,
      *kv_usage_, *cached_blocks_;
  prometheus::Counter *preemptions_, *pc_queries_, *pc_query_tokens_, *pc_hit_device_,
      *pc_hit_host_, *kv_compactions_, *kv_compaction_freed_, *sessions_expired_, *sessions_capped_,
      *sessions_closed_, *pc_evictions_, *host_offloads_, *host_loads_;
  std::array<prometheus::Gauge*, 5> state_{};  // by ServingState
  prometheus::Gauge* group_size_;
  prometheus::Counter *worker_failures_, *worker_recoveries_;
};

}  // namespace lorc
