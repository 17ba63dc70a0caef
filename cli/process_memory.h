// Heap settings for the long-running server processes (`lorcserve worker`, `lorcserve coordinator`).
#pragma once

namespace lorc::cli {

// Fixes glibc malloc's mmap threshold at 1 MiB (setting it turns glibc's dynamic adjustment off):
// a buffer of 1 MiB or more (weight tensors, the KV cache, step scratch) that no free heap chunk
// can hold then gets its own mapping, which goes back to the system when freed. Cost: a host
// buffer of 1 MiB or more made anew each step pays an mmap and its page faults; on a CUDA
// worker that is only the host copy of all-token logits for prompt log-probabilities.
//
// Why: by default glibc raises the threshold (up to 32 MiB) each time an mmapped chunk is freed,
// so once a recovery's reload has freed the old weights, the new weights and KV cache come from
// the heap, where their frees leave fragments that neither free nor malloc_trim return. Measured
// with bench/src/soak_faults (400 requests, TP=2 CPU, two worker reloads; 2-core Debian 12 VM,
// 2026-12-01): worker 0's VmRSS 103.6 -> 112.1 MB (+8.2 %) by default, 99.7 -> 99.9 MB (+0.2 %)
// with this threshold; CPU decode speed unchanged (135 tokens/s either way at batch 1).
// Since then the CPU backend's buffers (weights, KV cache, step buffers) no longer come from
// malloc at all (backend/cpu_device_memory.h, bug 7); the threshold still governs every other
// large host buffer (checkpoint reads, CUDA workers' host copies, gRPC messages). Whether it is
// still needed for the soak's bounds has not been re-measured.
// Call once at the start of main's subcommand, before the first large allocation. No-op outside
// glibc.
void UseFixedMmapThreshold();

// Caps glibc malloc at 4 arenas (M_ARENA_MAX) unless the environment already chose (a positive
// MALLOC_ARENA_MAX, or glibc.malloc.arena_max in GLIBC_TUNABLES). For the coordinator, whose
// many short-lived gRPC threads each get an arena: by default glibc allows 8 per core, and each
// arena keeps resident the pages its own peaks touched wherever a live chunk still sits on them
// (malloc_trim returns only whole free pages), so resident memory creeps up as threads come and
// go and each arena meets its own peak, with the live heap flat. Cost: threads share arenas'
// locks for what their per-thread cache (tcache) does not serve; not measurable in the soak.
//
// Measured with bench/src/soak_faults (CI's 2,000-request run with faults, TP=2 CPU; 2-core
// Debian 12 VM, 2026-12-02): heaptrack over the run found the coordinator's live heap at 1.43 MB
// after warm-up and 1.44 MB at the end, while VmRSS grew +5.8 % (+1.98 MB: +1.52 MB in the 15
// malloc arenas' mappings, +0.29 MB in the stacks of 3 more gRPC threads). With the cap: +2.1 %
// and +1.9 % over 2,000 requests (+4.1-4.2 % with 16 arenas in the same build), +4.7 % over
// 10,000; the coordinator's CPU time over a run 15.9 s capped, 17.3 s uncapped
// (docs/RELIABILITY.md, bug 8). Call once at the start of the subcommand, before any thread.
// No-op outside glibc.
void LimitMallocArenas();

}  // namespace lorc::cli
