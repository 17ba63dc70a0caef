// Setup and use of the one-shot peer-memory all-reduce; see custom_all_reduce.h.
#include "worker/comm/custom_all_reduce.h"

#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status_macros.h"
#include "kernels/one_shot_all_reduce.cuh"

namespace lorc {
namespace {

constexpr size_t kSignalBytes = (sizeof(kernels::OneShotSignal) + 255) / 256 * 256;

// What a rank publishes about its block (fixed layout, memcpy'd; all ranks run this binary).
struct Published {
  char host[256];
  char bus_id[32];
  int64_t pid;
  int32_t device;
  uint64_t block;  // device pointer in the publisher's address space
  cudaIpcMemHandle_t handle;
};

std::string CudaText(cudaError_t e) {
  return absl::StrCat(cudaGetErrorName(e), " (", cudaGetErrorString(e), ")");
}

// Gets rank r's value under `name` ("<group>/car/<name>/<r>") for every rank r.
absl::StatusOr<std::vector<std::string>> GetAll(RendezvousStore* store, const std::string& group,
                                                const std::string& name, int world_size,
                                                absl::Time deadline) {
  std::vector<std::string> values(world_size);
  for (int r = 0; r < world_size; ++r) {
    absl::StatusOr<std::string> v =
        store->Get(GroupKey(group, absl::StrCat("car/", name, "/", r)),
                   std::max(deadline - absl::Now(), absl::ZeroDuration()));
    if (!v.ok()) {
      return absl::Status(v.status().code(),
                          absl::StrCat(group, " group: custom all-reduce setup: rank ", r,
                                       " did not publish its ", name, ": ", v.status().message()));
    }
    values[r] = *std::move(v);
  }
  return values;
}

}  // namespace

// Every rank's signals and staging buffer, as addressed from this process.
struct CustomAllReduce::Mapped {
  kernels::OneShotAllReduceArgs args;  // rank, world size, signals, staging, timeout, flag
  std::vector<void*> ipc_opened;       // to cudaIpcCloseMemHandle
};

absl::StatusOr<std::unique_ptr<CustomAllReduce>> CustomAllReduce::Create(
    const WorldConfig& world, RendezvousStore* store, const Options& options, std::string* why_not) {
  const std::string& group = options.group;
  const int n = world.world_size;
  std::unique_ptr<CustomAllReduce> car(new CustomAllReduce());
  car->world_ = world;
  car->device_ = options.device;
  car->barrier_timeout_ = options.barrier_timeout;
  car->limit_bytes_ = n > 1 ? options.max_bytes / static_cast<size_t>(n - 1) / 16 * 16 : 0;
  car->mapped_ = std::make_unique<Mapped>();

  // Phase 1: this rank's block, or why not.
  std::string local_problem;
  Published me{};
  if (options.disabled) {
    local_problem = "disabled (--disable-custom-all-reduce)";
  } else if (n < 2 || n > kernels::kOneShotMaxRanks) {
    local_problem = absl::StrCat("world size ", n, " is outside [2, ", kernels::kOneShotMaxRanks, "]");
  } else if (options.max_bytes < 16) {
    local_problem = absl::StrCat("message limit of ", options.max_bytes, " bytes");
  } else {
    const size_t bytes = kSignalBytes + options.max_bytes;
    void* block = nullptr;
    cudaError_t e = cudaMalloc(&block, bytes);
    if (e == cudaSuccess) car->block_ = block;
    if (e == cudaSuccess) e = cudaMemset(block, 0, bytes);
    if (e == cudaSuccess) e = cudaDeviceSynchronize();  // zeroed before any peer can see it
    if (e == cudaSuccess) e = cudaIpcGetMemHandle(&me.handle, block);
    void* host_flag = nullptr;
    if (e == cudaSuccess) e = cudaHostAlloc(&host_flag, sizeof(int), cudaHostAllocMapped);
    if (e == cudaSuccess) {
      car->timed_out_ = static_cast<volatile int*>(host_flag);
      *car->timed_out_ = 0;
      e = cudaHostGetDevicePointer(reinterpret_cast<void**>(&car->timed_out_device_), host_flag, 0);
    }
    if (e == cudaSuccess) e = cudaDeviceGetPCIBusId(me.bus_id, sizeof(me.bus_id), options.device);
    if (e != cudaSuccess) {
      (void)cudaGetLastError();
      local_problem = absl::StrCat("setting up the peer-visible buffer on cuda device ",
                                   options.device, " failed: ", CudaText(e));
    }
    gethostname(me.host, sizeof(me.host) - 1);
    me.pid = static_cast<int64_t>(getpid());
    me.device = options.device;
    me.block = reinterpret_cast<uintptr_t>(block);
  }
  const std::string key_block = GroupKey(group, absl::StrCat("car/block/", world.rank));
  if (local_problem.empty()) {
    RETURN_IF_ERROR(store->Set(key_block, absl::StrCat("1", std::string(reinterpret_cast<const char*>(&me), sizeof(me)))));
  } else {
    RETURN_IF_ERROR(store->Set(key_block, absl::StrCat("0", local_problem)));
  }
  ASSIGN_OR_RETURN(std::vector<std::string> blocks, GetAll(store, group, "block", n, options.deadline));

  // Phase 2: map every peer's block (only when every rank has one), then agree.
  std::vector<Published> all(n);
  std::vector<std::string> problems;
  for (int r = 0; r < n; ++r) {
    if (blocks[r].empty() || blocks[r][0] != '1' || blocks[r].size() != 1 + sizeof(Published)) {
      problems.push_back(absl::StrCat("rank ", r, ": ", blocks[r].empty() ? "nothing published" : blocks[r].substr(1)));
      continue;
    }
    std::memcpy(&all[r], blocks[r].data() + 1, sizeof(Published));
  }
  if (problems.empty()) {
    kernels::OneShotAllReduceArgs& a = car->mapped_->args;
    a.rank = world.rank;
    a.world_size = n;
    a.timed_out = car->timed_out_device_;
    a.timeout_ns = static_cast<uint64_t>(
        std::min(absl::ToInt64Nanoseconds(options.barrier_timeout), int64_t{1} << 62));
    for (int r = 0; r < n && problems.empty(); ++r) {
      void* base = nullptr;
      if (r == world.rank) {
        base = car->block_;
      } else if (std::strncmp(all[r].host, me.host, sizeof(me.host)) != 0) {
        problems.push_back(absl::StrCat("rank ", r, " runs on host '", all[r].host, "', rank ",
                                        world.rank, " on '", me.host, "'"));
      } else {
        // The peer's device as numbered in this process (absent: not visible here).
        int peer_device = -1;
        if (cudaDeviceGetByPCIBusId(&peer_device, all[r].bus_id) != cudaSuccess) {
          (void)cudaGetLastError();
          peer_device = -1;
        }
        int can = 1;
        if (peer_device >= 0 && peer_device != options.device &&
            cudaDeviceCanAccessPeer(&can, options.device, peer_device) == cudaSuccess && !can) {
          problems.push_back(absl::StrCat("cuda device ", options.device, " (rank ", world.rank,
                                          ") cannot access the memory of device ", peer_device,
                                          " (rank ", r, ", bus ", all[r].bus_id, ") as a peer"));
        } else if (all[r].pid == me.pid) {
          // A rank of this process: its pointer is valid here once peer access is on.
          cudaError_t e = peer_device >= 0 && peer_device != options.device
                              ? cudaDeviceEnablePeerAccess(peer_device, 0)
                              : cudaSuccess;
          if (e == cudaErrorPeerAccessAlreadyEnabled) e = cudaSuccess;
          (void)cudaGetLastError();
          if (e != cudaSuccess || peer_device < 0) {
            problems.push_back(absl::StrCat("enabling peer access from device ", options.device,
                                            " to rank ", r, "'s device failed: ",
                                            peer_device < 0 ? "device not found" : CudaText(e)));
          } else {
            base = reinterpret_cast<void*>(static_cast<uintptr_t>(all[r].block));
          }
        } else {
          const cudaError_t e = cudaIpcOpenMemHandle(&base, all[r].handle, cudaIpcMemLazyEnablePeerAccess);
          if (e != cudaSuccess) {
            (void)cudaGetLastError();
            problems.push_back(absl::StrCat("cudaIpcOpenMemHandle of rank ", r,
                                            "'s buffer failed on rank ", world.rank, ": ", CudaText(e)));
            base = nullptr;
          } else {
            car->mapped_->ipc_opened.push_back(base);
          }
        }
      }
      if (base != nullptr) {
        a.signals[r] = static_cast<kernels::OneShotSignal*>(base);
        a.staging[r] = static_cast<char*>(base) + kSignalBytes;
      }
    }
  }
  const std::string key_open = GroupKey(group, absl::StrCat("car/open/", world.rank));
  RETURN_IF_ERROR(store->Set(key_open, problems.empty() ? "1" : absl::StrCat("0", absl::StrJoin(problems, "; "))));
  ASSIGN_OR_RETURN(std::vector<std::string> opened, GetAll(store, group, "open", n, options.deadline));
  std::vector<std::string> remote;
  for (int r = 0; r < n; ++r) {
    if (opened[r] != "1") remote.push_back(opened[r].empty() ? absl::StrCat("rank ", r, ": ?") : opened[r].substr(1));
  }
  if (!remote.empty()) {
    // Deduplicated: every rank reports a rank that published nothing.
    std::sort(remote.begin(), remote.end());
    remote.erase(std::unique(remote.begin(), remote.end()), remote.end());
    if (why_not != nullptr) *why_not = absl::StrJoin(remote, "; ");
    return std::unique_ptr<CustomAllReduce>();  // the destructor of `car` frees what it holds
  }
  return car;
}

CustomAllReduce::~CustomAllReduce() {
  if (mapped_ != nullptr) {
    for (void* p : mapped_->ipc_opened) cudaIpcCloseMemHandle(p);
  }
  if (block_ != nullptr) cudaFree(block_);
  if (timed_out_ != nullptr) cudaFreeHost(const_cast<int*>(timed_out_));
}

bool CustomAllReduce::Applies(size_t count, DType dtype) const {
  return dtype == DType::kBF16 && count >= 1 && count <= limit_bytes_ / 2;
}

cudaError_t CustomAllReduce::Enqueue(void* data, size_t count, cudaStream_t stream) {
  kernels::OneShotAllReduceArgs a = mapped_->args;
  a.data = data;
  a.count = static_cast<int64_t>(count);
  return kernels::LaunchOneShotAllReduceBf16(a, stream);
}

bool CustomAllReduce::TimedOut() const { return timed_out_ != nullptr && *timed_out_ != 0; }

}  // namespace lorc
