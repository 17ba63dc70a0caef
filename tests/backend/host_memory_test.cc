// backend/host_memory.h: MemAvailable / MemTotal capped by the tightest cgroup memory limit on the
// process's path (v2, v1, hybrid), usage counted without inactive file cache; a fake /proc and
// /sys/fs/cgroup tree per case.
#include "backend/host_memory.h"

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>

#include "gtest/gtest.h"

namespace lorc {
namespace {

namespace fs = std::filesystem;
constexpr int64_t kGiB = int64_t{1} << 30;

class HostMemoryTest : public ::testing::Test {
 protected:
  void SetUp() override {
    root_ = fs::temp_directory_path() /
            ("lorc_host_memory_" + std::to_string(::getpid()) + "_" +
             ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(root_);
    Write("proc/meminfo", "MemTotal:       33554432 kB\nMemFree:  1 kB\nMemAvailable:   16777216 kB\n");
  }
  void TearDown() override { fs::remove_all(root_); }
  void Write(const std::string& rel, const std::string& text) {
    const fs::path p = root_ / rel;
    fs::create_directories(p.parent_path());
    std::ofstream(p) << text;
  }
  HostMemory Read() { return ReadHostMemory((root_ / "proc").string(), (root_ / "cgroup").string()); }
  fs::path root_;
};

TEST_F(HostMemoryTest, MemInfoAloneWithoutACgroupLimit) {
  Write("proc/self/cgroup", "0::/\n");
  Write("cgroup/cgroup.controllers", "cpu memory\n");
  Write("cgroup/memory.max", "max\n");
  const HostMemory m = Read();
  EXPECT_EQ(m.total_bytes, 32 * kGiB);
  EXPECT_EQ(m.available_bytes, 16 * kGiB);
  EXPECT_EQ(m.cgroup_limit_bytes, -1);
}

// A pod's limit (v2, the unified hierarchy at the root): the tightest level on the path wins,
// usage less inactive file cache.
TEST_F(HostMemoryTest, CgroupV2LimitCapsTotalAndAvailable) {
  Write("proc/self/cgroup", "0::/kubepods/pod1/ctr\n");
  Write("cgroup/cgroup.controllers", "cpu memory\n");
  Write("cgroup/kubepods/memory.max", std::to_string(20 * kGiB) + "\n");
  Write("cgroup/kubepods/memory.current", std::to_string(1 * kGiB) + "\n");
  Write("cgroup/kubepods/pod1/memory.max", std::to_string(8 * kGiB) + "\n");
  Write("cgroup/kubepods/pod1/memory.current", std::to_string(5 * kGiB) + "\n");
  Write("cgroup/kubepods/pod1/memory.stat", "anon 1\nactive_file 7\ninactive_file " + std::to_string(2 * kGiB) + "\n");
  Write("cgroup/kubepods/pod1/ctr/memory.max", "max\n");
  const HostMemory m = Read();
  EXPECT_EQ(m.cgroup_limit_bytes, 8 * kGiB);
  EXPECT_EQ(m.total_bytes, 8 * kGiB);
  EXPECT_EQ(m.available_bytes, 5 * kGiB);  // 8 - (5 - 2)
}

// cgroup v1 (and hybrid: the memory controller's own mount): memory.limit_in_bytes, the root's
// unlimited 2^63 page-rounded value ignored; total_inactive_file subtracted, not inactive_file.
TEST_F(HostMemoryTest, CgroupV1MemoryControllerLimit) {
  Write("proc/self/cgroup", "9:pids:/\n4:cpu,memory:/job/42\n0::/\n");
  Write("cgroup/memory/memory.limit_in_bytes", "9223372036854771712\n");
  Write("cgroup/memory/job/42/memory.limit_in_bytes", std::to_string(4 * kGiB) + "\n");
  Write("cgroup/memory/job/42/memory.usage_in_bytes", std::to_string(3 * kGiB) + "\n");
  Write("cgroup/memory/job/42/memory.stat",
        "inactive_file 1\ntotal_inactive_file " + std::to_string(1 * kGiB) + "\n");
  const HostMemory m = Read();
  EXPECT_EQ(m.cgroup_limit_bytes, 4 * kGiB);
  EXPECT_EQ(m.total_bytes, 4 * kGiB);
  EXPECT_EQ(m.available_bytes, 2 * kGiB);
}

// A limit above what the host has left does not raise MemAvailable; usage over the limit leaves 0.
TEST_F(HostMemoryTest, TheSmallerOfHostAndCgroupAndNeverNegative) {
  Write("proc/self/cgroup", "0::/big\n");
  Write("cgroup/cgroup.controllers", "memory\n");
  Write("cgroup/big/memory.max", std::to_string(64 * kGiB) + "\n");
  Write("cgroup/big/memory.current", std::to_string(1 * kGiB) + "\n");
  HostMemory m = Read();
  EXPECT_EQ(m.total_bytes, 32 * kGiB);
  EXPECT_EQ(m.available_bytes, 16 * kGiB);
  Write("cgroup/big/memory.max", std::to_string(kGiB / 2) + "\n");
  m = Read();
  EXPECT_EQ(m.available_bytes, 0);
}

TEST_F(HostMemoryTest, MissingFilesLeaveUnknowns) {
  fs::remove(root_ / "proc/meminfo");
  const HostMemory m = Read();
  EXPECT_EQ(m.total_bytes, -1);
  EXPECT_EQ(m.available_bytes, -1);
  EXPECT_EQ(m.cgroup_limit_bytes, -1);
}

// This machine: the real files parse (values present, available within total).
TEST_F(HostMemoryTest, ThisMachine) {
  const HostMemory m = ReadHostMemory();
  ASSERT_GT(m.total_bytes, 0);
  EXPECT_GE(m.available_bytes, 0);
  EXPECT_LE(m.available_bytes, m.total_bytes);
}

}  // namespace
}  // namespace lorc
