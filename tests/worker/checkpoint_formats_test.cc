// Checkpoints of the same family in the other layouts public Llama models ship in load and
// generate without code changes:
//  - tiny-llama-a re-written as a sharded checkpoint (3 shards + model.safetensors.index.json)
//    with mixed dtypes (F32 / F16 / BF16, all exact conversions of the bf16 originals) and the
//    older config spelling (top-level `rope_theta`, `torch_dtype`): greedy output unchanged;
//  - a Llama-3-style model directory (the llama3-style tokenizer.json, GQA, llama3 RoPE scaling,
//    a list of EOS ids, tied embeddings) run through `lorcserve generate --random-weights`.
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "common/check.h"
#include "common/dtype.h"
#include "common/json_util.h"
#include "coordinator/engine.h"
#include "tokenizer/tokenizer.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "model/safetensors_writer.h"
#include "nlohmann/json.hpp"
#include "tests/testing/fixtures.h"
#include "tests/testing/golden.h"
#include "tests/testing/run_lorcserve.h"
#include "tests/testing/scratch_dir.h"
#include "tests/testing/status_matchers.h"
#include "worker/model_loader.h"
#include "model/safetensors.h"
#include "worker/step_executor.h"


namespace lorc {
namespace {

using ::lorc::testing::Golden;
using ::lorc::testing::GoldenPrompts;

namespace fs = std::filesystem;
using json = nlohmann::json;

constexpr char kScratch[] = "lorc_ckpt_formats";
fs::path MakeScratchDir(const std::string& name) { return ::lorc::testing::MakeScratchDir(kScratch, name); }
const auto* const kCleanup =
    ::testing::AddGlobalTestEnvironment(new ::lorc::testing::ScratchCleanup(kScratch));

// Tensors are written with model/safetensors_writer.h.
std::vector<uint8_t> Encode(const std::vector<float>& v, DType dtype) {
  std::vector<uint8_t> out;
  CHECK_OK(EncodeF32(v, dtype, &out));
  return out;
}

// Writes a file; returns its data section's size.
uint64_t WriteFile(const fs::path& path, const std::vector<TensorToWrite>& tensors) {
  CHECK_OK(WriteSafetensors(path.string(), tensors));
  uint64_t bytes = 0;
  for (const TensorToWrite& t : tensors) bytes += t.bytes.size();
  return bytes;
}

int LayerOf(const std::string& name) {
  const std::string prefix = "model.layers.";
  if (!absl::StartsWith(name, prefix)) return -1;
  return std::stoi(name.substr(prefix.size()));
}

// ---- sharded, mixed-dtype checkpoint ------------------------------------------------------------

TEST(CheckpointFormatsTest, ShardedMixedDtypeCheckpointWithTopLevelRopeTheta) {
  REQUIRE_TINY_LLAMA();
  const std::string src_dir = ::lorc::testing::TinyLlamaDir();
  const fs::path dir = MakeScratchDir("sharded");
  auto src = CheckpointReader::Open(src_dir);
  ASSERT_OK(src);

  // Config: the same model, with the RoPE and dtype fields spelt as older checkpoints do.
  auto config = ReadJsonFile(src_dir + "/config.json");
  ASSERT_OK(config);
  ASSERT_TRUE(config->contains("rope_parameters"));
  const double theta = (*config)["rope_parameters"]["rope_theta"].get<double>();
  config->erase("rope_parameters");
  config->erase("dtype");
  (*config)["rope_theta"] = theta;
  (*config)["rope_scaling"] = nullptr;
  (*config)["torch_dtype"] = "bfloat16";
  std::ofstream(dir / "config.json") << config->dump(2);

  // Tensors: norms as F16 (bf16 values of norm weights are exact in fp16), attention and the
  // embedding as F32 (always exact), the MLPs of odd layers and the LM head kept BF16.
  std::map<int, std::vector<TensorToWrite>> shards;  // 1..3
  std::map<std::string, DType> written;
  int64_t f16_inexact = 0;
  for (const std::string& name : (*src)->TensorNames()) {
    auto info = (*src)->Find(name);
    ASSERT_OK(info);
    ASSERT_EQ((*info)->dtype, DType::kBF16) << name;
    std::vector<float> v(static_cast<size_t>((*info)->numel()));
    ASSERT_OK((*src)->ReadF32(name, (*info)->shape, absl::MakeSpan(v)));
    DType dtype;
    if (absl::StrContains(name, "norm")) {
      dtype = DType::kF16;
      for (float x : v) f16_inexact += F16ToF32(F32ToF16(x)) != x;
    } else if (absl::StrContains(name, ".mlp.") && LayerOf(name) % 2 == 1) {
      dtype = DType::kBF16;
    } else if (name == "lm_head.weight") {
      dtype = DType::kBF16;
    } else {
      dtype = DType::kF32;
    }
    const int layer = LayerOf(name);
    const int shard = name == "model.embed_tokens.weight" ? 1
                      : layer < 0                         ? 3
                      : layer < 3                         ? 1
                      : layer < 6                         ? 2
                                                          : 3;
    shards[shard].push_back({name, dtype, (*info)->shape, Encode(v, dtype)});
    written[name] = dtype;
  }
  EXPECT_EQ(f16_inexact, 0) << "norm weights not exactly representable in fp16";

  json index;
  index["weight_map"] = json::object();
  uint64_t total = 0;
  ASSERT_EQ(shards.size(), 3u);
  for (auto& [k, tensors] : shards) {
    const std::string file = "model-0000" + std::to_string(k) + "-of-00003.safetensors";
    // Data in reverse name order: offsets need not follow the header's (sorted) key order.
    std::reverse(tensors.begin(), tensors.end());
    total += WriteFile(dir / file, tensors);
    for (const TensorToWrite& t : tensors) index["weight_map"][t.name] = file;
  }
  index["metadata"] = {{"total_size", total}};
  std::ofstream(dir / "model.safetensors.index.json") << index.dump(2);
  ASSERT_FALSE(fs::exists(dir / "model.safetensors"));

  // The reader sees the same tensors, in the dtypes written.
  auto reread = CheckpointReader::Open(dir.string());
  ASSERT_OK(reread);
  EXPECT_EQ((*reread)->TensorNames(), (*src)->TensorNames());
  std::map<DType, int> counts;
  for (const auto& [name, dtype] : written) {
    auto info = (*reread)->Find(name);
    ASSERT_OK(info);
    EXPECT_EQ((*info)->dtype, dtype) << name;
    ++counts[dtype];
  }
  EXPECT_GT(counts[DType::kF16], 0);
  EXPECT_GT(counts[DType::kF32], 0);
  EXPECT_GT(counts[DType::kBF16], 0);

  auto backend = CreateBackend({});
  ASSERT_OK(backend);
  KvCacheOptions kv;
  kv.block_size = 16;
  kv.memory_bytes = 64ll << 20;
  auto m = LoadModel({dir.string()}, backend->get(), 0, 1, nullptr, kv);
  ASSERT_OK(m);
  EXPECT_EQ(m->config.rope.type, RopeType::kDefault);
  EXPECT_DOUBLE_EQ(m->config.rope.theta, 500000.0);
  EXPECT_EQ(m->config.torch_dtype, "bfloat16");

  const std::vector<Golden> golden = GoldenPrompts();
  StepExecutor exec(m->runner.get());
  auto engine_or = Engine::Create(&exec, m->config, m->runner->kv_spec(), nullptr, {});
  CHECK_OK(engine_or.status());
  Engine& engine = **engine_or;
  std::vector<GenerationRequest> reqs;
  for (const Golden& g : golden) {
    GenerationRequest r;
    r.prompt_ids = g.prompt_ids;
    r.params.max_tokens = 48;
    reqs.push_back(r);
  }
  auto out = engine.Generate(reqs);
  ASSERT_OK(out);
  ASSERT_EQ(out->size(), golden.size());
  for (size_t i = 0; i < golden.size(); ++i) {
    EXPECT_OK((*out)[i].status);
    EXPECT_EQ((*out)[i].first().output_ids, golden[i].greedy_ids) << "prompt " << i;
  }
}

// ---- Llama-3-style directory through the binary --------------------------------------------------

using ::lorc::testing::RunLorcserve;
using ::lorc::testing::RunResult;

TEST(CheckpointFormatsTest, Llama3StyleDirectoryWithRandomWeights) {
  const std::string tokenizer = ::lorc::testing::Llama3TokenizerDir() + "/tokenizer.json";
  REQUIRE_FIXTURE(tokenizer);
  const fs::path dir = MakeScratchDir("llama3");
  fs::copy_file(tokenizer, dir / "tokenizer.json");
  // Llama-3.1-8B's config.json, scaled down (vocab of the 3,000-token tokenizer).
  std::ofstream(dir / "config.json") << R"({
    "architectures": ["LlamaForCausalLM"], "model_type": "llama",
    "attention_bias": false, "attention_dropout": 0.0, "mlp_bias": false, "hidden_act": "silu",
    "vocab_size": 3000, "hidden_size": 256, "intermediate_size": 768,
    "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 32,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "tie_word_embeddings": true, "bos_token_id": 0, "eos_token_id": [1, 4],
    "torch_dtype": "bfloat16", "use_cache": true, "pretraining_tp": 1})";

  auto config = LoadModelConfig(dir.string());
  ASSERT_OK(config);
  EXPECT_EQ(config->rope.type, RopeType::kLlama3);
  EXPECT_EQ(config->eos_token_ids, (std::vector<int64_t>{1, 4}));
  EXPECT_TRUE(config->tie_word_embeddings);

  // The id of <|begin_of_text|>, from the tokenizer file itself.
  auto tok_json = ReadJsonFile(tokenizer);
  ASSERT_OK(tok_json);
  int64_t bot = -1;
  for (const json& t : (*tok_json)["added_tokens"]) {
    if (t["content"] == "<|begin_of_text|>") bot = t["id"].get<int64_t>();
  }
  ASSERT_GE(bot, 0);
  auto tok = Tokenizer::FromModelDir(dir.string());
  ASSERT_OK(tok);
  auto expected_ids = (*tok)->Encode("Hello, world!", /*add_special_tokens=*/true);
  ASSERT_OK(expected_ids);

  const std::vector<std::string> args = {"generate", "--model", dir.string(), "--random-weights",
                                         "--prompt", "Hello, world!", "--max-tokens", "8", "--json"};
  const RunResult r = RunLorcserve(args);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const json j = json::parse(r.out, nullptr, false);
  ASSERT_FALSE(j.is_discarded()) << r.out;
  const auto prompt_ids = j["prompt_ids"].get<std::vector<int32_t>>();
  const auto output_ids = j["output_ids"].get<std::vector<int32_t>>();
  ASSERT_GE(prompt_ids.size(), 2u);
  EXPECT_EQ(prompt_ids[0], bot);
  EXPECT_NE(prompt_ids[1], bot) << "BOS added twice";
  EXPECT_EQ(prompt_ids, *expected_ids);
  if (j["finish_reason"] == "stop") {
    EXPECT_LE(output_ids.size(), 8u);
  } else {
    EXPECT_EQ(j["finish_reason"], "length");
    EXPECT_EQ(output_ids.size(), 8u);
  }
  for (int32_t id : output_ids) {
    EXPECT_GE(id, 0);
    EXPECT_LT(id, 3000);
  }

  // Seeded: the same weights seed gives the same output.
  const RunResult again = RunLorcserve(args);
  ASSERT_EQ(again.exit_code, 0) << again.err;
  EXPECT_EQ(json::parse(again.out, nullptr, false)["output_ids"], j["output_ids"]);
}

}  // namespace
}  // namespace lorc
