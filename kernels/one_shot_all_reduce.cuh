// One-shot all-reduce of BF16 through peer memory (kernels/one_shot_all_reduce.cu): the small-
// message path of the NCCL communicator's AllReduceSum (worker/comm/custom_all_reduce.h sets it
// up: buffers shared by cudaIpc handles or, for ranks in one process, by peer access).
// Framework-free: plain CUDA runtime types.
//
// Algorithm (the one-shot / "1-stage" scheme of vLLM's csrc/custom_all_reduce.cuh and
// TensorRT-LLM's oneShotAllReduceKernel, written anew here): every rank launches the same grid
// for the same `count`; block b of every rank owns the same elements (grid-stride over 16-byte
// units of 8 elements). Block b
//   1. copies its elements of this rank's `data` into this rank's staging buffer,
//   2. meets block b of every other rank at a flag barrier (release stores of an epoch into each
//      peer's signal slot, acquire loads of its own slots),
//   3. reads its elements from every rank's staging buffer, rank 0 first, sums them in fp32 and
//      writes the bf16 (round to nearest even) sum into `data` (in place),
//   4. meets block b of every rank again (no rank reads this rank's staging buffer any more, so
//      the next call may overwrite it), then records the epoch.
// Every rank adds the same values in the same (rank) order with the same fp32 operations, so all
// ranks hold bit-identical results, equal to the host reference OneShotAllReduceReference.
//
// Graph capture: no host-side state changes per call (the epochs live in each rank's signal
// memory, advanced by the kernel), so a captured call replays correctly any number of times, as
// long as every rank replays the same sequence of calls with the same counts.
//
// Barriers never hang: a wait longer than `timeout_ns` (globaltimer) stores 1 into `*timed_out`
// and the kernel runs to its end with undefined results; the caller must then treat the group as
// broken (the epochs no longer agree).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <vector>

namespace lorc::kernels {

inline constexpr int kOneShotMaxRanks = 8;
inline constexpr int kOneShotMaxBlocks = 128;  // <= the SMs of the GPUs it runs on: all resident
inline constexpr int kOneShotThreads = 256;

// One per rank, in that rank's device memory, zeroed before first use; written by every rank.
// start/end[b][r]: the epoch at which rank r's block b arrived at the barrier before / after the
// reads; epoch[b]: calls that block b of this rank has completed.
struct OneShotSignal {
  uint32_t start[kOneShotMaxBlocks][kOneShotMaxRanks];
  uint32_t end[kOneShotMaxBlocks][kOneShotMaxRanks];
  uint32_t epoch[kOneShotMaxBlocks];
};

struct OneShotAllReduceArgs {
  int rank = 0;
  int world_size = 0;  // 2..kOneShotMaxRanks
  // Indexed by rank, as mapped into this process (this rank's entries are its own pointers).
  OneShotSignal* signals[kOneShotMaxRanks] = {};
  void* staging[kOneShotMaxRanks] = {};  // >= count * 2 bytes each, 16-byte aligned
  void* data = nullptr;  // this rank's bf16 [count], in and out (16-byte aligned: vector accesses)
  int64_t count = 0;                     // elements; any count >= 0 (a tail of < 8 is handled)
  uint64_t timeout_ns = 0;               // per barrier wait
  volatile int* timed_out = nullptr;     // device-visible (e.g. mapped host memory); set to 1
};

// Blocks of kOneShotThreads that a call of `count` elements launches (1..kOneShotMaxBlocks).
int OneShotAllReduceBlocks(int64_t count);

// cudaErrorInvalidValue for a world size outside [2, kOneShotMaxRanks], a rank outside it, a
// null pointer or a staging pointer that is not 16-byte aligned; otherwise the launch's
// error. count == 0 launches nothing.
cudaError_t LaunchOneShotAllReduceBf16(const OneShotAllReduceArgs& args, cudaStream_t stream);

// The CPU reference: out[i] = bf16((in_0[i] + in_1[i]) + ... + in_{n-1}[i]) with the sums in
// fp32 and one round to nearest even at the end; inputs and output are bf16 bit patterns.
std::vector<uint16_t> OneShotAllReduceReference(const std::vector<std::vector<uint16_t>>& inputs);

}  // namespace lorc::kernels
