// BF16 GEMM throughput of the CUDA backend's Matmul (cuBLASLt, fp32 accumulation) on the
// Llama-3-8B linear layers at token counts M = 1, 8, 64, 256, 4096, next to the peak of a large
// square GEMM (the physical floor that prefill figures are measured against).
//
// Each point: one eager call first (the backend picks and caches its algorithm), then a CUDA
// graph of many calls cycling over enough copies of the weight that they do not stay in the 60 MB
// L2 (decode reads every weight from HBM once per step; a single 50 MB weight would otherwise be
// served from L2), replayed and timed on the host. Weights and inputs hold random values (zeros
// draw less power and would run at higher clocks). Prints one JSON line per point, then a table:
// microseconds per GEMM, TFLOP/s (2*M*N*K / t), and for the bandwidth-bound small-M points the
// weight bytes read per second (N*K*2 / t).
// Usage: build/bin/gemm_bench (needs a CUDA device; about a minute).
//
// `gemm_bench decode`: batch-1..8 decode GEMMs of the Llama-3-8B layer and LM head and of a
// Llama-3-70B tensor-parallel shard (TP = 2), M = 1, 2, 4, 8, each timed (as above, cold weights)
// through Matmul with cuBLASLt pinned, with the default choice (kAuto: the faster of cuBLASLt and
// the small-M GEMV, timed per shape), with the GEMV preferred, and for every GEMV configuration
// launched directly; microseconds and % of the floor (weight bytes over the device's decode
// bandwidth, DeviceCeilings::decode_tbps() in common/device_ceilings.h). About 30 s.
//
// `gemm_bench ceilings`: the device's row of common/device_ceilings.h: a 1 GiB device-to-device
// copy (bytes read + written per second) and the BF16 GEMM peak (best of 8192^3 and 16384^3),
// and for reference the rate Matmul reads a 1 GiB weight at M = 1. About 10 s.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <functional>
#include <iterator>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "backend/cuda_backend.h"
#include "backend/cuda_gemv.h"
#include "bench/src/graph_timer.h"
#include "common/check.h"
#include "common/device_ceilings.h"
#include "common/dtype.h"

namespace lorc {
namespace {

constexpr double kTargetSeconds = 0.02;  // work per graph replay
constexpr int kReplays = 5;
constexpr size_t kColdBytes = size_t{256} << 20;  // weight copies cycled per shape: > 4x L2

struct Shape {
  const char* name;
  int64_t n, k;
};
constexpr Shape kShapes[] = {{"qkv", 6144, 4096},     {"o", 4096, 4096},          {"gate_up", 28672, 4096},
                             {"down", 4096, 14336},   {"lm_head", 128256, 4096}};
constexpr int64_t kTokens[] = {1, 8, 64, 256, 4096};

double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// A device buffer of `bytes` filled with random bf16 values in [-1, 1] (a 16 MiB host pattern
// repeated).
DeviceBuffer RandomBf16(Backend& be, size_t bytes) {
  static const std::vector<uint16_t> pattern = [] {
    std::mt19937 rng(7);
    std::uniform_real_distribution<float> u(-1.f, 1.f);
    std::vector<uint16_t> p((size_t{16} << 20) / 2);
    for (uint16_t& v : p) v = F32ToBf16(u(rng));
    return p;
  }();
  auto b = be.Allocate(bytes);
  CHECK(b.ok()) << b.status();
  for (size_t off = 0; off < bytes; off += pattern.size() * 2) {
    CHECK_OK(be.CopyToDevice(static_cast<char*>(b->data()) + off, pattern.data(),
                             std::min(bytes - off, pattern.size() * 2)));
  }
  CHECK_OK(be.Synchronize());
  return std::move(*b);
}

struct Point {
  std::string name;
  int64_t m, n, k;
  DType out;
  double us, tflops, weight_gbps;
};

// Seconds per x[m, k] * w[n, k]^T -> out[m, n] (out `od`), with `copies` distinct weights cycled.
double TimeGemm(Backend& be, int64_t m, int64_t n, int64_t k, DType od, int copies) {
  const size_t wbytes = static_cast<size_t>(n) * k * 2;
  std::vector<DeviceBuffer> ws;
  for (int i = 0; i < copies; ++i) ws.push_back(RandomBf16(be, wbytes));
  DeviceBuffer x = RandomBf16(be, static_cast<size_t>(m) * k * 2);
  auto out = be.Allocate(static_cast<size_t>(m) * n * DTypeSize(od));
  CHECK(out.ok()) << out.status();
  const Tensor2D xv{x.data(), DType::kBF16, m, k, 0}, ov{out->data(), od, m, n, 0};
  auto gemm = [&](int i) { CHECK_OK(be.Matmul(xv, Tensor2D{ws[i % copies].data(), DType::kBF16, n, k, 0}, ov)); };
  gemm(0);  // picks (and times) the algorithm for this shape
  CHECK_OK(be.Synchronize());
  double t0 = Now();
  for (int i = 0; i < copies; ++i) gemm(i);
  CHECK_OK(be.Synchronize());
  const double est = (Now() - t0) / copies;
  int reps = static_cast<int>(std::clamp(kTargetSeconds / est, 1.0, 400.0));
  reps = std::max(copies, (reps + copies - 1) / copies * copies);
  return GraphMicrosPerCall(be, reps, kReplays, ReplayStat::kMean, gemm) * 1e-6;
}

Point Measure(Backend& be, const std::string& name, int64_t m, int64_t n, int64_t k, DType od) {
  const double wbytes = 2.0 * n * k;
  const int copies = static_cast<int>(std::clamp<double>(kColdBytes / wbytes + 0.999, 1, 8));
  const double s = TimeGemm(be, m, n, k, od, copies);
  Point p{name, m, n, k, od, s * 1e6, 2.0 * m * n * k / s * 1e-12, wbytes / s * 1e-9};
  std::printf("{\"bench\":\"gemm\",\"shape\":\"%s\",\"M\":%ld,\"N\":%ld,\"K\":%ld,\"dtype\":\"BF16\","
              "\"out\":\"%s\",\"us\":%.2f,\"tflops\":%.1f,\"weight_gbps\":%.0f}\n",
              name.c_str(), static_cast<long>(m), static_cast<long>(n), static_cast<long>(k), DTypeName(od),
              p.us, p.tflops, p.weight_gbps);
  std::fflush(stdout);
  return p;
}

// --- decode: cuBLASLt against the small-M GEMV ------------------------------------------------

constexpr int64_t kDecodeTokens[] = {1, 2, 4, 8};

struct DecodeShape {
  const char* name;
  int64_t n, k;
  DType out;
};
constexpr DecodeShape kDecodeShapes[] = {
    {"8B qkv", 6144, 4096, DType::kBF16},        {"8B o", 4096, 4096, DType::kBF16},
    {"8B gate_up", 28672, 4096, DType::kBF16},   {"8B down", 4096, 14336, DType::kBF16},
    {"8B lm_head", 128256, 4096, DType::kF32},   {"70B/2 qkv", 5120, 8192, DType::kBF16},
    {"70B/2 o", 8192, 4096, DType::kBF16},       {"70B/2 gate_up", 28672, 8192, DType::kBF16},
    {"70B/2 down", 8192, 14336, DType::kBF16},
};

std::unique_ptr<Backend> CudaWithPolicy(CudaMatmulPolicy policy) {
  SetCudaMatmulPolicy(policy);
  auto made = CreatePartialCudaBackend(BackendOptions{BackendKind::kCuda});
  SetCudaMatmulPolicy(CudaMatmulPolicy::kAuto);
  CHECK(made.ok()) << made.status();
  return std::move(*made);
}

// Microseconds per op(i) over a graph of `reps` calls (op(0) run eagerly first: lazy choices).
double DecodeMicros(Backend& be, int reps, const std::function<void(int)>& op) {
  op(0);
  CHECK_OK(be.Synchronize());
  return GraphMicrosPerCall(be, reps, 3, ReplayStat::kMean, op);
}

int DecodeMain() {
  auto lt = CudaWithPolicy(CudaMatmulPolicy::kCublasLtOnly);
  auto au = CudaWithPolicy(CudaMatmulPolicy::kAuto);
  auto gv = CudaWithPolicy(CudaMatmulPolicy::kGemvFirst);
  const auto gv_stream = static_cast<cudaStream_t>(gv->stream_handle());
  const int configs = cuda_internal::GemvConfigCount();
  const std::optional<DeviceCeilings> ceilings = CeilingsFor(lt->Describe());
  if (!ceilings.has_value()) {
    std::fprintf(stderr, "gemm_bench decode: no row for %s in common/device_ceilings.h (run `gemm_bench "
                 "ceilings` on it and add one)\n", lt->Describe().c_str());
    return 1;
  }
  const double floor_bytes_per_second = ceilings->decode_tbps() * 1e12;
  std::printf("# %s\n# GEMV configurations:", lt->Describe().c_str());
  for (int c = 0; c < configs; ++c) std::printf(" %d = %s;", c, cuda_internal::GemvConfigName(c).c_str());
  std::printf("\n");
  struct Row {
    std::string name;
    int64_t m;
    double floor_us, lt, au, gv, best;
    int best_config;
  };
  std::vector<Row> rows;
  for (const DecodeShape& sh : kDecodeShapes) {
    const size_t wbytes = static_cast<size_t>(sh.n) * sh.k * 2;
    const int copies = static_cast<int>(std::clamp<double>(kColdBytes / double(wbytes) + 0.999, 1, 8));
    std::vector<DeviceBuffer> ws;
    for (int i = 0; i < copies; ++i) ws.push_back(RandomBf16(*lt, wbytes));
    const int64_t max_m = kDecodeTokens[std::size(kDecodeTokens) - 1];
    DeviceBuffer x = RandomBf16(*lt, static_cast<size_t>(max_m) * sh.k * 2);
    auto out = lt->Allocate(static_cast<size_t>(max_m) * sh.n * DTypeSize(sh.out));
    CHECK(out.ok()) << out.status();
    const double floor_us = wbytes / floor_bytes_per_second * 1e6;
    int reps = static_cast<int>(std::clamp(1e6 * kTargetSeconds / 2 / floor_us, 1.0, 400.0));
    reps = std::max(copies, (reps + copies - 1) / copies * copies);
    for (const int64_t m : kDecodeTokens) {
      const Tensor2D xv{x.data(), DType::kBF16, m, sh.k, 0}, ov{out->data(), sh.out, m, sh.n, 0};
      auto wv = [&](int i) { return Tensor2D{ws[i % copies].data(), DType::kBF16, sh.n, sh.k, 0}; };
      auto matmul = [&](Backend& be) { return DecodeMicros(be, reps, [&](int i) { CHECK_OK(be.Matmul(xv, wv(i), ov)); }); };
      Row r{sh.name, m, floor_us, matmul(*lt), matmul(*au), matmul(*gv), 1e300, -1};
      std::printf("{\"bench\":\"decode_gemm\",\"shape\":\"%s\",\"M\":%ld,\"N\":%ld,\"K\":%ld,\"out\":\"%s\","
                  "\"floor_us\":%.2f,\"cublaslt_us\":%.2f,\"auto_us\":%.2f,\"gemv_us\":%.2f,\"config_us\":[",
                  sh.name, static_cast<long>(m), static_cast<long>(sh.n), static_cast<long>(sh.k), DTypeName(sh.out),
                  floor_us, r.lt, r.au, r.gv);
      for (int c = 0; c < configs; ++c) {
        const double us = DecodeMicros(*gv, reps, [&](int i) {
          CHECK_OK(cuda_internal::RunGemv(xv, wv(i), ov, c, gv_stream));
        });
        if (us < r.best) r.best = us, r.best_config = c;
        std::printf("%s%.2f", c ? "," : "", us);
      }
      std::printf("]}\n");
      std::fflush(stdout);
      rows.push_back(r);
    }
  }
  std::printf("\n%-14s %2s %8s %16s %16s %16s %18s\n", "shape", "M", "floor us", "cuBLASLt us (%)",
              "auto us (%)", "GEMV us (%)", "best config us (%)");
  auto cell = [](double us, double floor_us) {
    char b[32];
    std::snprintf(b, sizeof b, "%7.2f (%3.0f%%)", us, 100 * floor_us / us);
    return std::string(b);
  };
  for (const Row& r : rows) {
    std::printf("%-14s %2ld %8.2f %16s %16s %16s %14s [%d]\n", r.name.c_str(), static_cast<long>(r.m), r.floor_us,
                cell(r.lt, r.floor_us).c_str(), cell(r.au, r.floor_us).c_str(), cell(r.gv, r.floor_us).c_str(),
                cell(r.best, r.floor_us).c_str(), r.best_config);
  }
  std::printf("auto: Matmul's default (timed choice per shape); GEMV: Matmul preferring the GEMV (its timed "
              "configuration); best config: the fastest configuration launched directly, [its index]\n");
  return 0;
}

// The BF16 GEMM peak, TFLOP/s: the best of 8192^3 and 16384^3.
double SquarePeak(Backend& be) {
  double peak = 0;
  for (const int64_t s : {8192, 16384}) {
    peak = std::max(peak, Measure(be, "square", s, s, s, DType::kBF16).tflops);
  }
  return peak;
}

// Device traffic per second of a device-to-device copy of `bytes` (2 x `bytes`: read and
// written), timed in a graph of 8 copies over 2 buffer pairs so that neither is served from L2.
double CopyBytesPerSecond(Backend& be, size_t bytes) {
  DeviceBuffer a = RandomBf16(be, bytes), b = RandomBf16(be, bytes), c = RandomBf16(be, bytes),
               d = RandomBf16(be, bytes);
  auto copy = [&](int i) {
    if (i % 2 == 0) {
      CHECK_OK(be.CopyOnDevice(b.data(), a.data(), bytes));
    } else {
      CHECK_OK(be.CopyOnDevice(d.data(), c.data(), bytes));
    }
  };
  copy(0);
  copy(1);
  CHECK_OK(be.Synchronize());
  const double us = GraphMicrosPerCall(be, 8, kReplays, ReplayStat::kMean, copy);
  return 2.0 * static_cast<double>(bytes) / (us * 1e-6);
}

// `gemm_bench ceilings`: the device's copy bandwidth and GEMM peak, as a row for
// common/device_ceilings.h.
// Also, for reference (not in the row): the rate Matmul reads a 1 GiB BF16 weight at M = 1 (the
// decode's access; the faster of cuBLASLt and the GEMV, chosen as Matmul chooses), which may
// exceed the copy's: a copy also writes.
int CeilingsMain(Backend& be) {
  const double copy = CopyBytesPerSecond(be, size_t{1} << 30);
  const double peak = SquarePeak(be);
  const Point read = Measure(be, "weight_read", 1, 131072, 4096, DType::kBF16);
  std::printf("{\"bench\":\"ceilings\",\"device\":\"%s\",\"copy_tbps\":%.3f,\"gemm_peak_tflops\":%.1f,"
              "\"weight_read_tbps\":%.3f}\n",
              be.Describe().c_str(), copy * 1e-12, peak, read.weight_gbps * 1e-3);
  std::printf("%s: device-to-device copy %.3f TB/s (bytes read + written), BF16 GEMM peak %.1f TFLOP/s; "
              "Matmul reads a 1 GiB weight at M = 1 at %.3f TB/s\n",
              be.Describe().c_str(), copy * 1e-12, peak, read.weight_gbps * 1e-3);
  const std::optional<DeviceCeilings> row = CeilingsFor(be.Describe());
  if (row.has_value()) {
    std::printf("common/device_ceilings.h has for it: copy %.3f TB/s, %.1f TFLOP/s, weight read %.3f TB/s (%s)\n",
                row->copy_tbps, row->gemm_peak_tflops, row->weight_read_tbps, row->measured);
  } else {
    std::printf("common/device_ceilings.h has no row for it\n");
  }
  return 0;
}

int Main(Backend& be) {
  std::printf("# %s\n", be.Describe().c_str());
  const double peak = SquarePeak(be);
  std::printf("{\"bench\":\"gemm_peak\",\"tflops\":%.1f}\n", peak);
  std::vector<Point> points;
  for (const Shape& sh : kShapes) {
    for (const int64_t m : kTokens) points.push_back(Measure(be, sh.name, m, sh.n, sh.k, DType::kBF16));
  }
  for (const int64_t m : kTokens) points.push_back(Measure(be, "lm_head", m, 128256, 4096, DType::kF32));

  std::printf("\n%-8s %5s %6s %6s %4s %10s %8s %7s %9s\n", "shape", "M", "N", "K", "out", "us", "TFLOP/s",
              "%peak", "w GB/s");
  for (const Point& p : points) {
    std::printf("%-8s %5ld %6ld %6ld %4s %10.2f %8.1f %6.1f%% %9.0f\n", p.name.c_str(), static_cast<long>(p.m),
                static_cast<long>(p.n), static_cast<long>(p.k), DTypeName(p.out), p.us, p.tflops,
                100.0 * p.tflops / peak, p.weight_gbps);
  }
  std::printf("peak (square GEMM, best of 8192^3 and 16384^3): %.1f TFLOP/s\n", peak);
  return 0;
}

}  // namespace
}  // namespace lorc

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "";
  if (argc > 2 || (mode != "" && mode != "decode" && mode != "ceilings")) {
    const bool help = mode == "--help" || mode == "-h";
    std::fprintf(help ? stdout : stderr, "%susage: gemm_bench [decode | ceilings] (needs a CUDA device)\n",
                 help ? "" : "gemm_bench: unknown arguments\n");
    return help ? 0 : 2;
  }
  // One backend made first: a machine without a usable device gets its error, not a CHECK.
  auto made = lorc::CreatePartialCudaBackend(lorc::BackendOptions{lorc::BackendKind::kCuda});
  if (!made.ok()) {
    std::fprintf(stderr, "gemm_bench: %s\n", std::string(made.status().message()).c_str());
    return 1;
  }
  if (mode == "decode") {
    made->reset();
    return lorc::DecodeMain();
  }
  if (mode == "ceilings") return lorc::CeilingsMain(**made);
  return lorc::Main(**made);
}
