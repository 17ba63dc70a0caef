// The in-process TP = 1 reference of the served end-to-end tests: the golden prompts' greedy
// tokens through LoadModel + StepExecutor + Engine::Generate on the CPU backend, as the other
// parity tests run them. Header-only; for tests that also include server_e2e_fixture.h.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "coordinator/engine.h"
#include "gtest/gtest.h"
#include "tests/testing/golden.h"
#include "worker/model_loader.h"
#include "worker/step_executor.h"

namespace lorc {
namespace e2e {

// Greedy tokens (up to `max_tokens` each) of every golden prompt for the model in `dir` loaded
// with `kv`; `kv_spec`, when given, receives the runner's KV spec. Empty (and a test failure) when
// a step fails.
inline std::vector<std::vector<int32_t>> GoldenGreedyInProcess(const std::string& dir, const KvCacheOptions& kv,
                                                               int max_tokens, KvCacheSpec* kv_spec = nullptr) {
  std::vector<std::vector<int32_t>> out;
  absl::StatusOr<std::unique_ptr<Backend>> backend = CreateBackend({});
  EXPECT_TRUE(backend.ok()) << backend.status();
  if (!backend.ok()) return out;
  absl::StatusOr<LoadedModel> m = LoadModel({dir}, backend->get(), 0, 1, nullptr, kv);
  EXPECT_TRUE(m.ok()) << m.status();
  if (!m.ok()) return out;
  if (kv_spec != nullptr) *kv_spec = m->runner->kv_spec();
  StepExecutor exec(m->runner.get());
  absl::StatusOr<std::unique_ptr<Engine>> engine =
      Engine::Create(&exec, m->config, m->runner->kv_spec(), nullptr, {});
  EXPECT_TRUE(engine.ok()) << engine.status();
  if (!engine.ok()) return out;
  std::vector<GenerationRequest> reqs;
  for (const ::lorc::testing::Golden& g : ::lorc::testing::GoldenPrompts()) {
    GenerationRequest r;
    r.prompt_ids = g.prompt_ids;
    r.params.max_tokens = max_tokens;
    reqs.push_back(r);
  }
  absl::StatusOr<std::vector<GenerationResult>> res = (*engine)->Generate(reqs);
  EXPECT_TRUE(res.ok()) << res.status();
  if (res.ok()) {
    for (const GenerationResult& r : *res) out.push_back(r.first().output_ids);
  }
  return out;
}

}  // namespace e2e
}  // namespace lorc
