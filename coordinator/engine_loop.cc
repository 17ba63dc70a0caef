#include "coordinator/engine_loop.h"

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

EngineLoop::EngineLoop(std::unique_ptr<Engine> engine) : engine_(std::move(engine)) {
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
  inbox_.push_back(Add{id, std::move(request), std::move(channel)});
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
  s.prefix_cache = engine_->scheduler().prefix_cache_report();
  s.engine = engine_->stats();
  absl::MutexLock lock(&mu_);
  stats_ = s;
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
        absl::Status s = failure.ok()
                             ? engine_->Add(add->id, add->request,
                                            [this, ch](const RequestUpdate& u) {
                                              outbox_.emplace_back(ch, u);
                                            })
                             : failure;
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
      const absl::Status s = engine_->Step();
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
