// JoinRegistry: workers registering their ranks with the coordinator (coordinator/join_registry.h)
// — joins in any order, heartbeats, LeaderWorkerSet slots, refusals (rank out of range, a local
// rank, group size mismatch, a duplicate held by a live worker), replacement of a restarted
// worker, the missing-ranks report; and WorkerJoinService over gRPC.
#include "coordinator/join_registry.h"

#include <memory>
#include <set>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "tests/testing/status_matchers.h"
#include "worker/comm/internal_grpc.h"

namespace lorc {
namespace {

using ::lorc::testing::StatusIs;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
namespace internal = ::lorcserve::internal;

internal::JoinRequest Rank(int rank, const std::string& address, uint64_t instance = 1) {
  internal::JoinRequest r;
  r.set_rank(rank);
  r.set_worker_address(address);
  r.set_instance_id(instance);
  return r;
}

internal::JoinRequest Lws(int index, int group, int local_index, int local_count, const std::string& address) {
  internal::JoinRequest r;
  r.set_worker_address(address);
  r.set_instance_id(7);
  r.mutable_lws()->set_worker_index(index);
  r.mutable_lws()->set_group_size(group);
  r.mutable_lws()->set_local_index(local_index);
  r.mutable_lws()->set_local_count(local_count);
  return r;
}

struct Recorder {
  std::vector<std::pair<JoinedWorker, JoinedWorker>> changes;
  std::set<std::string> alive;  // addresses that answer
  JoinRegistry Make(int size, int local) {
    return JoinRegistry(
        size, local, [this](const std::string& a) { return alive.contains(a); },
        [this](const JoinedWorker& now, const JoinedWorker& prev) { changes.emplace_back(now, prev); });
  }
};

TEST(JoinRegistryTest, RanksJoinInAnyOrderAndCompleteTheGroup) {
  Recorder rec;
  JoinRegistry reg = rec.Make(4, 0);
  EXPECT_THAT(reg.missing(), ElementsAre(0, 1, 2, 3));
  for (int r : {3, 0, 2}) ASSERT_THAT(reg.Join(Rank(r, "h" + std::to_string(r) + ":1")), StatusIs(absl::StatusCode::kOk));
  EXPECT_FALSE(reg.complete());
  EXPECT_THAT(reg.missing(), ElementsAre(1));
  EXPECT_THAT(reg.Describe(), HasSubstr("missing rank 1 of 4"));
  EXPECT_THAT(reg.Describe(), HasSubstr("rank 3 at h3:1"));
  ASSERT_TRUE(reg.Join(Rank(1, "h1:1")).ok());
  EXPECT_TRUE(reg.complete());
  EXPECT_THAT(reg.addresses(), ElementsAre("h0:1", "h1:1", "h2:1", "h3:1"));
  EXPECT_EQ(reg.changes(), 4u);
  // A heartbeat (same instance, same address) changes nothing.
  ASSERT_TRUE(reg.Join(Rank(2, "h2:1")).ok());
  EXPECT_EQ(reg.changes(), 4u);
  EXPECT_EQ(rec.changes.size(), 4u);
}

TEST(JoinRegistryTest, TheMissingRanksAreNamed) {
  Recorder rec;
  JoinRegistry reg = rec.Make(5, 2);  // ranks 0, 1 local
  ASSERT_TRUE(reg.Join(Rank(3, "w3:9")).ok());
  EXPECT_THAT(reg.missing(), ElementsAre(2, 4));
  EXPECT_EQ(reg.Describe(), "missing ranks 2, 4 of 5 (0..1 local); joined: rank 3 at w3:9");
}

TEST(JoinRegistryTest, BadRanksAreRefusedNamingTheValues) {
  Recorder rec;
  JoinRegistry reg = rec.Make(4, 1);
  EXPECT_THAT(reg.Join(Rank(4, "a:1")), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("rank 4 is out of range")));
  EXPECT_THAT(reg.Join(Rank(-1, "a:1")), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("out of range")));
  EXPECT_THAT(reg.Join(Rank(0, "a:1")),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("one of the coordinator's 1 local workers")));
  internal::JoinRequest sized = Rank(2, "a:1");
  sized.set_tensor_parallel_size(8);
  EXPECT_THAT(reg.Join(sized), StatusIs(absl::StatusCode::kInvalidArgument,
                                        HasSubstr("--tensor-parallel-size 8, the coordinator serves 4")));
  EXPECT_THAT(reg.Join(Rank(2, "")), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("worker_address")));
  internal::JoinRequest none;
  none.set_worker_address("a:1");
  EXPECT_THAT(reg.Join(none), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("names no rank")));
  EXPECT_EQ(reg.changes(), 0u);
  EXPECT_TRUE(rec.changes.empty());
}

TEST(JoinRegistryTest, LeaderWorkerSetSlotsMapToRanks) {
  // Leader with 2 local devices, pods of 2 devices, 3 pods: ranks 0..5, pods 1 and 2 join 2..5.
  Recorder rec;
  JoinRegistry reg = rec.Make(6, 2);
  EXPECT_EQ(*reg.Join(Lws(1, 3, 0, 2, "p1:1")), 2);
  EXPECT_EQ(*reg.Join(Lws(1, 3, 1, 2, "p1:2")), 3);
  EXPECT_EQ(*reg.Join(Lws(2, 3, 1, 2, "p2:2")), 5);
  EXPECT_EQ(*reg.Join(Lws(2, 3, 0, 2, "p2:1")), 4);
  EXPECT_TRUE(reg.complete());
  // A leader that runs no worker: pods 1 and 2 of 3 are ranks 0 and 1.
  JoinRegistry cpu_leader = rec.Make(2, 0);
  EXPECT_EQ(*cpu_leader.Join(Lws(2, 3, 0, 1, "b:1")), 1);
  EXPECT_EQ(*cpu_leader.Join(Lws(1, 3, 0, 1, "a:1")), 0);
  // Mismatches: LWS_GROUP_SIZE 4 makes 3 ranks; index 0 is the leader; device outside the pod.
  EXPECT_THAT(cpu_leader.Join(Lws(1, 4, 0, 1, "c:1")),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("LWS_GROUP_SIZE 4")));
  EXPECT_THAT(cpu_leader.Join(Lws(0, 3, 0, 1, "c:1")),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("index 0 is the leader")));
  EXPECT_THAT(cpu_leader.Join(Lws(1, 3, 2, 2, "c:1")),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("local device 2 outside [0, 2)")));
}

TEST(JoinRegistryTest, ADuplicateRankHeldByALiveWorkerIsRefused) {
  Recorder rec;
  JoinRegistry reg = rec.Make(2, 0);
  ASSERT_TRUE(reg.Join(Rank(1, "first:1", 100)).ok());
  rec.alive.insert("first:1");
  EXPECT_THAT(reg.Join(Rank(1, "second:1", 200)),
              StatusIs(absl::StatusCode::kAlreadyExists, HasSubstr("already held by the worker at first:1")));
  EXPECT_THAT(reg.addresses(), ElementsAre("", "first:1"));
  EXPECT_EQ(rec.changes.size(), 1u);
}

TEST(JoinRegistryTest, ARestartedWorkerReplacesTheDeadOne) {
  Recorder rec;
  JoinRegistry reg = rec.Make(2, 0);
  ASSERT_TRUE(reg.Join(Rank(0, "w:1", 100)).ok());
  ASSERT_TRUE(reg.Join(Rank(1, "old:1", 100)).ok());
  // The old process is gone (does not answer): a new one, new address, takes the rank.
  ASSERT_TRUE(reg.Join(Rank(1, "new:2", 200)).ok());
  EXPECT_THAT(reg.addresses(), ElementsAre("w:1", "new:2"));
  ASSERT_EQ(rec.changes.size(), 3u);
  EXPECT_EQ(rec.changes.back().first.address, "new:2");
  EXPECT_EQ(rec.changes.back().second.address, "old:1");
  // A restart on the same address (a fixed port) replaces it without asking.
  rec.alive.insert("new:2");
  ASSERT_TRUE(reg.Join(Rank(1, "new:2", 300)).ok());
  EXPECT_EQ(rec.changes.back().first.instance_id, 300u);
  EXPECT_EQ(rec.changes.back().second.instance_id, 200u);
}

TEST(JoinRegistryTest, ServedOverGrpcWithTheCoordinatorId) {
  Recorder rec;
  JoinRegistry reg = rec.Make(2, 0);
  WorkerJoinService service(&reg, 0xabc);
  grpc::ServerBuilder b;
  int port = 0;
  AddInternalListeningPort(b, "127.0.0.1:0", &port);
  b.RegisterService(&service);
  std::unique_ptr<grpc::Server> server = b.BuildAndStart();
  ASSERT_NE(server, nullptr);
  auto stub = internal::WorkerJoin::NewStub(InternalChannel("127.0.0.1:" + std::to_string(port)));
  auto call = [&](const internal::JoinRequest& req, internal::JoinResponse* resp) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    return stub->Join(&ctx, req, resp);
  };
  internal::JoinResponse resp;
  ASSERT_TRUE(call(Rank(1, "x:1"), &resp).ok());
  EXPECT_EQ(resp.rank(), 1);
  EXPECT_EQ(resp.tensor_parallel_size(), 2);
  EXPECT_EQ(resp.coordinator_id(), 0xabcu);
  EXPECT_EQ(resp.missing_ranks(), 1);
  const grpc::Status bad = call(Rank(5, "y:1"), &resp);
  EXPECT_EQ(bad.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(bad.error_message(), HasSubstr("rank 5 is out of range"));
  server->Shutdown();
}

}  // namespace
}  // namespace lorc
