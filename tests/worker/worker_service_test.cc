// The Worker gRPC service in-process on a loopback server, with tiny-llama-a: one coordinator
// owns the worker and others are refused by name without disturbing it; the owner closing its
// step stream frees the worker; the device state is touched only by the device thread; step
// ids must not skip; Ping answers while a step runs; pipelined plans come back in order.
#include "worker/worker_service.h"

#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "common/grpc_status.h"
#include "common/json_util.h"
#include "common/status_macros.h"
#include "gmock/gmock.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "tests/testing/fixtures.h"
#include "tests/testing/golden.h"
#include "tests/testing/status_matchers.h"
#include "step/protocol.h"
#include "step/step_proto.h"

namespace lorc {
namespace {

using ::lorc::testing::Golden;
using ::lorc::testing::GoldenPrompts;

namespace pb = ::lorcserve::internal;
using ::lorc::testing::IsOk;
using ::lorc::testing::StatusIs;
using ::testing::AllOf;
using ::testing::HasSubstr;

const CoordinatorRef kA{0xA11CE, "a.example:1"};
const CoordinatorRef kB{0xB0B, "b.example:2"};
constexpr int kBlockSize = 16;
constexpr int kBlocksPerSeq = 8;  // 128 tokens: more than any golden prompt + a few tokens

// A greedy step for sequence `seq_id` (which owns blocks [seq_id * 8, seq_id * 8 + 8)) in the
// incremental protocol (step/step.h): on first sight (`num_cached` 0) it brings `tokens` (the
// prompt), its blocks and params; later it computes tokens.size() tokens the worker already holds
// (the one it sampled). Either way the next token is sampled.
pb::StepPlan Plan(uint64_t step_id, int64_t seq_id, std::vector<int32_t> tokens, int64_t num_cached) {
  StepPlan p;
  p.step_id = step_id;
  ScheduledSequence s;
  s.seq_id = seq_id;
  s.num_computed_tokens = num_cached;
  s.num_scheduled_tokens = static_cast<int32_t>(tokens.size());
  if (num_cached == 0) {
    s.new_token_ids = std::move(tokens);
    for (int b = 0; b < kBlocksPerSeq; ++b) {
      s.new_block_ids.push_back(static_cast<int32_t>(seq_id * kBlocksPerSeq + b));
    }
    s.params = SamplingParams{};
  }
  s.sample = true;
  p.seqs.push_back(std::move(s));
  pb::StepPlan out;
  StepPlanToProto(p, &out);
  return out;
}

int32_t SampledToken(const pb::StepResult& r) {
  return r.sampled_size() == 1 ? r.sampled(0).token() : -1;
}

// One step stream, as a coordinator opens it.
struct Stream {
  grpc::ClientContext ctx;
  std::unique_ptr<grpc::ClientReaderWriter<pb::StepPlan, pb::StepResult>> rw;

  // Writes all plans, closes the write side, reads every result; returns the final status.
  absl::Status RunAll(const std::vector<pb::StepPlan>& plans, std::vector<pb::StepResult>* results) {
    for (const pb::StepPlan& p : plans) {
      if (!rw->Write(p)) break;
    }
    rw->WritesDone();
    pb::StepResult r;
    while (rw->Read(&r)) results->push_back(r);
    return FromGrpcStatus(rw->Finish());
  }
};

class WorkerServiceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    REQUIRE_TINY_LLAMA();
    golden_ = GoldenPrompts();
    ASSERT_GE(golden_.size(), 2u) << "cannot read golden_fp32.json";
    WorkerOptions o;
    o.backend.threads = 1;
    o.device_op_hook = [this](absl::string_view op) { OnDeviceOp(op); };
    service_ = std::make_unique<WorkerService>(o);
    grpc::ServerBuilder b;
    int port = 0;
    b.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
    b.RegisterService(service_.get());
    server_ = b.BuildAndStart();
    ASSERT_TRUE(server_ != nullptr && port != 0);
    stub_ = pb::Worker::NewStub(
        grpc::CreateChannel(absl::StrCat("127.0.0.1:", port), grpc::InsecureChannelCredentials()));
  }

  void TearDown() override { StopWorker(); }

  void StopWorker() {
    if (server_ != nullptr) server_->Shutdown();
    server_.reset();
    service_.reset();
  }

  // Runs on the device thread before each operation on the device state.
  void OnDeviceOp(absl::string_view op) {
    absl::MutexLock lock(&mu_);
    ops_.emplace_back(std::string(op), std::this_thread::get_id());
    if (op == "Step" && hold_steps_) {
      ++steps_held_;
      mu_.Await(absl::Condition(+[](bool* hold) { return !*hold; }, &hold_steps_));
    }
  }
  void HoldSteps() {
    absl::MutexLock lock(&mu_);
    hold_steps_ = true;
  }
  void WaitUntilStepsHeld(int n) {
    absl::MutexLock lock(&mu_);
    auto held = [this, n]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return steps_held_ >= n; };
    mu_.Await(absl::Condition(&held));
  }
  void ReleaseSteps() {
    absl::MutexLock lock(&mu_);
    hold_steps_ = false;
  }

  // `protocol`: what the call names as the coordinator's worker protocol (step/protocol.h).
  absl::Status Load(const CoordinatorRef& c, int64_t kv_offloading_bytes = 0,
                    pb::LoadModelResponse* out = nullptr,
                    const std::string& protocol = WorkerProtocolFingerprint()) {
    grpc::ClientContext ctx;
    pb::LoadModelRequest req;
    req.set_kv_offloading_bytes(kv_offloading_bytes);
    req.set_model_dir(::lorc::testing::TinyLlamaDir());
    req.set_tp_rank(0);
    req.set_tp_size(1);
    req.set_block_size(kBlockSize);
    req.set_num_blocks(4 * kBlocksPerSeq);
    req.mutable_coordinator()->set_id(c.id);
    req.mutable_coordinator()->set_address(c.address);
    req.mutable_coordinator()->set_protocol(protocol);
    pb::LoadModelResponse resp;
    const absl::Status st = FromGrpcStatus(stub_->LoadModel(&ctx, req, &resp));
    if (out != nullptr) *out = resp;
    return st;
  }

  absl::Status Init(const CoordinatorRef& c, const std::string& protocol = WorkerProtocolFingerprint()) {
    grpc::ClientContext ctx;
    pb::InitCommunicatorRequest req;
    req.set_rendezvous_address("127.0.0.1:1");
    req.set_group("g");
    req.set_rank(0);
    req.set_world_size(2);
    req.set_timeout_ms(1);
    req.mutable_coordinator()->set_id(c.id);
    req.mutable_coordinator()->set_address(c.address);
    req.mutable_coordinator()->set_protocol(protocol);
    pb::InitCommunicatorResponse resp;
    return FromGrpcStatus(stub_->InitCommunicator(&ctx, req, &resp));
  }

  static void Name(const CoordinatorRef& c, grpc::ClientContext* ctx) {
    ctx->AddMetadata(kCoordinatorIdMetadata, absl::StrCat(c.id));
    ctx->AddMetadata(kCoordinatorAddressMetadata, c.address);
  }

  absl::StatusOr<pb::StepResult> UnaryStep(const CoordinatorRef& c, const pb::StepPlan& plan) {
    grpc::ClientContext ctx;
    Name(c, &ctx);
    pb::StepResult r;
    RETURN_IF_ERROR(FromGrpcStatus(stub_->Step(&ctx, plan, &r)));
    return r;
  }

  std::unique_ptr<Stream> Open(const CoordinatorRef& c) {
    auto s = std::make_unique<Stream>();
    Name(c, &s->ctx);
    s->rw = stub_->Steps(&s->ctx);
    return s;
  }

  pb::PingResponse Ping(const CoordinatorRef& c) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    pb::PingRequest req;
    req.mutable_coordinator()->set_id(c.id);
    pb::PingResponse resp;
    EXPECT_TRUE(stub_->Ping(&ctx, req, &resp).ok());
    return resp;
  }

  // Waits (on the worker's state, as Ping reports it) until `id` owns it, or 0 for nobody.
  void WaitForOwner(uint64_t id) {
    const absl::Time deadline = absl::Now() + absl::Seconds(30);
    while (Ping(kB).owner().id() != id && absl::Now() < deadline) {
      absl::SleepFor(absl::Milliseconds(1));
    }
    EXPECT_EQ(Ping(kB).owner().id(), id);
  }

  std::vector<Golden> golden_;
  std::unique_ptr<WorkerService> service_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<pb::Worker::Stub> stub_;
  absl::Mutex mu_;
  std::vector<std::pair<std::string, std::thread::id>> ops_ ABSL_GUARDED_BY(mu_);
  bool hold_steps_ ABSL_GUARDED_BY(mu_) = false;
  int steps_held_ ABSL_GUARDED_BY(mu_) = 0;
};

TEST_F(WorkerServiceTest, SecondCoordinatorIsRefusedByNameAndTheOwnerKeepsItsState) {
  ASSERT_THAT(Load(kA), IsOk());
  // Owner A prefills sequence 1.
  absl::StatusOr<pb::StepResult> first = UnaryStep(kA, Plan(1, 1, golden_[0].prompt_ids, 0));
  ASSERT_THAT(first, IsOk());
  EXPECT_EQ(SampledToken(*first), golden_[0].greedy_ids[0]);

  const auto names_owner = AllOf(HasSubstr(DescribeCoordinator(kA)), HasSubstr(DescribeCoordinator(kB)));
  EXPECT_THAT(Load(kB), StatusIs(absl::StatusCode::kFailedPrecondition, names_owner));
  EXPECT_THAT(Init(kB), StatusIs(absl::StatusCode::kFailedPrecondition, names_owner));
  EXPECT_THAT(UnaryStep(kB, Plan(2, 1, {golden_[0].greedy_ids[0]}, golden_[0].prompt_ids.size())),
              StatusIs(absl::StatusCode::kFailedPrecondition, names_owner));
  std::unique_ptr<Stream> b = Open(kB);
  std::vector<pb::StepResult> b_results;
  EXPECT_THAT(b->RunAll({Plan(2, 1, {golden_[0].greedy_ids[0]}, golden_[0].prompt_ids.size())}, &b_results),
              StatusIs(absl::StatusCode::kFailedPrecondition, names_owner));
  EXPECT_TRUE(b_results.empty());
  const pb::PingResponse ping = Ping(kB);
  EXPECT_EQ(ping.owner().id(), kA.id);
  EXPECT_EQ(ping.owner().address(), kA.address);
  EXPECT_TRUE(ping.model_loaded());

  // Nothing was reset: A decodes sequence 1 from its cached prefill, over a stream.
  std::unique_ptr<Stream> a = Open(kA);
  std::vector<pb::StepResult> results;
  const int64_t n = static_cast<int64_t>(golden_[0].prompt_ids.size());
  ASSERT_THAT(a->RunAll({Plan(2, 1, {golden_[0].greedy_ids[0]}, n)}, &results), IsOk());
  ASSERT_EQ(results.size(), 1u);
  EXPECT_EQ(results[0].step_id(), 2u);
  EXPECT_EQ(SampledToken(results[0]), golden_[0].greedy_ids[1]);
}

// A coordinator of another build (another worker protocol, or none: a build before the check)
// is refused before it owns the worker, naming both protocols; the worker reports its own in
// LoadModel's response, and a coordinator of this build is served as before.
TEST_F(WorkerServiceTest, ACoordinatorOfAnotherBuildIsRefusedBeforeItOwnsTheWorker) {
  const auto other = AllOf(HasSubstr(absl::StrCat(DescribeCoordinator(kA), " speaks worker protocol 0123456789abcdef")),
                           HasSubstr(absl::StrCat("this worker speaks worker protocol ", WorkerProtocolFingerprint())),
                           HasSubstr("same lorcserve build"));
  EXPECT_THAT(Load(kA, 0, nullptr, "0123456789abcdef"),
              StatusIs(absl::StatusCode::kFailedPrecondition, AllOf(HasSubstr("LoadModel refused"), other)));
  EXPECT_THAT(Init(kA, "0123456789abcdef"),
              StatusIs(absl::StatusCode::kFailedPrecondition, AllOf(HasSubstr("InitCommunicator refused"), other)));
  EXPECT_THAT(Load(kA, 0, nullptr, ""),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("speaks none (a lorcserve build before")));
  // A long one is cut in the message (it travels in gRPC metadata; 20 KB was RESOURCE_EXHAUSTED).
  EXPECT_THAT(Load(kA, 0, nullptr, std::string(20000, 'x')),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("... (20000 bytes)")));
  EXPECT_FALSE(Ping(kB).has_owner());
  EXPECT_FALSE(Ping(kB).model_loaded());
  pb::LoadModelResponse resp;
  ASSERT_THAT(Load(kB, 0, &resp), IsOk());
  EXPECT_EQ(resp.protocol(), WorkerProtocolFingerprint());
  EXPECT_EQ(Ping(kA).owner().id(), kB.id);
}

// The host KV tier over the wire: LoadModel sizes it from kv_offloading_bytes and reports its
// slots; a step's kv_offloads / kv_loads run on the worker; a bad slot fails the step, naming it.
TEST_F(WorkerServiceTest, HostKvTierIsReportedAndDrivenByTheStepPlans) {
  pb::LoadModelResponse resp;
  ASSERT_THAT(Load(kA, 0, &resp), IsOk());
  EXPECT_EQ(resp.num_host_blocks(), 0);
  const int64_t block_bytes = resp.kv_bytes_per_token() * kBlockSize;
  ASSERT_THAT(Load(kA, 3 * block_bytes + block_bytes / 2, &resp), IsOk());
  EXPECT_EQ(resp.num_host_blocks(), 3);
  const auto& g = golden_[0];
  const int64_t n = static_cast<int64_t>(g.prompt_ids.size());
  ASSERT_THAT(UnaryStep(kA, Plan(1, 1, g.prompt_ids, 0)), IsOk());
  // Park sequence 1's first block on the host and bring it back (into the same block): the
  // decode still gives the golden token.
  pb::StepPlan park = Plan(2, 2, g.prompt_ids, 0);  // an unrelated request, so the step is not empty
  auto* off = park.add_kv_offloads();
  off->set_block(kBlocksPerSeq);  // sequence 1's first block
  off->set_slot(2);
  ASSERT_THAT(UnaryStep(kA, park), IsOk());
  pb::StepPlan back = Plan(3, 1, {g.greedy_ids[0]}, n);
  auto* load = back.add_kv_loads();
  load->set_block(kBlocksPerSeq);
  load->set_slot(2);
  absl::StatusOr<pb::StepResult> r = UnaryStep(kA, back);
  ASSERT_THAT(r, IsOk());
  EXPECT_EQ(SampledToken(*r), g.greedy_ids[1]);
  pb::StepPlan bad = Plan(4, 1, {}, n + 1);
  load = bad.add_kv_loads();
  load->set_block(0);
  load->set_slot(3);
  EXPECT_THAT(UnaryStep(kA, bad), StatusIs(absl::StatusCode::kInvalidArgument,
                                           AllOf(HasSubstr("kv_loads 0"), HasSubstr("slot 3"))));
}

TEST_F(WorkerServiceTest, CallsWithoutACoordinatorIdAreInvalid) {
  EXPECT_THAT(Load(CoordinatorRef{0, ""}), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(Load(CoordinatorRef{0, ""}, 0, nullptr, ""), StatusIs(absl::StatusCode::kInvalidArgument));
  grpc::ClientContext ctx;  // no metadata
  pb::StepResult r;
  EXPECT_THAT(FromGrpcStatus(stub_->Step(&ctx, Plan(1, 1, {1}, 0), &r)),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr(kCoordinatorIdMetadata)));
  EXPECT_FALSE(Ping(kB).has_owner());
}

TEST_F(WorkerServiceTest, OwnerClosingItsStreamFreesTheWorker) {
  ASSERT_THAT(Load(kA), IsOk());
  std::unique_ptr<Stream> a = Open(kA);
  std::vector<pb::StepResult> results;
  ASSERT_THAT(a->RunAll({Plan(1, 1, golden_[0].prompt_ids, 0)}, &results), IsOk());
  WaitForOwner(0);
  ASSERT_THAT(Load(kB), IsOk());
  EXPECT_EQ(Ping(kA).owner().id(), kB.id);

  // A cancelled stream (a coordinator that gave up) frees it too.
  std::unique_ptr<Stream> b = Open(kB);
  ASSERT_TRUE(b->rw->Write(Plan(7, 2, golden_[1].prompt_ids, 0)));
  pb::StepResult r;
  ASSERT_TRUE(b->rw->Read(&r));
  EXPECT_EQ(SampledToken(r), golden_[1].greedy_ids[0]);
  b->ctx.TryCancel();
  EXPECT_THAT(FromGrpcStatus(b->rw->Finish()), StatusIs(absl::StatusCode::kCancelled));
  WaitForOwner(0);
  EXPECT_THAT(Load(kA), IsOk());
}

TEST_F(WorkerServiceTest, DeviceStateIsTouchedOnlyByTheDeviceThread) {
  const std::thread::id device = service_->device_thread_id();
  EXPECT_NE(device, std::this_thread::get_id());
  ASSERT_THAT(Load(kA), IsOk());
  EXPECT_THAT(Init(kB), StatusIs(absl::StatusCode::kFailedPrecondition));  // refused: no device op
  ASSERT_THAT(UnaryStep(kA, Plan(1, 1, golden_[0].prompt_ids, 0)), IsOk());
  std::unique_ptr<Stream> a = Open(kA);
  std::vector<pb::StepResult> results;
  ASSERT_THAT(a->RunAll({Plan(2, 2, golden_[1].prompt_ids, 0), Plan(3, 3, golden_[0].prompt_ids, 0)}, &results),
              IsOk());
  StopWorker();  // the device state is destroyed on the device thread too
  absl::MutexLock lock(&mu_);
  std::vector<std::string> names;
  for (const auto& [op, thread] : ops_) {
    names.push_back(op);
    EXPECT_EQ(thread, device) << op << " ran off the device thread";
  }
  EXPECT_THAT(names, ::testing::ElementsAre("LoadModel", "Step", "Step", "Step", "Teardown"));
}

TEST_F(WorkerServiceTest, SkippedStepIdEndsTheStreamAfterTheResultsBeforeIt) {
  ASSERT_THAT(Load(kA), IsOk());
  std::unique_ptr<Stream> a = Open(kA);
  ASSERT_TRUE(a->rw->Write(Plan(1, 1, golden_[0].prompt_ids, 0)));
  ASSERT_TRUE(a->rw->Write(Plan(3, 2, golden_[1].prompt_ids, 0)));
  pb::StepResult r;
  ASSERT_TRUE(a->rw->Read(&r));  // step 1's result still arrives
  EXPECT_EQ(r.step_id(), 1u);
  EXPECT_EQ(SampledToken(r), golden_[0].greedy_ids[0]);
  EXPECT_FALSE(a->rw->Read(&r));  // the write side is still open: the worker ends the stream
  EXPECT_THAT(FromGrpcStatus(a->rw->Finish()),
              StatusIs(absl::StatusCode::kFailedPrecondition,
                       AllOf(HasSubstr("step_id 3"), HasSubstr("step_id 1"))));

  // The refused step changed nothing: step 2 is next. Unary steps are checked too; a repeated
  // id is refused; a new LoadModel starts a new serving epoch.
  ASSERT_THAT(UnaryStep(kA, Plan(2, 3, golden_[0].prompt_ids, 0)), IsOk());
  EXPECT_THAT(UnaryStep(kA, Plan(2, 2, golden_[1].prompt_ids, 0)),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("expected 3")));
  EXPECT_THAT(UnaryStep(kA, Plan(4, 2, golden_[1].prompt_ids, 0)),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("expected 3")));
  ASSERT_THAT(Load(kA), IsOk());
  absl::StatusOr<pb::StepResult> fresh = UnaryStep(kA, Plan(1, 1, golden_[1].prompt_ids, 0));
  ASSERT_THAT(fresh, IsOk());
  EXPECT_EQ(SampledToken(*fresh), golden_[1].greedy_ids[0]);
}

TEST_F(WorkerServiceTest, PingAndRefusalsDoNotWaitBehindAStep) {
  ASSERT_THAT(Load(kA), IsOk());
  HoldSteps();
  absl::StatusOr<pb::StepResult> result;
  std::thread step([&] { result = UnaryStep(kA, Plan(1, 1, golden_[0].prompt_ids, 0)); });
  WaitUntilStepsHeld(1);  // the step is running on the device thread
  const pb::PingResponse ping = Ping(kA);
  EXPECT_TRUE(ping.model_loaded());
  EXPECT_EQ(ping.owner().id(), kA.id);
  EXPECT_THAT(Load(kB), StatusIs(absl::StatusCode::kFailedPrecondition));
  ReleaseSteps();
  step.join();
  ASSERT_THAT(result, IsOk());
  EXPECT_EQ(SampledToken(*result), golden_[0].greedy_ids[0]);
}

TEST_F(WorkerServiceTest, PipelinedPlansQueueAndComeBackInOrder) {
  ASSERT_THAT(Load(kA), IsOk());
  HoldSteps();
  std::unique_ptr<Stream> a = Open(kA);
  ASSERT_TRUE(a->rw->Write(Plan(1, 1, golden_[0].prompt_ids, 0)));
  WaitUntilStepsHeld(1);
  // Step 1 is running; step 2 is sent (and queued on the worker) before its result came back.
  ASSERT_TRUE(a->rw->Write(Plan(2, 2, golden_[1].prompt_ids, 0)));
  ReleaseSteps();
  pb::StepResult r1, r2;
  ASSERT_TRUE(a->rw->Read(&r1));
  // Decode sequence 1 with the token step 1 sampled, while step 2 may still be running.
  ASSERT_TRUE(a->rw->Write(Plan(3, 1, {SampledToken(r1)}, golden_[0].prompt_ids.size())));
  ASSERT_TRUE(a->rw->Read(&r2));
  a->rw->WritesDone();
  pb::StepResult r3;
  ASSERT_TRUE(a->rw->Read(&r3));
  EXPECT_FALSE(a->rw->Read(&r3));
  ASSERT_THAT(FromGrpcStatus(a->rw->Finish()), IsOk());
  EXPECT_EQ(r1.step_id(), 1u);
  EXPECT_EQ(r2.step_id(), 2u);
  EXPECT_EQ(r3.step_id(), 3u);
  EXPECT_EQ(SampledToken(r1), golden_[0].greedy_ids[0]);
  EXPECT_EQ(SampledToken(r2), golden_[1].greedy_ids[0]);
  EXPECT_EQ(SampledToken(r3), golden_[0].greedy_ids[1]);
}

}  // namespace
}  // namespace lorc
