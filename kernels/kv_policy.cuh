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
// kvpolicy/README.md states it. MiKV (Yang et al., arXiv 2402.18096): the keys CORM's rule would
// drop are kept at int4 / int2 instead (per-token asymmetric, keys balanced per channel), in
// kvpolicy/low_precision.h's format bit for bit: quantized on the fly from their full slots until
// a compaction packs them into the head's run of the paged cache, then read from the run.
//
// Every launcher is framework-free: device pointers in, one stream, a cudaError_t out
// (cudaErrorInvalidValue for shapes it does not implement, before any launch).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "kernels/attention_latent.cuh"
#include "kernels/kv_quant.h"

namespace lorc::kernels {

// The cache a policy kernel reads and writes: bf16 rows (kv_quant kNone: slot c of KV head g at
// c * kv_stride + g * head_dim elements) or a quantized layout (`--kv-cache-dtype fp8|int8|int4`,
// kernels/kv_quant.h: blocks of code rows then fp16 scale rows, geometry k_q / v_q =
// MakeKvqSide(kv_quant, block_size, num_kv_heads, head_dim), readable by KvqSideReadable; the
// cache pointers then hold that layout's bytes and kv_stride is unused). A quantized key or value
// is read as the CPU's KvqDequantizeHead computes it, bit for bit (each product and sum rounded
// apart). MiKV's packed entries live in a slot's code region of the head (head_code bytes, its
// scales untouched), as the CPU's (backend/cpu_kv_cache.cc KvHeadSlot).
struct KvPolicyCacheLayout {
  KvQuant kv_quant = KvQuant::kNone;
  KvqSide k_q, v_q;
};

// SlotState values (kvpolicy::SlotState): a position's byte in KvPolicySeq::state.
// kKvPolicyLowPacked is the device's own: a kLow key whose entry a compaction packed into its
// head's run (no slot holds it any more; the decode reads it from the run by entry index).
inline constexpr uint8_t kKvPolicyDead = 0, kKvPolicyFull = 1, kKvPolicyLow = 2, kKvPolicyLowPacked = 3;

// Per (layer, KV head) MiKV state on the device (KvPolicySeq::low_base etc.).
inline constexpr int32_t kKvBalanceUnset = 0, kKvBalanceFixed = 1;

// One sequence's policy state on the device. Each pointer holds, per (layer, KV head of this
// rank), `capacity` positions at offset (layer * num_kv_heads + head) * capacity:
//   state     uint8: kKvPolicyDead / kKvPolicyFull / kKvPolicyLow (MiKV: demoted, still in its
//             full slot, read quantized on the fly) / kKvPolicyLowPacked (in the head's run);
//   slot      int32: the cache slot of a kFull (or kKvPolicyLow) key as an index into the
//             sequence's block-table slots (table[slot / block_size] * block_size + slot %
//             block_size); of a kKvPolicyLowPacked key, its entry's index in the head's run (set
//             by KvPolicyCompact);
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
  // MiKV only (null for CORM), per (layer, KV head) of this rank, index layer * num_kv_heads +
  // head:
  //   low_base    int32: the first sequence slot of the head's packed run of low entries (each
  //               slot lends the head's region of its K row to keys' entries, of its V row to
  //               values': low_precision.h "run byte b is byte b % slot_bytes of run slot ...");
  //   num_packed  int32: entries in that run (entry i: bytes [i * entry_bytes, ...) of the run);
  //   balance_set int32: kKvBalanceUnset until the head's first demotion fixes `balance`;
  //   balance     fp32 [.. ][head_dim]: the key factors b_c (low keys hold k * b, read as / b);
  //   q_absmax    fp32 [.. ][head_dim]: max |q_c| over the queries seen until then.
  int32_t* low_base = nullptr;
  int32_t* num_packed = nullptr;
  int32_t* balance_set = nullptr;
  float* balance = nullptr;
  float* q_absmax = nullptr;
  // The decode: an upper bound on num_packed over this sequence's heads (the host's, from the
  // counts at its latest compaction); it walks seq_len - slot_offset slots, then this many entries.
  int32_t packed_max = 0;
  // LaunchKvPolicyObserveQueries: the state's query rows are [q_row, q_row + q_len).
  int32_t q_len = 0;
  // MiKV over LoRC latents (null otherwise): per (layer, KV head) [capacity], entry e of the
  // head's run -> the position of its key (the inverse of slot[] over kKvPolicyLowPacked keys,
  // kept by KvPolicyCompact): a latent key is rotated at its position, which an entry does not
  // carry.
  int32_t* packed_pos = nullptr;
};

// Keys per work chunk of the policy decode (one CTA per chunk, KV head and sequence).
inline constexpr int kKvPolicyChunk = 256;

// Decode (one query token per sequence) over the keys each sequence's policy keeps, for one
// layer, walking each entry's slots [0, seq_len - slot_offset) (a position p's key at slot
// p - slot_offset, or where a compaction moved it: every full key the query may attend lies
// there), then (MiKV, low_bits > 0) the head's packed entries [0, num_packed) (walk indexes past
// the slots, up to packed_max). A kKvPolicyLow key in a slot is read as its packed entry will be:
// K times the head's balance, quantized, dequantized, divided by it (V without balance); t, the
// keys a query attends, counts full and low ones (backend/cpu_kv_policy.cc GatherKeptHead).
// Two implementations, the same keys, t and importance rule. On sm_80+ with 16-byte aligned q and
// cache rows (unless cuda_cores or LORC_KV_POLICY_MMA=0) the tensor-core kernels
// (kv_policy_decode_mma.cu): per chunk the keys listed first, then 16-key tiles on mma.sync
// (DecodeMmaKernel's structure), MiKV's low keys decoded in the tile (K as bf16 hi + lo), the
// full keys' scores saved for an importance kernel, a deterministic reduce; P enters the P V mma
// as bf16 (the paged decode's tolerance). Otherwise the CUDA-core kernels (kv_policy.cu):
// three kernels: (1) per chunk of kKvPolicyChunk slots and KV head, the scores
// s = scale * q . k of the group's query heads for every key read (full or low; dead ones -inf)
// into the scratch, with the chunk's softmax max and sum; (2) per chunk, the sequence's (max, sum,
// kept count t) from every chunk's, p = exp(s - max) / sum, last_hit[pos] = seq_len - 1 where a
// query head of the group gives p >= 1/t (record_hits; full keys only: a low one is never chosen
// again, the CPU's record of it is never read), and the chunk's P V partial; (3) the partials
// summed in chunk order (deterministic) into `out`. The importance statistics cost the scores'
// round trip through the scratch (4 bytes per key and query head, written once, read once) and
// one compare per key: measured by bench/src/attention_bench.cc --kv-policy (both
// implementations, docs/PERFORMANCE.md "Tensor-core policy decode").
struct KvPolicyDecodeArgs {
  const __nv_bfloat16* q = nullptr;  // [num_seqs][q_stride]: head h at h * head_dim
  int64_t q_stride = 0;              // elements
  __nv_bfloat16* out = nullptr;      // [num_seqs][out_stride], as q
  int64_t out_stride = 0;
  // Paged cache, bf16: slot c (block * block_size + offset) of KV head g at c * kv_stride + g *
  // head_dim; or quantized (`layout`; the pointers then address its bytes).
  const __nv_bfloat16* k_cache = nullptr;
  const __nv_bfloat16* v_cache = nullptr;
  int64_t kv_stride = 0;
  KvPolicyCacheLayout layout;
  const int32_t* block_tables = nullptr;  // [num_seqs][max_blocks]
  int32_t max_blocks = 0;
  int32_t block_size = 0;
  const KvPolicySeq* seqs = nullptr;  // [num_seqs], device
  int32_t layer = 0;
  int32_t num_seqs = 0, num_heads = 0, num_kv_heads = 0, head_dim = 0;
  // host: the longest walk of an entry, seq_len - slot_offset + packed_max (grid, scratch)
  int32_t max_seq_len = 0;
  float scale = 1.0f;
  bool record_hits = true;
  int32_t low_bits = 0;  // MiKV's 4 or 2; 0: no low entries (CORM)
  void* scratch = nullptr;  // KvPolicyDecodeScratchBytes(...) bytes, 256-byte aligned
  // true: the CUDA-core kernels below even where the tensor-core ones apply (A/B measurements,
  // parity tests of both; LORC_KV_POLICY_MMA=0 forces it for a whole process). Over a quantized
  // cache the tensor-core kernels take CORM only (K and V of one geometry): the tiles' codes are
  // turned in shared memory into fp16 K and bf16 V (fp8 / int8 exact, each key's scales applied to
  // its score and probability; int4 zero + code x scale), Q rounded to fp16 for the fp16 S mma;
  // MiKV runs the CUDA-core kernels.
  bool cuda_cores = false;
};

// Bytes of scratch LaunchKvPolicyDecode needs for this batch shape: scores [num_seqs][num_heads]
// [max_seq_len] fp32, per chunk (max, sum) and kept counts, and P V partials [num_seqs][chunks]
// [num_heads][head_dim] fp32.
size_t KvPolicyDecodeScratchBytes(int num_seqs, int num_heads, int num_kv_heads, int head_dim,
                                  int max_seq_len);

// cudaErrorInvalidValue for head_dim other than 64 / 128, a group (num_heads / num_kv_heads)
// above 8 or not whole, no scratch, num_seqs / max_seq_len < 1, low_bits other than 0, 2, 4, or a
// quantized layout KvqSideReadable refuses.
cudaError_t LaunchKvPolicyDecode(const KvPolicyDecodeArgs& args, cudaStream_t stream);

// CORM over a LoRC latent layer (kernels/attention_latent.cuh; the CPU reference
// backend/cpu_latent_attention.cc LatentAttention under a KvPolicyAttention): the decode above's
// walk, t and importance rule over a cache of latents. Per span of 1, 2 or 4 chunks of
// kKvPolicyChunk walk indices, KV head and entry, the span's full keys are listed (slot -> pos ->
// state) with their positions, then the latent decode's tiles run over the list (attention_latent_decode_item.cuh DecodeItemT:
// keys reconstructed from C_K on the tensor cores and rotated at each key's own position, S and
// P C_V on mma.sync), the scores saved for the importance pass; the importance and the reduce are
// the tensor-core policy decode's. Output r_v columns per query head (o_proj holds B_V).
// MiKV (low_bits 4 / 2): the low keys are listed too and counted in t (never recorded: a low key
// is not chosen again). The walk is the full-KV decode's: the slots [0, seq_len - slot_offset)
// (full keys, and kKvPolicyLow ones still in their slots), then the heads' packed entries [0,
// num_packed) (walk indexes past the slots, up to packed_max), each rotated at its position
// (KvPolicySeq::packed_pos: an entry carries none). A low key's latent rows are its entry's
// values (backend/cpu_kv_policy.cc GatherKeptHead, kvpolicy/low_precision.h bit for bit, no key
// balance: latents are not in the query's channel space): an unpacked one read from its slot
// (fp32, as the CPU's LoadKvHead), quantized and dequantized; a packed one decoded from the
// head's run (K entries LowEntryBytes(r_k), V entries LowEntryBytes(r_v)); both then rounded to
// bf16 in the tile like every other row.
struct KvPolicyLatentDecodeArgs {
  // The layer: q, out (rows by the entries' q_row), k_up, caches (bf16 or quantized), ranks,
  // inv_freq, block tables (rows by table_row), scale; query_start and seq_lens are not read.
  LatentAttentionArgs latent;
  const KvPolicySeq* seqs = nullptr;  // [num_seqs] entries, device
  int32_t layer = 0, num_seqs = 0;
  int32_t max_seq_len = 0;  // host: the longest walk, seq_len - slot_offset + packed_max
  bool record_hits = true;
  int32_t low_bits = 0;  // MiKV's 4 or 2; 0: CORM (full keys only)
  // KvPolicyDecodeScratchBytes(num_seqs, num_heads, num_kv_heads, head_dim = 128, max_seq_len).
  void* scratch = nullptr;
  // Policy chunks a CTA lists and runs as one item: 0, the launcher's choice (the longest of 4, 2,
  // 1 that still fills the device twice over; LORC_KV_POLICY_LATENT_SPAN=1|2|4 fixes it for a
  // process); 1, 2 or 4 fix it (tests, A/B). MiKV lists at most 2 (4 runs as 2: the shared memory
  // of its list).
  int32_t span = 0;
};
// cudaErrorInvalidValue for what the latent kernels do not take (LatentShapeSupported, alignment,
// a quantized layout they cannot read), a group above 8, no scratch or entries, a span other than
// 0, 1, 2 or 4, low_bits other than 0, 2, 4.
cudaError_t LaunchKvPolicyLatentDecode(const KvPolicyLatentDecodeArgs& args, cudaStream_t stream);


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
// choosing or not; `low_counts` / `low_from_counts` (MiKV) the same of the low entries (unpacked
// or packed; every packed one is at a position >= count_from).
// MiKV (victim_state kKvPolicyLow, balance_keys): a head's first demotion first fixes its key
// balance (kvpolicy SequenceKvPolicy::Apply): b_c = sqrt(q_absmax_c / max |k_c|) over the keys
// it keeps (read from the cache through the slot map), clamped to [1/64, 64], 1 for a channel
// without data.
struct KvPolicyChooseArgs {
  const KvPolicySeq* seqs = nullptr;  // [num_seqs], device
  int32_t num_seqs = 0, num_layers = 0, num_kv_heads = 0;
  int32_t sinks = 0, recent = 0, window = 0;
  uint8_t victim_state = kKvPolicyDead;
  int32_t* full_counts = nullptr;
  int32_t* from_counts = nullptr;
  int32_t* low_counts = nullptr;
  int32_t* low_from_counts = nullptr;
  // MiKV's balance (victim_state kKvPolicyLow and balance_keys): the layers' K caches (bf16 or
  // quantized, as KvPolicyCompactArgs), the sequences' block tables (row = the sequence's index
  // here).
  bool balance_keys = false;
  const __nv_bfloat16* const* k_layers = nullptr;
  int64_t kv_stride = 0;
  KvPolicyCacheLayout layout;
  const int32_t* block_tables = nullptr;
  int32_t max_blocks = 0, block_size = 0, head_dim = 0;
};
// cudaErrorInvalidValue as well for a balance without its cache pointers or head_dim 64 / 128, or
// a quantized layout KvqSideReadable refuses.
cudaError_t LaunchKvPolicyChoose(const KvPolicyChooseArgs& args, cudaStream_t stream);

// MiKV: per (state, KV head) whose balance is not fixed yet, q_absmax_c = max(q_absmax_c, |q_c|)
// over the state's query rows [q_row, q_row + q_len) and the group's query heads
// (kvpolicy SequenceKvPolicy::ObserveQueries). q as KvPolicyDecodeArgs::q.
cudaError_t LaunchKvPolicyObserveQueries(const KvPolicySeq* seqs, int num_seqs, int layer, const __nv_bfloat16* q,
                                         int64_t q_stride, int num_heads, int num_kv_heads, int head_dim,
                                         cudaStream_t stream);

// Compaction of one sequence (kvpolicy SequenceKvPolicy::Compact), every (layer, KV head) of
// layers [layer0, layer0 + num_layers) at once: the kFull keys at positions >= `from` (their
// slots are >= from) move, in position order, to slots from, from + 1, ... of the sequence's
// block table, the head's K and V entries (bf16 rows, or a quantized cache's codes and scales),
// and their `slot` and `pos` entries follow. One CTA
// per (layer, head) walks the positions in chunks of 64, reading a chunk's rows before writing
// any (a key's destination is never above its source and the chunks run in order, so no row is
// overwritten before it moves).
// MiKV (low_bits > 0): before the moves the CTA stages its head's low entries in `stage` (the
// packed run's entries, then the kKvPolicyLow keys at positions >= from in position order,
// quantized from their slots: K with the balance), after them writes the staged entries as the
// new run right after the head's full run (low_base, num_packed; those keys become
// kKvPolicyLowPacked, their slot the entry's index, and packed_pos, where present, maps the
// entry to its position). The run's order differs from the CPU's (old entries first, not merged
// by position); no reader depends on it (entries are read by index, from the walk past the
// slots). Over per-layer sides (a LoRC model) a K entry
// is LowEntryBytes(k_dim) bytes and a V entry LowEntryBytes(v_dim) (a LoRC model's heads never fix
// a balance: its layers do not balance keys).
// One layer's cache sides as a compaction of per-layer widths addresses them (a LoRC model: each
// latent layer's r_k / r_v per KV head, full-KV layers head_dim): values per KV head of a slot,
// bf16 elements per slot (kv_quant kNone), or the quantized geometry, MakeKvqSide(kv_quant,
// block_size, num_kv_heads, dim) of each side.
struct KvPolicyLayerSides {
  int32_t k_dim = 0, v_dim = 0;
  int64_t k_stride = 0, v_stride = 0;
  KvqSide k_q, v_q;
};

struct KvPolicyCompactArgs {
  const KvPolicySeq* seq = nullptr;  // device: state, slot, capacity, seq_len
  // Per layer, device arrays of the layer's K and V cache (bf16, slot c of KV head g at c *
  // kv_stride + g * head_dim; or quantized: `layout`, the pointers addressing its bytes).
  __nv_bfloat16* const* k_layers = nullptr;
  __nv_bfloat16* const* v_layers = nullptr;
  int64_t kv_stride = 0;
  KvPolicyCacheLayout layout;
  const int32_t* block_table = nullptr;  // device: the sequence's table before the compaction
  int32_t block_size = 0;
  int32_t num_layers = 0, num_kv_heads = 0, head_dim = 0;
  int32_t from = 0;
  int32_t old_slots = 0;  // the slots the sequence held before: pos of [run end, old_slots) -> -1
  int32_t layer0 = 0;     // the first layer of this launch (k_layers / v_layers index all)
  // MiKV: low_bits 4 / 2 and a staging area of stage_head_bytes per CTA (layer0-relative (layer,
  // head) order), at least (low entries of the head) x (K + V entry bytes of the widest layer).
  int32_t low_bits = 0;
  uint8_t* stage = nullptr;
  int64_t stage_head_bytes = 0;
  // Layers of their own widths (a LoRC model, CORM or MiKV): per layer of k_layers, its sides (device;
  // `host_sides` the same array on the host, checked by the launcher), used instead of kv_stride,
  // head_dim and layout's geometry (layout.kv_quant still names the cache's kind). Widths are
  // multiples of 8 up to 128; an int4 region of 4 bytes modulo 8 moves in 4-byte words.
  const KvPolicyLayerSides* sides = nullptr;
  const KvPolicyLayerSides* host_sides = nullptr;
};
// cudaErrorInvalidValue for head_dim other than 64 / 128 (without sides), missing pointers,
// old_slots < from, low_bits without its arrays and staging, or a quantized layout
// KvqSideReadable refuses.
cudaError_t LaunchKvPolicyCompact(const KvPolicyCompactArgs& args, cudaStream_t stream);

}  // namespace lorc::kernels
