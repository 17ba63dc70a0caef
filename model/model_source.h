// Where a model comes from: a directory, or seeded random weights of its config.json's shape.
// Sent by the coordinator to every worker (LoadModelRequest), so it lives apart from the loader.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

namespace lorc {

struct ModelSource {
  std::string dir;              // holds config.json (and the weights unless random)
  bool random_weights = false;  // ignore weight files; generate from `seed`
  uint64_t seed = 0;
  // Tensor parallelism: split the LM head by vocabulary (true) or replicate it on every rank
  // (false); unset: DefaultLmHeadSplit decides (model/weights.h).
  std::optional<bool> shard_lm_head;
};

}  // namespace lorc
