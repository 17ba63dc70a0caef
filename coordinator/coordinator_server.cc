#include "coordinator/coordinator_server.h"

#include <unistd.h>

#include <filesystem>
#include <iostream>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/status_macros.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/health_check_service_interface.h"

namespace lorc {
namespace {

constexpr char kServiceName[] = "lorcserve.v1.LorcServe";

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

}  // namespace

absl::StatusOr<std::unique_ptr<CoordinatorServer>> CoordinatorServer::Start(const CoordinatorOptions& options) {
  std::unique_ptr<CoordinatorServer> s(new CoordinatorServer());
  s->options_ = options;
  ASSIGN_OR_RETURN(s->config_, LoadModelConfig(options.model.dir));
  if (std::filesystem::exists(std::filesystem::path(options.model.dir) / "tokenizer.json")) {
    ASSIGN_OR_RETURN(s->tokenizer_, Tokenizer::FromModelDir(options.model.dir));
  }
  RETURN_IF_ERROR(s->StartServer());
  if (absl::Status st = s->StartWorkers(); !st.ok()) {
    s->Shutdown();
    return st;
  }
  s->monitor_ = std::thread([p = s.get()] { p->Monitor(); });
  return s;
}

std::string CoordinatorServer::address() const {
  return absl::StrCat(SplitHostPort(options_.listen).first, ":", port_);
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
  info.set_kv_compression("none");
  service_ = std::make_unique<LorcServeService>(
      config_, tokenizer_.get(), info, [this](lorcserve::v1::ModelInfoResponse* r) { FillLive(r); });

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  builder.AddListeningPort(options_.listen, grpc::InsecureServerCredentials(), &port_);
  builder.SetMaxReceiveMessageSize(64 << 20);
  builder.RegisterService(service_.get());
  builder.RegisterService(&rendezvous_);
  server_ = builder.BuildAndStart();
  if (server_ == nullptr || port_ == 0) {
    return absl::UnavailableError(absl::StrCat("cannot listen on ", options_.listen));
  }
  server_->GetHealthCheckService()->SetServingStatus("", false);
  server_->GetHealthCheckService()->SetServingStatus(kServiceName, false);
  return absl::OkStatus();
}

absl::Status CoordinatorServer::StartWorkers() {
  std::vector<std::string> addresses = options_.worker_addresses;
  std::string rendezvous = options_.advertise_address;
  const auto [host, unused_port] = SplitHostPort(options_.listen);
  const bool wildcard = host.empty() || host == "0.0.0.0" || host == "[::]" || host == "::";
  if (addresses.empty()) {
    ASSIGN_OR_RETURN(local_, LocalWorkers::Start(options_.local_workers,
                                                 [this](int rank, pid_t pid, const std::string& how) {
                                                   OnWorkerFailure(absl::UnavailableError(absl::StrCat(
                                                       "worker ", rank, " (pid ", pid, ") ", how)));
                                                 }));
    addresses = local_->addresses();
    if (rendezvous.empty()) rendezvous = absl::StrCat(wildcard ? "127.0.0.1" : host, ":", port_);
  } else if (rendezvous.empty()) {
    rendezvous = absl::StrCat(wildcard ? Hostname() : host, ":", port_);
  }
  WorkerGroupOptions wg;
  wg.addresses = addresses;
  wg.rendezvous_address = rendezvous;
  wg.bind_address = "";  // each worker binds its own --comm-address
  wg.model = options_.model;
  wg.kv = options_.kv;
  wg.use_stream = options_.step_stream;
  wg.step_timeout = options_.step_timeout;
  wg.join_timeout = options_.join_timeout;
  ASSIGN_OR_RETURN(group_, WorkerGroup::Start(wg));

  KvCacheSpec kv;
  kv.block_size = options_.kv.block_size;
  kv.num_blocks = group_->info().num_blocks;
  ASSIGN_OR_RETURN(std::unique_ptr<Engine> engine,
                   Engine::Create(group_.get(), config_, kv, tokenizer_.get(), options_.engine));
  loop_ = std::make_unique<EngineLoop>(std::move(engine));
  ready_.store(true, std::memory_order_release);
  {
    // After ready_: a failure from now on reaches group_ and loop_ through OnWorkerFailure.
    absl::MutexLock lock(&mu_);
    if (!failure_.ok()) return failure_;  // a worker died while loading
  }
  service_->SetLoop(loop_.get());
  server_->GetHealthCheckService()->SetServingStatus("", true);
  server_->GetHealthCheckService()->SetServingStatus(kServiceName, true);
  return absl::OkStatus();
}

void CoordinatorServer::OnWorkerFailure(const absl::Status& why) {
  {
    absl::MutexLock lock(&mu_);
    if (stopping_ || !failure_.ok()) return;
    failure_ = why;
  }
  std::cerr << "lorcserve coordinator: " << why.message() << "; health is NOT_SERVING\n";
  // Before ready_, StartWorkers sees failure_ itself.
  if (ready_.load(std::memory_order_acquire)) {
    group_->Fail(why);
    loop_->Fail(why);
  }
  if (server_ != nullptr) {
    server_->GetHealthCheckService()->SetServingStatus("", false);
    server_->GetHealthCheckService()->SetServingStatus(kServiceName, false);
  }
}

void CoordinatorServer::Monitor() {
  absl::Time next_probe = absl::Now() + options_.probe_interval;
  for (;;) {
    {
      absl::MutexLock lock(&mu_);
      auto stop = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return stopping_; };
      if (mu_.AwaitWithTimeout(absl::Condition(&stop), absl::Milliseconds(100))) return;
      if (!failure_.ok()) continue;
    }
    // A step that found a worker gone failed the engine loop: reflect it in health.
    if (absl::Status f = loop_->failure(); !f.ok()) {
      OnWorkerFailure(f);
      continue;
    }
    if (absl::Now() >= next_probe) {
      next_probe = absl::Now() + options_.probe_interval;
      if (absl::Status s = group_->Probe(absl::Seconds(5)); !s.ok()) OnWorkerFailure(s);
    }
  }
}

void CoordinatorServer::FillLive(lorcserve::v1::ModelInfoResponse* r) {
  absl::Status failure;
  {
    absl::MutexLock lock(&mu_);
    failure = failure_;
  }
  const bool ready = ready_.load(std::memory_order_acquire);
  if (ready) {
    r->set_tensor_parallel_size(group_->size());
    r->set_kv_capacity_blocks(group_->info().num_blocks);
    r->set_kv_capacity_tokens(static_cast<int64_t>(group_->info().num_blocks) * options_.kv.block_size);
    r->set_kv_bytes_per_token(group_->info().kv_bytes_per_token);
    r->set_backend(group_->info().backend);
  }
  if (ready) {
    for (const std::string& a : local_ != nullptr ? local_->addresses() : options_.worker_addresses) {
      r->add_workers(a);
    }
  }
  r->set_serving(failure.ok() && ready);
  r->set_worker_failure(std::string(failure.message()));
  if (ready) {
    const LoopStats s = loop_->stats();
    r->set_kv_free_blocks(s.kv_free_blocks);
    r->set_num_running(s.num_running);
    r->set_num_waiting(s.num_waiting);
    auto* st = r->mutable_step_stats();
    const double n = static_cast<double>(std::max<int64_t>(1, s.engine.steps));
    st->set_steps(s.engine.steps);
    st->set_schedule_us_mean(s.engine.schedule_s / n * 1e6);
    st->set_rpc_us_mean((s.engine.run_s - s.engine.worker_compute_s) / n * 1e6);
    st->set_apply_us_mean(s.engine.apply_s / n * 1e6);
    st->set_worker_compute_us_mean(s.engine.worker_compute_s / n * 1e6);
    st->set_transport(options_.step_stream ? "stream" : "unary");
  }
}

void CoordinatorServer::Wait() {
  absl::MutexLock lock(&mu_);
  auto stop = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return stopping_; };
  mu_.Await(absl::Condition(&stop));
}

void CoordinatorServer::RequestShutdown() {
  absl::MutexLock lock(&mu_);
  stopping_ = true;
}

void CoordinatorServer::Shutdown() {
  if (torn_down_) return;
  torn_down_ = true;
  RequestShutdown();
  if (monitor_.joinable()) monitor_.join();
  if (server_ != nullptr) server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
  if (service_ != nullptr) service_->SetLoop(nullptr);
  loop_.reset();
  group_.reset();
  local_.reset();
}

CoordinatorServer::~CoordinatorServer() { Shutdown(); }

}  // namespace lorc
