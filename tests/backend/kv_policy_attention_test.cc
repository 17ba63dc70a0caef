// CPU attention under a token-level KV policy (backend.h KvPolicyAttention, kvpolicy/): the
// full-KV path (DecodeAttention / PrefillAttention) and the LoRC latent path (LatentAttention)
// read only the slots a sequence's policy keeps (kDead skipped, kLow read as int4 entries) and
// equal a dense fp64 reference over exactly those entries (tolerance 1e-4 relative,
// as the other attention tests); record last_hit where a query gives probability >= 1/t; apply
// the budget after the step; and never write the paged cache. One batch: a decode, a prefill
// chunk over a prefix-cache hit (pinned), and a sequence without a policy.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "backend/backend.h"
#include "backend/cpu_kernels.h"
#include "common/status_macros.h"
#include "gtest/gtest.h"
#include "kvpolicy/sequence_policy.h"

namespace lorc {
namespace {

using kvpolicy::KvPolicyKind;
using kvpolicy::SlotState;

constexpr int kHeads = 4, kKvHeads = 2, kHd = 16, kGroup = kHeads / kKvHeads;
constexpr int kRk = 6, kRv = 5;  // latent ranks
constexpr int32_t kBs = 4, kBlocks = 24, kMaxBlocks = 10;

std::vector<float> Random(std::mt19937& rng, size_t n) {
  std::normal_distribution<float> d(0.f, 1.f);
  std::vector<float> v(n);
  for (float& x : v) x = d(rng);
  return v;
}

// Rotate-half RoPE of one head vector at `pos`, fp32 angles as the backend, in double.
std::vector<double> Rope(const std::vector<double>& x, int pos, const std::vector<float>& inv_freq) {
  const int half = static_cast<int>(x.size()) / 2;
  std::vector<double> y(x.size());
  for (int i = 0; i < half; ++i) {
    const float angle = static_cast<float>(pos) * inv_freq[i];
    const double c = std::cos(static_cast<double>(angle)), s = std::sin(static_cast<double>(angle));
    y[i] = x[i] * c - x[i + half] * s;
    y[i + half] = x[i + half] * c + x[i] * s;
  }
  return y;
}

struct Seq {
  int cached, fresh;
  std::vector<int32_t> table;
  int64_t pinned;
  bool has_policy;
};

class KvPolicyAttentionTest : public ::testing::TestWithParam<std::tuple<KvPolicyKind, bool>> {
 protected:
  void SetUp() override {
    auto b = CreateBackend(BackendOptions{BackendKind::kCpu});
    ASSERT_TRUE(b.ok()) << b.status();
    be_ = std::move(*b);
    ASSERT_TRUE(be_->SupportsKvPolicy());
  }
  std::unique_ptr<Backend> be_;
};

TEST_P(KvPolicyAttentionTest, ReadsKeptEntriesOnlyAndMatchesDenseReference) {
  const auto [kind, latent] = GetParam();
  std::mt19937 rng(latent ? 5 : 9);
  const std::vector<Seq> seqs = {{37, 1, {11, 3, 7, 0, 14, 5, 20, 9, 1, 2}, 0, true},
                                 {25, 5, {4, 6, 8, 10, 12, 13, 15, 16}, 8, true},
                                 {19, 1, {17, 18, 19, 21, 22}, 0, false}};
  const int S = static_cast<int>(seqs.size());
  const int64_t kw = kKvHeads * (latent ? kRk : kHd), vw = kKvHeads * (latent ? kRv : kHd);
  const int64_t khw = kw / kKvHeads, vhw = vw / kKvHeads, ow = kHeads * (latent ? kRv : kHd);
  std::vector<int32_t> qstart = {0}, seq_lens, tables(S * kMaxBlocks, 0);
  for (int s = 0; s < S; ++s) {
    qstart.push_back(qstart.back() + seqs[s].fresh);
    seq_lens.push_back(seqs[s].cached + seqs[s].fresh);
    std::copy(seqs[s].table.begin(), seqs[s].table.end(), tables.begin() + s * kMaxBlocks);
  }
  const int T = qstart.back();
  std::vector<float> kc = Random(rng, kBlocks * kBs * kw), vc = Random(rng, kBlocks * kBs * vw);
  const std::vector<float> kc0 = kc, vc0 = vc;
  const std::vector<float> q = Random(rng, T * kHeads * kHd);
  const std::vector<float> k_up = Random(rng, kKvHeads * kHd * kRk);
  std::vector<float> inv_freq(kHd / 2);
  for (int i = 0; i < kHd / 2; ++i) inv_freq[i] = static_cast<float>(std::pow(10000.0, -2.0 * i / kHd));
  // Scale q so that attention is peaked enough for the policy to see structure.
  std::vector<float> qs = q;
  for (float& x : qs) x *= 2.f;

  kvpolicy::KvPolicyConfig config;
  config.kind = kind;
  config.window = 4;
  config.recent = 5;  // covers the prefill chunk: step 2 runs the same queries again
  config.sinks = 2;
  config.budget_tokens = 10;
  const std::vector<kvpolicy::LayerShape> layers = {{khw, vhw, !latent, (khw + vhw) * 4}};
  std::vector<std::unique_ptr<kvpolicy::SequenceKvPolicy>> states;
  std::vector<kvpolicy::SequenceKvPolicy*> ptrs;
  for (const Seq& s : seqs) {
    states.push_back(std::make_unique<kvpolicy::SequenceKvPolicy>(&config, &layers, kKvHeads, s.pinned));
    states.back()->Extend(s.cached + s.fresh);
    ptrs.push_back(s.has_policy ? states.back().get() : nullptr);
  }

  AttentionBatch batch;
  batch.num_seqs = S;
  batch.num_tokens = T;
  batch.max_seq_len = *std::max_element(seq_lens.begin(), seq_lens.end());
  batch.max_blocks_per_seq = kMaxBlocks;
  batch.block_size = kBs;
  batch.query_start = batch.host_query_start = qstart.data();
  batch.seq_lens = batch.host_seq_lens = seq_lens.data();
  batch.block_tables = tables.data();
  auto plan = be_->CreateAttentionPlan({S, T, kMaxBlocks});
  ASSERT_TRUE(plan.ok());
  ASSERT_TRUE(be_->PlanAttention(batch, **plan).ok());
  std::vector<float> out(T * ow, 0.f);
  const KvLayer cache{kc.data(), vc.data(), kw, vw, DType::kF32};
  const float scale = 1.0f / std::sqrt(static_cast<float>(kHd));
  auto run = [&] {
    if (latent) {
      LatentAttentionParams p;
      p.q = Tensor2D{qs.data(), DType::kF32, T, kHeads * kHd, kHeads * kHd};
      p.k_up = Tensor2D{const_cast<float*>(k_up.data()), DType::kF32, kKvHeads * kHd, kRk, kRk};
      p.out = Tensor2D{out.data(), DType::kF32, T, ow, ow};
      p.cache = cache;
      p.num_heads = kHeads;
      p.num_kv_heads = kKvHeads;
      p.head_dim = kHd;
      p.k_rank = kRk;
      p.v_rank = kRv;
      p.scale = scale;
      p.inv_freq = inv_freq.data();
      p.kv_policy = {ptrs.data(), 0};
      ASSERT_TRUE(be_->LatentAttention(p, **plan).ok());
    } else {
      AttentionParams p;
      p.q = Tensor2D{qs.data(), DType::kF32, T, kHeads * kHd, kHeads * kHd};
      p.out = Tensor2D{out.data(), DType::kF32, T, ow, ow};
      p.cache = cache;
      p.num_heads = kHeads;
      p.num_kv_heads = kKvHeads;
      p.head_dim = kHd;
      p.scale = scale;
      p.kv_policy = {ptrs.data(), 0};
      ASSERT_TRUE(be_->DecodeAttention(p, **plan).ok());
      ASSERT_TRUE(be_->PrefillAttention(p, **plan).ok());
    }
  };
  // The dense fp64 reference over the entries each sequence's policy keeps now: full ones from
  // the cache, low ones as the policy dequantizes them; query i attends kept positions <= its own.
  // Also returns, per (seq, head g, kept position), the largest probability any query head of the
  // group gave it from the last query (for the importance check).
  struct Ref {
    std::vector<double> out;
    std::vector<std::vector<std::vector<double>>> pmax;  // [s][g][pos]: max p by any query
  };
  auto reference = [&] {
    Ref r;
    r.out.assign(T * ow, 0.0);
    r.pmax.assign(S, std::vector<std::vector<double>>(kKvHeads));
    for (int s = 0; s < S; ++s) {
      const int len = seq_lens[s];
      for (int g = 0; g < kKvHeads; ++g) {
        r.pmax[s][g].assign(len, -1.0);
        std::vector<int> pos;
        std::vector<std::vector<double>> keys, vals;
        for (int t = 0; t < len; ++t) {
          const SlotState st = ptrs[s] ? ptrs[s]->state(0, g, t) : SlotState::kFull;
          if (st == SlotState::kDead) continue;
          std::vector<float> k(khw), v(vhw);
          if (st == SlotState::kLow) {
            // Not packed (no compaction here): the full slot's values, encoded and decoded.
            EXPECT_EQ(ptrs[s]->low_entry(0, g, t), -1);
            const int64_t slot = static_cast<int64_t>(seqs[s].table[t / kBs]) * kBs + t % kBs;
            const int bits = config.low_bits;
            std::vector<uint8_t> ke(kvpolicy::LowEntryBytes(khw, bits)), ve(kvpolicy::LowEntryBytes(vhw, bits));
            std::vector<float> scratch(khw);
            kvpolicy::EncodeLowEntry(&kc0[slot * kw + g * khw], khw, bits, ptrs[s]->balance(0, g),
                                     scratch.data(), ke.data());
            kvpolicy::DecodeLowEntry(ke.data(), khw, bits, ptrs[s]->balance(0, g), k.data());
            kvpolicy::EncodeLowEntry(&vc0[slot * vw + g * vhw], vhw, bits, nullptr, scratch.data(), ve.data());
            kvpolicy::DecodeLowEntry(ve.data(), vhw, bits, nullptr, v.data());
          } else {
            const int64_t slot = static_cast<int64_t>(seqs[s].table[t / kBs]) * kBs + t % kBs;
            std::copy_n(&kc0[slot * kw + g * khw], khw, k.begin());
            std::copy_n(&vc0[slot * vw + g * vhw], vhw, v.begin());
          }
          std::vector<double> key(kHd);
          if (latent) {
            for (int i = 0; i < kHd; ++i) {
              double acc = 0;
              for (int j = 0; j < kRk; ++j) acc += static_cast<double>(k_up[(g * kHd + i) * kRk + j]) * k[j];
              key[i] = static_cast<float>(acc);  // the backend reconstructs in fp32
            }
            key = Rope(key, t, inv_freq);
          } else {
            key.assign(k.begin(), k.end());
          }
          pos.push_back(t);
          keys.push_back(key);
          vals.emplace_back(v.begin(), v.end());
        }
        for (int hh = 0; hh < kGroup; ++hh) {
          const int h = g * kGroup + hh;
          for (int i = 0; i < seqs[s].fresh; ++i) {
            const int row = qstart[s] + i, qpos = seqs[s].cached + i;
            std::vector<double> sc;
            double mx = -1e300;
            for (size_t j = 0; j < pos.size() && pos[j] <= qpos; ++j) {
              double dot = 0;
              for (int d = 0; d < kHd; ++d) dot += static_cast<double>(qs[(row * kHeads + h) * kHd + d]) * keys[j][d];
              sc.push_back(dot * scale);
              mx = std::max(mx, sc.back());
            }
            double sum = 0;
            for (double& x : sc) sum += (x = std::exp(x - mx));
            for (size_t j = 0; j < sc.size(); ++j) {
              const double p = sc[j] / sum;
              if (i == seqs[s].fresh - 1) r.pmax[s][g][pos[j]] = std::max(r.pmax[s][g][pos[j]], p * sc.size());
              for (int64_t c = 0; c < vhw; ++c) r.out[row * ow + h * vhw + c] += p * vals[j][c];
            }
          }
        }
      }
    }
    return r;
  };
  auto expect_close = [&](const std::vector<double>& want, const char* what) {
    int bad = 0;
    for (size_t i = 0; i < want.size(); ++i) {
      if (!(std::fabs(out[i] - want[i]) <= 1e-4 * std::max(1.0, std::fabs(want[i])))) {
        if (++bad <= 5) ADD_FAILURE() << what << " element " << i << ": " << out[i] << " vs " << want[i];
      }
    }
    EXPECT_EQ(bad, 0) << what;
  };

  // Step 1: every entry kept (fresh states).
  const Ref r1 = reference();
  run();
  expect_close(r1.out, "step 1");
  // Importance from the last query of each policy sequence: p >= 1/t (pmax = p * t >= 1)
  // exactly where last_hit reached that query's position (entries within 1e-6 of the threshold
  // skipped); the policy was applied after, so check positions still kept or demoted too.
  for (int s = 0; s < 2; ++s) {
    const int last_q = seq_lens[s] - 1;
    for (int g = 0; g < kKvHeads; ++g) {
      const int32_t* hit = states[s]->last_hit(0, g);
      for (int t = 0; t < seq_lens[s]; ++t) {
        const double x = r1.pmax[s][g][t];
        if (std::fabs(x - 1.0) < 1e-5) continue;
        EXPECT_EQ(hit[t] == last_q, x > 1.0 || t == last_q) << "seq " << s << " head " << g << " key " << t;
      }
    }
  }
  // The policy was applied after the step: at most 10 full-precision entries per head, or the
  // protected ones when more (seq 1: pinned 8 + recent 5 = 13); CORM dropped the rest, MiKV
  // kept them low.
  for (int s = 0; s < 2; ++s) {
    for (int g = 0; g < kKvHeads; ++g) {
      const kvpolicy::EntryCounts n = states[s]->Counts(0, g);
      if (s == 0) {
        EXPECT_LE(n.full, 10);
        EXPECT_GT(n.full, 7) << "some key beyond sinks and recent was important to the query";
      } else {
        EXPECT_EQ(n.full, 13);
      }
      EXPECT_GT(kind == KvPolicyKind::kMikv ? n.low : n.dead, 0);
      EXPECT_EQ(kind == KvPolicyKind::kMikv ? n.low : n.dead, seq_lens[s] - n.full);
      for (int t = 0; t < std::max<int64_t>(2, seqs[s].pinned); ++t) {
        EXPECT_EQ(states[s]->state(0, g, t), SlotState::kFull) << "sink / pinned " << t;
      }
      for (int t = seq_lens[s] - config.recent; t < seq_lens[s]; ++t) {
        EXPECT_EQ(states[s]->state(0, g, t), SlotState::kFull) << "recent " << t;
      }
    }
  }
  EXPECT_EQ(states[2]->Counts(0, 0).full, seq_lens[2]) << "a sequence without a policy is untouched";

  // Step 2: the same queries over the policy's entries now (dead skipped, low dequantized).
  const Ref r2 = reference();
  run();
  expect_close(r2.out, "step 2");
  // The paged cache is never written: shared blocks keep their bytes.
  EXPECT_EQ(0, std::memcmp(kc.data(), kc0.data(), kc.size() * sizeof(float)));
  EXPECT_EQ(0, std::memcmp(vc.data(), vc0.data(), vc.size() * sizeof(float)));
}

INSTANTIATE_TEST_SUITE_P(
    Policies, KvPolicyAttentionTest,
    ::testing::Combine(::testing::Values(KvPolicyKind::kCorm, KvPolicyKind::kMikv), ::testing::Bool()),
    [](const auto& i) {
      return std::string(std::get<0>(i.param) == KvPolicyKind::kCorm ? "Corm" : "Mikv") +
             (std::get<1>(i.param) ? "Latent" : "FullKv");
    });

// MiKV's low entries in the paged cache (kvpolicy/README.md "Low entries in the paged cache"):
// a compaction (Backend::CompactKvHeads) packs each head's low entries, old and newly demoted,
// into one run after its full run, through a permuted block table, in the cache's own format;
// attention then reads exactly the values it read before (bitwise), over two compactions, while
// the sequence needs fewer slots than its tokens. A run whose slots are too few is refused.
struct LowCacheCase {
  const char* name;
  DType dtype;
  kernels::KvQuant quant;
  int bits;
};

void PrintTo(const LowCacheCase& c, std::ostream* os) { *os << c.name; }

class KvLowRunTest : public ::testing::TestWithParam<LowCacheCase> {};

TEST_P(KvLowRunTest, CompactionPacksLowEntriesAndAttentionReadsTheSameValues) {
  const LowCacheCase cc = GetParam();
  auto be = CreateBackend(BackendOptions{BackendKind::kCpu});
  ASSERT_TRUE(be.ok()) << be.status();
  constexpr int kW = 32, kH = 2, kBsz = 4, kNb = 12;
  KvLayer layer{nullptr, nullptr, kH * kW, kH * kW, cc.quant == kernels::KvQuant::kNone ? cc.dtype : DType::kU8};
  layer.quant = cc.quant;
  layer.num_kv_heads = kH;
  layer.block_size = kBsz;
  std::vector<uint8_t> kbuf(KvLayerBlockBytes(layer, false, kBsz) * kNb), vbuf(KvLayerBlockBytes(layer, true, kBsz) * kNb);
  layer.k = kbuf.data();
  layer.v = vbuf.data();
  const std::vector<int32_t> table = {7, 2, 9, 0, 4, 1, 8, 3, 11, 5, 6, 10};
  auto cache_slot = [&](int64_t s) { return static_cast<int64_t>(table[s / kBsz]) * kBsz + s % kBsz; };
  std::mt19937 rng(17);

  kvpolicy::KvPolicyConfig config;
  config.kind = KvPolicyKind::kMikv;
  config.low_bits = cc.bits;
  config.sinks = 1;
  config.recent = 2;
  config.window = 2;
  const std::vector<kvpolicy::LayerShape> layers = {
      {kW, kW, true, 0, KvHeadSlotBytes(layer, false), KvHeadSlotBytes(layer, true)}};
  kvpolicy::SequenceKvPolicy st(&config, &layers, kH, /*pinned=*/0);
  auto add_tokens = [&](int64_t len) {
    for (int64_t p = st.seq_len(); p < len; ++p) {
      const std::vector<float> k = Random(rng, kH * kW), v = Random(rng, kH * kW);
      const int64_t slot = cache_slot(p - st.slot_offset());
      cpu_internal::StoreKvRow(layer, false, slot, k.data());
      cpu_internal::StoreKvRow(layer, true, slot, v.data());
    }
    st.Extend(len);
  };
  std::vector<int32_t> kept;
  std::vector<float> k, v;
  auto gather = [&](int g) {
    return cpu_internal::GatherKeptHead(layer, &st, 0, table.data(), kBsz, static_cast<int>(st.seq_len()), 1, g,
                                        kW, kW, &kept, &k, &v);
  };
  // Demotes what no query found important: all but every third position (and sinks, recent).
  auto demote = [&] {
    for (int g = 0; g < kH; ++g) {
      const std::vector<float> q = Random(rng, kW);
      st.ObserveQueries(0, g, q.data(), 1, kW, 1, kW);
      ASSERT_GT(gather(g), 0);
      int32_t* hit = st.last_hit(0, g);
      for (int64_t p = 0; p < st.seq_len(); ++p) {
        if (p % 3 == 0) hit[p] = static_cast<int32_t>(st.seq_len() - 1);
      }
      st.Apply(0, g, kept, k.data());
    }
  };
  auto compact = [&]() -> absl::Status {
    const int64_t num_slots = st.SlotsNeeded(0);
    std::vector<kvpolicy::SlotMove> moves;
    std::vector<kvpolicy::LowRepack> low;
    EXPECT_LT(num_slots, st.num_slots()) << "the low entries take less than their full slots";
    RETURN_IF_ERROR(st.Compact(0, num_slots, &moves, &low));
    EXPECT_EQ(low.size(), static_cast<size_t>(kH));
    // The model runner's translation into cache slots (sequence slots through the block table).
    KvCacheCompaction plan = ToCacheCompaction(st, moves, low, table.data(), kBsz);
    const std::vector<KvHeadMove>& cache_moves = plan.moves;
    const std::vector<KvLowRun>& runs = plan.runs;
    EXPECT_EQ(cache_moves.size(), moves.size());
    for (size_t r = 0; r < runs.size(); ++r) {
      EXPECT_EQ(runs[r].new_slots.size(), static_cast<size_t>(st.LowRunSlotsOf(0, static_cast<int64_t>(low[r].sources.size()))));
      if (!runs[r].new_slots.empty()) {
        EXPECT_EQ(runs[r].new_slots[0], cache_slot(low[r].new_base));
      }
    }
    // Too few slots for run 0 is refused before anything is written.
    std::vector<KvLowRun> short_runs = runs;
    short_runs[0].new_slots.pop_back();
    const absl::Status refused = (*be)->CompactKvHeads({layer}, kBsz, kNb, cache_moves, short_runs, cc.bits);
    EXPECT_EQ(refused.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(refused.message().find("low run 0"), std::string::npos) << refused;
    return (*be)->CompactKvHeads({layer}, kBsz, kNb, cache_moves, runs, cc.bits);
  };
  for (int64_t len : {30, 38}) {
    add_tokens(len);
    demote();
    std::vector<std::vector<float>> k0(kH), v0(kH);
    for (int g = 0; g < kH; ++g) {
      ASSERT_GT(gather(g), 0);
      EXPECT_GT(st.Counts(0, g).low, 0);
      k0[g] = k;
      v0[g] = v;
    }
    ASSERT_TRUE(compact().ok());
    for (int g = 0; g < kH; ++g) {
      ASSERT_GT(gather(g), 0);
      EXPECT_EQ(k, k0[g]) << "keys of head " << g << " after compacting " << len << " tokens";
      EXPECT_EQ(v, v0[g]) << "values of head " << g << " after compacting " << len << " tokens";
      for (int64_t p = 0; p < st.seq_len(); ++p) {
        if (st.state(0, g, p) == SlotState::kLow) {
          EXPECT_GE(st.low_entry(0, g, p), 0) << "packed";
        }
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Caches, KvLowRunTest,
    ::testing::Values(LowCacheCase{"f32_int4", DType::kF32, kernels::KvQuant::kNone, 4},
                      LowCacheCase{"bf16_int2", DType::kBF16, kernels::KvQuant::kNone, 2},
                      LowCacheCase{"int8_int4", DType::kU8, kernels::KvQuant::kInt8, 4},
                      LowCacheCase{"int4_int2", DType::kU8, kernels::KvQuant::kInt4, 2}),
    [](const auto& i) { return std::string(i.param.name); });

// The threshold is exactly 1/t: a probability equal to 1/t counts, the next float below does not.
TEST(RecordImportanceTest, ThresholdIsExactlyOneOverT) {
  // Two queries (positions 8 and 9 of a 10-token sequence) over n = 5 kept keys at positions
  // {0, 3, 5, 8, 9}: query 0 attends 4 keys (t = 4), query 1 attends 5 (t = 5).
  const std::vector<int32_t> kept = {0, 3, 5, 8, 9};
  std::vector<int32_t> hit = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9};
  const float a = 1.0f / 4, b = 1.0f / 5;
  const std::vector<float> probs = {a, std::nextafter(a, 0.f), 1 - a - std::nextafter(a, 0.f), 0, 0,
                                    std::nextafter(b, 0.f), b, b, 1.0f, b};
  cpu_internal::RecordImportance(probs.data(), 2, 5, 10, kept.data(), hit.data());
  EXPECT_EQ(hit[0], 8);  // p = 1/4 from query 0 (position 8); just below 1/5 from query 1
  EXPECT_EQ(hit[3], 9);  // just below 1/4 from query 0, exactly 1/5 from query 1
  EXPECT_EQ(hit[5], 9);  // 0.5 - eps >= 1/4 from query 0, then 1/5 from query 1
  EXPECT_EQ(hit[8], 9);
  EXPECT_EQ(hit[9], 9);
  EXPECT_EQ(hit[1], 1);  // not kept: untouched
}

}  // namespace
}  // namespace lorc
