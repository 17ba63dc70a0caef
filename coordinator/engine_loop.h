// The server's engine thread: owns an Engine, takes submissions and cancellations from gRPC
// handler threads through a queue, and steps the engine while there is work. Each request's
// updates go to its RequestChannel, which its handler thread drains. With a ServingMetrics the
// engine thread also keeps the Prometheus metrics it sees (tokens, latencies, step phases,
// scheduler occupancy and counters); a recovery's new loop gets the same object.
#pragma once

#include <atomic>
#include <chrono>
#include <deque>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <variant>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "coordinator/engine.h"
#include "metrics/serving_metrics.h"

namespace lorc {

// A request's stream of updates, filled by the engine thread, drained by one handler thread.
class RequestChannel {
 public:
  void Push(RequestUpdate u);
  // Waits up to `timeout` for updates; returns whatever is queued (possibly nothing).
  std::deque<RequestUpdate> Take(absl::Duration timeout);

 private:
  absl::Mutex mu_;
  std::deque<RequestUpdate> updates_ ABSL_GUARDED_BY(mu_);
};

struct LoopStats {
  int64_t kv_free_blocks = 0;
  int32_t num_running = 0;
  int32_t num_waiting = 0;
  int64_t num_preemptions = 0;  // since the engine started
  int64_t kv_policy_positions = 0;  // Scheduler::num_kv_policy_positions; 0 without device-resident states
  EngineStats engine;
  PrefixCacheReport prefix_cache;
};

class EngineLoop {
 public:
  // Takes ownership of the engine; starts the thread. `metrics` (may be null) must outlive the
  // loop; it is updated from the engine thread only.
  explicit EngineLoop(std::unique_ptr<Engine> engine, ServingMetrics* metrics = nullptr);
  ~EngineLoop();  // stops the thread; live requests end with UNAVAILABLE

  // Queues a request; its updates (including a validation failure) arrive on `channel`.
  void Submit(int64_t id, GenerationRequest request, std::shared_ptr<RequestChannel> channel);
  void Cancel(int64_t id, absl::Status why);
  // Ends a session on the engine thread (Scheduler::CloseSession) and waits for the answer:
  // NOT_FOUND for an unknown session, UNAVAILABLE when the loop does not answer within 10 s.
  absl::Status CloseSession(const std::string& cache_salt, const std::string& session_id);
  // Fails every live request and every later one with `why` (a worker is gone).
  void Fail(absl::Status why);
  absl::Status failure() const;
  LoopStats stats() const;

 private:
  struct Add {
    int64_t id;
    GenerationRequest request;
    std::shared_ptr<RequestChannel> channel;
    std::chrono::steady_clock::time_point submitted;
  };
  struct Cancel_ {
    int64_t id;
    absl::Status why;
  };
  struct CloseSession_ {
    std::string cache_salt;
    std::string session_id;
    std::shared_ptr<absl::Notification> done;
    std::shared_ptr<absl::Status> status;  // written before `done` is notified
  };
  void Run();
  void Publish();
  // The callback Engine::Add gets: queues the update for `ch` and, with metrics, counts its
  // tokens and observes TTFT / inter-token / end-to-end latency from the submission time.
  Engine::UpdateFn MakeUpdateFn(const Add& add);
  // Engine stats and scheduler counters already added to the metrics (engine thread).
  struct MetricsMark {
    int64_t preemptions = 0;
    int64_t kv_compactions = 0, kv_compaction_freed_blocks = 0;
    PrefixCacheStats prefix_cache;
    int64_t sessions_expired = 0, sessions_capped = 0, sessions_closed = 0;
  };

  ServingMetrics* const metrics_;
  MetricsMark mark_;

  std::unique_ptr<Engine> engine_;
  // Updates of the current iteration, delivered after its stats are published (engine thread).
  std::vector<std::pair<std::shared_ptr<RequestChannel>, RequestUpdate>> outbox_;
  mutable absl::Mutex mu_;
  std::deque<std::variant<Add, Cancel_, CloseSession_>> inbox_ ABSL_GUARDED_BY(mu_);
  absl::Status failure_ ABSL_GUARDED_BY(mu_);
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  LoopStats stats_ ABSL_GUARDED_BY(mu_);
  std::thread thread_;
};

}  // namespace lorc
