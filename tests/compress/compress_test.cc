// The LoRC factorization math (compress/factorize.h) and the writer (compress/compress.h) on the
// fixture model tiny-llama-a (8 layers, 2 KV heads, head_dim 128, hidden 512, BF16).
#include <cmath>
#include <cstring>
#include <unistd.h>
#include <filesystem>
#include <random>

#include "common/json_util.h"
#include "compress/calibration.h"
#include "compress/compress.h"
#include "compress/factorize.h"
#include "gtest/gtest.h"
#include "tests/testing/fixtures.h"
#include "tests/testing/status_matchers.h"

#define LC_CAT2(a, b) a##b
#define LC_CAT(a, b) LC_CAT2(a, b)
#define ASSERT_OK_AND_ASSIGN(lhs, expr) LC_ASSIGN_IMPL(LC_CAT(lc_so_, __LINE__), lhs, expr)
#define LC_ASSIGN_IMPL(tmp, lhs, expr)          \
  auto tmp = (expr);                            \
  ASSERT_TRUE(tmp.ok()) << tmp.status();        \
  lhs = *std::move(tmp)

namespace lorc::compress {
namespace {

namespace fs = std::filesystem;

MatD Sub(const MatD& a, const MatD& b) {
  MatD c = a;
  for (size_t i = 0; i < c.v.size(); ++i) c.v[i] -= b.v[i];
  return c;
}

MatD Transpose(const MatD& a) {
  MatD t(a.cols, a.rows);
  for (int64_t i = 0; i < a.rows; ++i) {
    for (int64_t j = 0; j < a.cols; ++j) t.at(j, i) = a.at(i, j);
  }
  return t;
}

// ||E X||_F^2 over the calibration activations = tr(E C E^T).
double ActivationErrorSq(const MatD& e, const MatD& c) {
  const MatD ec = MatMul(e, c);
  double s = 0;
  for (size_t i = 0; i < e.v.size(); ++i) s += ec.v[i] * e.v[i];
  return s;
}

class CompressFixture : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    if (!testing::MissingFixture(testing::TinyLlamaDir() + "/model.safetensors").empty()) return;
    reader_ = CheckpointReader::Open(testing::TinyLlamaDir())->release();
    absl::StatusOr<CalibrationText> text = LoadCalibrationText("");
    ASSERT_TRUE(text.ok());
    absl::StatusOr<CalibrationMoments> m = ComputeCalibrationMoments(testing::TinyLlamaDir(), text->text);
    ASSERT_TRUE(m.ok()) << m.status();
    moments_ = new CalibrationMoments(*std::move(m));
  }
  static MatD Head(const char* proj, int layer, int head) {
    const std::string name = "model.layers." + std::to_string(layer) + ".self_attn." + proj + ".weight";
    absl::StatusOr<MatD> w = ReadMatrix(*reader_, name, 256, 512);
    EXPECT_TRUE(w.ok()) << w.status();
    return RowBlock(*w, head * 128, 128);
  }
  void SetUp() override { REQUIRE_TINY_LLAMA(); ASSERT_NE(moments_, nullptr); }
  static inline CheckpointReader* reader_ = nullptr;
  static inline CalibrationMoments* moments_ = nullptr;
};

TEST_F(CompressFixture, CalibrationCountsTokensOfTheDefaultText) {
  EXPECT_GE(moments_->tokens, 2000);
  EXPECT_LE(moments_->tokens, 6000);
  ASSERT_EQ(moments_->c.size(), 8u);
  EXPECT_GT(moments_->c[3].at(7, 7), 0);
  EXPECT_DOUBLE_EQ(moments_->c[3].at(7, 100), moments_->c[3].at(100, 7));
}

TEST_F(CompressFixture, FullRankReconstructsPlainAndWhitened) {
  ASSERT_OK_AND_ASSIGN(const MatD l, WhiteningFactor(moments_->c[2]));
  for (const char* proj : {"k_proj", "v_proj"}) {
    for (int h = 0; h < 2; ++h) {
      const MatD w = Head(proj, 2, h);
      ASSERT_OK_AND_ASSIGN(const HeadFactors plain, FactorizeHead(w, 128, nullptr));
      EXPECT_LT(std::sqrt(FrobeniusSq(Sub(MatMul(plain.b, plain.a), w)) / FrobeniusSq(w)), 1e-7)
          << proj << " head " << h;
      ASSERT_OK_AND_ASSIGN(const HeadFactors wh, FactorizeHead(w, 128, &l));
      EXPECT_LT(std::sqrt(FrobeniusSq(Sub(MatMul(wh.b, wh.a), w)) / FrobeniusSq(w)), 1e-7)
          << proj << " head " << h << " whitened";
    }
  }
}

TEST_F(CompressFixture, TruncationErrorIsTheTailSingularValues) {
  const MatD w = Head("k_proj", 5, 1);
  for (int64_t r : {8, 32, 96}) {
    ASSERT_OK_AND_ASSIGN(const HeadFactors f, FactorizeHead(w, r, nullptr));
    double tail = 0;
    for (size_t i = static_cast<size_t>(r); i < f.s.size(); ++i) tail += f.s[i] * f.s[i];
    EXPECT_NEAR(FrobeniusSq(Sub(MatMul(f.b, f.a), w)), tail, 1e-9 * FrobeniusSq(w)) << "rank " << r;
    EXPECT_GT(tail, 0);
  }
  EXPECT_FALSE(FactorizeHead(w, 0, nullptr).ok());
  EXPECT_FALSE(FactorizeHead(w, 129, nullptr).ok());
}

TEST_F(CompressFixture, WhitenedHasSmallerActivationErrorThanPlain) {
  for (int layer : {0, 4, 7}) {
    const MatD& c = moments_->c[static_cast<size_t>(layer)];
    ASSERT_OK_AND_ASSIGN(const MatD l, WhiteningFactor(c));
    for (const char* proj : {"k_proj", "v_proj"}) {
      const MatD w = Head(proj, layer, 0);
      ASSERT_OK_AND_ASSIGN(const HeadFactors plain, FactorizeHead(w, 32, nullptr));
      ASSERT_OK_AND_ASSIGN(const HeadFactors wh, FactorizeHead(w, 32, &l));
      const double e_plain = ActivationErrorSq(Sub(w, MatMul(plain.b, plain.a)), c);
      const double e_wh = ActivationErrorSq(Sub(w, MatMul(wh.b, wh.a)), c);
      EXPECT_LT(e_wh, e_plain) << proj << " layer " << layer;
      // Whitened SVD is optimal for the activation error: it equals the tail of W L's spectrum
      // (L factors C + eps I, eps = 1e-6 of the mean diagonal: a relative gap of about 1e-6).
      double tail = 0;
      for (size_t i = 32; i < wh.s.size(); ++i) tail += wh.s[i] * wh.s[i];
      EXPECT_NEAR(e_wh, tail, 1e-5 * tail) << proj << " layer " << layer;
    }
  }
}

TEST(Schedule, UniformRoundsToMultiplesOf8) {
  EXPECT_EQ(UniformRanks(8, 128, 0.3)[0].k_rank, 40);  // 38.4 -> 40
  EXPECT_EQ(UniformRanks(8, 128, 0.5)[7].v_rank, 64);
  EXPECT_EQ(UniformRanks(8, 128, 0.01)[0].k_rank, 8);
  EXPECT_EQ(UniformRanks(8, 128, 1.0)[0].k_rank, 128);
}

TEST(Schedule, ProgressiveGivesShallowLayersMoreRankWithinTheRatio) {
  const std::vector<double> kk = {30, 5, 8, 2, 12, 3, 4, 6}, kv = {4, 9, 3, 7, 2, 5, 3, 2};
  for (double ratio : {0.25, 0.4, 0.5, 0.75, 0.9}) {
    ASSERT_OK_AND_ASSIGN(const std::vector<LayerRanks> r, ProgressiveRanks(kk, kv, 128, ratio));
    const double got = KvBytesRatio(r, 128);
    EXPECT_LE(got, ratio + 1e-12);
    EXPECT_GE(got, ratio - 2.0 * 8 / 128) << ratio;  // within the rounding of two layers
    for (size_t l = 1; l < r.size(); ++l) {
      EXPECT_GE(r[l - 1].k_rank, r[l].k_rank) << "ratio " << ratio << " layer " << l;
      EXPECT_GE(r[l - 1].v_rank, r[l].v_rank) << "ratio " << ratio << " layer " << l;
    }
    for (const LayerRanks& x : r) {
      EXPECT_EQ(x.k_rank % 8, 0);
      EXPECT_EQ(x.v_rank % 8, 0);
    }
    EXPECT_GT(r.front().k_rank, r.back().k_rank) << ratio;
  }
  EXPECT_EQ(KvBytesRatio(*ProgressiveRanks(kk, kv, 128, 1.0), 128), 1.0);
  EXPECT_FALSE(ProgressiveRanks(kk, kv, 128, 0.05).ok());  // below rank 8 of 128
}

std::string TempOut(const std::string& name) {
  const fs::path p = fs::temp_directory_path() / ("lorc_compress_" + std::to_string(::getpid()) + "_" + name);
  fs::remove_all(p);
  return p.string();
}

TEST_F(CompressFixture, FullRankOutputReconstructsAndFoldsOProj) {
  CompressOptions o;
  o.model_dir = testing::TinyLlamaDir();
  o.out_dir = TempOut("full");
  o.kv_ratio = 1.0;
  std::vector<std::string> lines;
  ASSERT_OK_AND_ASSIGN(const CompressResult res, Compress(o, [&](const std::string& s) { lines.push_back(s); }));
  EXPECT_EQ(res.kv_bytes_ratio, 1.0);
  ASSERT_EQ(lines.size(), 8u);
  EXPECT_EQ(lines[2].rfind("layer 3/8: k_rank 128 v_rank 128, relative error K 0.0000 V 0.0000", 0), 0u) << lines[2];
  ASSERT_OK_AND_ASSIGN(auto out, CheckpointReader::Open(o.out_dir));
  for (int layer : {0, 7}) {
    const std::string p = "model.layers." + std::to_string(layer) + ".self_attn.";
    ASSERT_OK_AND_ASSIGN(const MatD ak, ReadMatrix(*out, p + "k_proj.weight", 256, 512));
    ASSERT_OK_AND_ASSIGN(const MatD bk, ReadMatrix(*out, p + "k_up_proj.weight", 256, 128));
    ASSERT_OK_AND_ASSIGN(const MatD av, ReadMatrix(*out, p + "v_proj.weight", 256, 512));
    ASSERT_OK_AND_ASSIGN(const MatD o2, ReadMatrix(*out, p + "o_proj.weight", 512, 512));
    ASSERT_OK_AND_ASSIGN(const MatD wo, ReadMatrix(*reader_, p + "o_proj.weight", 512, 512));
    for (int h = 0; h < 2; ++h) {
      const MatD wk = Head("k_proj", layer, h), wv = Head("v_proj", layer, h);
      // The written factors are BF16 (the source dtype): reconstruction to BF16 precision.
      const MatD rec = MatMul(RowBlock(bk, h * 128, 128), RowBlock(ak, h * 128, 128));
      EXPECT_LT(std::sqrt(FrobeniusSq(Sub(rec, wk)) / FrobeniusSq(wk)), 1e-2) << layer << "/" << h;
      // W_O' c = W_O B_V c for a latent c, for both query heads of KV head h.
      ASSERT_OK_AND_ASSIGN(const HeadFactors fv, FactorizeHead(wv, 128, nullptr));
      std::mt19937 rng(7);
      std::normal_distribution<double> nd;
      MatD c(128, 1);
      for (double& x : c.v) x = nd(rng);
      const MatD bc = MatMul(fv.b, c);
      for (int j = 2 * h; j < 2 * h + 2; ++j) {
        MatD lhs(512, 1), rhs(512, 1);
        for (int row = 0; row < 512; ++row) {
          for (int t = 0; t < 128; ++t) {
            lhs.v[row] += o2.at(row, j * 128 + t) * c.v[t];
            rhs.v[row] += wo.at(row, j * 128 + t) * bc.v[t];
          }
        }
        EXPECT_LT(std::sqrt(FrobeniusSq(Sub(lhs, rhs)) / FrobeniusSq(rhs)), 1e-2) << "query head " << j;
      }
      // A_V at full rank is orthogonal: V reconstructs as A_V^T (B_V A_V) ... check B_V A_V = W_V.
      const MatD recv = MatMul(fv.b, RowBlock(av, h * 128, 128));
      EXPECT_LT(std::sqrt(FrobeniusSq(Sub(recv, wv)) / FrobeniusSq(wv)), 1e-2);
    }
  }
  // Unchanged tensors are byte copies; the JSON validates.
  ASSERT_OK_AND_ASSIGN(const TensorInfo* a, reader_->Find("model.layers.3.mlp.up_proj.weight"));
  ASSERT_OK_AND_ASSIGN(const TensorInfo* b, out->Find("model.layers.3.mlp.up_proj.weight"));
  ASSERT_EQ(a->nbytes, b->nbytes);
  EXPECT_EQ(std::memcmp(a->data, b->data, a->nbytes), 0);
  EXPECT_EQ(b->dtype, DType::kBF16);
  EXPECT_TRUE(fs::exists(fs::path(o.out_dir) / "tokenizer.json"));
  ASSERT_OK_AND_ASSIGN(const ModelConfig cfg, LoadModelConfig(o.out_dir));
  ASSERT_OK_AND_ASSIGN(const nlohmann::json j, ReadJsonFile(o.out_dir + "/lorc.json"));
  EXPECT_OK(ValidateLorcJson(j, cfg));
  EXPECT_EQ(j, nlohmann::json(res.lorc_json));
  EXPECT_EQ(j["method"], "svd");
  EXPECT_TRUE(j["calibration"].is_null());
  EXPECT_EQ(j["source_model"]["config_sha256"].get<std::string>().size(), 64u);
  nlohmann::json bad = j;
  bad["layers"][3]["k_rank"] = 200;
  EXPECT_EQ(ValidateLorcJson(bad, cfg).message(), "lorc.json: layers[3].k_rank: 200 is outside [1, 128]");

  // A non-empty --out is refused without --force.
  absl::StatusOr<CompressResult> again = Compress(o, nullptr);
  EXPECT_EQ(again.status().code(), absl::StatusCode::kAlreadyExists);
  EXPECT_NE(again.status().message().find("--out"), std::string::npos);
  fs::remove_all(o.out_dir);
}

TEST_F(CompressFixture, WhitenedProgressiveRecordsCalibrationAndRatio) {
  CompressOptions o;
  o.model_dir = testing::TinyLlamaDir();
  o.out_dir = TempOut("prog");
  o.kv_ratio = 0.5;
  o.schedule = "progressive";
  o.whiten = true;
  std::vector<std::string> lines;
  ASSERT_OK_AND_ASSIGN(const CompressResult res, Compress(o, [&](const std::string& s) { lines.push_back(s); }));
  for (const std::string& s : lines) std::printf("%s\n", s.c_str());
  EXPECT_LE(res.kv_bytes_ratio, 0.5);
  EXPECT_GE(res.kv_bytes_ratio, 0.5 - 2.0 * 8 / 128);
  for (size_t l = 1; l < res.ranks.size(); ++l) {
    EXPECT_GE(res.ranks[l - 1].k_rank, res.ranks[l].k_rank);
    EXPECT_GE(res.ranks[l - 1].v_rank, res.ranks[l].v_rank);
  }
  const nlohmann::json& j = res.lorc_json;
  EXPECT_EQ(j["method"], "whitened-svd");
  EXPECT_EQ(j["schedule"], "progressive");
  EXPECT_EQ(j["calibration"]["source"], "default");
  EXPECT_EQ(j["calibration"]["tokens"], moments_->tokens);
  EXPECT_EQ(j["target"]["kv_ratio"], 0.5);
  ASSERT_OK_AND_ASSIGN(auto out, CheckpointReader::Open(o.out_dir));
  const int64_t r0 = res.ranks[0].v_rank;
  ASSERT_OK_AND_ASSIGN(const TensorInfo* t, out->Find("model.layers.0.self_attn.o_proj.weight"));
  EXPECT_EQ(t->shape, (std::vector<int64_t>{512, 4 * r0}));
  ASSERT_OK_AND_ASSIGN(t, out->Find("model.layers.0.self_attn.k_up_proj.weight"));
  EXPECT_EQ(t->shape, (std::vector<int64_t>{256, res.ranks[0].k_rank}));
  fs::remove_all(o.out_dir);
}

}  // namespace
}  // namespace lorc::compress
