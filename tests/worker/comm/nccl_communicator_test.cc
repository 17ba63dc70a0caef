// Runs on machines with >= 2 GPUs; skips cleanly without CUDA, without a driver, or with one GPU.
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/status_matchers.h"
#include "tests/worker/comm/comm_test_util.h"
#include "worker/comm/communicator.h"
#include "worker/comm/rendezvous.h"

#if LORC_COMM_TEST_CUDA
#include <cuda_runtime.h>
#endif

namespace lorc {
namespace {

using ::lorc::testing::StatusIs;
using ::testing::HasSubstr;

CommOptions TestOptions(const std::string& group) { return ::lorc::testing::TestCommOptions(group); }

#if !LORC_COMM_TEST_CUDA

TEST(NcclCommunicatorTest, UnimplementedWithoutCuda) {
  InProcessStore store;
  EXPECT_THAT(CreateNcclCommunicator({0, 1}, &store, 0, nullptr, TestOptions("tp")),
              StatusIs(absl::StatusCode::kUnimplemented, HasSubstr("without CUDA")));
  GTEST_SKIP() << "built without CUDA";
}

#else  // LORC_COMM_TEST_CUDA

void RunRanks(int n, const std::function<void(int)>& fn) {
  std::vector<std::thread> threads;
  for (int r = 0; r < n; ++r) threads.emplace_back(fn, r);
  for (std::thread& t : threads) t.join();
}

using ::lorc::testing::GpuCount;

TEST(NcclCommunicatorTest, NoDeviceIsFailedPrecondition) {
  if (GpuCount() > 0) GTEST_SKIP() << "a GPU is present";
  InProcessStore store;
  EXPECT_THAT(CreateNcclCommunicator({0, 1}, &store, 0, nullptr, TestOptions("tp")),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("no usable CUDA device")));
}

TEST(NcclCommunicatorTest, BadDeviceIndex) {
  const int gpus = GpuCount();
  if (gpus == 0) GTEST_SKIP() << "no CUDA device";
  InProcessStore store;
  EXPECT_THAT(CreateNcclCommunicator({0, 1}, &store, gpus, nullptr, TestOptions("tp")),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("cuda_device")));
}

TEST(NcclCommunicatorTest, CollectivesOnTwoGpus) {
  if (GpuCount() < 2) GTEST_SKIP() << "needs 2 GPUs, found " << GpuCount();
  constexpr int kWorld = 2;
  InProcessStore store;
  RunRanks(kWorld, [&](int rank) {
    CUDA_ASSERT(cudaSetDevice(rank));
    cudaStream_t stream = nullptr;
    CUDA_ASSERT(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    {
      auto comm = CreateNcclCommunicator({rank, kWorld}, &store, rank, stream,
                                         TestOptions("nccl-tp"));
      ASSERT_OK(comm);
      EXPECT_EQ((*comm)->backend_name(), "nccl");

      for (size_t count : {size_t{1001}, size_t{64} << 20}) {
        std::vector<float> host(count);
        for (size_t i = 0; i < count; ++i) host[i] = float((rank + 1) * int(i % 1000));
        float* dev = nullptr;
        CUDA_ASSERT(cudaMalloc(&dev, count * sizeof(float)));
        CUDA_ASSERT(cudaMemcpy(dev, host.data(), count * sizeof(float), cudaMemcpyHostToDevice));
        ASSERT_OK((*comm)->AllReduceSum(dev, count));
        ASSERT_OK((*comm)->Sync());
        CUDA_ASSERT(cudaMemcpy(host.data(), dev, count * sizeof(float), cudaMemcpyDeviceToHost));
        CUDA_ASSERT(cudaFree(dev));
        // (1 + 2) * (i % 1000): exact in float.
        for (size_t i = 0; i < count; ++i) {
          ASSERT_EQ(host[i], float(3 * int(i % 1000))) << "rank " << rank << " count " << count
                                                       << " i " << i;
        }
      }

      // AllGather + Broadcast from rank 1 + Barrier.
      constexpr size_t kCount = 257;
      float* send = nullptr;
      float* recv = nullptr;
      CUDA_ASSERT(cudaMalloc(&send, kCount * sizeof(float)));
      CUDA_ASSERT(cudaMalloc(&recv, kWorld * kCount * sizeof(float)));
      std::vector<float> host(kCount);
      for (size_t i = 0; i < kCount; ++i) host[i] = float(rank * 1000 + i);
      CUDA_ASSERT(cudaMemcpy(send, host.data(), kCount * sizeof(float), cudaMemcpyHostToDevice));
      ASSERT_OK((*comm)->AllGather(send, recv, kCount));
      ASSERT_OK((*comm)->Sync());
      std::vector<float> gathered(kWorld * kCount);
      CUDA_ASSERT(cudaMemcpy(gathered.data(), recv, gathered.size() * sizeof(float),
                             cudaMemcpyDeviceToHost));
      for (int r = 0; r < kWorld; ++r) {
        for (size_t i = 0; i < kCount; ++i) ASSERT_EQ(gathered[r * kCount + i], float(r * 1000 + i));
      }
      // Broadcast 13 bytes from rank 1 into `send`.
      std::vector<unsigned char> bytes(13, 0);
      if (rank == 1) {
        for (size_t i = 0; i < bytes.size(); ++i) bytes[i] = static_cast<unsigned char>(7 * i + 1);
      }
      CUDA_ASSERT(cudaMemcpy(send, bytes.data(), bytes.size(), cudaMemcpyHostToDevice));
      ASSERT_OK((*comm)->Broadcast(send, bytes.size(), 1));
      ASSERT_OK((*comm)->Barrier());
      std::vector<unsigned char> got(bytes.size());
      CUDA_ASSERT(cudaMemcpy(got.data(), send, got.size(), cudaMemcpyDeviceToHost));
      for (size_t i = 0; i < got.size(); ++i) ASSERT_EQ(got[i], static_cast<unsigned char>(7 * i + 1));
      CUDA_ASSERT(cudaFree(send));
      CUDA_ASSERT(cudaFree(recv));
    }
    CUDA_ASSERT(cudaStreamDestroy(stream));
  });
}

TEST(NcclCommunicatorTest, HalfPrecisionAllReduceOnTwoGpus) {
  // BF16 and F16 sums of small integers (exact in both): the dtype reaches NCCL.
  if (GpuCount() < 2) GTEST_SKIP() << "needs 2 GPUs, found " << GpuCount();
  InProcessStore store;
  RunRanks(2, [&](int rank) {
    CUDA_ASSERT(cudaSetDevice(rank));
    cudaStream_t stream = nullptr;
    CUDA_ASSERT(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    auto comm = CreateNcclCommunicator({rank, 2}, &store, rank, stream, TestOptions("nccl-half"));
    ASSERT_OK(comm);
    constexpr size_t kCount = 257;
    // bf16 of v is the top 16 bits of float v; f16 of small integers via the IEEE half layout.
    auto bf16 = [](float v) { uint32_t b; std::memcpy(&b, &v, 4); return static_cast<uint16_t>(b >> 16); };
    auto f16 = [](int v) {  // 0 <= v < 2048: exact in half precision
      if (v == 0) return static_cast<uint16_t>(0);
      int e = 0;
      while ((v >> (e + 1)) != 0) ++e;
      const int mant = (v << (10 - e)) & 0x3ff;
      return static_cast<uint16_t>(((e + 15) << 10) | mant);
    };
    for (DType dt : {DType::kBF16, DType::kF16}) {
      std::vector<uint16_t> host(kCount);
      for (size_t i = 0; i < kCount; ++i) {
        const int v = static_cast<int>(i % 64) + rank;
        host[i] = dt == DType::kBF16 ? bf16(static_cast<float>(v)) : f16(v);
      }
      uint16_t* dev = nullptr;
      CUDA_ASSERT(cudaMalloc(&dev, kCount * 2));
      CUDA_ASSERT(cudaMemcpy(dev, host.data(), kCount * 2, cudaMemcpyHostToDevice));
      ASSERT_OK((*comm)->AllReduceSum(dev, kCount, dt));
      ASSERT_OK((*comm)->Sync());
      std::vector<uint16_t> got(kCount);
      CUDA_ASSERT(cudaMemcpy(got.data(), dev, kCount * 2, cudaMemcpyDeviceToHost));
      for (size_t i = 0; i < kCount; ++i) {
        const int want = 2 * static_cast<int>(i % 64) + 1;  // rank 0 + rank 1
        ASSERT_EQ(got[i], dt == DType::kBF16 ? bf16(static_cast<float>(want)) : f16(want))
            << DTypeName(dt) << " element " << i << " on rank " << rank;
      }
      CUDA_ASSERT(cudaFree(dev));
    }
    comm->reset();
    CUDA_ASSERT(cudaStreamDestroy(stream));
  });
}

TEST(NcclCommunicatorTest, PeerThatNeverJoinsACollectiveTimesOutInsteadOfHanging) {
  if (GpuCount() < 2) GTEST_SKIP() << "needs 2 GPUs, found " << GpuCount();
  InProcessStore store;
  CommOptions options = TestOptions("nccl-stuck");
  options.op_timeout = absl::Seconds(3);
  absl::Notification rank0_done;
  RunRanks(2, [&](int rank) {
    CUDA_ASSERT(cudaSetDevice(rank));
    cudaStream_t stream = nullptr;
    CUDA_ASSERT(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    float* dev = nullptr;
    CUDA_ASSERT(cudaMalloc(&dev, 1024 * sizeof(float)));
    {
      auto comm = CreateNcclCommunicator({rank, 2}, &store, rank, stream, options);
      ASSERT_OK(comm);
      // One collective together (connections are set up), then rank 0 goes on alone.
      ASSERT_OK((*comm)->AllReduceSum(dev, 1024));
      ASSERT_OK((*comm)->Sync());
      if (rank == 0) {
        const absl::Time start = absl::Now();
        absl::Status s = (*comm)->AllReduceSum(dev, 1024);
        if (s.ok()) s = (*comm)->Sync();
        EXPECT_THAT(s, StatusIs(absl::StatusCode::kDeadlineExceeded, HasSubstr("within 3s")));
        EXPECT_LT(absl::Now() - start, absl::Seconds(30));
        EXPECT_THAT((*comm)->Barrier(),
                    StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("broken")));
        rank0_done.Notify();
      } else {
        rank0_done.WaitForNotification();
      }
      // Both destructors must return (bounded by op_timeout) although rank 0 aborted.
    }
    CUDA_ASSERT(cudaFree(dev));
    CUDA_ASSERT(cudaStreamDestroy(stream));
  });
}

TEST(NcclCommunicatorTest, JoinTimeoutNamesMissingRank) {
  // Rank 0 alone: the join protocol must give up and name rank 1 (one GPU suffices).
  if (GpuCount() < 1) GTEST_SKIP() << "no CUDA device";
  InProcessStore store;
  CommOptions options = TestOptions("nccl-lonely");
  options.join_timeout = absl::Seconds(2);
  const absl::Time start = absl::Now();
  EXPECT_THAT(CreateNcclCommunicator({0, 2}, &store, 0, nullptr, options),
              StatusIs(absl::StatusCode::kDeadlineExceeded,
                       HasSubstr("nccl-lonely group: rank(s) 1 of 2 did not join within 2s")));
  EXPECT_LT(absl::Now() - start, absl::Seconds(20));
}

#endif  // LORC_COMM_TEST_CUDA

}  // namespace
}  // namespace lorc
