#include "kvpolicy/state_memory.h"

#include <algorithm>
#include <cmath>

#include "kvpolicy/low_precision.h"

namespace lorc::kvpolicy {

int64_t DeviceStateCapacity(int64_t positions) {
  if (positions <= 0) return 0;
  return (positions + kDeviceStateGranule - 1) / kDeviceStateGranule * kDeviceStateGranule;
}

int64_t PositionsWithin(int64_t capacity) {
  if (capacity <= 0) return 0;
  return capacity / kDeviceStateGranule * kDeviceStateGranule;
}

double PositionsPerSlot(const KvPolicyConfig& config, absl::Span<const LayerShape> layers) {
  double per_slot = defaults::kPositionsPerSlot;
  if (config.budget_fraction > 0.0) {
    const double b = config.budget_fraction;
    double q = 0.0;  // CORM: a dropped position takes nothing
    if (config.kind == KvPolicyKind::kMikv) {
      for (const LayerShape& l : layers) {
        if (l.k_slot_bytes > 0) {
          q = std::max(q, static_cast<double>(LowEntryBytes(l.k_width, config.low_bits)) / l.k_slot_bytes);
        }
        if (l.v_slot_bytes > 0) {
          q = std::max(q, static_cast<double>(LowEntryBytes(l.v_width, config.low_bits)) / l.v_slot_bytes);
        }
      }
    }
    per_slot = 1.0 / (b + (1.0 - b) * std::min(q, 1.0));
  }
  return std::clamp(per_slot, 1.0, defaults::kMaxPositionsPerSlot);
}

int64_t BlocksWithStates(int64_t budget, int64_t bytes_per_block, int32_t block_size, double positions_per_slot,
                         int64_t bytes_per_position) {
  if (budget <= 0 || bytes_per_block <= 0) return 0;
  const double per_block = static_cast<double>(bytes_per_block) +
                           std::ceil(static_cast<double>(block_size) * positions_per_slot) *
                               static_cast<double>(bytes_per_position);
  return static_cast<int64_t>(std::floor(static_cast<double>(budget) / per_block));
}

int64_t MaxPositions(int64_t num_blocks, int32_t block_size, double positions_per_slot) {
  return static_cast<int64_t>(std::floor(static_cast<double>(num_blocks) * block_size * positions_per_slot));
}

}  // namespace lorc::kvpolicy
