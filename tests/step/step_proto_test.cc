// The step contract's wire form: lossless round trips, and a decode step whose size does not
// grow with the context (the point of the incremental protocol); the load-time KV policy's
// round trip and its checks on arrival.
#include "step/step_proto.h"

#include <cmath>
#include <functional>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/status_matchers.h"

namespace lorc {
namespace {

using ::lorc::testing::StatusIs;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

TEST(StepProtoTest, PlanRoundTripKeepsEveryField) {
  StepPlan plan;
  plan.step_id = 42;
  ScheduledSequence a;
  a.seq_id = 7;
  a.new_token_ids = {0, 5, 9};
  a.num_computed_tokens = 0;
  a.num_scheduled_tokens = 3;
  a.new_block_ids = {4};
  a.session = true;
  a.sample = true;
  SamplingParams p;
  p.temperature = 0.7f;
  p.top_k = 20;
  p.top_p = 0.9f;
  p.min_p = 0.05f;
  p.repetition_penalty = 1.1f;
  p.seed = 123;
  a.params = p;
  ScheduledSequence b;
  b.seq_id = 8;
  b.num_computed_tokens = 4097;
  b.num_scheduled_tokens = 1;
  plan.seqs = {a, b};
  plan.copies = {{3, 5}};
  plan.finished = {1, 2};
  plan.preempted = {9};
  lorcserve::internal::StepPlan msg;
  StepPlanToProto(plan, &msg);
  const StepPlan back = StepPlanFromProto(msg);
  EXPECT_EQ(back.step_id, 42u);
  ASSERT_EQ(back.seqs.size(), 2u);
  EXPECT_EQ(back.seqs[0].new_token_ids, a.new_token_ids);
  EXPECT_EQ(back.seqs[0].new_block_ids, a.new_block_ids);
  EXPECT_EQ(back.seqs[0].num_scheduled_tokens, 3);
  EXPECT_TRUE(back.seqs[0].sample);
  EXPECT_TRUE(back.seqs[0].session);
  EXPECT_FALSE(back.seqs[1].session);
  ASSERT_TRUE(back.seqs[0].params.has_value());
  EXPECT_EQ(back.seqs[0].params->top_k, 20);
  EXPECT_FLOAT_EQ(back.seqs[0].params->min_p, 0.05f);
  EXPECT_EQ(back.seqs[0].params->seed, std::optional<uint64_t>(123));
  EXPECT_EQ(back.seqs[1].num_computed_tokens, 4097);
  EXPECT_FALSE(back.seqs[1].params.has_value());
  EXPECT_FALSE(back.seqs[1].sample);
  ASSERT_EQ(back.copies.size(), 1u);
  EXPECT_EQ(back.copies[0].src, 3);
  EXPECT_EQ(back.copies[0].dst, 5);
  EXPECT_THAT(back.finished, ElementsAre(1, 2));
  EXPECT_THAT(back.preempted, ElementsAre(9));
}

// The host KV tier's copies keep their order and both ids; a plan of copies alone is not empty
// (the scheduler sends it).
TEST(StepProtoTest, PlanRoundTripKeepsHostKvCopiesInOrder) {
  StepPlan plan;
  plan.step_id = 3;
  plan.kv_offloads = {{7, 0}, {2, 31}, {7, 5}};
  plan.kv_loads = {{4, 31}, {0, 2}};
  EXPECT_FALSE(plan.empty());
  lorcserve::internal::StepPlan msg;
  StepPlanToProto(plan, &msg);
  ASSERT_EQ(msg.kv_offloads_size(), 3);
  EXPECT_EQ(msg.kv_offloads(1).block(), 2);
  EXPECT_EQ(msg.kv_offloads(1).slot(), 31);
  const StepPlan back = StepPlanFromProto(msg);
  EXPECT_THAT(back.kv_offloads, ElementsAre(HostBlockCopy{7, 0}, HostBlockCopy{2, 31}, HostBlockCopy{7, 5}));
  EXPECT_THAT(back.kv_loads, ElementsAre(HostBlockCopy{4, 31}, HostBlockCopy{0, 2}));
  StepPlan only_loads;
  only_loads.kv_loads = {{1, 1}};
  EXPECT_FALSE(only_loads.empty());
  EXPECT_TRUE(StepPlan{}.empty());
  // Absent on the wire: none.
  const StepPlan none = StepPlanFromProto(lorcserve::internal::StepPlan());
  EXPECT_TRUE(none.kv_offloads.empty());
  EXPECT_TRUE(none.kv_loads.empty());
}

// KV policy compactions (plan) and slot reports (result) keep their order and every field; a
// plan with only a compaction is not empty (it must reach the workers).
TEST(StepProtoTest, KvCompactionsAndSlotReportsRoundTrip) {
  StepPlan plan;
  plan.step_id = 9;
  plan.kv_compactions = {{12, 40}, {3, 17}};
  EXPECT_FALSE(plan.empty());
  lorcserve::internal::StepPlan msg;
  StepPlanToProto(plan, &msg);
  const StepPlan back = StepPlanFromProto(msg);
  ASSERT_EQ(back.kv_compactions.size(), 2u);
  EXPECT_EQ(back.kv_compactions[0].seq_id, 12);
  EXPECT_EQ(back.kv_compactions[0].num_slots, 40);
  EXPECT_EQ(back.kv_compactions[1].seq_id, 3);
  EXPECT_EQ(back.kv_compactions[1].num_slots, 17);
  StepResult r;
  r.step_id = 9;
  r.kv_slots = {{12, 100, 32, 57, 6}, {3, 20, 0, 11}};
  lorcserve::internal::StepResult rmsg;
  StepResultToProto(r, &rmsg);
  const StepResult rback = StepResultFromProto(rmsg);
  ASSERT_EQ(rback.kv_slots.size(), 2u);
  EXPECT_EQ(rback.kv_slots[0].seq_id, 12);
  EXPECT_EQ(rback.kv_slots[0].num_computed_tokens, 100);
  EXPECT_EQ(rback.kv_slots[0].compact_from, 32);
  EXPECT_EQ(rback.kv_slots[0].slots_needed, 57);
  EXPECT_EQ(rback.kv_slots[0].low_in_slots, 6);
  EXPECT_EQ(rback.kv_slots[1].slots_needed, 11);
  EXPECT_EQ(rback.kv_slots[1].low_in_slots, 0);
}

TEST(StepProtoTest, ResultRoundTripKeepsFailedSequencesAndTheirStatus) {
  StepResult r;
  r.step_id = 5;
  r.sampled = {{1, 10}, {2, 20}};
  r.failed = {{3, absl::InvalidArgumentError("token id 5000 outside the vocabulary")}};
  r.compute_us = 1234;
  r.idle_us = 56;
  lorcserve::internal::StepResult msg;
  StepResultToProto(r, &msg);
  const StepResult back = StepResultFromProto(msg);
  EXPECT_EQ(back.step_id, 5u);
  ASSERT_EQ(back.sampled.size(), 2u);
  EXPECT_EQ(back.sampled[1].token, 20);
  ASSERT_EQ(back.failed.size(), 1u);
  EXPECT_EQ(back.failed[0].seq_id, 3);
  EXPECT_THAT(back.failed[0].status,
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("token id 5000")));
  EXPECT_EQ(back.compute_us, 1234);
  EXPECT_EQ(back.idle_us, 56);
  // A failure reported with code OK (a broken peer) still fails the sequence.
  msg.mutable_failed(0)->set_code(0);
  EXPECT_THAT(StepResultFromProto(msg).failed[0].status, StatusIs(absl::StatusCode::kInternal));
}

TEST(StepProtoTest, ADecodeStepsBytesDoNotGrowWithTheContext) {
  // 64 decoding sequences, as the scheduler sends them, at 128 and at 32k tokens of context.
  auto bytes = [](int64_t context) {
    StepPlan plan;
    plan.step_id = 1000;
    for (int64_t i = 0; i < 64; ++i) {
      ScheduledSequence s;
      s.seq_id = 1000 + i;
      s.num_computed_tokens = context;
      s.num_scheduled_tokens = 1;
      s.sample = true;
      plan.seqs.push_back(s);
    }
    lorcserve::internal::StepPlan msg;
    StepPlanToProto(plan, &msg);
    return msg.ByteSizeLong();
  };
  EXPECT_LE(bytes(32768), bytes(128) + 64);  // varints of num_computed_tokens: a byte each
  EXPECT_LT(bytes(32768), 1024u);
}

// LoadModelRequest.kv_policy: every field survives (both policies, both budgets, both prefill
// modes, 2 bits), and what a worker receives is checked as the flags are, naming the field.
TEST(StepProtoTest, KvPolicyRoundTripKeepsEveryFieldAndChecksOnArrival) {
  kvpolicy::KvPolicyConfig a;
  a.kind = kvpolicy::KvPolicyKind::kMikv;
  a.window = 7;
  a.recent = 5;
  a.sinks = 2;
  a.budget_fraction = 0.3;
  a.low_bits = 2;
  a.prefill = kvpolicy::KvPolicyPrefill::kEveryChunk;
  a.prefill_interval = 96;
  kvpolicy::KvPolicyConfig b;
  b.kind = kvpolicy::KvPolicyKind::kCorm;
  b.budget_tokens = 512;
  for (const kvpolicy::KvPolicyConfig& c : {a, b}) {
    lorcserve::internal::KvPolicy p;
    KvPolicyToProto(c, &p);
    absl::StatusOr<kvpolicy::KvPolicyConfig> back = KvPolicyFromProto(p);
    ASSERT_TRUE(back.ok()) << back.status();
    EXPECT_EQ(back->Describe(), c.Describe());
    EXPECT_EQ(back->kind, c.kind);
    EXPECT_EQ(back->window, c.window);
    EXPECT_EQ(back->recent, c.recent);
    EXPECT_EQ(back->sinks, c.sinks);
    EXPECT_EQ(back->budget_fraction, c.budget_fraction);
    EXPECT_EQ(back->budget_tokens, c.budget_tokens);
    EXPECT_EQ(back->low_bits, c.low_bits);
    EXPECT_EQ(back->prefill, c.prefill);
    EXPECT_EQ(back->prefill_interval, c.prefill_interval);
  }
  lorcserve::internal::KvPolicy good;
  KvPolicyToProto(a, &good);
  auto bad = [&](const std::function<void(lorcserve::internal::KvPolicy*)>& edit) {
    lorcserve::internal::KvPolicy p = good;
    edit(&p);
    return KvPolicyFromProto(p).status();
  };
  EXPECT_THAT(bad([](auto* p) { p->set_kind("h2o"); }),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("kv_policy.kind: --kv-policy: 'h2o'")));
  EXPECT_THAT(bad([](auto* p) { p->set_prefill(""); }),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("kv_policy.prefill")));
  EXPECT_THAT(bad([](auto* p) { p->set_prefill_interval(-5); }),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("prefill_interval: -5")));
  EXPECT_THAT(bad([](auto* p) { p->set_window(0); }),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("--kv-policy-window")));
  EXPECT_THAT(bad([](auto* p) { p->set_low_bits(3); }),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("--kv-policy-low-bits")));
  EXPECT_THAT(bad([](auto* p) { p->set_budget_fraction(std::nan("")); }),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("--kv-token-budget")));
  EXPECT_THAT(bad([](auto* p) { p->set_budget_tokens(100); }),  // and a fraction: one of the two
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("--kv-token-budget")));
}

}  // namespace
}  // namespace lorc
