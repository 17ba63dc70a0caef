// The token-level KV policy's invariants (kvpolicy/): flag parsing and checks, CORM's choice
// (sinks, recent and pinned positions always kept; the w rule; the budget respected, keeping the
// most recently important), MiKV's low-precision round trip within its stated bound, and the
// state's bookkeeping. The attention side (dead slots skipped, low ones read, importance at
// exactly 1/t, the paged cache never written) is tests/backend/kv_policy_attention_test.cc.
#include <algorithm>
#include <cmath>
#include <memory>
#include <random>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/kv_quant.h"
#include "kvpolicy/kv_policy_config.h"
#include "kvpolicy/low_precision.h"
#include "kvpolicy/sequence_policy.h"

namespace lorc::kvpolicy {
namespace {

using ::testing::HasSubstr;

constexpr uint8_t kFull = static_cast<uint8_t>(SlotState::kFull);

TEST(KvPolicyConfigTest, ParsesKindsAndBudgets) {
  EXPECT_EQ(*ParseKvPolicyKind("corm"), KvPolicyKind::kCorm);
  EXPECT_EQ(*ParseKvPolicyKind("mikv"), KvPolicyKind::kMikv);
  EXPECT_EQ(*ParseKvPolicyKind("none"), KvPolicyKind::kNone);
  EXPECT_THAT(ParseKvPolicyKind("h2o").status().message(), HasSubstr("--kv-policy: 'h2o'"));
  KvPolicyConfig c;
  ASSERT_TRUE(ParseKvTokenBudget("0.3", &c).ok());
  EXPECT_DOUBLE_EQ(c.budget_fraction, 0.3);
  EXPECT_EQ(c.budget_tokens, 0);
  EXPECT_EQ(c.BudgetFor(100), 30);
  EXPECT_EQ(c.BudgetFor(101), 31);  // ceil
  ASSERT_TRUE(ParseKvTokenBudget("50%", &c).ok());
  EXPECT_DOUBLE_EQ(c.budget_fraction, 0.5);
  ASSERT_TRUE(ParseKvTokenBudget("512", &c).ok());
  EXPECT_EQ(c.budget_tokens, 512);
  EXPECT_EQ(c.budget_fraction, 0.0);
  EXPECT_EQ(c.BudgetFor(4096), 512);
  for (const char* bad : {"abc", "0", "-3", "0.0", "1.5", "150%", "0%", "nan", "", "1e9x"}) {
    const absl::Status s = ParseKvTokenBudget(bad, &c);
    EXPECT_FALSE(s.ok()) << bad;
    EXPECT_THAT(s.message(), HasSubstr("--kv-token-budget")) << bad;
  }
  EXPECT_THAT(ParseKvTokenBudget("99999999999999999999", &c).message(), HasSubstr("is too large a count"));
  EXPECT_THAT(ParseKvTokenBudget("abc", &c).message(), HasSubstr("is not a number"));
}

TEST(KvPolicyConfigTest, PrefillModeParsesAndDecidesTheChoicePoints) {
  EXPECT_EQ(*ParseKvPolicyPrefill("after-prompt"), KvPolicyPrefill::kAfterPrompt);
  EXPECT_EQ(*ParseKvPolicyPrefill("every-chunk"), KvPolicyPrefill::kEveryChunk);
  EXPECT_THAT(ParseKvPolicyPrefill("once").status().message(),
              HasSubstr("--kv-policy-prefill: 'once' is not one of after-prompt, every-chunk"));
  KvPolicyConfig c;
  EXPECT_EQ(c.prefill, defaults::kPrefill);
  EXPECT_EQ(c.prefill, KvPolicyPrefill::kAfterPrompt);
  c.kind = KvPolicyKind::kCorm;
  EXPECT_FALSE(c.ChoosesAfterStep(/*prompt_done=*/false, 256));
  EXPECT_TRUE(c.ChoosesAfterStep(true, 100));
  EXPECT_THAT(c.Describe(), HasSubstr("after-prompt"));
  c.prefill_interval = 64;  // after-prompt ignores it
  EXPECT_FALSE(c.ChoosesAfterStep(false, 128));
  c.prefill = KvPolicyPrefill::kEveryChunk;
  c.prefill_interval = 0;  // every step
  EXPECT_TRUE(c.ChoosesAfterStep(false, 37));
  EXPECT_TRUE(c.ChoosesAfterStep(true, 37));
  EXPECT_EQ(c.Describe(), "corm budget-free (w 32, r 32, sinks 4, every-chunk)");
  // At multiples of the interval (where the scheduler ends prompt chunks) and at the prompt's end.
  c.prefill_interval = 64;
  EXPECT_FALSE(c.ChoosesAfterStep(false, 37));
  EXPECT_FALSE(c.ChoosesAfterStep(false, 65));
  EXPECT_TRUE(c.ChoosesAfterStep(false, 64));
  EXPECT_TRUE(c.ChoosesAfterStep(false, 192));
  EXPECT_TRUE(c.ChoosesAfterStep(true, 37));
  EXPECT_TRUE(ValidateKvPolicyConfig(c).ok());
  EXPECT_EQ(c.Describe(), "corm budget-free (w 32, r 32, sinks 4, every-chunk 64)");
  c.prefill_interval = -1;
  EXPECT_THAT(ValidateKvPolicyConfig(c).message(), HasSubstr("prefill_interval: -1 is negative"));
}

TEST(KvPolicyConfigTest, ValidationNamesTheFlag) {
  KvPolicyConfig c;
  EXPECT_TRUE(ValidateKvPolicyConfig(c).ok());
  c.kind = KvPolicyKind::kCorm;
  c.window = 0;
  EXPECT_THAT(ValidateKvPolicyConfig(c).message(), HasSubstr("--kv-policy-window"));
  c.window = 8;
  c.recent = -1;
  EXPECT_THAT(ValidateKvPolicyConfig(c).message(), HasSubstr("--kv-policy-recent"));
  c.recent = 8;
  c.sinks = -2;
  EXPECT_THAT(ValidateKvPolicyConfig(c).message(), HasSubstr("--kv-policy-sinks"));
  c.sinks = 4;
  c.low_bits = 3;
  EXPECT_THAT(ValidateKvPolicyConfig(c).message(), HasSubstr("--kv-policy-low-bits"));
  c.low_bits = 2;
  c.budget_tokens = 11;  // < sinks + recent
  EXPECT_THAT(ValidateKvPolicyConfig(c).message(), HasSubstr("--kv-token-budget: a budget of 11 token(s)"));
  c.budget_tokens = 12;
  EXPECT_TRUE(ValidateKvPolicyConfig(c).ok());
  c.kind = KvPolicyKind::kNone;
  EXPECT_THAT(ValidateKvPolicyConfig(c).message(), HasSubstr("needs --kv-policy"));
}

// Budget-free: exactly the unprotected full positions no query of the last w hit.
TEST(SelectVictimsTest, WindowRuleKeepsSinksRecentPinnedAndRecentlyImportant) {
  KvPolicyConfig c;
  c.kind = KvPolicyKind::kCorm;
  c.window = 10;
  c.recent = 8;
  c.sinks = 4;
  const int64_t len = 100;
  std::vector<uint8_t> state(len, kFull);
  std::vector<int32_t> hit(len, 0);  // nothing important lately
  hit[50] = 90;                      // hit by the oldest query of the window [90, 100)
  hit[51] = 89;                      // just outside it
  state[60] = static_cast<uint8_t>(SlotState::kDead);  // already gone: not chosen again
  std::vector<int32_t> v;
  SelectVictims(c, len, /*pinned=*/0, state.data(), hit.data(), &v);
  std::vector<int32_t> want;
  for (int32_t p = 4; p < 92; ++p) {
    if (p != 50 && p != 60) want.push_back(p);
  }
  EXPECT_EQ(v, want);
  // A prefix-cache hit of 20 tokens: never chosen.
  SelectVictims(c, len, /*pinned=*/20, state.data(), hit.data(), &v);
  ASSERT_FALSE(v.empty());
  EXPECT_EQ(v.front(), 20);
  EXPECT_EQ(v.back(), 91);
}

// With a budget: the w rule first (every unprotected full position no query of the last w hit
// goes), then the full count ends at min(what the rule left, max(budget, protected)); protected
// positions stay, and every kept unprotected position was important no earlier than any victim.
TEST(SelectVictimsTest, BudgetKeepsTheMostRecentlyImportant) {
  std::mt19937 rng(7);
  int binding = 0;
  for (int trial = 0; trial < 300; ++trial) {
    KvPolicyConfig c;
    c.kind = trial % 2 ? KvPolicyKind::kMikv : KvPolicyKind::kCorm;
    c.window = 1 + static_cast<int32_t>(rng() % 64);
    c.recent = static_cast<int32_t>(rng() % 12);
    c.sinks = static_cast<int32_t>(rng() % 6);
    const int64_t len = 1 + rng() % 300;
    if (trial % 3 == 0) {
      c.budget_tokens = c.sinks + c.recent + static_cast<int64_t>(rng() % 40);
    } else {
      c.budget_fraction = 0.05 + 0.9 * (rng() % 1000) / 1000.0;
    }
    const int64_t pinned = trial % 5 == 0 ? static_cast<int64_t>(rng() % (len + 1)) : 0;
    std::vector<uint8_t> state(len, kFull);
    std::vector<int32_t> hit(len);
    for (int64_t p = 0; p < len; ++p) {
      if (rng() % 7 == 0) state[p] = static_cast<uint8_t>(SlotState::kDead);
      hit[p] = static_cast<int32_t>(p + rng() % (len - p + 1));  // >= p, <= len
    }
    std::vector<int32_t> v;
    SelectVictims(c, len, pinned, state.data(), hit.data(), &v);
    ASSERT_TRUE(std::is_sorted(v.begin(), v.end()));
    std::vector<uint8_t> after = state;
    for (int32_t p : v) {
      ASSERT_EQ(state[p], kFull);
      after[p] = 0;
    }
    const auto is_protected = [&](int64_t p) {
      return p < c.sinks || p < pinned || p >= len - c.recent;
    };
    int64_t full = 0, protected_full = 0, after_rule = 0;
    int32_t oldest_kept = INT32_MAX, newest_victim = INT32_MIN;
    for (int64_t p = 0; p < len; ++p) {
      full += after[p] == kFull;
      if (state[p] != kFull) continue;
      if (is_protected(p)) {
        EXPECT_EQ(after[p], kFull) << "protected position " << p << " evicted";
        ++protected_full;
        ++after_rule;
        continue;
      }
      if (hit[p] < len - c.window) {
        EXPECT_EQ(after[p], 0) << "position " << p << " unimportant to the last w queries kept";
      } else {
        ++after_rule;
      }
      if (after[p] == kFull) {
        oldest_kept = std::min(oldest_kept, hit[p]);
      } else {
        newest_victim = std::max(newest_victim, hit[p]);
      }
    }
    const int64_t budget = c.BudgetFor(len);
    binding += after_rule > budget;
    EXPECT_EQ(full, std::min(after_rule, std::max(budget, protected_full))) << "trial " << trial;
    if (!v.empty() && oldest_kept != INT32_MAX) {
      EXPECT_LE(newest_victim, oldest_kept);
    }
  }
  EXPECT_GT(binding, 50) << "the budget should bind in many trials";
}

// |x - dequantized| <= scale / 2 (+ fp32 rounding), scale = the entry's fp16 scale; and the
// scale is at most (max - min) / (2^bits - 1) plus fp16 rounding: int4 error <= range / 30.
TEST(LowPrecisionTest, RoundTripWithinHalfAStep) {
  std::mt19937 rng(11);
  std::normal_distribution<float> nd(0.f, 1.f);
  for (int bits : {4, 2}) {
    for (int64_t width : {1, 7, 64, 128}) {
      for (int trial = 0; trial < 50; ++trial) {
        std::vector<float> x(width);
        float amax = 0;
        for (float& e : x) {
          e = nd(rng) * (trial % 5 == 0 ? 30.f : 1.f);
          amax = std::max(amax, std::fabs(e));
        }
        if (trial % 7 == 0) x[rng() % width] = 50.f;  // an outlier channel
        amax = std::max(amax, 50.f * (trial % 7 == 0));
        std::vector<uint8_t> codes(LowCodeBytes(width, bits));
        LowParams p;
        QuantizeLow(x.data(), width, bits, codes.data(), &p);
        std::vector<float> y(width);
        DequantizeLow(codes.data(), p, width, bits, y.data());
        const float scale = ::lorc::kernels::KvqF16ToF32(p.scale);
        const float mn = *std::min_element(x.begin(), x.end()), mx = *std::max_element(x.begin(), x.end());
        EXPECT_LE(scale, (mx - mn) / ((1 << bits) - 1) * (1 + 1.0f / 512) + 1e-7f + std::fabs(mn) / 1024 / ((1 << bits) - 1));
        for (int64_t i = 0; i < width; ++i) {
          EXPECT_LE(std::fabs(x[i] - y[i]), 0.5f * scale + 1e-6f * amax)
              << "bits " << bits << " width " << width << " i " << i;
        }
      }
    }
  }
  EXPECT_EQ(LowEntryBytes(128, 4), 64 + 4);
  EXPECT_EQ(LowEntryBytes(128, 2), 32 + 4);
  EXPECT_EQ(LowCodeBytes(7, 4), 4);
}

// The state: new positions full and fresh; pinned positions never touched; CORM kills, MiKV
// keeps the victims as low entries whose values round-trip; balance divides back out.
TEST(SequenceKvPolicyTest, ApplyEvictsOrDemotesAndNeverTouchesPinned) {
  for (KvPolicyKind kind : {KvPolicyKind::kCorm, KvPolicyKind::kMikv}) {
    KvPolicyConfig c;
    c.kind = kind;
    c.sinks = 2;
    c.recent = 3;
    c.window = 4;
    c.budget_tokens = 8;
    const int64_t w = 16;
    std::vector<LayerShape> layers = {{w, w, true, 2 * w * 4}, {w, w / 2, false, 3 * w * 2}};
    SequenceKvPolicy s(&c, &layers, /*num_kv_heads=*/2, /*pinned=*/6);
    s.Extend(40);
    EXPECT_EQ(s.seq_len(), 40);
    EXPECT_EQ(s.last_hit(1, 1)[17], 17);
    std::mt19937 rng(3);
    std::normal_distribution<float> nd(0.f, 1.f);
    std::vector<int32_t> kept(40);
    for (int i = 0; i < 40; ++i) kept[i] = i;
    std::vector<float> q(5 * 2 * w), k(40 * w), v(40 * w);
    for (float& x : q) x = nd(rng);
    for (float& x : k) x = nd(rng);
    for (float& x : v) x = nd(rng);
    for (int layer = 0; layer < 2; ++layer) {
      const int64_t vw = layers[layer].v_width;
      s.ObserveQueries(layer, 0, q.data(), 5, 2 * w, 2, w);
      s.Apply(layer, 0, kept, k.data());
      const EntryCounts n = s.Counts(layer, 0);
      // Budget 8, but the protected positions are 9 (pinned 0..5, which hold the 2 sinks, and
      // the 3 recent): the budget cannot go below them.
      EXPECT_EQ(n.full, 9);
      for (int p = 0; p < 6; ++p) EXPECT_EQ(s.state(layer, 0, p), SlotState::kFull) << "pinned " << p;
      for (int p = 37; p < 40; ++p) EXPECT_EQ(s.state(layer, 0, p), SlotState::kFull) << "recent " << p;
      if (kind == KvPolicyKind::kCorm) {
        EXPECT_EQ(n.low, 0);
        EXPECT_EQ(n.dead, 40 - n.full);
      } else {
        EXPECT_EQ(n.dead, 0);
        EXPECT_EQ(n.low, 40 - n.full);
        std::vector<float> lk(w), lv(vw);
        for (int p = 0; p < 40; ++p) {
          if (s.state(layer, 0, p) != SlotState::kLow) continue;
          // What attention reads for it (not packed yet): its full values encoded and decoded.
          EXPECT_EQ(s.low_entry(layer, 0, p), -1);
          std::vector<uint8_t> entry(LowEntryBytes(w, 4));
          std::vector<float> scratch(w);
          EncodeLowEntry(&k[p * w], w, 4, s.balance(layer, 0), scratch.data(), entry.data());
          DecodeLowEntry(entry.data(), w, 4, s.balance(layer, 0), lk.data());
          EncodeLowEntry(&v[p * vw], vw, 4, nullptr, scratch.data(), entry.data());
          DecodeLowEntry(entry.data(), vw, 4, nullptr, lv.data());
          float kr = 0, vr = 0, ke = 0, ve = 0;
          for (int64_t i = 0; i < w; ++i) {
            kr = std::max(kr, std::fabs(k[p * w + i]));
            ke = std::max(ke, std::fabs(lk[i] - k[p * w + i]));
          }
          for (int64_t i = 0; i < vw; ++i) {
            vr = std::max(vr, std::fabs(v[p * vw + i]));
            ve = std::max(ve, std::fabs(lv[i] - v[p * vw + i]));
          }
          // int4 over a head vector: half a step of (max - min) / 15 <= 2 max|x| / 30; keys
          // balanced per channel (factors up to 64) get a looser bound.
          EXPECT_LE(ve, vr / 15 + 1e-5f) << "value " << p;
          EXPECT_LE(ke, kr * (layers[layer].balance_keys ? 1.0f : 1.0f / 15) + 1e-5f) << "key " << p;
        }
      }
      // The other head was not touched.
      EXPECT_EQ(s.Counts(layer, 1).full, 40);
    }
    // KV bytes: full entries at full_bytes, low ones at their entry size.
    double want = 0;
    for (int layer = 0; layer < 2; ++layer) {
      const EntryCounts n = s.Counts(layer, 0);
      want += 40.0 * layers[layer].full_bytes + n.full * layers[layer].full_bytes +
              n.low * static_cast<double>(LowEntryBytes(w, 4) + LowEntryBytes(layers[layer].v_width, 4));
    }
    EXPECT_DOUBLE_EQ(s.KvBytes(), want);
  }
}

// Compaction (kvpolicy/README.md "Compaction"): per (layer, KV head) the kept keys at slots from
// compact_from on move into a dense run there, in position order, each move to a lower slot;
// slots below compact_from never move; keys written afterwards follow at pos - slot_offset; a
// target below what the keys need, or above what the sequence holds, changes nothing.
TEST(SequenceKvPolicyTest, CompactionMovesKeptKeysIntoDenseRunsPerHead) {
  KvPolicyConfig c;
  c.kind = KvPolicyKind::kCorm;
  c.sinks = 1;
  c.recent = 2;
  c.window = 2;
  std::vector<LayerShape> layers = {{4, 4, false, 32}, {4, 4, false, 32}};
  SequenceKvPolicy s(&c, &layers, /*num_kv_heads=*/2, /*pinned=*/5);  // a 5-token hit
  s.Extend(30);
  const int32_t bs = 4;
  EXPECT_EQ(s.CompactFrom(bs), 8);
  EXPECT_EQ(s.SlotsNeeded(8), 30);  // everything kept: nothing to gain
  // Layer 0 head 0 keeps every third position from 8 on; layer 1 head 1 keeps 8..19; the rest
  // nothing past the recent window. Apply decides from last_hit: set it so.
  std::vector<float> k(30 * 4, 1.f), v(30 * 4, 1.f);
  std::vector<int32_t> kept(30);
  for (int i = 0; i < 30; ++i) kept[i] = i;
  for (int l = 0; l < 2; ++l) {
    for (int h = 0; h < 2; ++h) {
      int32_t* hit = s.last_hit(l, h);
      for (int p = 0; p < 30; ++p) {
        const bool keep = (l == 0 && h == 0 && p >= 8 && p % 3 == 0) || (l == 1 && h == 1 && p >= 8 && p < 20);
        hit[p] = keep ? 29 : p;
      }
      s.Apply(l, h, kept, k.data());
    }
  }
  // Kept at slots >= 8: l0h0 {9,12,...,27} + recent 28,29 = 9; l1h1 8..19 + 28,29 = 14; others 2.
  EXPECT_EQ(s.SlotsNeeded(8), 8 + 14);
  std::vector<SlotMove> moves;
  std::vector<LowRepack> low;
  EXPECT_EQ(s.Compact(8, 21, &moves, &low).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(s.Compact(8, 31, &moves, &low).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(s.slot_offset(), 0);
  ASSERT_TRUE(s.Compact(8, 22, &moves, &low).ok());
  EXPECT_TRUE(low.empty());  // CORM keeps no low entries
  EXPECT_EQ(s.slot_offset(), 8);
  EXPECT_EQ(s.num_slots(), 22);
  for (const SlotMove& m : moves) {
    EXPECT_LT(m.dst, m.src);
    EXPECT_GE(m.dst, 8);
  }
  for (int l = 0; l < 2; ++l) {
    for (int h = 0; h < 2; ++h) {
      int64_t next = 8;
      for (int p = 0; p < 30; ++p) {
        if (s.state(l, h, p) != SlotState::kFull) continue;
        EXPECT_EQ(s.slot(l, h, p), p < 8 ? p : next++) << l << " " << h << " " << p;
      }
    }
  }
  // Moves of one head run in ascending slots: replaying them on a slot array gives the layout.
  std::vector<int64_t> where(40, -1);
  for (int p = 0; p < 30; ++p) where[p] = p;  // slot -> position held, before
  std::vector<std::vector<int64_t>> cache(4, where);
  for (const SlotMove& m : moves) cache[m.layer * 2 + m.head][m.dst] = cache[m.layer * 2 + m.head][m.src];
  for (int l = 0; l < 2; ++l) {
    for (int h = 0; h < 2; ++h) {
      for (int p = 0; p < 30; ++p) {
        if (s.state(l, h, p) == SlotState::kFull) {
          EXPECT_EQ(cache[l * 2 + h][s.slot(l, h, p)], p);
        }
      }
    }
  }
  // The next token is written at slot 30 - 8 = 22 in every head.
  s.Extend(31);
  for (int l = 0; l < 2; ++l) EXPECT_EQ(s.slot(l, 1, 30), 22);
  EXPECT_EQ(s.num_slots(), 23);
}

// MiKV's low entries live in the paged cache (kvpolicy/README.md "Low entries in the paged
// cache"): demoted keys are read from their own full slots until a compaction packs them, per
// (layer, KV head), into one run right after the head's full run; SlotsNeeded counts the run's
// slots, and a demotion never raises it. A second compaction repacks the old run's entries with
// the ones demoted since, in position order.
TEST(SequenceKvPolicyTest, MikvLowEntriesArePackedAfterEachHeadsFullRun) {
  KvPolicyConfig c;
  c.kind = KvPolicyKind::kMikv;
  c.low_bits = 2;
  c.sinks = 1;
  c.recent = 2;
  c.window = 2;
  // Width 16: an int2 entry is 4 code bytes + 4 = 8 bytes; a slot region of 16 fp32 is 64 bytes,
  // so a run holds 8 entries a slot. The V side is narrower: 8 values, entries of 2 + 4 = 6 bytes,
  // regions of 32 bytes (5 a slot, entries straddle slots): V's run is the longer.
  std::vector<LayerShape> layers = {{16, 8, false, (16 + 8) * 4, 64, 32}};
  SequenceKvPolicy s(&c, &layers, /*num_kv_heads=*/1, /*pinned=*/0);
  s.Extend(30);
  std::vector<float> k(40 * 16, 1.f);
  std::vector<int32_t> kept(30);
  for (int i = 0; i < 30; ++i) kept[i] = i;
  auto keep_every_third = [&](int64_t len, int32_t hit) {
    int32_t* last = s.last_hit(0, 0);
    for (int64_t p = 0; p < len; ++p) last[p] = p % 3 == 0 ? hit : static_cast<int32_t>(p);
  };
  keep_every_third(30, 29);
  s.Apply(0, 0, kept, k.data());
  // Full: 0, 3, ..., 27 (10) and the recent 28, 29; low: the other 18, unpacked.
  ASSERT_EQ(s.Counts(0, 0).full, 12);
  ASSERT_EQ(s.Counts(0, 0).low, 18);
  for (int p = 0; p < 30; ++p) {
    if (s.state(0, 0, p) == SlotState::kLow) {
      EXPECT_EQ(s.low_entry(0, 0, p), -1) << p;
    }
  }
  // Run slots: K ceil(18 x 8 / 64) = 3, V ceil(18 x 6 / 32) = 4.
  EXPECT_EQ(s.LowRunSlotsOf(0, 18), 4);
  EXPECT_EQ(s.SlotsNeeded(0), 12 + 4);
  EXPECT_EQ(s.LowInSlots(0), 18);  // demoted, still in their full slots
  EXPECT_EQ(s.LowInSlots(24), 2);  // 25 and 26 at slots >= 24
  std::vector<SlotMove> moves;
  std::vector<LowRepack> low;
  ASSERT_TRUE(s.Compact(0, 16, &moves, &low).ok());
  ASSERT_EQ(low.size(), 1u);
  EXPECT_EQ(low[0].old_entries, 0);
  EXPECT_EQ(low[0].new_base, 12);
  EXPECT_EQ(s.low_base(0, 0), 12);
  ASSERT_EQ(low[0].sources.size(), 18u);
  int64_t e = 0;
  for (int p = 0; p < 30; ++p) {
    if (s.state(0, 0, p) != SlotState::kLow) continue;
    EXPECT_EQ(low[0].sources[e], -1 - p) << "position " << p << ": its own slot";
    EXPECT_EQ(s.low_entry(0, 0, p), e++);
  }
  // Ten more tokens at slots 30 - 14 = 16, ...; demoting never raises what a compaction needs.
  s.Extend(40);
  EXPECT_EQ(s.slot(0, 0, 30), 16);
  EXPECT_EQ(s.SlotsNeeded(0), 12 + 4 + 10);
  kept.resize(40);
  for (int i = 0; i < 40; ++i) kept[i] = i;
  keep_every_third(40, 39);
  s.Apply(0, 0, kept, k.data());
  // Full: 0, 3, ..., 36 (13) and the recent 38, 39: 15; low: the 18 packed, 28 and 29 (recent
  // before, full in slots 10 and 11), and 31, 32, 34, 35, 37: 25.
  ASSERT_EQ(s.Counts(0, 0).full, 15);
  ASSERT_EQ(s.Counts(0, 0).low, 25);
  EXPECT_EQ(s.LowInSlots(0), 7);  // the 18 are packed; 28, 29, 31, 32, 34, 35, 37 are not
  EXPECT_EQ(s.LowRunSlotsOf(0, 25), 5);  // V: ceil(25 x 6 / 32)
  EXPECT_EQ(s.SlotsNeeded(0), 15 + 5);
  ASSERT_TRUE(s.Compact(0, 20, &moves, &low).ok());
  ASSERT_EQ(low.size(), 1u);
  EXPECT_EQ(low[0].old_base, 12);
  EXPECT_EQ(low[0].old_entries, 18);
  EXPECT_EQ(low[0].new_base, 15);
  ASSERT_EQ(low[0].sources.size(), 25u);
  e = 0;
  int64_t old = 0;
  for (int p = 0; p < 40; ++p) {
    if (s.state(0, 0, p) != SlotState::kLow) continue;
    // Below 28: packed by the first compaction (its entries 0..17, in order); 28 and 29 from
    // their full slots 10 and 11; the newer ones from theirs, pos - 14.
    const int64_t want = p < 28 ? old++ : -1 - (p < 30 ? p - 18 : p - 14);
    EXPECT_EQ(low[0].sources[e], want) << "position " << p;
    EXPECT_EQ(s.low_entry(0, 0, p), e++);
  }
  for (const SlotMove& m : moves) EXPECT_LT(m.dst, m.src);
  EXPECT_EQ(s.slot_offset(), 40 - 20);
}

TEST(KvPolicyStoreTest, PrepareExtendsPinsHitsAndReleaseCounts) {
  KvPolicyConfig c;
  c.kind = KvPolicyKind::kCorm;
  KvPolicyStore store(c, {{8, 8, true, 64}}, 1);
  SequenceKvPolicy* a = store.Prepare(1, 0, 10);
  EXPECT_EQ(a->pinned(), 0);
  EXPECT_EQ(store.Prepare(1, 10, 11), a);  // continues
  EXPECT_EQ(a->seq_len(), 11);
  SequenceKvPolicy* b = store.Prepare(2, 32, 40);  // a prefix-cache hit of 32 tokens
  EXPECT_EQ(b->pinned(), 32);
  EXPECT_EQ(b->seq_len(), 40);
  SequenceKvPolicy* a2 = store.Prepare(1, 0, 5);  // preempted, recomputed: a fresh state
  EXPECT_EQ(a2->seq_len(), 5);
  EXPECT_EQ(store.size(), 2u);
  store.Release(1);
  store.Release(2);
  store.Release(3);  // unknown: ignored
  EXPECT_EQ(store.size(), 0u);
  EXPECT_EQ(store.stats().sequences, 2);
  EXPECT_EQ(store.stats().tokens, 45);
  EXPECT_EQ(store.stats().entries.full, 45);
  EXPECT_DOUBLE_EQ(store.stats().kv_bytes, 45.0 * 64);
  EXPECT_DOUBLE_EQ(store.stats().full_kv_bytes, 45.0 * 64);
}

// A request of a session pins its whole prompt (its blocks stay pinned for the later turns, so
// evicting from them would return no memory): nothing of it is evicted, however unimportant;
// what it generates after the prompt still is.
TEST(KvPolicyStoreTest, ASessionRequestPinsItsPrompt) {
  KvPolicyConfig c;
  c.kind = KvPolicyKind::kCorm;
  c.sinks = 1;
  c.recent = 2;
  c.window = 2;
  KvPolicyStore store(c, {{4, 4, false, 32}}, 1);
  SequenceKvPolicy* s = store.Prepare(7, 0, 20, /*prompt_len=*/20, /*session=*/true);
  EXPECT_EQ(s->pinned(), 20);
  std::vector<float> k(40 * 4, 1.f), v(40 * 4, 1.f);
  std::vector<int32_t> kept(20);
  for (int i = 0; i < 20; ++i) kept[i] = i;
  s->Apply(0, 0, kept, k.data());
  EXPECT_EQ(s->Counts(0, 0).full, 20);
  // Ten decode steps later the generated tokens outside the recent window are gone.
  EXPECT_EQ(store.Prepare(7, 20, 30, 20, true), s);
  kept.resize(30);
  for (int i = 0; i < 30; ++i) kept[i] = i;
  s->Apply(0, 0, kept, k.data());
  EXPECT_EQ(s->Counts(0, 0).full, 20 + 2);
  // The same request outside a session keeps only the sink and the recent tokens.
  SequenceKvPolicy* t = store.Prepare(8, 0, 20, 20, /*session=*/false);
  EXPECT_EQ(t->pinned(), 0);
  kept.resize(20);
  t->Apply(0, 0, kept, k.data());
  EXPECT_EQ(t->Counts(0, 0).full, 1 + 2);
}

// --kv-policy-prefill after-prompt: a step before the prompt's end records importance but keeps
// everything; the step that ends the prompt chooses from the queries of all of them, exactly as
// one step over the whole prompt would (the same last_hit, the same victims). every-chunk
// chooses after the first chunk already.
TEST(KvPolicyStoreTest, AfterPromptChoosesOnlyOnceThePromptIsDone) {
  for (KvPolicyPrefill mode : {KvPolicyPrefill::kAfterPrompt, KvPolicyPrefill::kEveryChunk}) {
    KvPolicyConfig c;
    c.kind = KvPolicyKind::kCorm;
    c.sinks = 1;
    c.recent = 2;
    c.window = 3;
    c.prefill = mode;
    const int64_t w = 4;
    KvPolicyStore chunked(c, {{w, w, false, 2 * w * 4}}, 1), whole(c, {{w, w, false, 2 * w * 4}}, 1);
    std::vector<float> k(32 * w, 1.f), v(32 * w, 1.f);
    std::vector<int32_t> kept;
    // Position 5 is important to query 9 (first chunk), position 12 to query 30 (last chunk).
    const auto hits = [](SequenceKvPolicy* s, int64_t from, int64_t to) {
      if (from <= 9 && 9 < to) s->last_hit(0, 0)[5] = 9;
      if (from <= 30 && 30 < to) s->last_hit(0, 0)[12] = 30;
    };
    SequenceKvPolicy* a = chunked.Prepare(1, 0, 16, /*prompt_len=*/32);
    hits(a, 0, 16);
    kept.resize(16);
    for (int i = 0; i < 16; ++i) kept[i] = i;
    a->Apply(0, 0, kept, k.data());
    if (mode == KvPolicyPrefill::kAfterPrompt) {
      EXPECT_FALSE(a->choose());
      EXPECT_EQ(a->Counts(0, 0).full, 16);  // nothing chosen before the prompt's end
    } else {
      EXPECT_TRUE(a->choose());
      EXPECT_LT(a->Counts(0, 0).full, 16);
      EXPECT_EQ(a->state(0, 0, 5), SlotState::kDead);  // query 9 is not among the last 3 of 16
    }
    // The next chunk's Prepare extends the states to 32 positions (its own keys kFull); only then
    // are positions 16..31 readable.
    EXPECT_EQ(chunked.Prepare(1, 16, 32, /*prompt_len=*/32), a);
    kept.clear();
    for (int i = 0; i < 32; ++i) {
      if (a->state(0, 0, i) != SlotState::kDead) kept.push_back(i);
    }
    EXPECT_TRUE(a->choose());
    hits(a, 16, 32);
    a->Apply(0, 0, kept, k.data());
    SequenceKvPolicy* b = whole.Prepare(1, 0, 32, /*prompt_len=*/32);
    hits(b, 0, 32);
    kept.resize(32);
    for (int i = 0; i < 32; ++i) kept[i] = i;
    b->Apply(0, 0, kept, k.data());
    // Kept: sink 0, position 12 (hit by query 30, one of the last 3), position 29 (a new key
    // counts as hit by its own query), the recent 30 and 31.
    EXPECT_EQ(b->Counts(0, 0).full, 5);
    EXPECT_EQ(b->state(0, 0, 12), SlotState::kFull);
    for (int p = 0; p < 32; ++p) {
      if (mode == KvPolicyPrefill::kAfterPrompt) {
        EXPECT_EQ(a->state(0, 0, p), b->state(0, 0, p)) << "position " << p;
      }
    }
  }
}

// Device-resident states (KvPolicyStore on_device: the CUDA backend's; kvpolicy/README.md "On the
// GPU"): the host keeps the scalars and the counts the backend sets after each step; SlotsNeeded,
// Counts, the eval statistics and a compaction's checks answer from them; a fork clones the
// device arrays, and a child whose clone failed starts over at its next step.
class FakeArrays final : public DeviceArrays {
 public:
  explicit FakeArrays(bool clone_ok) : clone_ok_(clone_ok) {}
  std::unique_ptr<DeviceArrays> Clone() const override {
    return clone_ok_ ? std::make_unique<FakeArrays>(true) : nullptr;
  }

 private:
  bool clone_ok_;
};

TEST(KvPolicyStoreTest, DeviceResidentStatesAnswerFromTheBackendsCounts) {
  KvPolicyConfig c;
  c.kind = KvPolicyKind::kCorm;
  KvPolicyStore store(c, {{8, 8, true, 64}, {8, 8, true, 64}}, 2, /*on_device=*/true);
  SequenceKvPolicy* s = store.Prepare(1, 0, 100, /*prompt_len=*/90);
  ASSERT_TRUE(s->on_device());
  EXPECT_EQ(s->seq_len(), 100);
  EXPECT_EQ(s->prompt_len(), 90);
  EXPECT_FALSE(s->has_chosen());
  // Before any counts: everything kept, nothing can be given back.
  EXPECT_EQ(s->Counts(1, 1).full, 100);
  EXPECT_EQ(s->SlotsNeeded(16), 100);
  EXPECT_THAT(s->CheckCompaction(16, 50).message(), HasSubstr("need 100"));
  // The backend's counts after a step: [layer][head] kFull in all, and at positions >= 16.
  const std::vector<int32_t> full = {40, 30, 35, 20}, from = {30, 22, 27, 12};
  s->SetDeviceCounts(16, full.data(), from.data());
  s->set_has_chosen();
  EXPECT_EQ(s->Counts(0, 1).full, 30);
  EXPECT_EQ(s->Counts(0, 1).dead, 70);
  EXPECT_EQ(s->SlotsNeeded(16), 16 + 30);
  EXPECT_EQ(s->SlotsNeeded(32), s->num_slots()) << "counts taken from another start: nothing to give";
  // Compaction: checked first, then the state takes the new slots.
  EXPECT_THAT(s->CheckCompaction(16, 45).message(), HasSubstr("need 46"));
  EXPECT_THAT(s->CheckCompaction(16, 101).message(), HasSubstr("holds 100"));
  std::vector<SlotMove> moves;
  std::vector<LowRepack> low;
  EXPECT_FALSE(s->Compact(16, 46, &moves, &low).ok()) << "the backend compacts a device-resident state";
  ASSERT_TRUE(s->MarkCompacted(16, 46).ok());
  EXPECT_EQ(s->slot_offset(), 100 - 46);
  EXPECT_EQ(s->num_slots(), 46);
  // Forks: the device arrays cloned with the state; a failed clone leaves the child without one.
  s->set_device(std::make_unique<FakeArrays>(true));
  store.Fork(1, 2);
  const SequenceKvPolicy* child = store.Find(2);
  ASSERT_NE(child, nullptr);
  EXPECT_NE(child->device(), nullptr);
  EXPECT_NE(child->device(), s->device());
  EXPECT_EQ(child->slot_offset(), s->slot_offset());
  EXPECT_TRUE(child->has_chosen());
  EXPECT_EQ(child->Counts(0, 0).full, 40);
  s->set_device(std::make_unique<FakeArrays>(false));
  store.Fork(1, 3);
  EXPECT_EQ(store.Find(3), nullptr) << "no device memory for the copy: a fresh state at its next step";
  // Release: the counts go into the statistics (13 bytes of metadata per entry on the device).
  store.Release(1);
  store.Release(2);
  EXPECT_EQ(store.stats().entries.full, 2 * (40 + 30 + 35 + 20));
  EXPECT_EQ(store.stats().entries.dead, 2 * (400 - 125));
  EXPECT_DOUBLE_EQ(store.stats().kv_bytes, 2 * 125.0 * 64);
  EXPECT_DOUBLE_EQ(store.stats().metadata_bytes, 2 * 13.0 * 100 * 4);
}

// MiKV's device-resident states (the CUDA backend): the low entries' counts come with the full
// ones; the slots a compaction needs add each head's packed run (int4 entries of 8 values: 8
// bytes, two per 16-byte bf16 slot region), and the decode's bound on a packed run is the most low
// entries a head packed at the latest compaction.
TEST(KvPolicyStoreTest, DeviceResidentMikvStatesCountTheirLowEntries) {
  KvPolicyConfig c;
  c.kind = KvPolicyKind::kMikv;
  c.low_bits = 4;
  KvPolicyStore store(c, {{8, 8, true, 32, 16, 16}, {8, 8, true, 32, 16, 16}}, 2, /*on_device=*/true);
  SequenceKvPolicy* s = store.Prepare(1, 0, 100, /*prompt_len=*/90);
  EXPECT_EQ(s->DeviceLowToPack(16), 0);
  EXPECT_EQ(s->DevicePackedBound(), 0);
  const std::vector<int32_t> full = {40, 30, 35, 20}, from = {30, 22, 27, 12};
  const std::vector<int32_t> low = {50, 60, 40, 70}, low_from = {44, 58, 30, 60};
  s->SetDeviceCounts(16, full.data(), from.data(), low.data(), low_from.data());
  EXPECT_EQ(s->Counts(0, 1).full, 30);
  EXPECT_EQ(s->Counts(0, 1).low, 60);
  EXPECT_EQ(s->Counts(0, 1).dead, 10);
  EXPECT_EQ(s->DeviceLowToPack(16), 60) << "packed or demoted at positions >= 16";
  EXPECT_EQ(s->DeviceLowToPack(32), 70) << "counts from another start: every low entry";
  // Per head: full keys from 16 + ceil(low entries x 8 / 16): 30 + 22, 22 + 29, 27 + 15, 12 + 30.
  EXPECT_EQ(s->SlotsNeeded(16), 16 + 52);
  EXPECT_EQ(s->LowInSlots(16), 60) << "before any compaction every low entry from 16 is in its slot";
  EXPECT_EQ(s->LowInSlots(32), 0) << "counts from another start: none known";
  EXPECT_THAT(s->CheckCompaction(16, 67).message(), HasSubstr("need 68"));
  ASSERT_TRUE(s->MarkCompacted(16, 68).ok());
  EXPECT_EQ(s->DevicePackedBound(), 60);
  EXPECT_EQ(s->LowInSlots(16), 0) << "all packed";
  // Demoted since, per head: 3, 0, 7, 1 more (the most: 7).
  const std::vector<int32_t> low2 = {53, 60, 47, 71}, low_from2 = {47, 58, 37, 61};
  s->SetDeviceCounts(16, full.data(), from.data(), low2.data(), low_from2.data());
  EXPECT_EQ(s->LowInSlots(16), 7);
  s->SetDeviceCounts(16, full.data(), from.data(), low.data(), low_from.data());
  // CORM's counts (no low arrays) read as zero low entries.
  s->SetDeviceCounts(16, full.data(), from.data());
  EXPECT_EQ(s->Counts(1, 1).low, 0);
  EXPECT_EQ(s->DevicePackedBound(), 60) << "kept until the next compaction";
  s->SetDeviceCounts(16, full.data(), from.data(), low.data(), low_from.data());
  store.Release(1);
  EXPECT_EQ(store.stats().entries.low, 220);
  EXPECT_EQ(store.stats().entries.dead, 400 - 125 - 220);
  EXPECT_DOUBLE_EQ(store.stats().kv_bytes, 125.0 * 32 + 220.0 * 16);
}

}  // namespace
}  // namespace lorc::kvpolicy
