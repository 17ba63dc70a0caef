// Collective communication between the ranks of a tensor-parallel group.
//
// One Communicator per rank (per process or per thread); backends: Gloo over TCP for host memory,
// NCCL for device memory. Construction runs the join protocol of rendezvous.h first, so a rank
// that never shows up yields DeadlineExceeded naming it instead of a silent hang.
//
// Calls on one Communicator are serialized internally (one collective at a time). Every rank must
// issue the same sequence of collectives with the same sizes (and the same root). After a backend
// failure (peer death, timeout, NCCL async error) a communicator is broken for good: that call
// returns the error and every later call returns FailedPrecondition carrying it; re-create the
// group (under a new group name) to recover.
#pragma once

#include <cstddef>
#include <memory>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "common/defaults.h"
#include "common/dtype.h"
#include "worker/comm/rendezvous.h"
#include "worker/comm/world_config.h"

namespace lorc {

class Communicator {
 public:
  Communicator() = default;
  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;
  virtual ~Communicator() = default;

  virtual const WorldConfig& world() const = 0;
  virtual std::string_view backend_name() const = 0;  // "gloo" / "nccl"

  // In-place sum over ranks of `count` elements of `dtype` (F32, F16, BF16; summed in that
  // dtype). Gloo: host memory, returns when done; BF16 is Unimplemented (Gloo has no bf16 sum;
  // the CPU backend computes in F32). NCCL: device memory, enqueued on the stream given at
  // creation; returns once enqueued, and errors of the asynchronous part are reported by the
  // next call or by Sync().
  // NCCL: BF16 messages of at most the custom all-reduce limit (CommOptions) take the one-shot
  // peer-memory path instead (custom_all_reduce.h): the same result on every rank, bit for bit,
  // the fp32 sum in rank order rounded once to bf16; its errors (a peer that stopped issuing the
  // same calls: DeadlineExceeded after op_timeout) are reported like NCCL's asynchronous ones.
  virtual absl::Status AllReduceSum(void* data, size_t count, DType dtype) = 0;
  absl::Status AllReduceSum(float* data, size_t count) { return AllReduceSum(data, count, DType::kF32); }

  // The path AllReduceSum takes for `count` elements of `dtype`: "custom" (the one-shot
  // peer-memory all-reduce) or the backend's name. The same on every rank.
  virtual std::string_view AllReduceAlgorithm(size_t count, DType dtype) const {
    return backend_name();
  }
  // For logs and benchmark records: the paths AllReduceSum takes, e.g. "custom one-shot for BF16
  // up to 8388608 bytes, nccl above" or "nccl (custom all-reduce off: <why>)".
  virtual std::string AllReduceDescription() const { return std::string(backend_name()); }

  // `recv` holds world_size * count elements of `dtype`; rank r's `count` elements land at
  // recv + r * count. `send` and `recv` must not overlap.
  virtual absl::Status AllGather(const void* send, void* recv, size_t count, DType dtype) = 0;
  absl::Status AllGather(const float* send, float* recv, size_t count) {
    return AllGather(send, recv, count, DType::kF32);
  }

  // In place: `bytes` bytes at `data` on rank `root` are copied to `data` on every rank.
  virtual absl::Status Broadcast(void* data, size_t bytes, int root) = 0;

  // Returns on each rank once every rank has entered the barrier (NCCL: host-blocking, and all
  // work enqueued earlier on the stream has completed).
  virtual absl::Status Barrier() = 0;

  // Waits until every collective issued so far has completed, bounded by the op timeout
  // (DeadlineExceeded, and the communicator is aborted). NCCL: synchronizes the stream given at
  // creation (so also any other work on it) and reports asynchronous errors. Synchronous
  // backends (Gloo) need not override it.
  virtual absl::Status Sync() { return absl::OkStatus(); }
};

struct CommOptions {
  // Bounds the whole construction: arrival of all ranks plus the backend's own setup (Gloo TCP
  // connections, NCCL communicator init).
  absl::Duration join_timeout = absl::Seconds(60);
  // Bounds every collective (Gloo: each call; NCCL: Sync()/Barrier() and every non-blocking NCCL
  // call).
  absl::Duration op_timeout = absl::Seconds(300);
  // Prefix of every rendezvous key ("<group>/..."); distinct communicators sharing a store need
  // distinct group names.
  std::string group = "tp";
  // NCCL only. --disable-custom-all-reduce (vLLM's name): every all-reduce through NCCL. Left
  // false, BF16 all-reduces of at most custom_all_reduce_max_bytes take the one-shot peer-memory
  // path when every rank can map every other rank's memory (same host, peer access or CUDA IPC);
  // when some rank cannot, NCCL takes everything and the reason is logged once. Must be the same
  // on every rank (a rank that disables it turns it off for the group).
  bool disable_custom_all_reduce = false;
  size_t custom_all_reduce_max_bytes = defaults::kCustomAllReduceMaxBytes;
  // Gloo TCP only: where this rank listens and what it advertises to its peers. Either the name
  // of a local network interface (e.g. "eth0"; its address is used) or a hostname / IP address
  // (e.g. "10.0.0.5", "127.0.0.1"). Empty: this machine's hostname, resolved with getaddrinfo
  // (Gloo's own default). That is right for a cluster whose hostnames resolve to routable
  // addresses, but note that many distributions map the hostname to 127.0.1.1, which only works
  // when all ranks share a host; multi-node deployments should set this explicitly. Tests use
  // "127.0.0.1".
  std::string hostname_or_iface;
};

// Host-memory communicator over Gloo's TCP transport. `store` is used during construction only.
absl::StatusOr<std::unique_ptr<Communicator>> CreateGlooCommunicator(const WorldConfig& world,
                                                                     RendezvousStore* store,
                                                                     const CommOptions& options);

// Device-memory communicator over NCCL, for GPU `cuda_device`, enqueuing on `cuda_stream` (a
// cudaStream_t passed as void*; nullptr = the legacy default stream; the stream must outlive the
// communicator). `store` is used during construction only. Unimplemented when built without
// CUDA. The calling thread's current CUDA device is left as it was.
absl::StatusOr<std::unique_ptr<Communicator>> CreateNcclCommunicator(const WorldConfig& world,
                                                                     RendezvousStore* store,
                                                                     int cuda_device,
                                                                     void* cuda_stream,
                                                                     const CommOptions& options);

}  // namespace lorc
