// A small client of the public API, shared by `lorcserve client`, `lorcserve bench` and tests:
// sampling flags -> GenerateRequest, and one streamed generation with its timings.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "cli/args.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "grpcpp/grpcpp.h"
#include "lorcserve/v1/lorcserve.grpc.pb.h"

namespace lorc::cli {

// --prompt / --prompt-ids and the sampling flags, as `generate` names them.
std::vector<FlagSpec> RequestFlags();
absl::StatusOr<lorcserve::v1::GenerateRequest> RequestFromArgs(const Args& args);

struct StreamResult {
  std::vector<int32_t> ids;
  std::string text;
  lorcserve::v1::GenerateResponse final;  // the final message (finish reason, usage)
  grpc::Status status;
  double ttft_s = 0;            // client-side: call start to first token
  std::vector<double> token_times_s;  // client-side arrival time of each token
  double total_s = 0;
};

// Runs one Generate call; `on_chunk` sees each message as it arrives (may be empty).
StreamResult StreamGenerate(lorcserve::v1::LorcServe::Stub& stub,
                            const lorcserve::v1::GenerateRequest& request, double timeout_s,
                            const std::function<void(const lorcserve::v1::GenerateResponse&)>& on_chunk = {});

std::shared_ptr<grpc::Channel> Connect(const std::string& address);

}  // namespace lorc::cli
