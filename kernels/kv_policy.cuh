// Token-level KV policies on the GPU (issue #17, kvpolicy/README.md): decode attention that reads
// only the keys a sequence's policy keeps and records their importance, CORM's choice after a
// step, and the state of the positions a step appends. The device mirror of
// kvpolicy/sequence_policy.h's layout; the CPU backend (backend/cpu_kv_policy.cc,
// cpu_backend.cc DecodeAttention under KvPolicyAttention; kvpolicy::SelectVictims) is the
// reference these kernels are checked against (tests/backend/cuda_kv_policy_test.cc).
//
// Algorithms: CORM (Dai et al., arXiv 2404.15949, section 4: a key stays while one of the last w
// queries gave it attention probability >= 1/t, t the keys that query attends; the r most
// recent and the first tokens always stay; with a budget, the most recently important), as
// kvpolicy/README.md states it. MiKV's low-precision entries are not read by these kernels yet.
//
// Every launcher is framework-free: device pointers in, one stream, a cudaError_t out
// (cudaErrorInvalidValue for shapes it does not implement, before any launch).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace lorc::kernels {

// SlotState values (kvpolicy::SlotState): a position's byte in KvPolicySeq::state.
inline constexpr uint8_t kKvPolicyDead = 0, kKvPolicyFull = 1, kKvPolicyLow = 2;

// One sequence's policy state on the device. Each pointer holds, per (layer, KV head of this
// rank), `capacity` positions at offset (layer * num_kv_heads + head) * capacity:
//   state     uint8: kKvPolicyDead / kKvPolicyFull (the decode skips a kKvPolicyLow key like a
//             dead one: MiKV's low entries are not read on the GPU yet, and the CUDA backend
//             refuses --kv-policy altogether until it uses these kernels);
//   slot      int32: the cache slot of a kFull key as an index into the sequence's block-table
//             slots (table[slot / block_size] * block_size + slot % block_size);
//   last_hit  int32: the latest query position that gave the key probability >= 1/t;
//   pos       int32, indexed by slot: the position whose key the slot holds, or -1 for none (a
//             slot past a head's run after a compaction); slot[pos[s]] == s for every slot s <
//             seq_len - slot_offset with pos[s] >= 0 (the inverse map, kept by KvPolicyExtend and
//             KvPolicyCompact), so the decode walks the sequence's slots, not its positions: after
//             compactions that is about the kept keys, not the whole sequence.
// The scalar fields describe the step being run; the host fills them (seq_len <= capacity,
// seq_len < 2^24: KvPolicyChoose's key packs a position and a last_hit in 24 bits each).
struct KvPolicySeq {
  uint8_t* state = nullptr;
  int32_t* slot = nullptr;
  int32_t* last_hit = nullptr;
  int32_t capacity = 0;     // positions per (layer, head) array
  int32_t seq_len = 0;      // keys after this step; the decode's query is position seq_len - 1
  int32_t pinned = 0;       // positions [0, pinned) are never chosen (the prefix-cache hit)
  int32_t budget = -1;      // kvpolicy::KvPolicyConfig::BudgetFor(seq_len); -1: budget-free
  int32_t slot_offset = 0;  // KvPolicyExtend: a new position p sits at slot p - slot_offset
  int32_t extend_from = 0;  // KvPolicyExtend: positions [extend_from, seq_len) are new
  int32_t choose = 0;       // KvPolicyChoose: 0 leaves this sequence as it is (after-prompt)
  int32_t count_from = 0;   // KvPolicyChoose: from_counts counts the kFull keys at positions >= it
  // KvPolicyDecode: the entry's query row of q (and output row of out) and block-table row; -1:
  // the entry's index. Several entries may be rows of one sequence (a prompt's rows, each with
  // seq_len = its position + 1); their last_hit records combine with atomicMax. no_out = 1: the
  // entry only records importance (its output row is not written).
  int32_t q_row = -1;
  int32_t table_row = -1;
  int32_t no_out = 0;
  int32_t* pos = nullptr;  // [layer][head][capacity] slot -> position (above)
};

// Keys per work chunk of the policy decode (one CTA per chunk, KV head and sequence).
inline constexpr int kKvPolicyChunk = 256;

// Decode (one query token per sequence) over the keys each sequence's policy keeps, for one
// layer, walking each entry's slots [0, seq_len - slot_offset) (a position p's key at slot
// p - slot_offset, or where a compaction moved it: every key the query may attend lies there).
// Three kernels: (1) per chunk of kKvPolicyChunk slots and KV head, the scores
// s = scale * q . k of the group's query heads for every kFull key (dead ones -inf) into the
// scratch, with the chunk's softmax max and sum; (2) per chunk, the sequence's (max, sum, kept
// count t) from every chunk's, p = exp(s - max) / sum, last_hit[pos] = seq_len - 1 where a query
// head of the group gives p >= 1/t (record_hits), and the chunk's P V partial; (3) the partials
// summed in chunk order (deterministic) into `out`. The importance statistics cost the scores'
// round trip through the scratch (4 bytes per key and query head, written once, read once) and
// one compare per key: measured by bench/src/attention_bench.cc --kv-policy.
struct KvPolicyDecodeArgs {
  const __nv_bfloat16* q = nullptr;  // [num_seqs][q_stride]: head h at h * head_dim
  int64_t q_stride = 0;              // elements
  __nv_bfloat16* out = nullptr;      // [num_seqs][out_stride], as q
  int64_t out_stride = 0;
  // Paged cache, bf16: slot c (block * block_size + offset) of KV head g at c * kv_stride + g *
  // head_dim.
  const __nv_bfloat16* k_cache = nullptr;
  const __nv_bfloat16* v_cache = nullptr;
  int64_t kv_stride = 0;
  const int32_t* block_tables = nullptr;  // [num_seqs][max_blocks]
  int32_t max_blocks = 0;
  int32_t block_size = 0;
  const KvPolicySeq* seqs = nullptr;  // [num_seqs], device
  int32_t layer = 0;
  int32_t num_seqs = 0, num_heads = 0, num_kv_heads = 0, head_dim = 0;
  int32_t max_seq_len = 0;  // host: the most slots (seq_len - slot_offset) of an entry (grid, scratch)
  float scale = 1.0f;
  bool record_hits = true;
  void* scratch = nullptr;  // KvPolicyDecodeScratchBytes(...) bytes, 256-byte aligned
};

// Bytes of scratch LaunchKvPolicyDecode needs for this batch shape: scores [num_seqs][num_heads]
// [max_seq_len] fp32, per chunk (max, sum) and kept counts, and P V partials [num_seqs][chunks]
// [num_heads][head_dim] fp32.
size_t KvPolicyDecodeScratchBytes(int num_seqs, int num_heads, int num_kv_heads, int head_dim,
                                  int max_seq_len);

// cudaErrorInvalidValue for head_dim other than 64 / 128, a group (num_heads / num_kv_heads)
// above 8 or not whole, no scratch, or num_seqs / max_seq_len < 1.
cudaError_t LaunchKvPolicyDecode(const KvPolicyDecodeArgs& args, cudaStream_t stream);

// Positions [extend_from, seq_len) of every sequence become kFull with last_hit = the position
// and slot = position - slot_offset (pos[slot] = position), in every (layer, head) (kvpolicy
// SequenceKvPolicy::Extend).
cudaError_t LaunchKvPolicyExtend(const KvPolicySeq* seqs, int num_seqs, int num_layers,
                                 int num_kv_heads, cudaStream_t stream);

// CORM's choice after a step (kvpolicy::SelectVictims, the same victims), for every (layer, KV
// head) of every sequence with `choose`: among the kFull positions p in [max(sinks, pinned),
// seq_len - recent), those with last_hit < seq_len - window, then, while more than `budget` keys
// remain kFull, the ones with the oldest last_hit (ties: the earlier position), are set to
// `victim_state` (kKvPolicyDead for CORM). One CTA per (layer, head, sequence); the budget's
// k-th smallest (last_hit, position) is found by a radix select over 8-bit digits.
// `full_counts` (optional, [num_seqs][num_layers * num_kv_heads]) receives the kFull keys left,
// `from_counts` (optional, same shape) those at positions >= the sequence's count_from (what a
// compaction from there keeps: kvpolicy SequenceKvPolicy::SlotsNeeded), for every sequence,
// choosing or not.
struct KvPolicyChooseArgs {
  const KvPolicySeq* seqs = nullptr;  // [num_seqs], device
  int32_t num_seqs = 0, num_layers = 0, num_kv_heads = 0;
  int32_t sinks = 0, recent = 0, window = 0;
  uint8_t victim_state = kKvPolicyDead;
  int32_t* full_counts = nullptr;
  int32_t* from_counts = nullptr;
};
cudaError_t LaunchKvPolicyChoose(const KvPolicyChooseArgs& args, cudaStream_t stream);

// Compaction of one sequence (kvpolicy SequenceKvPolicy::Compact, CORM's part: kFull keys only),
// every (layer, KV head) at once: the kFull keys at positions >= `from` (their slots are >= from)
// move, in position order, to slots from, from + 1, ... of the sequence's block table, K and V
// rows of the bf16 cache, and their `slot` and `pos` entries follow. One CTA per (layer, head) walks the
// positions in chunks of 64, reading a chunk's rows before writing any (a key's destination is
// never above its source and the chunks run in order, so no row is overwritten before it moves).
struct KvPolicyCompactArgs {
  const KvPolicySeq* seq = nullptr;  // device: state, slot, capacity, seq_len
  // Per layer, device arrays of the layer's K and V cache (bf16, slot c of KV head g at c *
  // kv_stride + g * head_dim).
  __nv_bfloat16* const* k_layers = nullptr;
  __nv_bfloat16* const* v_layers = nullptr;
  int64_t kv_stride = 0;
  const int32_t* block_table = nullptr;  // device: the sequence's table before the compaction
  int32_t block_size = 0;
  int32_t num_layers = 0, num_kv_heads = 0, head_dim = 0;
  int32_t from = 0;
  int32_t old_slots = 0;  // the slots the sequence held before: pos of [run end, old_slots) -> -1
};
// cudaErrorInvalidValue for head_dim other than 64 / 128, missing pointers or old_slots < from.
cudaError_t LaunchKvPolicyCompact(const KvPolicyCompactArgs& args, cudaStream_t stream);

}  // namespace lorc::kernels
