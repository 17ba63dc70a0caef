// --max-ppl-increase: the rank search (compress/rank_search.h) on a synthetic perplexity model,
// and end to end on the fixture model with a tiny calibration text (the bound holds on the
// calibration text and lorc.json records the search).
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <filesystem>

#include "common/json_util.h"
#include "compress/calibration.h"
#include "compress/compress.h"
#include "compress/rank_search.h"
#include "gtest/gtest.h"
#include "tests/testing/fixtures.h"
#include "tests/testing/status_matchers.h"

namespace lorc::compress {
namespace {

namespace fs = std::filesystem;

// 4 layers, head_dim 32; spectra decaying faster in deeper layers, V flatter than K; the
// synthetic log-perplexity increase is sum_u a_u err_u(r_u) with shallow layers more sensitive.
struct Synthetic {
  RankSearchInput in;
  std::vector<double> a;
  int64_t calls = 0;
  Synthetic() {
    in.head_dim = 32;
    in.base_ppl = 10.0;
    for (int l = 0; l < 4; ++l) {
      for (int kind = 0; kind < 2; ++kind) {
        std::vector<double> s2(32);
        double total = 0;
        for (int i = 0; i < 32; ++i) total += s2[i] = std::exp(-(0.05 + 0.04 * l + 0.03 * kind) * i);
        std::vector<double> err(33, 0.0);
        for (int r = 31; r >= 0; --r) err[r] = err[r + 1] + s2[r] / total;
        (kind == 0 ? in.k_err : in.v_err).push_back(err);
        a.push_back(0.5 / (1 + l) + 0.1 * kind);
      }
    }
  }
  double Ppl(const std::vector<LayerRanks>& r) const {
    double x = 0;
    for (int l = 0; l < 4; ++l) {
      x += a[2 * l] * in.k_err[l][r[l].k_rank] + a[2 * l + 1] * in.v_err[l][r[l].v_rank];
    }
    return in.base_ppl * std::exp(x);
  }
  MeasurePplFn Measure() {
    return [this](const std::vector<LayerRanks>& r) -> absl::StatusOr<double> {
      ++calls;
      return Ppl(r);
    };
  }
};

TEST(RankSearch, RespectsTheBoundAndSavesMoreBytesForALargerBound) {
  double prev_ratio = 1.01;
  for (double p : {0.0, 1.0, 3.0, 10.0}) {
    Synthetic syn;
    syn.in.max_increase_pct = p;
    std::vector<std::string> lines;
    absl::StatusOr<RankSearchResult> res =
        SearchRanks(syn.in, syn.Measure(), [&](const std::string& s) { lines.push_back(s); });
    ASSERT_TRUE(res.ok()) << res.status();
    EXPECT_LE(res->ppl, 10.0 * (1 + p / 100) + 1e-12) << p;
    EXPECT_DOUBLE_EQ(res->ppl, syn.Ppl(res->ranks)) << p;
    EXPECT_EQ(res->trials, syn.calls);
    EXPECT_LE(res->trials, 8 + 7) << p;  // 8 probes + a bisection over 25 path points (+ full rank)
    EXPECT_EQ(lines.size(), static_cast<size_t>(res->trials) + (p == 0.0 ? 0 : 1)) << p;
    for (const LayerRanks& r : res->ranks) {
      EXPECT_EQ(r.k_rank % 8, 0);
      EXPECT_EQ(r.v_rank % 8, 0);
      EXPECT_GE(r.k_rank, 8);
      EXPECT_LE(r.v_rank, 32);
    }
    const double ratio = KvBytesRatio(res->ranks, 32);
    if (p == 0.0) {
      EXPECT_EQ(ratio, 1.0);
    } else {
      EXPECT_LT(ratio, prev_ratio) << p;
    }
    prev_ratio = ratio;
  }
}

TEST(RankSearch, RejectsInconsistentInput) {
  Synthetic syn;
  syn.in.v_err.pop_back();
  EXPECT_FALSE(SearchRanks(syn.in, syn.Measure(), nullptr).ok());
  Synthetic bad_dim;
  bad_dim.in.head_dim = 30;
  EXPECT_FALSE(SearchRanks(bad_dim.in, bad_dim.Measure(), nullptr).ok());
}

TEST(RankSearch, EndToEndOnTheFixtureRespectsTheBoundOnTheCalibrationText) {
  REQUIRE_TINY_LLAMA();
  const std::string tag = std::to_string(::getpid());
  CompressOptions o;
  o.model_dir = testing::TinyLlamaDir();
  o.out_dir = (fs::temp_directory_path() / ("lorc_search_test_" + tag)).string();
  o.calib_path = (fs::temp_directory_path() / ("lorc_search_calib_" + tag + ".txt")).string();
  fs::remove_all(o.out_dir);
  {
    // About 300 tokens: one chunk, so every trial measures exactly these tokens.
    absl::StatusOr<CalibrationText> def = LoadCalibrationText("");
    ASSERT_TRUE(def.ok());
    const std::string text = def->text.substr(def->text.find("\"\"\""), 1000);
    std::FILE* f = std::fopen(o.calib_path.c_str(), "wb");
    ASSERT_NE(f, nullptr);
    ASSERT_EQ(std::fwrite(text.data(), 1, text.size(), f), text.size());
    std::fclose(f);
  }
  o.max_ppl_increase = 3.0;
  std::vector<std::string> lines;
  absl::StatusOr<CompressResult> res = Compress(o, [&](const std::string& s) { lines.push_back(s); });
  ASSERT_TRUE(res.ok()) << res.status();
  for (const std::string& s : lines) std::printf("%s\n", s.c_str());
  // One chunk where 16 (the default --search-chunks) were asked: a warning says so.
  ASSERT_FALSE(lines.empty());
  EXPECT_THAT(lines[0], ::testing::MatchesRegex("warning: --search-chunks 16: the calibration text gives "
                                                "only 1 chunk \\([0-9]+ scored tokens\\); using 1"));
  const nlohmann::ordered_json& j = res->lorc_json;
  EXPECT_EQ(j["schedule"], "search");
  EXPECT_EQ(j["target"]["max_ppl_increase_pct"], 3.0);
  EXPECT_EQ(j["calibration"]["source"], o.calib_path);
  const double base = j["search"]["uncompressed_ppl"].get<double>();
  const double got = j["search"]["compressed_ppl"].get<double>();
  EXPECT_LE(got, base * 1.03);
  EXPECT_NEAR(j["search"]["ppl_increase_pct"].get<double>(), 100 * (got / base - 1), 1e-9);
  EXPECT_LT(res->kv_bytes_ratio, 1.0);
  EXPECT_EQ(j["kv_bytes_ratio"], res->kv_bytes_ratio);

  // The written directory: valid lorc.json, and its calibration perplexity is the recorded one.
  ASSERT_OK_AND_ASSIGN(const ModelConfig cfg, LoadModelConfig(o.out_dir));
  ASSERT_OK_AND_ASSIGN(const nlohmann::json written, ReadJsonFile(o.out_dir + "/lorc.json"));
  EXPECT_OK(ValidateLorcJson(written, cfg));
  EXPECT_EQ(written, nlohmann::json(j));
  ASSERT_OK_AND_ASSIGN(const CalibrationText text, LoadCalibrationText(o.calib_path));
  ASSERT_OK_AND_ASSIGN(const auto chunks, CalibrationChunks(o.model_dir, text.text));
  ASSERT_EQ(chunks.size(), 1u);
  ASSERT_OK_AND_ASSIGN(const CalibrationPpl uncompressed, ComputeCalibrationPerplexity(o.model_dir, chunks));
  EXPECT_DOUBLE_EQ(uncompressed.ppl, base);
  ASSERT_OK_AND_ASSIGN(const CalibrationPpl compressed, ComputeCalibrationPerplexity(o.out_dir, chunks));
  EXPECT_NEAR(compressed.ppl, got, 1e-9 * got);
  fs::remove_all(o.out_dir);
  fs::remove(o.calib_path);
}

// A search scored on a handful of tokens is refused before any factorization, naming --calib and
// the count (a tester: "hello world" recorded -44.8 % for a model 81 % worse on the eval windows).
TEST(RankSearch, TooFewCalibrationTokensAreRefusedNamingTheFlag) {
  const std::string tag = std::to_string(::getpid());
  CompressOptions o;
  o.model_dir = testing::TinyLlamaDir();
  o.out_dir = (fs::temp_directory_path() / ("lorc_search_short_" + tag)).string();
  o.calib_path = (fs::temp_directory_path() / ("lorc_search_short_" + tag + ".txt")).string();
  fs::remove_all(o.out_dir);
  {
    std::FILE* f = std::fopen(o.calib_path.c_str(), "wb");
    ASSERT_NE(f, nullptr);
    std::fputs("hello world", f);
    std::fclose(f);
  }
  o.max_ppl_increase = 1.0;
  const absl::StatusOr<CompressResult> res = Compress(o, nullptr);
  EXPECT_THAT(res.status(), testing::StatusIs(absl::StatusCode::kInvalidArgument,
                                     ::testing::AllOf(::testing::HasSubstr("--calib " + o.calib_path),
                                                      ::testing::HasSubstr("scored tokens; --max-ppl-increase "
                                                                           "needs at least 256"))));
  fs::remove_all(o.out_dir);
  fs::remove(o.calib_path);
}

}  // namespace
}  // namespace lorc::compress
