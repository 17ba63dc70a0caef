// Conversions between the step contract (step/step.h) and its wire form
// (proto/lorcserve/internal/worker.proto), and of the worker's load-time KV policy.
#pragma once

#include "absl/status/statusor.h"
#include "kvpolicy/kv_policy_config.h"
#include "lorcserve/internal/worker.pb.h"
#include "step/step.h"

namespace lorc {

void StepPlanToProto(const StepPlan& plan, lorcserve::internal::StepPlan* out);
StepPlan StepPlanFromProto(const lorcserve::internal::StepPlan& p);
void StepResultToProto(const StepResult& r, lorcserve::internal::StepResult* out);
StepResult StepResultFromProto(const lorcserve::internal::StepResult& p);
// One rank's report (WorkerGroup merges the ranks' reports from the messages).
void KvSlotReportToProto(const KvSlotReport& k, lorcserve::internal::KvSlotReport* out);
KvSlotReport KvSlotReportFromProto(const lorcserve::internal::KvSlotReport& p);

// LoadModelRequest.kv_policy, field for field.
void KvPolicyToProto(const kvpolicy::KvPolicyConfig& c, lorcserve::internal::KvPolicy* out);
// Back, then checked as the flags are (kvpolicy::ValidateKvPolicyConfig); InvalidArgument
// naming the field ("kv_policy.kind", "kv_policy.prefill") or the flag it stands for.
absl::StatusOr<kvpolicy::KvPolicyConfig> KvPolicyFromProto(const lorcserve::internal::KvPolicy& p);

}  // namespace lorc
