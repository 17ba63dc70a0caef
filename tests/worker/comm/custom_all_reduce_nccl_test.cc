// The custom (one-shot, peer-memory) all-reduce of the NCCL communicator in the supported layout:
// one process per GPU. TwoProcesses runs this binary twice (ranks 0 and 1, environment
// LORC_CAR_TEST_RANK / LORC_CAR_TEST_DIR, a rendezvous store in files under that directory);
// each child runs RankBody on GPU <rank>. Tolerances: the custom path must equal the host
// reference (kernels::OneShotAllReduceReference: fp32 sum in rank order, one bf16 rounding) bit
// for bit; the NCCL path (above the limit) within one bf16 ulp; both ranks' outputs must be
// bit-identical (each child writes a hash per case, the parent compares). Skips with fewer than 2
// GPUs (and without CUDA).
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/match.h"
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

#include "kernels/one_shot_all_reduce.cuh"
#endif

namespace lorc {
namespace {

#if !LORC_COMM_TEST_CUDA

TEST(CustomAllReduceNcclTest, NeedsCuda) { GTEST_SKIP() << "built without CUDA"; }

#else

using ::lorc::testing::StatusIs;
using ::testing::HasSubstr;
using ::testing::StartsWith;

constexpr char kRankEnv[] = "LORC_CAR_TEST_RANK";
constexpr char kDirEnv[] = "LORC_CAR_TEST_DIR";

using ::lorc::testing::AllReduceInputs;
using ::lorc::testing::GpuCount;

// A store shared by processes: one file per key in `dir` (written to a temporary name, then
// renamed, so a reader never sees half a value); Get polls.
class FileStore final : public RendezvousStore {
 public:
  explicit FileStore(std::string dir) : dir_(std::move(dir)) {}
  absl::Status Set(const std::string& key, const std::string& value) override {
    const std::string path = Path(key);
    const std::string tmp = absl::StrCat(path, ".tmp", getpid());
    {
      std::ofstream f(tmp, std::ios::binary);
      f.write(value.data(), static_cast<std::streamsize>(value.size()));
      if (!f) return absl::InternalError(absl::StrCat("cannot write ", tmp));
    }
    if (std::rename(tmp.c_str(), path.c_str()) != 0) {
      return absl::InternalError(absl::StrCat("cannot rename ", tmp));
    }
    return absl::OkStatus();
  }
  absl::StatusOr<std::string> Get(const std::string& key, absl::Duration timeout) override {
    const absl::Time deadline = absl::Now() + timeout;
    for (;;) {
      std::ifstream f(Path(key), std::ios::binary);
      if (f) {
        std::stringstream ss;
        ss << f.rdbuf();
        return ss.str();
      }
      if (absl::Now() >= deadline) {
        return absl::DeadlineExceededError(absl::StrCat("key '", key, "' not set within ",
                                                        absl::FormatDuration(timeout)));
      }
      absl::SleepFor(absl::Milliseconds(2));
    }
  }

 private:
  std::string Path(const std::string& key) const {
    std::string name = key;
    for (char& c : name) {
      if (c == '/') c = '_';
    }
    return absl::StrCat(dir_, "/", name);
  }
  std::string dir_;
};



std::vector<uint16_t> Reference(int c, int64_t count) {
  return kernels::OneShotAllReduceReference({AllReduceInputs(0, c, count), AllReduceInputs(1, c, count)});
}

uint64_t Hash(const std::vector<uint16_t>& v) {
  uint64_t h = 1469598103934665603ull;
  for (uint16_t x : v) h = (h ^ x) * 1099511628211ull;
  return h;
}

float Bf16(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// One bf16 ulp at the magnitude of `ref`.
float Ulp(uint16_t ref) {
  const uint16_t up = static_cast<uint16_t>((ref & 0x7fff) + 1);
  return std::fabs(Bf16(up) - Bf16(static_cast<uint16_t>(ref & 0x7fff)));
}

CommOptions Options(const std::string& group) { return ::lorc::testing::TestCommOptions(group); }

// Everything one rank does, in the same order on both ranks.
class RankRun {
 public:
  RankRun(int rank, std::string dir) : rank_(rank), dir_(std::move(dir)), store_(dir_) {}

  void Record(const std::string& name, const std::vector<uint16_t>& out) {
    hashes_ << name << " " << Hash(out) << "\n";
  }
  void WriteHashes() {
    std::ofstream f(absl::StrCat(dir_, "/hashes-", rank_, ".txt"));
    f << hashes_.str();
  }

  int rank_;
  std::string dir_;
  FileStore store_;
  std::stringstream hashes_;
};

// Fills `dev` with rank's inputs of case c, all-reduces `count` elements, checks against the
// reference (exact on the custom path, one ulp on NCCL's) and records the hash.
void CheckEager(RankRun& run, Communicator& comm, cudaStream_t stream, uint16_t* dev, int c,
                int64_t count, const std::string& want_algorithm) {
  const std::string name = absl::StrCat("eager case ", c, " count ", count);
  EXPECT_EQ(comm.AllReduceAlgorithm(count, DType::kBF16), want_algorithm) << name;
  const std::vector<uint16_t> in = AllReduceInputs(run.rank_, c, count);
  CUDA_ASSERT(cudaMemcpyAsync(dev, in.data(), count * 2, cudaMemcpyHostToDevice, stream));
  ASSERT_OK(comm.AllReduceSum(dev, count, DType::kBF16));
  ASSERT_OK(comm.Sync());
  std::vector<uint16_t> out(count);
  CUDA_ASSERT(cudaMemcpy(out.data(), dev, count * 2, cudaMemcpyDeviceToHost));
  const std::vector<uint16_t> ref = Reference(c, count);
  int64_t bad = 0;
  for (int64_t i = 0; i < count; ++i) {
    const bool ok = want_algorithm == "custom"
                        ? out[i] == ref[i]
                        : std::fabs(Bf16(out[i]) - Bf16(ref[i])) <= Ulp(ref[i]);
    if (!ok && ++bad <= 3) {
      ADD_FAILURE() << name << " rank " << run.rank_ << " element " << i << ": got 0x" << std::hex
                    << out[i] << ", reference 0x" << ref[i] << std::dec;
    }
  }
  EXPECT_EQ(bad, 0) << name;
  run.Record(name, out);
}

TEST(CustomAllReduceNcclRank, Body) {
  const char* rank_env = std::getenv(kRankEnv);
  const char* dir_env = std::getenv(kDirEnv);
  if (rank_env == nullptr || dir_env == nullptr) {
    GTEST_SKIP() << "runs as a child process of CustomAllReduceNcclTest.TwoProcesses";
  }
  const int rank = std::atoi(rank_env);
  RankRun run(rank, dir_env);
  CUDA_ASSERT(cudaSetDevice(rank));
  cudaStream_t stream = nullptr;
  CUDA_ASSERT(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));

  auto comm = CreateNcclCommunicator({rank, 2}, &run.store_, rank, stream, Options("car"));
  ASSERT_OK(comm);
  Communicator& c = **comm;
  ASSERT_THAT(c.AllReduceDescription(), StartsWith("custom one-shot for BF16 up to "))
      << "two GPUs of one host, one process each: the custom path must be on";
  const int64_t limit = static_cast<int64_t>(defaults::kCustomAllReduceMaxBytes / 2);  // elements
  EXPECT_THAT(c.AllReduceDescription(), HasSubstr(absl::StrCat(limit * 2, " bytes")));
  EXPECT_EQ(c.AllReduceAlgorithm(limit, DType::kF32), "nccl");
  EXPECT_EQ(c.AllReduceAlgorithm(0, DType::kBF16), "nccl");

  const int64_t biggest = limit + 8 * 1024 + 3;
  uint16_t* dev = nullptr;
  CUDA_ASSERT(cudaMalloc(&dev, (biggest + 8) * 2));

  // Sizes around the limit and odd sizes, eagerly; then a misaligned pointer (scalar accesses).
  int case_id = 0;
  for (int64_t count : {int64_t{1}, int64_t{7}, int64_t{8}, int64_t{9}, int64_t{8192},
                        int64_t{64} * 8192, int64_t{256} * 8192 + 3, limit - 1, limit}) {
    CheckEager(run, c, stream, dev, ++case_id, count, "custom");
  }
  for (int64_t count : {limit + 1, biggest}) {
    CheckEager(run, c, stream, dev, ++case_id, count, "nccl");  // the fallback above the limit
  }
  CheckEager(run, c, stream, dev + 1, ++case_id, 1001, "custom");

  // 300 back-to-back calls on distinct regions with distinct data (no sync in between): a rank
  // that overwrote its staging buffer while the peer still read it would corrupt some region.
  {
    constexpr int kCalls = 300;
    constexpr int64_t kCount = 8193;
    constexpr int64_t kStride = 8200;  // elements; 16-byte aligned regions
    uint16_t* many = nullptr;
    CUDA_ASSERT(cudaMalloc(&many, kCalls * kStride * 2));
    std::vector<uint16_t> host(kCalls * kStride, 0);
    for (int k = 0; k < kCalls; ++k) {
      const std::vector<uint16_t> in = AllReduceInputs(rank, 1000 + k, kCount);
      std::copy(in.begin(), in.end(), host.begin() + k * kStride);
    }
    CUDA_ASSERT(cudaMemcpy(many, host.data(), host.size() * 2, cudaMemcpyHostToDevice));
    for (int k = 0; k < kCalls; ++k) ASSERT_OK(c.AllReduceSum(many + k * kStride, kCount, DType::kBF16));
    ASSERT_OK(c.Sync());
    CUDA_ASSERT(cudaMemcpy(host.data(), many, host.size() * 2, cudaMemcpyDeviceToHost));
    int bad_calls = 0;
    for (int k = 0; k < kCalls; ++k) {
      const std::vector<uint16_t> ref = Reference(1000 + k, kCount);
      const std::vector<uint16_t> got(host.begin() + k * kStride, host.begin() + k * kStride + kCount);
      if (got != ref) ++bad_calls;
      run.Record(absl::StrCat("burst call ", k), got);
    }
    EXPECT_EQ(bad_calls, 0) << "of " << kCalls << " back-to-back calls on rank " << rank;
    CUDA_ASSERT(cudaFree(many));
  }

  // A captured graph: a custom call, the same buffer reduced again (x -> 2x, exact), a custom call
  // of one element and a call above the limit (NCCL inside the graph); replayed 4 times with new
  // inputs each time.
  {
    constexpr int64_t kA = 64 * 8192 + 5;
    uint16_t *a = nullptr, *one = nullptr;
    CUDA_ASSERT(cudaMalloc(&a, kA * 2));
    CUDA_ASSERT(cudaMalloc(&one, 16));
    const int64_t kBig = limit + 16;
    ASSERT_OK(c.Sync());
    CUDA_ASSERT(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
    absl::Status s1 = c.AllReduceSum(a, kA, DType::kBF16);
    absl::Status s2 = c.AllReduceSum(a, kA, DType::kBF16);
    absl::Status s3 = c.AllReduceSum(one, 1, DType::kBF16);
    absl::Status s4 = c.AllReduceSum(dev, kBig, DType::kBF16);
    cudaGraph_t graph = nullptr;
    CUDA_ASSERT(cudaStreamEndCapture(stream, &graph));
    ASSERT_OK(s1);
    ASSERT_OK(s2);
    ASSERT_OK(s3);
    ASSERT_OK(s4);
    cudaGraphExec_t exec = nullptr;
    CUDA_ASSERT(cudaGraphInstantiate(&exec, graph, 0));
    for (int replay = 0; replay < 4; ++replay) {
      const int ca = 2000 + replay, c1 = 2100 + replay, cb = 2200 + replay;
      const std::vector<uint16_t> in_a = AllReduceInputs(rank, ca, kA), in_1 = AllReduceInputs(rank, c1, 1),
                                  in_b = AllReduceInputs(rank, cb, kBig);
      CUDA_ASSERT(cudaMemcpyAsync(a, in_a.data(), kA * 2, cudaMemcpyHostToDevice, stream));
      CUDA_ASSERT(cudaMemcpyAsync(one, in_1.data(), 2, cudaMemcpyHostToDevice, stream));
      CUDA_ASSERT(cudaMemcpyAsync(dev, in_b.data(), kBig * 2, cudaMemcpyHostToDevice, stream));
      CUDA_ASSERT(cudaGraphLaunch(exec, stream));
      ASSERT_OK(c.Sync());
      std::vector<uint16_t> got_a(kA), got_1(1), got_b(kBig);
      CUDA_ASSERT(cudaMemcpy(got_a.data(), a, kA * 2, cudaMemcpyDeviceToHost));
      CUDA_ASSERT(cudaMemcpy(got_1.data(), one, 2, cudaMemcpyDeviceToHost));
      CUDA_ASSERT(cudaMemcpy(got_b.data(), dev, kBig * 2, cudaMemcpyDeviceToHost));
      // Second reduction of the same buffer: both ranks hold s, so the result is bf16(s + s) = 2s.
      std::vector<uint16_t> ref_a = Reference(ca, kA);
      ref_a = kernels::OneShotAllReduceReference({ref_a, ref_a});
      EXPECT_TRUE(got_a == ref_a) << "graph replay " << replay << ", custom x2, rank " << rank;
      EXPECT_EQ(got_1, Reference(c1, 1)) << "graph replay " << replay << ", one element";
      const std::vector<uint16_t> ref_b = Reference(cb, kBig);
      int64_t bad = 0;
      for (int64_t i = 0; i < kBig; ++i) {
        if (std::fabs(Bf16(got_b[i]) - Bf16(ref_b[i])) > Ulp(ref_b[i])) ++bad;
      }
      EXPECT_EQ(bad, 0) << "graph replay " << replay << ", NCCL above the limit";
      run.Record(absl::StrCat("graph replay ", replay, " a"), got_a);
      run.Record(absl::StrCat("graph replay ", replay, " one"), got_1);
      run.Record(absl::StrCat("graph replay ", replay, " big"), got_b);
    }
    CUDA_ASSERT(cudaGraphExecDestroy(exec));
    CUDA_ASSERT(cudaGraphDestroy(graph));
    CUDA_ASSERT(cudaFree(a));
    CUDA_ASSERT(cudaFree(one));
  }
  comm->reset();

  // --disable-custom-all-reduce on one rank turns the custom path off for the group.
  {
    CommOptions o = Options("car-mixed");
    o.disable_custom_all_reduce = rank == 0;
    auto mixed = CreateNcclCommunicator({rank, 2}, &run.store_, rank, stream, o);
    ASSERT_OK(mixed);
    EXPECT_EQ((*mixed)->AllReduceDescription(),
              "nccl (custom all-reduce off: rank 0: disabled (--disable-custom-all-reduce))");
    EXPECT_EQ((*mixed)->AllReduceAlgorithm(8192, DType::kBF16), "nccl");
    CheckEager(run, **mixed, stream, dev, ++case_id, 8192, "nccl");
  }

  // A peer that stops issuing calls: rank 0's barrier gives up after op_timeout / 2, reported by
  // Sync as DeadlineExceeded; the communicator is broken afterwards; nothing hangs.
  {
    CommOptions o = Options("car-stuck");
    o.op_timeout = absl::Seconds(3);
    auto stuck = CreateNcclCommunicator({rank, 2}, &run.store_, rank, stream, o);
    ASSERT_OK(stuck);
    ASSERT_OK((*stuck)->AllReduceSum(dev, 4096, DType::kBF16));  // together once
    ASSERT_OK((*stuck)->Sync());
    if (rank == 0) {
      const absl::Time start = absl::Now();
      absl::Status s = (*stuck)->AllReduceSum(dev, 4096, DType::kBF16);
      if (s.ok()) s = (*stuck)->Sync();
      EXPECT_THAT(s, StatusIs(absl::StatusCode::kDeadlineExceeded,
                              HasSubstr("custom all-reduce barrier timed out (a wait of more than 1.5s")));
      EXPECT_LT(absl::Now() - start, absl::Seconds(30));
      EXPECT_THAT((*stuck)->AllReduceSum(dev, 4096, DType::kBF16),
                  StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("broken")));
      ASSERT_OK(run.store_.Set("stuck-done", "1"));
    } else {
      ASSERT_OK(run.store_.Get("stuck-done", absl::Seconds(120)).status());
    }
  }
  run.WriteHashes();
  CUDA_ASSERT(cudaFree(dev));
  CUDA_ASSERT(cudaStreamDestroy(stream));
}

std::string ReadFile(const std::string& path) {
  std::ifstream f(path);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

TEST(CustomAllReduceNcclTest, TwoProcesses) {
  if (std::getenv(kRankEnv) != nullptr) GTEST_SKIP() << "the child runs RankBody only";
  if (GpuCount() < 2) GTEST_SKIP() << "needs 2 GPUs, found " << GpuCount();
  char tmpl[] = "/tmp/lorc-car-test-XXXXXX";
  ASSERT_NE(mkdtemp(tmpl), nullptr);
  const std::string dir = tmpl;
  std::vector<pid_t> pids;
  for (int rank = 0; rank < 2; ++rank) {
    const pid_t pid = fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      const std::string log = absl::StrCat(dir, "/rank", rank, ".log");
      const int fd = open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      if (fd >= 0) {
        dup2(fd, 1);
        dup2(fd, 2);
      }
      setenv(kRankEnv, std::to_string(rank).c_str(), 1);
      setenv(kDirEnv, dir.c_str(), 1);
      execl("/proc/self/exe", "custom_all_reduce_child", "--gtest_filter=CustomAllReduceNcclRank.Body",
            static_cast<char*>(nullptr));
      _exit(127);
    }
    pids.push_back(pid);
  }
  const absl::Time deadline = absl::Now() + absl::Seconds(240);
  std::vector<int> status(2, -1);
  for (int rank = 0; rank < 2; ++rank) {
    for (;;) {
      int st = 0;
      const pid_t r = waitpid(pids[rank], &st, WNOHANG);
      if (r == pids[rank]) {
        status[rank] = st;
        break;
      }
      if (absl::Now() > deadline) {
        kill(pids[0], SIGKILL);
        kill(pids[1], SIGKILL);
        waitpid(pids[rank], &st, 0);
        status[rank] = -2;
        break;
      }
      absl::SleepFor(absl::Milliseconds(20));
    }
  }
  for (int rank = 0; rank < 2; ++rank) {
    const std::string log = ReadFile(absl::StrCat(dir, "/rank", rank, ".log"));
    EXPECT_TRUE(WIFEXITED(status[rank]) && WEXITSTATUS(status[rank]) == 0)
        << "rank " << rank << (status[rank] == -2 ? " timed out" : " failed") << "; its log:\n" << log;
    EXPECT_THAT(log, HasSubstr("[  PASSED  ] 1 test")) << "rank " << rank << " ran no test";
  }
  const std::string h0 = ReadFile(absl::StrCat(dir, "/hashes-0.txt"));
  const std::string h1 = ReadFile(absl::StrCat(dir, "/hashes-1.txt"));
  EXPECT_GT(std::count(h0.begin(), h0.end(), '\n'), 300) << "hashes of rank 0:\n" << h0;
  EXPECT_EQ(h0, h1) << "the ranks' outputs differ (bit for bit)";
  std::filesystem::remove_all(dir);
}

#endif  // LORC_COMM_TEST_CUDA

}  // namespace
}  // namespace lorc
