// Programmatic dependent launch (PDL, sm_90+): a kernel launched with
// cudaLaunchAttributeProgrammaticStreamSerialization may start while the kernel before it on the
// stream is still running, once every CTA of that kernel has called PdlTrigger() (or exited).
// It runs what does not depend on the previous kernel (weight loads, index math) and then calls
// PdlWait(), which returns when the previous kernel has completed and its memory is visible. In a
// captured CUDA graph the attribute becomes a programmatic edge between the two kernel nodes; a
// launch without the attribute (cuBLASLt, NCCL, the one-shot all-reduce, memcpy nodes) serialises
// as usual, so nothing crosses them. Source: CUDA C++ Programming Guide, "Programmatic Dependent
// Launch and Synchronization"; PTX ISA `griddepcontrol`.
//
// Contract of every kernel launched through LaunchPdl:
// - every thread calls PdlWait() before its first read of data a previous kernel may write and
//   before its first global write (a previous kernel may still read what it overwrites);
// - before PdlWait() it reads only data no kernel of the stream writes while it may run (weights,
//   the launch's own arguments);
// - PdlTrigger() may come anywhere (it only lets the next kernel's CTAs become resident early;
//   their own PdlWait() still waits for this kernel's completion).
// - a kernel's grid completes only after its own PdlWait() returned (at least one CTA waits), so
//   completion is transitive: when a kernel has completed, so has every kernel before it.
//
// Early K/V (the one exception to reading only unwritten data before the wait): the tensor-core
// decode attention (attention_decode.cu, DecodeSchedule::early_kv) loads cached K/V rows of
// earlier positions before its wait. The kernel before it is the one writing this step's rows
// (the QKV GEMV with RoPE + KV write fused, or RopeKvWrite after a GEMV or cuBLASLt), and that
// writer was launched only after everything before the QKV projection had completed: the GEMV
// calls PdlTrigger() only after its PdlWait() (gemv.cu; keep that order), cuBLASLt never triggers.
// So the only rows still being written are this step's new tokens, which a decode item reads
// after the wait (its last key; the decode path reads one query token per sequence).
//
// On devices below sm_90, or with LORC_DISABLE_PDL=1 in the environment (A/B measurements), the
// launch carries no attribute and both device calls are no-ops.
#pragma once

#include <cuda_runtime.h>

namespace lorc::kernels {

// Whether launches on the current device carry the PDL attribute: compute capability >= 9 and
// LORC_DISABLE_PDL unset or "0". Decided once per device (cached); host only.
bool PdlEnabled();

#ifdef __CUDACC__
// Waits until the kernel before this one on the stream has completed and its writes are visible
// (griddepcontrol.wait). A no-op when the launch had no PDL attribute or below sm_90.
__device__ __forceinline__ void PdlWait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Lets the next kernel on the stream launch (griddepcontrol.launch_dependents). No-op below sm_90.
__device__ __forceinline__ void PdlTrigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Launches kernel<<<grid, block, smem, stream>>>(args...) through cudaLaunchKernelEx, with the
// PDL attribute when PdlEnabled(); `extra` (may be null) is one more attribute (a cluster shape).
// Returns the launch's error.
template <typename... KArgs, typename... Args>
cudaError_t LaunchPdl(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                      const cudaLaunchAttribute* extra, Args&&... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attrs[2];
  unsigned n = 0;
  if (PdlEnabled()) {
    attrs[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attrs[n].val.programmaticStreamSerializationAllowed = 1;
    ++n;
  }
  if (extra != nullptr) attrs[n++] = *extra;
  cfg.attrs = n > 0 ? attrs : nullptr;
  cfg.numAttrs = n;
  return cudaLaunchKernelEx(&cfg, kernel, static_cast<KArgs>(args)...);
}
#endif

}  // namespace lorc::kernels
