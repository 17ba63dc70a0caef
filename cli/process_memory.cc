#include "cli/process_memory.h"

#include <cstdlib>
#include <cstring>

#if defined(__GLIBC__)
#include <malloc.h>
#endif

namespace lorc::cli {

void UseFixedMmapThreshold() {
#if defined(__GLIBC__)
  constexpr int kThresholdBytes = 1 << 20;
  (void)mallopt(M_MMAP_THRESHOLD, kThresholdBytes);
#endif
}

void LimitMallocArenas() {
#if defined(__GLIBC__)
  constexpr int kCoordinatorMallocArenas = 4;
  const char* tunables = std::getenv("GLIBC_TUNABLES");
  if (std::getenv("MALLOC_ARENA_MAX") != nullptr ||
      (tunables != nullptr && std::strstr(tunables, "glibc.malloc.arena_max") != nullptr)) {
    return;  // the operator's choice
  }
  (void)mallopt(M_ARENA_MAX, kCoordinatorMallocArenas);
#endif
}

}  // namespace lorc::cli
