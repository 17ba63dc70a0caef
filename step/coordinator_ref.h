// How a coordinator names itself to its workers (proto/lorcserve/internal/worker.proto:
// CoordinatorId, or client metadata on the step calls). Both sides use it; the worker's
// Ownership (worker/ownership.h) decides whom it serves.
#pragma once

#include <cstdint>
#include <string>

namespace lorc {

// gRPC client metadata naming the coordinator on calls whose messages cannot (Steps, Step).
inline constexpr char kCoordinatorIdMetadata[] = "lorc-coordinator-id";            // decimal
inline constexpr char kCoordinatorAddressMetadata[] = "lorc-coordinator-address";

struct CoordinatorRef {
  uint64_t id = 0;      // 0: not given
  std::string address;  // for messages only
};

// "coordinator 0x00c0ffee00c0ffee (at host:port)".
std::string DescribeCoordinator(const CoordinatorRef& c);

// A random nonzero coordinator id.
uint64_t NewCoordinatorId();

}  // namespace lorc
