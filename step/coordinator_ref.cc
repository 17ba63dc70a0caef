#include "step/coordinator_ref.h"

#include <random>

#include "absl/strings/str_format.h"

namespace lorc {

std::string DescribeCoordinator(const CoordinatorRef& c) {
  return absl::StrFormat("coordinator 0x%016x (at %s)", c.id, c.address.empty() ? "?" : c.address);
}

uint64_t NewCoordinatorId() {
  std::random_device rd;
  uint64_t id = 0;
  while (id == 0) id = (static_cast<uint64_t>(rd()) << 32) ^ rd();
  return id;
}

}  // namespace lorc
