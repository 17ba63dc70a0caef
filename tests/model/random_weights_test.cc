// Seeded random weights: Backend::FillWeights on the CPU against the host formula that
// model/weights.cc used before generation moved to the backends (a reference copy below), for
// odd shapes, offsets past 2^32 and strided outputs; RandomWeights' tensor-parallel layout
// against slices of the reference's full tensors; the progress lines of both loaders.
#include <cmath>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "model/safetensors.h"
#include "model/weights.h"
#include "tests/testing/fixtures.h"
#include "tests/testing/status_matchers.h"

namespace lorc {
namespace {

using ::lorc::testing::StatusIs;
using ::testing::HasSubstr;
using ::testing::StartsWith;

// --- the reference: the host code of model/weights.cc before FillWeights ---------------------
uint64_t RefSplitMix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}
uint64_t RefKey(uint64_t seed, const std::string& name) {
  return RefSplitMix64(seed ^ std::hash<std::string>{}(name));
}
float RefValue(uint64_t key, int64_t r, int64_t c, int64_t full_cols) {
  const float a = 0.02f * std::sqrt(3.0f);
  const uint64_t idx = static_cast<uint64_t>(r * full_cols + c);
  const uint64_t h = RefSplitMix64(key + idx);
  const float u = static_cast<float>(h >> 40) * (1.0f / 16777216.0f);
  return (2.0f * u - 1.0f) * a;
}
// The full [rows, cols] tensor `name` of the model with `seed`.
std::vector<float> RefTensor(uint64_t seed, const std::string& name, int64_t rows, int64_t cols) {
  std::vector<float> v(static_cast<size_t>(rows * cols));
  const uint64_t key = RefKey(seed, name);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) v[r * cols + c] = RefValue(key, r, c, cols);
  }
  return v;
}
std::vector<float> RowsOf(const std::vector<float>& full, int64_t cols, int64_t r0, int64_t n) {
  return {full.begin() + r0 * cols, full.begin() + (r0 + n) * cols};
}
std::vector<float> ColsOf(const std::vector<float>& full, int64_t cols, int64_t c0, int64_t n) {
  std::vector<float> out;
  for (size_t r = 0; r < full.size() / cols; ++r) {
    out.insert(out.end(), full.begin() + r * cols + c0, full.begin() + r * cols + c0 + n);
  }
  return out;
}
void Append(std::vector<float>& a, const std::vector<float>& b) { a.insert(a.end(), b.begin(), b.end()); }

std::vector<uint32_t> Bits(const float* p, size_t n) {
  std::vector<uint32_t> b(n);
  std::memcpy(b.data(), p, n * sizeof(float));
  return b;
}
std::vector<uint32_t> Bits(const std::vector<float>& v) { return Bits(v.data(), v.size()); }
std::vector<uint32_t> Bits(const DeviceBuffer& b) { return Bits(b.as<float>(), b.bytes() / 4); }

class RandomFillTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto b = CreateBackend({});
    ASSERT_OK(b);
    cpu_ = std::move(*b);
  }
  std::unique_ptr<Backend> cpu_;
};

struct Block {
  int64_t rows, cols, row0, col0, full_cols, ld;
};

TEST_F(RandomFillTest, CpuFillEqualsTheHostFormulaBitForBit) {
  const float a = 0.02f * std::sqrt(3.0f);
  const uint64_t key = RefKey(1234, "model.layers.3.mlp.down_proj.weight");
  for (const Block& b : {Block{3, 5, 7, 2, 11, 0}, Block{1, 1, 0, 0, 1, 0}, Block{17, 33, 0, 0, 33, 40},
                         Block{9, 130, 5, 77, 1000, 131},
                         // index offsets past 2^32 (row0 * full_cols = 6.2e11) and past 2^40
                         Block{4, 29, 123456789, 4970, 5000, 0},
                         Block{2, 513, int64_t{1} << 31, 3, 1 << 10, 0},
                         // rows large enough for the cores to split them
                         Block{700, 2048, 11, 0, 2048, 0}}) {
    SCOPED_TRACE(::testing::Message() << "block " << b.rows << "x" << b.cols << " at (" << b.row0
                                      << ", " << b.col0 << ") of " << b.full_cols << " cols, ld " << b.ld);
    const int64_t ld = b.ld ? b.ld : b.cols;
    std::vector<float> out(static_cast<size_t>(b.rows * ld), -7.0f);
    WeightFillParams p;
    p.out = Tensor2D{out.data(), DType::kF32, b.rows, b.cols, b.ld};
    p.key = key;
    p.row0 = b.row0;
    p.col0 = b.col0;
    p.full_cols = b.full_cols;
    p.scale = a;
    ASSERT_OK(cpu_->FillWeights(p));
    std::vector<float> want(out.size(), -7.0f);  // the padding columns untouched
    for (int64_t r = 0; r < b.rows; ++r) {
      for (int64_t c = 0; c < b.cols; ++c) want[r * ld + c] = RefValue(key, b.row0 + r, b.col0 + c, b.full_cols);
    }
    EXPECT_EQ(Bits(out), Bits(want));
  }
}

TEST_F(RandomFillTest, ConstantFill) {
  std::vector<float> out(10, 0.0f);
  WeightFillParams p;
  p.out = Tensor2D{out.data(), DType::kF32, 2, 4, 5};
  p.constant = true;
  p.value = 1.0f;
  ASSERT_OK(cpu_->FillWeights(p));
  EXPECT_EQ(out, (std::vector<float>{1, 1, 1, 1, 0, 1, 1, 1, 1, 0}));
}

TEST_F(RandomFillTest, RejectsBadBlocksAndDtypes) {
  std::vector<float> out(64);
  WeightFillParams p;
  p.out = Tensor2D{out.data(), DType::kF32, 2, 8};
  p.full_cols = 8;
  p.col0 = 1;
  EXPECT_THAT(cpu_->FillWeights(p), StatusIs(absl::StatusCode::kInvalidArgument,
                                             HasSubstr("col0 1 of 8 columns outside a tensor of full_cols 8")));
  p.col0 = 0;
  p.row0 = -1;
  EXPECT_THAT(cpu_->FillWeights(p), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("row0 -1")));
  p.row0 = int64_t{1} << 62;
  EXPECT_THAT(cpu_->FillWeights(p), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("overflow")));
  p.row0 = 0;
  p.out.ld = 4;
  EXPECT_THAT(cpu_->FillWeights(p), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("ld 4")));
  p.out.ld = 0;
  p.out.dtype = DType::kBF16;
  EXPECT_THAT(cpu_->FillWeights(p), StatusIs(absl::StatusCode::kUnimplemented,
                                             HasSubstr("cpu backend: FillWeights: output dtype BF16")));
}

ModelConfig SmallConfig(bool tied) {
  ModelConfig c;
  c.num_heads = 4;
  c.num_kv_heads = 2;
  c.head_dim = 8;
  c.hidden_size = 40;  // not heads * head_dim: q_size 32 != hidden 40
  c.intermediate_size = 52;
  c.vocab_size = 60;
  c.num_layers = 2;
  c.tie_word_embeddings = tied;
  return c;
}

// Every buffer of every rank is the reference's full tensors, sliced and fused as weights.h
// documents: the tp splits are slices of the same full model.
TEST_F(RandomFillTest, RandomWeightsAreSlicesOfTheReferenceModel) {
  const uint64_t seed = 99;
  for (bool tied : {false, true}) {
    const ModelConfig c = SmallConfig(tied);
    const int64_t d = c.hidden_size, hd = c.head_dim, inter = c.intermediate_size;
    const std::vector<float> embed = RefTensor(seed, "model.embed_tokens.weight", c.vocab_size, d);
    const std::vector<float> head = tied ? embed : RefTensor(seed, "lm_head.weight", c.vocab_size, d);
    for (int32_t tp : {1, 2, 4}) {
      for (bool shard_head : {false, true}) {
        for (int32_t rank = 0; rank < tp; ++rank) {
          SCOPED_TRACE(::testing::Message() << "tied " << tied << ", rank " << rank << " of " << tp
                                            << ", shard_lm_head " << shard_head);
          auto s = ShardLayout::Make(c, rank, tp, shard_head);
          ASSERT_OK(s);
          auto w = RandomWeights(c, seed, *s, *cpu_);
          ASSERT_OK(w);
          EXPECT_EQ(Bits(w->embed), Bits(embed));
          EXPECT_EQ(Bits(w->final_norm), Bits(std::vector<float>(d, 1.0f)));
          if (s->lm_head_sharded || !tied) {
            EXPECT_EQ(Bits(w->lm_head), Bits(RowsOf(head, d, s->vocab_begin, s->vocab_size)));
          } else {
            EXPECT_TRUE(w->lm_head.empty());
          }
          ASSERT_EQ(w->layers.size(), 2u);
          for (int l = 0; l < 2; ++l) {
            const std::string p = "model.layers." + std::to_string(l) + ".";
            const LayerWeights& lw = w->layers[l];
            EXPECT_EQ(Bits(lw.input_norm), Bits(std::vector<float>(d, 1.0f)));
            EXPECT_EQ(Bits(lw.post_norm), Bits(std::vector<float>(d, 1.0f)));
            std::vector<float> qkv = RowsOf(RefTensor(seed, p + "self_attn.q_proj.weight", c.q_size(), d), d,
                                            s->head_begin * hd, s->num_heads * hd);
            for (const char* kv : {"self_attn.k_proj.weight", "self_attn.v_proj.weight"}) {
              Append(qkv, RowsOf(RefTensor(seed, p + kv, c.kv_size(), d), d, s->kv_head_begin * hd,
                                 s->num_kv_heads * hd));
            }
            EXPECT_EQ(Bits(lw.qkv), Bits(qkv));
            EXPECT_EQ(Bits(lw.o), Bits(ColsOf(RefTensor(seed, p + "self_attn.o_proj.weight", d, c.q_size()),
                                              c.q_size(), s->head_begin * hd, s->num_heads * hd)));
            std::vector<float> gate_up = RowsOf(RefTensor(seed, p + "mlp.gate_proj.weight", inter, d), d,
                                                s->inter_begin, s->inter_size);
            Append(gate_up, RowsOf(RefTensor(seed, p + "mlp.up_proj.weight", inter, d), d, s->inter_begin,
                                   s->inter_size));
            EXPECT_EQ(Bits(lw.gate_up), Bits(gate_up));
            EXPECT_EQ(Bits(lw.down), Bits(ColsOf(RefTensor(seed, p + "mlp.down_proj.weight", d, inter), inter,
                                                 s->inter_begin, s->inter_size)));
          }
        }
      }
    }
  }
}

TEST_F(RandomFillTest, RandomWeightsReportOneProgressLine) {
  const ModelConfig c = SmallConfig(false);
  auto s = ShardLayout::Make(c, 0, 1);
  ASSERT_OK(s);
  std::vector<std::string> lines;
  ASSERT_OK(RandomWeights(c, 7, *s, *cpu_, [&](const std::string& l) { lines.push_back(l); }));
  ASSERT_EQ(lines.size(), 1u);
  // embed + lm_head 2 x 60 x 40, per layer 2 norms of 40, qkv 64 x 40, o 40 x 32, gate_up
  // 104 x 40, down 40 x 52, final norm 40: 15,720 floats = 0.00 GB.
  EXPECT_THAT(lines[0], StartsWith("weights: random (seed 7), 0.00 GB generated on cpu in "));
}

// The file loader: the fixture's one file reported once; its values are the checkpoint's (the
// fixture is BF16, read as fp32 on the CPU), whole and column-sliced.
TEST(FileWeightsTest, LoadsTheFixtureAndReportsItsFile) {
  const std::string dir = ::lorc::testing::TinyLlamaDir();
  ASSERT_EQ(::lorc::testing::MissingFixture(dir + "/model.safetensors"), "");
  auto config = LoadModelConfig(dir);
  ASSERT_OK(config);
  auto reader = CheckpointReader::Open(dir);
  ASSERT_OK(reader);
  auto cpu = CreateBackend({});
  ASSERT_OK(cpu);
  auto s = ShardLayout::Make(*config, 1, 2);
  ASSERT_OK(s);
  std::vector<std::string> lines;
  auto w = LoadWeights(*config, **reader, *s, **cpu, [&](const std::string& l) { lines.push_back(l); });
  ASSERT_OK(w);
  ASSERT_EQ(lines.size(), 1u);
  EXPECT_THAT(lines[0], StartsWith("weights: model.safetensors (1/1, 0.0"));
  EXPECT_THAT(lines[0], HasSubstr(" GB) read in "));
  const int64_t d = config->hidden_size, q = config->q_size();
  std::vector<float> o(static_cast<size_t>(d * q));
  ASSERT_OK((*reader)->ReadF32("model.layers.3.self_attn.o_proj.weight", {d, q}, absl::MakeSpan(o)));
  EXPECT_EQ(Bits(w->layers[3].o), Bits(ColsOf(o, q, s->head_begin * config->head_dim,
                                                s->num_heads * config->head_dim)));
  std::vector<float> embed(static_cast<size_t>(config->vocab_size * d));
  ASSERT_OK((*reader)->ReadF32("model.embed_tokens.weight", {config->vocab_size, d}, absl::MakeSpan(embed)));
  EXPECT_EQ(Bits(w->embed), Bits(embed));
}

}  // namespace
}  // namespace lorc
