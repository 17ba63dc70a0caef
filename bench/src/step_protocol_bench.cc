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

#include "coordinator/scheduler.h"
#include "step/step_proto.h"

namespace {

using Clock = std::chrono::steady_clock;

int64_t Flag(int argc, char** argv, const char* name, int64_t def) {
  for (int i = 1; i + 1 < argc; ++i) {
    if (std::strcmp(argv[i], name) == 0) return std::atoll(argv[i + 1]);
  }
  return def;
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
  const int64_t seqs = Flag(argc, argv, "--seqs", 64);
  const int64_t context = Flag(argc, argv, "--context", 4096);
  const int64_t steps = Flag(argc, argv, "--steps", 200);
  const int32_t block_size = static_cast<int32_t>(Flag(argc, argv, "--block-size", 16));

  lorc::SchedulerConfig c;
  c.block_size = block_size;
  c.num_blocks = static_cast<int32_t>(seqs * ((context + steps + 8) / block_size + 2));
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
