// Memory of device-resident KV policy states (kvpolicy/README.md "State memory"): one rule for
// the coordinator, which counts the positions the running sequences' states hold, and for the
// workers, which set that memory aside from the KV budget at load and grow each state by it.
//
// A state of n positions (a sequence's computed tokens) holds DeviceStateCapacity(n) positions
// of per-(layer, KV head) arrays; the coordinator keeps the sum of those over the running
// sequences (a parent's unforked children counted as copies of it) within the workers'
// kv_policy_max_positions, and a worker sizes that number as PositionsPerSlot cache slots'
// worth (ModelRunner::AllocateCache). The rule depends on the count alone, not on how the state
// grew, so both sides agree without talking.
#pragma once

#include <cstdint>

#include "absl/types/span.h"
#include "kvpolicy/kv_policy_config.h"
#include "kvpolicy/sequence_policy.h"

namespace lorc::kvpolicy {

// Positions a device-resident state's arrays grow by, and round up to: small enough that short
// requests hold little beside their tokens, large enough that a decoding sequence regrows (one
// allocation and copy of its arrays) once per this many steps.
inline constexpr int64_t kDeviceStateGranule = 256;

// Positions the arrays of a state of `positions` (>= 0) hold: rounded up to kDeviceStateGranule
// (0 for 0).
int64_t DeviceStateCapacity(int64_t positions);
// The most positions a state may have within `capacity` (>= 0) held positions: the largest n with
// DeviceStateCapacity(n) <= capacity.
int64_t PositionsWithin(int64_t capacity);

// Positions per cache slot a worker provides state memory for (kv_policy_max_positions = cache
// slots x this), the share of a slot a kept position takes when the budget holds:
//  - a fractional budget b (--kv-token-budget 0.3): CORM 1 / b (every kept position is a full
//    slot); MiKV 1 / (b + (1 - b) q), q the largest share of a slot region a low entry takes
//    (LowEntryBytes / k_slot_bytes or v_slot_bytes over `layers`);
//  - budget-free or a count budget: defaults::kPositionsPerSlot (the fixture's budget-free runs
//    kept 24-42 % of the bytes: docs/KV_POLICIES.md);
// clamped to [1, defaults::kMaxPositionsPerSlot]. Requires config.enabled().
double PositionsPerSlot(const KvPolicyConfig& config, absl::Span<const LayerShape> layers);

// A worker's KV pool and its policy states from one budget (ModelRunner::AllocateCache): the
// blocks of `bytes_per_block` (> 0) that `budget` bytes hold when each of a block's `block_size`
// slots also carries `positions_per_slot` positions of `bytes_per_position` state bytes
// (<= 0 budget: 0 blocks).
int64_t BlocksWithStates(int64_t budget, int64_t bytes_per_block, int32_t block_size, double positions_per_slot,
                         int64_t bytes_per_position);
// The positions the states of a pool of `num_blocks` may hold together (kv_policy_max_positions):
// floor(num_blocks x block_size x positions_per_slot).
int64_t MaxPositions(int64_t num_blocks, int32_t block_size, double positions_per_slot);

}  // namespace lorc::kvpolicy
