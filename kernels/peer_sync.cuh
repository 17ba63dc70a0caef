// Device helpers for flags shared between GPUs (peer or IPC-mapped memory): system-scope release
// stores and acquire loads, and the global nanosecond timer that bounds a wait. For .cu files
// (and nvcc-compiled benchmarks) only.
#pragma once

#include <cstdint>

namespace lorc::kernels {

// Stores v to *p after every earlier memory access of this thread (and those ordered before it
// by a barrier) is visible to the whole system.
__device__ __forceinline__ void StoreReleaseSys(uint32_t* p, uint32_t v) {
  asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}
// Loads *p; later accesses of this thread see what the releasing writer saw.
__device__ __forceinline__ uint32_t LoadAcquireSys(const uint32_t* p) {
  uint32_t v;
  asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
// %globaltimer: nanoseconds, the same clock on every SM of the GPU.
__device__ __forceinline__ uint64_t GlobalTimerNs() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

}  // namespace lorc::kernels
