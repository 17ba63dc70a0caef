// GenerateRequest bytes as the public service receives them: ParseRequest (size, UTF-8 of every
// string field, wire format) and ConvertGenerateRequest (prompt, sampling defaults, limits,
// validation) with the fixture model's config and tokenizer, exactly as LorcServeService does;
// an accepted request then goes through the engine (Engine::Add: the scheduler's checks; Step:
// scheduling, preemption in a small KV pool, stop ids and strings, n completions) with a fake
// step runner that samples tokens derived from the input. Invariants: every completion ends
// with exactly one final update; the scheduler's invariants hold after every step (Validate);
// the KV blocks all come back (the session, if any, closed); the engine forgets the request.
#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "coordinator/engine.h"
#include "coordinator/request_conversion.h"
#include "fuzz/fuzz_util.h"
#include "fuzz/protobuf_log.h"
#include "model/model_config.h"
#include "tokenizer/tokenizer.h"

namespace {

using namespace lorc;

constexpr int kMaxSteps = 96;     // then the request is aborted (a cancellation)
constexpr int32_t kNumBlocks = 12;  // 192 tokens of KV at block_size 16: preemption happens

// Answers every plan at once: a token for each sampling sequence (and each fork child),
// drawn from a generator seeded by the input; EOS (id 1) now and then.
class FakeRunner final : public StepRunner {
 public:
  FakeRunner(uint64_t seed, int32_t vocab) : state_(seed | 1), vocab_(vocab) {}
  absl::Status Submit(const StepPlan& plan) override {
    StepResult r;
    r.step_id = plan.step_id;
    for (const ScheduledSequence& s : plan.seqs) {
      if (!s.sample) continue;
      r.sampled.push_back({s.seq_id, Token(), std::nullopt});
      for (int64_t child : s.fork_child_ids) r.sampled.push_back({child, Token(), std::nullopt});
    }
    results_.push_back(std::move(r));
    return absl::OkStatus();
  }
  absl::StatusOr<StepResult> Await() override {
    if (results_.empty()) return absl::FailedPreconditionError("nothing in flight");
    StepResult r = std::move(results_.front());
    results_.erase(results_.begin());
    return r;
  }

 private:
  int32_t Token() {
    state_ ^= state_ << 13;
    state_ ^= state_ >> 7;
    state_ ^= state_ << 17;
    const uint64_t x = state_ % 64;
    if (x == 0) return 1;                              // EOS
    if (x < 32) return static_cast<int32_t>(x + 100);  // a small alphabet: stop strings can match
    return static_cast<int32_t>(state_ % static_cast<uint64_t>(vocab_));
  }
  uint64_t state_;
  int32_t vocab_;
  std::vector<StepResult> results_;
};

struct Fixture {
  ModelConfig config;
  std::unique_ptr<Tokenizer> tokenizer;
};

const Fixture& GetFixture() {
  static const Fixture* f = [] {
    auto* fx = new Fixture;
    const std::string dir = fuzz::ModelsDir() + "/tiny-llama-a";
    absl::StatusOr<ModelConfig> c = LoadModelConfig(dir);
    if (!c.ok()) fuzz::Fail("fixture config: " + c.status().ToString());
    fx->config = *std::move(c);
    absl::StatusOr<std::unique_ptr<Tokenizer>> t = Tokenizer::FromModelDir(dir);
    if (!t.ok()) fuzz::Fail("fixture tokenizer: " + t.status().ToString());
    fx->tokenizer = *std::move(t);
    return fx;
  }();
  return *f;
}

uint64_t Hash(const uint8_t* data, size_t size) {
  uint64_t h = 1469598103934665603ull;
  for (size_t i = 0; i < size; ++i) h = (h ^ data[i]) * 1099511628211ull;
  return h;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const Fixture& fx = GetFixture();
  fuzz::FailOnProtobufLog();
  lorcserve::v1::GenerateRequest req;
  if (!ParseRequest(std::string_view(reinterpret_cast<const char*>(data), size), &req).ok()) {
    return 0;
  }
  absl::StatusOr<GenerationRequest> g = ConvertGenerateRequest(req, fx.config, fx.tokenizer.get());
  if (!g.ok()) {
    if (g.status().code() != absl::StatusCode::kInvalidArgument) {
      fuzz::Fail("conversion error is not INVALID_ARGUMENT: " + g.status().ToString());
    }
    return 0;
  }

  FakeRunner runner(Hash(data, size), static_cast<int32_t>(fx.config.vocab_size));
  KvCacheSpec kv;
  kv.block_size = 16;
  kv.num_blocks = kNumBlocks;
  EngineOptions options;
  options.max_num_batched_tokens = 64;  // chunked prefill
  options.max_num_seqs = 4;
  absl::StatusOr<std::unique_ptr<Engine>> created =
      Engine::Create(&runner, fx.config, kv, fx.tokenizer.get(), options);
  if (!created.ok()) fuzz::Fail("engine: " + created.status().ToString());
  Engine& engine = **created;

  const int32_t n = g->params.n;
  std::vector<int> finals(static_cast<size_t>(std::max(n, 1)), 0);
  bool out_of_range = false;
  absl::Status added = engine.Add(1, *g, [&](const RequestUpdate& u) {
    if (u.index < 0 || u.index >= static_cast<int32_t>(finals.size())) {
      out_of_range = true;
      return;
    }
    if (u.finished) ++finals[u.index];
  });
  if (!added.ok()) {
    // The service answers these with the status (INVALID_ARGUMENT, or RESOURCE_EXHAUSTED for a
    // full queue, which one request cannot cause).
    if (added.code() != absl::StatusCode::kInvalidArgument) {
      fuzz::Fail("Engine::Add error is not INVALID_ARGUMENT: " + added.ToString());
    }
    return 0;
  }
  int steps = 0;
  auto step = [&](const char* when) {
    if (absl::Status s = engine.Step(); !s.ok()) fuzz::Fail(absl::StrCat("Step ", when, ": ", s.ToString()));
    if (absl::Status v = engine.scheduler().Validate(); !v.ok()) {
      fuzz::Fail(absl::StrCat("scheduler invariant ", when, ": ", v.ToString()));
    }
    ++steps;
  };
  while (engine.HasWork() && steps < kMaxSteps) step("while running");
  if (engine.num_requests() > 0) engine.Abort(1);
  while (engine.HasWork() && steps < 2 * kMaxSteps) step("after the abort");
  // A session keeps the finished turn's blocks (pinned) until it is closed; NOT_FOUND when the
  // turn kept none (aborted, failed).
  if (!g->session_id.empty()) (void)engine.CloseSession(g->cache_salt, g->session_id);
  if (out_of_range) fuzz::Fail("an update with a completion index outside [0, n)");
  for (size_t i = 0; i < finals.size(); ++i) {
    if (finals[i] != 1) {
      fuzz::Fail(absl::StrCat("completion ", i, " ended ", finals[i], " times"));
    }
  }
  if (engine.num_requests() != 0) fuzz::Fail("the engine still holds the request");
  if (engine.scheduler().num_free_blocks() != kNumBlocks) {
    fuzz::Fail(absl::StrCat(kNumBlocks - engine.scheduler().num_free_blocks(),
                            " KV blocks not returned"));
  }
  return 0;
}
