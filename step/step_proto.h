// Conversions between the step contract (step/step.h) and its wire form
// (proto/lorcserve/internal/worker.proto).
#pragma once

#include "absl/status/statusor.h"
#include "lorcserve/internal/worker.pb.h"
#include "step/step.h"

namespace lorc {

void StepPlanToProto(const StepPlan& plan, lorcserve::internal::StepPlan* out);
StepPlan StepPlanFromProto(const lorcserve::internal::StepPlan& p);
void StepResultToProto(const StepResult& r, lorcserve::internal::StepResult* out);
StepResult StepResultFromProto(const lorcserve::internal::StepResult& p);

}  // namespace lorc
