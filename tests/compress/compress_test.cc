// The LoRC factorization math (compress/factorize.h) and the writer (compress/compress.h) on the
// fixture model tiny-llama-a (8 layers, 2 KV heads, head_dim 128, hidden 512, BF16).
#include <cmath>
#include <cstring>
#include <sys/stat.h>
#include <unistd.h>
#include <filesystem>
#include <fstream>
#include <random>

#include "common/json_util.h"
#include "compress/calibration.h"
#include "compress/compress.h"
#include "compress/factorize.h"
#include "model/safetensors.h"
#include "model/safetensors_writer.h"
#include "gtest/gtest.h"
#include "tests/testing/fixtures.h"
#include "tests/testing/status_matchers.h"

namespace lorc::compress {
namespace {

namespace fs = std::filesystem;

MatD Sub(const MatD& a, const MatD& b) {
  MatD c = a;
  for (size_t i = 0; i < c.v.size(); ++i) c.v[i] -= b.v[i];
  return c;
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
    default_tokens_ = 0;
    absl::StatusOr<std::vector<std::vector<int32_t>>> chunks = CalibrationChunks(testing::TinyLlamaDir(), text->text);
    ASSERT_TRUE(chunks.ok()) << chunks.status();
    for (const auto& c : *chunks) default_tokens_ += static_cast<int64_t>(c.size());
    // The moments of a slice of the default text (the whole takes a minute on two cores).
    absl::StatusOr<CalibrationMoments> m = ComputeCalibrationMoments(testing::TinyLlamaDir(), CalibSlice());
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
  // The first 24,000 characters of the default calibration text (prose and Python source).
  static std::string CalibSlice() { return LoadCalibrationText("")->text.substr(0, 24000); }
  static inline int64_t default_tokens_ = 0;
  static inline CheckpointReader* reader_ = nullptr;
  static inline CalibrationMoments* moments_ = nullptr;
};

TEST_F(CompressFixture, CalibrationCountsTokensOfTheDefaultText) {
  // README.md "Calibration": about 63,000 tokens (205 KB) by compress/calib/make_default.py.
  EXPECT_GE(default_tokens_, 50000);
  EXPECT_LE(default_tokens_, 80000);
  EXPECT_GE(moments_->tokens, 6000);
  EXPECT_LE(moments_->tokens, 10000);
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

// tr(E C E^T M): the output-metric-weighted activation error.
double MetricErrorSq(const MatD& e, const MatD& c, const MatD& m) {
  const MatD ece = MatMul(MatMul(e, c), Transpose(e));
  double s = 0;
  for (size_t i = 0; i < ece.v.size(); ++i) s += ece.v[i] * m.v[i];  // m symmetric
  return s;
}

MatD Regularized(const MatD& c) {  // c + eps I as WhiteningFactor regularizes it
  double trace = 0;
  for (int64_t i = 0; i < c.rows; ++i) trace += c.at(i, i);
  MatD r = c;
  for (int64_t i = 0; i < c.rows; ++i) r.at(i, i) += kWhitenRelEps * trace / static_cast<double>(c.rows);
  return r;
}

TEST_F(CompressFixture, OutputMetricFactorizationIsOptimalForItsMetric) {
  const int layer = 3;
  const MatD c = Regularized(moments_->c[layer]);
  ASSERT_OK_AND_ASSIGN(const MatD l, WhiteningFactor(moments_->c[layer]));
  ASSERT_OK_AND_ASSIGN(const MatD wo, ReadMatrix(*reader_, "model.layers.3.self_attn.o_proj.weight", 512, 512));
  ASSERT_OK_AND_ASSIGN(const MatD wq, ReadMatrix(*reader_, "model.layers.3.self_attn.q_proj.weight", 512, 512));
  ASSERT_OK_AND_ASSIGN(const ModelConfig cfg, LoadModelConfig(testing::TinyLlamaDir()));
  // KV head 1: query heads 2 and 3.
  const MatD mv = OProjMetric(wo, 2, 2, 128);
  const MatD mk = RopeQueryMetric(RowBlock(wq, 256, 256), moments_->c[layer], RopeInverseFrequencies(cfg),
                                  kRopeMetricWindow);
  for (const auto& [proj, m] : {std::pair<const char*, const MatD*>{"k_proj", &mk}, {"v_proj", &mv}}) {
    const MatD w = Head(proj, layer, 1);
    ASSERT_OK_AND_ASSIGN(const MatD lm, WhiteningFactor(*m));
    const MatD mr = Regularized(*m);
    ASSERT_OK_AND_ASSIGN(const HeadFactors full, FactorizeHead(w, 128, &l, &lm));
    EXPECT_LT(std::sqrt(FrobeniusSq(Sub(MatMul(full.b, full.a), w)) / FrobeniusSq(w)), 1e-7) << proj;
    ASSERT_OK_AND_ASSIGN(const HeadFactors with_m, FactorizeHead(w, 32, &l, &lm));
    ASSERT_OK_AND_ASSIGN(const HeadFactors without_m, FactorizeHead(w, 32, &l));
    const double e_m = MetricErrorSq(Sub(w, MatMul(with_m.b, with_m.a)), c, mr);
    const double e_plain = MetricErrorSq(Sub(w, MatMul(without_m.b, without_m.a)), c, mr);
    double tail = 0, total = 0;
    for (size_t i = 0; i < with_m.s.size(); ++i) {
      total += with_m.s[i] * with_m.s[i];
      if (i >= 32) tail += with_m.s[i] * with_m.s[i];
    }
    EXPECT_NEAR(e_m, tail, 1e-6 * total) << proj;  // the optimum at rank 32 (Eckart-Young)
    EXPECT_LT(e_m, e_plain) << proj;
  }
}

TEST(KeyMetric, RopeQueryMetricMatchesExplicitRotations) {
  // head_dim 8 (4 rotation pairs (i, i + 4)), hidden 6, one group of 2 query heads, window 5.
  std::mt19937 rng(3);
  std::normal_distribution<double> nd;
  MatD wq(16, 6), x(6, 6);
  for (double& v : wq.v) v = nd(rng);
  for (double& v : x.v) v = nd(rng);
  const MatD c = MatMul(x, Transpose(x));
  const std::vector<float> inv_freq = {1.0f, 0.3f, 0.05f, 0.001f};
  const MatD m = RopeQueryMetric(wq, c, inv_freq, 5);
  MatD cq(8, 8);
  for (int j = 0; j < 2; ++j) {
    const MatD wj = RowBlock(wq, j * 8, 8);
    const MatD t = MatMul(MatMul(wj, c), Transpose(wj));
    for (size_t i = 0; i < t.v.size(); ++i) cq.v[i] += t.v[i];
  }
  MatD want(8, 8);
  double wsum = 0;
  for (int delta = 0; delta < 5; ++delta) {
    MatD r(8, 8);
    for (int i = 0; i < 4; ++i) {
      const double a = delta * static_cast<double>(inv_freq[i]);
      r.at(i, i) = std::cos(a);
      r.at(i, i + 4) = -std::sin(a);
      r.at(i + 4, i) = std::sin(a);
      r.at(i + 4, i + 4) = std::cos(a);
    }
    const MatD t = MatMul(MatMul(r, cq), Transpose(r));
    for (size_t i = 0; i < t.v.size(); ++i) want.v[i] += (5 - delta) * t.v[i];
    wsum += 5 - delta;
  }
  for (size_t i = 0; i < want.v.size(); ++i) {
    EXPECT_NEAR(m.v[i], want.v[i] / wsum, 1e-9 * std::abs(want.v[0] / wsum)) << i;
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
    // The shallowest layer is capped at 1.5x the uniform rank (kProgressiveMaxRankFactor).
    EXPECT_LE(r.front().k_rank, std::min(128.0, kProgressiveMaxRankFactor * ratio * 128) + 4) << ratio;
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
  o.calib_path = TempOut("calib.txt");
  {
    std::FILE* f = std::fopen(o.calib_path.c_str(), "wb");
    ASSERT_NE(f, nullptr);
    const std::string text = CalibSlice();
    ASSERT_EQ(std::fwrite(text.data(), 1, text.size(), f), text.size());
    std::fclose(f);
  }
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
  EXPECT_EQ(j["calibration"]["source"], o.calib_path);
  EXPECT_EQ(j["calibration"]["tokens"], moments_->tokens);
  EXPECT_EQ(j["objective"]["k"], "rope-scores");
  EXPECT_EQ(j["objective"]["v"], "o_proj-output");
  EXPECT_EQ(j["target"]["kv_ratio"], 0.5);
  ASSERT_OK_AND_ASSIGN(auto out, CheckpointReader::Open(o.out_dir));
  const int64_t r0 = res.ranks[0].v_rank;
  ASSERT_OK_AND_ASSIGN(const TensorInfo* t, out->Find("model.layers.0.self_attn.o_proj.weight"));
  EXPECT_EQ(t->shape, (std::vector<int64_t>{512, 4 * r0}));
  ASSERT_OK_AND_ASSIGN(t, out->Find("model.layers.0.self_attn.k_up_proj.weight"));
  EXPECT_EQ(t->shape, (std::vector<int64_t>{256, res.ranks[0].k_rank}));
  fs::remove_all(o.out_dir);
  fs::remove(o.calib_path);
}

}  // namespace
}  // namespace lorc::compress

namespace lorc::compress {
namespace {

int64_t KProjRows(const std::string& dir) {
  absl::StatusOr<std::unique_ptr<CheckpointReader>> r = CheckpointReader::Open(dir);
  EXPECT_TRUE(r.ok()) << r.status();
  if (!r.ok()) return -1;
  absl::StatusOr<const TensorInfo*> t = (*r)->Find("model.layers.0.self_attn.k_proj.weight");
  EXPECT_TRUE(t.ok()) << t.status();
  return t.ok() ? (*t)->shape[0] : -1;
}

// Files go to NAME.partial and are renamed into place only when all are written: a run that fails
// late (here: copying special_tokens_map.json, after the tensors) leaves a good --force target as
// it was and a new --out without model.safetensors; stale .partial files are removed.
TEST(CompressOutput, FailedRunLeavesTheOutputDirectoryAsItWas) {
  REQUIRE_TINY_LLAMA();
  const std::string src = TempOut("broken_src"), out = TempOut("keep"), fresh = TempOut("fresh");
  fs::create_directories(src);
  for (const char* f : {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                        "model.safetensors"}) {
    fs::create_symlink(fs::absolute(fs::path(testing::TinyLlamaDir()) / f), fs::path(src) / f);
  }
  fs::create_directories(fs::path(src) / "special_tokens_map.json");  // copy_file fails on it

  CompressOptions good;
  good.model_dir = testing::TinyLlamaDir();
  good.out_dir = out;
  good.ranks = LayerRanks{32, 16};
  ASSERT_OK_AND_ASSIGN(const CompressResult first, Compress(good, nullptr));
  ASSERT_EQ(KProjRows(out), 2 * 32);

  CompressOptions bad = good;
  bad.model_dir = src;
  bad.ranks = LayerRanks{64, 64};
  bad.force = true;
  EXPECT_FALSE(Compress(bad, nullptr).ok());
  // The old model is intact and matches its lorc.json.
  EXPECT_EQ(KProjRows(out), 2 * 32);
  ASSERT_OK_AND_ASSIGN(const nlohmann::json j, ReadJsonFile(out + "/lorc.json"));
  EXPECT_EQ(j["layers"][0]["k_rank"], 32);

  bad.out_dir = fresh;
  EXPECT_FALSE(Compress(bad, nullptr).ok());
  EXPECT_FALSE(fs::exists(fs::path(fresh) / "model.safetensors"));
  EXPECT_FALSE(fs::exists(fs::path(fresh) / "lorc.json"));

  // A later good run replaces the model and removes the stale partials (of this and other runs).
  { std::ofstream(fs::path(out) / "tokenizer.json.partial") << "stale"; }
  good.force = true;
  good.ranks = LayerRanks{64, 64};
  ASSERT_OK_AND_ASSIGN(const CompressResult second, Compress(good, nullptr));
  EXPECT_EQ(KProjRows(out), 2 * 64);
  for (const fs::directory_entry& e : fs::directory_iterator(out)) {
    EXPECT_FALSE(e.path().string().ends_with(".partial")) << e.path();
  }
  fs::remove_all(src);
  fs::remove_all(out);
  fs::remove_all(fresh);
}

// An interrupted run leaves NAME.partial files (never loadable: no config.json); the retry was
// refused without --force (a tester). A directory holding only those is written into, and the
// leftovers are gone afterwards; anything else still needs --force.
TEST(CompressOutput, ARetryAfterAnInterruptedRunNeedsNoForce) {
  REQUIRE_TINY_LLAMA();
  const std::string out = TempOut("retry");
  fs::create_directories(out);
  { std::ofstream(fs::path(out) / "model.safetensors.partial") << "half a model"; }
  CompressOptions o;
  o.model_dir = testing::TinyLlamaDir();
  o.out_dir = out;
  o.ranks = LayerRanks{32, 16};
  ASSERT_OK(Compress(o, nullptr).status());
  EXPECT_EQ(KProjRows(out), 2 * 32);
  EXPECT_FALSE(fs::exists(fs::path(out) / "model.safetensors.partial"));
  EXPECT_THAT(Compress(o, nullptr).status(),
              testing::StatusIs(absl::StatusCode::kAlreadyExists, ::testing::HasSubstr("--force")));
  // A .partial file of the user's is not a leftover: it needs --force, and even then stays (a
  // second tester's thesis.partial was deleted).
  fs::remove_all(out);
  fs::create_directories(out);
  { std::ofstream(fs::path(out) / "thesis.partial") << "precious"; }
  EXPECT_THAT(Compress(o, nullptr).status(),
              testing::StatusIs(absl::StatusCode::kAlreadyExists, ::testing::HasSubstr("--force")));
  o.force = true;
  ASSERT_OK(Compress(o, nullptr).status());
  EXPECT_TRUE(fs::exists(fs::path(out) / "thesis.partial"));
  fs::remove_all(out);
}

// A NaN in a K projection: LAPACK's SVD failed with "dgesdd on a 128 x 512 matrix: info -4",
// naming neither tensor nor cause (a tester). The read names the tensor and the element.
TEST(CompressInput, ANonFiniteWeightIsNamedBeforeTheFactorization) {
  REQUIRE_TINY_LLAMA();
  const std::string src = TempOut("nan_src"), out = TempOut("nan_out");
  fs::create_directories(src);
  for (const char* f : {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"}) {
    fs::create_symlink(fs::absolute(fs::path(testing::TinyLlamaDir()) / f), fs::path(src) / f);
  }
  // The fixture's weights with element [3, 5] of `poisoned` NaN.
  auto write_model = [&](const std::string& poisoned) {
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<CheckpointReader> r, CheckpointReader::Open(testing::TinyLlamaDir()));
    SafetensorsWriter w;
    for (const std::string& name : r->TensorNames()) {
      ASSERT_OK_AND_ASSIGN(const TensorInfo* t, r->Find(name));
      int64_t n = 1;
      for (int64_t e : t->shape) n *= e;
      std::vector<float> v(static_cast<size_t>(n));
      ASSERT_OK(r->ReadF32(name, t->shape, absl::MakeSpan(v)));
      if (name == poisoned) v[3 * t->shape[1] + 5] = std::nanf("");
      std::vector<uint8_t> bytes(v.size() * sizeof(float));
      std::memcpy(bytes.data(), v.data(), bytes.size());
      ASSERT_OK(w.AddBytes(name, DType::kF32, t->shape, std::move(bytes)));
    }
    ASSERT_OK(w.Write(src + "/model.safetensors"));
  };
  ASSERT_NO_FATAL_FAILURE(write_model("model.layers.2.self_attn.k_proj.weight"));
  CompressOptions o;
  o.model_dir = src;
  o.out_dir = out;
  o.ranks = LayerRanks{32, 16};
  EXPECT_THAT(Compress(o, nullptr),
              testing::StatusIs(absl::StatusCode::kInvalidArgument,
                       ::testing::HasSubstr("model.layers.2.self_attn.k_proj.weight: element [3, 5] is nan")));
  EXPECT_FALSE(fs::exists(fs::path(out) / "model.safetensors"));
  // With --whiten: named before the calibration runs the model (it was found only after).
  CompressOptions ow = o;
  ow.whiten = true;
  ow.calib_path = TempOut("nan_calib.txt");
  {
    std::ofstream f(ow.calib_path, std::ios::binary);
    f << LoadCalibrationText("")->text.substr(0, 24000);
  }
  std::vector<std::string> lines;
  const auto record = [&](const std::string& line) { lines.push_back(line); };
  EXPECT_THAT(Compress(ow, record),
              testing::StatusIs(absl::StatusCode::kInvalidArgument,
                       ::testing::HasSubstr("model.layers.2.self_attn.k_proj.weight: element [3, 5] is nan")));
  for (const std::string& line : lines) EXPECT_THAT(line, ::testing::Not(::testing::HasSubstr("calibration:")));
  // A NaN in a weight that is not factored: the calibration names the first layer whose input is
  // not finite (NaN moments failed the Cholesky later, naming nothing).
  ASSERT_NO_FATAL_FAILURE(write_model("model.layers.1.mlp.down_proj.weight"));
  EXPECT_THAT(Compress(ow, nullptr),
              testing::StatusIs(absl::StatusCode::kInvalidArgument,
                       ::testing::HasSubstr("calibration: the input of layer 2 at token")));
  // A FIFO among the files copied at the end is refused before any work (it failed the copy
  // after every SVD; a tester).
  ASSERT_NO_FATAL_FAILURE(write_model("model.layers.2.self_attn.k_proj.weight"));
  fs::remove(fs::path(src) / "tokenizer.json");
  ASSERT_EQ(mkfifo((fs::path(src) / "tokenizer.json").c_str(), 0600), 0);
  EXPECT_THAT(Compress(o, nullptr),
              testing::StatusIs(absl::StatusCode::kInvalidArgument, ::testing::HasSubstr("tokenizer.json: not a regular file")));
  fs::remove_all(src);
  fs::remove_all(out);
}

}  // namespace
}  // namespace lorc::compress
