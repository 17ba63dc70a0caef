#include "coordinator/coordinator_server.h"

#include <unistd.h>

#include <filesystem>
#include <iostream>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "common/defaults.h"
#include "common/status_macros.h"
#include "coordinator/request_conversion.h"  // kMaxRequestBytes (ModelInfo)
#include "model/weights.h"  // ShardLayout (the split checked at start)
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/health_check_service_interface.h"
#include "step/coordinator_ref.h"
#include "worker/comm/internal_grpc.h"

namespace lorc {
namespace {

constexpr char kServiceName[] = "lorcserve.v1.LorcServe";
constexpr char kLivenessService[] = "liveness";

// Splits "host:port" at the last colon.
std::pair<std::string, std::string> SplitHostPort(const std::string& addr) {
  const size_t colon = addr.rfind(':');
  if (colon == std::string::npos) return {addr, ""};
  return {addr.substr(0, colon), addr.substr(colon + 1)};
}

std::string Hostname() {
  char buf[256] = {};
  if (gethostname(buf, sizeof(buf) - 1) != 0) return "127.0.0.1";
  return buf;
}

// Whether the worker at `address` answers a Ping within `timeout` (Ping needs no owner).
bool AnswersPing(const std::string& address, absl::Duration timeout) {
  auto stub = lorcserve::internal::Worker::NewStub(InternalChannel(address));
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + absl::ToChronoMilliseconds(timeout));
  lorcserve::internal::PingRequest req;
  lorcserve::internal::PingResponse resp;
  return stub->Ping(&ctx, req, &resp).ok();
}

bool IsWildcard(const std::string& host) {
  return host.empty() || host == "0.0.0.0" || host == "[::]" || host == "::";
}

// What new requests are told while a recovery runs (retryable), with the failure so far.
absl::Status RecoveringStatus(const absl::Status& failure) {
  return absl::UnavailableError(
      absl::StrCat("recovering from a worker failure (retry shortly): ", failure.message()));
}

}  // namespace

std::string DefaultInternalListen(const std::string& listen) {
  const auto [host, port] = SplitHostPort(listen);
  return absl::StrCat(host, ":", port == "0" ? 0 : defaults::kInternalPort);
}

absl::StatusOr<std::unique_ptr<CoordinatorServer>> CoordinatorServer::Create(const CoordinatorOptions& options) {
  std::unique_ptr<CoordinatorServer> s(new CoordinatorServer());
  s->options_ = options;
  s->metrics_ = options.metrics != nullptr ? options.metrics : std::make_shared<ServingMetrics>();
  s->metrics_->SetServingState(ServingState::kStarting);
  s->log_ = std::make_unique<EventLog>(options.log_format);
  if (s->options_.internal_listen.empty()) {
    s->options_.internal_listen = DefaultInternalListen(options.listen);
    s->internal_listen_defaulted_ = true;
  }
  const int num_local = options.worker_addresses.empty() ? options.local_workers.count : 0;
  const int listed = static_cast<int>(options.worker_addresses.size());
  int32_t& tp = s->options_.tensor_parallel_size;
  if (listed > 0 && tp != 0 && tp != listed) {
    return absl::InvalidArgumentError(absl::StrCat("--tensor-parallel-size ", tp, " but --workers lists ",
                                                   listed, " addresses"));
  }
  if (tp == 0) tp = listed > 0 ? listed : num_local;
  if (tp < 1) return absl::InvalidArgumentError("no workers: give --workers, --local-workers or --tensor-parallel-size");
  if (tp < num_local) {
    return absl::InvalidArgumentError(absl::StrCat("--tensor-parallel-size ", tp, " is less than --local-workers ",
                                                   num_local));
  }
  if (listed == 0 && tp > num_local) {
    s->registry_ = std::make_unique<JoinRegistry>(
        tp, num_local, [](const std::string& a) { return AnswersPing(a, absl::Seconds(1)); },
        [p = s.get()](const JoinedWorker& now, const JoinedWorker& previous) { p->OnJoin(now, previous); });
    s->join_service_ = std::make_unique<WorkerJoinService>(s->registry_.get(), s->coordinator_id_);
    // A mixed group (this host's ranks plus joined ones on other hosts): the local workers'
    // communicator must be reachable from those hosts, so they bind all interfaces (a wildcard
    // listen makes a worker bind its communicator to this host's name, e.g. the pod address)
    // instead of loopback. Not when the internal services themselves listen on loopback: then
    // only this host's ranks can join, and a worker port on every interface served nobody (a
    // tester).
    const std::string internal_host = SplitHostPort(s->options_.internal_listen).first;
    const bool internal_loopback = internal_host == "localhost" || internal_host == "[::1]" ||
                                   absl::StartsWith(internal_host, "127.");
    if (num_local > 0 && !internal_loopback &&
        s->options_.local_workers.listen == LocalWorkersOptions::kLoopback) {
      s->options_.local_workers.listen = LocalWorkersOptions::kAllInterfaces;
    }
  }
  ASSIGN_OR_RETURN(s->config_, LoadModelConfig(options.model.dir));
  // The split is checked before any worker starts or joins (each checks it again at LoadModel):
  // a size that does not divide the heads waited for joins it could never use (a tester).
  if (absl::StatusOr<ShardLayout> layout = ShardLayout::Make(s->config_, 0, tp, options.model.shard_lm_head);
      !layout.ok()) {
    const char* flag = options.tensor_parallel_size != 0 ? "--tensor-parallel-size"
                       : listed > 0                       ? "--workers"
                                                          : "--local-workers";
    return absl::InvalidArgumentError(absl::StrCat(flag, " (", tp, " ranks): ", layout.status().message()));
  }
  if (std::filesystem::exists(std::filesystem::path(options.model.dir) / "tokenizer.json")) {
    ASSIGN_OR_RETURN(s->tokenizer_, Tokenizer::FromModelDir(options.model.dir));
  }
  RETURN_IF_ERROR(s->StartServer());
  return s;
}

absl::Status CoordinatorServer::Start() {
  {
    absl::MutexLock lock(&mu_);
    if (stopping_) return absl::CancelledError("shutting down before the workers started");
  }
  RETURN_IF_ERROR(StartWorkers());
  monitor_ = std::thread([this] { Monitor(); });
  return absl::OkStatus();
}

std::string CoordinatorServer::address() const {
  return absl::StrCat(SplitHostPort(options_.listen).first, ":", port_);
}

std::string CoordinatorServer::internal_address() const {
  return absl::StrCat(SplitHostPort(options_.internal_listen).first, ":", internal_port_);
}

absl::Status CoordinatorServer::StartServer() {
  lorcserve::v1::ModelInfoResponse info;
  info.set_model(options_.model.dir);
  info.set_vocab_size(config_.vocab_size);
  info.set_max_model_len(config_.max_position_embeddings);
  info.set_num_layers(static_cast<int32_t>(config_.num_layers));
  info.set_hidden_size(static_cast<int32_t>(config_.hidden_size));
  info.set_num_heads(static_cast<int32_t>(config_.num_heads));
  info.set_num_kv_heads(static_cast<int32_t>(config_.num_kv_heads));
  info.set_block_size(options_.kv.block_size);
  KvSpecOptions spec_options;
  spec_options.block_size = options_.kv.block_size;
  spec_options.kv_cache_dtype = options_.kv.kv_cache_dtype;
  info.set_kv_compression(
      MakeKvCacheSpec(config_, spec_options).value_or(KvCacheSpec{}).CompressionName());
  info.set_kv_cache_dtype(KvCacheDtypeName(options_.kv.kv_cache_dtype));
  info.set_kv_policy(options_.kv.kv_policy.Describe());  // "none" without one
  info.set_max_request_bytes(static_cast<int64_t>(kMaxRequestBytes));
  service_ = std::make_unique<LorcServeService>(
      config_, tokenizer_.get(), info, [this](lorcserve::v1::ModelInfoResponse* r) { FillLive(r); });
  service_->SetObservability(metrics_.get(), log_.get());

  ASSIGN_OR_RETURN(std::shared_ptr<grpc::ServerCredentials> creds,
                   security::ServerCredentials(options_.tls));
  // Every internal server and channel of this process (worker/comm/internal_grpc.h).
  RETURN_IF_ERROR(ConfigureInternalTls(options_.internal_tls));
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  ExclusivePort(builder);
  builder.AddListeningPort(options_.listen, creds, &port_);
  if (options_.auth != nullptr) {
    service_->SetAuthenticator(options_.auth);
    std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>> interceptors;
    interceptors.push_back(security::AuthInterceptorFactory(options_.auth));
    builder.experimental().SetInterceptorCreators(std::move(interceptors));
  }
  builder.SetMaxReceiveMessageSize(64 << 20);
  builder.RegisterService(service_.get());
  server_ = builder.BuildAndStart();
  if (server_ == nullptr || port_ == 0) {
    return absl::UnavailableError(absl::StrCat("--listen: cannot listen on ", options_.listen,
                                               " (the port is in use, or the host is not an address "
                                               "of this machine)"));
  }
  // The internal services on their own port: never reachable through the public API's.
  grpc::ServerBuilder internal;
  AddInternalListeningPort(internal, options_.internal_listen, &internal_port_);
  internal.RegisterService(&rendezvous_);
  if (join_service_ != nullptr) internal.RegisterService(join_service_.get());
  internal_server_ = internal.BuildAndStart();
  if (internal_server_ == nullptr || internal_port_ == 0) {
    return absl::UnavailableError(absl::StrCat(
        "--internal-listen: cannot listen on ", options_.internal_listen,
        internal_listen_defaulted_ ? " (not given: the default for --listen " + options_.listen + ")" : "",
        " (the port is in use, or the host is not an address of this machine; --internal-listen HOST:PORT "
        "picks another)"));
  }
  SetHealth(false);
  SetLiveness(true);
  return absl::OkStatus();
}

struct CoordinatorServer::Generation {
  std::unique_ptr<WorkerGroup> group;
  std::shared_ptr<EngineLoop> loop;  // over `group`: destroyed first (members in reverse order)
};

absl::Status CoordinatorServer::StartWorkers() {
  std::string rendezvous = options_.advertise_address;
  const auto [host, unused_port] = SplitHostPort(options_.internal_listen);
  const bool wildcard = IsWildcard(host);
  if (options_.worker_addresses.empty() && options_.local_workers.count > 0) {
    ASSIGN_OR_RETURN(local_, LocalWorkers::Start(options_.local_workers,
                                                 [this](int rank, pid_t pid, const std::string& how) {
                                                   OnWorkerFailure(absl::UnavailableError(absl::StrCat(
                                                       "worker ", rank, " (pid ", pid, ") ", how)));
                                                 }));
    if (rendezvous.empty()) rendezvous = absl::StrCat(wildcard ? "127.0.0.1" : host, ":", internal_port_);
  } else if (rendezvous.empty()) {
    rendezvous = absl::StrCat(wildcard ? Hostname() : host, ":", internal_port_);
  }
  rendezvous_address_ = rendezvous;
  // Workers' logs name this coordinator by the address other hosts know it by (the local
  // workers' rendezvous is loopback).
  coordinator_address_ = !options_.advertise_address.empty()
                             ? options_.advertise_address
                             : absl::StrCat(wildcard ? Hostname() : host, ":", internal_port_);
  if (registry_ != nullptr) return absl::OkStatus();  // the monitor forms the group (FormJoinedGroup)
  RETURN_IF_ERROR(JoinGroup());
  absl::MutexLock lock(&mu_);
  return failure_;  // a worker died while loading
}

absl::Status CoordinatorServer::JoinGroup() {
  WorkerGroupOptions wg;
  wg.addresses = WorkerAddresses();
  wg.rendezvous_address = rendezvous_address_;
  wg.coordinator_address = coordinator_address_;
  // The same id on every (re)join: the workers keep serving this coordinator across recoveries.
  wg.coordinator_id = coordinator_id_;
  wg.bind_address = "";  // each worker binds its own --comm-address
  wg.model = options_.model;
  wg.kv = options_.kv;
  wg.use_stream = options_.step_stream;
  wg.disable_custom_all_reduce = options_.disable_custom_all_reduce;
  wg.step_timeout = options_.step_timeout;
  wg.join_timeout = options_.join_timeout;
  wg.connect_timeout = options_.join_timeout;  // an unreachable --workers address is named then
  {
    // While recovering, a worker that is still down fails the attempt quickly (then backoff),
    // so Shutdown is not held up for the full connect timeout.
    absl::MutexLock lock(&mu_);
    if (state_ == State::kRecovering) wg.connect_timeout = std::min(wg.connect_timeout, absl::Seconds(5));
    // At start, a worker still held by a coordinator that died (a supervisor's restart right
    // after a crash) is waited for, up to the join timeout, instead of exiting 1 at once.
    if (state_ == State::kStarting) wg.owner_wait = options_.join_timeout;
  }
  // Shutdown (a signal during the load, or during a recovery) ends the wait for the workers.
  wg.cancelled = [this] {
    absl::MutexLock lock(&mu_);
    return stopping_;
  };
  auto g = std::make_shared<Generation>();
  ASSIGN_OR_RETURN(g->group, WorkerGroup::Start(wg));

  KvCacheSpec kv;
  kv.block_size = options_.kv.block_size;
  kv.num_blocks = g->group->info().num_blocks;
  kv.kv_cache_dtype = options_.kv.kv_cache_dtype;  // with the model: the format identity
  EngineOptions engine_options = options_.engine;
  // A new group's host memory is new: the new engine's host tier starts empty.
  engine_options.num_host_blocks = g->group->info().num_host_blocks;
  engine_options.kv_compaction = options_.kv.kv_policy.enabled();  // sent to every worker
  engine_options.kv_policy_max_positions = g->group->info().kv_policy_max_positions;
  engine_options.kv_policy_prefill_interval = options_.kv.kv_policy.prefill_interval;  // sent too
  ASSIGN_OR_RETURN(std::unique_ptr<Engine> engine,
                   Engine::Create(g->group.get(), config_, kv, tokenizer_.get(), engine_options));
  g->loop = std::make_shared<EngineLoop>(std::move(engine), metrics_.get());
  {
    absl::MutexLock lock(&mu_);
    if (stopping_) return absl::CancelledError("shutting down");
    if (state_ == State::kStarting && !failure_.ok()) return failure_;  // died while loading
    if (state_ == State::kRecovering) metrics_->CountWorkerRecovery();
    gen_ = g;
    state_ = State::kServing;
    failure_ = absl::OkStatus();
    // Under mu_ with state_, so a failure right after cannot be overwritten.
    metrics_->SetWorkerGroupSize(g->group->size());
    PublishState(ServingState::kServing);
  }
  // The aliasing shared_ptr keeps the whole generation (the loop's group) alive in handlers.
  service_->SetLoop(std::shared_ptr<EngineLoop>(g, g->loop.get()));
  SetHealth(true);
  log_->Worker({"join", absl::StrCat(g->group->size(), " worker(s) joined and loaded the model: ",
                                     absl::StrJoin(wg.addresses, ","))});
  // Served anyway (vLLM refuses to start): requests whose prompt + max_tokens exceed the cache are
  // refused one by one ("can never fit"), so the operator hears it once, here.
  const int64_t cache_tokens = static_cast<int64_t>(kv.num_blocks) * kv.block_size;
  if (cache_tokens < config_.max_position_embeddings) {
    log_->Worker({"kv_cache_small", absl::StrCat("the KV cache holds ", cache_tokens, " tokens (", kv.num_blocks,
                                          " blocks of ", kv.block_size, "), fewer than one sequence of "
                                          "max_model_len ", config_.max_position_embeddings,
                                          ": longer requests are refused; raise --gpu-memory-utilization, "
                                          "--kv-cache-mb or --num-blocks")});
  }
  return absl::OkStatus();
}

std::vector<std::string> CoordinatorServer::WorkerAddresses() const {
  if (local_ == nullptr) return registry_ != nullptr ? registry_->addresses() : options_.worker_addresses;
  std::vector<std::string> out = local_->addresses();
  if (registry_ != nullptr) {
    for (std::string& a : registry_->addresses()) out.push_back(std::move(a));
  }
  return out;
}

void CoordinatorServer::OnJoin(const JoinedWorker& now, const JoinedWorker& previous) {
  std::cerr << "lorcserve coordinator: worker rank " << now.rank << " joined from " << now.address
            << (now.hostname.empty() ? "" : absl::StrCat(" (", now.hostname, ")"))
            << (previous.address.empty() ? "" : absl::StrCat(", replacing ", previous.address)) << "\n";
  if (previous.address.empty()) return;
  {
    absl::MutexLock lock(&mu_);
    if (state_ != State::kServing) return;  // the next formation / recovery uses the new address
  }
  OnWorkerFailure(absl::UnavailableError(absl::StrCat(
      "worker ", now.rank, " re-joined as a new process at ", now.address, " (was ", previous.address,
      "); re-forming the group")));
}

void CoordinatorServer::FormJoinedGroup() {
  const absl::Time start = absl::Now();
  absl::Time next_report = start + options_.join_timeout;
  while (!registry_->complete()) {
    if (SleepUnlessStopping(absl::Milliseconds(100))) return;
    if (absl::Now() >= next_report) {
      next_report = absl::Now() + options_.join_timeout;
      const std::string msg = absl::StrCat("the group is incomplete after ",
                                           absl::FormatDuration(absl::Trunc(absl::Now() - start, absl::Seconds(1))), " (--join-timeout-s ",
                                           absl::ToInt64Seconds(options_.join_timeout), "): ",
                                           registry_->Describe(), "; still waiting");
      std::cerr << "lorcserve coordinator: " << msg << "\n";
      absl::MutexLock lock(&mu_);
      join_waiting_ = msg;
    }
  }
  {
    absl::MutexLock lock(&mu_);
    join_waiting_.clear();
  }
  std::cerr << "lorcserve coordinator: all " << registry_->size() << " ranks joined; forming the group\n";
  absl::Status st = JoinGroup();
  if (st.ok()) {
    std::cerr << "lorcserve coordinator: group formed; health is SERVING\n";
    return;
  }
  if (absl::IsCancelled(st)) return;
  std::cerr << "lorcserve coordinator: forming the group failed: " << st.message() << "; retrying\n";
  absl::MutexLock lock(&mu_);
  if (stopping_) return;
  failure_ = st;
  // As OnWorkerFailure: the recovery's first attempt takes its budget now.
  state_ = options_.max_restarts > 0 && TakeRestartBudget() ? State::kRecovering : State::kFailed;
}

std::shared_ptr<CoordinatorServer::Generation> CoordinatorServer::Current() const {
  absl::MutexLock lock(&mu_);
  return gen_;
}

void CoordinatorServer::SetHealth(bool serving) {
  if (server_ == nullptr) return;
  {
    absl::MutexLock lock(&mu_);
    if (draining_) serving = false;
  }
  server_->GetHealthCheckService()->SetServingStatus("", serving);
  server_->GetHealthCheckService()->SetServingStatus(kServiceName, serving);
}

void CoordinatorServer::SetLiveness(bool alive) {
  if (server_ != nullptr) server_->GetHealthCheckService()->SetServingStatus(kLivenessService, alive);
}

void CoordinatorServer::OnWorkerFailure(const absl::Status& why) {
  std::shared_ptr<Generation> g;
  bool recover = false, gave_up = false;
  absl::Status refusal;  // what new requests are told until the group serves again
  {
    absl::MutexLock lock(&mu_);
    if (stopping_ || state_ == State::kRecovering || state_ == State::kFailed) return;
    if (state_ == State::kStarting) {
      // StartWorkers / JoinGroup see failure_ themselves.
      if (failure_.ok()) failure_ = why;
      return;
    }
    failure_ = why;
    // The recovery's first attempt takes its budget here, so that nobody is told to retry when
    // no recovery will come.
    recover = options_.max_restarts > 0 && TakeRestartBudget();
    gave_up = options_.max_restarts > 0 && !recover;
    if (recover) {
      refusal = RecoveringStatus(why);
    } else if (gave_up) {
      refusal = GaveUpStatus(why);
      failure_ = refusal;
    } else {
      refusal = absl::UnavailableError(absl::StrCat("not serving: ", why.message()));
    }
    state_ = recover ? State::kRecovering : State::kFailed;
    g = gen_;  // a snapshot: stays valid even if Shutdown drops gen_ meanwhile
    metrics_->CountWorkerFailure();
    metrics_->SetWorkerGroupSize(0);
    PublishState(recover ? ServingState::kRecovering : ServingState::kFailed);
  }
  log_->Worker({"failure", absl::StrCat(why.message(), "; health is NOT_SERVING",
                                        recover ? ", recovering" : "")});
  if (gave_up) log_->Worker({"give_up", std::string(refusal.message())});
  service_->SetLoop(nullptr, refusal);
  SetHealth(false);
  if (!recover) SetLiveness(false);  // failed for good: only a restart of the process helps
  if (g != nullptr) {
    g->group->Fail(why);  // in-flight requests end with UNAVAILABLE naming the worker
    g->loop->Fail(why);
  }
}

bool CoordinatorServer::TakeRestartBudget() {
  const absl::Time now = absl::Now();
  std::erase_if(restarts_, [&](absl::Time t) { return now - t > options_.restart_window; });
  if (static_cast<int32_t>(restarts_.size()) >= options_.max_restarts) return false;
  restarts_.push_back(now);
  return true;
}

absl::Status CoordinatorServer::GaveUpStatus(const absl::Status& last) const {
  return absl::UnavailableError(absl::StrCat("not serving: gave up after ", restarts_.size(),
                                             " worker recoveries within ",
                                             absl::FormatDuration(options_.restart_window),
                                             "; last failure: ", last.message()));
}

bool CoordinatorServer::SleepUnlessStopping(absl::Duration d) {
  absl::MutexLock lock(&mu_);
  auto stop = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return stopping_; };
  return mu_.AwaitWithTimeout(absl::Condition(&stop), d);
}

void CoordinatorServer::Recover() {
  // The old generation: nothing new reaches it (the service has no loop); drop it here.
  std::shared_ptr<Generation> old;
  absl::Status last;
  {
    absl::MutexLock lock(&mu_);
    old = std::move(gen_);
    last = failure_;
  }
  old.reset();
  // One recovery counts against the budget (taken by OnWorkerFailure); with local workers so does
  // every further attempt (each restarts processes). Remote workers are retried without limit
  // until they answer.
  absl::Duration backoff = absl::Milliseconds(200);
  const absl::Status cause = last;
  for (bool first = true;; first = false) {
    if (!first && local_ != nullptr && registry_ == nullptr) {
      absl::Status final_status;
      {
        absl::MutexLock lock(&mu_);
        if (stopping_) return;
        if (!TakeRestartBudget()) {
          final_status = GaveUpStatus(last);
          state_ = State::kFailed;
          failure_ = final_status;
          PublishState(ServingState::kFailed);
        }
      }
      if (!final_status.ok()) {
        log_->Worker({"give_up", std::string(final_status.message())});
        service_->SetLoop(nullptr, final_status);
        SetLiveness(false);
        return;
      }
    }
    absl::Status st;
    if (local_ != nullptr) {
      // A worker that is still there but does not answer (hung, stopped) would never exit by
      // itself and every re-join would wait for it: kill it, so it is restarted like a dead one.
      const std::vector<std::string> addresses = local_->addresses();
      for (int rank = 0; rank < static_cast<int>(addresses.size()); ++rank) {
        if (!addresses[rank].empty() && !AnswersPing(addresses[rank], absl::Seconds(2)) &&
            local_->Kill(rank)) {
          log_->Worker({"kill", absl::StrCat("worker ", rank, " does not answer; killed it to restart it"),
                        rank});
        }
      }
      for (int rank : local_->WaitForExit(absl::Seconds(2))) {
        log_->Worker({"restart", absl::StrCat("restarting worker ", rank), rank});
        st = local_->Restart(rank);
        if (!st.ok()) break;
      }
    }
    if (st.ok()) st = JoinGroup();
    if (st.ok()) {
      log_->Worker({"recovery", "workers re-joined; health is SERVING"});
      return;
    }
    if (absl::IsCancelled(st)) return;  // shutting down
    last = st;
    log_->Worker({"recovery_failed", absl::StrCat("recovery attempt failed: ", st.message())});
    {
      // ModelInfo.worker_failure and the refusal of new requests say why the group is still not
      // back (a tester's resumed coordinator showed only the first failure while every worker
      // refused it: owned by another).
      absl::Status refusal;
      {
        absl::MutexLock lock(&mu_);
        if (state_ == State::kRecovering && !stopping_) {
          failure_ = absl::Status(cause.code(), absl::StrCat(cause.message(), "; recovery attempt failed: ",
                                                             st.message()));
          refusal = RecoveringStatus(failure_);
        }
      }
      if (!refusal.ok()) service_->SetLoop(nullptr, refusal);
    }
    if (registry_ != nullptr) {
      // Join mode: a worker that re-joins (a restart, a new address) is tried at once.
      const uint64_t seen = registry_->changes();
      const absl::Time until = absl::Now() + backoff;
      while (absl::Now() < until && registry_->changes() == seen) {
        if (SleepUnlessStopping(absl::Milliseconds(100))) return;
      }
    } else if (SleepUnlessStopping(backoff)) {
      return;
    }
    backoff = std::min(backoff * 2, options_.max_backoff);
  }
}

void CoordinatorServer::Monitor() {
  absl::Time next_probe = absl::Now() + options_.probe_interval;
  for (;;) {
    State state;
    std::shared_ptr<Generation> g;
    {
      absl::MutexLock lock(&mu_);
      auto stop = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return stopping_; };
      if (mu_.AwaitWithTimeout(absl::Condition(&stop), absl::Milliseconds(100))) return;
      state = state_;
      g = gen_;
    }
    if (state == State::kStarting && registry_ != nullptr) {
      FormJoinedGroup();
      continue;
    }
    if (state == State::kRecovering) {
      Recover();
      next_probe = absl::Now() + options_.probe_interval;
      continue;
    }
    if (state != State::kServing || g == nullptr) continue;
    // A step that found a worker gone failed the engine loop: reflect it in health.
    if (absl::Status f = g->loop->failure(); !f.ok()) {
      OnWorkerFailure(f);
      continue;
    }
    if (absl::Now() >= next_probe) {
      next_probe = absl::Now() + options_.probe_interval;
      if (absl::Status s = g->group->Probe(absl::Seconds(5)); !s.ok()) OnWorkerFailure(s);
    }
  }
}

void CoordinatorServer::FillLive(lorcserve::v1::ModelInfoResponse* r) {
  absl::Status failure;
  std::shared_ptr<Generation> g;
  std::string waiting;
  {
    absl::MutexLock lock(&mu_);
    failure = failure_;
    g = gen_;
    waiting = join_waiting_;
  }
  if (g != nullptr) {
    const WorkerGroup& group = *g->group;
    r->set_tensor_parallel_size(group.size());
    r->set_kv_capacity_blocks(group.info().num_blocks);
    r->set_kv_capacity_tokens(static_cast<int64_t>(group.info().num_blocks) * options_.kv.block_size);
    r->set_kv_bytes_per_token(group.info().kv_bytes_per_token);
    r->set_backend(group.info().backend);
    for (const std::string& a : WorkerAddresses()) r->add_workers(a);
  }
  r->set_serving(failure.ok() && g != nullptr && !draining());
  r->set_worker_failure(failure.ok() ? waiting : std::string(failure.message()));
  if (g != nullptr) {
    const LoopStats s = g->loop->stats();
    r->set_kv_free_blocks(s.kv_free_blocks);
    r->set_num_running(s.num_running);
    r->set_num_waiting(s.num_waiting);
    r->set_num_preemptions(s.num_preemptions);
    r->set_kv_policy_max_positions(g->group->info().kv_policy_max_positions);
    r->set_kv_policy_positions(s.kv_policy_positions);
    const PrefixCacheReport& pc = s.prefix_cache;
    auto* p = r->mutable_prefix_cache();
    p->set_enabled(pc.enabled);
    p->set_queries(pc.stats.queries);
    p->set_query_tokens(pc.stats.query_tokens);
    p->set_hit_tokens(pc.stats.hit_tokens);
    p->set_hit_rate(pc.stats.query_tokens > 0
                        ? static_cast<double>(pc.stats.hit_tokens + pc.stats.host_hit_tokens) /
                              static_cast<double>(pc.stats.query_tokens)
                        : 0.0);
    p->set_host_hit_tokens(pc.stats.host_hit_tokens);
    p->set_host_offloads(pc.stats.host_offloads);
    p->set_host_loads(pc.stats.host_loads);
    p->set_evictions(pc.stats.evictions);
    p->set_cached_blocks(pc.cached_blocks);
    p->set_pinned_sessions(pc.sessions);
    p->set_pinned_session_blocks(pc.session_blocks);
    p->set_sessions_expired(pc.sessions_expired);
    p->set_sessions_capped(pc.sessions_capped);
    p->set_sessions_closed(pc.sessions_closed);
    // The workers' host tier (--kv-offloading-size) and the slots the scheduler filled.
    r->set_host_kv_blocks_total(g->group->info().num_host_blocks);
    r->set_host_kv_blocks_used(pc.host_blocks_used);
    auto* st = r->mutable_step_stats();
    const double n = static_cast<double>(std::max<int64_t>(1, s.engine.steps));
    st->set_steps(s.engine.steps);
    st->set_schedule_us_mean(s.engine.schedule_s / n * 1e6);
    st->set_rpc_us_mean((s.engine.run_s - s.engine.worker_compute_s) / n * 1e6);
    st->set_apply_us_mean(s.engine.apply_s / n * 1e6);
    st->set_worker_compute_us_mean(s.engine.worker_compute_s / n * 1e6);
    st->set_worker_idle_us_mean(
        s.engine.worker_idle_s / static_cast<double>(std::max<int64_t>(1, s.engine.pipelined_steps)) * 1e6);
    st->set_pipelined_steps(s.engine.pipelined_steps);
    st->set_wait_us_mean(s.engine.wait_s / n * 1e6);
    st->set_transport(options_.step_stream ? "stream" : "unary");
  }
}

void CoordinatorServer::Wait() {
  absl::MutexLock lock(&mu_);
  auto stop = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return stopping_ || draining_; };
  mu_.Await(absl::Condition(&stop));
}

bool CoordinatorServer::draining() const {
  absl::MutexLock lock(&mu_);
  return draining_;
}

void CoordinatorServer::PublishState(ServingState s) {
  metrics_->SetServingState(draining_ ? ServingState::kDraining : s);
}

void CoordinatorServer::RequestDrain() {
  {
    absl::MutexLock lock(&mu_);
    if (draining_ || stopping_) return;
    draining_ = true;
    PublishState(ServingState::kDraining);
  }
  service_->StartDrain(absl::UnavailableError(
      "draining: the server is shutting down and takes no new requests (retry on another replica)"));
  SetHealth(false);
}

int64_t CoordinatorServer::FinishDrain() {
  const absl::Time deadline = absl::Now() + options_.drain_timeout;
  bool second_signal = false;
  // Polled: the count lives under the service's mutex, the stop flag under ours.
  while (service_->in_flight() > 0 && absl::Now() < deadline) {
    absl::MutexLock lock(&mu_);
    auto stop = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return stopping_; };
    if (mu_.AwaitWithTimeout(absl::Condition(&stop), absl::Milliseconds(20))) {
      second_signal = true;
      break;
    }
  }
  const int64_t left = service_->in_flight();
  if (left == 0) return 0;
  AbortInFlightAndWait(absl::UnavailableError(
      second_signal ? "server shutting down: a second termination signal ended the drain and this request"
                    : absl::StrCat("server shutting down: the drain timeout (",
                                   absl::FormatDuration(options_.drain_timeout),
                                   ") ended this request")));
  return left;
}

void CoordinatorServer::AbortInFlightAndWait(absl::Status why) {
  service_->AbortInFlight(std::move(why));
  // Handlers notice within their 50 ms poll.
  const absl::Time handlers_deadline = absl::Now() + absl::Seconds(5);
  while (service_->in_flight() > 0 && absl::Now() < handlers_deadline) {
    absl::SleepFor(absl::Milliseconds(10));
  }
}

void CoordinatorServer::RequestShutdown() {
  absl::MutexLock lock(&mu_);
  stopping_ = true;
}

void CoordinatorServer::Shutdown() {
  if (torn_down_) return;
  torn_down_ = true;
  RequestShutdown();
  SetLiveness(false);
  if (monitor_.joinable()) monitor_.join();
  // Requests still in flight (no drain: SIGINT, or a stop while serving) end now with a status
  // that says why, instead of running on until gRPC's deadline below cancelled them.
  if (service_ != nullptr && service_->in_flight() > 0) {
    AbortInFlightAndWait(absl::UnavailableError("server shutting down: the server was stopped without a drain"));
  }
  // Every Generate handler has returned: what gRPC still waits for are connections a client keeps
  // open past the GOAWAY (an idle channel), until this deadline closes them. 1 s, not 5: every
  // exit took 4.5 s longer while any client held a channel (a tester), past Kubernetes' grace
  // after a full drain.
  if (server_ != nullptr) server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(1));
  if (internal_server_ != nullptr) {
    internal_server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(1));
  }
  if (service_ != nullptr) service_->SetLoop(nullptr, absl::UnavailableError("shutting down"));
  std::shared_ptr<Generation> g;
  {
    absl::MutexLock lock(&mu_);
    g = std::move(gen_);
  }
  g.reset();  // the loop, then the group (a handler or the supervisor may hold the last ref)
  // Listed and joined workers are free for the next coordinator at once (local ones end with us).
  ReleaseWorkers(WorkerAddresses(), coordinator_id_, absl::Seconds(1));
  // Joins the supervisor: no OnWorkerFailure after this (and it returned at stopping_ anyway).
  local_.reset();
}

CoordinatorServer::~CoordinatorServer() { Shutdown(); }

}  // namespace lorc
