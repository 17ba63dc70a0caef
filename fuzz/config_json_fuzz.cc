// A model directory's config.json, any bytes, through LoadModelConfig (what the worker and the
// coordinator call), then what both derive from an accepted config: the parameter count, the
// RoPE frequencies and the KV cache geometry. Errors must be statuses naming the file.
#include <cstdint>
#include <string>

#include "fuzz/fuzz_util.h"
#include "kvstore/kv_spec.h"
#include "model/model_config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace lorc;
  fuzz::WriteScratchFile("config.json", std::string_view(reinterpret_cast<const char*>(data), size));
  absl::StatusOr<ModelConfig> config = LoadModelConfig(fuzz::ScratchDir());
  if (!config.ok()) {
    if (config.status().message().find("config.json") == std::string_view::npos) {
      fuzz::Fail("error does not name config.json: " + config.status().ToString());
    }
    return 0;
  }
  (void)config->NumParameters();
  (void)RopeInverseFrequencies(*config);
  (void)MakeKvCacheSpec(*config, KvSpecOptions{});
  return 0;
}
