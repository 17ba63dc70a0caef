#include "cli/process_memory.h"

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

}  // namespace lorc::cli
