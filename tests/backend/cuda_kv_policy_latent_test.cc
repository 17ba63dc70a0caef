// Parity of CORM's decode over LoRC latent layers on the GPU (kernels/kv_policy.cuh
// LaunchKvPolicyLatentDecode) with the CPU backend's LatentAttention under the same policy states
// (backend/cpu_latent_attention.cc, the reference): outputs, the importance it records, and a
// compaction over per-layer widths (LaunchKvPolicyCompact with sides) moving latents, or their
// codes and scales, bit for bit, after which the decode gives what it gave before.
// Shapes: head_dim 128, GQA groups 2, 4 and 8, ranks through both of the latent decode's layouts
// (<= 64: the fixed one; above: the generic one) and r % 16 == 8 (int4 regions of 4 bytes modulo
// 8, moved as 4-byte words); bf16, fp8, int8 and int4 caches; block size 16 over shuffled blocks;
// sequences of 1 to 3,000 keys with 30 % budgets (about 2/3 of the keys dead); every span of
// chunks a CTA may list as one item (1, 2 and 4, and the launcher's choice).
// Tolerances: outputs |cuda - cpu| <= 1.5e-2 * max(1, |cpu|), the latent attention's parity
// tolerance (tests/backend/cuda_latent_attention_test.cc: the reconstructed, rotated keys and the
// probabilities rounded to bf16 before their products). last_hit: equal except where the key's
// largest probability over the group (fp64) is within 2e-2 relative of 1/t: a bf16 key's rounding
// moves a score by ~2^-9 |k| |q|, a probability by that relative, and we count such ties (few).
// Skipped without a CUDA device.
#include <algorithm>
#include <cmath>
#include <initializer_list>
#include <iostream>
#include <numeric>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "kernels/kv_policy.cuh"
#include "kvpolicy/sequence_policy.h"
#include "tests/backend/cuda_kv_policy_fixture.h"
#include "tests/backend/cuda_parity_fixture.h"

namespace lorc {
namespace {

using kernels::KvPolicySeq;
using kernels::KvQuant;
using kvpolicy::KvPolicyConfig;
using kvpolicy::KvPolicyKind;
using kvpolicy::SlotState;
using parity::Get;
using parity::Put;
using parity::PutRaw;
using parity::RoundBf16;
using policy_test::DeviceStates;
using policy_test::GetAll;
using policy_test::Stream;
using policy_test::Upload;

constexpr int kHd = 128, kBs = 16;

struct LatentShape {
  int heads, kv_heads, rk, rv;
  KvQuant quant;
};

std::vector<float> Uniform(std::mt19937& rng, size_t n, float lo, float hi) {
  std::uniform_real_distribution<float> d(lo, hi);
  std::vector<float> v(n);
  for (float& x : v) x = RoundBf16(d(rng));
  return v;
}

// One latent layer's cache of `lens` sequences (blocks shuffled), a query row per sequence, B_K and
// the RoPE frequencies, on the host (F32 values of the bf16 / quantized device data) and device.
struct LatentCase {
  LatentCase(Backend& cuda, std::mt19937& rng, const LatentShape& sh, std::vector<int32_t> sequence_lens)
      : S(static_cast<int>(sequence_lens.size())), H(sh.heads), G(sh.kv_heads), rk(sh.rk), rv(sh.rv),
        quant(sh.quant), lens(std::move(sequence_lens)) {
    max_len = *std::max_element(lens.begin(), lens.end());
    max_blocks = (max_len + kBs - 1) / kBs;
    for (int len : lens) num_blocks += (len + kBs - 1) / kBs;
    std::vector<int32_t> perm(num_blocks);
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    tables.assign(static_cast<size_t>(S) * max_blocks, 0);
    for (int s = 0, next = 0; s < S; ++s) {
      for (int b = 0; b < (lens[s] + kBs - 1) / kBs; ++b) tables[s * max_blocks + b] = perm[next++];
    }
    const size_t slots = static_cast<size_t>(num_blocks) * kBs;
    q = Uniform(rng, static_cast<size_t>(S) * H * kHd, -3.f, 3.f);
    const float b = 2.0f / std::sqrt(static_cast<float>(rk));  // keys of unit scale whatever the rank
    k_up = Uniform(rng, static_cast<size_t>(G) * kHd * rk, -b, b);
    ck = Uniform(rng, slots * G * rk, -1.f, 1.f);
    cv = Uniform(rng, slots * G * rv, -1.f, 1.f);
    for (int i = 0; i < kHd / 2; ++i) inv_freq.push_back(static_cast<float>(1.0 / std::pow(500000.0, 2.0 * i / kHd)));
    dq = Put(cuda, q, DType::kBF16);
    dk_up = Put(cuda, k_up, DType::kBF16);
    dinv = Put(cuda, inv_freq, DType::kF32);
    if (quant == KvQuant::kNone) {
      dk = Put(cuda, ck, DType::kBF16);
      dv = Put(cuda, cv, DType::kBF16);
    } else {
      dk = PutRaw(cuda, Quantize(&ck, rk));
      dv = PutRaw(cuda, Quantize(&cv, rv));
    }
    dt = PutRaw(cuda, tables);
    dout = Put(cuda, std::vector<float>(static_cast<size_t>(S) * H * rv, 7.f), DType::kBF16);
  }
  std::vector<uint8_t> Quantize(std::vector<float>* rows, int width) const {
    return policy_test::QuantizeSide(quant, kBs, G, width, num_blocks, rows);
  }
  kernels::KvqSide Side(int width) const { return kernels::MakeKvqSide(quant, kBs, G, width); }
  // Head g's whole entry of cache slot cs in a side's bytes (width rk or rv): its latent (bf16) or
  // its codes and scales.
  std::vector<uint8_t> HeadEntry(const std::vector<uint8_t>& bytes, int width, int64_t cs, int g) const {
    return policy_test::HeadEntry(quant, kBs, G, width, bytes, cs, g);
  }
  int64_t CacheSlot(int s, int slot) const {
    return int64_t{tables[s * max_blocks + slot / kBs]} * kBs + slot % kBs;
  }
  float scale() const { return 1.0f / std::sqrt(static_cast<float>(kHd)); }

  // The CPU backend's LatentAttention under the states' policy (F32 on the values above), which
  // records importance into the states.
  std::vector<float> Cpu(Backend& cpu, std::vector<kvpolicy::SequenceKvPolicy*>& states) const {
    const std::unique_ptr<policy_test::CpuDecodePlan> d = policy_test::PlanCpuDecode(cpu, lens, tables, max_blocks, kBs);
    std::vector<float> kcpu = ck, vcpu = cv, qcpu = q, up = k_up, out(static_cast<size_t>(S) * H * rv, 0.f);
    LatentAttentionParams p;
    p.q = Tensor2D{qcpu.data(), DType::kF32, S, int64_t{H} * kHd, int64_t{H} * kHd};
    p.k_up = Tensor2D{up.data(), DType::kF32, int64_t{G} * kHd, rk, rk};
    p.out = Tensor2D{out.data(), DType::kF32, S, int64_t{H} * rv, int64_t{H} * rv};
    p.cache = KvLayer{kcpu.data(), vcpu.data(), int64_t{G} * rk, int64_t{G} * rv, DType::kF32};
    p.num_heads = H;
    p.num_kv_heads = G;
    p.head_dim = kHd;
    p.k_rank = rk;
    p.v_rank = rv;
    p.scale = scale();
    p.inv_freq = inv_freq.data();
    p.kv_policy = {states.data(), 0};
    CHECK_OK(cpu.LatentAttention(p, *d->plan));
    return out;
  }
  kernels::KvPolicyLatentDecodeArgs Args(const KvPolicySeq* seqs, void* scratch) const {
    kernels::KvPolicyLatentDecodeArgs a;
    kernels::LatentAttentionArgs& l = a.latent;
    l.q = dq.data();
    l.q_ld = int64_t{H} * kHd;
    l.out = dout.data();
    l.out_ld = int64_t{H} * rv;
    l.k_up = dk_up.data();
    l.k_up_ld = rk;
    l.k_cache = dk.data();
    l.v_cache = dv.data();
    l.k_ld = int64_t{G} * rk;
    l.v_ld = int64_t{G} * rv;
    l.num_heads = H;
    l.num_kv_heads = G;
    l.head_dim = kHd;
    l.k_rank = rk;
    l.v_rank = rv;
    l.scale = scale();
    l.inv_freq = dinv.as<float>();
    l.block_tables = dt.as<int32_t>();
    l.max_blocks_per_seq = max_blocks;
    l.block_size = kBs;
    if (quant != KvQuant::kNone) {
      l.kv_quant = quant;
      l.k_q = Side(rk);
      l.v_q = Side(rv);
    }
    a.seqs = seqs;
    a.num_seqs = S;
    a.max_seq_len = max_len;
    a.scratch = scratch;
    return a;
  }

  int S, H, G, rk, rv;
  KvQuant quant;
  std::vector<int32_t> lens, tables;
  int max_len = 0, max_blocks = 0, num_blocks = 0;
  std::vector<float> q, k_up, ck, cv, inv_freq;
  DeviceBuffer dq, dk_up, dinv, dk, dv, dt, dout;
};

// fp64 largest probability over the group of each kept key of (sequence s, KV head g): the keys
// reconstructed from the (host) latents, rotated at their positions (fp32 angles, as the CPU).
std::vector<double> GroupProbabilities(const LatentCase& c, const kvpolicy::SequenceKvPolicy& st, int s, int g) {
  const int len = c.lens[s], group = c.H / c.G;
  std::vector<int> kept;
  for (int p = 0; p < len; ++p) {
    if (st.state(0, g, p) != SlotState::kDead) kept.push_back(p);
  }
  std::vector<double> k(kept.size() * kHd);
  for (size_t j = 0; j < kept.size(); ++j) {
    const int64_t cs = c.CacheSlot(s, static_cast<int>(st.slot(0, g, kept[j])));
    double* kj = k.data() + j * kHd;
    for (int d = 0; d < kHd; ++d) {
      double acc = 0;
      for (int r = 0; r < c.rk; ++r) {
        acc += double{c.k_up[(int64_t{g} * kHd + d) * c.rk + r]} * c.ck[(cs * c.G + g) * c.rk + r];
      }
      kj[d] = acc;
    }
    for (int i = 0; i < kHd / 2; ++i) {
      const double a = static_cast<double>(static_cast<float>(kept[j]) * c.inv_freq[i]);
      const double x = kj[i], y = kj[i + kHd / 2];
      kj[i] = x * std::cos(a) - y * std::sin(a);
      kj[i + kHd / 2] = y * std::cos(a) + x * std::sin(a);
    }
  }
  std::vector<double> pmax(len, 0.0);
  for (int h = g * group; h < (g + 1) * group; ++h) {
    std::vector<double> sc(kept.size());
    double m = -1e300, sum = 0;
    for (size_t j = 0; j < kept.size(); ++j) {
      double d = 0;
      for (int e = 0; e < kHd; ++e) d += double{c.q[(int64_t{s} * c.H + h) * kHd + e]} * k[j * kHd + e];
      sc[j] = d * c.scale();
      m = std::max(m, sc[j]);
    }
    for (double x : sc) sum += std::exp(x - m);
    for (size_t j = 0; j < kept.size(); ++j) pmax[kept[j]] = std::max(pmax[kept[j]], std::exp(sc[j] - m) / sum);
  }
  return pmax;
}

// The GPU's decode (`a`, over `dev`, from last_hits `initial`) with each of `spans` against the
// CPU's outputs `want` and the last_hits the CPU recorded in `rs`'s states: outputs within 1.5e-2
// relative, last_hits equal except near ties (fp64 p x t within 2e-2 of 1). The last span's
// outputs and last_hits come back in `got` / `glast`.
void ExpectDecodesAsTheCpu(Backend& cuda, const LatentCase& lc, const policy_test::RandomCormStates& rs,
                           const DeviceStates& dev, const std::vector<float>& want, const std::vector<int32_t>& initial,
                           kernels::KvPolicyLatentDecodeArgs a, std::initializer_list<int> spans, std::vector<float>* got,
                           std::vector<int32_t>* glast) {
  const int S = lc.S, G = lc.G;
  for (const int span : spans) {
    SCOPED_TRACE("span " + std::to_string(span));
    ASSERT_OK(cuda.CopyToDevice(dev.last_hit.data(), initial.data(), initial.size() * sizeof(int32_t)));
    a.span = span;
    ASSERT_EQ(kernels::LaunchKvPolicyLatentDecode(a, Stream(cuda)), cudaSuccess);
    *got = Get(cuda, lc.dout, DType::kBF16);
    ASSERT_EQ(got->size(), want.size());
    for (size_t i = 0; i < got->size(); ++i) {
      ASSERT_NEAR((*got)[i], want[i], 1.5e-2 * std::max(1.0f, std::fabs(want[i]))) << "element " << i;
    }
    *glast = GetAll<int32_t>(cuda, dev.last_hit);
    int64_t hits = 0, ties = 0;
    for (int s = 0; s < S; ++s) {
      const int cap = rs.seqs[s].capacity, len = lc.lens[s];
      for (int g = 0; g < G; ++g) {
        const std::vector<double> pmax = GroupProbabilities(lc, *rs.ptrs[s], s, g);
        int kept = 0;
        for (int p = 0; p < len; ++p) kept += rs.ptrs[s]->state(0, g, p) != SlotState::kDead;
        for (int pos = 0; pos < len; ++pos) {
          const int32_t cpu_hit = rs.ptrs[s]->last_hit(0, g)[pos], gpu_hit = (*glast)[dev.offsets[s] + g * cap + pos];
          hits += cpu_hit == len - 1 && rs.dlast[s][g * cap + pos] != len - 1;
          if (cpu_hit == gpu_hit) continue;
          const bool near_tie = std::fabs(pmax[pos] * kept - 1.0) < 2e-2;
          ties += near_tie;
          EXPECT_TRUE(near_tie) << "seq " << s << " head " << g << " pos " << pos << ": cpu " << cpu_hit << " gpu "
                                << gpu_hit << " p*t " << pmax[pos] * kept;
        }
        for (int pos = len; pos < cap; ++pos) EXPECT_EQ((*glast)[dev.offsets[s] + g * cap + pos], -3);
      }
    }
    std::cout << "span " << span << " importance: " << hits << " keys hit, " << ties << " near ties differ\n";
    EXPECT_GT(hits, 50) << "the query must find keys important for the test to mean something";
    EXPECT_LE(ties, 8);
  }
}

class CudaKvPolicyLatentTest : public CpuCudaPair<::testing::TestWithParam<LatentShape>> {};

TEST_P(CudaKvPolicyLatentTest, MatchesCpuLatentAttentionItsImportanceAndCompaction) {
  const LatentShape sh = GetParam();
  std::mt19937 rng(29 + sh.rk + 3 * sh.rv + sh.heads);
  const LatentCase lc(*cuda_, rng, sh, {1, 37, 700, 3000, 257});
  const int S = lc.S, G = lc.G;
  const std::vector<int32_t>& lens = lc.lens;

  // CPU states: random last_hits, then CORM's choice (30 % budget) marks the dead keys; their
  // device mirror before the CPU's attention records anything.
  const std::unique_ptr<policy_test::RandomCormStates> rs =
      policy_test::MakeRandomCormStates(kvpolicy::LayerShape{sh.rk, sh.rv, false, 2 * (sh.rk + sh.rv)}, G, lens, rng);
  std::vector<kvpolicy::SequenceKvPolicy*> ptrs = rs->ptrs;
  const std::vector<std::vector<uint8_t>>& dstate = rs->dstate;
  const std::vector<std::vector<int32_t>>& dslot = rs->dslot;
  const std::vector<std::vector<int32_t>>& dlast = rs->dlast;
  const std::vector<KvPolicySeq>& seqs = rs->seqs;
  const int64_t dead = rs->dead;
  ASSERT_GT(dead, 1000) << "the states must skip keys for the test to mean something";
  DeviceStates dev = Upload(*cuda_, dstate, dslot, dlast, seqs, 1, G);

  const std::vector<float> want = lc.Cpu(*cpu_, ptrs);
  auto scratch = cuda_->Allocate(kernels::KvPolicyDecodeScratchBytes(S, lc.H, G, kHd, lc.max_len));
  ASSERT_OK(scratch);
  kernels::KvPolicyLatentDecodeArgs a = lc.Args(dev.seqs.as<KvPolicySeq>(), scratch->data());
  // The last_hits as uploaded (before any recording), to run the decode again from them.
  const std::vector<int32_t> initial = GetAll<int32_t>(*cuda_, dev.last_hit);
  // Every span of chunks a CTA may take (kv_policy.cuh KvPolicyLatentDecodeArgs::span), the
  // launcher's choice last (1 for this small batch): the same outputs and importance as the CPU's.
  std::vector<float> got;
  std::vector<int32_t> glast;
  ExpectDecodesAsTheCpu(*cuda_, lc, *rs, dev, want, initial, a, {4, 2, 1, 0}, &got, &glast);
  if (HasFatalFailure()) return;

  // Prompt-row entries (backend/cuda_kv_policy.cc: the rows of a prompt whose importance can
  // matter): every sequence once more as an entry of its own q_row and table_row with no_out, after
  // the plain entries. The output rows are the plain entries' (unchanged, bit for bit), and the
  // repeated rows' hits combine (atomicMax) into the same last_hits as one entry's.
  {
    std::vector<int32_t> reset = glast;
    for (int s = 0; s < S; ++s) {
      const int cap = seqs[s].capacity;
      for (int g = 0; g < G; ++g) {
        for (int pos = 0; pos < lens[s]; ++pos) reset[dev.offsets[s] + g * cap + pos] = dlast[s][g * cap + pos];
      }
    }
    ASSERT_OK(cuda_->CopyToDevice(dev.last_hit.data(), reset.data(), reset.size() * sizeof(int32_t)));
    std::vector<KvPolicySeq> both = dev.host_seqs;
    for (int s = 0; s < S; ++s) {
      KvPolicySeq e = dev.host_seqs[s];
      e.q_row = s;
      e.table_row = s;
      e.no_out = 1;
      both.push_back(e);
    }
    DeviceBuffer dboth = PutRaw(*cuda_, both);
    auto scratch2 = cuda_->Allocate(kernels::KvPolicyDecodeScratchBytes(2 * S, lc.H, G, kHd, lc.max_len));
    ASSERT_OK(scratch2);
    kernels::KvPolicyLatentDecodeArgs a2 = lc.Args(dboth.as<KvPolicySeq>(), scratch2->data());
    a2.num_seqs = 2 * S;
    ASSERT_EQ(kernels::LaunchKvPolicyLatentDecode(a2, Stream(*cuda_)), cudaSuccess);
    EXPECT_EQ(Get(*cuda_, lc.dout, DType::kBF16), got);
    EXPECT_EQ(GetAll<int32_t>(*cuda_, dev.last_hit), glast);
  }

  // Compaction over per-layer sides from slot 16 of every long sequence: each head's kFull keys at
  // positions >= 16 move in order to a dense run, latents (or codes and scales) bit for bit, and
  // the decode over the compacted slots, whose positions are no longer their slots, gives what it
  // gave before.
  constexpr int kFrom = 16;
  const std::vector<uint8_t> kbefore = GetAll<uint8_t>(*cuda_, lc.dk), vbefore = GetAll<uint8_t>(*cuda_, lc.dv);
  kernels::KvPolicyLayerSides sides;
  sides.k_dim = sh.rk;
  sides.v_dim = sh.rv;
  sides.k_stride = int64_t{G} * sh.rk;
  sides.v_stride = int64_t{G} * sh.rv;
  if (sh.quant != KvQuant::kNone) {
    sides.k_q = lc.Side(sh.rk);
    sides.v_q = lc.Side(sh.rv);
  }
  DeviceBuffer dsides = PutRaw(*cuda_, std::vector<kernels::KvPolicyLayerSides>{sides});
  DeviceBuffer kptr = PutRaw(*cuda_, std::vector<void*>{lc.dk.data()});
  DeviceBuffer vptr = PutRaw(*cuda_, std::vector<void*>{lc.dv.data()});
  std::vector<KvPolicySeq> after = dev.host_seqs;
  for (int s = 0; s < S; ++s) {
    if (lens[s] < 4 * kFrom) continue;
    int most = 0;
    for (int g = 0; g < G; ++g) {
      int n = 0;
      for (int pos = kFrom; pos < lens[s]; ++pos) n += dstate[s][g * seqs[s].capacity + pos] == 1;
      most = std::max(most, n);
    }
    DeviceBuffer one = PutRaw(*cuda_, std::vector<KvPolicySeq>{dev.host_seqs[s]});
    kernels::KvPolicyCompactArgs c;
    c.seq = one.as<KvPolicySeq>();
    c.k_layers = kptr.as<__nv_bfloat16*>();
    c.v_layers = vptr.as<__nv_bfloat16*>();
    c.layout.kv_quant = sh.quant;
    c.block_table = lc.dt.as<int32_t>() + static_cast<size_t>(s) * lc.max_blocks;
    c.block_size = kBs;
    c.num_layers = 1;
    c.num_kv_heads = G;
    c.from = kFrom;
    c.old_slots = lens[s];
    c.sides = dsides.as<kernels::KvPolicyLayerSides>();
    c.host_sides = &sides;
    ASSERT_EQ(kernels::LaunchKvPolicyCompact(c, Stream(*cuda_)), cudaSuccess);
    ASSERT_OK(cuda_->Synchronize());
    after[s].slot_offset = lens[s] - (kFrom + most);
  }
  const std::vector<int32_t> gslot = GetAll<int32_t>(*cuda_, dev.slot);
  const std::vector<uint8_t> kafter = GetAll<uint8_t>(*cuda_, lc.dk), vafter = GetAll<uint8_t>(*cuda_, lc.dv);
  int64_t moved = 0;
  for (int s = 0; s < S; ++s) {
    if (lens[s] < 4 * kFrom) continue;
    const int cap = seqs[s].capacity;
    for (int g = 0; g < G; ++g) {
      int next = kFrom;
      for (int pos = kFrom; pos < lens[s]; ++pos) {
        if (dstate[s][g * cap + pos] != 1) continue;
        const int want_slot = next++;
        ASSERT_EQ(gslot[dev.offsets[s] + static_cast<size_t>(g) * cap + pos], want_slot);
        moved += want_slot != pos;
        ASSERT_EQ(lc.HeadEntry(kafter, sh.rk, lc.CacheSlot(s, want_slot), g),
                  lc.HeadEntry(kbefore, sh.rk, lc.CacheSlot(s, pos), g));
        ASSERT_EQ(lc.HeadEntry(vafter, sh.rv, lc.CacheSlot(s, want_slot), g),
                  lc.HeadEntry(vbefore, sh.rv, lc.CacheSlot(s, pos), g));
      }
    }
  }
  EXPECT_GT(moved, G > 1 ? 200 : 100);
  DeviceBuffer dafter = PutRaw(*cuda_, after);
  a.seqs = dafter.as<KvPolicySeq>();
  a.record_hits = false;
  ASSERT_EQ(kernels::LaunchKvPolicyLatentDecode(a, Stream(*cuda_)), cudaSuccess);
  const std::vector<float> compacted = Get(*cuda_, lc.dout, DType::kBF16);
  for (size_t i = 0; i < compacted.size(); ++i) {
    ASSERT_NEAR(compacted[i], got[i], 1e-2 * std::max(1.0f, std::fabs(got[i]))) << "element " << i;
  }
  // Without record_hits nothing was recorded (the slots moved, the last_hits did not change).
  EXPECT_EQ(GetAll<int32_t>(*cuda_, dev.last_hit), glast);
}

// Every key kept (no choice): each listed tile holds 16 consecutive positions, so the latent
// decode's rotation of row g + 8 on from row g applies (as for a prompt's importance rows).
TEST_P(CudaKvPolicyLatentTest, AllKeptKeysTakeTheConsecutiveRotation) {
  const LatentShape sh = GetParam();
  std::mt19937 rng(31 + sh.rk + 3 * sh.rv + sh.heads);
  const LatentCase lc(*cuda_, rng, sh, {1, 37, 700, 3000, 257});
  const std::unique_ptr<policy_test::RandomCormStates> rs = policy_test::MakeRandomCormStates(
      kvpolicy::LayerShape{sh.rk, sh.rv, false, 2 * (sh.rk + sh.rv)}, lc.G, lc.lens, rng, /*choose=*/false);
  ASSERT_EQ(rs->dead, 0);
  DeviceStates dev = Upload(*cuda_, rs->dstate, rs->dslot, rs->dlast, rs->seqs, 1, lc.G);
  std::vector<kvpolicy::SequenceKvPolicy*> ptrs = rs->ptrs;
  const std::vector<float> want = lc.Cpu(*cpu_, ptrs);
  auto scratch = cuda_->Allocate(kernels::KvPolicyDecodeScratchBytes(lc.S, lc.H, lc.G, kHd, lc.max_len));
  ASSERT_OK(scratch);
  const kernels::KvPolicyLatentDecodeArgs a = lc.Args(dev.seqs.as<KvPolicySeq>(), scratch->data());
  const std::vector<int32_t> initial = GetAll<int32_t>(*cuda_, dev.last_hit);
  std::vector<float> got;
  std::vector<int32_t> glast;
  ExpectDecodesAsTheCpu(*cuda_, lc, *rs, dev, want, initial, a, {4, 1}, &got, &glast);
}

std::string LatentName(const ::testing::TestParamInfo<LatentShape>& i) {
  const LatentShape& s = i.param;
  const char* q = s.quant == KvQuant::kNone ? "bf16" : s.quant == KvQuant::kFp8E4m3 ? "fp8" : s.quant == KvQuant::kInt8 ? "int8" : "int4";
  return "h" + std::to_string(s.heads) + "kv" + std::to_string(s.kv_heads) + "k" + std::to_string(s.rk) + "v" +
         std::to_string(s.rv) + q;
}

INSTANTIATE_TEST_SUITE_P(Shapes, CudaKvPolicyLatentTest,
                         ::testing::Values(LatentShape{4, 2, 64, 64, KvQuant::kNone},
                                           LatentShape{8, 2, 96, 128, KvQuant::kNone},
                                           LatentShape{16, 2, 24, 40, KvQuant::kNone},
                                           LatentShape{4, 2, 24, 40, KvQuant::kInt4},
                                           LatentShape{8, 1, 64, 48, KvQuant::kFp8E4m3},
                                           LatentShape{4, 2, 112, 80, KvQuant::kInt8}),
                         LatentName);

class CudaKvPolicyLatentArgsTest : public CpuCudaPair<::testing::Test> {};

TEST_F(CudaKvPolicyLatentArgsTest, RejectsWhatItDoesNotImplement) {
  std::mt19937 rng(3);
  const LatentCase lc(*cuda_, rng, LatentShape{4, 2, 64, 64, KvQuant::kNone}, {40});
  auto scratch = cuda_->Allocate(kernels::KvPolicyDecodeScratchBytes(1, 4, 2, kHd, 40));
  ASSERT_OK(scratch);
  DeviceBuffer seqs = PutRaw(*cuda_, std::vector<KvPolicySeq>(1));
  kernels::KvPolicyLatentDecodeArgs a = lc.Args(seqs.as<KvPolicySeq>(), scratch->data());
  auto refused = [&](auto edit) {
    kernels::KvPolicyLatentDecodeArgs b = a;
    edit(b);
    return kernels::LaunchKvPolicyLatentDecode(b, Stream(*cuda_)) == cudaErrorInvalidValue;
  };
  // The arguments as made are taken (an entry of no keys: its output row is zeros).
  EXPECT_EQ(kernels::LaunchKvPolicyLatentDecode(a, Stream(*cuda_)), cudaSuccess);
  ASSERT_OK(cuda_->Synchronize());
  EXPECT_TRUE(refused([](auto& b) { b.scratch = nullptr; }));
  EXPECT_TRUE(refused([](auto& b) { b.seqs = nullptr; }));
  EXPECT_TRUE(refused([](auto& b) { b.num_seqs = 0; }));
  EXPECT_TRUE(refused([](auto& b) { b.latent.k_rank = 60; }));       // not a multiple of 8
  EXPECT_TRUE(refused([](auto& b) { b.latent.head_dim = 64; }));     // the kernels take 128
  EXPECT_TRUE(refused([](auto& b) { b.latent.num_heads = 32; }));    // a group of 16 (above 8)
  EXPECT_TRUE(refused([](auto& b) { b.latent.inv_freq = nullptr; }));
  EXPECT_TRUE(refused([](auto& b) { b.span = 3; }));
}

}  // namespace
}  // namespace lorc
