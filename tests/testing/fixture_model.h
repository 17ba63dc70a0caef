// The fixture model served in-process (engine, eval and worker tests): a CPU backend, the model
// loaded on it at TP=1 and a StepExecutor over its runner. Header-only like the rest of
// tests/testing/; the including test links the worker libraries.
#pragma once

#include <gtest/gtest.h>

#include <memory>
#include <string>

#include "absl/status/status.h"
#include "backend/backend.h"
#include "common/status_macros.h"
#include "tests/testing/fixtures.h"
#include "tests/testing/status_matchers.h"
#include "worker/model_loader.h"
#include "worker/step_executor.h"

namespace lorc::testing {

// SetUp fails the test when tiny-llama-a is missing, else creates the CPU backend (default
// BackendOptions) in backend_; LoadFixtureModel then fills model_ and exec_. `Base` is
// ::testing::Test or a ::testing::TestWithParam<T>. A subclass's SetUp starts with
// ASSERT_NO_FATAL_FAILURE(FixtureModelTest::SetUp()) (one on another backend makes backend_ in
// its own SetUp instead). Members are destroyed executor first, backend last (after the
// subclass's own members, e.g. engines over exec_).
template <typename Base = ::testing::Test>
class FixtureModelTest : public Base {
 protected:
  void SetUp() override {
    REQUIRE_TINY_LLAMA();
    ASSERT_OK_AND_ASSIGN(backend_, CreateBackend(BackendOptions()));
  }

  // Loads the model in `dir` (default: tiny-llama-a) at TP=1 with `kv` on backend_ into model_,
  // replacing any loaded before, and a StepExecutor over its runner into exec_. Errors:
  // LoadModel's (config, weights, KV sizing).
  absl::Status LoadFixtureModel(const KvCacheOptions& kv, const std::string& dir = TinyLlamaDir()) {
    exec_.reset();
    ASSIGN_OR_RETURN(model_, LoadModel({dir}, backend_.get(), 0, 1, nullptr, kv));
    exec_ = std::make_unique<StepExecutor>(model_.runner.get());
    return absl::OkStatus();
  }

  std::unique_ptr<Backend> backend_;
  LoadedModel model_;
  std::unique_ptr<StepExecutor> exec_;
};

}  // namespace lorc::testing
