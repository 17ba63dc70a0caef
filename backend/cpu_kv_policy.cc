// The CPU backend's side of the token-level KV policies (kvpolicy/, backend.h KvPolicyAttention):
// gathering the keys a sequence's policy keeps (full-precision slots from the paged cache,
// low-precision ones quantized from their slots or read from packed runs), the importance
// statistics from the attention probabilities, and compaction (moves and runs). Shared by the
// full-KV path (cpu_backend.cc) and the LoRC latent path (cpu_latent_attention.cc), the
// reference the CUDA kernels will be checked against.
#include <algorithm>
#include <cstring>

#include "backend/cpu_kernels.h"
#include "kvpolicy/low_precision.h"
#include "kvpolicy/sequence_policy.h"

namespace lorc::cpu_internal {
namespace {

// Copies entry e of a packed run (run slot i at cache slot slot_of(i)) into / out of `entry`.
template <typename SlotOf>
void RunEntry(const KvLayer& cache, bool v_side, int64_t head, int64_t e, int64_t entry_bytes,
              SlotOf slot_of, uint8_t* entry, bool write) {
  const int64_t region = KvHeadSlotBytes(cache, v_side);
  kvpolicy::ForEachLowPiece(e, entry_bytes, region, [&](int64_t i, int64_t off, int64_t n, int64_t at) {
    uint8_t* r = KvHeadSlot(cache, v_side, slot_of(i), head) + off;
    if (write) {
      std::memcpy(r, entry + at, static_cast<size_t>(n));
    } else {
      std::memcpy(entry + at, r, static_cast<size_t>(n));
    }
  });
}

}  // namespace

int GatherKeptHead(const KvLayer& cache, kvpolicy::SequenceKvPolicy* policy, int layer,
                   const int32_t* table, int32_t block_size, int len, int q_len, int head, int64_t k_width,
                   int64_t v_width, std::vector<int32_t>* kept, std::vector<float>* k,
                   std::vector<float>* v) {
  kept->clear();
  const uint8_t* state = policy != nullptr ? policy->states(layer, head) : nullptr;
  for (int pos = 0; pos < len; ++pos) {
    if (state == nullptr || state[pos] != static_cast<uint8_t>(kvpolicy::SlotState::kDead)) {
      kept->push_back(pos);
    }
  }
  const int n = static_cast<int>(kept->size());
  // The step's own tokens must all be kept (the causal mask assumes they end the list).
  if (n < q_len || (*kept)[n - q_len] != len - q_len) return -1;
  k->resize(static_cast<size_t>(n) * k_width);
  v->resize(static_cast<size_t>(n) * v_width);
  auto cache_slot = [&](int64_t at) {
    return static_cast<int64_t>(table[at / block_size]) * block_size + at % block_size;
  };
  // kLow entries (MiKV): one entry's bytes, sized at the first.
  const int bits = policy != nullptr ? policy->config().low_bits : 0;
  int64_t kb = 0, vb = 0;
  std::vector<uint8_t> ke, ve;
  std::vector<float> scratch;
  for (int j = 0; j < n; ++j) {
    const int pos = (*kept)[j];
    float* kj = k->data() + static_cast<size_t>(j) * k_width;
    float* vj = v->data() + static_cast<size_t>(j) * v_width;
    const bool low = state != nullptr && state[pos] == static_cast<uint8_t>(kvpolicy::SlotState::kLow);
    const int64_t e = low ? policy->low_entry(layer, head, pos) : -1;
    const float* balance = low ? policy->balance(layer, head) : nullptr;
    if (low && ke.empty()) {
      kb = kvpolicy::LowEntryBytes(k_width, bits);
      vb = kvpolicy::LowEntryBytes(v_width, bits);
      ke.resize(kb);
      ve.resize(vb);
      scratch.resize(k_width);
    }
    if (e >= 0) {  // packed by a compaction: read the entry from the head's run
      const int64_t base = policy->low_base(layer, head);
      auto run_slot = [&](int64_t i) { return cache_slot(base + i); };
      RunEntry(cache, false, head, e, kb, run_slot, ke.data(), false);
      RunEntry(cache, true, head, e, vb, run_slot, ve.data(), false);
      kvpolicy::DecodeLowEntry(ke.data(), k_width, bits, balance, kj);
      kvpolicy::DecodeLowEntry(ve.data(), v_width, bits, nullptr, vj);
      continue;
    }
    // The sequence's cache slot of the key: its position, or where a compaction put it.
    const int64_t slot = cache_slot(policy != nullptr ? policy->slot(layer, head, pos) : pos);
    LoadKvHead(cache, false, slot, head, k_width, kj);
    LoadKvHead(cache, true, slot, head, v_width, vj);
    if (low) {  // demoted, not packed yet: the values its entry will hold
      kvpolicy::EncodeLowEntry(kj, k_width, bits, balance, scratch.data(), ke.data());
      kvpolicy::EncodeLowEntry(vj, v_width, bits, nullptr, scratch.data(), ve.data());
      kvpolicy::DecodeLowEntry(ke.data(), k_width, bits, balance, kj);
      kvpolicy::DecodeLowEntry(ve.data(), v_width, bits, nullptr, vj);
    }
  }
  return n;
}

void RecordImportance(const float* probs, int q_len, int n, int len, const int32_t* kept,
                      int32_t* last_hit) {
  for (int i = 0; i < q_len; ++i) {
    const int t = n - q_len + i + 1;  // keys this query attends (causal over the kept list)
    const float threshold = 1.0f / static_cast<float>(t);
    const int32_t query_pos = len - q_len + i;
    const float* row = probs + static_cast<size_t>(i) * n;
    for (int j = 0; j < t; ++j) {
      if (row[j] >= threshold && last_hit[kept[j]] < query_pos) last_hit[kept[j]] = query_pos;
    }
  }
}

void CompactKvHeads(absl::Span<const KvLayer> layers, absl::Span<const KvHeadMove> moves,
                    absl::Span<const KvLowRun> low, int low_bits) {
  // 1. Every run's entries, read before any move can overwrite an old run or a demoted slot.
  std::vector<std::vector<uint8_t>> staged(low.size());
  std::vector<float> row, scratch;
  for (size_t r = 0; r < low.size(); ++r) {
    const KvLowRun& run = low[r];
    const KvLayer& c = layers[run.layer];
    const int64_t kw = c.k_width / c.num_kv_heads, vw = c.v_width / c.num_kv_heads;
    const int64_t kb = kvpolicy::LowEntryBytes(kw, low_bits), vb = kvpolicy::LowEntryBytes(vw, low_bits);
    std::vector<uint8_t>& out = staged[r];
    out.resize(run.sources.size() * (kb + vb));
    auto old_slot = [&](int64_t i) { return run.old_slots[i]; };
    for (size_t i = 0; i < run.sources.size(); ++i) {
      uint8_t* ke = out.data() + i * (kb + vb);
      uint8_t* ve = ke + kb;
      const int64_t src = run.sources[i];
      if (src >= 0) {
        RunEntry(c, false, run.head, src, kb, old_slot, ke, false);
        RunEntry(c, true, run.head, src, vb, old_slot, ve, false);
        continue;
      }
      const int64_t slot = -1 - src;
      row.resize(std::max(kw, vw));
      scratch.resize(kw);
      LoadKvHead(c, false, slot, run.head, kw, row.data());
      kvpolicy::EncodeLowEntry(row.data(), kw, low_bits, run.balance, scratch.data(), ke);
      LoadKvHead(c, true, slot, run.head, vw, row.data());
      kvpolicy::EncodeLowEntry(row.data(), vw, low_bits, nullptr, scratch.data(), ve);
    }
  }
  // 2. The full-precision moves, in order.
  for (const KvHeadMove& m : moves) {
    for (bool v_side : {false, true}) MoveKvHead(layers[m.layer], v_side, m.src, m.dst, m.head);
  }
  // 3. The runs at their new slots.
  for (size_t r = 0; r < low.size(); ++r) {
    const KvLowRun& run = low[r];
    const KvLayer& c = layers[run.layer];
    const int64_t kw = c.k_width / c.num_kv_heads, vw = c.v_width / c.num_kv_heads;
    const int64_t kb = kvpolicy::LowEntryBytes(kw, low_bits), vb = kvpolicy::LowEntryBytes(vw, low_bits);
    auto new_slot = [&](int64_t i) { return run.new_slots[i]; };
    for (size_t i = 0; i < run.sources.size(); ++i) {
      uint8_t* ke = staged[r].data() + i * (kb + vb);
      RunEntry(c, false, run.head, static_cast<int64_t>(i), kb, new_slot, ke, true);
      RunEntry(c, true, run.head, static_cast<int64_t>(i), vb, new_slot, ke + kb, true);
    }
  }
}

}  // namespace lorc::cpu_internal
