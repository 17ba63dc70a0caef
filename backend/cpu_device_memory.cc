#include "backend/cpu_device_memory.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>

#include "absl/strings/str_cat.h"

#if defined(__SANITIZE_ADDRESS__)
#define LORC_CPU_DEVICE_MEMORY_FROM_MALLOC 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define LORC_CPU_DEVICE_MEMORY_FROM_MALLOC 1
#endif
#endif

namespace lorc {

#if defined(LORC_CPU_DEVICE_MEMORY_FROM_MALLOC)
const bool CpuDeviceMemory::kOwnMappings = false;
#else
const bool CpuDeviceMemory::kOwnMappings = true;
#endif

namespace {

// Returns a buffer of CpuDeviceMemory::Allocate (`bytes`: its rounded size) to the system.
void Release(void* p, size_t bytes) {
#if defined(LORC_CPU_DEVICE_MEMORY_FROM_MALLOC)
  (void)bytes;
  std::free(p);
#else
  (void)munmap(p, bytes);
#endif
}

}  // namespace

CpuDeviceMemory::~CpuDeviceMemory() {
  absl::MutexLock lock(&mu_);
  for (const auto& [p, bytes] : mapped_bytes_) Release(p, bytes);
}

absl::StatusOr<void*> CpuDeviceMemory::Allocate(size_t bytes) {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  if (bytes == 0 || bytes > SIZE_MAX - page) {
    return absl::InvalidArgumentError(absl::StrCat("cpu backend: cannot allocate ", bytes, " bytes"));
  }
  const size_t rounded = (bytes + page - 1) / page * page;
#if defined(LORC_CPU_DEVICE_MEMORY_FROM_MALLOC)
  void* p = std::aligned_alloc(page, rounded);
  if (p == nullptr) {
    return absl::ResourceExhaustedError(absl::StrCat("cpu backend: cannot allocate ", bytes, " bytes"));
  }
  std::memset(p, 0, rounded);
#else
  void* p = mmap(nullptr, rounded, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) {
    return absl::ResourceExhaustedError(absl::StrCat("cpu backend: cannot allocate ", bytes,
                                                     " bytes: ", std::strerror(errno)));
  }
#endif
  absl::MutexLock lock(&mu_);
  mapped_bytes_[p] = rounded;
  return p;
}

void CpuDeviceMemory::Free(void* data) {
  if (data == nullptr) return;
  size_t bytes = 0;
  {
    absl::MutexLock lock(&mu_);
    auto it = mapped_bytes_.find(data);
    if (it == mapped_bytes_.end()) return;
    bytes = it->second;
    mapped_bytes_.erase(it);
  }
  Release(data, bytes);
}

}  // namespace lorc
