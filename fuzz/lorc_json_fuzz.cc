// The compressed model's lorc.json (compress/FORMAT.md: the LoRC factor metadata), any bytes,
// next to the fixture's config.json, through LoadModelConfig, then what the worker derives from
// an accepted one: the parameter count of the factor tensors and the latent KV geometry.
// Errors must be statuses naming the file.
#include <cstdint>
#include <string>

#include "fuzz/model_dir.h"
#include "kvstore/kv_spec.h"
#include "model/model_config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace lorc;
  absl::StatusOr<ModelConfig> config = fuzz::LoadModelDirWith("lorc.json", data, size);
  if (!config.ok()) return 0;
  if (!config->lorc.has_value()) fuzz::Fail("lorc.json accepted but not reported");
  (void)config->NumParameters();
  absl::StatusOr<KvCacheSpec> kv = MakeKvCacheSpec(*config, KvSpecOptions{});
  if (!kv.ok()) fuzz::Fail("an accepted lorc.json gives no KV spec: " + kv.status().ToString());
  (void)kv->BytesPerToken();
  return 0;
}
