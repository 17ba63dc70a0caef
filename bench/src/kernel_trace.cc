// A kernel timeline of any CUDA program, CUDA graphs and programmatic dependent launch included:
// a CUDA injection library over CUPTI's activity API (the library NVIDIA's own tracers use),
// for the lent GPU machines, which have no Nsight Systems.
//
//   CUDA_INJECTION64_PATH=$PWD/libkernel_trace.so LORC_KERNEL_TRACE=trace.csv lorcserve bench ...
//   bench/kernel_trace.py trace.csv          # per-kernel share of a decode step (bench/README.md)
//
// The CUDA driver loads the library named by CUDA_INJECTION64_PATH at its initialisation and
// calls InitializeInjection; it enables CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL (records carry
// the GPU's start and end timestamps without serialising kernels, so PDL overlap stays) and
// writes one CSV line per kernel execution when CUPTI hands a buffer back and at exit:
//
//   start_ns,end_ns,correlation_id,graph_id,graph_node_id,stream_id,grid,block,cluster,device_id,name
//
// start / end: GPU timestamps in ns (CUPTI's clock, one origin per process); correlation_id: the
// launching API call (every kernel of one cudaGraphLaunch shares it); graph_id 0: launched
// outside a graph; grid / block / cluster: products of x * y * z; device_id: CUDA's ordinal;
// name: mangled. LORC_KERNEL_TRACE unset: "kernel_trace.%p.csv" in the working directory; "%p"
// in the path becomes the process id (child processes inherit the injection: `lorcserve bench
// --local-workers N` traces every worker, each into its own file when the path has %p, else
// they overwrite one another). Records reach the file when a 1 MiB buffer (a few thousand
// kernels) fills and at a normal exit: a program killed by a signal loses the rest. Records
// without both timestamps (a forced flush may hand back unfinished ones) and those CUPTI dropped
// are counted on stderr at exit. Errors go to stderr; the traced program runs on (the library
// then records nothing).
#include <cupti.h>

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <string>

#include <unistd.h>

namespace {

constexpr size_t kBufferBytes = 1 << 20;
constexpr size_t kAlign = 8;

std::mutex g_mu;
FILE* g_out = nullptr;
std::atomic<uint64_t> g_records{0};     // written
std::atomic<uint64_t> g_unfinished{0};  // skipped: a timestamp missing
std::atomic<uint64_t> g_dropped{0};

bool Ok(CUptiResult r, const char* what) {
  if (r == CUPTI_SUCCESS) return true;
  const char* msg = nullptr;
  cuptiGetResultString(r, &msg);
  std::fprintf(stderr, "kernel_trace: %s failed: %s\n", what, msg != nullptr ? msg : "(unknown)");
  return false;
}

void CUPTIAPI BufferRequested(uint8_t** buffer, size_t* size, size_t* max_records) {
  void* p = std::aligned_alloc(kAlign, kBufferBytes);
  *buffer = static_cast<uint8_t*>(p);
  *size = p != nullptr ? kBufferBytes : 0;
  *max_records = 0;  // as many as fit
}

void CUPTIAPI BufferCompleted(CUcontext ctx, uint32_t stream_id, uint8_t* buffer, size_t /*size*/,
                              size_t valid_size) {
  if (valid_size > 0) {
    std::lock_guard<std::mutex> lock(g_mu);
    CUpti_Activity* record = nullptr;
    while (cuptiActivityGetNextRecord(buffer, valid_size, &record) == CUPTI_SUCCESS) {
      if (record->kind != CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL && record->kind != CUPTI_ACTIVITY_KIND_KERNEL) continue;
      const auto* k = reinterpret_cast<const CUpti_ActivityKernel10*>(record);
      if (k->start == 0 || k->end < k->start) {
        g_unfinished.fetch_add(1, std::memory_order_relaxed);
        continue;
      }
      if (g_out == nullptr) continue;
      std::fprintf(g_out, "%llu,%llu,%u,%u,%llu,%u,%lld,%d,%u,%u,%s\n", static_cast<unsigned long long>(k->start),
                   static_cast<unsigned long long>(k->end), k->correlationId, k->graphId,
                   static_cast<unsigned long long>(k->graphNodeId), k->streamId,
                   static_cast<long long>(k->gridX) * k->gridY * k->gridZ, k->blockX * k->blockY * k->blockZ,
                   k->clusterX * k->clusterY * k->clusterZ, k->deviceId, k->name != nullptr ? k->name : "?");
      g_records.fetch_add(1, std::memory_order_relaxed);
    }
    if (g_out != nullptr) std::fflush(g_out);
  }
  size_t dropped = 0;
  if (cuptiActivityGetNumDroppedRecords(ctx, stream_id, &dropped) == CUPTI_SUCCESS) {
    g_dropped.fetch_add(dropped, std::memory_order_relaxed);
  }
  std::free(buffer);
}

void AtExit() {
  cuptiActivityFlushAll(CUPTI_ACTIVITY_FLAG_FLUSH_FORCED);
  std::lock_guard<std::mutex> lock(g_mu);
  if (g_out != nullptr) {
    std::fclose(g_out);
    g_out = nullptr;
  }
  std::fprintf(stderr, "kernel_trace: %llu kernel records written, %llu unfinished, %llu dropped by CUPTI\n",
               static_cast<unsigned long long>(g_records.load()), static_cast<unsigned long long>(g_unfinished.load()),
               static_cast<unsigned long long>(g_dropped.load()));
}

}  // namespace

// Called once by the CUDA driver (CUDA_INJECTION64_PATH); returns 1 (the driver ignores it).
extern "C" int InitializeInjection() {
  static std::atomic<bool> done{false};
  if (done.exchange(true)) return 1;
  const char* env = std::getenv("LORC_KERNEL_TRACE");
  std::string path = env != nullptr && *env != '\0' ? env : "kernel_trace.%p.csv";
  for (size_t at; (at = path.find("%p")) != std::string::npos;) path.replace(at, 2, std::to_string(getpid()));
  g_out = std::fopen(path.c_str(), "w");
  if (g_out == nullptr) {
    std::fprintf(stderr, "kernel_trace: cannot open %s for writing; tracing nothing\n", path.c_str());
    return 1;
  }
  std::fprintf(g_out,
               "start_ns,end_ns,correlation_id,graph_id,graph_node_id,stream_id,grid,block,cluster,device_id,name\n");
  if (!Ok(cuptiActivityRegisterCallbacks(BufferRequested, BufferCompleted), "cuptiActivityRegisterCallbacks") ||
      !Ok(cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL), "cuptiActivityEnable(CONCURRENT_KERNEL)")) {
    std::fclose(g_out);
    g_out = nullptr;
    return 1;
  }
  std::atexit(AtExit);
  return 1;
}
