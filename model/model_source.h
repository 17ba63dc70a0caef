// Where a model comes from: a directory, or seeded random weights of its config.json's shape.
// Sent by the coordinator to every worker (LoadModelRequest), so it lives apart from the loader.
#pragma once

#include <cstdint>
#include <string>

namespace lorc {

struct ModelSource {
  std::string dir;              // holds config.json (and the weights unless random)
  bool random_weights = false;  // ignore weight files; generate from `seed`
  uint64_t seed = 0;
  bool shard_lm_head = false;   // tensor parallelism: split the LM head by vocabulary
};

}  // namespace lorc
