#include "kernels/pdl.cuh"

#include <atomic>

#include "common/env_switch.h"

namespace lorc::kernels {
namespace {

constexpr int kMaxDevices = 64;
// Per device: 0 undecided, 1 on, 2 off.
std::atomic<int> g_state[kMaxDevices];

bool DisabledByEnv() { return EnvFlag("LORC_DISABLE_PDL", false); }

}  // namespace

bool PdlEnabled() {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= kMaxDevices) {
    cudaGetLastError();
    return false;
  }
  int s = g_state[dev].load(std::memory_order_relaxed);
  if (s == 0) {
    int major = 0;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) {
      cudaGetLastError();
      major = 0;
    }
    s = major >= 9 && !DisabledByEnv() ? 1 : 2;
    g_state[dev].store(s, std::memory_order_relaxed);
  }
  return s == 1;
}

}  // namespace lorc::kernels
