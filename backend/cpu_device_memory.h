// The CPU backend's "device memory": every buffer of Backend::Allocate / AllocateHost on the CPU
// backend (weights, the KV cache, step buffers: made when a model loads; the tensor-parallel
// sampled-token buffer grows by doubling a few times at most; none is made per step).
#pragma once

#include <cstddef>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"

namespace lorc {

// Page-granular buffers, each its own anonymous private mapping (mmap), released with munmap when
// freed: a reload's new weights and KV cache never land among the malloc heap's fragments, and
// freeing a model returns every page of it at once, like cudaFree. Without this, the fixture's many
// tensors under glibc's mmap threshold (1 MiB in the servers, cli/process_memory.h) came from
// malloc arenas, and each recovery's reload left worker 0 up to ~4 MB more resident (2,000-request
// soak with the GPU host's 16 cores emulated: +9.0 %; docs/RELIABILITY.md, bug 7).
//
// Memory is zero-filled and page-aligned (at least the 64 bytes the kernels assume). Under
// AddressSanitizer the buffers come from aligned_alloc instead (kOwnMappings false), so its
// redzones still catch a kernel reading or writing past a buffer. Thread-safe.
class CpuDeviceMemory {
 public:
  // Whether each buffer is its own mapping, unmapped by Free (false under AddressSanitizer).
  static const bool kOwnMappings;

  CpuDeviceMemory() = default;
  CpuDeviceMemory(const CpuDeviceMemory&) = delete;
  CpuDeviceMemory& operator=(const CpuDeviceMemory&) = delete;
  ~CpuDeviceMemory();  // unmaps anything still allocated

  // A buffer of at least `bytes` (> 0) bytes. ResourceExhausted naming the size when the system
  // refuses it (mmap's ENOMEM, or the process's limits).
  absl::StatusOr<void*> Allocate(size_t bytes);
  // Releases a buffer of Allocate; null and unknown pointers are ignored.
  void Free(void* data);

 private:
  absl::Mutex mu_;
  absl::flat_hash_map<void*, size_t> mapped_bytes_ ABSL_GUARDED_BY(mu_);  // pointer -> mapping size
};

}  // namespace lorc
