// The custom (one-shot, peer-memory) all-reduce at world sizes 2 to 8 on a single GPU: the ranks
// are threads of this process sharing device 0, each with its own stream, buffer and
// CustomAllReduce (set up through an InProcessStore, so Create's same-process path maps the
// peers' blocks by pointer). This runs the kernel's run-time world-size form
// (OneShotAllReduceKernel<0>: every size but 2), which the lent 1- and 2-GPU machines otherwise
// never run, and Create's limit per world size (max_bytes / (n - 1)), before a 4- or 8-GPU
// machine is at hand (issues #12, #13). Speed means nothing here (the ranks share one GPU).
//
// Tolerance: every rank's output equals the host reference (kernels::OneShotAllReduceReference:
// fp32 sums in rank order, one bf16 rounding) bit for bit. Co-residency: a rank's blocks wait at
// the barrier for the same block of every other rank, so each case keeps (blocks a rank) x
// (ranks) within the GPU's SM count (every block resident); a barrier wait past 30 s fails the
// case (TimedOut) rather than hanging; the ranks' kernels must also run at once, so the test
// skips where launches are serialized (CUDA_LAUNCH_BLOCKING=1, CUDA_DEVICE_MAX_CONNECTIONS below
// the world size). Skips without a GPU (and without CUDA).
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gtest/gtest.h"
#include "tests/worker/comm/comm_test_util.h"
#include "worker/comm/rendezvous.h"

#if LORC_COMM_TEST_CUDA
#include <cuda_runtime.h>

#include "kernels/one_shot_all_reduce.cuh"
#include "worker/comm/custom_all_reduce.h"
#endif

namespace lorc {
namespace {

#if !LORC_COMM_TEST_CUDA

TEST(CustomAllReduceOneGpuTest, NeedsCuda) { GTEST_SKIP() << "built without CUDA"; }

#else

using ::lorc::testing::AllReduceInputs;
using ::lorc::testing::GpuCount;


std::vector<uint16_t> Reference(int n, int c, int64_t count) {
  std::vector<std::vector<uint16_t>> in;
  for (int r = 0; r < n; ++r) in.push_back(AllReduceInputs(r, c, count));
  return kernels::OneShotAllReduceReference(in);
}

int SmCount() {
  int sms = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return sms;
}

// World size n on device 0: n CustomAllReduce objects made by n threads (Create waits for every
// rank's store entries), a stream and a buffer each.
class Ranks {
 public:
  static constexpr size_t kMaxBytes = size_t{4} << 20;

  explicit Ranks(int n) : n_(n), cars_(n), streams_(n, nullptr), bufs_(n, nullptr), why_(n) {
    std::vector<absl::StatusOr<std::unique_ptr<CustomAllReduce>>> made(n);
    std::vector<std::thread> threads;
    const absl::Time deadline = absl::Now() + absl::Seconds(60);
    for (int r = 0; r < n; ++r) {
      threads.emplace_back([&, r] {
        if (cudaSetDevice(0) != cudaSuccess) return;
        CustomAllReduce::Options o;
        o.group = absl::StrCat("car-ranks-", n);
        o.device = 0;
        o.max_bytes = kMaxBytes;
        o.barrier_timeout = absl::Seconds(30);
        o.deadline = deadline;
        made[r] = CustomAllReduce::Create(WorldConfig{r, n}, &store_, o, &why_[r]);
      });
    }
    for (std::thread& t : threads) t.join();
    for (int r = 0; r < n; ++r) {
      if (!made[r].ok()) {
        error_ = absl::StrCat("rank ", r, ": ", made[r].status().ToString());
        return;
      }
      cars_[r] = *std::move(made[r]);
      if (cars_[r] == nullptr) {
        error_ = absl::StrCat("rank ", r, ": custom path off: ", why_[r]);
        return;
      }
      if (cudaStreamCreateWithFlags(&streams_[r], cudaStreamNonBlocking) != cudaSuccess ||
          cudaMalloc(&bufs_[r], kMaxBytes + 64) != cudaSuccess) {
        error_ = absl::StrCat("rank ", r, ": stream or buffer: ", cudaGetErrorString(cudaGetLastError()));
        return;
      }
    }
  }
  ~Ranks() {
    for (int r = 0; r < n_; ++r) {
      if (streams_[r] != nullptr) {
        (void)cudaStreamSynchronize(streams_[r]);
        (void)cudaStreamDestroy(streams_[r]);
      }
      if (bufs_[r] != nullptr) (void)cudaFree(bufs_[r]);
    }
  }

  const std::string& error() const { return error_; }
  CustomAllReduce& car(int r) { return *cars_[r]; }
  cudaStream_t stream(int r) const { return streams_[r]; }
  // Rank r's data: `offset` elements into its buffer (offset 1: not 16-byte aligned).
  uint16_t* data(int r, int64_t offset) { return static_cast<uint16_t*>(bufs_[r]) + offset; }

  // Copies case c's inputs in, all-reduces `count` elements on every rank (launches in rank
  // order; each rank's kernel waits at its barrier for the others), waits and checks every
  // rank's output against the reference bit for bit. Returns the mismatching elements.
  int64_t RunCase(int c, int64_t count, int64_t offset) {
    for (int r = 0; r < n_; ++r) {
      const std::vector<uint16_t> in = AllReduceInputs(r, c, count);
      EXPECT_EQ(cudaMemcpy(data(r, offset), in.data(), count * 2, cudaMemcpyHostToDevice), cudaSuccess);
    }
    for (int r = 0; r < n_; ++r) EXPECT_EQ(car(r).Enqueue(data(r, offset), count, stream(r)), cudaSuccess);
    return Check(c, count, offset);
  }

  int64_t Check(int c, int64_t count, int64_t offset) {
    for (int r = 0; r < n_; ++r) EXPECT_EQ(cudaStreamSynchronize(stream(r)), cudaSuccess) << "rank " << r;
    const std::vector<uint16_t> ref = Reference(n_, c, count);
    int64_t bad = 0;
    for (int r = 0; r < n_; ++r) {
      EXPECT_FALSE(car(r).TimedOut()) << "rank " << r << ": a barrier wait timed out";
      std::vector<uint16_t> out(count);
      EXPECT_EQ(cudaMemcpy(out.data(), data(r, offset), count * 2, cudaMemcpyDeviceToHost), cudaSuccess);
      for (int64_t i = 0; i < count; ++i) {
        if (out[i] != ref[i] && ++bad <= 3) {
          ADD_FAILURE() << "world " << n_ << " case " << c << " count " << count << " offset " << offset
                        << " rank " << r << " element " << i << ": got 0x" << std::hex << out[i]
                        << ", reference 0x" << ref[i] << std::dec;
        }
      }
    }
    return bad;
  }

 private:
  int n_;
  InProcessStore store_;
  std::vector<std::unique_ptr<CustomAllReduce>> cars_;
  std::vector<cudaStream_t> streams_;
  std::vector<void*> bufs_;
  std::vector<std::string> why_;
  std::string error_;
};

// Why the ranks' kernels could not all run at once here (their barriers would time out), or "".
std::string SerializedLaunches(int n) {
  const char* blocking = std::getenv("CUDA_LAUNCH_BLOCKING");
  if (blocking != nullptr && std::string(blocking) == "1") return "CUDA_LAUNCH_BLOCKING=1";
  const char* connections = std::getenv("CUDA_DEVICE_MAX_CONNECTIONS");
  if (connections != nullptr && std::atoi(connections) < n) {
    return absl::StrCat("CUDA_DEVICE_MAX_CONNECTIONS=", connections, " < ", n, " ranks");
  }
  return "";
}

class CustomAllReduceOneGpuTest : public ::testing::TestWithParam<int> {
 protected:
  void SetUp() override {
    if (GpuCount() < 1) GTEST_SKIP() << "needs a GPU";
    if (const std::string why = SerializedLaunches(GetParam()); !why.empty()) GTEST_SKIP() << why;
  }
};

TEST_P(CustomAllReduceOneGpuTest, EveryRankHoldsTheReferenceSum) {
  const int n = GetParam();
  const int sms = SmCount();
  ASSERT_GT(sms, 0);
  Ranks ranks(n);
  ASSERT_EQ(ranks.error(), "");

  // The limit per world size: max_bytes / (n - 1), in 16-byte units; the same on every rank.
  const size_t limit = Ranks::kMaxBytes / static_cast<size_t>(n - 1) / 16 * 16;
  for (int r = 0; r < n; ++r) {
    EXPECT_EQ(ranks.car(r).max_bytes_for_world(), limit) << "rank " << r;
    EXPECT_TRUE(ranks.car(r).Applies(limit / 2, DType::kBF16));
    EXPECT_FALSE(ranks.car(r).Applies(limit / 2 + 1, DType::kBF16));
    EXPECT_FALSE(ranks.car(r).Applies(8, DType::kF32));
  }

  // Odd sizes (a partial 16-byte unit), one block and as many blocks a rank as the SMs give
  // every rank (a block a rank per 2,048 elements; the grid-stride loop past 128 blocks is left
  // to the two-GPU test, worker_comm_custom_all_reduce_nccl_test).
  const int max_blocks = std::min(kernels::kOneShotMaxBlocks, sms / n);
  ASSERT_GE(max_blocks, 1) << sms << " SMs for " << n << " ranks";
  const int64_t most = int64_t{max_blocks} * 2048;
  ASSERT_EQ(kernels::OneShotAllReduceBlocks(most), max_blocks);
  const std::vector<int64_t> counts = {1, 7, 8, 9, 1001, 2048, 2049, most - 3, most};
  int case_id = 0;
  for (int64_t count : counts) EXPECT_EQ(ranks.RunCase(++case_id, count, 0), 0) << "count " << count;
  // Not 16-byte aligned: element-wise copies and stores.
  EXPECT_EQ(ranks.RunCase(++case_id, 1001, 1), 0);
  EXPECT_EQ(ranks.RunCase(++case_id, 9, 1), 0);

  // 40 calls back to back without a wait: the epochs advance per call; a rank overwriting its
  // staging buffer while a peer still reads it would corrupt a later call's region.
  {
    constexpr int kCalls = 40;
    constexpr int64_t kCount = 2051, kStride = 2056;  // 16-byte aligned regions
    for (int r = 0; r < n; ++r) {
      std::vector<uint16_t> host(kCalls * kStride, 0);
      for (int k = 0; k < kCalls; ++k) {
        const std::vector<uint16_t> in = AllReduceInputs(r, 500 + k, kCount);
        std::copy(in.begin(), in.end(), host.begin() + k * kStride);
      }
      ASSERT_EQ(cudaMemcpy(ranks.data(r, 0), host.data(), host.size() * 2, cudaMemcpyHostToDevice), cudaSuccess);
    }
    for (int k = 0; k < kCalls; ++k) {
      for (int r = 0; r < n; ++r) {
        ASSERT_EQ(ranks.car(r).Enqueue(ranks.data(r, k * kStride), kCount, ranks.stream(r)), cudaSuccess);
      }
    }
    for (int k = 0; k < kCalls; ++k) EXPECT_EQ(ranks.Check(500 + k, kCount, k * kStride), 0) << "call " << k;
  }
}

TEST_P(CustomAllReduceOneGpuTest, CapturedCallsReplay) {
  const int n = GetParam();
  Ranks ranks(n);
  ASSERT_EQ(ranks.error(), "");
  constexpr int64_t kCount = 4099;
  // Each rank captures one call into a graph (no host state per call: the epochs live in the
  // signal memory), then replays it three times with new inputs.
  std::vector<cudaGraphExec_t> execs(n, nullptr);
  for (int r = 0; r < n; ++r) {
    cudaGraph_t g = nullptr;
    ASSERT_EQ(cudaStreamBeginCapture(ranks.stream(r), cudaStreamCaptureModeThreadLocal), cudaSuccess);
    ASSERT_EQ(ranks.car(r).Enqueue(ranks.data(r, 0), kCount, ranks.stream(r)), cudaSuccess);
    ASSERT_EQ(cudaStreamEndCapture(ranks.stream(r), &g), cudaSuccess);
    ASSERT_EQ(cudaGraphInstantiate(&execs[r], g, 0), cudaSuccess);
    ASSERT_EQ(cudaGraphDestroy(g), cudaSuccess);
  }
  for (int replay = 0; replay < 3; ++replay) {
    const int c = 900 + replay;
    for (int r = 0; r < n; ++r) {
      const std::vector<uint16_t> in = AllReduceInputs(r, c, kCount);
      ASSERT_EQ(cudaMemcpy(ranks.data(r, 0), in.data(), kCount * 2, cudaMemcpyHostToDevice), cudaSuccess);
    }
    for (int r = 0; r < n; ++r) ASSERT_EQ(cudaGraphLaunch(execs[r], ranks.stream(r)), cudaSuccess);
    EXPECT_EQ(ranks.Check(c, kCount, 0), 0) << "replay " << replay;
  }
  for (cudaGraphExec_t e : execs) (void)cudaGraphExecDestroy(e);
}

INSTANTIATE_TEST_SUITE_P(WorldSizes, CustomAllReduceOneGpuTest, ::testing::Values(2, 3, 4, 8),
                         [](const ::testing::TestParamInfo<int>& i) { return absl::StrCat("world", i.param); });

// A world size the one-shot kernel does not take: Create says why on every rank and the caller
// keeps NCCL (no error).
TEST(CustomAllReduceOneGpuWorldTest, WorldSizeOverEightIsRefusedWithAReason) {
  if (GpuCount() < 1) GTEST_SKIP() << "needs a GPU";
  InProcessStore store;
  constexpr int kN = kernels::kOneShotMaxRanks + 1;
  std::vector<std::string> why(kN);
  std::vector<absl::StatusOr<std::unique_ptr<CustomAllReduce>>> made(kN);
  std::vector<std::thread> threads;
  for (int r = 0; r < kN; ++r) {
    threads.emplace_back([&, r] {
      (void)cudaSetDevice(0);
      CustomAllReduce::Options o;
      o.group = "car-ranks-9";
      o.max_bytes = Ranks::kMaxBytes;
      o.deadline = absl::Now() + absl::Seconds(60);
      made[r] = CustomAllReduce::Create(WorldConfig{r, kN}, &store, o, &why[r]);
    });
  }
  for (std::thread& t : threads) t.join();
  for (int r = 0; r < kN; ++r) {
    ASSERT_TRUE(made[r].ok()) << made[r].status();
    EXPECT_EQ(*made[r], nullptr);
    EXPECT_NE(why[r].find("world size 9 is outside [2, 8]"), std::string::npos) << why[r];
  }
}

#endif  // LORC_COMM_TEST_CUDA

}  // namespace
}  // namespace lorc
