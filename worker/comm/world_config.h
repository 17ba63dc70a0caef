// Layout of one communication group: which rank this process is and how many ranks there are.
#pragma once

#include <string>

#include "absl/status/status.h"

namespace lorc {

// An immutable value passed explicitly to whatever needs the layout (never a global). Rank r of a
// tensor-parallel group holds shard r of every sharded weight.
struct WorldConfig {
  int rank = 0;
  int world_size = 1;
};

// OK iff world_size >= 1 and 0 <= rank < world_size; InvalidArgument naming the values otherwise.
absl::Status ValidateWorldConfig(const WorldConfig& world);

// "rank 1 of 4".
std::string WorldConfigDebugString(const WorldConfig& world);

inline bool operator==(const WorldConfig& a, const WorldConfig& b) {
  return a.rank == b.rank && a.world_size == b.world_size;
}

}  // namespace lorc
