// The host memory a process may still use: what the CPU backend reports as its device's free
// and total memory (Backend::GetMemoryInfo), and so what sizes a --kv-cache-mb check and refuses
// weights that cannot fit (model/weights.cc) before the lazily committed pages are touched.
//
// /proc/meminfo's MemAvailable and MemTotal (swap is not counted: weights served from swap are
// no use), each capped by the tightest cgroup memory limit on this process's path: a container's
// limit (Kubernetes) is invisible in /proc/meminfo, and a process over it is OOM-killed. cgroup v2
// (`memory.max`, `memory.current`) and v1 (`memory.limit_in_bytes`, `memory.usage_in_bytes`); a
// level's usage counts without its inactive file cache (`memory.stat` inactive_file / v1
// total_inactive_file, reclaimable), as the kubelet's working set does.
// Threads: none; reads files on each call (a few small reads).
#pragma once

#include <cstdint>
#include <string>

namespace lorc {

struct HostMemory {
  int64_t available_bytes = -1;  // -1: unknown
  int64_t total_bytes = -1;
  int64_t cgroup_limit_bytes = -1;  // the tightest limit found on the path, -1: none
};

// `proc` and `cgroup_root` are the mount points (tests point them at a fake tree).
HostMemory ReadHostMemory(const std::string& proc = "/proc", const std::string& cgroup_root = "/sys/fs/cgroup");

}  // namespace lorc
