// Builds a ready ModelRunner from a model directory: config.json, then weights from the
// safetensors files (only this rank's slices) or seeded random weights of the same shape.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "backend/backend.h"
#include "model/model_config.h"
#include "model/model_source.h"
#include "worker/model_runner.h"

namespace lorc {

struct LoadedModel {
  ModelConfig config;
  std::unique_ptr<ModelRunner> runner;
  double load_seconds = 0;
};

absl::StatusOr<LoadedModel> LoadModel(const ModelSource& source, Backend* backend,
                                      int32_t tp_rank, int32_t tp_size, Communicator* comm,
                                      const KvCacheOptions& kv);

}  // namespace lorc
