// The worker's step messages from a buggy or hostile coordinator: a stream of
// lorcserve.internal.StepPlan messages (the input is the wire form of
// `message Plans { repeated StepPlan plan = 1; }`), each through StepPlanFromProto and
// StepExecutor::Execute, then StepResultToProto, exactly as WorkerService::RunStepOnDevice does,
// on the CPU backend with a tiny random-weight model (2 layers, vocabulary 64, 16 KV blocks of
// 4 tokens, a 4-slot host KV tier). A plan with step_id 0 is given the next id (a harness
// convenience: the executor refuses any other id as a whole). Every problem must be a status
// (the step's, or the sequence's in StepResult::failed); sampled tokens stay in the vocabulary.
#include <cstdint>
#include <memory>
#include <string>

#include "absl/strings/str_cat.h"
#include "backend/backend.h"
#include "fuzz/fuzz_util.h"
#include "google/protobuf/unknown_field_set.h"
#include "lorcserve/internal/worker.pb.h"
#include "step/step_proto.h"
#include "worker/model_loader.h"
#include "worker/step_executor.h"

namespace {

using namespace lorc;

constexpr int kMaxPlans = 32;
constexpr char kTinyConfig[] = R"({
  "architectures": ["LlamaForCausalLM"], "model_type": "llama",
  "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
  "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
  "max_position_embeddings": 128, "rms_norm_eps": 1e-05, "rope_theta": 10000.0,
  "bos_token_id": 0, "eos_token_id": 1, "tie_word_embeddings": false
})";

struct Fixture {
  std::unique_ptr<Backend> backend;
  LoadedModel model;
};

Fixture& GetFixture() {
  static Fixture* f = [] {
    auto* fx = new Fixture;
    fuzz::WriteScratchFile("config.json", kTinyConfig);
    absl::StatusOr<std::unique_ptr<Backend>> b = CreateBackend({});
    if (!b.ok()) fuzz::Fail("backend: " + b.status().ToString());
    fx->backend = *std::move(b);
    KvCacheOptions kv;
    kv.block_size = 4;
    kv.num_blocks = 16;
    kv.max_num_seqs = 4;
    kv.max_num_batched_tokens = 64;
    kv.max_model_len = 128;
    kv.enforce_eager = true;
    // 2 layers x (16 + 16) fp32 per token x 4 tokens = 1 KiB a block: 4 host slots.
    kv.kv_offloading_bytes = 4 << 10;
    ModelSource src{fuzz::ScratchDir(), /*random_weights=*/true, /*seed=*/7, std::nullopt};
    absl::StatusOr<LoadedModel> m = LoadModel(src, fx->backend.get(), 0, 1, nullptr, kv);
    if (!m.ok()) fuzz::Fail("model: " + m.status().ToString());
    fx->model = *std::move(m);
    if (fx->model.runner->num_host_blocks() != 4) {
      fuzz::Fail(absl::StrCat("expected 4 host KV slots, got ", fx->model.runner->num_host_blocks()));
    }
    return fx;
  }();
  return *f;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  Fixture& fx = GetFixture();
  google::protobuf::UnknownFieldSet fields;
  if (!fields.ParseFromArray(data, static_cast<int>(size))) return 0;
  StepExecutor exec(fx.model.runner.get());
  uint64_t last_step_id = 0;
  int plans = 0;
  for (int i = 0; i < fields.field_count() && plans < kMaxPlans; ++i) {
    const google::protobuf::UnknownField& f = fields.field(i);
    if (f.number() != 1 || f.type() != google::protobuf::UnknownField::TYPE_LENGTH_DELIMITED) {
      continue;
    }
    lorcserve::internal::StepPlan plan;
    if (!plan.ParseFromString(f.length_delimited())) continue;  // gRPC refuses it first
    ++plans;
    if (plan.step_id() == 0) plan.set_step_id(last_step_id + 1);
    absl::StatusOr<StepResult> r = exec.Execute(StepPlanFromProto(plan));
    if (!r.ok()) {
      if (r.status().message().empty()) fuzz::Fail("a step error without a message");
      continue;
    }
    last_step_id = plan.step_id();
    for (const SampledToken& t : r->sampled) {
      if (t.token < 0 || t.token >= 64) fuzz::Fail(absl::StrCat("sampled token ", t.token));
    }
    lorcserve::internal::StepResult out;
    StepResultToProto(*r, &out);
  }
  return 0;
}
