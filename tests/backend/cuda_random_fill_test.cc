// Random weights on the GPU (CudaBackend::FillWeights, kernels/random_fill.cu) against the CPU
// backend, the reference: BF16 blocks equal the CPU's fp32 values rounded to nearest even bit
// for bit (F32 blocks equal them exactly), for odd shapes, column slices, strided outputs and
// index offsets past 2^32; and RandomWeights of a small model on CUDA equal RandomWeights on the
// CPU rounded to BF16, every buffer of every rank. Skipped without a CUDA device.
#include <cmath>
#include <cstring>
#include <vector>

#include "common/check.h"
#include "model/weights.h"
#include "tests/backend/cuda_parity_fixture.h"

namespace lorc {
namespace {

using ::lorc::testing::StatusIs;
using ::testing::HasSubstr;

class CudaRandomFillTest : public CpuCudaPair<> {
 protected:
  // The bytes of `b` (n bytes) on the host.
  std::vector<uint8_t> Host(Backend& be, const void* p, size_t n) {
    std::vector<uint8_t> h(n);
    CHECK_OK(be.CopyToHost(h.data(), p, n));
    CHECK_OK(be.Synchronize());
    return h;
  }
  // fp32 values -> the bytes of their BF16 rounding.
  static std::vector<uint8_t> Bf16Bytes(const float* v, size_t n) {
    std::vector<uint16_t> b(n);
    for (size_t i = 0; i < n; ++i) b[i] = F32ToBf16(v[i]);
    std::vector<uint8_t> out(n * 2);
    std::memcpy(out.data(), b.data(), out.size());
    return out;
  }
};

struct Block {
  int64_t rows, cols, row0, col0, full_cols, ld;
};

TEST_F(CudaRandomFillTest, BlocksEqualTheCpuValuesRoundedToBf16) {
  const uint64_t key = 0x0123456789abcdefull;
  const float scale = 0.02f * std::sqrt(3.0f);
  for (const Block& b : {Block{3, 5, 7, 2, 11, 0}, Block{1, 1, 0, 0, 1, 0}, Block{257, 4096, 0, 0, 4096, 0},
                         Block{128, 1000, 3, 1000, 14336, 0},       // a column slice (down_proj)
                         Block{64, 33, 9, 77, 200, 40},              // strided output
                         Block{40, 96, 123456789, 4000, 5000, 0},    // offsets past 2^32
                         Block{3, 700, int64_t{1} << 31, 5, 1 << 12, 0},
                         Block{9000, 16, 0, 0, 16, 0}}) {            // more rows than the grid
    SCOPED_TRACE(::testing::Message() << "block " << b.rows << "x" << b.cols << " at (" << b.row0
                                      << ", " << b.col0 << ") of " << b.full_cols << " cols, ld " << b.ld);
    const int64_t ld = b.ld ? b.ld : b.cols;
    const size_t n = static_cast<size_t>(b.rows * ld);
    std::vector<float> ref(n, 0.0f);
    WeightFillParams p;
    p.out = Tensor2D{ref.data(), DType::kF32, b.rows, b.cols, b.ld};
    p.key = key;
    p.row0 = b.row0;
    p.col0 = b.col0;
    p.full_cols = b.full_cols;
    p.scale = scale;
    ASSERT_OK(cpu_->FillWeights(p));
    for (DType dt : {DType::kBF16, DType::kF32}) {
      const size_t bytes = n * DTypeSize(dt);
      auto buf = cuda_->Allocate(bytes);
      ASSERT_OK(buf);
      ASSERT_OK(cuda_->Memset(buf->data(), 0, bytes));  // the padding columns stay 0, as ref's
      p.out = Tensor2D{buf->data(), dt, b.rows, b.cols, b.ld};
      ASSERT_OK(cuda_->FillWeights(p));
      const std::vector<uint8_t> got = Host(*cuda_, buf->data(), bytes);
      std::vector<uint8_t> want(bytes);
      if (dt == DType::kBF16) {
        want = Bf16Bytes(ref.data(), n);
      } else {
        std::memcpy(want.data(), ref.data(), bytes);
      }
      EXPECT_TRUE(got == want) << DTypeName(dt) << " differs from the CPU";
    }
  }
}

TEST_F(CudaRandomFillTest, ConstantAndErrors) {
  auto buf = cuda_->Allocate(8 * 2);
  ASSERT_OK(buf);
  WeightFillParams p;
  p.out = Tensor2D{buf->data(), DType::kBF16, 1, 8};
  p.constant = true;
  p.value = 1.0f;
  ASSERT_OK(cuda_->FillWeights(p));
  const float ones[8] = {1, 1, 1, 1, 1, 1, 1, 1};
  EXPECT_TRUE(Host(*cuda_, buf->data(), 16) == Bf16Bytes(ones, 8));
  p.constant = false;
  p.full_cols = 4;
  EXPECT_THAT(cuda_->FillWeights(p), StatusIs(absl::StatusCode::kInvalidArgument,
                                              HasSubstr("cuda backend: FillWeights: block at row0 0")));
  p.full_cols = 8;
  p.out.dtype = DType::kF16;
  EXPECT_THAT(cuda_->FillWeights(p), StatusIs(absl::StatusCode::kUnimplemented, HasSubstr("F16")));
}

// Every weight buffer of every rank: CUDA's BF16 bytes == the CPU's fp32 values rounded.
TEST_F(CudaRandomFillTest, RandomWeightsEqualTheCpuModelRoundedToBf16) {
  ModelConfig c;
  c.num_heads = 8;
  c.num_kv_heads = 2;
  c.head_dim = 64;
  c.hidden_size = 512;
  c.intermediate_size = 1000;
  c.vocab_size = 1002;
  c.num_layers = 2;
  c.tie_word_embeddings = true;
  for (int32_t tp : {1, 2}) {
    for (int32_t rank = 0; rank < tp; ++rank) {
      SCOPED_TRACE(::testing::Message() << "rank " << rank << " of " << tp);
      auto s = ShardLayout::Make(c, rank, tp, /*shard_lm_head=*/tp == 2);
      ASSERT_OK(s);
      auto want = RandomWeights(c, 5, *s, *cpu_);
      ASSERT_OK(want);
      auto got = RandomWeights(c, 5, *s, *cuda_);
      ASSERT_OK(got);
      EXPECT_EQ(got->dtype, DType::kBF16);
      auto same = [&](const DeviceBuffer& g, const DeviceBuffer& w, const char* what) {
        ASSERT_EQ(g.bytes() * 2, w.bytes()) << what;
        EXPECT_TRUE(Host(*cuda_, g.data(), g.bytes()) == Bf16Bytes(w.as<float>(), w.bytes() / 4)) << what;
      };
      same(got->embed, want->embed, "embed");
      same(got->final_norm, want->final_norm, "final_norm");
      EXPECT_EQ(got->lm_head.empty(), want->lm_head.empty());
      if (!want->lm_head.empty()) same(got->lm_head, want->lm_head, "lm_head");
      for (size_t l = 0; l < want->layers.size(); ++l) {
        const LayerWeights &g = got->layers[l], &w = want->layers[l];
        same(g.input_norm, w.input_norm, "input_norm");
        same(g.post_norm, w.post_norm, "post_norm");
        same(g.qkv, w.qkv, "qkv");
        same(g.o, w.o, "o");
        same(g.gate_up, w.gate_up, "gate_up");
        same(g.down, w.down, "down");
      }
    }
  }
}

}  // namespace
}  // namespace lorc
