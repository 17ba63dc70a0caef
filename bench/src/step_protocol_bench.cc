// Step-protocol micro-benchmark: the coordinator's per-step cost of building, serialising and
// applying step plans for a steady decode batch, without any worker compute.
//
// Setup: `--seqs` sequences with `--context` prompt tokens each are admitted and prefilled (not
// timed), then `--steps` decode steps are timed: Scheduler::Schedule, the StepPlan's wire form
// (proto serialisation; its size is the step message's bytes), parsing it back as a worker does,
// and Scheduler::Apply of one sampled token per sequence. Prints one JSON line.
//   step_protocol_bench [--seqs 64] [--context 4096] [--steps 200] [--block-size 16]
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "coordinator/scheduler.h"
#include "step/step_proto.h"

namespace {

using Clock = std::chrono::steady_clock;

// The flags, each "--name N" with N in [lo, hi]; false (and a message naming the flag) for an
// unknown flag, a missing value, or a value that is not an integer in range.
struct FlagValue {
  const char* name;
  int64_t lo, hi;
  int64_t value;  // the default until parsed
};
bool ParseFlags(int argc, char** argv, std::vector<FlagValue>& flags) {
  for (int i = 1; i < argc; i += 2) {
    FlagValue* f = nullptr;
    for (FlagValue& c : flags) {
      if (std::strcmp(argv[i], c.name) == 0) f = &c;
    }
    if (f == nullptr) {
      std::fprintf(stderr, "step_protocol_bench: unknown flag '%s'\n", argv[i]);
      return false;
    }
    int64_t v = 0;
    if (i + 1 >= argc || !absl::SimpleAtoi(argv[i + 1], &v) || v < f->lo || v > f->hi) {
      std::fprintf(stderr, "step_protocol_bench: %s: '%s' is not an integer in [%lld, %lld]\n", f->name,
                   i + 1 < argc ? argv[i + 1] : "", static_cast<long long>(f->lo), static_cast<long long>(f->hi));
      return false;
    }
    f->value = v;
  }
  return true;
}

// The token each sampled sequence gets: anything but EOS (id 1).
lorc::StepResult FakeResult(const lorc::StepPlan& plan) {
  lorc::StepResult r;
  r.step_id = plan.step_id;
  for (const auto& s : plan.seqs) {
    if (s.sample) r.sampled.push_back({s.seq_id, 7, std::nullopt});
  }
  return r;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<FlagValue> flags = {{"--seqs", 1, 1 << 16, 64},
                                  {"--context", 1, 1 << 20, 4096},
                                  {"--steps", 1, 1 << 20, 200},
                                  {"--block-size", 1, 1024, 16}};
  if (argc == 2 && (std::strcmp(argv[1], "--help") == 0 || std::strcmp(argv[1], "-h") == 0)) {
    std::printf("usage: step_protocol_bench [--seqs 64] [--context 4096] [--steps 200] [--block-size 16]\n");
    return 0;
  }
  if (!ParseFlags(argc, argv, flags)) return 2;
  const int64_t seqs = flags[0].value, context = flags[1].value, steps = flags[2].value;
  const int32_t block_size = static_cast<int32_t>(flags[3].value);
  const int64_t num_blocks = seqs * ((context + steps + 8) / block_size + 2);
  if (num_blocks > 0x7fffffff || seqs * context > (int64_t{1} << 28)) {  // prompts: 4 bytes a token
    std::fprintf(stderr, "step_protocol_bench: --seqs x --context = %lld prompt tokens (at most 2^28) in %lld "
                 "blocks (at most 2^31)\n", static_cast<long long>(seqs * context), static_cast<long long>(num_blocks));
    return 2;
  }

  lorc::SchedulerConfig c;
  c.block_size = block_size;
  c.num_blocks = static_cast<int32_t>(num_blocks);
  c.max_num_batched_tokens = static_cast<int32_t>(context);
  c.max_num_seqs = static_cast<int32_t>(seqs);
  c.max_waiting = static_cast<int32_t>(seqs);
  c.max_model_len = context + steps + 8;
  c.vocab_size = 4096;
  c.eos_token_ids = {1};
  absl::StatusOr<std::unique_ptr<lorc::Scheduler>> created = lorc::Scheduler::Create(c);
  if (!created.ok()) {
    std::fprintf(stderr, "step_protocol_bench: %s\n", created.status().ToString().c_str());
    return 2;
  }
  lorc::Scheduler& sched = **created;
  lorc::SamplingParams p;
  p.max_tokens = static_cast<int32_t>(steps + 4);
  for (int64_t i = 0; i < seqs; ++i) {
    std::vector<int32_t> prompt(static_cast<size_t>(context));
    for (int64_t j = 0; j < context; ++j) prompt[j] = static_cast<int32_t>(2 + (i * 31 + j) % 4000);
    if (!sched.Add(i + 1, std::move(prompt), p).ok()) return 1;
  }
  // Prefill (untimed) until every sequence decodes.
  for (int guard = 0; guard < 100000; ++guard) {
    const lorc::StepPlan plan = sched.Schedule();
    bool all_decode = plan.seqs.size() == static_cast<size_t>(seqs);
    for (const auto& s : plan.seqs) all_decode = all_decode && s.num_scheduled_tokens == 1;
    sched.Apply(FakeResult(plan));
    if (all_decode) break;
  }

  lorcserve::internal::StepPlan msg;
  std::string wire;
  double schedule_s = 0, serialize_s = 0, parse_s = 0, apply_s = 0;
  size_t bytes = 0;
  for (int64_t i = 0; i < steps; ++i) {
    const auto t0 = Clock::now();
    const lorc::StepPlan plan = sched.Schedule();
    const auto t1 = Clock::now();
    lorc::StepPlanToProto(plan, &msg);
    msg.SerializeToString(&wire);
    const auto t2 = Clock::now();
    lorcserve::internal::StepPlan parsed;
    parsed.ParseFromString(wire);
    const lorc::StepPlan back = lorc::StepPlanFromProto(parsed);
    const auto t3 = Clock::now();
    sched.Apply(FakeResult(back));
    const auto t4 = Clock::now();
    schedule_s += std::chrono::duration<double>(t1 - t0).count();
    serialize_s += std::chrono::duration<double>(t2 - t1).count();
    parse_s += std::chrono::duration<double>(t3 - t2).count();
    apply_s += std::chrono::duration<double>(t4 - t3).count();
    bytes += wire.size();
  }
  const double n = static_cast<double>(steps);
  std::printf(
      "{\"seqs\":%lld,\"context\":%lld,\"steps\":%lld,\"plan_bytes_mean\":%.1f,"
      "\"schedule_us\":%.1f,\"serialize_us\":%.1f,\"parse_us\":%.1f,\"apply_us\":%.1f,"
      "\"total_us\":%.1f}\n",
      static_cast<long long>(seqs), static_cast<long long>(context), static_cast<long long>(steps),
      static_cast<double>(bytes) / n, schedule_s / n * 1e6, serialize_s / n * 1e6,
      parse_s / n * 1e6, apply_s / n * 1e6,
      (schedule_s + serialize_s + parse_s + apply_s) / n * 1e6);
  return 0;
}
