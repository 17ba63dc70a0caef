// Device-resident policy state memory (kvpolicy/state_memory.h): the positions per slot a worker
// sizes the states for, and how one budget splits between the KV pool and the states.
#include "kvpolicy/state_memory.h"

#include <cmath>
#include <vector>

#include "gtest/gtest.h"
#include "kvpolicy/low_precision.h"

namespace lorc::kvpolicy {
namespace {

// A bf16 full-KV layer of head_dim 128: 256-byte K and V regions per head and slot.
std::vector<LayerShape> Bf16Layers(int n) {
  LayerShape l;
  l.k_width = l.v_width = 128;
  l.k_slot_bytes = l.v_slot_bytes = 256;
  l.full_bytes = 512;
  l.balance_keys = true;
  return std::vector<LayerShape>(n, l);
}

KvPolicyConfig Policy(KvPolicyKind kind, double fraction, int bits = 4) {
  KvPolicyConfig c;
  c.kind = kind;
  c.budget_fraction = fraction;
  c.low_bits = bits;
  return c;
}

TEST(StateMemoryTest, PositionsPerSlotFollowTheBudget) {
  const std::vector<LayerShape> layers = Bf16Layers(2);
  // CORM at 30 %: a kept position is a full slot, a dropped one nothing.
  EXPECT_NEAR(PositionsPerSlot(Policy(KvPolicyKind::kCorm, 0.3), layers), 1 / 0.3, 1e-9);
  // MiKV int4 at 30 %: the other 70 % take a 68-byte entry of a 256-byte region each.
  const double q4 = static_cast<double>(LowEntryBytes(128, 4)) / 256;
  EXPECT_NEAR(PositionsPerSlot(Policy(KvPolicyKind::kMikv, 0.3), layers), 1 / (0.3 + 0.7 * q4), 1e-9);
  const double q2 = static_cast<double>(LowEntryBytes(128, 2)) / 256;
  EXPECT_NEAR(PositionsPerSlot(Policy(KvPolicyKind::kMikv, 0.3, 2), layers), 1 / (0.3 + 0.7 * q2), 1e-9);
  EXPECT_GT(PositionsPerSlot(Policy(KvPolicyKind::kMikv, 0.3, 2), layers),
            PositionsPerSlot(Policy(KvPolicyKind::kMikv, 0.3, 4), layers));
  // Budget-free and count budgets: the default; tiny budgets: the cap; a full budget: one.
  EXPECT_EQ(PositionsPerSlot(Policy(KvPolicyKind::kCorm, 0.0), layers), defaults::kPositionsPerSlot);
  KvPolicyConfig count = Policy(KvPolicyKind::kCorm, 0.0);
  count.budget_tokens = 512;
  EXPECT_EQ(PositionsPerSlot(count, layers), defaults::kPositionsPerSlot);
  EXPECT_EQ(PositionsPerSlot(Policy(KvPolicyKind::kCorm, 0.01), layers), defaults::kMaxPositionsPerSlot);
  EXPECT_EQ(PositionsPerSlot(Policy(KvPolicyKind::kMikv, 1.0), layers), 1.0);
}

TEST(StateMemoryTest, OneBudgetHoldsTheBlocksAndTheirStates) {
  // 8B shape per rank: 32 layers x 8 KV heads, bf16 d128: 128 KiB per slot, 16-slot blocks;
  // 13 bytes of state per (layer, head) and position.
  const int64_t slot_bytes = 32 * 8 * 512;
  const int64_t block_bytes = 16 * slot_bytes;
  const int64_t bpp = 13 * 32 * 8;
  const int64_t budget = int64_t{100} << 30;
  EXPECT_EQ(BlocksWithStates(budget, block_bytes, 16, 0.0, 0), budget / block_bytes);  // no states
  const double pps = 1 / 0.3;
  const int64_t blocks = BlocksWithStates(budget, block_bytes, 16, pps, bpp);
  const int64_t positions = MaxPositions(blocks, 16, pps);
  // Everything fits, and one more block would not.
  const double per_block = block_bytes + std::ceil(16 * pps) * bpp;
  EXPECT_LE(blocks * block_bytes + positions * bpp, budget);
  EXPECT_GT((blocks + 1) * per_block, budget);
  EXPECT_EQ(positions, static_cast<int64_t>(std::floor(blocks * 16 * pps)));
  // The states cost 1 - blocks / (budget / block_bytes): 3.3 x 13 / 512 = 8.5 % more bytes per slot, about 8 % fewer blocks.
  const double lost = 1.0 - static_cast<double>(blocks) / static_cast<double>(budget / block_bytes);
  EXPECT_NEAR(lost, 0.078, 0.01);
  EXPECT_EQ(BlocksWithStates(0, block_bytes, 16, pps, bpp), 0);
  EXPECT_EQ(BlocksWithStates(-5, block_bytes, 16, pps, bpp), 0);
}

}  // namespace
}  // namespace lorc::kvpolicy
