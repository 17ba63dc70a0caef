#include "coordinator/local_group.h"

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "worker/comm/internal_grpc.h"

namespace lorc {

absl::StatusOr<std::unique_ptr<LocalGroup>> LocalGroup::Start(const LocalGroupOptions& options) {
  std::unique_ptr<LocalGroup> g(new LocalGroup());
  grpc::ServerBuilder builder;
  int port = 0;
  AddInternalListeningPort(builder, "127.0.0.1:0", &port);
  builder.RegisterService(&g->rendezvous_);
  g->server_ = builder.BuildAndStart();
  if (g->server_ == nullptr || port == 0) {
    return absl::UnavailableError("cannot listen on 127.0.0.1 for the workers' rendezvous");
  }
  ASSIGN_OR_RETURN(g->workers_,
                   LocalWorkers::Start(options.workers, [p = g.get()](int rank, pid_t pid,
                                                                      const std::string& how) {
                     p->OnExit(rank, pid, how);
                   }));
  WorkerGroupOptions wg;
  wg.addresses = g->workers_->addresses();
  wg.rendezvous_address = absl::StrCat("127.0.0.1:", port);
  wg.bind_address = "";  // each worker binds its own --comm-address (its listen host)
  wg.model = options.model;
  wg.kv = options.kv;
  wg.disable_custom_all_reduce = options.disable_custom_all_reduce;
  wg.join_timeout = options.join_timeout;
  wg.step_timeout = options.step_timeout;
  absl::StatusOr<std::unique_ptr<WorkerGroup>> group = WorkerGroup::Start(wg);
  if (!group.ok()) {
    // A worker that died while joining or loading: its exit says more than the broken call.
    // The supervisor may reap it a moment after the call failed.
    if (!g->workers_->WaitForExit(absl::Milliseconds(500)).empty()) {
      return absl::Status(group.status().code(),
                          absl::StrCat(group.status().message(), " (", g->failure().message(), ")"));
    }
    return group.status();
  }
  g->group_ = *std::move(group);
  absl::MutexLock lock(&g->mu_);
  if (!g->failure_.ok()) return g->failure_;  // exited after loading, before we got here
  g->live_group_ = g->group_.get();
  return g;
}

void LocalGroup::OnExit(int rank, pid_t pid, const std::string& how) {
  const absl::Status why =
      absl::UnavailableError(absl::StrCat("worker ", rank, " (pid ", pid, ") ", how));
  absl::MutexLock lock(&mu_);
  if (failure_.ok()) failure_ = why;
  if (live_group_ != nullptr) live_group_->Fail(why);  // a step in progress ends at once
}

absl::Status LocalGroup::failure() const {
  absl::MutexLock lock(&mu_);
  return failure_;
}

LocalGroup::~LocalGroup() {
  {
    absl::MutexLock lock(&mu_);
    live_group_ = nullptr;  // the supervisor no longer touches the group
  }
  group_.reset();    // step streams closed, reader threads joined
  workers_.reset();  // SIGTERM, then SIGKILL; every child reaped, the supervisor joined
  if (server_ != nullptr) server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(1));
}

}  // namespace lorc
