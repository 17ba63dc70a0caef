// The LoRC compressed-model description (`lorc.json`, compress/FORMAT.md): per-layer latent ranks
// of the keys and values, the factorization method and where it came from. Read by
// LoadModelConfig when the model directory has one (ModelConfig::lorc), validated against
// config.json's counts.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace lorc {

// Ranks of one layer, the same for each of its KV heads (1 <= rank <= head_dim).
struct LorcLayerRanks {
  int64_t k_rank = 0;  // r_k: latent key values per token per KV head
  int64_t v_rank = 0;  // r_v: latent value values per token per KV head
};

struct LorcConfig {
  int64_t version = 1;
  std::string method;    // "svd" | "whitened-svd"
  std::string schedule;  // "uniform" | "progressive" | "search"
  std::vector<LorcLayerRanks> layers;  // one per layer
  // sum(r_k + r_v) / (num_layers * 2 * head_dim): the KV bytes against the uncompressed model.
  double kv_bytes_ratio = 1.0;
  std::string calibration_source;      // "" when no calibration (plain SVD)
  std::string source_model_dir;        // informational
  std::string source_config_sha256;    // informational

  int64_t max_k_rank() const;
  int64_t max_v_rank() const;
};

// The file name in a model directory.
inline constexpr char kLorcJsonName[] = "lorc.json";

// Parses and validates a lorc.json document against the model's counts. InvalidArgument naming
// the field ("lorc.json: layers[3].k_rank: 200 is outside [1, 128]"): format must be
// "lorcserve-lorc", version 1, method "svd" or "whitened-svd", schedule (when present) one of
// "uniform", "progressive", "search"; num_layers, num_kv_heads and head_dim equal to config.json's;
// `layers` has num_layers entries with integer ranks in [1, head_dim]; kv_bytes_ratio (when
// present) within 1e-3 of the ratio the ranks give. `target`, `calibration` and `source_model`
// are informational (type-checked only).
absl::StatusOr<LorcConfig> LorcConfigFromJson(const nlohmann::json& j, int64_t num_layers,
                                              int64_t num_kv_heads, int64_t head_dim);

}  // namespace lorc
