// The host KV tier of a backend (Backend::CreateHostKvStorage / OffloadKvBlocks / LoadKvBlocks /
// WaitKvTransfers / SynchronizeKvTransfers; issue #10): the tier returns exactly the bytes it
// was given, for the cache geometry of every --kv-cache-dtype and of a LoRC latent spec (layers of
// different K and V widths), pairs apply in order, the stream ordering of backend.h holds, bad ids
// are rejected before anything is copied. Caches hold random bytes (a block is bytes, whatever its
// format), so the same checks run on the CPU backend (host_kv_test.cc) and on CUDA
// (cuda_host_kv_test.cc, skipped without a device). Test-only header, included by one file of
// each binary, which defines HostKvBackendKind() and instantiates HostKvTest.
#pragma once

#include <cstring>
#include <string>
#include <vector>

#include "kvstore/kv_spec.h"
#include "model/model_config.h"
#include "tests/backend/backend_ops_fixture.h"

namespace lorc {
namespace backend_test {

struct HostKvGeometry {
  const char* name;
  KvCacheDtype dtype;
  bool latent;  // LoRC ranks per layer (different K and V widths, some not multiples of 32)
};

inline void PrintTo(const HostKvGeometry& g, std::ostream* os) { *os << g.name; }

inline std::string GeometryName(const ::testing::TestParamInfo<HostKvGeometry>& i) {
  return i.param.name;
}

const HostKvGeometry kHostKvGeometries[] = {
    {"Auto", KvCacheDtype::kAuto, false},     {"Bf16", KvCacheDtype::kBf16, false},
    {"Fp8", KvCacheDtype::kFp8, false},       {"Int8", KvCacheDtype::kInt8, false},
    {"Int4", KvCacheDtype::kInt4, false},     {"LorcAuto", KvCacheDtype::kAuto, true},
    {"LorcInt4", KvCacheDtype::kInt4, true},  {"LorcInt8", KvCacheDtype::kInt8, true},
};

// The backend the including binary tests (defined there).
BackendKind HostKvBackendKind();

class HostKvTest : public ::testing::TestWithParam<HostKvGeometry> {
 protected:
  static constexpr int32_t kBlockSize = 4;
  static constexpr int32_t kNumBlocks = 8;
  static constexpr int32_t kSlots = 5;

  void SetUp() override {
    BackendOptions opts;
    opts.kind = HostKvBackendKind();
    absl::StatusOr<std::unique_ptr<Backend>> b = CreateBackend(opts);
    if (!b.ok()) {
      auto devices = ListCudaDevices();
      if (absl::IsUnimplemented(b.status()) || !devices.ok() || devices->empty()) {
        GTEST_SKIP() << "no such backend here (" << b.status() << ")";
      }
      FAIL() << b.status();
    }
    be_ = std::move(*b);
    // A 3-layer model with 2 KV heads of 64 (full) or LoRC ranks 64/40, 48/24, 16/32 per head.
    ModelConfig config;
    config.num_layers = 3;
    config.num_heads = 4;
    config.num_kv_heads = 2;
    config.head_dim = 64;
    config.hidden_size = 256;
    if (GetParam().latent) {
      LorcConfig lorc;
      lorc.method = "svd";
      lorc.layers = {{64, 40}, {48, 24}, {16, 32}};
      config.lorc = lorc;
    }
    KvSpecOptions so;
    so.block_size = kBlockSize;
    so.dtype = be_->compute_dtype();
    so.kv_cache_dtype = GetParam().dtype;
    absl::StatusOr<KvCacheSpec> spec = MakeKvCacheSpec(config, so);
    ASSERT_TRUE(spec.ok()) << spec.status();
    spec_ = *spec;
    spec_.num_blocks = kNumBlocks;
    for (int l = 0; l < spec_.num_layers(); ++l) {
      KvLayer c{nullptr, nullptr, spec_.k_width[l], spec_.v_width[l], spec_.dtype};
      c.quant = spec_.quant();
      c.num_kv_heads = static_cast<int32_t>(spec_.num_kv_heads);
      c.block_size = kBlockSize;
      for (bool v : {false, true}) {
        auto buf = be_->Allocate(static_cast<size_t>(kNumBlocks) * KvLayerBlockBytes(c, v, kBlockSize));
        ASSERT_TRUE(buf.ok()) << buf.status();
        (v ? c.v : c.k) = buf->data();
        bufs_.push_back(std::move(*buf));
      }
      layers_.push_back(c);
    }
    Fill(0xA5);
    absl::StatusOr<HostKvStorage> host = be_->CreateHostKvStorage(layers_, kBlockSize, kSlots);
    ASSERT_TRUE(host.ok()) << host.status();
    host_ = std::move(*host);
  }

  // Every cache array filled with random bytes (seeded).
  void Fill(uint32_t seed) {
    std::mt19937 rng(seed);
    for (DeviceBuffer& b : bufs_) {
      std::vector<uint8_t> bytes(b.bytes());
      for (uint8_t& x : bytes) x = static_cast<uint8_t>(rng());
      ASSERT_OK(be_->CopyToDevice(b.data(), bytes.data(), bytes.size()));
    }
    ASSERT_OK(be_->Synchronize());
  }

  // Block `b`'s bytes, layer by layer, K then V: the slot layout.
  std::vector<uint8_t> BlockBytes(int32_t b) {
    std::vector<uint8_t> out;
    for (size_t l = 0; l < layers_.size(); ++l) {
      for (bool v : {false, true}) {
        const size_t n = static_cast<size_t>(KvLayerBlockBytes(layers_[l], v, kBlockSize));
        std::vector<uint8_t> part(n);
        const uint8_t* base = static_cast<const uint8_t*>(v ? layers_[l].v : layers_[l].k);
        EXPECT_OK(be_->CopyToHost(part.data(), base + b * n, n));
        EXPECT_OK(be_->Synchronize());
        out.insert(out.end(), part.begin(), part.end());
      }
    }
    return out;
  }
  std::vector<uint8_t> SlotBytes(int32_t s) {
    EXPECT_OK(be_->SynchronizeKvTransfers());
    return {host_.slot(s), host_.slot(s) + host_.slot_bytes()};
  }
  absl::Status Offload(std::vector<HostBlockCopy> c) {
    return be_->OffloadKvBlocks(layers_, kBlockSize, kNumBlocks, host_, c);
  }
  absl::Status Load(std::vector<HostBlockCopy> c) {
    return be_->LoadKvBlocks(layers_, kBlockSize, kNumBlocks, host_, c);
  }

  std::unique_ptr<Backend> be_;
  KvCacheSpec spec_;
  std::vector<DeviceBuffer> bufs_;
  std::vector<KvLayer> layers_;
  HostKvStorage host_;
};

TEST_P(HostKvTest, SlotsHoldWholeBlocksOfEveryLayer) {
  EXPECT_EQ(host_.num_slots(), kSlots);
  // The slot is exactly a block of the cache: BytesPerBlock (codes and scales included).
  EXPECT_EQ(host_.slot_bytes(), spec_.BytesPerBlock());
  EXPECT_EQ(host_.num_layers(), 3);
}

TEST_P(HostKvTest, ReturnsExactlyTheBytesItWasGiven) {
  std::vector<std::vector<uint8_t>> before(kNumBlocks);
  for (int32_t b = 0; b < kNumBlocks; ++b) before[b] = BlockBytes(b);
  ASSERT_OK(Offload({{3, 1}, {6, 4}, {0, 0}}));
  EXPECT_EQ(SlotBytes(1), before[3]);
  EXPECT_EQ(SlotBytes(4), before[6]);
  EXPECT_EQ(SlotBytes(0), before[0]);
  // The device blocks are overwritten (reused by other sequences) ...
  ASSERT_OK(be_->WaitKvTransfers());
  Fill(0x5A);
  std::vector<std::vector<uint8_t>> overwritten(kNumBlocks);
  for (int32_t b = 0; b < kNumBlocks; ++b) {
    overwritten[b] = BlockBytes(b);
    ASSERT_NE(overwritten[b], before[b]);
  }
  // ... and come back into other blocks.
  ASSERT_OK(Load({{5, 1}, {3, 4}, {7, 0}}));
  ASSERT_OK(be_->WaitKvTransfers());  // the compute stream reads them next
  EXPECT_EQ(BlockBytes(5), before[3]);
  EXPECT_EQ(BlockBytes(3), before[6]);
  EXPECT_EQ(BlockBytes(7), before[0]);
  for (int32_t b : {0, 1, 2, 4, 6}) EXPECT_EQ(BlockBytes(b), overwritten[b]) << "block " << b;
  // The host copy stays (an inclusive tier): a second load gives the same bytes.
  ASSERT_OK(Load({{2, 1}}));
  ASSERT_OK(be_->SynchronizeKvTransfers());
  EXPECT_EQ(BlockBytes(2), before[3]);
}

// Pairs apply in order and calls run in call order on the copy stream: a load right after an
// offload of the same slot reads the new bytes, with no wait in between.
TEST_P(HostKvTest, CopiesApplyInOrder) {
  const std::vector<uint8_t> b1 = BlockBytes(1), b2 = BlockBytes(2);
  ASSERT_OK(Offload({{1, 3}, {2, 3}}));  // slot 3: block 1's bytes, then block 2's
  ASSERT_OK(Load({{4, 3}}));
  ASSERT_OK(Offload({{1, 3}}));          // slot 3 again: block 1
  ASSERT_OK(Load({{5, 3}, {6, 3}}));
  ASSERT_OK(be_->WaitKvTransfers());
  EXPECT_EQ(BlockBytes(4), b2);
  EXPECT_EQ(BlockBytes(5), b1);
  EXPECT_EQ(BlockBytes(6), b1);
}

// An offload reads the block as the compute stream left it before the call, and a compute-stream
// write after WaitKvTransfers does not reach the slot.
TEST_P(HostKvTest, ComputeStreamOrdering) {
  const size_t k0 = static_cast<size_t>(KvLayerBlockBytes(layers_[0], false, kBlockSize));
  // Enqueued on the compute stream before the offload: the slot must see it.
  ASSERT_OK(be_->Memset(static_cast<uint8_t*>(layers_[0].k) + 2 * k0, 0x11, k0));
  ASSERT_OK(Offload({{2, 0}}));
  ASSERT_OK(be_->WaitKvTransfers());
  // After the wait: must not reach the slot.
  ASSERT_OK(be_->Memset(static_cast<uint8_t*>(layers_[0].k) + 2 * k0, 0x22, k0));
  const std::vector<uint8_t> slot = SlotBytes(0);
  for (size_t i = 0; i < k0; ++i) ASSERT_EQ(slot[i], 0x11) << "byte " << i;
  // A load, then a compute-stream read after WaitKvTransfers sees the loaded bytes.
  ASSERT_OK(Load({{3, 0}}));
  ASSERT_OK(be_->WaitKvTransfers());
  std::vector<uint8_t> got(k0);
  ASSERT_OK(be_->CopyToHost(got.data(), static_cast<uint8_t*>(layers_[0].k) + 3 * k0, k0));
  ASSERT_OK(be_->Synchronize());
  EXPECT_EQ(got, std::vector<uint8_t>(k0, 0x11));
}

TEST_P(HostKvTest, BadIdsAreRejectedBeforeAnythingIsCopied) {
  const std::vector<uint8_t> slot0 = SlotBytes(0), block6 = BlockBytes(6);
  EXPECT_THAT(Offload({{1, 0}, {kNumBlocks, 1}}),
              ::lorc::testing::StatusIs(absl::StatusCode::kInvalidArgument,
                       ::testing::AllOf(::testing::HasSubstr("kv_offloads 1"),
                                        ::testing::HasSubstr("block 8 outside the cache of 8"))));
  EXPECT_THAT(Offload({{1, 0}, {2, kSlots}}),
              ::lorc::testing::StatusIs(absl::StatusCode::kInvalidArgument,
                       ::testing::HasSubstr("slot 5 outside the host KV pool of 5 slots")));
  EXPECT_THAT(Load({{6, 0}, {-1, 0}}),
              ::lorc::testing::StatusIs(absl::StatusCode::kInvalidArgument, ::testing::HasSubstr("kv_loads 1: block -1")));
  EXPECT_THAT(Load({{6, -1}}), ::lorc::testing::StatusIs(absl::StatusCode::kInvalidArgument, ::testing::HasSubstr("slot -1")));
  EXPECT_EQ(SlotBytes(0), slot0);
  EXPECT_EQ(BlockBytes(6), block6);
  // Storage made for another geometry.
  std::vector<KvLayer> fewer(layers_.begin(), layers_.begin() + 2);
  EXPECT_THAT(be_->OffloadKvBlocks(fewer, kBlockSize, kNumBlocks, host_, {{0, 0}}),
              ::lorc::testing::StatusIs(absl::StatusCode::kInvalidArgument, ::testing::HasSubstr("2")));
  EXPECT_THAT(be_->LoadKvBlocks(layers_, 2 * kBlockSize, kNumBlocks / 2, host_, {{0, 0}}),
              ::lorc::testing::StatusIs(absl::StatusCode::kInvalidArgument, ::testing::HasSubstr("differ")));
  EXPECT_THAT(be_->CreateHostKvStorage(layers_, kBlockSize, 0).status(),
              ::lorc::testing::StatusIs(absl::StatusCode::kInvalidArgument, ::testing::HasSubstr("0 slots")));
}

}  // namespace backend_test
}  // namespace lorc
