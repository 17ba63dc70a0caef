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
  // The operator's choice wins: a MALLOC_ARENA_MAX glibc accepts (a positive number; it ignores
  // an empty or zero one), or glibc.malloc.arena_max in GLIBC_TUNABLES.
  const char* env = std::getenv("MALLOC_ARENA_MAX");
  const char* tunables = std::getenv("GLIBC_TUNABLES");
  if ((env != nullptr && std::strtol(env, nullptr, 10) > 0) ||
      (tunables != nullptr && std::strstr(tunables, "glibc.malloc.arena_max=") != nullptr)) {
    return;
  }
  (void)mallopt(M_ARENA_MAX, kCoordinatorMallocArenas);
#endif
}

}  // namespace lorc::cli
