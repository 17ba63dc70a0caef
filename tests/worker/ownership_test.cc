// Which coordinator a worker serves: claims, refusals naming the owner, release when the owner
// closes its step stream, the lease (on a fake clock).
#include "worker/ownership.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/status_matchers.h"

namespace lorc {
namespace {

using ::lorc::testing::IsOk;
using ::lorc::testing::StatusIs;
using ::testing::AllOf;
using ::testing::HasSubstr;

const CoordinatorRef kA{0xA11CE, "a.example:1"};
const CoordinatorRef kB{0xB0B, "b.example:2"};

class OwnershipTest : public ::testing::Test {
 protected:
  absl::Time now_ = absl::FromUnixSeconds(1000);
  Ownership own_{absl::Seconds(30), [this] { return now_; }};

  std::optional<uint64_t> OwnerId() {
    std::optional<CoordinatorRef> o = own_.owner();
    return o.has_value() ? std::optional<uint64_t>(o->id) : std::nullopt;
  }
};

TEST_F(OwnershipTest, FirstClaimTakesAndOthersAreRefusedByName) {
  EXPECT_EQ(OwnerId(), std::nullopt);
  absl::StatusOr<uint64_t> a = own_.Begin(kA, /*claim=*/true, "LoadModel");
  ASSERT_THAT(a, IsOk());
  own_.End(*a, false);
  EXPECT_EQ(OwnerId(), kA.id);
  EXPECT_EQ(own_.owner()->address, kA.address);
  for (bool claim : {true, false}) {
    EXPECT_THAT(own_.Begin(kB, claim, "InitCommunicator"),
                StatusIs(absl::StatusCode::kFailedPrecondition,
                         AllOf(HasSubstr("InitCommunicator"), HasSubstr(DescribeCoordinator(kA)),
                               HasSubstr(DescribeCoordinator(kB)))));
  }
  EXPECT_EQ(OwnerId(), kA.id);
  // The owner may claim again (a group restart) and step.
  EXPECT_THAT(own_.Begin(kA, true, "InitCommunicator"), IsOk());
  EXPECT_THAT(own_.Begin(kA, false, "Steps"), IsOk());
}

TEST_F(OwnershipTest, StepsNeedAnOwnerAndCallsNeedAnId) {
  EXPECT_THAT(own_.Begin(kA, /*claim=*/false, "Steps"),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("no coordinator owns")));
  EXPECT_EQ(OwnerId(), std::nullopt);
  EXPECT_THAT(own_.Begin(CoordinatorRef{0, "x:1"}, true, "LoadModel"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr(kCoordinatorIdMetadata)));
  EXPECT_EQ(OwnerId(), std::nullopt);
}

TEST_F(OwnershipTest, ClosingTheStepStreamReleasesOnceNothingElseIsOpen) {
  const uint64_t load = *own_.Begin(kA, true, "LoadModel");
  const uint64_t stream = *own_.Begin(kA, false, "Steps");
  own_.End(stream, /*owner_closed_stream=*/true);
  EXPECT_EQ(OwnerId(), kA.id);  // LoadModel still running
  own_.End(load, false);
  const uint64_t stream2 = *own_.Begin(kA, false, "Steps");
  own_.End(stream2, /*owner_closed_stream=*/true);
  EXPECT_EQ(OwnerId(), std::nullopt);
  // A stale End (from before the release) does not touch the next owner.
  const uint64_t b = *own_.Begin(kB, true, "LoadModel");
  EXPECT_NE(b, stream2);
  own_.End(stream2, true);
  EXPECT_EQ(OwnerId(), kB.id);
}

// Found by a tester: a coordinator whose LoadModel failed (a truncated checkpoint) exited, and the
// worker refused the next coordinator for the 30 s lease.
TEST_F(OwnershipTest, AFailedSetupCallReleasesOnceNothingElseIsOpen) {
  for (const char* what : {"LoadModel", "InitCommunicator"}) {
    SCOPED_TRACE(what);
    const uint64_t ping_like = *own_.Begin(kA, true, "InitCommunicator");
    const uint64_t failed = *own_.Begin(kA, true, what);
    own_.EndFailedSetup(failed, what);
    EXPECT_EQ(OwnerId(), kA.id);  // another call of the owner is still open
    own_.End(ping_like, false);
    EXPECT_EQ(OwnerId(), kA.id);
    const uint64_t again = *own_.Begin(kA, true, what);  // the owner retries, fails again
    own_.EndFailedSetup(again, what);
    EXPECT_EQ(OwnerId(), std::nullopt);
    const uint64_t b = *own_.Begin(kB, true, "LoadModel");  // another coordinator takes it at once
    own_.End(b, /*owner_closed_stream=*/true);  // (and leaves it free for the next case)
    EXPECT_EQ(OwnerId(), std::nullopt);
  }
}

TEST_F(OwnershipTest, LeaseExpiresOnlyWhileTheOwnerIsSilentWithNothingOpen) {
  const uint64_t load = *own_.Begin(kA, true, "LoadModel");
  now_ += absl::Minutes(10);  // a long load: the call is open, no expiry
  EXPECT_THAT(own_.Begin(kB, true, "LoadModel"), StatusIs(absl::StatusCode::kFailedPrecondition));
  own_.End(load, false);
  now_ += absl::Seconds(29);
  own_.Touch(kB);  // someone else's Ping renews nothing
  EXPECT_EQ(OwnerId(), kA.id);
  own_.Touch(kA);  // the owner's Ping renews
  now_ += absl::Seconds(29);
  EXPECT_EQ(OwnerId(), kA.id);
  now_ += absl::Seconds(1);
  EXPECT_EQ(OwnerId(), std::nullopt);
  EXPECT_THAT(own_.Begin(kB, true, "LoadModel"), IsOk());
  EXPECT_EQ(OwnerId(), kB.id);
}

TEST_F(OwnershipTest, TheOwnersReleaseFreesAtOnceOrWhenItsLastCallEnds) {
  // A coordinator exiting after a failed step: the worker had ended the step stream itself (not
  // an owner close), so only the lease freed it and a restarted coordinator was refused for 30 s.
  absl::StatusOr<uint64_t> a = own_.Begin(kA, true, "LoadModel");
  ASSERT_THAT(a, IsOk());
  own_.End(*a, false);
  absl::StatusOr<uint64_t> steps = own_.Begin(kA, false, "Steps");
  ASSERT_THAT(steps, IsOk());
  own_.End(*steps, /*owner_closed_stream=*/false);  // the worker failed the stream
  EXPECT_EQ(OwnerId(), kA.id);
  EXPECT_FALSE(own_.Release(kB));  // not the owner: nothing changes
  EXPECT_FALSE(own_.Release(CoordinatorRef{0, ""}));
  EXPECT_EQ(OwnerId(), kA.id);
  EXPECT_TRUE(own_.Release(kA));
  EXPECT_EQ(OwnerId(), std::nullopt);
  EXPECT_THAT(own_.Begin(kB, true, "InitCommunicator"), IsOk());  // no lease to wait out

  // With a call of the owner's open, the release waits for it to end.
  Ownership own{absl::Seconds(30), [this] { return now_; }};
  absl::StatusOr<uint64_t> open = own.Begin(kA, true, "InitCommunicator");
  ASSERT_THAT(open, IsOk());
  EXPECT_TRUE(own.Release(kA));
  EXPECT_EQ(own.owner()->id, kA.id);
  EXPECT_THAT(own.Begin(kB, true, "InitCommunicator"), StatusIs(absl::StatusCode::kFailedPrecondition));
  own.End(*open, false);
  EXPECT_EQ(own.owner(), std::nullopt);
  absl::StatusOr<uint64_t> b = own.Begin(kB, true, "InitCommunicator");
  ASSERT_THAT(b, IsOk());
  own.End(*b, false);
  EXPECT_EQ(own.owner()->id, kB.id);  // the pending release was A's, not B's
}

TEST(CoordinatorIdTest, NewIdsAreNonzeroAndDiffer) {
  const uint64_t a = NewCoordinatorId(), b = NewCoordinatorId();
  EXPECT_NE(a, 0u);
  EXPECT_NE(a, b);
  EXPECT_EQ(DescribeCoordinator(kA), "coordinator 0x00000000000a11ce (at a.example:1)");
}

}  // namespace
}  // namespace lorc
