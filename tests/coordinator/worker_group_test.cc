// WorkerGroup against in-process fake workers (lorcserve.internal.Worker services on loopback):
// the step pipeline (a second plan reaches the worker before the first result is awaited),
// rank 0's result, per-request failures, and the failures that break the group; cancelling
// Start's wait for the workers (WorkerGroupOptions::cancelled).
#include "coordinator/worker_group.h"
#include "worker/comm/grpc_rendezvous.h"

#include <atomic>
#include <chrono>
#include <future>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "gmock/gmock.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "step/protocol.h"
#include "step/step_proto.h"
#include "tests/testing/status_matchers.h"

namespace lorc {
namespace {

using ::lorc::testing::StatusIs;
using ::testing::AllOf;
using ::testing::HasSubstr;
namespace internal = ::lorcserve::internal;

// A worker that loads nothing and answers each plan with one token per sampling request (the
// token is the step id). Its first step blocks until the second plan has arrived, so a group
// that waited for each result before sending the next plan would deadlock (and time out).
class FakeWorker final : public internal::Worker::Service {
 public:
  grpc::Status LoadModel(grpc::ServerContext*, const internal::LoadModelRequest* req,
                         internal::LoadModelResponse* resp) override {
    resp->set_num_blocks(100);
    resp->set_kv_bytes_per_token(64);
    resp->set_backend("fake");
    absl::MutexLock lock(&mu_);
    resp->set_protocol(protocol_);
    coordinator_protocol_ = req->coordinator().protocol();
    return grpc::Status::OK;
  }
  grpc::Status InitCommunicator(grpc::ServerContext*, const internal::InitCommunicatorRequest* req,
                                internal::InitCommunicatorResponse* resp) override {
    resp->set_backend("fake");
    resp->set_all_reduce(absl::StrCat("fake rank ", req->rank(), " disable_custom_all_reduce=",
                                      req->disable_custom_all_reduce()));
    absl::MutexLock lock(&mu_);
    resp->set_protocol(protocol_);
    ++init_calls_;
    last_disable_custom_all_reduce_ = req->disable_custom_all_reduce();
    return grpc::Status::OK;
  }
  int init_calls() {
    absl::MutexLock lock(&mu_);
    return init_calls_;
  }
  bool last_disable_custom_all_reduce() {
    absl::MutexLock lock(&mu_);
    return last_disable_custom_all_reduce_;
  }
  grpc::Status Ping(grpc::ServerContext*, const internal::PingRequest* req,
                    internal::PingResponse* resp) override {
    resp->set_model_loaded(true);
    {
      absl::MutexLock lock(&mu_);
      resp->set_instance_id(instance_id_);
    }
    {
      absl::MutexLock lock(&mu_);
      if (owner_ != 0) {
        resp->mutable_owner()->set_id(owner_);
        resp->mutable_owner()->set_address("10.0.0.9:7000");
      }
    }
    if (req->release()) {
      absl::MutexLock lock(&mu_);
      released_by_ = req->coordinator().id();
    }
    return grpc::Status::OK;
  }
  uint64_t released_by() {
    absl::MutexLock lock(&mu_);
    return released_by_;
  }
  void set_owner(uint64_t id) {
    absl::MutexLock lock(&mu_);
    owner_ = id;
  }
  grpc::Status Steps(grpc::ServerContext*,
                     grpc::ServerReaderWriter<internal::StepResult, internal::StepPlan>* stream) override {
    internal::StepPlan plan;
    std::vector<internal::StepPlan> queued;
    while (stream->Read(&plan)) {
      {
        absl::MutexLock lock(&mu_);
        ++plans_received_;
      }
      if (plan.step_id() == 1 && pipeline_) {
        // Hold step 1's result until plan 2 is here.
        queued.push_back(plan);
        continue;
      }
      queued.push_back(plan);
      for (const internal::StepPlan& p : queued) {
        if (fail_stream_at_ == p.step_id()) {
          return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION, "step 7 after step 5");
        }
        if (!stream->Write(Answer(p))) return grpc::Status::OK;
      }
      queued.clear();
    }
    return grpc::Status::OK;
  }

  static internal::StepResult Answer(const internal::StepPlan& p) {
    StepResult r;
    r.step_id = p.step_id() + (p.step_id() == 99 ? 1 : 0);  // 99: a result for the wrong step
    for (const auto& s : p.seqs()) {
      if (s.seq_id() == 666) {
        r.failed.push_back({666, absl::InvalidArgumentError("token id 5000 outside the vocabulary")});
      } else if (s.sample()) {
        r.sampled.push_back({s.seq_id(), static_cast<int32_t>(p.step_id())});
      }
    }
    internal::StepResult out;
    StepResultToProto(r, &out);
    return out;
  }

  std::string coordinator_protocol() {
    absl::MutexLock lock(&mu_);
    return coordinator_protocol_;
  }
  void set_protocol(std::string p) {
    absl::MutexLock lock(&mu_);
    protocol_ = std::move(p);
  }

  bool pipeline_ = true;
  uint64_t fail_stream_at_ = 0;
  void set_instance_id(uint64_t id) {
    absl::MutexLock lock(&mu_);
    instance_id_ = id;
  }
  uint64_t instance_id_ ABSL_GUARDED_BY(mu_) = 0;  // 0: not reported (an older worker)
  absl::Mutex mu_;
  int plans_received_ ABSL_GUARDED_BY(mu_) = 0;
  int init_calls_ ABSL_GUARDED_BY(mu_) = 0;
  bool last_disable_custom_all_reduce_ ABSL_GUARDED_BY(mu_) = false;
  uint64_t released_by_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t owner_ ABSL_GUARDED_BY(mu_) = 0;  // Ping's owner; 0: none named
  std::string protocol_ ABSL_GUARDED_BY(mu_) = WorkerProtocolFingerprint();  // what the responses report
  std::string coordinator_protocol_ ABSL_GUARDED_BY(mu_);  // the last LoadModel's CoordinatorId.protocol
};

class WorkerGroupTest : public ::testing::Test {
 protected:
  void StartServer() {
    grpc::ServerBuilder b;
    b.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port_);
    b.RegisterService(&worker_);
    server_ = b.BuildAndStart();
    ASSERT_NE(server_, nullptr);
  }
  std::unique_ptr<WorkerGroup> Group(absl::Duration step_timeout = absl::Seconds(20)) {
    WorkerGroupOptions o;
    o.addresses = {"127.0.0.1:" + std::to_string(port_)};
    o.step_timeout = step_timeout;
    auto g = WorkerGroup::Start(o);
    EXPECT_OK(g);
    return g.ok() ? *std::move(g) : nullptr;
  }
  static StepPlan Plan(uint64_t id, std::vector<int64_t> sampling) {
    StepPlan p;
    p.step_id = id;
    for (int64_t s : sampling) {
      ScheduledSequence q;
      q.seq_id = s;
      q.num_scheduled_tokens = 1;
      q.sample = true;
      p.seqs.push_back(q);
    }
    return p;
  }
  void TearDown() override {
    if (server_ != nullptr) server_->Shutdown();
  }

  FakeWorker worker_;
  int port_ = 0;
  std::unique_ptr<grpc::Server> server_;
};

TEST_F(WorkerGroupTest, TwoPlansAreInFlightBeforeTheFirstResultIsAwaited) {
  StartServer();
  auto g = Group();
  ASSERT_NE(g, nullptr);
  EXPECT_EQ(g->max_in_flight(), 2);
  EXPECT_EQ(g->info().num_blocks, 100);
  ASSERT_OK(g->Submit(Plan(1, {10, 11})));
  ASSERT_OK(g->Submit(Plan(2, {10})));
  // A third plan would exceed the pipeline's depth.
  EXPECT_THAT(g->Submit(Plan(3, {10})), StatusIs(absl::StatusCode::kFailedPrecondition));
  auto r1 = g->Await();
  ASSERT_OK(r1);
  EXPECT_EQ(r1->step_id, 1u);
  ASSERT_EQ(r1->sampled.size(), 2u);
  EXPECT_EQ(r1->sampled[1].seq_id, 11);
  auto r2 = g->Await();
  ASSERT_OK(r2);
  EXPECT_EQ(r2->step_id, 2u);
  EXPECT_THAT(g->Await(), StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("no step in flight")));
  EXPECT_OK(g->health());
}

TEST_F(WorkerGroupTest, PerRequestFailuresComeBackWithTheOthersResults) {
  worker_.pipeline_ = false;
  StartServer();
  auto g = Group();
  ASSERT_NE(g, nullptr);
  auto r = g->Run(Plan(1, {10, 666, 12}));
  ASSERT_OK(r);
  EXPECT_EQ(r->sampled.size(), 2u);
  ASSERT_EQ(r->failed.size(), 1u);
  EXPECT_EQ(r->failed[0].seq_id, 666);
  EXPECT_THAT(r->failed[0].status, StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("token id 5000")));
  EXPECT_OK(g->health());
}

TEST_F(WorkerGroupTest, AStepThatFailsAsAWholeBreaksTheGroupNamingTheWorkerAndCause) {
  worker_.pipeline_ = false;
  worker_.fail_stream_at_ = 2;
  StartServer();
  auto g = Group();
  ASSERT_NE(g, nullptr);
  ASSERT_OK(g->Run(Plan(1, {10})));
  EXPECT_THAT(g->Run(Plan(2, {10})),
              StatusIs(absl::StatusCode::kUnavailable, HasSubstr("worker 0 (127.0.0.1:")));
  EXPECT_THAT(g->health(), StatusIs(absl::StatusCode::kUnavailable, HasSubstr("step 7 after step 5")));
  EXPECT_THAT(g->Submit(Plan(3, {10})), StatusIs(absl::StatusCode::kUnavailable));
}

// A worker that serves another coordinator gave this one up (its owner lease ran out while this
// coordinator was stopped). Ping answers anyone, and when the connection came back the probe
// passed: the resumed coordinator went on serving into a closed stream (CI, under ASan).
TEST_F(WorkerGroupTest, AProbeFailsWhenTheWorkerServesAnotherCoordinator) {
  StartServer();
  WorkerGroupOptions o;
  o.addresses = {"127.0.0.1:" + std::to_string(port_)};
  o.coordinator_id = 0x42;
  auto g = WorkerGroup::Start(o);
  ASSERT_OK(g);
  EXPECT_OK((*g)->Probe(absl::Seconds(5)));  // no owner named: fine
  worker_.set_owner(0x42);
  EXPECT_OK((*g)->Probe(absl::Seconds(5)));  // this one
  worker_.set_owner(0x77);
  const absl::Status s = (*g)->Probe(absl::Seconds(5));
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable) << s;
  EXPECT_THAT(std::string(s.message()),
              ::testing::HasSubstr("health probe: the worker serves coordinator 0x0000000000000077 (at 10.0.0.9:7000) now"));
  EXPECT_FALSE((*g)->health().ok());
}

TEST_F(WorkerGroupTest, AResultForAnotherStepBreaksTheGroup) {
  worker_.pipeline_ = false;
  StartServer();
  auto g = Group();
  ASSERT_NE(g, nullptr);
  // Steps 1..98 are not needed: the worker answers plan 99 as if it were step 100.
  EXPECT_THAT(g->Run(Plan(99, {10})),
              StatusIs(absl::StatusCode::kUnavailable, HasSubstr("result for step 100 while awaiting step 99")));
}

TEST_F(WorkerGroupTest, AFailureFromOutsideEndsTheStepInFlight) {
  worker_.pipeline_ = true;  // step 1 is held until plan 2 arrives: it never does
  StartServer();
  auto g = Group(absl::Minutes(5));
  ASSERT_NE(g, nullptr);
  ASSERT_OK(g->Submit(Plan(1, {10})));
  std::thread fail([&] {
    absl::SleepFor(absl::Milliseconds(50));
    g->Fail(absl::UnavailableError("worker 0 (pid 1) was killed"));
  });
  EXPECT_THAT(g->Await(), StatusIs(absl::StatusCode::kUnavailable, HasSubstr("was killed")));
  fail.join();
}

TEST(WorkerGroupJoinTest, DisableCustomAllReduceReachesEveryRankAndRankZeroReportsThePaths) {
  // Two fake workers: the group joins them (InitCommunicator) before loading.
  FakeWorker w0, w1;
  std::vector<std::unique_ptr<grpc::Server>> servers;
  std::vector<std::string> addresses;
  for (FakeWorker* w : {&w0, &w1}) {
    int port = 0;
    grpc::ServerBuilder b;
    b.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
    b.RegisterService(w);
    servers.push_back(b.BuildAndStart());
    ASSERT_NE(servers.back(), nullptr);
    addresses.push_back("127.0.0.1:" + std::to_string(port));
  }
  for (bool disable : {true, false}) {
    WorkerGroupOptions o;
    o.addresses = addresses;
    o.disable_custom_all_reduce = disable;
    auto g = WorkerGroup::Start(o);
    ASSERT_OK(g);
    EXPECT_EQ((*g)->info().all_reduce,
              absl::StrCat("fake rank 0 disable_custom_all_reduce=", disable ? 1 : 0));
    EXPECT_EQ(w0.last_disable_custom_all_reduce(), disable);
    EXPECT_EQ(w1.last_disable_custom_all_reduce(), disable);
  }
  EXPECT_EQ(w0.init_calls(), 2);
  EXPECT_EQ(w1.init_calls(), 2);
  for (auto& s : servers) s->Shutdown();
}

double SecondsSince(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Rank 0 waits in InitCommunicator for the others (as the rendezvous does) until cancelled or
// 60 s; rank 1 refuses at once, as a worker owned by another coordinator does.
class WaitingJoinWorker final : public internal::Worker::Service {
 public:
  explicit WaitingJoinWorker(bool refuse) : refuse_(refuse) {}
  grpc::Status InitCommunicator(grpc::ServerContext* ctx, const internal::InitCommunicatorRequest*,
                                internal::InitCommunicatorResponse*) override {
    if (refuse_) {
      return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                          "InitCommunicator from coordinator 0x1 refused: this worker is serving coordinator 0x2");
    }
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
    while (!ctx->IsCancelled() && std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    cancelled_ = ctx->IsCancelled();
    return grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED, "rank(s) 1 of 2 did not join within 1m");
  }
  const bool refuse_;
  std::atomic<bool> cancelled_{false};
};

std::unique_ptr<grpc::Server> Serve(grpc::Service* service, std::string* address) {
  int port = 0;
  grpc::ServerBuilder b;
  b.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  b.RegisterService(service);
  std::unique_ptr<grpc::Server> server = b.BuildAndStart();
  *address = absl::StrCat("127.0.0.1:", port);
  return server;
}

TEST(WorkerGroupJoinTest, ARankThatRefusesEndsTheJoinAtOnceNamingItsReason) {
  // Found by a tester: with the refusing worker at rank 1, the coordinator waited the whole join
  // timeout on rank 0 and then named the wait ("rank(s) 1 of 2 did not join"), not the refusal.
  WaitingJoinWorker w0(false), w1(true);
  std::string a0, a1;
  std::unique_ptr<grpc::Server> s0 = Serve(&w0, &a0), s1 = Serve(&w1, &a1);
  ASSERT_NE(s0, nullptr);
  ASSERT_NE(s1, nullptr);
  WorkerGroupOptions o;
  o.addresses = {a0, a1};
  o.join_timeout = absl::Seconds(60);
  const auto t0 = std::chrono::steady_clock::now();
  absl::StatusOr<std::unique_ptr<WorkerGroup>> g = WorkerGroup::Start(o);
  EXPECT_LT(SecondsSince(t0), 10);
  EXPECT_THAT(g.status(), StatusIs(absl::StatusCode::kFailedPrecondition,
                                   HasSubstr(absl::StrCat("worker 1 (", a1, "): InitCommunicator from"))));
  const auto t1 = std::chrono::steady_clock::now();  // the server sees the cancellation a bit later
  while (!w0.cancelled_ && SecondsSince(t1) < 5) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  EXPECT_TRUE(w0.cancelled_) << "rank 0's InitCommunicator was not cancelled";
  s0->Shutdown();
  s1->Shutdown();
}

TEST(WorkerGroupJoinTest, OneWorkerUnderTwoNamesIsRefusedAtOnce) {
  // A tester: 127.0.0.1:P and localhost:P took two ranks of one process; the join waited 60 s and
  // named a rank that "did not join".
  FakeWorker w;
  w.set_instance_id(0x77);
  std::string address;
  std::unique_ptr<grpc::Server> s = Serve(&w, &address);
  ASSERT_NE(s, nullptr);
  const std::string port = address.substr(address.rfind(':') + 1);
  WorkerGroupOptions o;
  o.addresses = {address, "ipv4:127.0.0.1:" + port};  // another spelling of the same target
  const auto t0 = std::chrono::steady_clock::now();
  EXPECT_THAT(WorkerGroup::Start(o).status(),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr(absl::StrCat("--workers: '", address, "' and 'ipv4:127.0.0.1:", port,
                                              "' are the same worker process"))));
  EXPECT_LT(SecondsSince(t0), 10);
  EXPECT_EQ(w.init_calls(), 0);
  s->Shutdown();
}

TEST(WorkerGroupJoinTest, AnAddressServingSomethingElseIsNamedAsNotAWorker) {
  internal::Rendezvous::Service other;  // every method UNIMPLEMENTED; no Worker service
  std::string address;
  std::unique_ptr<grpc::Server> s = Serve(&other, &address);
  ASSERT_NE(s, nullptr);
  WorkerGroupOptions o;
  o.addresses = {address};
  EXPECT_THAT(WorkerGroup::Start(o).status(),
              StatusIs(absl::StatusCode::kFailedPrecondition,
                       HasSubstr(absl::StrCat("worker 0 (", address, "): not a lorcserve worker"))));
  s->Shutdown();
}

// A worker process restarted at once on the same address answers the probe's ping, but holds
// none of the group's state: the probe fails the group then (a tester saw SERVING for 30 s, and
// the next request failed), by the instance id it answers with.
TEST_F(WorkerGroupTest, AProbeFailsWhenAnotherWorkerProcessAnswers) {
  worker_.set_instance_id(0x1111);
  StartServer();
  auto g = Group();
  ASSERT_NE(g, nullptr);
  EXPECT_OK(g->Probe(absl::Seconds(5)));
  worker_.set_instance_id(0x2222);
  const absl::Status s = g->Probe(absl::Seconds(5));
  EXPECT_THAT(s, StatusIs(absl::StatusCode::kUnavailable,
                          HasSubstr("another worker process answers there now (instance 0000000000002222, was "
                                    "0000000000001111")));
  EXPECT_FALSE(g->health().ok());
}

// A worker still held by another coordinator (one that died during its setup) is waited for, up
// to owner_wait, before the setup calls (which would be refused): a supervisor's restart right
// after a crash exited 1 at once until the worker's lease ran out (a tester).
TEST_F(WorkerGroupTest, StartWaitsForAWorkerHeldByAnotherCoordinator) {
  StartServer();
  WorkerGroupOptions o;
  o.addresses = {"127.0.0.1:" + std::to_string(port_)};
  o.coordinator_id = 0x42;
  o.owner_wait = absl::Seconds(20);
  worker_.set_owner(0x77);
  std::thread release([this] {
    std::this_thread::sleep_for(std::chrono::milliseconds(600));
    worker_.set_owner(0);
  });
  const auto t0 = std::chrono::steady_clock::now();
  auto g = WorkerGroup::Start(o);
  const double waited = SecondsSince(t0);
  release.join();
  ASSERT_OK(g);
  EXPECT_GE(waited, 0.5);
  EXPECT_LT(waited, 15);
  EXPECT_EQ(worker_.init_calls(), 0);  // one worker: no communicator
  // The wait is bounded: an owner that stays is left to the setup calls to name.
  worker_.set_owner(0x77);
  o.owner_wait = absl::Seconds(1);
  const auto t1 = std::chrono::steady_clock::now();
  EXPECT_OK(WorkerGroup::Start(o).status());  // this fake worker does not refuse
  EXPECT_GE(SecondsSince(t1), 1);
}

// The coordinator names its protocol in every setup call and refuses a worker whose responses
// name another one, or none (a build before the check: it would run plans it misreads).
TEST_F(WorkerGroupTest, AWorkerOfAnotherBuildIsRefusedNamingBothProtocols) {
  StartServer();
  ASSERT_NE(Group(), nullptr);
  EXPECT_EQ(worker_.coordinator_protocol(), WorkerProtocolFingerprint());
  EXPECT_EQ(WorkerProtocolFingerprint().size(), 16u);
  const std::string worker = absl::StrCat("worker 0 (127.0.0.1:", port_, ")");
  WorkerGroupOptions o;
  o.addresses = {"127.0.0.1:" + std::to_string(port_)};
  worker_.set_protocol("0123456789abcdef");
  EXPECT_THAT(WorkerGroup::Start(o).status(),
              StatusIs(absl::StatusCode::kFailedPrecondition,
                       AllOf(HasSubstr(absl::StrCat(worker, " speaks worker protocol 0123456789abcdef")),
                             HasSubstr(absl::StrCat("this coordinator speaks worker protocol ",
                                                    WorkerProtocolFingerprint())),
                             HasSubstr("same lorcserve build"))));
  worker_.set_protocol("");
  EXPECT_THAT(WorkerGroup::Start(o).status(),
              StatusIs(absl::StatusCode::kFailedPrecondition,
                       HasSubstr(absl::StrCat(worker, " speaks none (a lorcserve build before 2026-12-07)"))));
}

TEST(WorkerGroupReleaseTest, ReleaseReachesEveryWorkerAndSkipsOnesThatAreGone) {
  FakeWorker w;
  std::string address;
  std::unique_ptr<grpc::Server> s = Serve(&w, &address);
  ASSERT_NE(s, nullptr);
  const auto t0 = std::chrono::steady_clock::now();
  ReleaseWorkers({address, "", "127.0.0.1:1"}, 0x42, absl::Seconds(2));
  EXPECT_LT(SecondsSince(t0), 5);
  EXPECT_EQ(w.released_by(), 0x42u);
  s->Shutdown();
}

TEST(RendezvousServiceTest, AWaitingGetEndsWhenTheServerShutsDown) {
  // A coordinator whose start failed shut its internal server down while a worker's Get waited
  // for a rank that would never come: the shutdown waited up to the join timeout for the handler
  // and the worker stayed locked to the exited coordinator (a tester: 70 s).
  RendezvousService service;
  std::string address;
  std::unique_ptr<grpc::Server> s = Serve(&service, &address);
  ASSERT_NE(s, nullptr);
  GrpcRendezvousStore store(address);
  ASSERT_TRUE(store.Set("g/arrived/0", "0").ok());
  absl::StatusOr<std::string> got = store.Get("g/arrived/0", absl::Seconds(5));
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(*got, "0");
  EXPECT_EQ(store.Get("g/arrived/9", absl::Milliseconds(200)).status().code(),
            absl::StatusCode::kDeadlineExceeded);
  auto waiting = std::async(std::launch::async, [&] { return store.Get("g/arrived/1", absl::Seconds(60)); });
  std::this_thread::sleep_for(std::chrono::milliseconds(300));  // the Get is in the handler
  const auto t0 = std::chrono::steady_clock::now();
  s->Shutdown(std::chrono::system_clock::now() + std::chrono::milliseconds(300));
  EXPECT_LT(SecondsSince(t0), 5) << "the server's shutdown waited for the blocked Get";
  absl::StatusOr<std::string> ended = waiting.get();
  EXPECT_FALSE(ended.ok());
  EXPECT_NE(ended.status().code(), absl::StatusCode::kDeadlineExceeded) << ended.status();
  EXPECT_LT(SecondsSince(t0), 5);
}

// ---- cancelling Start -----------------------------------------------------------------------

// A worker whose LoadModel never finishes by itself: it returns once its call is cancelled.
class StuckLoadWorker final : public internal::Worker::Service {
 public:
  grpc::Status LoadModel(grpc::ServerContext* ctx, const internal::LoadModelRequest*,
                         internal::LoadModelResponse*) override {
    loading_ = true;
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
    while (!ctx->IsCancelled() && std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    cancelled_ = ctx->IsCancelled();
    return grpc::Status(grpc::StatusCode::CANCELLED, "load cancelled");
  }
  std::atomic<bool> loading_{false}, cancelled_{false};
};

TEST(WorkerGroupCancelTest, CancelledEndsTheWaitForTheLoadAndCancelsTheCall) {
  StuckLoadWorker w;
  int port = 0;
  grpc::ServerBuilder b;
  b.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  b.RegisterService(&w);
  std::unique_ptr<grpc::Server> server = b.BuildAndStart();
  ASSERT_NE(server, nullptr);
  WorkerGroupOptions o;
  o.addresses = {absl::StrCat("127.0.0.1:", port)};
  std::atomic<bool> cancel{false};
  o.cancelled = [&] { return cancel.load(); };
  // Cancelled once the load is under way (a signal during the load).
  std::thread canceller([&] {
    const auto t0 = std::chrono::steady_clock::now();
    while (!w.loading_ && SecondsSince(t0) < 30) std::this_thread::sleep_for(std::chrono::milliseconds(10));
    cancel = true;
  });
  const auto t0 = std::chrono::steady_clock::now();
  absl::StatusOr<std::unique_ptr<WorkerGroup>> g = WorkerGroup::Start(o);
  canceller.join();
  ASSERT_TRUE(w.loading_);
  EXPECT_THAT(g.status(), StatusIs(absl::StatusCode::kCancelled));
  EXPECT_LT(SecondsSince(t0), 10);  // not the load's 60 s (nor load_timeout's 30 min)
  const auto t1 = std::chrono::steady_clock::now();
  while (!w.cancelled_ && SecondsSince(t1) < 5) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  EXPECT_TRUE(w.cancelled_) << "the worker's LoadModel call was not cancelled";
  server->Shutdown();
}

TEST(WorkerGroupCancelTest, CancelledEndsTheWaitForAWorkerThatIsNotThere) {
  // Nothing listens at port 1: Start would retry the connection for connect_timeout.
  WorkerGroupOptions o;
  o.addresses = {"127.0.0.1:1"};
  o.connect_timeout = absl::Seconds(60);
  const auto t0 = std::chrono::steady_clock::now();
  o.cancelled = [&] { return SecondsSince(t0) > 0.3; };
  EXPECT_THAT(WorkerGroup::Start(o).status(), StatusIs(absl::StatusCode::kCancelled));
  EXPECT_LT(SecondsSince(t0), 10);
  // Cancelled before anything: at once.
  o.cancelled = [] { return true; };
  EXPECT_THAT(WorkerGroup::Start(o).status(), StatusIs(absl::StatusCode::kCancelled));
}

}  // namespace
}  // namespace lorc
