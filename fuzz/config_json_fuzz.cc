// A model directory's config.json, any bytes, through LoadModelConfig (what the worker and the
// coordinator call), then what both derive from an accepted config: the parameter count, the
// RoPE frequencies and the KV cache geometry. Errors must be statuses naming the file.
#include <cstdint>
#include <string>

#include "fuzz/model_dir.h"
#include "kvstore/kv_spec.h"
#include "model/model_config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace lorc;
  absl::StatusOr<ModelConfig> config = fuzz::LoadModelDirWith("config.json", data, size);
  if (!config.ok()) return 0;
  (void)config->NumParameters();
  (void)RopeInverseFrequencies(*config);
  (void)MakeKvCacheSpec(*config, KvSpecOptions{});
  return 0;
}
