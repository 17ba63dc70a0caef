// Rough timings of the CUDA backend's element-wise and row kernels in BF16 (not a test): each op
// is captured 100 times into one CUDA graph and replayed, so launch overhead is mostly hidden;
// prints microseconds per op and the effective bandwidth of the bytes it must move.
// Usage: build/bin/cuda_kernels_bench (needs a CUDA device).
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "backend/cuda_backend.h"
#include "bench/src/graph_timer.h"
#include "common/check.h"

namespace lorc {
namespace {

constexpr int kReps = 100;

DeviceBuffer Zeros(Backend& be, size_t bytes) {
  auto b = be.Allocate(bytes);
  CHECK(b.ok()) << b.status();
  CHECK_OK(be.Memset(b->data(), 0, bytes));
  return std::move(*b);
}

Tensor2D Bf16(const DeviceBuffer& b, int64_t rows, int64_t cols) {
  return Tensor2D{b.data(), DType::kBF16, rows, cols, 0};
}

void Time(Backend& be, const std::string& name, double bytes, const std::function<void()>& op) {
  op();  // warm-up
  const double us = GraphMicrosPerCall(be, kReps, 1, ReplayStat::kMean, [&](int) { op(); });
  std::printf("%-44s %9.2f us  %7.0f GB/s\n", name.c_str(), us, bytes / us * 1e-3);
}

int Main() {
  auto made = CreatePartialCudaBackend(BackendOptions{BackendKind::kCuda});
  if (!made.ok()) {
    std::fprintf(stderr, "%s\n", std::string(made.status().message()).c_str());
    return 1;
  }
  Backend& be = **made;
  std::printf("%s\n", be.Describe().c_str());
  const int64_t H = 4096, I = 14336, heads = 32, kv = 8, hd = 128, qkv = (heads + 2 * kv) * hd;
  for (const int64_t T : {1, 64, 4096}) {
    DeviceBuffer x = Zeros(be, T * H * 2), r = Zeros(be, T * H * 2), w = Zeros(be, H * 2);
    DeviceBuffer gu = Zeros(be, T * 2 * I * 2), act = Zeros(be, T * I * 2), q = Zeros(be, T * qkv * 2);
    DeviceBuffer table = Zeros(be, 128256 * H * 2), ids = Zeros(be, T * 4), pos = Zeros(be, T * 4);
    DeviceBuffer inv = Zeros(be, hd / 2 * 4), slots = Zeros(be, T * 4);
    DeviceBuffer kc = Zeros(be, T * kv * hd * 2), vc = Zeros(be, T * kv * hd * 2);
    // Distinct rows and slots, as a real step has (all-zero ids would time L2 hits).
    std::vector<int32_t> rows(T);
    for (int64_t i = 0; i < T; ++i) rows[i] = static_cast<int32_t>((i * 7919) % 128256);
    CHECK_OK(be.CopyToDevice(ids.data(), rows.data(), T * 4));
    for (int64_t i = 0; i < T; ++i) rows[i] = static_cast<int32_t>(i);
    CHECK_OK(be.CopyToDevice(slots.data(), rows.data(), T * 4));
    const std::string t = " T=" + std::to_string(T);
    Time(be, "Embedding H=4096" + t, 2.0 * T * H * 2, [&] {
      CHECK_OK(be.Embedding(Bf16(table, 128256, H), ids.as<int32_t>(), Bf16(x, T, H)));
    });
    Time(be, "RmsNorm H=4096" + t, 2.0 * T * H * 2, [&] {
      CHECK_OK(be.RmsNorm(Bf16(x, T, H), Bf16(w, 1, H), 1e-5f, Bf16(x, T, H)));
    });
    Time(be, "FusedAddRmsNorm H=4096" + t, 4.0 * T * H * 2, [&] {
      CHECK_OK(be.FusedAddRmsNorm(Bf16(r, T, H), Bf16(x, T, H), Bf16(w, 1, H), 1e-5f, Bf16(x, T, H)));
    });
    Time(be, "AddInPlace H=4096" + t, 3.0 * T * H * 2, [&] {
      CHECK_OK(be.AddInPlace(Bf16(r, T, H), Bf16(x, T, H)));
    });
    Time(be, "SiluMul I=14336" + t, 3.0 * T * I * 2, [&] {
      CHECK_OK(be.SiluMul(Bf16(gu, T, 2 * I), Bf16(act, T, I)));
    });
    Time(be, "RopeKvWrite 32/8x128" + t, (2.0 * (heads + kv) * hd + 2.0 * kv * hd) * T * 2, [&] {
      const Tensor2D all = Bf16(q, T, qkv);
      CHECK_OK(be.RopeKvWrite({all.ColSlice(0, heads * hd), all.ColSlice(heads * hd, kv * hd),
                               all.ColSlice((heads + kv) * hd, kv * hd),
                               KvLayer{kc.data(), vc.data(), kv * hd, kv * hd, DType::kBF16}, heads, kv, hd,
                               pos.as<int32_t>(), inv.as<float>(), slots.as<int32_t>()}));
    });
  }
  return 0;
}

}  // namespace
}  // namespace lorc

int main() { return lorc::Main(); }
