// Llama-family model configuration: parsed from a Hugging Face config.json (stage 1), then
// validated and normalised into an immutable ModelConfig (stage 2).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
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
  std::vector<int64_t> eos_token_ids;       // config.json may give one id or a list
  std::string torch_dtype;                  // "bfloat16", "float16", "float32" or ""

  int64_t q_size() const { return num_heads * head_dim; }
  int64_t kv_size() const { return num_kv_heads * head_dim; }
  // Total parameter count of the dense model (embeddings, LM head unless tied, norms).
  int64_t NumParameters() const;
};

// Parses and validates a config.json document. Accepts RoPE settings either as top-level
// `rope_theta` + `rope_scaling` (older checkpoints, Llama-3.1/3.3) or as `rope_parameters`
// (newer transformers). Errors are InvalidArgument and name the offending field.
absl::StatusOr<ModelConfig> ModelConfigFromJson(const nlohmann::json& j);

// Reads DIR/config.json; errors name the file.
absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& model_dir);

// Inverse frequencies (head_dim / 2 values) with the configured scaling applied, with the
// float32 semantics of transformers' `_compute_*_parameters` (exponent 2i/dim in float32, pow
// evaluated in double from float inputs and rounded to float32, then 1/x and the scaling in
// float32). Matches torch's CPU results bit for bit for the Llama-3.1 configuration.
std::vector<float> RopeInverseFrequencies(const ModelConfig& config);

}  // namespace lorc
