// The custom all-reduce: a one-shot BF16 all-reduce through peer memory for small messages
// (kernels/one_shot_all_reduce.cuh), which the NCCL communicator uses in place of ncclAllReduce
// for BF16 messages of at most `max_bytes` (decode-sized activations, where NCCL's fixed latency
// dominates: docs/PERFORMANCE.md, "Llama-3-70B shape at TP = 2"). The design follows vLLM's
// custom all-reduce (a registered, peer-visible buffer per rank plus signal flags, exchanged
// once with cudaIpc handles, one-shot kernel), with the input copied into the registered buffer
// inside the kernel (as TensorRT-LLM's one-shot kernel does) so that any device pointer can be
// reduced in place and CUDA graphs need no buffer registration.
//
// Setup (Create) runs on every rank of the group, after the join: each rank allocates one device
// block (signals + staging buffer of max_bytes), zeroes it, and publishes through the rendezvous
// store its host name, pid, PCI bus id, device pointer and cudaIpcMemHandle_t. Then each rank maps
// every peer's block: a rank of the same process through its raw pointer after
// cudaDeviceEnablePeerAccess, a rank of another process with cudaIpcOpenMemHandle. Each rank
// publishes whether that worked, and the custom path is on only if it worked on every rank (so
// that all ranks always take the same path for the same message). Otherwise Create returns null
// and the reason (the caller logs it once and uses NCCL for everything).
//
// Threads: none of its own; Enqueue and TimedOut are called under the communicator's mutex.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "common/dtype.h"
#include "worker/comm/rendezvous.h"
#include "worker/comm/world_config.h"

namespace lorc {

class CustomAllReduce {
 public:
  struct Options {
    std::string group;        // rendezvous key prefix (the communicator's group)
    int device = 0;           // this rank's CUDA device, current while Create runs
    size_t max_bytes = 0;     // largest message taken; also the staging buffer's size
    bool disabled = false;    // --disable-custom-all-reduce: publish "disabled", take nothing
    absl::Duration barrier_timeout = absl::Seconds(300);  // per kernel barrier wait
    absl::Time deadline;      // for the store exchange
  };

  // Null plus `*why_not` when the custom path is off for the group (disabled on some rank, a
  // world size outside [2, 8], ranks on different hosts, no peer access, an IPC error, a
  // failed allocation: the message names the rank). Errors: the store's (e.g. DeadlineExceeded
  // when a rank never publishes).
  static absl::StatusOr<std::unique_ptr<CustomAllReduce>> Create(const WorldConfig& world,
                                                                 RendezvousStore* store,
                                                                 const Options& options,
                                                                 std::string* why_not);
  ~CustomAllReduce();
  CustomAllReduce(const CustomAllReduce&) = delete;
  CustomAllReduce& operator=(const CustomAllReduce&) = delete;

  // Whether a call takes the custom path: BF16 and 1 <= count, count * 2 <= max_bytes_for_world().
  // Depends on nothing rank-specific, so all ranks agree for the same call.
  bool Applies(size_t count, DType dtype) const;

  // Enqueues the in-place sum of `count` bf16 elements at `data` (device memory of this rank)
  // on `stream`. Requires Applies(). Returns the launch error.
  cudaError_t Enqueue(void* data, size_t count, cudaStream_t stream);

  // True once a kernel barrier waited longer than the barrier timeout (a peer died or stopped
  // issuing the same calls); the group is then unusable.
  bool TimedOut() const;

  // The message limit in bytes: max_bytes at world size 2; max_bytes / (world_size - 1) above,
  // so that the bytes each rank reads from its peers stay those measured at 2 (only world size 2
  // has been measured; docs/PERFORMANCE.md).
  size_t max_bytes_for_world() const { return limit_bytes_; }

 private:
  struct Mapped;
  CustomAllReduce() = default;

  WorldConfig world_;
  int device_ = 0;
  size_t limit_bytes_ = 0;
  absl::Duration barrier_timeout_;
  void* block_ = nullptr;           // this rank's signals + staging (cudaMalloc)
  volatile int* timed_out_ = nullptr;  // mapped pinned host memory
  int* timed_out_device_ = nullptr;    // its device alias
  std::unique_ptr<Mapped> mapped_;   // every rank's block as seen here
};

}  // namespace lorc
