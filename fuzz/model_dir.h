// The model-directory harnesses' common step: one file of a model directory from the fuzzer's
// bytes, loaded the way the server loads it (LoadModelConfig).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "fuzz/fuzz_util.h"
#include "model/model_config.h"

namespace lorc::fuzz {

// Writes the input as ScratchDir()/`file` (beside the fixture's config.json, copied once, unless
// `file` is config.json itself) and returns LoadModelConfig(ScratchDir()). An error that does not
// name `file` is a finding (Fail).
inline absl::StatusOr<ModelConfig> LoadModelDirWith(const std::string& file, const uint8_t* data,
                                                    size_t size) {
  static const bool fixture = [&] {
    if (file != "config.json") CopyFixture("tiny-llama-a/config.json", "config.json");
    return true;
  }();
  (void)fixture;
  WriteScratchFile(file, std::string_view(reinterpret_cast<const char*>(data), size));
  absl::StatusOr<ModelConfig> config = LoadModelConfig(ScratchDir());
  if (!config.ok() && config.status().message().find(file) == std::string_view::npos) {
    Fail("error does not name " + file + ": " + config.status().ToString());
  }
  return config;
}

}  // namespace lorc::fuzz
