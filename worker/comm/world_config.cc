#include "worker/comm/world_config.h"

#include "absl/strings/str_cat.h"

namespace lorc {

absl::Status ValidateWorldConfig(const WorldConfig& world) {
  if (world.world_size < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("world_size must be >= 1, got ", world.world_size));
  }
  if (world.rank < 0 || world.rank >= world.world_size) {
    return absl::InvalidArgumentError(absl::StrCat("rank must be in [0, ", world.world_size,
                                                   "), got ", world.rank));
  }
  return absl::OkStatus();
}

std::string WorldConfigDebugString(const WorldConfig& world) {
  return absl::StrCat("rank ", world.rank, " of ", world.world_size);
}

}  // namespace lorc
