#include "coordinator/worker_group.h"

#include <algorithm>
#include <chrono>
#include <deque>
#include <future>
#include <iostream>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/grpc_status.h"
#include "common/status_macros.h"
#include "grpcpp/grpcpp.h"
#include "step/coordinator_ref.h"
#include "step/protocol.h"
#include "step/step_proto.h"
#include "worker/comm/internal_grpc.h"

namespace lorc {
namespace {

// A KV policy's slot reports of every rank, each for its own KV heads: the slots a sequence needs
// are the most any rank needs; a sequence some rank did not report is dropped (no compaction).
void MergeKvSlots(const std::vector<std::vector<KvSlotReport>>& others, std::vector<KvSlotReport>* rank0) {
  for (const auto& o : others) {
    std::vector<KvSlotReport> kept;
    for (const KvSlotReport& k : *rank0) {
      auto it = std::find_if(o.begin(), o.end(), [&](const KvSlotReport& x) { return x.seq_id == k.seq_id; });
      if (it == o.end() || it->compact_from != k.compact_from ||
          it->num_computed_tokens != k.num_computed_tokens) {
        continue;
      }
      KvSlotReport m = k;
      m.slots_needed = std::max(m.slots_needed, it->slots_needed);
      m.low_in_slots = std::max(m.low_in_slots, it->low_in_slots);
      kept.push_back(m);
    }
    rank0->swap(kept);
  }
}

std::chrono::system_clock::time_point DeadlineIn(absl::Duration d) {
  return std::chrono::system_clock::now() + absl::ToChronoMilliseconds(d);
}

// How often Start looks at WorkerGroupOptions::cancelled while it waits.
constexpr absl::Duration kCancelPoll = absl::Milliseconds(100);

absl::Status CancelledStatus() {
  return absl::CancelledError("cancelled while the workers connected or loaded the model");
}

std::vector<std::unique_ptr<grpc::ClientContext>> NewContexts(int n) {
  std::vector<std::unique_ptr<grpc::ClientContext>> out;
  for (int i = 0; i < n; ++i) out.push_back(std::make_unique<grpc::ClientContext>());
  return out;
}

}  // namespace

template <typename T>
bool WorkerGroup::AwaitCalls(std::vector<std::future<T>>& calls,
                             const std::vector<std::unique_ptr<grpc::ClientContext>>& ctxs) const {
  for (auto& f : calls) {
    while (f.wait_for(absl::ToChronoMilliseconds(kCancelPoll)) != std::future_status::ready) {
      if (Cancelled()) {
        for (const auto& ctx : ctxs) ctx->TryCancel();
        return false;
      }
    }
  }
  return true;
}

void WorkerGroup::NameCoordinator(lorcserve::internal::CoordinatorId* out) const {
  out->set_id(options_.coordinator_id);
  out->set_address(CoordinatorAddress());
  out->set_protocol(WorkerProtocolFingerprint());
}

void WorkerGroup::NameCoordinator(grpc::ClientContext* ctx) const {
  ctx->AddMetadata(kCoordinatorIdMetadata, absl::StrCat(options_.coordinator_id));
  ctx->AddMetadata(kCoordinatorAddressMetadata, CoordinatorAddress());
}

struct WorkerGroup::Worker {
  int rank = 0;
  std::string address;
  // The worker process's PingResponse.instance_id when the group formed (0: not reported): a
  // probe answered with another is a restarted process, without this group's model or requests.
  uint64_t instance_id = 0;
  std::shared_ptr<grpc::Channel> channel;
  std::unique_ptr<lorcserve::internal::Worker::Stub> stub;
  // Stream mode.
  std::unique_ptr<grpc::ClientContext> stream_ctx;
  std::unique_ptr<grpc::ClientReaderWriter<lorcserve::internal::StepPlan, lorcserve::internal::StepResult>> stream;
  std::thread reader;
  absl::Mutex mu;
  absl::CondVar cv;
  std::deque<lorcserve::internal::StepResult> results ABSL_GUARDED_BY(mu);
  bool closed ABSL_GUARDED_BY(mu) = false;
  absl::Status close_status ABSL_GUARDED_BY(mu);

  std::string Name() const { return absl::StrCat("worker ", rank, " (", address, ")"); }
  absl::Status Unavailable(const absl::Status& s) const {
    return absl::UnavailableError(absl::StrCat(Name(), ": ", s.message()));
  }
};

namespace {

// Why `address` cannot be reached, as gRPC sees it (a refused connection, a TLS handshake that
// failed and why): one Ping over a channel of its own (a fresh connection attempt; the group's
// channel may be between attempts and only say "Deadline Exceeded"): " (gRPC: ... ; hint)", or
// "" when that says nothing more.
std::string WhyNotConnected(const std::string& address) {
  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  auto stub = lorcserve::internal::Worker::NewStub(InternalChannel(address, args));
  grpc::ClientContext ctx;
  ctx.set_deadline(DeadlineIn(absl::Seconds(2)));
  lorcserve::internal::PingRequest req;
  lorcserve::internal::PingResponse resp;
  const grpc::Status s = stub->Ping(&ctx, req, &resp);
  if (s.ok() || s.error_message().empty()) return "";
  const std::string& m = s.error_message();
  std::string hint;
  if (absl::StrContains(m, "wrong version number")) {
    hint = "; the worker answers without TLS: do both ends use the same --internal-tls-* flags?";
  } else if (absl::StrContains(m, "Socket closed") || absl::StrContains(m, "reset by peer")) {
    hint = InternalTlsEnabled()
               ? "; the worker closed the connection in the TLS handshake: it may not trust this "
                 "coordinator's certificate (another --internal-tls-ca) or run without TLS; its log "
                 "names the cause"
               : "; the worker may expect TLS (--internal-tls-*)";
  } else if (absl::StrContains(m, "andshake") || absl::StrContains(m, "SSL")) {
    hint = "; check that both ends use the same --internal-tls-ca and that both certificates hold "
           "DNS:lorcserve-internal";
  }
  // A certificate that expired since start fails every new handshake (a restarted worker).
  if (const absl::Status own = InternalCertificateValidNow(); !own.ok()) {
    hint = absl::StrCat("; this coordinator's ", own.message(), ": restart it with a renewed one");
  }
  return absl::StrCat(" (gRPC: ", m, hint, ")");
}

// A failed InitCommunicator / LoadModel, named after its worker. UNIMPLEMENTED (with gRPC's
// empty message) means the address serves something else: said so.
absl::Status SetupCallError(const std::string& worker, const absl::Status& s) {
  if (s.code() == absl::StatusCode::kUnimplemented) {
    return absl::FailedPreconditionError(absl::StrCat(
        worker, ": not a lorcserve worker (the gRPC server there does not serve lorcserve.internal.Worker",
        s.message().empty() ? "" : absl::StrCat(": ", s.message()), ")"));
  }
  return absl::Status(s.code(), absl::StrCat(worker, ": ", s.message()));
}

// A Ping before the setup calls (5 s at most); false when it failed.
bool PingForSetup(lorcserve::internal::Worker::Stub& stub, lorcserve::internal::PingResponse* resp) {
  grpc::ClientContext ctx;
  ctx.set_deadline(DeadlineIn(absl::Seconds(5)));
  lorcserve::internal::PingRequest req;
  return stub.Ping(&ctx, req, resp).ok();
}

}  // namespace

void ReleaseWorkers(const std::vector<std::string>& addresses, uint64_t coordinator_id,
                    absl::Duration timeout) {
  std::vector<std::future<void>> calls;
  for (const std::string& address : addresses) {
    if (address.empty()) continue;
    calls.push_back(std::async(std::launch::async, [address, coordinator_id, timeout] {
      auto stub = lorcserve::internal::Worker::NewStub(InternalChannel(address, grpc::ChannelArguments()));
      grpc::ClientContext ctx;
      ctx.set_deadline(DeadlineIn(timeout));
      lorcserve::internal::PingRequest req;
      req.mutable_coordinator()->set_id(coordinator_id);
      req.set_release(true);
      lorcserve::internal::PingResponse resp;
      stub->Ping(&ctx, req, &resp);  // best effort: a worker that is gone needs no release
    }));
  }
  for (auto& c : calls) c.wait();
}

WorkerGroup::WorkerGroup(const WorkerGroupOptions& options) : options_(options) {
  if (options_.coordinator_id == 0) options_.coordinator_id = NewCoordinatorId();
}

absl::StatusOr<std::unique_ptr<WorkerGroup>> WorkerGroup::Start(const WorkerGroupOptions& options) {
  if (options.addresses.empty()) return absl::InvalidArgumentError("no worker addresses");
  std::unique_ptr<WorkerGroup> g(new WorkerGroup(options));
  RETURN_IF_ERROR(g->Connect());
  if (options.use_stream) RETURN_IF_ERROR(g->OpenStreams());
  return g;
}

WorkerGroup::~WorkerGroup() {
  for (auto& w : workers_) {
    if (w->stream != nullptr) {
      w->stream->WritesDone();
      w->stream_ctx->TryCancel();
    }
    if (w->reader.joinable()) w->reader.join();
  }
}

absl::Status WorkerGroup::Connect() {
  const int n = static_cast<int>(options_.addresses.size());
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(256 << 20);
  args.SetMaxSendMessageSize(256 << 20);
  for (int r = 0; r < n; ++r) {
    auto w = std::make_unique<Worker>();
    w->rank = r;
    w->address = options_.addresses[r];
    w->channel = InternalChannel(w->address, args);
    w->stub = lorcserve::internal::Worker::NewStub(w->channel);
    workers_.push_back(std::move(w));
  }
  const absl::Time connect_deadline = absl::Now() + options_.connect_timeout;
  for (auto& w : workers_) {
    // In slices, so that a cancellation is seen within one.
    for (;;) {
      if (Cancelled()) return CancelledStatus();
      const absl::Time slice = std::min(connect_deadline, absl::Now() + kCancelPoll);
      if (w->channel->WaitForConnected(absl::ToChronoTime(slice))) break;
      if (absl::Now() >= connect_deadline) {
        return absl::UnavailableError(absl::StrCat(w->Name(), ": not reachable within ",
                                                   absl::FormatDuration(options_.connect_timeout),
                                                   WhyNotConnected(w->address)));
      }
    }
  }
  // One Ping a worker before the setup calls: its process (Probe tells a restart by it), one
  // worker under two names (127.0.0.1:P and localhost:P would take two ranks: its second
  // InitCommunicator waits behind the first, which waits for the second: the join timeout), and
  // an owner to wait for (options_.owner_wait).
  const absl::Time owner_until = absl::Now() + options_.owner_wait;
  absl::flat_hash_map<uint64_t, int> rank_of_instance;
  for (auto& w : workers_) {
    lorcserve::internal::PingResponse resp;
    if (!PingForSetup(*w->stub, &resp)) continue;  // the setup calls say why
    if (resp.instance_id() != 0) {
      w->instance_id = resp.instance_id();
      auto [it, inserted] = rank_of_instance.emplace(resp.instance_id(), w->rank);
      if (!inserted) {
        return absl::InvalidArgumentError(absl::StrCat(
            "--workers: '", workers_[it->second]->address, "' and '", w->address,
            "' are the same worker process (one worker per rank)"));
      }
    }
    RETURN_IF_ERROR(AwaitUnowned(*w, resp, owner_until));
  }
  // Join the tensor-parallel group: every rank blocks in InitCommunicator until all arrived.
  const std::string group = absl::StrCat("tp-", absl::ToUnixNanos(absl::Now()));
  if (n > 1) {
    std::vector<std::unique_ptr<grpc::ClientContext>> ctxs = NewContexts(n);
    std::vector<std::future<absl::Status>> joins;
    for (auto& w : workers_) {
      joins.push_back(std::async(std::launch::async, [&, wp = w.get()]() -> absl::Status {
        grpc::ClientContext& ctx = *ctxs[wp->rank];
        ctx.set_deadline(DeadlineIn(options_.join_timeout + absl::Seconds(30)));
        lorcserve::internal::InitCommunicatorRequest req;
        req.set_rendezvous_address(options_.rendezvous_address);
        req.set_group(group);
        req.set_rank(wp->rank);
        req.set_world_size(n);
        req.set_timeout_ms(absl::ToInt64Milliseconds(options_.join_timeout));
        req.set_bind_address(options_.bind_address);
        req.set_disable_custom_all_reduce(options_.disable_custom_all_reduce);
        NameCoordinator(req.mutable_coordinator());
        lorcserve::internal::InitCommunicatorResponse resp;
        const absl::Status s = FromGrpcStatus(wp->stub->InitCommunicator(&ctx, req, &resp));
        if (!s.ok()) return SetupCallError(wp->Name(), s);
        RETURN_IF_ERROR(CheckPeerProtocol(resp.protocol(), wp->Name(), "this coordinator"));
        if (wp->rank == 0) info_.all_reduce = resp.all_reduce();  // only rank 0's task writes it
        return s;
      }));
    }
    // A rank refused (owned by another coordinator, a bad request) fails the join at once: the
    // other ranks would otherwise wait out the join timeout for it, and the message would name
    // the wait instead of the refusal.
    absl::Status refused;
    bool cancelled = false;
    std::vector<bool> seen(joins.size(), false);
    for (size_t done = 0; done < joins.size();) {
      for (size_t r = 0; r < joins.size() && refused.ok(); ++r) {
        if (seen[r] || joins[r].wait_for(std::chrono::seconds(0)) != std::future_status::ready) continue;
        seen[r] = true;
        ++done;
        refused = joins[r].get();
      }
      if (done == joins.size() || !refused.ok()) break;
      if (Cancelled()) {
        cancelled = true;
        break;
      }
      absl::SleepFor(absl::Milliseconds(10));
    }
    if (!refused.ok() || cancelled) {
      for (const auto& ctx : ctxs) ctx->TryCancel();
    }
    for (auto& f : joins) {
      if (f.valid()) f.wait();  // each ends promptly once cancelled
    }
    if (cancelled) return CancelledStatus();
    RETURN_IF_ERROR(refused);
  }
  if (Cancelled()) return CancelledStatus();
  std::vector<std::unique_ptr<grpc::ClientContext>> ctxs = NewContexts(n);
  std::vector<std::future<absl::StatusOr<lorcserve::internal::LoadModelResponse>>> loads;
  for (auto& w : workers_) {
    loads.push_back(std::async(std::launch::async, [&, wp = w.get()]()
                                   -> absl::StatusOr<lorcserve::internal::LoadModelResponse> {
      grpc::ClientContext& ctx = *ctxs[wp->rank];
      ctx.set_deadline(DeadlineIn(options_.load_timeout));
      lorcserve::internal::LoadModelRequest req;
      req.set_model_dir(options_.model.dir);
      req.set_random_weights(options_.model.random_weights);
      req.set_weights_seed(options_.model.seed);
      if (options_.model.shard_lm_head.has_value()) req.set_shard_lm_head(*options_.model.shard_lm_head);
      req.set_tp_rank(wp->rank);
      req.set_tp_size(n);
      req.set_block_size(options_.kv.block_size);
      req.set_num_blocks(options_.kv.num_blocks);
      req.set_kv_cache_bytes(options_.kv.memory_bytes);
      NameCoordinator(req.mutable_coordinator());
      req.set_max_num_seqs(options_.kv.max_num_seqs);
      req.set_max_num_batched_tokens(options_.kv.max_num_batched_tokens);
      req.set_max_model_len(options_.kv.max_model_len);
      req.set_gpu_memory_utilization(options_.kv.gpu_memory_utilization);
      req.set_enforce_eager(options_.kv.enforce_eager);
      req.set_kv_cache_dtype(KvCacheDtypeName(options_.kv.kv_cache_dtype));
      req.set_kv_offloading_bytes(options_.kv.kv_offloading_bytes);
      if (options_.kv.kv_policy.enabled()) KvPolicyToProto(options_.kv.kv_policy, req.mutable_kv_policy());
      lorcserve::internal::LoadModelResponse resp;
      const absl::Status s = FromGrpcStatus(wp->stub->LoadModel(&ctx, req, &resp));
      if (!s.ok()) return SetupCallError(wp->Name(), s);
      RETURN_IF_ERROR(CheckPeerProtocol(resp.protocol(), wp->Name(), "this coordinator"));
      return resp;
    }));
  }
  if (!AwaitCalls(loads, ctxs)) {
    for (auto& f : loads) f.wait();  // each ends promptly once its call is cancelled
    return CancelledStatus();
  }
  absl::Status first;
  for (size_t r = 0; r < loads.size(); ++r) {
    absl::StatusOr<lorcserve::internal::LoadModelResponse> resp = loads[r].get();
    if (!resp.ok()) {
      first.Update(resp.status());
      continue;
    }
    info_.num_blocks = r == 0 ? resp->num_blocks() : std::min(info_.num_blocks, resp->num_blocks());
    // Every rank gets the same share of the same block bytes, so the counts agree; a plan may
    // only name slots every rank has.
    if (r > 0 && resp->num_host_blocks() != info_.num_host_blocks) {
      std::cerr << "lorcserve coordinator: host KV tier: rank " << r << " has "
                << resp->num_host_blocks() << " slots, rank 0 " << info_.num_host_blocks
                << "; using the smaller\n";
    }
    info_.num_host_blocks =
        r == 0 ? resp->num_host_blocks() : std::min(info_.num_host_blocks, resp->num_host_blocks());
    info_.kv_bytes_per_token = resp->kv_bytes_per_token();
    // 0 means no limit: the smallest of the limits the ranks set.
    const int64_t positions = resp->kv_policy_max_positions();
    if (positions > 0 && (info_.kv_policy_max_positions == 0 || positions < info_.kv_policy_max_positions)) {
      info_.kv_policy_max_positions = positions;
    }
    info_.backend = resp->backend();
    info_.device = resp->device();
    info_.load_seconds = std::max(info_.load_seconds, resp->load_seconds());
  }
  return first;
}

absl::Status WorkerGroup::OpenStreams() {
  for (auto& w : workers_) {
    w->stream_ctx = std::make_unique<grpc::ClientContext>();
    NameCoordinator(w->stream_ctx.get());
    w->stream = w->stub->Steps(w->stream_ctx.get());
    w->reader = std::thread([wp = w.get()] {
      lorcserve::internal::StepResult r;
      while (wp->stream->Read(&r)) {
        absl::MutexLock lock(&wp->mu);
        wp->results.push_back(r);
        wp->cv.Signal();
      }
      const absl::Status s = FromGrpcStatus(wp->stream->Finish());
      absl::MutexLock lock(&wp->mu);
      wp->closed = true;
      wp->close_status = s.ok() ? absl::UnavailableError("step stream closed") : s;
      wp->cv.SignalAll();
    });
  }
  return absl::OkStatus();
}

void WorkerGroup::MarkBroken(const absl::Status& s) {
  absl::MutexLock lock(&mu_);
  if (broken_.ok()) broken_ = s;
}

void WorkerGroup::Fail(const absl::Status& why) {
  MarkBroken(why);
  for (auto& w : workers_) {
    if (w->stream_ctx != nullptr) w->stream_ctx->TryCancel();
  }
}

absl::Status WorkerGroup::health() const {
  absl::MutexLock lock(&mu_);
  return broken_;
}

absl::Status WorkerGroup::AwaitUnowned(Worker& w, const lorcserve::internal::PingResponse& first,
                                       absl::Time until) {
  lorcserve::internal::PingResponse resp = first;
  for (bool said = false;;) {
    const uint64_t owner = resp.has_owner() ? resp.owner().id() : 0;
    if (owner == 0 || owner == options_.coordinator_id || absl::Now() >= until) return absl::OkStatus();
    if (!said) {
      std::cerr << absl::StrCat("lorcserve coordinator: ", w.Name(), " still serves ",
                                DescribeCoordinator({owner, resp.owner().address()}), "; waiting up to ",
                                absl::FormatDuration(until - absl::Now()),
                                " for it to be released (the worker's --owner-lease-s frees it from one that "
                                "died)\n");
      said = true;
    }
    absl::SleepFor(absl::Milliseconds(250));
    if (Cancelled()) return CancelledStatus();
    if (!PingForSetup(*w.stub, &resp)) return absl::OkStatus();  // the setup calls say why
  }
}

absl::Status WorkerGroup::Probe(absl::Duration timeout) {
  RETURN_IF_ERROR(health());
  for (auto& w : workers_) {
    // A step stream the worker ended (its process died) fails the group now, not at the next
    // step: a worker restarted at once on the same address answers the ping below (a tester saw
    // SERVING for 30 s, then the next request failed).
    absl::Status closed;
    {
      absl::MutexLock lock(&w->mu);
      if (w->closed) closed = w->close_status;
    }
    if (!closed.ok()) {
      Fail(w->Unavailable(closed));
      return health();
    }
  }
  for (auto& w : workers_) {
    grpc::ClientContext ctx;
    ctx.set_deadline(DeadlineIn(timeout));
    lorcserve::internal::PingRequest req;
    NameCoordinator(req.mutable_coordinator());
    lorcserve::internal::PingResponse resp;
    const absl::Status s = FromGrpcStatus(w->stub->Ping(&ctx, req, &resp));
    if (!s.ok()) {
      Fail(w->Unavailable(absl::UnavailableError(
          s.code() == absl::StatusCode::kDeadlineExceeded
              ? absl::StrCat("no answer to a health probe within ", absl::FormatDuration(timeout), " (",
                             s.message(), ")")
              : absl::StrCat("health probe failed (", s.message(), ")"))));
      return health();
    }
    // A worker that serves another coordinator now has given this one up (its lease ran out while
    // this process was stopped): Ping answers anyone, so the owner it names is the test. Only
    // another owner counts: none may be a lease between unary steps, which the next call renews.
    if (options_.coordinator_id != 0 && resp.has_owner() && resp.owner().id() != 0 &&
        resp.owner().id() != options_.coordinator_id) {
      Fail(w->Unavailable(absl::UnavailableError(absl::StrCat(
          "health probe: the worker serves ",
          DescribeCoordinator({resp.owner().id(), resp.owner().address()}), " now (it gave this one up)"))));
      return health();
    }
    if (w->instance_id != 0 && resp.instance_id() != 0 && resp.instance_id() != w->instance_id) {
      Fail(w->Unavailable(absl::UnavailableError(absl::StrFormat(
          "health probe: another worker process answers there now (instance %016x, was %016x: it "
          "restarted, without this group's model and requests)",
          resp.instance_id(), w->instance_id))));
      return health();
    }
  }
  return absl::OkStatus();
}

absl::Status WorkerGroup::Submit(const StepPlan& plan) {
  RETURN_IF_ERROR(health());
  if (in_flight_.size() >= static_cast<size_t>(max_in_flight())) {
    return absl::FailedPreconditionError(
        absl::StrCat("step ", plan.step_id, ": ", in_flight_.size(), " steps already in flight"));
  }
  StepPlanToProto(plan, &plan_msg_);
  in_flight_.push_back(plan.step_id);
  if (!options_.use_stream) {
    unary_results_.push_back(RunUnary());
    return absl::OkStatus();
  }
  for (auto& w : workers_) {
    if (!w->stream->Write(plan_msg_)) {
      const absl::Status s = w->Unavailable(absl::UnavailableError("step stream closed"));
      MarkBroken(s);
      return s;
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<StepResult> WorkerGroup::Await() {
  if (in_flight_.empty()) return absl::FailedPreconditionError("no step in flight");
  const uint64_t step_id = in_flight_.front();
  in_flight_.pop_front();
  absl::StatusOr<StepResult> r;
  if (options_.use_stream) {
    r = AwaitStream(step_id);
  } else {
    r = std::move(unary_results_.front());
    unary_results_.pop_front();
  }
  if (!r.ok() && r.status().code() == absl::StatusCode::kUnavailable) MarkBroken(r.status());
  return r;
}

absl::StatusOr<StepResult> WorkerGroup::AwaitStream(uint64_t step_id) {
  RETURN_IF_ERROR(health());
  const absl::Time deadline = absl::Now() + options_.step_timeout;
  absl::StatusOr<StepResult> rank0 = absl::InternalError("no result");
  std::vector<std::vector<KvSlotReport>> others;  // ranks 1.. (kv_slots)
  for (auto& w : workers_) {
    absl::ReleasableMutexLock lock(&w->mu);
    while (w->results.empty() && !w->closed) {
      if (w->cv.WaitWithDeadline(&w->mu, deadline)) break;
    }
    if (w->results.empty()) {
      if (absl::Status h = health(); !h.ok()) return h;  // failed from outside meanwhile
      if (!w->closed) {
        w->stream_ctx->TryCancel();
        return w->Unavailable(absl::DeadlineExceededError(
            absl::StrCat("no result for step ", step_id, " within ",
                         absl::FormatDuration(options_.step_timeout))));
      }
      const absl::Status why = w->close_status;
      const int rank = w->rank;
      lock.Release();
      return RootCause(rank, why);
    }
    lorcserve::internal::StepResult res = std::move(w->results.front());
    w->results.pop_front();
    if (res.step_id() != step_id) {
      return w->Unavailable(absl::InternalError(
          absl::StrCat("result for step ", res.step_id(), " while awaiting step ", step_id)));
    }
    if (w->rank == 0) {
      rank0 = StepResultFromProto(res);
    } else {
      std::vector<KvSlotReport>& o = others.emplace_back();
      for (const auto& k : res.kv_slots()) o.push_back(KvSlotReportFromProto(k));
    }
  }
  if (rank0.ok()) MergeKvSlots(others, &rank0->kv_slots);
  return rank0;
}

absl::Status WorkerGroup::RootCause(int rank, const absl::Status& why) {
  // A worker that dies makes its peers' collectives fail too, and a peer's step stream may end
  // (with the collective's error) before anything is heard of the dead one. Name the worker that
  // went away: the supervisor's report (local workers) if it comes within a moment, else the
  // first other worker that no longer answers a ping; else the failure is `rank`'s own.
  const absl::Time until = absl::Now() + absl::Milliseconds(100);
  while (absl::Now() < until) {
    if (absl::Status h = health(); !h.ok()) return h;
    absl::SleepFor(absl::Milliseconds(5));
  }
  for (auto& w : workers_) {
    if (w->rank == rank) continue;
    grpc::ClientContext ctx;
    ctx.set_deadline(DeadlineIn(absl::Milliseconds(300)));
    lorcserve::internal::PingRequest req;
    NameCoordinator(req.mutable_coordinator());
    lorcserve::internal::PingResponse resp;
    const absl::Status s = FromGrpcStatus(w->stub->Ping(&ctx, req, &resp));
    if (!s.ok()) {
      return w->Unavailable(absl::UnavailableError(absl::StrCat(
          "does not answer (", s.message(), ") after worker ", rank, "'s step failed: ",
          why.message())));
    }
  }
  if (absl::Status h = health(); !h.ok()) return h;
  return workers_[rank]->Unavailable(why);
}

absl::StatusOr<StepResult> WorkerGroup::RunUnary() {
  std::vector<std::future<absl::StatusOr<StepResult>>> calls;
  for (auto& w : workers_) {
    calls.push_back(std::async(std::launch::async, [&, wp = w.get()]() -> absl::StatusOr<StepResult> {
      grpc::ClientContext ctx;
      ctx.set_deadline(DeadlineIn(options_.step_timeout));
      NameCoordinator(&ctx);
      lorcserve::internal::StepResult res;
      const absl::Status s = FromGrpcStatus(wp->stub->Step(&ctx, plan_msg_, &res));
      if (!s.ok()) return wp->Unavailable(s);
      return StepResultFromProto(res);
    }));
  }
  absl::StatusOr<StepResult> rank0 = absl::InternalError("no result");
  std::vector<std::vector<KvSlotReport>> others;
  absl::Status failure;
  for (size_t r = 0; r < calls.size(); ++r) {
    absl::StatusOr<StepResult> res = calls[r].get();
    if (!res.ok()) {
      failure.Update(res.status());
    } else if (r == 0) {
      rank0 = std::move(res);
    } else {
      others.push_back(std::move(res->kv_slots));
    }
  }
  RETURN_IF_ERROR(failure);
  MergeKvSlots(others, &rank0->kv_slots);
  return rank0;
}

}  // namespace lorc
