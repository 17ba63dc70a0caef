// allreduce_bench's bridge to the engine's communicator (worker/comm), compiled by the host
// compiler (the bench itself is nvcc-compiled and includes no Abseil): one NCCL communicator per
// GPU of this process, made by CreateNcclCommunicator on threads over an in-process rendezvous
// store, with the custom all-reduce limit raised to `custom_max_bytes` so that every size runs
// the engine's one-shot kernel (in place, the input copied into the peer-visible buffer inside
// the kernel). Ranks of one process map each other's buffers by peer access, not CUDA IPC; the
// kernel is the one the workers run.
#pragma once

#include <cstddef>
#include <string>

namespace lorc::bench {

struct EngineComms;

// Null with `*error` set on failure; `*description` gets rank 0's AllReduceDescription().
EngineComms* CreateEngineComms(int n, void* const* streams, size_t custom_max_bytes,
                               std::string* description, std::string* error);
// Communicator g's AllReduceSum of `count` bf16 elements at `data` (in place); "" or the error.
std::string EngineAllReduceBf16(EngineComms* comms, int g, void* data, size_t count);
void DestroyEngineComms(EngineComms* comms);

}  // namespace lorc::bench
