// A model directory's generation_config.json, any bytes, next to the fixture's config.json,
// through LoadModelConfig. Errors must be statuses naming the file.
#include <cstdint>
#include <string>

#include "fuzz/fuzz_util.h"
#include "model/model_config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace lorc;
  static const bool init = [] {
    fuzz::CopyFixture("tiny-llama-a/config.json", "config.json");
    return true;
  }();
  (void)init;
  fuzz::WriteScratchFile("generation_config.json",
                         std::string_view(reinterpret_cast<const char*>(data), size));
  absl::StatusOr<ModelConfig> config = LoadModelConfig(fuzz::ScratchDir());
  if (!config.ok()) {
    if (config.status().message().find("generation_config.json") == std::string_view::npos) {
      fuzz::Fail("error does not name generation_config.json: " + config.status().ToString());
    }
    return 0;
  }
  for (int64_t id : config->eos_token_ids) {
    if (id < 0 || id >= config->vocab_size) fuzz::Fail("an accepted eos id outside the vocabulary");
  }
  return 0;
}
