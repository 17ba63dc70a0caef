// A model directory's generation_config.json, any bytes, next to the fixture's config.json,
// through LoadModelConfig. Errors must be statuses naming the file.
#include <cstdint>
#include <string>

#include "fuzz/model_dir.h"
#include "model/model_config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace lorc;
  absl::StatusOr<ModelConfig> config = fuzz::LoadModelDirWith("generation_config.json", data, size);
  if (!config.ok()) return 0;
  for (int64_t id : config->eos_token_ids) {
    if (id < 0 || id >= config->vocab_size) fuzz::Fail("an accepted eos id outside the vocabulary");
  }
  return 0;
}
