// Host KV tier copy throughput (not a test): Backend::OffloadKvBlocks / LoadKvBlocks of n blocks
// of the Llama-3-8B KV shape on one rank (32 layers, 8 KV heads x 128, BF16, block_size 16: 2 MiB
// a block, 64 segments of 32 KiB), n = 1, 16, 128, 512 (blocks scattered over a 1024-block cache,
// slots in order), timed on the host from the first call to SynchronizeKvTransfers, best of
// `reps` after a warm-up. CUDA: pinned slots, one batched copy per call on the copy stream;
// CPU: memcpy. Prints one JSON line per case, then a table.
// Usage: build/bin/host_kv_bench [cpu|cuda] [reps]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "backend/backend.h"
#include "common/check.h"

namespace lorc {
namespace {

constexpr char kUsage[] = "usage: host_kv_bench [cpu|cuda] [reps: 1-10000, default 10]\n";

int Main(int argc, char** argv) {
  const std::string kind = argc > 1 ? argv[1] : BackendKindName(BackendKind::kCuda);
  if (kind == "--help" || kind == "-h") {
    std::fputs(kUsage, stdout);
    return 0;
  }
  int reps = 10;
  if (argc > 3) {
    std::fprintf(stderr, "host_kv_bench: unexpected argument '%s'\n%s", argv[3], kUsage);
    return 2;
  }
  if (argc > 2 && (!absl::SimpleAtoi(argv[2], &reps) || reps < 1 || reps > 10000)) {
    std::fprintf(stderr, "host_kv_bench: reps '%s' is not in [1, 10000]\n%s", argv[2], kUsage);
    return 2;
  }
  absl::StatusOr<BackendKind> k = ParseBackendKind(kind);
  if (!k.ok()) {
    std::fprintf(stderr, "host_kv_bench: %s\n%s", std::string(k.status().message()).c_str(), kUsage);
    return 2;
  }
  BackendOptions bo;
  bo.kind = *k;
  auto made = CreateBackend(bo);
  if (!made.ok()) {
    std::fprintf(stderr, "%s\n", std::string(made.status().message()).c_str());
    return 1;
  }
  Backend& be = **made;
  std::fprintf(stderr, "%s\n", be.Describe().c_str());
  constexpr int kLayers = 32, kBlocks = 1024, kMaxN = 512;
  constexpr int32_t kBlockSize = 16;
  constexpr int64_t kWidth = 8 * 128;
  std::vector<DeviceBuffer> bufs;
  std::vector<KvLayer> layers;
  for (int l = 0; l < kLayers; ++l) {
    KvLayer c{nullptr, nullptr, kWidth, kWidth, DType::kBF16};
    c.block_size = kBlockSize;
    for (bool v : {false, true}) {
      auto b = be.Allocate(static_cast<size_t>(kBlocks) * KvLayerBlockBytes(c, v, kBlockSize));
      CHECK(b.ok()) << b.status();
      CHECK_OK(be.Memset(b->data(), l + v, b->bytes()));
      (v ? c.v : c.k) = b->data();
      bufs.push_back(std::move(*b));
    }
    layers.push_back(c);
  }
  auto host = be.CreateHostKvStorage(layers, kBlockSize, kMaxN);
  CHECK(host.ok()) << host.status();
  CHECK_OK(be.Synchronize());
  std::vector<int32_t> blocks(kBlocks);
  std::iota(blocks.begin(), blocks.end(), 0);
  std::shuffle(blocks.begin(), blocks.end(), std::mt19937(3));
  struct Row {
    const char* dir;
    int n;
    double ms, gbps;
  };
  std::vector<Row> rows;
  for (const int n : {1, 16, 128, 512}) {
    std::vector<HostBlockCopy> copies;
    for (int i = 0; i < n; ++i) copies.push_back({blocks[i], i});
    for (const bool offload : {true, false}) {
      double best = 1e30;
      for (int r = 0; r < reps + 1; ++r) {
        const auto t0 = std::chrono::steady_clock::now();
        CHECK_OK(offload ? be.OffloadKvBlocks(layers, kBlockSize, kBlocks, *host, copies)
                         : be.LoadKvBlocks(layers, kBlockSize, kBlocks, *host, copies));
        CHECK_OK(be.SynchronizeKvTransfers());
        const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
        if (r > 0) best = std::min(best, ms);  // r == 0: warm-up
      }
      const double bytes = static_cast<double>(n) * host->slot_bytes();
      rows.push_back({offload ? "offload" : "load", n, best, bytes / (best * 1e-3) / 1e9});
      std::printf("{\"bench\":\"host_kv\",\"backend\":\"%s\",\"direction\":\"%s\",\"blocks\":%d,"
                  "\"block_bytes\":%lld,\"ms\":%.4f,\"GB_per_s\":%.2f}\n",
                  be.name(), rows.back().dir, n, static_cast<long long>(host->slot_bytes()), best,
                  rows.back().gbps);
    }
  }
  std::printf("\n| direction | blocks | MiB | ms | GB/s |\n|---|---|---|---|---|\n");
  for (const Row& r : rows) {
    std::printf("| %s | %d | %.0f | %.3f | %.1f |\n", r.dir, r.n,
                r.n * static_cast<double>(host->slot_bytes()) / (1 << 20), r.ms, r.gbps);
  }
  return 0;
}

}  // namespace
}  // namespace lorc

int main(int argc, char** argv) { return lorc::Main(argc, argv); }
