// Locating the shared model fixtures (../shared/models beside the checkout, or $LORC_MODELS_DIR).
#pragma once

#include <cstdlib>
#include <filesystem>
#include <string>

namespace lorc::testing {

inline std::string ModelsDir() {
  if (const char* env = std::getenv("LORC_MODELS_DIR"); env != nullptr && *env) return env;
  return LORC_MODELS_DIR;
}

inline std::string TinyLlamaDir() { return ModelsDir() + "/tiny-llama-a"; }

inline bool HaveTinyLlama() {
  return std::filesystem::exists(TinyLlamaDir() + "/model.safetensors");
}

}  // namespace lorc::testing

#define SKIP_WITHOUT_TINY_LLAMA()                                                 \
  if (!::lorc::testing::HaveTinyLlama())                                          \
  GTEST_SKIP() << "fixture " << ::lorc::testing::TinyLlamaDir() << " not present"
