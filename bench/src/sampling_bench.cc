// Microseconds per CudaBackend::Sample call (not a test): vocab 128256, batches of 1, 8, 64 and
// 256 rows (or the comma-separated list of the second argument, each 1-256), each row reading its
// own logits row, in these modes (a fresh backend each, so that one mode's backoff does not reach
// the next):
//   over "flat" logits (normal, std 2): greedy; top-p 0.9 at temperature 0.8 (the nucleus holds
//   ~14,400-14,900 ids, the first 1,024 ~52 % of the mass: these prefix rows are sampled again
//   sorted whole, and after such a call the sampler backs off for 64 calls); top-k 50 at
//   temperature 0.8; top-k 50 with top-p 0.9;
//   over "peaked" logits (normal, std 4): top-p 0.9 at temperature 0.8 (a nucleus of 9-175 ids,
//   the first 1,024 ~98 % of the mass); temperature 1 alone (the first 1,024 hold 91-96 %: ~7 % of
//   the draws fall past them and are sampled again); min-p 0.05 at temperature 1 (2-46 kept).
// (The spans: six rows each, drawn in Python from the same distributions, 2026-12-06.)
// LORC_SAMPLE_SELECT=0 sorts every sampled row whole (the JSON's "select" says which). A call is
// timed end to end on the host (upload, kernels, download, synchronisation, the second pass for
// rows sampled again), after warm-up calls, so the buffers are already grown. Prints one JSON
// line per case (with the timed calls' rows by path: GetCudaSampleCounters), then a table.
// Usage: build/bin/sampling_bench [reps [batches]] (needs a CUDA device), e.g. sampling_bench 50 8,12,13,16.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "backend/cuda_backend.h"
#include "common/check.h"
#include "common/env_switch.h"

namespace lorc {
namespace {

struct Mode {
  const char* name;
  float temperature, top_p;
  int32_t top_k;
  float min_p;
  float scale;  // the logits' standard deviation
};

int Main(int argc, char** argv) {
  const int reps = argc > 1 ? std::atoi(argv[1]) : 50;
  if (reps < 1) {
    std::fprintf(stderr, "sampling_bench: reps must be a positive integer, got '%s'\n", argv[1]);
    return 2;
  }
  std::vector<int> batches = {1, 8, 64, 256};
  if (argc > 2) {
    batches.clear();
    for (const char* p = argv[2]; *p != '\0';) {
      char* end = nullptr;
      const long b = std::strtol(p, &end, 10);
      if (end == p || b < 1 || b > 256 || (*end != ',' && *end != '\0')) {
        std::fprintf(stderr, "sampling_bench: batches must be a comma-separated list of 1..256, got '%s'\n", argv[2]);
        return 2;
      }
      batches.push_back(static_cast<int>(b));
      p = *end == ',' ? end + 1 : end;
    }
  }
  const int64_t vocab = 128256;
  const bool select = EnvIntOf("LORC_SAMPLE_SELECT", {0, 1, 2}, 1) != 0;  // as the backend reads it
  const Mode modes[] = {{"greedy", 0.f, 1.f, 0, 0.f, 2.f},
                        {"top_p0.9_t0.8", 0.8f, 0.9f, 0, 0.f, 2.f},
                        {"top_k50_t0.8", 0.8f, 1.f, 50, 0.f, 2.f},
                        {"top_k50_p0.9_t0.8", 0.8f, 0.9f, 50, 0.f, 2.f},
                        {"peaked_top_p0.9_t0.8", 0.8f, 0.9f, 0, 0.f, 4.f},
                        {"peaked_t1", 1.f, 1.f, 0, 0.f, 4.f},
                        {"peaked_min_p0.05_t1", 1.f, 1.f, 0, 0.05f, 4.f}};
  std::vector<float> host(256 * vocab);
  struct Result {
    const char* mode;
    int batch;
    double us;
  };
  std::vector<Result> results;
  for (const Mode& m : modes) {
    auto made = CreatePartialCudaBackend(BackendOptions{BackendKind::kCuda});
    if (!made.ok()) {
      std::fprintf(stderr, "%s\n", std::string(made.status().message()).c_str());
      return 1;
    }
    Backend& be = **made;
    if (&m == &modes[0]) std::fprintf(stderr, "%s\n", be.Describe().c_str());
    std::mt19937 rng(7);
    std::normal_distribution<float> d(0.f, m.scale);
    for (float& v : host) v = d(rng);
    auto dev = be.Allocate(host.size() * sizeof(float));
    CHECK(dev.ok()) << dev.status();
    CHECK_OK(be.CopyToDevice(dev->data(), host.data(), host.size() * sizeof(float)));
    CHECK_OK(be.Synchronize());
    const Tensor2D logits{dev->data(), DType::kF32, 256, vocab};
    for (const int b : batches) {
      std::vector<SamplingRow> rows(b);
      for (int i = 0; i < b; ++i) {
        rows[i].logits_row = i;
        rows[i].temperature = m.temperature;
        rows[i].top_p = m.top_p;
        rows[i].top_k = m.top_k;
        rows[i].min_p = m.min_p;
        rows[i].seed = 1000 + i;
      }
      SampleOutput out;
      for (int w = 0; w < 3; ++w) CHECK_OK(be.Sample(logits, rows, &out));
      const CudaSampleCounters c0 = *GetCudaSampleCounters(be);
      const auto t0 = std::chrono::steady_clock::now();
      for (int r = 0; r < reps; ++r) {
        for (SamplingRow& row : rows) row.offset = r;
        CHECK_OK(be.Sample(logits, rows, &out));
      }
      const double us =
          std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count() / reps;
      const CudaSampleCounters c1 = *GetCudaSampleCounters(be);
      std::printf("{\"bench\":\"sampling\",\"mode\":\"%s\",\"batch\":%d,\"vocab\":%lld,\"select\":%d,"
                  "\"us_per_call\":%.1f,\"prefix_rows\":%lld,\"sampled_again\":%lld,\"sorted_whole\":%lld}\n",
                  m.name, b, static_cast<long long>(vocab), select ? 1 : 0, us,
                  static_cast<long long>(c1.prefix - c0.prefix), static_cast<long long>(c1.redone - c0.redone),
                  static_cast<long long>(c1.sorted_whole - c0.sorted_whole));
      results.push_back({m.name, b, us});
    }
  }
  std::printf("\n%-22s %6s %14s %14s\n", "mode", "batch", "us/call", "us/row");
  for (const Result& r : results) {
    std::printf("%-22s %6d %14.1f %14.2f\n", r.mode, r.batch, r.us, r.us / r.batch);
  }
  return 0;
}

}  // namespace
}  // namespace lorc

int main(int argc, char** argv) { return lorc::Main(argc, argv); }
