#include "kvpolicy/sequence_policy.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "absl/strings/str_cat.h"

namespace lorc::kvpolicy {

void SelectVictims(const KvPolicyConfig& c, int64_t seq_len, int64_t pinned, const uint8_t* state,
                   const int32_t* last_hit, std::vector<int32_t>* victims) {
  victims->clear();
  const int64_t lo = std::max<int64_t>(c.sinks, pinned);
  const int64_t hi = seq_len - c.recent;  // [lo, hi): may be evicted
  const uint8_t full_state = static_cast<uint8_t>(SlotState::kFull);
  // The w rule: unimportant to every query of the last `window` positions.
  const int64_t oldest_query = seq_len - c.window;
  std::vector<int32_t>& rest = *victims;  // first the survivors of the rule (budget only)
  std::vector<int32_t> rule;
  int64_t full = 0;
  for (int64_t p = 0; p < seq_len; ++p) {
    if (state[p] != full_state) continue;
    ++full;
    if (p < lo || p >= hi) continue;
    (last_hit[p] < oldest_query ? rule : rest).push_back(static_cast<int32_t>(p));
  }
  const int64_t budget = c.BudgetFor(seq_len);
  full -= static_cast<int64_t>(rule.size());
  if (!c.has_budget() || full <= budget) {
    victims->swap(rule);
    return;
  }
  // Over the budget: also the least recently important survivors (ties: earlier positions).
  const size_t over = static_cast<size_t>(std::min<int64_t>(full - budget, rest.size()));
  std::nth_element(rest.begin(), rest.begin() + over, rest.end(), [&](int32_t a, int32_t b) {
    return last_hit[a] != last_hit[b] ? last_hit[a] < last_hit[b] : a < b;
  });
  rest.resize(over);
  rest.insert(rest.end(), rule.begin(), rule.end());
  std::sort(rest.begin(), rest.end());
}

SequenceKvPolicy::SequenceKvPolicy(const KvPolicyConfig* config, const std::vector<LayerShape>* layers,
                                   int32_t num_kv_heads, int64_t pinned, bool on_device)
    : config_(config), layers_(layers), num_kv_heads_(num_kv_heads), pinned_(pinned), on_device_(on_device) {
  heads_.resize(layers->size() * static_cast<size_t>(num_kv_heads));
}

SequenceKvPolicy::SequenceKvPolicy(const SequenceKvPolicy& o)
    : config_(o.config_),
      layers_(o.layers_),
      num_kv_heads_(o.num_kv_heads_),
      pinned_(o.pinned_),
      seq_len_(o.seq_len_),
      slot_offset_(o.slot_offset_),
      choose_(o.choose_),
      prompt_len_(o.prompt_len_),
      on_device_(o.on_device_),
      has_chosen_(o.has_chosen_),
      device_(o.device_ ? o.device_->Clone() : nullptr),
      count_from_(o.count_from_),
      device_full_(o.device_full_),
      device_from_(o.device_from_),
      device_low_(o.device_low_),
      device_low_from_(o.device_low_from_),
      device_packed_bound_(o.device_packed_bound_),
      device_packed_(o.device_packed_),
      heads_(o.heads_) {}

void SequenceKvPolicy::SetDeviceCounts(int64_t count_from, const int32_t* full, const int32_t* from,
                                       const int32_t* low, const int32_t* low_from) {
  count_from_ = count_from;
  device_full_.assign(full, full + heads_.size());
  device_from_.assign(from, from + heads_.size());
  if (low != nullptr && low_from != nullptr) {
    device_low_.assign(low, low + heads_.size());
    device_low_from_.assign(low_from, low_from + heads_.size());
  } else {
    device_low_.assign(heads_.size(), 0);
    device_low_from_.assign(heads_.size(), 0);
  }
}

int64_t SequenceKvPolicy::DeviceLowToPack(int64_t from) const {
  // Packed entries and demoted keys at positions >= count_from: exactly what a compaction from
  // there packs; from elsewhere (never, in practice), every low entry bounds it.
  const std::vector<int32_t>& n = from == count_from_ ? device_low_from_ : device_low_;
  return n.empty() ? 0 : *std::max_element(n.begin(), n.end());
}

absl::Status SequenceKvPolicy::CheckCompaction(int64_t from, int64_t num_slots) const {
  const int64_t needed = SlotsNeeded(from);
  if (from < 0 || from > num_slots || num_slots < needed || num_slots > this->num_slots()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "compaction to ", num_slots, " cache slots from slot ", from, ": the sequence holds ",
        this->num_slots(), " slots and its kept keys need ", needed));
  }
  return absl::OkStatus();
}

absl::Status SequenceKvPolicy::MarkCompacted(int64_t from, int64_t num_slots) {
  if (absl::Status s = CheckCompaction(from, num_slots); !s.ok()) return s;
  slot_offset_ = seq_len_ - num_slots;
  // The decode's bound on a head's packed run until the next compaction (no demotion packs).
  device_packed_bound_ = DeviceLowToPack(from);
  // Every low entry at positions >= from is now packed (LowInSlots counts from here).
  if (from == count_from_) {
    device_packed_ = device_low_from_;
  } else {
    device_packed_.clear();
  }
  return absl::OkStatus();
}

void SequenceKvPolicy::Extend(int64_t new_len) {
  if (new_len <= seq_len_) return;
  if (on_device_) {  // the backend extends the device arrays (KvPolicyBeginStep)
    seq_len_ = new_len;
    return;
  }
  for (Head& h : heads_) {
    h.state.resize(new_len, static_cast<uint8_t>(SlotState::kFull));
    h.low_slot.resize(new_len, -1);
    h.last_hit.resize(new_len);
    h.slot.resize(new_len);
    for (int64_t p = seq_len_; p < new_len; ++p) {
      h.last_hit[p] = static_cast<int32_t>(p);
      h.slot[p] = static_cast<int32_t>(p - slot_offset_);
    }
  }
  seq_len_ = new_len;
}

void SequenceKvPolicy::ObserveQueries(int layer, int head, const float* q, int64_t rows, int64_t ld,
                                      int group, int64_t head_dim) {
  Head& h = heads_[Index(layer, head)];
  if (!(*layers_)[layer].balance_keys || !h.balance.empty()) return;
  h.q_absmax.resize(head_dim, 0.f);
  for (int64_t r = 0; r < rows; ++r) {
    for (int hh = 0; hh < group; ++hh) {
      const float* x = q + r * ld + hh * head_dim;
      for (int64_t c = 0; c < head_dim; ++c) h.q_absmax[c] = std::max(h.q_absmax[c], std::fabs(x[c]));
    }
  }
}

void SequenceKvPolicy::Apply(int layer, int head, absl::Span<const int32_t> kept, const float* k_rows) {
  if (!choose_) return;
  Head& h = heads_[Index(layer, head)];
  SelectVictims(*config_, seq_len_, pinned_, h.state.data(), h.last_hit.data(), &h.victims);
  if (h.victims.empty()) return;
  if (config_->kind != KvPolicyKind::kMikv) {
    for (int32_t p : h.victims) h.state[p] = static_cast<uint8_t>(SlotState::kDead);
    return;
  }
  const LayerShape& s = (*layers_)[layer];
  if (s.balance_keys && h.balance.empty()) {
    // b_c = sqrt(max|q_c| / max|k_c|) over the queries seen and the keys kept so far (the prompt,
    // at the first demotion), clamped to [1/64, 64]; 1 for a channel without data.
    std::vector<float> kmax(s.k_width, 0.f);
    for (size_t j = 0; j < kept.size(); ++j) {
      for (int64_t c = 0; c < s.k_width; ++c) {
        kmax[c] = std::max(kmax[c], std::fabs(k_rows[j * s.k_width + c]));
      }
    }
    h.balance.assign(s.k_width, 1.f);
    for (int64_t c = 0; c < s.k_width && c < static_cast<int64_t>(h.q_absmax.size()); ++c) {
      if (h.q_absmax[c] > 0.f && kmax[c] > 0.f) {
        h.balance[c] = std::clamp(std::sqrt(h.q_absmax[c] / kmax[c]), 1.0f / 64, 64.0f);
      }
    }
  }
  for (int32_t p : h.victims) {
    h.state[p] = static_cast<uint8_t>(SlotState::kLow);
    h.low_slot[p] = -1;  // read from its full slot until a compaction packs it
  }
}

int64_t SequenceKvPolicy::LowRunSlotsOf(int layer, int64_t entries) const {
  if (entries == 0) return 0;
  const LayerShape& s = (*layers_)[layer];
  const int bits = config_->low_bits;
  return std::max(LowRunSlots(entries, LowEntryBytes(s.k_width, bits), s.k_slot_bytes),
                  LowRunSlots(entries, LowEntryBytes(s.v_width, bits), s.v_slot_bytes));
}

void SequenceKvPolicy::CountCompactable(const Head& h, int64_t from, int64_t* full, int64_t* low,
                                        int64_t* low_in_slots) const {
  *full = *low = *low_in_slots = 0;
  for (int64_t p = 0; p < seq_len_; ++p) {
    switch (static_cast<SlotState>(h.state[p])) {
      case SlotState::kFull: *full += h.slot[p] >= from; break;
      case SlotState::kLow:
        *low += h.low_slot[p] >= 0 || h.slot[p] >= from;
        *low_in_slots += h.low_slot[p] < 0 && h.slot[p] >= from;
        break;
      default: break;
    }
  }
}

SequenceKvPolicy::CompactionCounts SequenceKvPolicy::CountForCompaction(int64_t from) const {
  CompactionCounts c;
  if (on_device_) {
    // From the latest step's counts, taken from the same `from` (CompactFrom); otherwise (no step
    // finished yet, or another `from`) nothing can be given back and no low entry is known.
    if (from != count_from_ || device_from_.empty()) {
      c.slots_needed = num_slots();
      return c;
    }
    int64_t most = 0;
    for (size_t i = 0; i < heads_.size(); ++i) {  // SetDeviceCounts sized both (zeros without low)
      most = std::max(most, device_from_[i] + LowRunSlotsOf(static_cast<int>(i / num_kv_heads_), device_low_from_[i]));
      // Low entries at positions >= count_from (packed, or demoted since) less those packed at
      // the last compaction (a packed entry that died since only lowers the count).
      const int64_t packed = i < device_packed_.size() ? device_packed_[i] : 0;
      c.low_in_slots = std::max<int64_t>(c.low_in_slots, device_low_from_[i] - packed);
    }
    c.slots_needed = from + most;
    return c;
  }
  int64_t most = 0;
  for (size_t i = 0; i < heads_.size(); ++i) {
    int64_t full = 0, low = 0, in_slots = 0;
    CountCompactable(heads_[i], from, &full, &low, &in_slots);
    most = std::max(most, full + LowRunSlotsOf(static_cast<int>(i / num_kv_heads_), low));
    c.low_in_slots = std::max(c.low_in_slots, in_slots);
  }
  c.slots_needed = from + most;
  return c;
}

absl::Status SequenceKvPolicy::Compact(int64_t from, int64_t num_slots, std::vector<SlotMove>* moves,
                                       std::vector<LowRepack>* low) {
  moves->clear();
  low->clear();
  if (on_device_) return absl::FailedPreconditionError("device-resident KV policy state: the backend compacts it");
  if (absl::Status s = CheckCompaction(from, num_slots); !s.ok()) return s;
  const uint8_t full = static_cast<uint8_t>(SlotState::kFull);
  const uint8_t low_state = static_cast<uint8_t>(SlotState::kLow);
  for (size_t i = 0; i < heads_.size(); ++i) {
    Head& h = heads_[i];
    const int32_t layer = static_cast<int32_t>(i / num_kv_heads_), head = static_cast<int32_t>(i % num_kv_heads_);
    int64_t next = from;
    LowRepack run;
    run.layer = layer;
    run.head = head;
    run.old_base = h.low_base;
    run.old_entries = h.num_packed;
    for (int64_t p = 0; p < seq_len_; ++p) {
      if (h.state[p] == low_state && (h.low_slot[p] >= 0 || h.slot[p] >= from)) {
        run.sources.push_back(h.low_slot[p] >= 0 ? h.low_slot[p] : -1 - static_cast<int64_t>(h.slot[p]));
        h.low_slot[p] = static_cast<int32_t>(run.sources.size() - 1);
        continue;
      }
      if (h.state[p] != full || h.slot[p] < from) continue;
      if (h.slot[p] != next) {
        moves->push_back({layer, head, h.slot[p], next});
        h.slot[p] = static_cast<int32_t>(next);
      }
      ++next;
    }
    h.low_base = next;
    h.num_packed = static_cast<int64_t>(run.sources.size());
    if (!run.sources.empty() || run.old_entries > 0) {
      run.new_base = next;
      low->push_back(std::move(run));
    }
  }
  slot_offset_ = seq_len_ - num_slots;
  return absl::OkStatus();
}

EntryCounts SequenceKvPolicy::Counts(int layer, int head) const {
  EntryCounts n;
  if (on_device_) {  // the latest step's counts; before any, all kept
    const size_t i = Index(layer, head);
    n.full = i < device_full_.size() ? device_full_[i] : seq_len_;
    n.low = i < device_low_.size() ? device_low_[i] : 0;
    n.dead = seq_len_ - n.full - n.low;
    return n;
  }
  const Head& h = heads_[Index(layer, head)];
  for (int64_t p = 0; p < seq_len_; ++p) {
    switch (static_cast<SlotState>(h.state[p])) {
      case SlotState::kFull: ++n.full; break;
      case SlotState::kLow: ++n.low; break;
      default: ++n.dead;
    }
  }
  return n;
}

double SequenceKvPolicy::KvBytes() const {
  double bytes = 0;
  for (size_t l = 0; l < layers_->size(); ++l) {
    const LayerShape& s = (*layers_)[l];
    const double low = static_cast<double>(LowEntryBytes(s.k_width, config_->low_bits) +
                                           LowEntryBytes(s.v_width, config_->low_bits));
    for (int g = 0; g < num_kv_heads_; ++g) {
      const EntryCounts n = Counts(static_cast<int>(l), g);
      bytes += static_cast<double>(n.full) * static_cast<double>(s.full_bytes) +
               static_cast<double>(n.low) * low;
    }
  }
  return bytes;
}

double SequenceKvPolicy::MetadataBytes() const {
  // state, last_hit, slot (+ low_slot on the CPU; + pos, slot -> position, on the device)
  const double per_entry = 1 + 4 + 4 + (config_->kind == KvPolicyKind::kMikv || on_device_ ? 4 : 0);
  return per_entry * static_cast<double>(seq_len_) * static_cast<double>(heads_.size());
}

KvPolicyStore::KvPolicyStore(const KvPolicyConfig& config, std::vector<LayerShape> layers,
                             int32_t num_kv_heads, bool on_device)
    : config_(config), layers_(std::move(layers)), num_kv_heads_(num_kv_heads), on_device_(on_device) {}

SequenceKvPolicy* KvPolicyStore::Prepare(int64_t seq_id, int64_t num_computed_tokens, int64_t seq_len,
                                         int64_t prompt_len, bool session) {
  auto it = seqs_.find(seq_id);
  if (it == seqs_.end() || it->second->seq_len() != num_computed_tokens) {
    if (it != seqs_.end()) seqs_.erase(it);
    it = seqs_
             .emplace(seq_id, std::make_unique<SequenceKvPolicy>(
                                  &config_, &layers_, num_kv_heads_,
                                  std::max(num_computed_tokens, session ? prompt_len : 0), on_device_))
             .first;
    it->second->Extend(num_computed_tokens);
  }
  it->second->Extend(seq_len);
  it->second->set_choose(config_.ChoosesAfterStep(seq_len >= prompt_len, seq_len));
  it->second->set_prompt_len(prompt_len);
  return it->second.get();
}

const SequenceKvPolicy* KvPolicyStore::Find(int64_t seq_id) const {
  auto it = seqs_.find(seq_id);
  return it == seqs_.end() ? nullptr : it->second.get();
}

SequenceKvPolicy* KvPolicyStore::FindMutable(int64_t seq_id) {
  auto it = seqs_.find(seq_id);
  return it == seqs_.end() ? nullptr : it->second.get();
}

void KvPolicyStore::Fork(int64_t parent, int64_t child) {
  auto it = seqs_.find(parent);
  if (it == seqs_.end()) return;
  const bool had_device = it->second->device() != nullptr;
  auto copy = std::make_unique<SequenceKvPolicy>(*it->second);
  if (had_device && copy->device() == nullptr) {
    // No device memory for the copy: the child gets a fresh state at its next step, with what is
    // computed pinned (every key kept; forks come before any compaction, so slots = positions).
    seqs_.erase(child);
    return;
  }
  seqs_[child] = std::move(copy);  // `it` is not used after the insertion (it may rehash)
}

int64_t KvPolicyStore::DevicePositions() const {
  int64_t total = 0;
  for (const auto& [id, s] : seqs_) {
    if (s->device() != nullptr) total += s->device()->capacity();
  }
  return total;
}

void KvPolicyStore::Release(int64_t seq_id) {
  auto it = seqs_.find(seq_id);
  if (it == seqs_.end()) return;
  const SequenceKvPolicy& s = *it->second;
  ++stats_.sequences;
  stats_.tokens += s.seq_len();
  for (size_t l = 0; l < layers_.size(); ++l) {
    for (int g = 0; g < num_kv_heads_; ++g) {
      const EntryCounts n = s.Counts(static_cast<int>(l), g);
      stats_.entries.full += n.full;
      stats_.entries.low += n.low;
      stats_.entries.dead += n.dead;
    }
    stats_.full_kv_bytes += static_cast<double>(layers_[l].full_bytes) * num_kv_heads_ *
                            static_cast<double>(s.seq_len());
  }
  stats_.kv_bytes += s.KvBytes();
  stats_.metadata_bytes += s.MetadataBytes();
  seqs_.erase(it);
}

}  // namespace lorc::kvpolicy
