// Per-sequence state of a token-level KV policy (kv_policy_config.h) and the store of all running
// sequences' states on one worker.
//
// Layout (what a CUDA attention kernel will read, one (sequence, layer, KV head) at a time):
//   state[layer][head][pos]     uint8 SlotState, pos = logical block * block_size + offset: one
//                               block_size-byte live mask per paged block of the block table.
//   last_hit[layer][head][pos]  int32: the latest query position that found key `pos` important
//                               (attention probability >= 1/t); a new key starts at its own
//                               position, so it lives at least w queries.
//   low_slot[layer][head][pos]  int32: a kLow key's entry in its head's packed run, or -1 while it
//                               is not packed yet (read from its own full slot, slot[pos],
//                               quantized on the fly: the same bytes packing will write).
//   slot[layer][head][pos]      int32: the sequence's cache slot (index into its block table's
//                               slots) holding a kFull (or unpacked kLow) key: pos - slot_offset
//                               for a key written after the latest compaction, its dense place
//                               after one (below).
//   low_base[layer][head]       the first slot of the head's packed run of low K / V entries
//                               (low_precision.h: codes then LowParams, widths = the cache's
//                               per-head widths: head_dim for full KV, r_k / r_v for LoRC
//                               latents), written into the paged cache by a compaction.
//   balance[layer][head][k_w]   fp32 per-channel key factors b_c (MiKV outlier balancing), fixed
//                               at the head's first demotion; low keys hold k * b, read as / b.
//
// A choice never writes the paged blocks: a dead slot is only not read by this sequence, a
// demoted one is read quantized. So a block shared with the prefix store, a
// session or a fork keeps exactly the bytes its hash describes (kvpolicy/README.md: why), and the
// positions of a request's prefix-cache hit (below `pinned`) are never evicted or demoted.
//
// Compaction (kvpolicy/README.md "Compaction"): the coordinator returns memory by moving, per
// (layer, KV head), the kFull keys at slots >= compact_from (the first block boundary at or past
// `pinned`; the blocks before it may be shared) into a dense run from compact_from, in position
// order, and freeing the blocks past the longest run. Keys written later go to the slots after
// it: slot = pos - slot_offset for the whole sequence (the model runner's slot_mapping). MiKV's
// kLow entries at slots >= compact_from (packed before, or demoted since) are written as one
// packed run right after the head's full run, so the pool holds them and admission counts them
// (kvpolicy/README.md "Low entries in the paged cache").
//
// Device-resident states (KvPolicyStore's on_device; the CUDA backend): the per-position arrays
// live on the device only (the backend's DeviceArrays, made and extended by
// Backend::KvPolicyBeginStep), the backend's kernels choose and compact, and this object keeps
// the scalars (seq_len, pinned, slot_offset, choose) and the per-(layer, head) counts the
// backend copies back after each step (SetDeviceCounts): what SlotsNeeded, Counts and KvBytes
// answer from (MiKV: also the low entries' counts, and a bound on each head's packed run for the
// decode, DevicePackedBound).
//
// Threads: one thread (the worker's device thread) uses a store and its states.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/types/span.h"
#include "kvpolicy/kv_policy_config.h"
#include "kvpolicy/low_precision.h"

namespace lorc::kvpolicy {

enum class SlotState : uint8_t { kDead = 0, kFull = 1, kLow = 2 };

// One layer's per-KV-head widths of what its cache stores.
struct LayerShape {
  int64_t k_width = 0;   // head_dim (full KV) or r_k (LoRC latent)
  int64_t v_width = 0;   // head_dim or r_v
  bool balance_keys = false;  // MiKV outlier balancing of keys (full KV layers; latent keys are
                              // unrotated latents, not in the query's channel space: off)
  int64_t full_bytes = 0;     // bytes of one token's K + V of one KV head in the paged cache
  // Bytes of one KV head's region of one cache slot, K and V rows, that a packed run of low
  // entries uses (backend.h KvHeadSlotBytes); MiKV needs LowEntryBytes <= these (checked at load).
  int64_t k_slot_bytes = 0;
  int64_t v_slot_bytes = 0;
};

// CORM's choice for one (layer, KV head) after a step, written into `victims` (ascending
// positions): among the kFull positions p of [0, seq_len) that are not protected (p < sinks,
// p >= seq_len - recent, p < pinned):
//  - always (CORM's rule): those with last_hit[p] < seq_len - window (no query of the last
//    `window` positions gave them probability >= 1/t);
//  - with a budget B = config.BudgetFor(seq_len), when more than B positions remain kFull after
//    that: also the unprotected ones with the oldest last_hit (ties: the earlier position) until
//    B remain (or none is left unprotected). The budget is an upper bound.
void SelectVictims(const KvPolicyConfig& config, int64_t seq_len, int64_t pinned,
                   const uint8_t* state, const int32_t* last_hit, std::vector<int32_t>* victims);

// One KV head's entry moving between two of a sequence's cache slots (indices into its block
// table's slots, dst < src), in the order the moves must run.
struct SlotMove {
  int32_t layer = 0, head = 0;
  int64_t src = 0, dst = 0;
};

// One (layer, KV head)'s low-precision entries rewritten by a compaction as one packed run
// (header comment; the cache's side: Backend::CompactKvHeads).
struct LowRepack {
  int32_t layer = 0, head = 0;
  int64_t old_base = 0;     // the run before it (sequence slots from old_base) ...
  int64_t old_entries = 0;  // ... of this many entries (0: none)
  int64_t new_base = 0;     // where the new run starts: right after the head's full run
  // Per entry of the new run, in position order: an entry of the old run (>= 0), or -1 - the
  // sequence slot of a full-precision key demoted since (quantized by the move).
  std::vector<int64_t> sources;
};

struct EntryCounts {
  int64_t full = 0, low = 0, dead = 0;
};

// A backend's device copy of one state's per-position arrays (header comment); owned by the
// state, so it goes when the state does (release, preemption, failure).
class DeviceArrays {
 public:
  virtual ~DeviceArrays() = default;
  // A copy of the arrays as they are now (KvPolicyStore::Fork), or null when the device is out
  // of memory (the child then gets a fresh state at its next step: every key kept).
  virtual std::unique_ptr<DeviceArrays> Clone() const = 0;
  // Positions the arrays hold room for (state_memory.h DeviceStateCapacity of the longest length
  // they were grown to); 0 where the backend does not say.
  virtual int64_t capacity() const { return 0; }
};

class SequenceKvPolicy {
 public:
  // `config` and `layers` must outlive the state (the store's). Positions [0, pinned) are the
  // request's prefix-cache hit: kept at full precision for its whole life.
  SequenceKvPolicy(const KvPolicyConfig* config, const std::vector<LayerShape>* layers,
                   int32_t num_kv_heads, int64_t pinned, bool on_device = false);
  // A copy (KvPolicyStore::Fork): device arrays cloned (DeviceArrays::Clone).
  SequenceKvPolicy(const SequenceKvPolicy& other);
  SequenceKvPolicy& operator=(const SequenceKvPolicy&) = delete;

  // Device-resident (header comment): the per-position arrays are the backend's.
  bool on_device() const { return on_device_; }
  DeviceArrays* device() const { return device_.get(); }
  void set_device(std::unique_ptr<DeviceArrays> d) { device_ = std::move(d); }
  // Whether a choice has run on this state (device-resident: then some key may be dead or moved,
  // so its prompt rows cannot use the plain paged kernels).
  bool has_chosen() const { return has_chosen_; }
  void set_has_chosen() { has_chosen_ = true; }
  // Device-resident: the kFull keys per (layer, head) after the latest step, in all (`full`) and
  // at positions >= count_from (`from`), [layers * num_kv_heads] each; MiKV's low entries
  // likewise (`low`, `low_from`: packed or at positions >= count_from; null: none, CORM).
  void SetDeviceCounts(int64_t count_from, const int32_t* full, const int32_t* from,
                       const int32_t* low = nullptr, const int32_t* low_from = nullptr);
  // Device-resident MiKV: the most low entries of one (layer, head) that a compaction from `from`
  // packs, after the latest step (what it stages at most per head), and an upper bound on the
  // entries of any head's packed run (that count at the latest compaction; 0 before one).
  int64_t DeviceLowToPack(int64_t from) const;
  int64_t DevicePackedBound() const { return device_packed_bound_; }
  // Device-resident compaction: CheckCompaction (Compact's checks: FailedPrecondition when
  // num_slots < SlotsNeeded(from), num_slots > num_slots() or from past num_slots) before the
  // backend moves the keys, MarkCompacted (the checks again, then slot_offset = seq_len -
  // num_slots) after.
  absl::Status CheckCompaction(int64_t from, int64_t num_slots) const;
  absl::Status MarkCompacted(int64_t from, int64_t num_slots);

  int64_t seq_len() const { return seq_len_; }
  int64_t pinned() const { return pinned_; }
  int32_t num_layers() const { return static_cast<int32_t>(layers_->size()); }
  const LayerShape& layer_shape(int layer) const { return (*layers_)[layer]; }
  int32_t num_kv_heads() const { return num_kv_heads_; }
  // Positions minus cache slots of the keys written from now on (0 until a compaction), and the
  // cache slots the sequence holds: seq_len - slot_offset.
  int64_t slot_offset() const { return slot_offset_; }
  int64_t num_slots() const { return seq_len_ - slot_offset_; }
  // Where compaction may start: `pinned` rounded up to a whole block of `block_size` tokens.
  int64_t CompactFrom(int32_t block_size) const {
    return (pinned_ + block_size - 1) / block_size * block_size;
  }
  // The slots a compaction from `from` leaves: from + the most, over the (layer, KV head) pairs,
  // of the kFull keys at slots >= from plus the slots of the packed run of its kLow entries at
  // slots >= from or packed (O(seq_len x layers x heads)). A demotion never raises it (MiKV's
  // entries fit in a slot), so the coordinator's bound (kvpolicy/README.md) holds.
  int64_t SlotsNeeded(int64_t from) const { return CountForCompaction(from).slots_needed; }
  // MiKV: the most, over the (layer, KV head) pairs, of the kLow keys at slots >= from still in
  // their full-width slots (demoted since the last compaction; a compaction from `from` packs
  // them). 0 for CORM, and when the device counts are from another `from`.
  int64_t LowInSlots(int64_t from) const { return CountForCompaction(from).low_in_slots; }
  // Both in one pass over the keys (the worker's slot report after each step).
  struct CompactionCounts {
    int64_t slots_needed = 0;
    int64_t low_in_slots = 0;
  };
  CompactionCounts CountForCompaction(int64_t from) const;
  // Compacts (header comment): every (layer, head)'s kFull keys at slots >= from move to slots
  // from, from + 1, ... in position order, and its kLow entries at slots >= from or packed are
  // packed into one run right after them; then the sequence holds `num_slots` slots
  // (slot_offset = seq_len - num_slots). `moves` (cleared) gets the copies the cache needs, per
  // (layer, head) in ascending slots, so running them in order never overwrites an entry not yet
  // moved; `low` (cleared; MiKV) the runs to write, whose sources must be read before any move
  // runs and written after all (Backend::CompactKvHeads). FailedPrecondition (nothing changed)
  // when num_slots < SlotsNeeded(from) or exceeds num_slots(), or from is past num_slots.
  absl::Status Compact(int64_t from, int64_t num_slots, std::vector<SlotMove>* moves,
                       std::vector<LowRepack>* low);
  // The cache slot of kFull (or unpacked kLow) position `pos` of (layer, head).
  int64_t slot(int layer, int head, int64_t pos) const { return heads_[Index(layer, head)].slot[pos]; }
  const KvPolicyConfig& config() const { return *config_; }
  // Positions [seq_len, new_len) become kFull with last_hit = their position.
  void Extend(int64_t new_len);
  // Whether Apply chooses after this step (KvPolicyConfig::ChoosesAfterStep: with after-prompt,
  // only once the step reaches the prompt's end; set by KvPolicyStore::Prepare before each
  // step). When false, attention still records importance (last_hit) and Apply keeps everything.
  void set_choose(bool choose) { choose_ = choose; }
  bool choose() const { return choose_; }
  // The request's prompt tokens as Prepare last saw them (0: unknown): with after-prompt, where
  // the first choice comes.
  void set_prompt_len(int64_t n) { prompt_len_ = n; }
  int64_t prompt_len() const { return prompt_len_; }

  const uint8_t* states(int layer, int head) const { return heads_[Index(layer, head)].state.data(); }
  int32_t* last_hit(int layer, int head) { return heads_[Index(layer, head)].last_hit.data(); }
  SlotState state(int layer, int head, int64_t pos) const {
    return static_cast<SlotState>(heads_[Index(layer, head)].state[pos]);
  }
  // Running per-channel max |q_c| over `rows` query rows (`ld` apart) of `group` query heads of
  // `head_dim` values starting at q (the query heads of KV head `head`); kept until the balance
  // is fixed. Only layers with balance_keys.
  void ObserveQueries(int layer, int head, const float* q, int64_t rows, int64_t ld, int group,
                      int64_t head_dim);
  // A kLow key's entry in the packed run of (layer, head) (-1: not packed, read from slot()), the
  // run's first slot, the key factors (null: none) and the low bits: what attention needs to
  // read it (low_precision.h EncodeLowEntry / DecodeLowEntry, ForEachLowPiece).
  int64_t low_entry(int layer, int head, int64_t pos) const { return heads_[Index(layer, head)].low_slot[pos]; }
  int64_t low_base(int layer, int head) const { return heads_[Index(layer, head)].low_base; }
  const float* balance(int layer, int head) const {
    const Head& h = heads_[Index(layer, head)];
    return h.balance.empty() ? nullptr : h.balance.data();
  }
  // Slots of a packed run of `entries` low entries of `layer` (the longer of its K and V runs).
  int64_t LowRunSlotsOf(int layer, int64_t entries) const;
  // After the step's attention of (layer, head), when choose(): SelectVictims, then CORM marks
  // the victims kDead, MiKV marks them kLow (their full slots are then read quantized until a
  // compaction packs them) after fixing the key balance at the head's first demotion from the
  // queries seen and k_rows (the full-precision keys of the `kept` positions, in that order, as
  // attention read them).
  void Apply(int layer, int head, absl::Span<const int32_t> kept, const float* k_rows);
  EntryCounts Counts(int layer, int head) const;
  // Bytes this sequence's policy keeps: full entries x full_bytes + low entries x their
  // LowEntryBytes, summed over layers and heads; metadata: state + last_hit (+ low_slot) bytes.
  double KvBytes() const;
  double MetadataBytes() const;

 private:
  struct Head {
    std::vector<uint8_t> state;
    std::vector<int32_t> last_hit, low_slot, slot;
    int64_t low_base = 0, num_packed = 0;         // the packed run of low entries (header)
    std::vector<float> q_absmax, balance;         // balance empty until fixed
    std::vector<int32_t> victims;                 // scratch
  };
  size_t Index(int layer, int head) const { return static_cast<size_t>(layer) * num_kv_heads_ + head; }
  // Of (layer, head): kFull keys at slots >= from, kLow ones packed or at slots >= from, and of
  // those the ones still in their slots (not packed).
  void CountCompactable(const Head& h, int64_t from, int64_t* full, int64_t* low, int64_t* low_in_slots) const;

  const KvPolicyConfig* config_;
  const std::vector<LayerShape>* layers_;
  int32_t num_kv_heads_;
  int64_t pinned_;
  int64_t seq_len_ = 0;
  int64_t slot_offset_ = 0;
  bool choose_ = true;
  int64_t prompt_len_ = 0;
  bool on_device_ = false;
  bool has_chosen_ = false;
  std::unique_ptr<DeviceArrays> device_;
  int64_t count_from_ = -1;                          // device-resident: SetDeviceCounts
  std::vector<int32_t> device_full_, device_from_;  // [layer][head]
  std::vector<int32_t> device_low_, device_low_from_;  // [layer][head] (MiKV; else zeros)
  int64_t device_packed_bound_ = 0;
  std::vector<int32_t> device_packed_;  // [layer][head]: low entries packed at the last compaction
  std::vector<Head> heads_;  // [layer][head] (device-resident: sized, arrays empty)
};

// What the released sequences held when they ended (eval's KV-bytes measure).
struct KvPolicyStats {
  int64_t sequences = 0;
  int64_t tokens = 0;           // sum of their lengths
  EntryCounts entries;          // (token, layer, KV head) entries
  double kv_bytes = 0;          // sum of SequenceKvPolicy::KvBytes at release
  double metadata_bytes = 0;
  double full_kv_bytes = 0;     // what the same tokens take without a policy
};

class KvPolicyStore {
 public:
  // on_device: the states are device-resident (header comment; Backend::KvPolicyOnDevice).
  KvPolicyStore(const KvPolicyConfig& config, std::vector<LayerShape> layers, int32_t num_kv_heads,
                bool on_device = false);
  bool on_device() const { return on_device_; }
  const KvPolicyConfig& config() const { return config_; }
  // The state of `seq_id` covering [0, seq_len): made on first sight (or when its length does not
  // continue from num_computed_tokens: a preempted and recomputed request) with the
  // num_computed_tokens already cached pinned (a prefix-cache or session hit; a fork child's state
  // comes from Fork, not from here), and for a request of a session (`session`) its whole prompt too (kvpolicy/README.md
  // "Sessions"); then extended to seq_len. `prompt_len`: the request's prompt tokens (0:
  // unknown); with --kv-policy-prefill after-prompt the state chooses after this step only when
  // seq_len >= prompt_len (SequenceKvPolicy::choose).
  SequenceKvPolicy* Prepare(int64_t seq_id, int64_t num_computed_tokens, int64_t seq_len,
                            int64_t prompt_len = 0, bool session = false);
  // The state of a running sequence; null when unknown (tests, reports, compaction).
  const SequenceKvPolicy* Find(int64_t seq_id) const;
  SequenceKvPolicy* FindMutable(int64_t seq_id);
  // Parallel sampling: `child` (a fork of `parent` at the step that sampled after the prompt)
  // starts with a copy of the parent's state (the same choice so far, pinned prefix, slot map),
  // so greedy completions of one request stay equal. No-op when the parent has no state;
  // replaces a state the child id had.
  void Fork(int64_t parent, int64_t child);
  // The request ended or was preempted: its counts go into stats(); unknown ids are ignored.
  void Release(int64_t seq_id);
  const KvPolicyStats& stats() const { return stats_; }
  void ResetStats() { stats_ = KvPolicyStats(); }
  size_t size() const { return seqs_.size(); }
  // Positions the states' device arrays hold room for together (DeviceArrays::capacity): what the
  // coordinator's kv_policy_max_positions bounds.
  int64_t DevicePositions() const;

 private:
  KvPolicyConfig config_;
  std::vector<LayerShape> layers_;
  int32_t num_kv_heads_;
  bool on_device_ = false;
  absl::flat_hash_map<int64_t, std::unique_ptr<SequenceKvPolicy>> seqs_;
  KvPolicyStats stats_;
};

}  // namespace lorc::kvpolicy
