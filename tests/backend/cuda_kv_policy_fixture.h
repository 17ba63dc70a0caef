// Device copies of KV policy states for the GPU policy kernel tests (cuda_kv_policy_test.cc,
// cuda_kv_policy_latent_test.cc): host arrays in kernels/kv_policy.cuh KvPolicySeq's layout
// uploaded with the inverse slot map, and reads of whole device buffers. CHECK-fails on a backend
// error (tests only).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <random>
#include <vector>

#include "backend/backend.h"
#include "common/check.h"
#include "kernels/kv_policy.cuh"
#include "kernels/kv_quant.h"
#include "kvpolicy/kv_policy_config.h"
#include "kvpolicy/low_precision.h"
#include "kvpolicy/sequence_policy.h"
#include "tests/backend/cuda_parity_fixture.h"

namespace lorc::policy_test {

using kernels::KvPolicySeq;
using parity::PutRaw;

inline cudaStream_t Stream(Backend& be) { return static_cast<cudaStream_t>(be.stream_handle()); }

// The device copy of some sequences' policy arrays ([layers][kv_heads][capacity] each) and the
// KvPolicySeq array pointing into them.
struct DeviceStates {
  DeviceBuffer state, slot, last_hit, pos, packed_pos, seqs;
  std::vector<KvPolicySeq> host_seqs;
  std::vector<size_t> offsets;  // per sequence: its arrays' first position
  int layers = 0, kv_heads = 0;
};

inline DeviceStates Upload(Backend& be, const std::vector<std::vector<uint8_t>>& state,
                    const std::vector<std::vector<int32_t>>& slot, const std::vector<std::vector<int32_t>>& last_hit,
                    std::vector<KvPolicySeq> seqs, int layers, int kv_heads) {
  DeviceStates d;
  d.layers = layers;
  d.kv_heads = kv_heads;
  std::vector<uint8_t> st;
  std::vector<int32_t> sl, lh, ps;
  for (size_t s = 0; s < seqs.size(); ++s) {
    d.offsets.push_back(st.size());
    st.insert(st.end(), state[s].begin(), state[s].end());
    sl.insert(sl.end(), slot[s].begin(), slot[s].end());
    lh.insert(lh.end(), last_hit[s].begin(), last_hit[s].end());
    // pos: the inverse of the slot map over the sequence's positions (kFull keys last, so a slot
    // a dead key left to a kept one maps to the kept one); -9 elsewhere.
    const int cap = seqs[s].capacity, len = seqs[s].seq_len;
    std::vector<int32_t> inv(state[s].size(), -9);
    for (int pass = 0; pass < 2; ++pass) {
      for (int lg = 0; lg < layers * kv_heads; ++lg) {
        for (int p = 0; p < len; ++p) {
          const size_t i = static_cast<size_t>(lg) * cap + p;
          if ((state[s][i] == 1) == (pass == 1) && slot[s][i] >= 0 && slot[s][i] < cap) {
            inv[static_cast<size_t>(lg) * cap + slot[s][i]] = p;
          }
        }
      }
    }
    ps.insert(ps.end(), inv.begin(), inv.end());
  }
  d.state = PutRaw(be, st);
  d.slot = PutRaw(be, sl);
  d.last_hit = PutRaw(be, lh);
  d.pos = PutRaw(be, ps);
  // packed_pos (MiKV over latents; the other kernels leave it): no entry yet, -5.
  d.packed_pos = PutRaw(be, std::vector<int32_t>(sl.size(), -5));
  for (size_t s = 0; s < seqs.size(); ++s) {
    seqs[s].state = d.state.as<uint8_t>() + d.offsets[s];
    seqs[s].slot = d.slot.as<int32_t>() + d.offsets[s];
    seqs[s].last_hit = d.last_hit.as<int32_t>() + d.offsets[s];
    seqs[s].pos = d.pos.as<int32_t>() + d.offsets[s];
    seqs[s].packed_pos = d.packed_pos.as<int32_t>() + d.offsets[s];
  }
  d.host_seqs = seqs;
  d.seqs = PutRaw(be, seqs);
  return d;
}

template <typename T>
inline std::vector<T> GetAll(Backend& be, const DeviceBuffer& b) {
  std::vector<T> out(b.bytes() / sizeof(T));
  CHECK_OK(be.CopyToHost(out.data(), b.data(), out.size() * sizeof(T)));
  CHECK_OK(be.Synchronize());
  return out;
}

// One side of a paged cache of `num_blocks` blocks, `kv_heads` heads of `width` values a slot:
// `rows` ([slots][kv_heads * width] F32) quantized per token and head as the cache stores them
// (kernels::KvqQuantizeToken), the bytes returned; `rows` become the values the codes dequantize to
// (KvqDequantizeHead: what the CPU reference reads).
inline std::vector<uint8_t> QuantizeSide(kernels::KvQuant quant, int block_size, int kv_heads, int width,
                                         int num_blocks, std::vector<float>* rows) {
  std::vector<uint8_t> bytes(static_cast<size_t>(num_blocks) * kernels::KvqBlockBytes(quant, block_size, kv_heads, width));
  for (int64_t c = 0; c < int64_t{num_blocks} * block_size; ++c) {
    float* row = rows->data() + c * kv_heads * width;
    uint8_t* codes = kernels::KvqTokenCodes(bytes.data(), quant, block_size, kv_heads, width, c);
    uint16_t* scales = kernels::KvqTokenScales(bytes.data(), quant, block_size, kv_heads, width, c);
    kernels::KvqQuantizeToken(quant, row, kv_heads, width, codes, scales);
    for (int g = 0; g < kv_heads; ++g) {
      kernels::KvqDequantizeHead(quant, codes, scales, width, g, row + int64_t{g} * width);
    }
  }
  return bytes;
}

// Bytes of head g's region of a slot (a bf16 row's `width` values, or its codes), where cache slot
// cs's region starts in a side's bytes, and the head's whole entry there: its region, then
// (quantized) its fp16 scales.
inline int64_t HeadRegionBytes(kernels::KvQuant quant, int width) {
  return quant == kernels::KvQuant::kNone ? 2 * width : kernels::KvqHeadCodeBytes(quant, width);
}
inline int64_t HeadRegionOffset(kernels::KvQuant quant, int block_size, int kv_heads, int width, int64_t cs, int g) {
  if (quant == kernels::KvQuant::kNone) return (cs * kv_heads * width + int64_t{g} * width) * 2;
  return cs / block_size * kernels::KvqBlockBytes(quant, block_size, kv_heads, width) +
         cs % block_size * kernels::KvqCodeRowBytes(quant, kv_heads, width) + g * HeadRegionBytes(quant, width);
}
inline std::vector<uint8_t> HeadEntry(kernels::KvQuant quant, int block_size, int kv_heads, int width,
                                      const std::vector<uint8_t>& bytes, int64_t cs, int g) {
  const uint8_t* r = bytes.data() + HeadRegionOffset(quant, block_size, kv_heads, width, cs, g);
  std::vector<uint8_t> e(r, r + HeadRegionBytes(quant, width));
  if (quant != kernels::KvQuant::kNone) {
    const int64_t n = kernels::KvqGroupsPerHead(quant, width) * kernels::KvqScalesPerGroup(quant) * 2;
    const uint8_t* sc = reinterpret_cast<const uint8_t*>(kernels::KvqTokenScales(
                            const_cast<uint8_t*>(bytes.data()), quant, block_size, kv_heads, width, cs)) + g * n;
    e.insert(e.end(), sc, sc + n);
  }
  return e;
}

// A CPU backend plan of one decode row per sequence (`lens` keys each, block tables `tables` of
// `max_blocks` per sequence): what the CPU references' attention calls run over. `batch` points
// into the vectors given and into qstart.
struct CpuDecodePlan {
  std::vector<int32_t> qstart;
  AttentionBatch batch;
  std::unique_ptr<AttentionPlan> plan;
};
inline std::unique_ptr<CpuDecodePlan> PlanCpuDecode(Backend& cpu, const std::vector<int32_t>& lens,
                                                    const std::vector<int32_t>& tables, int max_blocks,
                                                    int block_size) {
  auto d = std::make_unique<CpuDecodePlan>();
  const int S = static_cast<int>(lens.size());
  d->qstart.resize(S + 1);
  for (int s = 0; s <= S; ++s) d->qstart[s] = s;
  AttentionBatch& b = d->batch;
  b.num_seqs = S;
  b.num_tokens = S;
  b.max_seq_len = S > 0 ? *std::max_element(lens.begin(), lens.end()) : 0;
  b.max_blocks_per_seq = max_blocks;
  b.block_size = block_size;
  b.query_start = b.host_query_start = d->qstart.data();
  b.seq_lens = b.host_seq_lens = lens.data();
  b.block_tables = tables.data();
  auto plan = cpu.CreateAttentionPlan({S, S, max_blocks});
  CHECK_OK(plan.status());
  d->plan = *std::move(plan);
  CHECK_OK(cpu.PlanAttention(b, *d->plan));
  return d;
}

// One layer's policy states of sequences of `lens` positions over `kv_heads` KV heads, as the
// policy kernel tests start from: the CPU states (random last_hits, then the policy's choice at a
// 30 % budget, window and recent 8, sinks 4, marks the victims: kDead under CORM, kLow under MiKV;
// choose() off afterwards, so the attention under test only records importance), and their device
// mirror before any attention (capacity len + 5, sentinels past each length: 9 states, -7 slots,
// -3 last_hits), not yet uploaded.
struct RandomPolicyStates {
  kvpolicy::KvPolicyConfig config;
  std::vector<kvpolicy::LayerShape> layers;
  std::vector<std::unique_ptr<kvpolicy::SequenceKvPolicy>> owned;
  std::vector<kvpolicy::SequenceKvPolicy*> ptrs;
  std::vector<std::vector<uint8_t>> dstate;
  std::vector<std::vector<int32_t>> dslot, dlast;
  std::vector<KvPolicySeq> seqs;  // capacity and seq_len set
  int64_t dead = 0;               // kDead entries over every sequence and head
  int64_t low = 0;                // kLow entries (MiKV) over every sequence and head
};
using RandomCormStates = RandomPolicyStates;

// How MakeRandomPolicyStates draws and chooses.
struct RandomStatesSpec {
  kvpolicy::KvPolicyKind kind = kvpolicy::KvPolicyKind::kCorm;
  int low_bits = 4;    // MiKV's
  bool choose = true;  // false: no choice, every key stays kFull (dead and low 0)
  // The share of the keys whose last_hit is drawn in [max(p, len - window), len - 2] (recently
  // important, but not by the last query: CORM's w rule keeps them, the budget chooses among
  // them) rather than in [p, len - 1] (where the w rule takes all but ~8 ln(len) keys of a long
  // sequence). 0: every draw from [p, len - 1], one draw per key (the CORM tests' data).
  double recent_share = 0;
  // MiKV: the sequences of odd index first lose keys to CORM's budget-free choice over last_hits
  // of their own (a quarter of the keys drawn from [p, len - 1], the rest len - 1), so kDead keys
  // lie beside kLow ones: a mix MiKV alone never makes, but the kernels take any state byte.
  bool dead_too = false;
};

// last_hit[p] for p < len as RandomStatesSpec::recent_share says.
inline void DrawLastHits(std::mt19937& rng, int len, int window, double recent_share, int32_t* last_hit) {
  std::bernoulli_distribution recent(recent_share > 0 ? recent_share : 0.0);
  for (int p = 0; p < len; ++p) {
    const int lo = std::max(p, len - window), hi = len - 2;
    if (recent_share > 0 && recent(rng) && lo <= hi) {
      last_hit[p] = std::uniform_int_distribution<int>(lo, hi)(rng);
    } else {
      last_hit[p] = std::uniform_int_distribution<int>(p, len - 1)(rng);
    }
  }
}

// `layer`: the layer's widths (K and V per KV head; MiKV: its slot regions). The result is
// heap-allocated: the states point at its config and layers.
inline std::unique_ptr<RandomPolicyStates> MakeRandomPolicyStates(const kvpolicy::LayerShape& layer, int kv_heads,
                                                                  const std::vector<int32_t>& lens, std::mt19937& rng,
                                                                  const RandomStatesSpec& spec) {
  auto r = std::make_unique<RandomPolicyStates>();
  r->config.kind = spec.kind;
  r->config.low_bits = spec.low_bits;
  r->config.window = 8;
  r->config.recent = 8;
  r->config.sinks = 4;
  r->config.budget_fraction = 0.3;
  r->layers = {layer};
  const int S = static_cast<int>(lens.size()), G = kv_heads;
  for (int s = 0; s < S; ++s) {
    r->owned.push_back(std::make_unique<kvpolicy::SequenceKvPolicy>(&r->config, &r->layers, G, 0));
    kvpolicy::SequenceKvPolicy& st = *r->owned.back();
    st.Extend(lens[s]);
    for (int g = 0; g < G; ++g) {
      int32_t* lh = st.last_hit(0, g);
      if (spec.choose && spec.dead_too && spec.kind == kvpolicy::KvPolicyKind::kMikv && s % 2 == 1) {
        std::bernoulli_distribution old(0.25);
        for (int p = 0; p < lens[s]; ++p) {
          lh[p] = old(rng) ? std::uniform_int_distribution<int>(p, lens[s] - 1)(rng) : lens[s] - 1;
        }
        r->config.kind = kvpolicy::KvPolicyKind::kCorm;
        r->config.budget_fraction = 0;
        st.Apply(0, g, {}, nullptr);
        r->config.kind = spec.kind;
        r->config.budget_fraction = 0.3;
      }
      DrawLastHits(rng, lens[s], r->config.window, spec.recent_share, lh);
      if (spec.choose) st.Apply(0, g, {}, nullptr);
    }
    st.set_choose(false);
    r->ptrs.push_back(&st);
  }
  r->dstate.resize(S);
  r->dslot.resize(S);
  r->dlast.resize(S);
  r->seqs.resize(S);
  for (int s = 0; s < S; ++s) {
    const int cap = lens[s] + 5;  // capacity past the length: strides are capacity, not len
    r->dstate[s].assign(static_cast<size_t>(G) * cap, 9);
    r->dslot[s].assign(static_cast<size_t>(G) * cap, -7);
    r->dlast[s].assign(static_cast<size_t>(G) * cap, -3);
    for (int g = 0; g < G; ++g) {
      for (int p = 0; p < lens[s]; ++p) {
        r->dstate[s][g * cap + p] = static_cast<uint8_t>(r->ptrs[s]->state(0, g, p));
        r->dslot[s][g * cap + p] = static_cast<int32_t>(r->ptrs[s]->slot(0, g, p));
        r->dlast[s][g * cap + p] = r->ptrs[s]->last_hit(0, g)[p];
        r->dead += r->ptrs[s]->state(0, g, p) == kvpolicy::SlotState::kDead;
        r->low += r->ptrs[s]->state(0, g, p) == kvpolicy::SlotState::kLow;
      }
    }
    r->seqs[s].capacity = cap;
    r->seqs[s].seq_len = lens[s];
  }
  return r;
}

// CORM's states as above (one draw per key from [p, len - 1]). `choose` false: no choice, every key
// stays kFull (dead 0).
inline std::unique_ptr<RandomCormStates> MakeRandomCormStates(const kvpolicy::LayerShape& layer, int kv_heads,
                                                              const std::vector<int32_t>& lens, std::mt19937& rng,
                                                              bool choose = true) {
  RandomStatesSpec spec;
  spec.choose = choose;
  return MakeRandomPolicyStates(layer, kv_heads, lens, rng, spec);
}

// MiKV's per-(layer, KV head) device arrays of some sequences (kernels/kv_policy.cuh KvPolicySeq
// low_base, num_packed, balance_set, balance, q_absmax), one buffer: per sequence [3][heads] int32
// (low_base, num_packed, balance_set), then [2][heads][head_dim] fp32 (balance, q_absmax).
struct MikvHeadArrays {
  DeviceBuffer buf;
  size_t seq_bytes = 0;  // one sequence's arrays
  int heads = 0, head_dim = 0;
  // Read from a host copy of buf (GetAll<uint8_t>): sequence s, (layer, head) index i.
  const int32_t* Ints(const std::vector<uint8_t>& b, int s) const {
    return reinterpret_cast<const int32_t*>(b.data() + seq_bytes * s);
  }
  int32_t LowBase(const std::vector<uint8_t>& b, int s, int i) const { return Ints(b, s)[i]; }
  int32_t NumPacked(const std::vector<uint8_t>& b, int s, int i) const { return Ints(b, s)[heads + i]; }
  int32_t BalanceSet(const std::vector<uint8_t>& b, int s, int i) const { return Ints(b, s)[2 * heads + i]; }
  const float* Balance(const std::vector<uint8_t>& b, int s, int i) const {
    return reinterpret_cast<const float*>(b.data() + seq_bytes * s + 12 * heads) + static_cast<size_t>(i) * head_dim;
  }
};

// Allocates the arrays of `seqs`, zeros (no run, balance unset), and points each entry at its
// sequence's. Call before Upload (it copies the entries).
inline MikvHeadArrays AttachMikvHeads(Backend& be, std::vector<KvPolicySeq>* seqs, int heads, int head_dim) {
  MikvHeadArrays m;
  m.heads = heads;
  m.head_dim = head_dim;
  m.seq_bytes = 12 * static_cast<size_t>(heads) + 8 * static_cast<size_t>(heads) * head_dim;
  m.buf = PutRaw(be, std::vector<uint8_t>(m.seq_bytes * seqs->size(), 0));
  for (size_t s = 0; s < seqs->size(); ++s) {
    KvPolicySeq& e = (*seqs)[s];
    uint8_t* h = m.buf.as<uint8_t>() + m.seq_bytes * s;
    e.low_base = reinterpret_cast<int32_t*>(h);
    e.num_packed = e.low_base + heads;
    e.balance_set = e.low_base + 2 * heads;
    e.balance = reinterpret_cast<float*>(h + 12 * heads);
    e.q_absmax = e.balance + static_cast<size_t>(heads) * head_dim;
  }
  return m;
}

// The CPU reference's compaction of one sequence (as worker/model_runner.cc runs it):
// SequenceKvPolicy::Compact from `from` to the slots it needs, then the CPU backend's
// CompactKvHeads over `layers` (the sequence's block table `table`), MiKV's runs included.
inline absl::Status CompactOnCpu(Backend& cpu, kvpolicy::SequenceKvPolicy& st, absl::Span<const KvLayer> layers,
                                 const int32_t* table, int block_size, int num_blocks, int64_t from) {
  std::vector<kvpolicy::SlotMove> moves;
  std::vector<kvpolicy::LowRepack> low;
  if (absl::Status s = st.Compact(from, st.SlotsNeeded(from), &moves, &low); !s.ok()) return s;
  const KvCacheCompaction c = ToCacheCompaction(st, moves, low, table, block_size);
  return cpu.CompactKvHeads(layers, block_size, num_blocks, c.moves, c.runs, st.config().low_bits);
}

}  // namespace lorc::policy_test
