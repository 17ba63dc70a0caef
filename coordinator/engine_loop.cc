#include "coordinator/engine_loop.h"

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace lorc {

void RequestChannel::Push(RequestUpdate u) {
  absl::MutexLock lock(&mu_);
  updates_.push_back(std::move(u));
}

std::deque<RequestUpdate> RequestChannel::Take(absl::Duration timeout) {
  absl::MutexLock lock(&mu_);
  auto ready = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return !updates_.empty(); };
  mu_.AwaitWithTimeout(absl::Condition(&ready), timeout);
  std::deque<RequestUpdate> out;
  out.swap(updates_);
  return out;
}

namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

}  // namespace

EngineLoop::EngineLoop(std::unique_ptr<Engine> engine, ServingMetrics* metrics)
    : metrics_(metrics), engine_(std::move(engine)) {
  Publish();
  thread_ = std::thread([this] { Run(); });
}

EngineLoop::~EngineLoop() {
  {
    absl::MutexLock lock(&mu_);
    stop_ = true;
  }
  thread_.join();
}

void EngineLoop::Submit(int64_t id, GenerationRequest request, std::shared_ptr<RequestChannel> channel) {
  absl::MutexLock lock(&mu_);
  inbox_.push_back(Add{id, std::move(request), std::move(channel), Clock::now()});
}

void EngineLoop::Cancel(int64_t id, absl::Status why) {
  absl::MutexLock lock(&mu_);
  inbox_.push_back(Cancel_{id, std::move(why)});
}

void EngineLoop::Fail(absl::Status why) {
  absl::MutexLock lock(&mu_);
  if (failure_.ok()) failure_ = std::move(why);
}

absl::Status EngineLoop::CloseSession(const std::string& cache_salt,
                                      const std::string& session_id) {
  CloseSession_ cmd{cache_salt, session_id, std::make_shared<absl::Notification>(),
                    std::make_shared<absl::Status>()};
  {
    absl::MutexLock lock(&mu_);
    inbox_.push_back(cmd);
  }
  if (!cmd.done->WaitForNotificationWithTimeout(absl::Seconds(10))) {
    return absl::UnavailableError("the engine did not answer CloseSession within 10 s");
  }
  return *cmd.status;
}

absl::Status EngineLoop::failure() const {
  absl::MutexLock lock(&mu_);
  return failure_;
}

LoopStats EngineLoop::stats() const {
  absl::MutexLock lock(&mu_);
  return stats_;
}

void EngineLoop::Publish() {
  LoopStats s;
  s.kv_free_blocks = engine_->scheduler().num_free_blocks();
  s.num_running = engine_->scheduler().num_running();
  s.num_waiting = engine_->scheduler().num_waiting();
  s.num_preemptions = engine_->scheduler().num_preemptions();
  // Device-resident policy states only (ModelInfo's and the gauge's contract): without them (no
  // policy, or states in host memory) the count the scheduler keeps anyway is no one's memory.
  if (engine_->scheduler().config().kv_policy_max_positions > 0) {
    s.kv_policy_positions = engine_->scheduler().num_kv_policy_positions();
  }
  s.prefix_cache = engine_->scheduler().prefix_cache_report();
  s.engine = engine_->stats();
  if (metrics_ != nullptr) {
    const Scheduler& sched = engine_->scheduler();
    SchedulerGauges g;
    g.num_waiting = s.num_waiting;
    g.num_running = s.num_running;
    g.kv_blocks_capacity = sched.num_blocks();
    g.kv_blocks_used = sched.num_blocks() - s.kv_free_blocks;
    g.host_kv_blocks_capacity = s.prefix_cache.host_blocks_total;
    g.host_kv_blocks_used = s.prefix_cache.host_blocks_used;
    g.kv_policy_positions_used = s.kv_policy_positions;
    g.kv_policy_positions_capacity = sched.config().kv_policy_max_positions;
    g.sessions = s.prefix_cache.sessions;
    g.session_blocks = s.prefix_cache.session_blocks;
    g.cached_blocks = s.prefix_cache.cached_blocks;
    metrics_->SetScheduler(g);
    // The scheduler's counters run from its construction (this engine's): add what is new.
    const PrefixCacheStats& pc = s.prefix_cache.stats;
    SchedulerCounterDeltas d;
    d.preemptions = sched.num_preemptions() - mark_.preemptions;
    d.prefix_cache_queries = pc.queries - mark_.prefix_cache.queries;
    d.prefix_cache_query_tokens = pc.query_tokens - mark_.prefix_cache.query_tokens;
    d.prefix_cache_hit_tokens = pc.hit_tokens - mark_.prefix_cache.hit_tokens;
    d.prefix_cache_host_hit_tokens = pc.host_hit_tokens - mark_.prefix_cache.host_hit_tokens;
    d.kv_compactions = sched.num_kv_compactions() - mark_.kv_compactions;
    d.kv_compaction_freed_blocks = sched.num_kv_compaction_freed_blocks() - mark_.kv_compaction_freed_blocks;
    d.sessions_expired = s.prefix_cache.sessions_expired - mark_.sessions_expired;
    d.sessions_capped = s.prefix_cache.sessions_capped - mark_.sessions_capped;
    d.sessions_closed = s.prefix_cache.sessions_closed - mark_.sessions_closed;
    d.prefix_cache_evictions = pc.evictions - mark_.prefix_cache.evictions;
    d.host_kv_offloads = pc.host_offloads - mark_.prefix_cache.host_offloads;
    d.host_kv_loads = pc.host_loads - mark_.prefix_cache.host_loads;
    metrics_->AddScheduler(d);
    mark_.sessions_expired = s.prefix_cache.sessions_expired;
    mark_.sessions_capped = s.prefix_cache.sessions_capped;
    mark_.sessions_closed = s.prefix_cache.sessions_closed;
    mark_.preemptions = sched.num_preemptions();
    mark_.kv_compactions = sched.num_kv_compactions();
    mark_.kv_compaction_freed_blocks = sched.num_kv_compaction_freed_blocks();
    mark_.prefix_cache = pc;
  }
  absl::MutexLock lock(&mu_);
  stats_ = s;
}

Engine::UpdateFn EngineLoop::MakeUpdateFn(const Add& add) {
  std::shared_ptr<RequestChannel> ch = add.channel;
  if (metrics_ == nullptr) {
    return [this, ch](const RequestUpdate& u) { outbox_.emplace_back(ch, u); };
  }
  // Per request, on the engine thread: the last token's time per completion, finals seen.
  struct Timing {
    Clock::time_point submitted;
    std::vector<Clock::time_point> last_token;  // per completion; epoch: none yet
    bool first_token = false;
    int32_t num_final = 0;
    bool all_ok = true;
  };
  auto t = std::make_shared<Timing>();
  t->submitted = add.submitted;
  t->last_token.resize(std::max(1, add.request.params.n));
  return [this, ch, t](const RequestUpdate& u) {
    ServingMetrics& m = *metrics_;
    const Clock::time_point now = Clock::now();
    if (!u.new_ids.empty() && u.index >= 0 && u.index < static_cast<int32_t>(t->last_token.size())) {
      m.AddGenerationTokens(static_cast<int64_t>(u.new_ids.size()));
      Clock::time_point& last = t->last_token[u.index];
      if (last != Clock::time_point{}) m.ObserveInterTokenLatency(Seconds(last, now));
      last = now;
      if (!t->first_token) {
        t->first_token = true;
        m.ObserveTimeToFirstToken(Seconds(t->submitted, now));
      }
    }
    if (u.finished) {
      t->all_ok = t->all_ok && u.status.ok();
      if (++t->num_final == static_cast<int32_t>(t->last_token.size())) {  // the request ended
        m.AddPromptTokens(u.prompt_tokens);
        m.AddCachedPromptTokens(u.cached_prompt_tokens);
        if (t->all_ok) m.ObserveE2eLatency(Seconds(t->submitted, now));
      }
    }
    outbox_.emplace_back(ch, u);
  };
}

void EngineLoop::Run() {
  for (;;) {
    std::deque<std::variant<Add, Cancel_, CloseSession_>> inbox;
    absl::Status failure;
    {
      absl::MutexLock lock(&mu_);
      auto wake = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        return stop_ || !inbox_.empty() || (failure_.ok() && engine_->HasWork());
      };
      // HasWork() only changes on this thread, so a plain timed wait is enough.
      mu_.AwaitWithTimeout(absl::Condition(&wake), absl::Milliseconds(100));
      if (stop_) failure_.Update(absl::UnavailableError("server shutting down"));
      inbox.swap(inbox_);
      failure = failure_;
    }
    for (auto& cmd : inbox) {
      if (auto* add = std::get_if<Add>(&cmd)) {
        std::shared_ptr<RequestChannel> ch = add->channel;
        absl::Status s =
            failure.ok() ? engine_->Add(add->id, add->request, MakeUpdateFn(*add)) : failure;
        if (!s.ok()) {
          RequestUpdate u;
          u.finished = true;
          u.reason = FinishReason::kError;
          u.status = s;
          outbox_.emplace_back(ch, std::move(u));
        }
      } else if (auto* close = std::get_if<CloseSession_>(&cmd)) {
        *close->status = engine_->CloseSession(close->cache_salt, close->session_id);
        Publish();  // ModelInfo read after CloseSession returns reflects it
        close->done->Notify();
      } else {
        auto& c = std::get<Cancel_>(cmd);
        engine_->Abort(c.id, c.why);
      }
    }
    engine_->ExpireSessions();  // also while idle
    if (!failure.ok()) {
      engine_->AbortAll(failure);  // workers are not stepped any more
    } else if (engine_->HasWork()) {
      const EngineStats before = engine_->stats();
      const absl::Status s = engine_->Step();
      if (metrics_ != nullptr) {
        // This iteration's phases (Engine::Step: schedule + submit while the pipeline has room,
        // await + apply once it is full); a phase that did not run is not observed.
        const EngineStats& after = engine_->stats();
        const bool applied = after.steps > before.steps;
        const double workers_s = after.run_s - before.run_s;
        metrics_->ObserveStep(after.schedule_s - before.schedule_s, workers_s > 0 ? workers_s : -1,
                              applied ? after.apply_s - before.apply_s : -1);
        metrics_->AddEngineSteps(after.steps - before.steps);
      }
      if (!s.ok() && (s.code() == absl::StatusCode::kUnavailable ||
                      s.code() == absl::StatusCode::kDeadlineExceeded)) {
        Fail(s);
      }
    }
    // Stats first, then the updates: a client that has its final message sees the state after
    // the step that produced it in ModelInfo (its blocks free, itself not running).
    Publish();
    for (auto& [ch, u] : outbox_) ch->Push(std::move(u));
    outbox_.clear();
    {
      absl::MutexLock lock(&mu_);
      if (stop_ && inbox_.empty()) return;
    }
  }
}

}  // namespace lorc
