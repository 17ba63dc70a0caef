// One-shot BF16 all-reduce through peer memory; see one_shot_all_reduce.cuh for the algorithm.
#include <cuda_bf16.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "kernels/one_shot_all_reduce.cuh"
#include "kernels/peer_sync.cuh"

namespace lorc::kernels {
namespace {

constexpr int kVecElems = 8;  // bf16 elements per 16-byte unit

struct Pointers {
  OneShotSignal* signals[kOneShotMaxRanks];
  const __nv_bfloat16* staging[kOneShotMaxRanks];
};

// Block b of this rank meets block b of every rank: thread r < n stores `epoch` into rank r's
// slot for this rank, then waits until rank r has stored `epoch` (or later) into this rank's slot
// for r. The block's earlier writes are ordered before the release by the __syncthreads that
// precedes it; the acquire plus the __syncthreads that follows orders the block's later reads
// after the peers' writes. Epochs are compared modulo 2^32 (ranks never drift 2^31 calls apart).
// Returns false (and flags the timeout) when some wait exceeded `timeout_ns`.
__device__ bool BlockBarrier(const Pointers& p, int rank, int n, bool end, uint32_t epoch,
                             uint64_t timeout_ns, volatile int* timed_out, int* block_failed) {
  const int b = blockIdx.x;
  const int r = threadIdx.x;
  __syncthreads();
  if (r < n && *block_failed == 0) {
    OneShotSignal* peer = p.signals[r];
    StoreReleaseSys(end ? &peer->end[b][rank] : &peer->start[b][rank], epoch);
    const uint32_t* mine = end ? &p.signals[rank]->end[b][r] : &p.signals[rank]->start[b][r];
    const uint64_t t0 = GlobalTimerNs();
    while (static_cast<int32_t>(LoadAcquireSys(mine) - epoch) < 0) {
      if (GlobalTimerNs() - t0 > timeout_ns) {
        *timed_out = 1;
        atomicExch(block_failed, 1);
        break;
      }
    }
  }
  __syncthreads();
  return *block_failed == 0;
}

// N > 0: the world size at compile time; N == 0: `n` at run time.
template <int N>
__global__ void __launch_bounds__(kOneShotThreads)
    OneShotAllReduceKernel(Pointers p, int rank, int n, __nv_bfloat16* data, bool aligned,
                           int64_t count, uint64_t timeout_ns, volatile int* timed_out) {
  if constexpr (N > 0) n = N;
  __shared__ uint32_t epoch_s;
  __shared__ int failed_s;
  if (threadIdx.x == 0) {
    epoch_s = p.signals[rank]->epoch[blockIdx.x] + 1;
    failed_s = 0;
  }
  __syncthreads();
  const uint32_t epoch = epoch_s;
  const int64_t full = count / kVecElems;        // whole 16-byte units
  const int64_t units = (count + kVecElems - 1) / kVecElems;  // plus a partial one
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  __nv_bfloat16* mine = const_cast<__nv_bfloat16*>(p.staging[rank]);

  // 1. This block's units of `data` into this rank's staging buffer.
  for (int64_t u = first; u < units; u += stride) {
    if (u < full && aligned) {
      __stcg(reinterpret_cast<uint4*>(mine) + u, *(reinterpret_cast<const uint4*>(data) + u));
    } else {
      const int64_t end = u < full ? (u + 1) * kVecElems : count;
      for (int64_t i = u * kVecElems; i < end; ++i) mine[i] = data[i];
    }
  }
  // 2. Every rank's block b has staged the same units.
  if (BlockBarrier(p, rank, n, /*end=*/false, epoch, timeout_ns, timed_out, &failed_s)) {
    // 3. Sum in rank order, fp32, one rounding.
    for (int64_t u = first; u < units; u += stride) {
      if (u < full) {
        uint4 v[N > 0 ? N : kOneShotMaxRanks];
#pragma unroll
        for (int r = 0; r < (N > 0 ? N : kOneShotMaxRanks); ++r) {
          if (N > 0 || r < n) v[r] = __ldcg(reinterpret_cast<const uint4*>(p.staging[r]) + u);
        }
        float acc[kVecElems];
        {
          const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v[0]);
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            const float2 f = __bfloat1622float2(h[k]);
            acc[2 * k] = f.x;
            acc[2 * k + 1] = f.y;
          }
        }
#pragma unroll
        for (int r = 1; r < (N > 0 ? N : kOneShotMaxRanks); ++r) {
          if (N > 0 || r < n) {
            const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v[r]);
#pragma unroll
            for (int k = 0; k < 4; ++k) {
              const float2 f = __bfloat1622float2(h[k]);
              acc[2 * k] = __fadd_rn(acc[2 * k], f.x);
              acc[2 * k + 1] = __fadd_rn(acc[2 * k + 1], f.y);
            }
          }
        }
        uint4 o;
        __nv_bfloat162* oh = reinterpret_cast<__nv_bfloat162*>(&o);
#pragma unroll
        for (int k = 0; k < 4; ++k) oh[k] = __floats2bfloat162_rn(acc[2 * k], acc[2 * k + 1]);
        if (aligned) {
          reinterpret_cast<uint4*>(data)[u] = o;
        } else {
          const __nv_bfloat16* e = reinterpret_cast<const __nv_bfloat16*>(&o);
          for (int k = 0; k < kVecElems; ++k) data[u * kVecElems + k] = e[k];
        }
      } else {
        for (int64_t i = u * kVecElems; i < count; ++i) {
          float acc = __bfloat162float(__ldcg(p.staging[0] + i));
          for (int r = 1; r < n; ++r) acc = __fadd_rn(acc, __bfloat162float(__ldcg(p.staging[r] + i)));
          data[i] = __float2bfloat16_rn(acc);
        }
      }
    }
  }
  // 4. Nobody reads this rank's staging buffer any more (skipped once a barrier failed).
  BlockBarrier(p, rank, n, /*end=*/true, epoch, timeout_ns, timed_out, &failed_s);
  if (threadIdx.x == 0) p.signals[rank]->epoch[blockIdx.x] = epoch;
}

bool Aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

}  // namespace

int OneShotAllReduceBlocks(int64_t count) {
  const int64_t units = (count + kVecElems - 1) / kVecElems;
  return static_cast<int>(
      std::clamp<int64_t>((units + kOneShotThreads - 1) / kOneShotThreads, 1, kOneShotMaxBlocks));
}

cudaError_t LaunchOneShotAllReduceBf16(const OneShotAllReduceArgs& a, cudaStream_t stream) {
  if (a.world_size < 2 || a.world_size > kOneShotMaxRanks || a.rank < 0 || a.rank >= a.world_size ||
      a.data == nullptr || a.timed_out == nullptr || a.count < 0) {
    return cudaErrorInvalidValue;
  }
  Pointers p{};
  for (int r = 0; r < a.world_size; ++r) {
    if (a.signals[r] == nullptr || a.staging[r] == nullptr || !Aligned16(a.staging[r])) {
      return cudaErrorInvalidValue;
    }
    p.signals[r] = a.signals[r];
    p.staging[r] = static_cast<const __nv_bfloat16*>(a.staging[r]);
  }
  if (a.count == 0) return cudaSuccess;
  const int blocks = OneShotAllReduceBlocks(a.count);
  auto* data = static_cast<__nv_bfloat16*>(a.data);
  const bool aligned = Aligned16(a.data);
  if (a.world_size == 2) {
    OneShotAllReduceKernel<2><<<blocks, kOneShotThreads, 0, stream>>>(
        p, a.rank, 2, data, aligned, a.count, a.timeout_ns, a.timed_out);
  } else {
    OneShotAllReduceKernel<0><<<blocks, kOneShotThreads, 0, stream>>>(
        p, a.rank, a.world_size, data, aligned, a.count, a.timeout_ns, a.timed_out);
  }
  return cudaGetLastError();
}

std::vector<uint16_t> OneShotAllReduceReference(const std::vector<std::vector<uint16_t>>& inputs) {
  if (inputs.empty()) return {};
  const size_t count = inputs[0].size();
  auto to_f32 = [](uint16_t v) {
    const uint32_t bits = static_cast<uint32_t>(v) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    return f;
  };
  std::vector<uint16_t> out(count);
  for (size_t i = 0; i < count; ++i) {
    float acc = to_f32(inputs[0][i]);
    for (size_t r = 1; r < inputs.size(); ++r) acc += to_f32(inputs[r][i]);
    uint32_t bits;
    std::memcpy(&bits, &acc, sizeof(bits));
    if ((bits & 0x7fffffffu) > 0x7f800000u) {
      out[i] = static_cast<uint16_t>((bits >> 16) | 0x40);  // NaN stays NaN
    } else {
      out[i] = static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
    }
  }
  return out;
}

}  // namespace lorc::kernels
