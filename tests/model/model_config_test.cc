#include "model/model_config.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <numbers>
#include <string>
#include <utility>
#include <vector>

#include <unistd.h>

#include "absl/strings/str_cat.h"
#include "common/json_util.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/testing/fixtures.h"
#include "tests/testing/status_matchers.h"

namespace lorc {
namespace {

using ::lorc::testing::StatusIs;
using ::testing::AllOf;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using json = nlohmann::json;

const std::string kTinyDir = ::lorc::testing::TinyLlamaDir();

json TinyConfigJson() {
  absl::StatusOr<json> j = ReadJsonFile(kTinyDir + "/config.json");
  EXPECT_TRUE(j.ok()) << j.status();
  return j.ok() ? *j : json::object();
}

// A Llama-3.1-70B-style config.json (older layout: top-level rope_theta + rope_scaling).
json Llama31_70BJson() {
  return json::parse(R"({
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": false,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
    "hidden_act": "silu",
    "hidden_size": 8192,
    "initializer_range": 0.02,
    "intermediate_size": 28672,
    "max_position_embeddings": 131072,
    "mlp_bias": false,
    "model_type": "llama",
    "num_attention_heads": 64,
    "num_hidden_layers": 80,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
      "factor": 8.0,
      "low_freq_factor": 1.0,
      "high_freq_factor": 4.0,
      "original_max_position_embeddings": 8192,
      "rope_type": "llama3"
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": false,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.43.0.dev0",
    "use_cache": true,
    "vocab_size": 128256
  })");
}

TEST(ModelConfigTest, LoadsTinyLlama) {
  absl::StatusOr<ModelConfig> c = LoadModelConfig(kTinyDir);
  ASSERT_OK(c);
  EXPECT_EQ(c->model_type, "llama");
  EXPECT_EQ(c->num_layers, 8);
  EXPECT_EQ(c->hidden_size, 512);
  EXPECT_EQ(c->intermediate_size, 1408);
  EXPECT_EQ(c->vocab_size, 4096);
  EXPECT_EQ(c->num_heads, 4);
  EXPECT_EQ(c->num_kv_heads, 2);
  EXPECT_EQ(c->head_dim, 128);
  EXPECT_EQ(c->q_size(), 512);
  EXPECT_EQ(c->kv_size(), 256);
  EXPECT_EQ(c->max_position_embeddings, 4096);
  EXPECT_DOUBLE_EQ(c->rms_norm_eps, 1e-5);
  EXPECT_FALSE(c->tie_word_embeddings);
  EXPECT_EQ(c->rope.type, RopeType::kDefault);
  EXPECT_DOUBLE_EQ(c->rope.theta, 500000.0);
  EXPECT_EQ(c->bos_token_id, 0);
  EXPECT_THAT(c->eos_token_ids, ElementsAre(1));
  EXPECT_EQ(c->torch_dtype, "bfloat16");
  // README: 27.8M parameters.
  EXPECT_EQ(c->NumParameters(), 27795968);
}

// Found by fuzz/config_json_fuzz (fuzz/corpus/config_json_fuzz/crash-parameter-overflow): sizes
// each within the 2^31 field limit multiplied past int64 in NumParameters (signed overflow).
TEST(ModelConfigTest, AParameterCountPast2To50IsRejectedNamingTheSizes) {
  json j = TinyConfigJson();
  j["vocab_size"] = int64_t{1} << 31;
  j["hidden_size"] = int64_t{1} << 31;
  j["intermediate_size"] = int64_t{1} << 31;
  j["num_hidden_layers"] = 1024;
  EXPECT_THAT(ModelConfigFromJson(j),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       AllOf(HasSubstr("config: the model would have"),
                             HasSubstr("parameters, more than the limit of 2^50"),
                             HasSubstr("hidden_size 2147483648"))));
  // Large real models stay well inside: Llama-3.1-70B has about 7.1e10.
  auto big = ModelConfigFromJson(Llama31_70BJson());
  ASSERT_OK(big);
  EXPECT_EQ(big->NumParameters(), 70553706496);
}

// Found by fuzz/config_json_fuzz (CI, 2026-12-03; docs/FUZZING.md #8; regression inputs
// fuzz/corpus/config_json_fuzz/crash-{head-dim,layer-count}-table): a head_dim or a layer count of
// 2^30 passed every check, and RopeInverseFrequencies / MakeKvCacheSpec then allocated 2 GiB.
TEST(ModelConfigTest, LayerCountAndHeadDimBeyondWhatIsServedAreRejectedNamingTheField) {
  json j = TinyConfigJson();
  j["num_hidden_layers"] = int64_t{1} << 30;
  EXPECT_THAT(ModelConfigFromJson(j),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("config field 'num_hidden_layers' is too large: 1073741824 (limit 1024)")));
  j = TinyConfigJson();
  j["head_dim"] = int64_t{1} << 30;
  EXPECT_THAT(ModelConfigFromJson(j),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("config field 'head_dim' is too large: 1073741824 (limit 1024)")));
  j = TinyConfigJson();
  j["num_hidden_layers"] = 1024;
  j["head_dim"] = 1024;
  EXPECT_OK(ModelConfigFromJson(j));
}

TEST(ModelConfigTest, TopLevelRopeThetaGivesSameConfig) {
  json j = TinyConfigJson();
  j.erase("rope_parameters");
  j["rope_theta"] = 500000.0;
  j["rope_scaling"] = nullptr;
  absl::StatusOr<ModelConfig> c = ModelConfigFromJson(j);
  ASSERT_OK(c);
  EXPECT_EQ(c->rope.type, RopeType::kDefault);
  EXPECT_DOUBLE_EQ(c->rope.theta, 500000.0);
  EXPECT_EQ(c->head_dim, 128);
  EXPECT_EQ(c->num_kv_heads, 2);
}

TEST(ModelConfigTest, DefaultsWhenOptionalFieldsAbsent) {
  json j = TinyConfigJson();
  for (const char* k : {"num_key_value_heads", "max_position_embeddings", "rms_norm_eps",
                        "tie_word_embeddings", "bos_token_id", "eos_token_id", "dtype",
                        "rope_parameters"}) {
    j.erase(k);
  }
  j["head_dim"] = nullptr;  // null: hidden_size / num_attention_heads
  absl::StatusOr<ModelConfig> c = ModelConfigFromJson(j);
  ASSERT_OK(c);
  EXPECT_EQ(c->num_kv_heads, 4);
  EXPECT_EQ(c->head_dim, 128);
  EXPECT_EQ(c->max_position_embeddings, 2048);
  EXPECT_DOUBLE_EQ(c->rms_norm_eps, 1e-6);
  EXPECT_FALSE(c->tie_word_embeddings);
  EXPECT_EQ(c->bos_token_id, -1);
  EXPECT_TRUE(c->eos_token_ids.empty());
  EXPECT_EQ(c->torch_dtype, "");
  EXPECT_EQ(c->rope.type, RopeType::kDefault);
  EXPECT_DOUBLE_EQ(c->rope.theta, 10000.0);
}

TEST(ModelConfigTest, DefaultRopeInverseFrequencies) {
  absl::StatusOr<ModelConfig> c = LoadModelConfig(kTinyDir);
  ASSERT_OK(c);
  const std::vector<float> inv = RopeInverseFrequencies(*c);
  ASSERT_EQ(inv.size(), 64u);
  for (int i : {0, 1, 17, 40, 63}) {
    const double want = 1.0 / std::pow(500000.0, 2.0 * i / 128.0);
    EXPECT_NEAR(inv[i], want, want * 2e-6) << i;
  }
  EXPECT_EQ(inv[0], 1.0f);
}

TEST(ModelConfigTest, Llama31_70BWithLlama3Scaling) {
  absl::StatusOr<ModelConfig> c = ModelConfigFromJson(Llama31_70BJson());
  ASSERT_OK(c);
  EXPECT_EQ(c->hidden_size, 8192);
  EXPECT_EQ(c->num_layers, 80);
  EXPECT_EQ(c->num_heads, 64);
  EXPECT_EQ(c->num_kv_heads, 8);
  EXPECT_EQ(c->head_dim, 128);
  EXPECT_EQ(c->intermediate_size, 28672);
  EXPECT_EQ(c->vocab_size, 128256);
  EXPECT_EQ(c->max_position_embeddings, 131072);
  EXPECT_EQ(c->bos_token_id, 128000);
  EXPECT_THAT(c->eos_token_ids, ElementsAre(128001, 128008, 128009));
  EXPECT_EQ(c->torch_dtype, "bfloat16");
  EXPECT_EQ(c->rope.type, RopeType::kLlama3);
  EXPECT_DOUBLE_EQ(c->rope.theta, 500000.0);
  EXPECT_DOUBLE_EQ(c->rope.factor, 8.0);
  EXPECT_DOUBLE_EQ(c->rope.low_freq_factor, 1.0);
  EXPECT_DOUBLE_EQ(c->rope.high_freq_factor, 4.0);
  EXPECT_EQ(c->rope.original_max_position_embeddings, 8192);
  // Llama 3.1 70B has 70.55B parameters.
  EXPECT_EQ(c->NumParameters(), 70553706496);

  const std::vector<float> inv = RopeInverseFrequencies(*c);
  ASSERT_EQ(inv.size(), 64u);

  // Independent reference in double precision, following the Llama 3.1 reference code.
  auto reference = [](int i, bool* smooth_band) {
    const double base = 1.0 / std::pow(500000.0, 2.0 * i / 128.0);
    const double wavelen = 2 * std::numbers::pi / base;
    const double low_freq_wavelen = 8192.0 / 1.0;
    const double high_freq_wavelen = 8192.0 / 4.0;
    *smooth_band = false;
    if (wavelen < high_freq_wavelen) return base;
    if (wavelen > low_freq_wavelen) return base / 8.0;
    *smooth_band = true;
    const double smooth = (8192.0 / wavelen - 1.0) / (4.0 - 1.0);
    return (1 - smooth) * base / 8.0 + smooth * base;
  };
  bool smooth = false;
  EXPECT_NEAR(inv[0], reference(0, &smooth), 1e-7);  // highest frequency: unchanged
  EXPECT_EQ(inv[0], 1.0f);
  EXPECT_FALSE(smooth);
  const double mid = reference(31, &smooth);  // in the smoothly interpolated band
  EXPECT_TRUE(smooth);
  EXPECT_NEAR(inv[31], mid, mid * 1e-5);
  EXPECT_LT(inv[31], 1.0 / std::pow(500000.0, 62.0 / 128.0));  // really scaled down
  const double last = reference(63, &smooth);  // lowest frequency: divided by factor
  EXPECT_FALSE(smooth);
  EXPECT_NEAR(inv[63], last, last * 1e-5);
  EXPECT_NEAR(inv[63], 1.0 / std::pow(500000.0, 126.0 / 128.0) / 8.0, last * 1e-5);
  for (int i = 0; i < 64; ++i) {
    const double want = reference(i, &smooth);
    EXPECT_NEAR(inv[i], want, want * 1e-5) << i;
  }
}

uint32_t Bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

// Reference bits produced by torch 2.11 (CPU) running transformers' formulas
// (`_compute_default_rope_parameters`, `_compute_llama3_parameters`) for head_dim 128.
TEST(ModelConfigTest, InverseFrequenciesMatchTorchBitExactly) {
  absl::StatusOr<ModelConfig> c = ModelConfigFromJson(Llama31_70BJson());
  ASSERT_OK(c);
  const std::vector<float> llama3 = RopeInverseFrequencies(*c);
  const std::vector<std::pair<int, uint32_t>> want_llama3 = {
      {0, 0x3f800000},  {1, 0x3f508ac1},  {28, 0x3b527720}, {29, 0x3b0dfd06},
      {30, 0x3ab3d11d}, {31, 0x3a60979e}, {32, 0x3a0995d2}, {33, 0x39a3f108},
      {34, 0x393b2dd2}, {35, 0x38c86886}, {36, 0x38a3418d}, {63, 0x34a4c2ff}};
  for (const auto& [i, bits] : want_llama3) EXPECT_EQ(Bits(llama3[i]), bits) << i;

  c->rope = RopeConfig{};
  c->rope.theta = 500000.0;
  const std::vector<float> plain = RopeInverseFrequencies(*c);
  const std::vector<std::pair<int, uint32_t>> want_plain = {
      {1, 0x3f508ac1}, {29, 0x3b2b72dc}, {31, 0x3ae38c10}, {63, 0x3624c2ff}};
  for (const auto& [i, bits] : want_plain) EXPECT_EQ(Bits(plain[i]), bits) << i;

  c->rope.theta = 10000.0;
  c->rope.type = RopeType::kLinear;
  c->rope.factor = 4.0;
  const std::vector<float> linear = RopeInverseFrequencies(*c);
  const std::vector<std::pair<int, uint32_t>> want_linear = {
      {0, 0x3e800000}, {1, 0x3e5dafd7}, {30, 0x3b5a7bf2}, {63, 0x37f22ce2}};
  for (const auto& [i, bits] : want_linear) EXPECT_EQ(Bits(linear[i]), bits) << i;
}

TEST(ModelConfigTest, Llama3ScalingInRopeParameters) {
  json j = Llama31_70BJson();
  json params = j["rope_scaling"];
  params["rope_theta"] = 500000.0;
  j.erase("rope_scaling");
  j.erase("rope_theta");
  j["rope_parameters"] = params;
  absl::StatusOr<ModelConfig> c = ModelConfigFromJson(j);
  ASSERT_OK(c);
  EXPECT_EQ(c->rope.type, RopeType::kLlama3);
  EXPECT_DOUBLE_EQ(c->rope.theta, 500000.0);
  EXPECT_EQ(RopeInverseFrequencies(*c), RopeInverseFrequencies(*ModelConfigFromJson(
                                            Llama31_70BJson())));
}

TEST(ModelConfigTest, LinearScalingWithLegacyTypeKey) {
  json j = TinyConfigJson();
  j.erase("rope_parameters");
  j["rope_theta"] = 10000.0;
  j["rope_scaling"] = {{"type", "linear"}, {"factor", 4.0}};
  absl::StatusOr<ModelConfig> c = ModelConfigFromJson(j);
  ASSERT_OK(c);
  EXPECT_EQ(c->rope.type, RopeType::kLinear);
  const std::vector<float> inv = RopeInverseFrequencies(*c);
  for (int i : {0, 10, 63}) {
    const double want = 1.0 / std::pow(10000.0, 2.0 * i / 128.0) / 4.0;
    EXPECT_NEAR(inv[i], want, want * 2e-6) << i;
  }
}

TEST(ModelConfigTest, HeadDimNullDerivedFromHidden) {
  json j = Llama31_70BJson();
  j["head_dim"] = nullptr;
  absl::StatusOr<ModelConfig> c = ModelConfigFromJson(j);
  ASSERT_OK(c);
  EXPECT_EQ(c->head_dim, 128);
}

TEST(ModelConfigTest, MissingRequiredField) {
  json j = TinyConfigJson();
  j.erase("vocab_size");
  EXPECT_THAT(ModelConfigFromJson(j),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       AllOf(HasSubstr("'vocab_size'"), HasSubstr("missing"))));
}

TEST(ModelConfigTest, WrongTypeIsAnErrorNotACrash) {
  json j = TinyConfigJson();
  j["hidden_size"] = "512";
  EXPECT_THAT(ModelConfigFromJson(j),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       AllOf(HasSubstr("'hidden_size'"), HasSubstr("integer"),
                             HasSubstr("string"))));
  json k = TinyConfigJson();
  k["rope_parameters"]["rope_theta"] = "big";
  EXPECT_THAT(ModelConfigFromJson(k), StatusIs(absl::StatusCode::kInvalidArgument,
                                               HasSubstr("'rope_parameters.rope_theta'")));
  json l = TinyConfigJson();
  l["tie_word_embeddings"] = 1;
  EXPECT_THAT(ModelConfigFromJson(l), StatusIs(absl::StatusCode::kInvalidArgument,
                                               HasSubstr("'tie_word_embeddings'")));
  json m = TinyConfigJson();
  m["eos_token_id"] = json::array({1, "two"});
  EXPECT_THAT(ModelConfigFromJson(m), StatusIs(absl::StatusCode::kInvalidArgument,
                                               HasSubstr("'eos_token_id[1]'")));
  EXPECT_THAT(ModelConfigFromJson(json::array({1, 2})),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("object")));
  json n = TinyConfigJson();
  n["rope_parameters"] = "default";
  EXPECT_THAT(ModelConfigFromJson(n), StatusIs(absl::StatusCode::kInvalidArgument,
                                               HasSubstr("'rope_parameters'")));
}

TEST(ModelConfigTest, NonPositiveAndInconsistentSizes) {
  json j = TinyConfigJson();
  j["num_hidden_layers"] = 0;
  EXPECT_THAT(ModelConfigFromJson(j), StatusIs(absl::StatusCode::kInvalidArgument,
                                               HasSubstr("'num_hidden_layers' must be positive")));
  json k = TinyConfigJson();
  k["head_dim"] = 127;
  EXPECT_THAT(ModelConfigFromJson(k),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("'head_dim' must be even")));
  json l = TinyConfigJson();
  l.erase("head_dim");
  l["num_attention_heads"] = 3;
  l["num_key_value_heads"] = 1;
  EXPECT_THAT(ModelConfigFromJson(l), StatusIs(absl::StatusCode::kInvalidArgument,
                                               HasSubstr("'hidden_size' (512) must be divisible")));
}

TEST(ModelConfigTest, HeadsNotDivisibleByKvHeads) {
  json j = TinyConfigJson();
  j["num_key_value_heads"] = 3;
  EXPECT_THAT(ModelConfigFromJson(j),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       AllOf(HasSubstr("'num_attention_heads' (4)"),
                             HasSubstr("'num_key_value_heads' (3)"))));
}

TEST(ModelConfigTest, UnsupportedRopeTypes) {
  json j = TinyConfigJson();
  j["rope_parameters"]["rope_type"] = "yarn";
  j["rope_parameters"]["factor"] = 4.0;
  EXPECT_THAT(ModelConfigFromJson(j),
              StatusIs(absl::StatusCode::kUnimplemented, HasSubstr("'yarn'")));
  json k = Llama31_70BJson();
  k["rope_scaling"] = {{"type", "dynamic"}, {"factor", 2.0}};
  EXPECT_THAT(ModelConfigFromJson(k),
              StatusIs(absl::StatusCode::kUnimplemented, HasSubstr("'dynamic'")));
}

TEST(ModelConfigTest, Llama3RequiresAllParameters) {
  json j = Llama31_70BJson();
  j["rope_scaling"].erase("low_freq_factor");
  EXPECT_THAT(ModelConfigFromJson(j),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("'rope_scaling.low_freq_factor' is required")));
  json k = Llama31_70BJson();
  k["rope_scaling"].erase("original_max_position_embeddings");
  EXPECT_THAT(ModelConfigFromJson(k),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("'rope_scaling.original_max_position_embeddings'")));
}

TEST(ModelConfigTest, UnsupportedArchitectureFeatures) {
  json j = TinyConfigJson();
  j["attention_bias"] = true;
  EXPECT_THAT(ModelConfigFromJson(j),
              StatusIs(absl::StatusCode::kUnimplemented, HasSubstr("'attention_bias'")));
  json k = TinyConfigJson();
  k["mlp_bias"] = true;
  EXPECT_THAT(ModelConfigFromJson(k),
              StatusIs(absl::StatusCode::kUnimplemented, HasSubstr("'mlp_bias'")));
  json l = TinyConfigJson();
  l["model_type"] = "mistral";
  l["sliding_window"] = 4096;
  EXPECT_THAT(ModelConfigFromJson(l),
              StatusIs(absl::StatusCode::kUnimplemented, HasSubstr("sliding_window")));
  l["sliding_window"] = nullptr;
  EXPECT_OK(ModelConfigFromJson(l));
  json m = TinyConfigJson();
  m["model_type"] = "qwen2";
  EXPECT_THAT(ModelConfigFromJson(m),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("'model_type'")));
}

TEST(ModelConfigTest, SpecialTokenIdsOutsideTheVocabularyNameFieldAndFile) {
  json j = TinyConfigJson();
  const int64_t vocab = j["vocab_size"].get<int64_t>();
  j["eos_token_id"] = vocab;  // one past the end: used to CHECK-fail in the scheduler
  EXPECT_THAT(ModelConfigFromJson(j),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr(absl::StrCat("config field 'eos_token_id' is ", vocab,
                                              ", outside the vocabulary [0, ", vocab, ")"))));
  j["eos_token_id"] = json::array({1, vocab + 5});
  EXPECT_THAT(ModelConfigFromJson(j), StatusIs(absl::StatusCode::kInvalidArgument,
                                               HasSubstr("'eos_token_id[1]' is ")));
  j["eos_token_id"] = -1;
  EXPECT_THAT(ModelConfigFromJson(j), StatusIs(absl::StatusCode::kInvalidArgument,
                                               HasSubstr("'eos_token_id' is -1")));
  j["eos_token_id"] = vocab - 1;
  j["bos_token_id"] = vocab;
  EXPECT_THAT(ModelConfigFromJson(j), StatusIs(absl::StatusCode::kInvalidArgument,
                                               HasSubstr("'bos_token_id' is ")));

  // From a file: the error names the file too.
  j["bos_token_id"] = 0;
  j["eos_token_id"] = vocab;
  const std::filesystem::path dir =
      std::filesystem::path(::testing::TempDir()) / absl::StrCat("lorc_eos_", getpid());
  std::filesystem::create_directories(dir);
  std::ofstream(dir / "config.json") << j.dump();
  EXPECT_THAT(LoadModelConfig(dir.string()),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       AllOf(HasSubstr((dir / "config.json").string()),
                             HasSubstr("'eos_token_id'"))));
  std::filesystem::remove_all(dir);
}

// ---- generation_config.json (issue #7, fault 2) -----------------------------------------------

TEST(GenerationConfigTest, TinyLlamaShipsOne) {
  absl::StatusOr<ModelConfig> c = LoadModelConfig(kTinyDir);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_TRUE(c->generation.present);
  EXPECT_THAT(c->generation.eos_token_ids, ElementsAre(1));
  EXPECT_THAT(c->eos_token_ids, ElementsAre(1));  // the union has it once
  ASSERT_TRUE(c->generation.do_sample.has_value());
  EXPECT_FALSE(*c->generation.do_sample);
  EXPECT_FALSE(c->generation.temperature.has_value());
  EXPECT_FALSE(c->generation.max_new_tokens.has_value());
}

TEST(GenerationConfigTest, ReadsSamplingDefaultsAndEosLists) {
  const json j = json::parse(R"({"eos_token_id": [128001, 128009], "do_sample": true,
      "temperature": 0.6, "top_p": 0.9, "top_k": 50, "min_p": 0.05, "repetition_penalty": 1.1,
      "max_new_tokens": 256, "bos_token_id": 128000, "transformers_version": "4.45.0"})");
  absl::StatusOr<GenerationDefaults> g = GenerationDefaultsFromJson(j, 128256);
  ASSERT_TRUE(g.ok()) << g.status();
  EXPECT_TRUE(g->present);
  EXPECT_THAT(g->eos_token_ids, ElementsAre(128001, 128009));
  EXPECT_EQ(g->do_sample, true);
  EXPECT_DOUBLE_EQ(*g->temperature, 0.6);
  EXPECT_DOUBLE_EQ(*g->top_p, 0.9);
  EXPECT_EQ(*g->top_k, 50);
  EXPECT_DOUBLE_EQ(*g->min_p, 0.05);
  EXPECT_DOUBLE_EQ(*g->repetition_penalty, 1.1);
  EXPECT_EQ(*g->max_new_tokens, 256);
  // A single id, and nulls (as transformers writes unset fields) are unset.
  g = GenerationDefaultsFromJson(json::parse(R"({"eos_token_id": 7, "temperature": null})"), 100);
  ASSERT_TRUE(g.ok()) << g.status();
  EXPECT_THAT(g->eos_token_ids, ElementsAre(7));
  EXPECT_FALSE(g->temperature.has_value());
}

TEST(GenerationConfigTest, BadValuesNameTheField) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {R"([1])", "generation config: expected an object"},
      {R"({"eos_token_id": "1"})", "generation config field 'eos_token_id': expected an integer"},
      {R"({"eos_token_id": [1, 100]})", "generation config field 'eos_token_id[1]' is 100, outside the vocabulary [0, 100)"},
      {R"({"eos_token_id": -2})", "generation config field 'eos_token_id' is -2"},
      {R"({"temperature": "hot"})", "generation config field 'temperature': expected a number"},
      {R"({"temperature": -0.5})", "generation config field 'temperature' must be >= 0, got -0.5"},
      {R"({"top_p": 0})", "generation config field 'top_p' must be in (0, 1], got 0"},
      {R"({"min_p": 2})", "generation config field 'min_p' must be in [0, 1], got 2"},
      {R"({"repetition_penalty": 0})", "generation config field 'repetition_penalty' must be > 0"},
      {R"({"top_k": -1})", "generation config field 'top_k' must be >= 0, got -1"},
      {R"({"top_k": 1.5})", "generation config field 'top_k': expected an integer"},
      {R"({"max_new_tokens": 0})", "generation config field 'max_new_tokens' must be >= 1, got 0"},
      {R"({"do_sample": 1})", "generation config field 'do_sample': expected a bool"},
  };
  for (const auto& [text, message] : cases) {
    SCOPED_TRACE(text);
    EXPECT_THAT(GenerationDefaultsFromJson(json::parse(text), 100),
                StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr(message)));
  }
}

TEST(GenerationConfigTest, LoadJoinsEosIdsAndNamesTheFile) {
  const std::filesystem::path dir =
      std::filesystem::path(::testing::TempDir()) / absl::StrCat("lorc_gen_", getpid());
  std::filesystem::create_directories(dir);
  json config = TinyConfigJson();
  config["eos_token_id"] = json::array({1, 2});
  std::ofstream(dir / "config.json") << config.dump();
  // No generation_config.json: config.json's ids, nothing present.
  absl::StatusOr<ModelConfig> c = LoadModelConfig(dir.string());
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_THAT(c->eos_token_ids, ElementsAre(1, 2));
  EXPECT_FALSE(c->generation.present);
  // The union, config.json's first, no duplicates.
  std::ofstream(dir / "generation_config.json") << R"({"eos_token_id": [264, 2, 9]})";
  c = LoadModelConfig(dir.string());
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_THAT(c->eos_token_ids, ElementsAre(1, 2, 264, 9));
  EXPECT_THAT(c->generation.eos_token_ids, ElementsAre(264, 2, 9));
  // Errors name the file.
  std::ofstream(dir / "generation_config.json") << R"({"top_p": "x"})";
  EXPECT_THAT(LoadModelConfig(dir.string()),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       AllOf(HasSubstr((dir / "generation_config.json").string()),
                             HasSubstr("generation config field 'top_p'"))));
  std::ofstream(dir / "generation_config.json") << "{\"eos_token_id\": ";
  EXPECT_THAT(LoadModelConfig(dir.string()),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr((dir / "generation_config.json").string())));
  std::filesystem::remove_all(dir);
}

TEST(ModelConfigTest, MissingFileNamesPath) {
  EXPECT_THAT(LoadModelConfig("/nonexistent/lorc-model"),
              StatusIs(absl::StatusCode::kNotFound,
                       HasSubstr("/nonexistent/lorc-model/config.json")));
}

}  // namespace
}  // namespace lorc
