// Llama-family model configuration: parsed from a Hugging Face config.json (stage 1), then
// validated and normalised into an immutable ModelConfig (stage 2).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "model/lorc_config.h"
#include "nlohmann/json.hpp"

namespace lorc {

// RoPE frequency scaling. kDefault: plain RoPE. kLlama3: Llama-3.1 style wavelength-dependent
// scaling (factor, low_freq_factor, high_freq_factor, original_max_position_embeddings).
// kLinear: positions divided by `factor`.
enum class RopeType { kDefault, kLinear, kLlama3 };

struct RopeConfig {
  RopeType type = RopeType::kDefault;
  double theta = 10000.0;
  double factor = 1.0;
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  int64_t original_max_position_embeddings = 8192;
};

// The generation defaults a model directory ships in generation_config.json (Hugging Face's
// GenerationConfig). Reported (ModelInfo), not applied: a request's unset options keep
// lorcserve's defaults. Unset: the file does not give the field (or there is no file).
struct GenerationDefaults {
  bool present = false;                     // generation_config.json exists
  std::vector<int64_t> eos_token_ids;       // its eos_token_id (int or list), in file order
  std::optional<bool> do_sample;
  std::optional<double> temperature;        // >= 0
  std::optional<double> top_p;              // (0, 1]
  std::optional<int64_t> top_k;             // >= 0
  std::optional<double> min_p;              // [0, 1]
  std::optional<double> repetition_penalty; // > 0
  std::optional<int64_t> max_new_tokens;    // >= 1
};

struct ModelConfig {
  std::string model_type = "llama";
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_layers = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;  // from config.json when present, else hidden_size / num_heads
  int64_t max_position_embeddings = 0;
  double rms_norm_eps = 1e-6;
  bool tie_word_embeddings = false;
  RopeConfig rope;
  int64_t bos_token_id = -1;                // -1 when absent
  // config.json's eos_token_id (one id or a list), joined (union, config.json's first) by
  // generation_config.json's when LoadModelConfig finds one, as Hugging Face's generate() and
  // vLLM stop on both.
  std::vector<int64_t> eos_token_ids;
  std::string torch_dtype;                  // "bfloat16", "float16", "float32" or ""
  GenerationDefaults generation;            // from generation_config.json (LoadModelConfig)
  // LoRC compressed K/V (compress/FORMAT.md): set when the directory has a lorc.json
  // (LoadModelConfig). Every layer is then a latent layer: k_proj/v_proj hold the per-KV-head
  // down-projections, k_up_proj the key up-projections, o_proj is r_v-wide per query head.
  std::optional<LorcConfig> lorc;

  int64_t q_size() const { return num_heads * head_dim; }
  int64_t kv_size() const { return num_kv_heads * head_dim; }
  // Total parameter count of the dense model (embeddings, LM head unless tied, norms); with
  // `lorc`, of its factor tensors (compress/FORMAT.md) in place of k/v/o_proj. At most 2^50 for
  // a config from ModelConfigFromJson / LoadModelConfig (larger ones are rejected there); a
  // hand-made one with sizes within config.json's limits (2^31 each) saturates at INT64_MAX.
  int64_t NumParameters() const;
};

// Parses and validates a config.json document. Accepts RoPE settings either as top-level
// `rope_theta` + `rope_scaling` (older checkpoints, Llama-3.1/3.3) or as `rope_parameters`
// (newer transformers). Errors are InvalidArgument and name the offending field; a config whose
// parameter count (NumParameters) would exceed 2^50 is rejected naming its size fields.
absl::StatusOr<ModelConfig> ModelConfigFromJson(const nlohmann::json& j);

// Parses a generation_config.json document; token ids are checked against `vocab_size`.
// Errors are InvalidArgument naming the field ("generation config field 'top_p': ...").
absl::StatusOr<GenerationDefaults> GenerationDefaultsFromJson(const nlohmann::json& j,
                                                              int64_t vocab_size);

// Reads DIR/config.json and, when present, DIR/generation_config.json (its EOS ids join
// eos_token_ids; its sampling defaults go to `generation`) and DIR/lorc.json (validated against
// config.json: LorcConfigFromJson; goes to `lorc`). Errors name the file and field.
absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& model_dir);

// Inverse frequencies (head_dim / 2 values) with the configured scaling applied, with the
// float32 semantics of transformers' `_compute_*_parameters` (exponent 2i/dim in float32, pow
// evaluated in double from float inputs and rounded to float32, then 1/x and the scaling in
// float32). Matches torch's CPU results bit for bit for the Llama-3.1 configuration.
std::vector<float> RopeInverseFrequencies(const ModelConfig& config);

}  // namespace lorc
