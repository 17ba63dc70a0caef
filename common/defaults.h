// One default per engine/KV setting, referenced by the options structs' member initialisers and
// by the CLI flag help text (so `--help` cannot drift from what the code does).
#pragma once

#include <cstdint>

namespace lorc::defaults {

inline constexpr int32_t kBlockSize = 16;         // KV cache block size, tokens
inline constexpr int64_t kKvCacheMiB = 512;       // KV cache memory per worker, MiB (CPU backend)
inline constexpr double kGpuMemoryUtilization = 0.9;  // CUDA: share of GPU memory lorcserve uses
inline constexpr int32_t kMaxNumBatchedTokens = 2048;   // max_num_batched_tokens: tokens per step
inline constexpr int32_t kMaxNumSeqs = 256;       // max_num_seqs: sequences running at once
inline constexpr int32_t kMaxWaiting = 1024;      // bounded queue before RESOURCE_EXHAUSTED
inline constexpr int32_t kMaxTokens = 16;         // a request's max_tokens when it gives none
inline constexpr int32_t kCliMaxTokens = 64;      // `generate` / `bench` --max-tokens
inline constexpr int32_t kMaxLogprobs = 20;       // top-N alternatives per position, at most
inline constexpr int32_t kMaxNumCompletions = 64; // a request's n, at most
inline constexpr float kMaxLogitBias = 100.0f;    // |logit_bias| at most (OpenAI's range)
inline constexpr float kMaxPresencePenalty = 2.0f;  // |presence_penalty|, |frequency_penalty|
// Temperatures below this sample greedily (as vLLM's _SAMPLING_EPS): dividing logits by a
// smaller one only rounds, and the limit T -> 0 is the argmax.
inline constexpr float kGreedyTemperature = 1e-5f;
inline constexpr int64_t kMaxModelLen = 2048;     // config.json without max_position_embeddings
// CUDA tensor parallelism: BF16 all-reduces up to this many bytes take the one-shot peer-memory
// path instead of NCCL (worker/comm/custom_all_reduce.h; --disable-custom-all-reduce turns it
// off). Chosen by measurement at world size 2 on 2 x H200 (docs/PERFORMANCE.md, "Llama-3-70B
// shape at TP = 2"): faster than NCCL up to 1024 rows x 8192 (16 MiB), slower from 2048 rows.
inline constexpr int64_t kCustomAllReduceMaxBytes = int64_t{16} << 20;
// Prefix caching (kvstore/prefix_cache.h): `--enable-prefix-caching` (vLLM's name, on as there).
inline constexpr bool kEnablePrefixCaching = true;
// Sessions (kvstore/session_store.h): `--session-ttl-s`, idle seconds before a session's pinned
// blocks are released; `--max-session-kv-fraction`, the share of the KV blocks all sessions may
// pin together (oldest sessions released past it).
inline constexpr double kSessionTtlS = 600.0;
inline constexpr double kMaxSessionKvFraction = 0.5;
// Admission prefers a waiting request with a longer cached prefix over those ahead of it (same
// priority, within this many of the queue's head), but bypasses a request at most this many times.
inline constexpr int32_t kPrefixPreferenceWindow = 16;
inline constexpr int32_t kMaxPrefixBypass = 4;
// A token-level KV policy's compaction (kvpolicy/README.md "Compaction") runs once it frees at
// least this fraction of a sequence's blocks (and at least one): each one copies the sequence's
// kept keys, so waiting for a quarter bounds the copies to about 4 keys per evicted key while
// the cache holds at most a third more blocks than the kept keys need.
inline constexpr double kKvCompactMinFreedFraction = 0.25;
// MiKV also compacts once block_size of its keys demoted since the last compaction are still in
// full-width slots (KvSlotReport::low_in_slots, the most over layers and heads; Scheduler): a
// 16-key tile holding one is dequantized on the fly at ~3x a packed tile's cost. Measured on an
// H200 (docs/PERFORMANCE.md "MiKV compaction during decode"): compacting at 0.5, 0.25 and 0.125 x
// sqrt(kept slots) demoted keys gave ITL p50 25.9 / 23.8 / 23.2 ms at 16k, and at block_size
// (16) 23.1; the freed-blocks rule alone never fired during a MiKV decode (37.3 ms).
// The coordinator's internal port (Rendezvous, WorkerJoin): `--internal-listen` defaults to the
// `--listen` host with this port, and a LeaderWorkerSet worker joins $LWS_LEADER_ADDRESS on it.
inline constexpr int32_t kInternalPort = 50052;
// A joined worker repeats its Join this often (so a restarted coordinator learns it again), and
// retries a failed one with a backoff doubling from 200 ms up to kJoinMaxBackoffS.
inline constexpr double kJoinHeartbeatS = 2.0;
inline constexpr double kJoinMaxBackoffS = 5.0;
// Graceful drain (SIGTERM, `--drain-timeout-s`): seconds in-flight requests have to finish
// before they are aborted (Kubernetes' default terminationGracePeriodSeconds is 30 as well).
inline constexpr int32_t kDrainTimeoutS = 30;
// The Prometheus endpoint's address (`--metrics-host`; `--metrics-port` turns it on): all
// interfaces, as Prometheus scrapes pods from outside; 127.0.0.1 keeps it on the machine.
inline constexpr const char* kMetricsHost = "0.0.0.0";

}  // namespace lorc::defaults
