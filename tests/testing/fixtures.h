// Locating the fixture models (models/ in this repository, or $LORC_MODELS_DIR; see
// models/README.md). A missing fixture fails the test that needs it: a suite that silently skips
// its golden, eval and serving tests checks almost nothing.
#pragma once

#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <string>

namespace lorc::testing {

// The folder holding tiny-llama-a/ and tokenizer-llama3-style/: $LORC_MODELS_DIR when set,
// else the CMake cache variable of the same name (default: <source>/models).
inline std::string ModelsDir() {
  if (const char* env = std::getenv("LORC_MODELS_DIR"); env != nullptr && *env) return env;
  return LORC_MODELS_DIR;
}

inline std::string TinyLlamaDir() { return ModelsDir() + "/tiny-llama-a"; }
inline std::string Llama3TokenizerDir() { return ModelsDir() + "/tokenizer-llama3-style"; }

// Empty when `path` exists, else the failure message naming it and how to restore it.
inline std::string MissingFixture(const std::string& path) {
  if (std::filesystem::exists(path)) return "";
  return "fixture " + path + " is missing: build the fixture_model target (it restores "
         "model.safetensors from model.safetensors.tar.zst; see models/README.md) or point "
         "LORC_MODELS_DIR at a folder holding tiny-llama-a/ and tokenizer-llama3-style/";
}

}  // namespace lorc::testing

// Fails (fatally, in the calling function) when the fixture file or folder `path` is missing.
#define REQUIRE_FIXTURE(path)                                                     \
  do {                                                                            \
    const std::string lorc_missing_ = ::lorc::testing::MissingFixture(path);      \
    if (!lorc_missing_.empty()) GTEST_FAIL() << lorc_missing_;                    \
  } while (0)

#define REQUIRE_TINY_LLAMA() REQUIRE_FIXTURE(::lorc::testing::TinyLlamaDir() + "/model.safetensors")
