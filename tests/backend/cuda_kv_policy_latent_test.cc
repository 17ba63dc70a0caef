// Parity of CORM's and MiKV's decode over LoRC latent layers on the GPU (kernels/kv_policy.cuh
// LaunchKvPolicyLatentDecode) with the CPU backend's LatentAttention under the same policy states
// (backend/cpu_latent_attention.cc, the reference): outputs, the importance it records, and a
// compaction over per-layer widths (LaunchKvPolicyCompact with sides) moving latents, or their
// codes and scales, bit for bit, after which the decode gives what it gave before; MiKV's low
// entries read quantized from their slots, packed by the compaction into each head's run (byte for
// byte the CPU's), and read from the run (MikvMatchesCpuBeforeAndAfterCompaction).
// Shapes: head_dim 128, GQA groups 2, 4 and 8, ranks through both of the latent decode's layouts
// (<= 64: the fixed one; above: the generic one) and r % 16 == 8 (int4 regions of 4 bytes modulo
// 8, moved as 4-byte words); bf16, fp8, int8 and int4 caches; block size 16 over shuffled blocks;
// sequences of 1 to 3,000 keys with 30 % budgets (about 2/3 of the keys dead); every span of
// chunks a CTA may list as one item (1, 2 and 4, and the launcher's choice).
// Tolerances: outputs |cuda - cpu| <= 1.5e-2 * max(1, |cpu|), the latent attention's parity
// tolerance (tests/backend/cuda_latent_attention_test.cc: the reconstructed, rotated keys and the
// probabilities rounded to bf16 before their products). last_hit: equal except where the key's
// largest probability over the group (fp64) is within 2e-2 relative of 1/t: a bf16 key's rounding
// moves a score by ~2^-9 |k| |q|, a probability by that relative, and we count such ties (at most
// 8, or 1 % of the full keys compared: MiKV keeps ~5x CORM's keys at full precision). MiKV's low
// keys are the same values on both sides (kvpolicy/low_precision.h bit for bit from the same
// latents), rounded to bf16 in the GPU's tile like every other row: the same tolerances
// (H200, 2026-12-04, the MiKV kernels as first written: at most 7 near ties differ, over 2,366
// full keys at h4kv2k24v40int4).
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
#include "kvpolicy/low_precision.h"
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

  // The device's cache bytes `k` / `v` (host copies) as a CPU backend cache: bf16 latents, or the
  // quantized layout (codes and scales); KV heads and block size set (KvHeadSlotBytes needs them).
  // Its head regions, and so MiKV's packed runs, lie as the device's.
  KvLayer HostLayer(std::vector<uint8_t>* k, std::vector<uint8_t>* v) const {
    KvLayer l{k->data(), v->data(), int64_t{G} * rk, int64_t{G} * rv,
              quant == KvQuant::kNone ? DType::kBF16 : DType::kU8};
    l.quant = quant;
    l.num_kv_heads = G;
    l.block_size = kBs;
    return l;
  }
  // Entry e of head g's packed run of low entries from sequence slot `base` of sequence s, in a
  // side's bytes (width rk or rv): run byte b is byte b % region of run slot b / region's head
  // region (kvpolicy/low_precision.h ForEachLowPiece).
  std::vector<uint8_t> RunEntry(const std::vector<uint8_t>& bytes, int width, int s, int g, int64_t base, int64_t e,
                                int64_t entry_bytes) const {
    const int64_t region = policy_test::HeadRegionBytes(quant, width);
    std::vector<uint8_t> out(entry_bytes);
    kvpolicy::ForEachLowPiece(e, entry_bytes, region, [&](int64_t i, int64_t off, int64_t n, int64_t at) {
      const int64_t b =
          policy_test::HeadRegionOffset(quant, kBs, G, width, CacheSlot(s, static_cast<int>(base + i)), g) + off;
      std::copy_n(bytes.data() + b, n, out.data() + at);
    });
    return out;
  }

  // The CPU backend's LatentAttention under the states' policy (F32 on the values above, or the
  // cache `cache`), which records importance into the states.
  std::vector<float> Cpu(Backend& cpu, std::vector<kvpolicy::SequenceKvPolicy*>& states,
                         const KvLayer* cache = nullptr) const {
    const std::unique_ptr<policy_test::CpuDecodePlan> d = policy_test::PlanCpuDecode(cpu, lens, tables, max_blocks, kBs);
    std::vector<float> kcpu = ck, vcpu = cv, qcpu = q, up = k_up, out(static_cast<size_t>(S) * H * rv, 0.f);
    LatentAttentionParams p;
    p.q = Tensor2D{qcpu.data(), DType::kF32, S, int64_t{H} * kHd, int64_t{H} * kHd};
    p.k_up = Tensor2D{up.data(), DType::kF32, int64_t{G} * kHd, rk, rk};
    p.out = Tensor2D{out.data(), DType::kF32, S, int64_t{H} * rv, int64_t{H} * rv};
    p.cache = cache != nullptr ? *cache : KvLayer{kcpu.data(), vcpu.data(), int64_t{G} * rk, int64_t{G} * rv, DType::kF32};
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
// The host latents are never compacted: position p's at its sequence's slot p, as written. MiKV
// (`bits` > 0): a kLow key's latents are its entry's values (quantized and dequantized, no
// balance), as both sides read them.
std::vector<double> GroupProbabilities(const LatentCase& c, const kvpolicy::SequenceKvPolicy& st, int s, int g,
                                       int bits) {
  const int len = c.lens[s], group = c.H / c.G;
  std::vector<int> kept;
  for (int p = 0; p < len; ++p) {
    if (st.state(0, g, p) != SlotState::kDead) kept.push_back(p);
  }
  std::vector<double> k(kept.size() * kHd);
  std::vector<float> row(c.rk), scratch(c.rk);
  std::vector<uint8_t> entry(bits > 0 ? kvpolicy::LowEntryBytes(c.rk, bits) : 0);
  for (size_t j = 0; j < kept.size(); ++j) {
    const int64_t cs = c.CacheSlot(s, kept[j]);
    std::copy_n(c.ck.data() + (cs * c.G + g) * c.rk, c.rk, row.data());
    if (bits > 0 && st.state(0, g, kept[j]) == SlotState::kLow) {
      kvpolicy::EncodeLowEntry(row.data(), c.rk, bits, nullptr, scratch.data(), entry.data());
      kvpolicy::DecodeLowEntry(entry.data(), c.rk, bits, nullptr, row.data());
    }
    double* kj = k.data() + j * kHd;
    for (int d = 0; d < kHd; ++d) {
      double acc = 0;
      for (int r = 0; r < c.rk; ++r) acc += double{c.k_up[(int64_t{g} * kHd + d) * c.rk + r]} * row[r];
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

// The GPU's decode (`a`, over `dev`, from last_hits `initial`, the CPU's before its decode) with
// each of `spans` against the CPU's outputs `want` and the last_hits the CPU recorded in `rs`'s
// states: outputs within 1.5e-2 relative, the full keys' last_hits equal except near ties (fp64
// p x t within 2e-2 of 1; t over full and low keys). MiKV's low keys are not compared: a low key is
// never chosen again, the GPU records none (kv_policy.cuh) and the CPU's record is never read.
// The last span's outputs and last_hits come back in `got` / `glast`.
void ExpectDecodesAsTheCpu(Backend& cuda, const LatentCase& lc, const policy_test::RandomPolicyStates& rs,
                           const DeviceStates& dev, const std::vector<float>& want, const std::vector<int32_t>& initial,
                           kernels::KvPolicyLatentDecodeArgs a, std::initializer_list<int> spans, std::vector<float>* got,
                           std::vector<int32_t>* glast) {
  const int S = lc.S, G = lc.G;
  const int bits = rs.config.kind == KvPolicyKind::kMikv ? rs.config.low_bits : 0;
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
    int64_t hits = 0, ties = 0, compared = 0;
    for (int s = 0; s < S; ++s) {
      const int cap = rs.seqs[s].capacity, len = lc.lens[s];
      for (int g = 0; g < G; ++g) {
        std::vector<double> pmax;  // computed at the first difference (fp64 over every kept key)
        int kept = 0;
        for (int p = 0; p < len; ++p) kept += rs.ptrs[s]->state(0, g, p) != SlotState::kDead;
        for (int pos = 0; pos < len; ++pos) {
          const size_t at = dev.offsets[s] + static_cast<size_t>(g) * cap + pos;
          if (rs.ptrs[s]->state(0, g, pos) == SlotState::kLow) {  // never recorded on the GPU
            EXPECT_EQ((*glast)[at], initial[at]) << "seq " << s << " head " << g << " low key " << pos;
            continue;
          }
          const int32_t cpu_hit = rs.ptrs[s]->last_hit(0, g)[pos], gpu_hit = (*glast)[at];
          compared += rs.ptrs[s]->state(0, g, pos) == SlotState::kFull;
          hits += cpu_hit == len - 1 && initial[at] != len - 1;
          if (cpu_hit == gpu_hit) continue;
          if (pmax.empty()) pmax = GroupProbabilities(lc, *rs.ptrs[s], s, g, bits);
          const bool near_tie = std::fabs(pmax[pos] * kept - 1.0) < 2e-2;
          ties += near_tie;
          EXPECT_TRUE(near_tie) << "seq " << s << " head " << g << " pos " << pos << ": cpu " << cpu_hit << " gpu "
                                << gpu_hit << " p*t " << pmax[pos] * kept;
        }
        for (int pos = len; pos < cap; ++pos) EXPECT_EQ((*glast)[dev.offsets[s] + g * cap + pos], -3);
      }
    }
    std::cout << "span " << span << " importance: " << hits << " keys hit, " << ties << " near ties differ ("
              << compared << " full keys)\n";
    EXPECT_GT(hits, 50) << "the query must find keys important for the test to mean something";
    // (At most 7 differed on the H200, 2026-12-04, over about 2,300 full keys.)
    EXPECT_LE(ties, std::max<int64_t>(8, compared / 250));
  }
}

// The one latent layer of a LatentCase as a compaction over per-layer sides addresses it: its
// sides (host and device) and layer pointers, and the arguments of sequence s's compaction.
struct LayerCompaction {
  kernels::KvPolicyLayerSides sides;
  DeviceBuffer dsides, kptr, vptr;
  LayerCompaction(Backend& cuda, const LatentCase& lc, const LatentShape& sh) {
    sides.k_dim = sh.rk;
    sides.v_dim = sh.rv;
    sides.k_stride = int64_t{sh.kv_heads} * sh.rk;
    sides.v_stride = int64_t{sh.kv_heads} * sh.rv;
    if (sh.quant != KvQuant::kNone) {
      sides.k_q = lc.Side(sh.rk);
      sides.v_q = lc.Side(sh.rv);
    }
    dsides = PutRaw(cuda, std::vector<kernels::KvPolicyLayerSides>{sides});
    kptr = PutRaw(cuda, std::vector<void*>{lc.dk.data()});
    vptr = PutRaw(cuda, std::vector<void*>{lc.dv.data()});
  }
  kernels::KvPolicyCompactArgs Args(const LatentCase& lc, const LatentShape& sh, const KvPolicySeq* seq, int s,
                                    int from, int old_slots) const {
    kernels::KvPolicyCompactArgs c;
    c.seq = seq;
    c.k_layers = kptr.as<__nv_bfloat16*>();
    c.v_layers = vptr.as<__nv_bfloat16*>();
    c.layout.kv_quant = sh.quant;
    c.block_table = lc.dt.as<int32_t>() + static_cast<size_t>(s) * lc.max_blocks;
    c.block_size = kBs;
    c.num_layers = 1;
    c.num_kv_heads = sh.kv_heads;
    c.from = from;
    c.old_slots = old_slots;
    c.sides = dsides.as<kernels::KvPolicyLayerSides>();
    c.host_sides = &sides;
    return c;
  }
};

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
  const LayerCompaction layer(*cuda_, lc, sh);
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
    const kernels::KvPolicyCompactArgs c = layer.Args(lc, sh, one.as<KvPolicySeq>(), s, kFrom, lens[s]);
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

// MiKV over latent layers (kv_policy.cuh: KvPolicyLatentDecodeArgs::low_bits, KvPolicySeq::packed_pos,
// KvPolicyCompactArgs over sides with low_bits), int4 and int2, against the CPU reading a copy of
// the device's cache bytes (bf16 latents, or codes and scales: its packed runs lie as the device's,
// so their bytes compare). States (MakeRandomPolicyStates): about 30 % of the keys full, the rest
// demoted (kLow, in their slots), and in the sequences of odd index (37 and 3,000 keys) about a
// quarter dead first; sequences of 1 to 3,000 keys (12 policy chunks); MiKV's per-head arrays
// with no run and the key balance unset (as a LoRC model's stay: its choice runs without
// balance_keys). In order:
//  1. The decode with the low keys in their slots (quantized on the fly) against the CPU's
//     LatentAttention, every span: outputs and the full keys' importance (t over full and low keys)
//     as the CORM test's; without low_bits (the low keys skipped) the outputs part from those.
//  2. A compaction from slot 16 of the sequences of 257 keys or more, on both sides (CPU:
//     SequenceKvPolicy::Compact and CompactKvHeads; GPU: one LaunchKvPolicyCompact each, per-layer
//     sides, low_bits, a stage of (the head's low entries) x (K + V entry bytes)): the device's
//     states (kLow at positions >= 16 <-> kKvPolicyLowPacked, its slot a distinct entry index in
//     [0, num_packed) whose packed_pos is the position; the rest as the CPU's, at the CPU's slots; the slot / pos maps inverse, -1
//     past each head's runs), low_base and num_packed the CPU's, every moved row and packed entry
//     (K and V) byte for byte the CPU's; then, packed_max set to each sequence's most packed
//     entries, the decode (the walk over the runs' entries, rotated at their packed_pos; entries
//     straddling two slots) against the CPU's, importance included.
//  3. A second choice at 15 % on both sides (the choice kernel beside packed keys: the same
//     states), the decode over packed keys and newly demoted ones still in their slots, a second
//     compaction (the old run re-packed with the new entries: the device's run order is then not
//     the CPU's, entries are compared by position) with the same checks, and the decode again.
TEST_P(CudaKvPolicyLatentTest, MikvMatchesCpuBeforeAndAfterCompaction) {
  const LatentShape sh = GetParam();
  constexpr int kFrom = 16;
  int ran = 0;
  for (const int bits : {4, 2}) {
    SCOPED_TRACE(bits == 4 ? "int4" : "int2");
    std::mt19937 rng(43 + sh.rk + 3 * sh.rv + sh.heads + bits);
    const LatentCase lc(*cuda_, rng, sh, {1, 37, 700, 3000, 257});
    const int S = lc.S, G = lc.G;
    const std::vector<int32_t>& lens = lc.lens;
    // The CPU reference's cache: a copy of the device's bytes, compacted by the CPU below.
    std::vector<uint8_t> hk = GetAll<uint8_t>(*cuda_, lc.dk), hv = GetAll<uint8_t>(*cuda_, lc.dv);
    const KvLayer host = lc.HostLayer(&hk, &hv);
    const int64_t kregion = KvHeadSlotBytes(host, false), vregion = KvHeadSlotBytes(host, true);
    ASSERT_EQ(kregion, policy_test::HeadRegionBytes(sh.quant, sh.rk));
    ASSERT_EQ(vregion, policy_test::HeadRegionBytes(sh.quant, sh.rv));
    const int64_t kb = kvpolicy::LowEntryBytes(sh.rk, bits), vb = kvpolicy::LowEntryBytes(sh.rv, bits);
    // A low entry must fit in the region of the slot it leaves, or the runner refuses the load
    // (worker/model_runner.cc InitKvPolicy): int4 entries over an int4 cache (h4kv2k24v40int4: 16 /
    // 24 bytes against code regions of 12 / 20) are not run; int4 caches take MiKV int2 only.
    if (kb > kregion || vb > vregion) {
      std::cout << "int" << bits << " entries of " << kb << " / " << vb << " bytes do not fit regions of " << kregion
                << " / " << vregion << ": not run\n";
      continue;
    }
    ++ran;
    policy_test::RandomStatesSpec spec;
    spec.kind = KvPolicyKind::kMikv;
    spec.low_bits = bits;
    spec.recent_share = 0.4;
    spec.dead_too = true;
    const std::unique_ptr<policy_test::RandomPolicyStates> rs = policy_test::MakeRandomPolicyStates(
        kvpolicy::LayerShape{sh.rk, sh.rv, false, 2 * (sh.rk + sh.rv), kregion, vregion}, G, lens, rng, spec);
    ASSERT_GT(rs->low, 1000) << "the states must demote keys for the test to mean something";
    ASSERT_GT(rs->dead, 200) << "dead keys beside the low ones";
    std::vector<kvpolicy::SequenceKvPolicy*> ptrs = rs->ptrs;
    std::vector<KvPolicySeq> seqs = rs->seqs;
    const policy_test::MikvHeadArrays heads = policy_test::AttachMikvHeads(*cuda_, &seqs, G, kHd);
    DeviceStates dev = Upload(*cuda_, rs->dstate, rs->dslot, rs->dlast, seqs, 1, G);
    const std::vector<int32_t> initial = GetAll<int32_t>(*cuda_, dev.last_hit);

    // The CPU's decode over `host` and the GPU's over the entries `entries` (packed_max and
    // slot_offset as set), both from the last_hits `from_hits` (device layout), with each of
    // `spans`: ExpectDecodesAsTheCpu's checks. The scratch and max_seq_len by the longest walk.
    std::vector<float> got;
    auto expect_decode = [&](const std::vector<KvPolicySeq>& entries, const std::vector<int32_t>& from_hits,
                             std::initializer_list<int> spans) {
      for (int s = 0; s < S; ++s) {
        for (int g = 0; g < G; ++g) {
          for (int pos = 0; pos < lens[s]; ++pos) {
            ptrs[s]->last_hit(0, g)[pos] = from_hits[dev.offsets[s] + static_cast<size_t>(g) * rs->seqs[s].capacity + pos];
          }
        }
      }
      const std::vector<float> want = lc.Cpu(*cpu_, ptrs, &host);
      int32_t walk = 1;
      for (const KvPolicySeq& e : entries) walk = std::max(walk, e.seq_len - e.slot_offset + e.packed_max);
      auto scratch = cuda_->Allocate(kernels::KvPolicyDecodeScratchBytes(S, lc.H, G, kHd, walk));
      ASSERT_OK(scratch);
      DeviceBuffer d = PutRaw(*cuda_, entries);
      kernels::KvPolicyLatentDecodeArgs a = lc.Args(d.as<KvPolicySeq>(), scratch->data());
      a.low_bits = bits;
      a.max_seq_len = walk;
      std::vector<int32_t> glast;
      ExpectDecodesAsTheCpu(*cuda_, lc, *rs, dev, want, from_hits, a, spans, &got, &glast);
    };

    // 1. The low keys in their slots.
    {
      SCOPED_TRACE("low keys in their slots");
      expect_decode(dev.host_seqs, initial, {4, 2, 1, 0});
      if (HasFatalFailure()) return;
      // Reading them matters: the same decode with the low keys skipped (low_bits 0) parts.
      auto scratch = cuda_->Allocate(kernels::KvPolicyDecodeScratchBytes(S, lc.H, G, kHd, lc.max_len));
      ASSERT_OK(scratch);
      kernels::KvPolicyLatentDecodeArgs a = lc.Args(dev.seqs.as<KvPolicySeq>(), scratch->data());
      a.record_hits = false;
      ASSERT_EQ(kernels::LaunchKvPolicyLatentDecode(a, Stream(*cuda_)), cudaSuccess);
      const std::vector<float> skipped = Get(*cuda_, lc.dout, DType::kBF16);
      double apart = 0;
      for (size_t i = 0; i < got.size(); ++i) apart = std::max(apart, double{std::fabs(skipped[i] - got[i])});
      EXPECT_GT(apart, 0.05) << "the low keys change the outputs";
    }

    // 2. and 3.
    auto stage = cuda_->Allocate(static_cast<size_t>(G) * lc.max_len * (kb + vb));
    ASSERT_OK(stage);
    const LayerCompaction layer(*cuda_, lc, sh);
    std::vector<KvPolicySeq> after = dev.host_seqs;
    std::vector<int> held(lens.begin(), lens.end());  // the slots each sequence holds
    std::vector<int32_t> from_hits = initial;
    auto compacted = [&](int s) { return lens[s] >= 4 * kFrom; };
    for (int round = 0; round < 2; ++round) {
      SCOPED_TRACE(round == 0 ? "first compaction" : "second compaction");
      if (round == 1) {
        // A second choice at 15 % from fresh last_hits, the same on both sides.
        rs->config.budget_fraction = 0.15;
        from_hits = GetAll<int32_t>(*cuda_, dev.last_hit);
        for (int s = 0; s < S; ++s) {
          const int cap = rs->seqs[s].capacity;
          for (int g = 0; g < G; ++g) {
            int32_t* lh = ptrs[s]->last_hit(0, g);
            policy_test::DrawLastHits(rng, lens[s], rs->config.window, spec.recent_share, lh);
            std::copy_n(lh, lens[s], from_hits.begin() + dev.offsets[s] + static_cast<size_t>(g) * cap);
            ptrs[s]->set_choose(true);
            ptrs[s]->Apply(0, g, {}, nullptr);
            ptrs[s]->set_choose(false);
          }
          after[s].budget = static_cast<int32_t>(rs->config.BudgetFor(lens[s]));
          after[s].choose = 1;
        }
        ASSERT_OK(cuda_->CopyToDevice(dev.last_hit.data(), from_hits.data(), from_hits.size() * sizeof(int32_t)));
        DeviceBuffer dchoose = PutRaw(*cuda_, after);
        kernels::KvPolicyChooseArgs c;
        c.seqs = dchoose.as<KvPolicySeq>();
        c.num_seqs = S;
        c.num_layers = 1;
        c.num_kv_heads = G;
        c.sinks = rs->config.sinks;
        c.recent = rs->config.recent;
        c.window = rs->config.window;
        c.victim_state = kernels::kKvPolicyLow;
        ASSERT_EQ(kernels::LaunchKvPolicyChoose(c, Stream(*cuda_)), cudaSuccess);
        const std::vector<uint8_t> gs = GetAll<uint8_t>(*cuda_, dev.state);
        int64_t newly = 0;
        for (int s = 0; s < S; ++s) {
          const int cap = rs->seqs[s].capacity;
          for (int g = 0; g < G; ++g) {
            for (int pos = 0; pos < lens[s]; ++pos) {
              const SlotState cs = ptrs[s]->state(0, g, pos);
              const uint8_t want = cs != SlotState::kLow                ? static_cast<uint8_t>(cs)
                                   : ptrs[s]->low_entry(0, g, pos) >= 0 ? kernels::kKvPolicyLowPacked
                                                                        : kernels::kKvPolicyLow;
              const uint8_t gst = gs[dev.offsets[s] + static_cast<size_t>(g) * cap + pos];
              ASSERT_EQ(gst, want) << "seq " << s << " head " << g << " pos " << pos;
              newly += gst == kernels::kKvPolicyLow && pos >= kFrom && compacted(s);
            }
          }
        }
        ASSERT_GT(newly, 100) << "the second choice must demote keys for the test to mean something";
        for (KvPolicySeq& e : after) e.choose = 0;
        SCOPED_TRACE("packed keys and keys demoted since in their slots");
        expect_decode(after, from_hits, {4, 1});
        if (HasFatalFailure()) return;
      }

      // The compactions: the CPU's, then the device's to the same slots.
      std::vector<int> old_held = held;
      for (int s = 0; s < S; ++s) {
        if (!compacted(s)) continue;
        kvpolicy::SequenceKvPolicy& st = *ptrs[s];
        ASSERT_OK(policy_test::CompactOnCpu(*cpu_, st, {host}, lc.tables.data() + static_cast<size_t>(s) * lc.max_blocks,
                                            kBs, lc.num_blocks, kFrom));
        int most_low = 0;  // the most entries a head of this sequence packs
        for (int g = 0; g < G; ++g) {
          int n = 0;
          for (int pos = 0; pos < lens[s]; ++pos) n += st.state(0, g, pos) == SlotState::kLow && st.low_entry(0, g, pos) >= 0;
          most_low = std::max(most_low, n);
        }
        KvPolicySeq e = after[s];
        DeviceBuffer one = PutRaw(*cuda_, std::vector<KvPolicySeq>{e});
        kernels::KvPolicyCompactArgs c = layer.Args(lc, sh, one.as<KvPolicySeq>(), s, kFrom, held[s]);
        c.low_bits = bits;
        c.stage = static_cast<uint8_t*>(stage->data());
        c.stage_head_bytes = std::max(most_low, 1) * (kb + vb);
        ASSERT_EQ(kernels::LaunchKvPolicyCompact(c, Stream(*cuda_)), cudaSuccess);
        ASSERT_OK(cuda_->Synchronize());
        held[s] = static_cast<int>(st.num_slots());
        ASSERT_LT(held[s], old_held[s]) << "seq " << s << ": the compaction frees slots";
        after[s].slot_offset = static_cast<int32_t>(st.slot_offset());
        after[s].packed_max = most_low;
      }

      // The device's states, maps, runs and bytes against the CPU's.
      const std::vector<uint8_t> gstate = GetAll<uint8_t>(*cuda_, dev.state);
      const std::vector<int32_t> gslot = GetAll<int32_t>(*cuda_, dev.slot), gpos = GetAll<int32_t>(*cuda_, dev.pos),
                                 gpacked = GetAll<int32_t>(*cuda_, dev.packed_pos);
      const std::vector<uint8_t> gheads = GetAll<uint8_t>(*cuda_, heads.buf);
      const std::vector<uint8_t> kdev = GetAll<uint8_t>(*cuda_, lc.dk), vdev = GetAll<uint8_t>(*cuda_, lc.dv);
      int64_t packed = 0, moved = 0;
      for (int s = 0; s < S; ++s) {
        if (!compacted(s)) continue;
        const kvpolicy::SequenceKvPolicy& st = *ptrs[s];
        const int cap = rs->seqs[s].capacity, len = lens[s];
        for (int g = 0; g < G; ++g) {
          const size_t at = dev.offsets[s] + static_cast<size_t>(g) * cap;
          const int32_t base = heads.LowBase(gheads, s, g), n = heads.NumPacked(gheads, s, g);
          ASSERT_EQ(base, st.low_base(0, g)) << "seq " << s << " head " << g << ": low_base";
          std::vector<char> seen(std::max(n, 0), 0);
          int32_t cpu_packed = 0;
          for (int pos = 0; pos < len; ++pos) {
            const SlotState cs = st.state(0, g, pos);
            const uint8_t gst = gstate[at + pos];
            const int32_t sl = gslot[at + pos];
            if (cs == SlotState::kLow && st.low_entry(0, g, pos) >= 0) {  // packed on the CPU
              ++cpu_packed;
              ASSERT_EQ(gst, kernels::kKvPolicyLowPacked) << "seq " << s << " head " << g << " pos " << pos;
              ASSERT_GE(sl, 0) << "seq " << s << " head " << g << " pos " << pos << ": entry index";
              ASSERT_LT(sl, n) << "seq " << s << " head " << g << " pos " << pos << ": entry index";
              ASSERT_FALSE(seen[sl]) << "seq " << s << " head " << g << " pos " << pos << ": entry " << sl << " twice";
              seen[sl] = 1;
              ASSERT_EQ(gpacked[at + sl], pos) << "seq " << s << " head " << g << " entry " << sl << ": packed_pos";
              const int64_t cpu_e = st.low_entry(0, g, pos), cpu_base = st.low_base(0, g);
              ASSERT_EQ(lc.RunEntry(kdev, sh.rk, s, g, base, sl, kb), lc.RunEntry(hk, sh.rk, s, g, cpu_base, cpu_e, kb))
                  << "seq " << s << " head " << g << " pos " << pos << ": K entry " << sl;
              ASSERT_EQ(lc.RunEntry(vdev, sh.rv, s, g, base, sl, vb), lc.RunEntry(hv, sh.rv, s, g, cpu_base, cpu_e, vb))
                  << "seq " << s << " head " << g << " pos " << pos << ": V entry " << sl;
              ++packed;
              continue;
            }
            ASSERT_EQ(gst, static_cast<uint8_t>(cs)) << "seq " << s << " head " << g << " pos " << pos;
            if (cs == SlotState::kDead) continue;
            // Full keys, and low ones below kFrom (read from their slots still).
            ASSERT_EQ(sl, st.slot(0, g, pos)) << "seq " << s << " head " << g << " pos " << pos;
            ASSERT_EQ(gpos[at + sl], pos) << "seq " << s << " head " << g << " slot " << sl << ": pos";
            if (cs == SlotState::kFull && sl >= kFrom) {
              const int64_t cslot = lc.CacheSlot(s, sl);
              ASSERT_EQ(lc.HeadEntry(kdev, sh.rk, cslot, g), lc.HeadEntry(hk, sh.rk, cslot, g))
                  << "seq " << s << " head " << g << " pos " << pos << " at slot " << sl << ": K";
              ASSERT_EQ(lc.HeadEntry(vdev, sh.rv, cslot, g), lc.HeadEntry(hv, sh.rv, cslot, g))
                  << "seq " << s << " head " << g << " pos " << pos << " at slot " << sl << ": V";
              moved += sl != pos;
            }
          }
          ASSERT_EQ(n, cpu_packed) << "seq " << s << " head " << g << ": num_packed";
          // The slot -> position map from kFrom: inverse to slot wherever it names a position, and
          // -1 past the head's runs (kv_policy.cuh KvPolicySeq::pos, KvPolicyCompactArgs::old_slots).
          const int64_t run_end =
              base + std::max(kvpolicy::LowRunSlots(n, kb, kregion), kvpolicy::LowRunSlots(n, vb, vregion));
          for (int sl = kFrom; sl < old_held[s]; ++sl) {
            const int32_t p = gpos[at + sl];
            if (sl >= run_end) {
              ASSERT_EQ(p, -1) << "seq " << s << " head " << g << " slot " << sl << " past the runs (" << run_end << ")";
            } else if (p >= 0) {
              ASSERT_LT(p, len) << "seq " << s << " head " << g << " slot " << sl;
              ASSERT_EQ(gslot[at + p], sl) << "seq " << s << " head " << g << " slot " << sl << " names position " << p;
            }
          }
        }
      }
      std::cout << "int" << bits << (round == 0 ? " first" : " second") << " compaction: " << packed
                << " entries packed, " << moved << " full keys moved\n";
      EXPECT_GT(packed, 1000);
      EXPECT_GT(moved, 100);

      // The decode after it: packed keys found by position, read from the runs.
      SCOPED_TRACE("after the compaction");
      expect_decode(after, from_hits, {4, 1});
      if (HasFatalFailure()) return;
    }
  }
  EXPECT_GT(ran, 0);
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
                                           LatentShape{4, 2, 112, 80, KvQuant::kInt8},
                                           // the generic layout (ranks > 64) with MiKV entries that
                                           // start 2 bytes into a word (int2, r % 16 == 8)
                                           LatentShape{4, 2, 72, 104, KvQuant::kNone},
                                           LatentShape{4, 2, 88, 120, KvQuant::kInt8}),
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
  EXPECT_TRUE(refused([](auto& b) { b.low_bits = 3; }));  // MiKV's 4 or 2 (0: CORM)
  EXPECT_TRUE(refused([](auto& b) { b.low_bits = 1; }));
}

}  // namespace
}  // namespace lorc
