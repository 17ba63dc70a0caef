// lorc.json (compress/FORMAT.md): parsing, validation against config.json naming the field, and
// LoadModelConfig picking it up; the safetensors writer the LoRC tests build directories with.
#include "model/lorc_config.h"

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "common/json_util.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "model/model_config.h"
#include "model/safetensors.h"
#include "model/safetensors_writer.h"
#include "tests/testing/fixtures.h"
#include "tests/testing/status_matchers.h"

namespace lorc {
namespace {

using ::lorc::testing::StatusIs;
using ::testing::HasSubstr;
using json = nlohmann::json;
namespace fs = std::filesystem;

// tiny-llama-a's counts: 8 layers, 2 KV heads, head_dim 128.
json Valid() {
  json j = {{"format", "lorcserve-lorc"}, {"version", 1}, {"method", "whitened-svd"},
            {"schedule", "progressive"}, {"target", {{"kv_ratio", 0.5}}},
            {"num_layers", 8}, {"num_kv_heads", 2}, {"head_dim", 128},
            {"calibration", {{"source", "default"}, {"tokens", 4096}}},
            {"source_model", {{"dir", "models/tiny-llama-a"}, {"config_sha256", "ab"}}}};
  j["layers"] = json::array();
  for (int l = 0; l < 8; ++l) j["layers"].push_back({{"k_rank", 96 - 8 * l}, {"v_rank", 64}});
  // sum(k) = 8 * 96 - 8 * 28 = 544, sum(v) = 512: 1056 / 2048.
  j["kv_bytes_ratio"] = 1056.0 / 2048.0;
  return j;
}

absl::StatusOr<LorcConfig> Parse(const json& j) { return LorcConfigFromJson(j, 8, 2, 128); }

TEST(LorcConfigTest, ParsesTheFormat) {
  auto c = Parse(Valid());
  ASSERT_OK(c);
  EXPECT_EQ(c->method, "whitened-svd");
  EXPECT_EQ(c->schedule, "progressive");
  ASSERT_EQ(c->layers.size(), 8u);
  EXPECT_EQ(c->layers[0].k_rank, 96);
  EXPECT_EQ(c->layers[7].k_rank, 40);
  EXPECT_EQ(c->max_k_rank(), 96);
  EXPECT_EQ(c->max_v_rank(), 64);
  EXPECT_DOUBLE_EQ(c->kv_bytes_ratio, 1056.0 / 2048.0);
  EXPECT_EQ(c->calibration_source, "default");
  EXPECT_EQ(c->source_model_dir, "models/tiny-llama-a");
  json plain = Valid();
  plain["method"] = "svd";
  plain["calibration"] = nullptr;
  plain.erase("kv_bytes_ratio");
  plain.erase("schedule");
  EXPECT_OK(Parse(plain));
}

TEST(LorcConfigTest, ErrorsNameTheField) {
  struct Case {
    const char* what;
    std::function<void(json&)> edit;
    const char* message;
  };
  const std::vector<Case> cases = {
      {"format", [](json& j) { j["format"] = "other"; }, "lorc.json: format: \"other\""},
      {"version", [](json& j) { j["version"] = 2; }, "lorc.json: version: 2 is not supported"},
      {"version type", [](json& j) { j["version"] = "1"; }, "version: must be an integer"},
      {"method", [](json& j) { j["method"] = "qr"; }, "method: \"qr\" is not one of"},
      {"no method", [](json& j) { j.erase("method"); }, "lorc.json: method: missing"},
      {"schedule", [](json& j) { j["schedule"] = "random"; }, "schedule: \"random\""},
      {"num_layers", [](json& j) { j["num_layers"] = 7; }, "num_layers: 7 differs from config.json's 8"},
      {"num_kv_heads", [](json& j) { j["num_kv_heads"] = 4; }, "num_kv_heads: 4 differs"},
      {"head_dim", [](json& j) { j["head_dim"] = 64; }, "head_dim: 64 differs"},
      {"layers count", [](json& j) { j["layers"].erase(0); }, "layers: has 7 entries, num_layers is 8"},
      {"layers type", [](json& j) { j["layers"] = 3; }, "layers: must be an array"},
      {"rank range", [](json& j) { j["layers"][3]["k_rank"] = 200; },
       "lorc.json: layers[3].k_rank: 200 is outside [1, 128]"},
      {"rank zero", [](json& j) { j["layers"][5]["v_rank"] = 0; }, "layers[5].v_rank: 0 is outside"},
      {"rank type", [](json& j) { j["layers"][1]["k_rank"] = 3.5; }, "layers[1].k_rank: must be an integer"},
      {"rank missing", [](json& j) { j["layers"][2].erase("v_rank"); }, "layers[2].v_rank: missing"},
      {"ratio", [](json& j) { j["kv_bytes_ratio"] = 0.25; }, "kv_bytes_ratio: 0.25 differs from the ranks'"},
      {"calibration", [](json& j) { j["calibration"] = 3; }, "calibration: must be an object or null"},
      {"document", [](json& j) { j = json::array(); }, "lorc.json: document: must be a JSON object"},
  };
  for (const Case& c : cases) {
    json j = Valid();
    c.edit(j);
    EXPECT_THAT(Parse(j), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr(c.message))) << c.what;
  }
}

class ScratchDir : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("lorc_lorc_config_" + std::to_string(::getpid()));
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  fs::path dir_;
};

TEST_F(ScratchDir, LoadModelConfigReadsAndValidatesLorcJson) {
  REQUIRE_FIXTURE(::lorc::testing::TinyLlamaDir() + "/config.json");
  fs::copy_file(::lorc::testing::TinyLlamaDir() + "/config.json", dir_ / "config.json");
  auto plain = LoadModelConfig(dir_.string());
  ASSERT_OK(plain);
  EXPECT_FALSE(plain->lorc.has_value());

  std::ofstream(dir_ / "lorc.json") << Valid().dump(2);
  auto c = LoadModelConfig(dir_.string());
  ASSERT_OK(c);
  ASSERT_TRUE(c->lorc.has_value());
  EXPECT_EQ(c->lorc->layers[2].k_rank, 80);
  // Parameters: the factor tensors replace k/v/o_proj (8 layers, D 512, 4 q heads, 2 KV heads).
  int64_t attn_delta = 0;
  for (const LorcLayerRanks& r : c->lorc->layers) {
    attn_delta += (2 * r.k_rank * 512 + 2 * 128 * r.k_rank + 2 * r.v_rank * 512 + 512 * 4 * r.v_rank) -
                  (2 * 256 * 512 + 512 * 512);
  }
  EXPECT_EQ(c->NumParameters(), plain->NumParameters() + attn_delta);

  json bad = Valid();
  bad["layers"][3]["k_rank"] = 200;
  std::ofstream(dir_ / "lorc.json") << bad.dump();
  EXPECT_THAT(LoadModelConfig(dir_.string()),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("/lorc.json: layers[3].k_rank: 200 is outside [1, 128]")));
  std::ofstream(dir_ / "lorc.json") << "{\"format\": ";  // truncated
  EXPECT_THAT(LoadModelConfig(dir_.string()),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("lorc.json")));
}

TEST_F(ScratchDir, SafetensorsWriterRoundTrips) {
  std::vector<TensorToWrite> t(2);
  t[0].name = "a";
  t[0].shape = {2, 3};
  ASSERT_OK(EncodeF32(std::vector<float>{1, 2, 3, 4, 5, 6}, DType::kF32, &t[0].bytes));
  t[1].name = "b";
  t[1].dtype = DType::kBF16;
  t[1].shape = {2};
  ASSERT_OK(EncodeF32(std::vector<float>{0.5f, -2.0f}, DType::kBF16, &t[1].bytes));
  ASSERT_OK(WriteSafetensors((dir_ / "model.safetensors").string(), t));
  auto r = CheckpointReader::Open(dir_.string());
  ASSERT_OK(r);
  std::vector<float> a(6), b(2);
  ASSERT_OK((*r)->ReadF32("a", std::vector<int64_t>{2, 3}, absl::MakeSpan(a)));
  ASSERT_OK((*r)->ReadF32("b", std::vector<int64_t>{2}, absl::MakeSpan(b)));
  EXPECT_EQ(a, (std::vector<float>{1, 2, 3, 4, 5, 6}));
  EXPECT_EQ(b, (std::vector<float>{0.5f, -2.0f}));
  t[1].shape = {3};
  EXPECT_THAT(WriteSafetensors((dir_ / "x.safetensors").string(), t),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("'b' has 4 bytes")));
}

}  // namespace
}  // namespace lorc
