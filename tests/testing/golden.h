// The fixture model's golden outputs (models/tiny-llama-a/golden_fp32.json, computed by Hugging
// Face transformers in fp32): one loader for every test that compares against them.
#pragma once

#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "common/json_util.h"
#include "nlohmann/json.hpp"
#include "tests/testing/fixtures.h"

namespace lorc::testing {

struct Golden {
  std::string prompt;
  std::vector<int32_t> prompt_ids;   // BOS first
  std::vector<int32_t> greedy_ids;   // the first 48 greedy tokens
  std::string greedy_text;
  std::vector<int32_t> top_ids;      // top-20 logits of the prompt's last position
  std::vector<float> top_values;
};

// Loaded once per test binary. A missing or malformed file fails the calling test (and returns
// what could be read, usually nothing).
inline const std::vector<Golden>& GoldenPrompts() {
  static const std::vector<Golden>* golden = [] {
    auto* out = new std::vector<Golden>();
    const std::string path = TinyLlamaDir() + "/golden_fp32.json";
    absl::StatusOr<nlohmann::json> j = ReadJsonFile(path);
    if (!j.ok() || !j->is_array()) return out;
    for (const nlohmann::json& g : *j) {
      out->push_back({g.value("prompt", ""), g["prompt_ids"].get<std::vector<int32_t>>(),
                      g["greedy_48_ids"].get<std::vector<int32_t>>(), g.value("greedy_48_text", ""),
                      g["last_logits_top20_ids"].get<std::vector<int32_t>>(),
                      g["last_logits_top20_values"].get<std::vector<float>>()});
    }
    return out;
  }();
  EXPECT_FALSE(golden->empty()) << "no golden outputs read from " << TinyLlamaDir()
                                << "/golden_fp32.json";
  return *golden;
}

}  // namespace lorc::testing
