// Parity of the GPU's token-level KV policy kernels (kernels/kv_policy.cuh) with the CPU
// references: the policy decode against the CPU backend's DecodeAttention under a
// KvPolicyAttention (the same states, dead keys skipped), its importance against the CPU's
// last_hit, CORM's choice against kvpolicy::SelectVictims, and the new positions' state against
// SequenceKvPolicy::Extend. Every decode case runs on both implementations of
// LaunchKvPolicyDecode: the tensor-core kernels (where they apply: sm_80+) and the CUDA-core ones;
// over quantized caches (fp8 / int8 / int4, read by the CUDA-core ones) as well, compactions
// moving codes and scales byte for byte.
// Tolerances: outputs |cuda - cpu| <= 1e-2 * max(1, |cpu|), as the paged attention's parity test
// (bf16 out; fp32 scores and sums on both sides, in another order). last_hit: equal except where
// the key's probability (fp64, the largest of its group) is within 1e-3 relative of 1/t, where
// fp32 rounding may decide either way. The choice: exactly the same states and counts (integer
// logic). Skipped without a CUDA device.
#include <algorithm>
#include <cmath>
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

std::vector<float> RandomBf16(std::mt19937& rng, size_t n, float sigma = 1.f) {
  std::normal_distribution<float> d(0.f, sigma);
  std::vector<float> v(n);
  for (float& x : v) x = RoundBf16(d(rng));
  return v;
}

struct Shape {
  int heads, kv_heads, hd;
};

// One layer's paged cache of `lens` sequences (their blocks permuted), random bf16 K and V and one
// query row per sequence, on the host and on the device: what the decode tests read. With `quant`
// (fp8 / int8 / int4) the device cache holds the rows quantized per token and KV head
// (kernels::KvqQuantizeToken, the CPU's cache layout) and kc / vc the values they dequantize to
// (KvqDequantizeHead): what the CPU reference reads from such a cache.
struct DecodeCase {
  DecodeCase(Backend& cuda, std::mt19937& rng, const Shape& sh, std::vector<int32_t> sequence_lens, int bs,
             bool key_outliers, kernels::KvQuant kv_quant = kernels::KvQuant::kNone)
      : S(static_cast<int>(sequence_lens.size())), H(sh.heads), G(sh.kv_heads), D(sh.hd), block_size(bs),
        kvw(int64_t{sh.kv_heads} * sh.hd), qw(int64_t{sh.heads} * sh.hd), quant(kv_quant),
        lens(std::move(sequence_lens)) {
    max_len = *std::max_element(lens.begin(), lens.end());
    max_blocks = (max_len + bs - 1) / bs;
    int num_blocks = 0;
    for (int len : lens) num_blocks += (len + bs - 1) / bs;
    std::vector<int32_t> perm(num_blocks);
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    tables.assign(static_cast<size_t>(S) * max_blocks, 0);
    for (int s = 0, next = 0; s < S; ++s) {
      for (int b = 0; b < (lens[s] + bs - 1) / bs; ++b) tables[s * max_blocks + b] = perm[next++];
    }
    kc = RandomBf16(rng, static_cast<size_t>(num_blocks) * bs * kvw);
    // Outlier channels (what MiKV's balance is for): every 17th key channel from 3, 8x larger.
    if (key_outliers) {
      for (size_t i = 0; i < kc.size(); ++i) {
        if ((i % D) % 17 == 3) kc[i] = RoundBf16(kc[i] * 8.f);
      }
    }
    vc = RandomBf16(rng, static_cast<size_t>(num_blocks) * bs * kvw);
    q = RandomBf16(rng, static_cast<size_t>(S) * qw, 1.5f);
    dq = Put(cuda, q, DType::kBF16);
    if (quant == kernels::KvQuant::kNone) {
      dk = Put(cuda, kc, DType::kBF16);
      dv = Put(cuda, vc, DType::kBF16);
    } else {
      dk = PutRaw(cuda, Quantize(&kc, num_blocks));
      dv = PutRaw(cuda, Quantize(&vc, num_blocks));
    }
    dt = PutRaw(cuda, tables);
    dout = Put(cuda, std::vector<float>(static_cast<size_t>(S) * qw, 7.f), DType::kBF16);
    kptr = PutRaw(cuda, std::vector<void*>{dk.data()});
    vptr = PutRaw(cuda, std::vector<void*>{dv.data()});
  }
  // The quantized layout of `rows` ([slots][kvw]) over num_blocks blocks (policy_test::QuantizeSide).
  std::vector<uint8_t> Quantize(std::vector<float>* rows, int num_blocks) const {
    return policy_test::QuantizeSide(quant, block_size, G, D, num_blocks, rows);
  }
  kernels::KvPolicyCacheLayout Layout() const {
    kernels::KvPolicyCacheLayout l;
    if (quant == kernels::KvQuant::kNone) return l;
    l.kv_quant = quant;
    l.k_q = l.v_q = kernels::MakeKvqSide(quant, block_size, G, D);
    return l;
  }
  // Bytes of a head's region of a slot (a bf16 row's D values, or its codes: where MiKV's packed
  // entries live), where cache slot cs's region of head g starts in a side's bytes, and the head's
  // whole entry there (policy_test::HeadEntry).
  int64_t RegionBytes() const { return policy_test::HeadRegionBytes(quant, D); }
  int64_t RegionOffset(int64_t cs, int g) const {
    return policy_test::HeadRegionOffset(quant, block_size, G, D, cs, g);
  }
  std::vector<uint8_t> HeadEntry(const std::vector<uint8_t>& bytes, int64_t cs, int g) const {
    return policy_test::HeadEntry(quant, block_size, G, D, bytes, cs, g);
  }
  // A compaction of sequence s (its device KvPolicySeq `seq`) from slot `from` (CORM's part; MiKV
  // sets low_bits and the stage).
  kernels::KvPolicyCompactArgs CompactArgs(const KvPolicySeq* seq, int s, int from, int old_slots) const {
    kernels::KvPolicyCompactArgs c;
    c.seq = seq;
    c.k_layers = kptr.as<__nv_bfloat16*>();
    c.v_layers = vptr.as<__nv_bfloat16*>();
    c.kv_stride = kvw;
    c.layout = Layout();
    c.block_table = dt.as<int32_t>() + static_cast<size_t>(s) * max_blocks;
    c.block_size = block_size;
    c.num_layers = 1;
    c.num_kv_heads = G;
    c.head_dim = D;
    c.from = from;
    c.old_slots = old_slots;
    return c;
  }
  // Sequence s's cache slot `slot` in the pool.
  int64_t CacheSlot(int s, int slot) const {
    return int64_t{tables[s * max_blocks + slot / block_size]} * block_size + slot % block_size;
  }
  // The CPU backend's DecodeAttention under the states' policy, F32 on the bf16-rounded values
  // ([S][H * D]); it records importance into the states as the GPU's decode does.
  std::vector<float> CpuDecode(Backend& cpu, std::vector<kvpolicy::SequenceKvPolicy*>& states) const {
    const std::unique_ptr<policy_test::CpuDecodePlan> d = policy_test::PlanCpuDecode(cpu, lens, tables, max_blocks,
                                                                                       block_size);
    std::vector<float> kcpu = kc, vcpu = vc, qcpu = q, out(static_cast<size_t>(S) * qw, 0.f);
    AttentionParams p;
    p.q = Tensor2D{qcpu.data(), DType::kF32, S, qw, qw};
    p.out = Tensor2D{out.data(), DType::kF32, S, qw, qw};
    p.cache = KvLayer{kcpu.data(), vcpu.data(), kvw, kvw, DType::kF32};
    p.num_heads = H;
    p.num_kv_heads = G;
    p.head_dim = D;
    p.scale = scale();
    p.kv_policy = {states.data(), 0};
    CHECK_OK(cpu.DecodeAttention(p, *d->plan));
    return out;
  }
  // The policy decode's arguments over the device copies (layer 0, output into dout).
  kernels::KvPolicyDecodeArgs Args(const KvPolicySeq* seqs, int max_seq_len, void* scratch) const {
    kernels::KvPolicyDecodeArgs a;
    a.q = static_cast<const __nv_bfloat16*>(dq.data());
    a.q_stride = qw;
    a.out = static_cast<__nv_bfloat16*>(dout.data());
    a.out_stride = qw;
    a.k_cache = static_cast<const __nv_bfloat16*>(dk.data());
    a.v_cache = static_cast<const __nv_bfloat16*>(dv.data());
    a.kv_stride = kvw;
    a.layout = Layout();
    a.block_tables = dt.as<int32_t>();
    a.max_blocks = max_blocks;
    a.block_size = block_size;
    a.seqs = seqs;
    a.layer = 0;
    a.num_seqs = S;
    a.num_heads = H;
    a.num_kv_heads = G;
    a.head_dim = D;
    a.max_seq_len = max_seq_len;
    a.scale = scale();
    a.scratch = scratch;
    return a;
  }
  float scale() const { return 1.0f / std::sqrt(static_cast<float>(D)); }

  int S, H, G, D, block_size, max_len = 0, max_blocks = 0;
  int64_t kvw, qw;
  kernels::KvQuant quant;
  std::vector<int32_t> lens, tables;
  std::vector<float> kc, vc, q;
  DeviceBuffer dq, dk, dv, dt, dout, kptr, vptr;  // kptr / vptr: the one layer's K / V pointer
};

// Parameters: the shape, whether the decode runs the CUDA-core kernels (true) or, where they
// apply (sm_80+; MiKV: a bf16 cache), the tensor-core ones (kv_policy_decode_mma.cu), and the
// cache's kind (bf16, or `--kv-cache-dtype` fp8 / int8 / int4).
// (The worker runner tests, tests/worker/cuda_kv_policy_runner_test.cc, drive the entries' q_row,
// table_row and no_out through the backend: a prompt's rows, every-chunk mode.)
using DecodeParam = std::tuple<Shape, bool, kernels::KvQuant>;

// 16, or 24 for an odd number of KV heads: a block size that is no power of two (the quantized
// tensor-core kernel's division path) and scale rows of 2 bytes a head (a head's fp16 scale in
// the upper half of a 4-byte word for odd heads of odd rows).
int BlockSizeFor(const Shape& sh) { return sh.kv_heads % 2 == 1 ? 24 : 16; }
class CudaKvPolicyDecodeTest : public CpuCudaPair<::testing::TestWithParam<DecodeParam>> {
 protected:
  void SetUp() override {
    CpuCudaPair::SetUp();
    if (IsSkipped() || HasFatalFailure()) return;
    // The tensor-core kernels need sm_80+; below it LaunchKvPolicyDecode runs the CUDA-core ones,
    // which the cuda_cores cases already check.
    auto devices = ListCudaDevices();
    ASSERT_OK(devices);
    if (!std::get<1>(GetParam()) && devices->front().compute_major < 8) {
      GTEST_SKIP() << "the tensor-core policy decode needs sm_80+";
    }
  }
};

TEST_P(CudaKvPolicyDecodeTest, MatchesCpuPolicyAttentionAndItsImportance) {
  const Shape sh = std::get<0>(GetParam());
  const int H = sh.heads, G = sh.kv_heads, D = sh.hd, group = H / G;
  const int kBs = BlockSizeFor(sh);
  std::mt19937 rng(17 + D + H);
  const DecodeCase dc(*cuda_, rng, sh, {1, 37, 700, 3000, 257}, kBs, /*key_outliers=*/false, std::get<2>(GetParam()));
  const std::vector<int32_t>& lens = dc.lens;
  const std::vector<int32_t>& tables = dc.tables;
  const std::vector<float>& kc = dc.kc;
  const std::vector<float>& q = dc.q;
  const int S = dc.S, max_len = dc.max_len, max_blocks = dc.max_blocks;
  const int64_t kvw = dc.kvw, qw = dc.qw;

  // CPU states: random last_hits, then CORM's choice (30 % budget) marks the dead keys; their
  // device mirror before the CPU's attention records anything.
  const std::unique_ptr<policy_test::RandomCormStates> rs =
      policy_test::MakeRandomCormStates(kvpolicy::LayerShape{D, D, false, 4 * D}, G, lens, rng);
  std::vector<kvpolicy::SequenceKvPolicy*> ptrs = rs->ptrs;
  const std::vector<std::vector<uint8_t>>& dstate = rs->dstate;
  const std::vector<std::vector<int32_t>>& dslot = rs->dslot;
  const std::vector<std::vector<int32_t>>& dlast = rs->dlast;
  const std::vector<KvPolicySeq>& seqs = rs->seqs;
  const int64_t dead = rs->dead;
  ASSERT_GT(dead, 1000) << "the states must skip keys for the test to mean something";
  DeviceStates dev = Upload(*cuda_, dstate, dslot, dlast, seqs, 1, G);

  // CPU reference: DecodeAttention under the policy; then the GPU's.
  const std::vector<float> want = dc.CpuDecode(*cpu_, ptrs);
  auto scratch = cuda_->Allocate(kernels::KvPolicyDecodeScratchBytes(S, H, G, D, max_len));
  ASSERT_OK(scratch);
  kernels::KvPolicyDecodeArgs a = dc.Args(dev.seqs.as<KvPolicySeq>(), max_len, scratch->data());
  a.cuda_cores = std::get<1>(GetParam());
  const DeviceBuffer& dout = dc.dout;
  const DeviceBuffer& dk = dc.dk;
  const DeviceBuffer& dv = dc.dv;
  ASSERT_EQ(kernels::LaunchKvPolicyDecode(a, Stream(*cuda_)), cudaSuccess);
  const std::vector<float> got = Get(*cuda_, dout, DType::kBF16);
  for (size_t i = 0; i < got.size(); ++i) {
    ASSERT_NEAR(got[i], want[i], 1e-2 * std::max(1.0f, std::fabs(want[i]))) << "element " << i;
  }

  // Importance: the GPU's last_hit against the CPU's, near ties (fp64) excused. (Over a quantized
  // cache the tensor-core kernels multiply fp16 Q by the codes, exact in fp16, and scale the
  // scores in fp32: the same band holds.)
  const double tie_band = 1e-3;
  const std::vector<int32_t> glast = GetAll<int32_t>(*cuda_, dev.last_hit);
  int64_t hits = 0, ties = 0;
  for (int s = 0; s < S; ++s) {
    const int cap = seqs[s].capacity, len = lens[s];
    for (int g = 0; g < G; ++g) {
      // fp64 probabilities of the kept keys for the group's query heads.
      std::vector<int> kept;
      for (int t = 0; t < len; ++t) {
        if (ptrs[s]->state(0, g, t) != SlotState::kDead) kept.push_back(t);
      }
      std::vector<double> pmax(len, 0.0);
      for (int h = g * group; h < (g + 1) * group; ++h) {
        std::vector<double> sc(kept.size());
        double m = -1e300, sum = 0;
        for (size_t j = 0; j < kept.size(); ++j) {
          const int slot = static_cast<int>(ptrs[s]->slot(0, g, kept[j]));
          const int64_t cs = int64_t{tables[s * max_blocks + slot / kBs]} * kBs + slot % kBs;
          double d = 0;
          for (int e = 0; e < D; ++e) d += double{q[s * qw + h * D + e]} * kc[cs * kvw + g * D + e];
          sc[j] = d * dc.scale();
          m = std::max(m, sc[j]);
        }
        for (double x : sc) sum += std::exp(x - m);
        for (size_t j = 0; j < kept.size(); ++j) pmax[kept[j]] = std::max(pmax[kept[j]], std::exp(sc[j] - m) / sum);
      }
      const double t = static_cast<double>(kept.size());
      for (int pos = 0; pos < len; ++pos) {
        const int32_t cpu_hit = ptrs[s]->last_hit(0, g)[pos], gpu_hit = glast[dev.offsets[s] + g * cap + pos];
        hits += cpu_hit == len - 1 && dlast[s][g * cap + pos] != len - 1;
        if (cpu_hit == gpu_hit) continue;
        const bool near_tie = std::fabs(pmax[pos] * t - 1.0) < tie_band;
        ties += near_tie;
        EXPECT_TRUE(near_tie) << "seq " << s << " head " << g << " pos " << pos << ": cpu " << cpu_hit << " gpu "
                              << gpu_hit << " p*t " << pmax[pos] * t;
      }
      // Positions past seq_len are never touched.
      for (int pos = len; pos < cap; ++pos) EXPECT_EQ(glast[dev.offsets[s] + g * cap + pos], -3);
    }
  }
  // (The data's property, not the device's: a single KV head has fewer keys to find; H200,
  // 2026-12-04: h4kv1d128 79-82.)
  EXPECT_GT(hits, G > 1 ? 100 : 50) << "the query must find keys important for the test to mean something";
  EXPECT_LE(ties, 4);

  // Without record_hits the arrays stay as they are: the hits undone first, so that recording
  // would show.
  std::vector<int32_t> before = glast;
  for (int s = 0; s < S; ++s) {
    const int cap = seqs[s].capacity;
    for (int g = 0; g < G; ++g) {
      for (int pos = 0; pos < lens[s]; ++pos) before[dev.offsets[s] + g * cap + pos] = dlast[s][g * cap + pos];
    }
  }
  ASSERT_OK(cuda_->CopyToDevice(dev.last_hit.data(), before.data(), before.size() * 4));
  a.record_hits = false;
  ASSERT_EQ(kernels::LaunchKvPolicyDecode(a, Stream(*cuda_)), cudaSuccess);
  EXPECT_EQ(GetAll<int32_t>(*cuda_, dev.last_hit), before);
  const std::vector<float> again = Get(*cuda_, dout, DType::kBF16);
  EXPECT_EQ(again, got) << "the output does not depend on recording";

  // Compaction on the device (LaunchKvPolicyCompact) from slot 16 of every sequence long enough:
  // per head the kFull keys at positions >= 16 move, in order, to a dense run (heads keep
  // different counts, so the shorter runs leave slots below the new slot count: pos -1 there),
  // slot / pos stay inverse maps, the rows arrive bit for bit, and the decode over the compacted
  // slots gives what it gave before (the same keys in the same order; other chunk edges, so
  // within the tolerance above).
  constexpr int kFrom = 16;
  const std::vector<uint8_t> kbefore = GetAll<uint8_t>(*cuda_, dk), vbefore = GetAll<uint8_t>(*cuda_, dv);
  std::vector<KvPolicySeq> after = dev.host_seqs;
  std::vector<int> new_slots(S, 0);
  for (int s = 0; s < S; ++s) {
    new_slots[s] = lens[s];
    if (lens[s] < 4 * kFrom) continue;
    int most = 0;
    for (int g = 0; g < G; ++g) {
      int n = 0;
      for (int pos = kFrom; pos < lens[s]; ++pos) n += dstate[s][g * seqs[s].capacity + pos] == 1;
      most = std::max(most, n);
    }
    new_slots[s] = kFrom + most;
    DeviceBuffer one = PutRaw(*cuda_, std::vector<KvPolicySeq>{dev.host_seqs[s]});
    const kernels::KvPolicyCompactArgs c = dc.CompactArgs(one.as<KvPolicySeq>(), s, kFrom, lens[s]);
    ASSERT_EQ(kernels::LaunchKvPolicyCompact(c, Stream(*cuda_)), cudaSuccess);
    ASSERT_OK(cuda_->Synchronize());
    after[s].slot_offset = lens[s] - new_slots[s];
  }
  const std::vector<int32_t> gslot = GetAll<int32_t>(*cuda_, dev.slot), gpos = GetAll<int32_t>(*cuda_, dev.pos);
  const std::vector<uint8_t> kafter = GetAll<uint8_t>(*cuda_, dk), vafter = GetAll<uint8_t>(*cuda_, dv);
  int64_t moved = 0, short_runs = 0;
  for (int s = 0; s < S; ++s) {
    if (new_slots[s] == lens[s]) continue;
    const int cap = seqs[s].capacity;
    auto cache_slot = [&](int slot) { return int64_t{tables[s * max_blocks + slot / kBs]} * kBs + slot % kBs; };
    for (int g = 0; g < G; ++g) {
      int next = kFrom;
      for (int pos = 0; pos < lens[s]; ++pos) {
        const size_t i = dev.offsets[s] + static_cast<size_t>(g) * cap + pos;
        if (dstate[s][g * cap + pos] != 1) continue;
        const int want_slot = pos < kFrom ? pos : next++;
        ASSERT_EQ(gslot[i], want_slot) << "seq " << s << " head " << g << " pos " << pos;
        ASSERT_EQ(gpos[dev.offsets[s] + static_cast<size_t>(g) * cap + want_slot], pos);
        moved += want_slot != pos;
        // The whole entry: a bf16 row, or codes and scales.
        ASSERT_EQ(dc.HeadEntry(kafter, cache_slot(want_slot), g), dc.HeadEntry(kbefore, cache_slot(pos), g));
        ASSERT_EQ(dc.HeadEntry(vafter, cache_slot(want_slot), g), dc.HeadEntry(vbefore, cache_slot(pos), g));
      }
      short_runs += next < new_slots[s];
      for (int slot = next; slot < lens[s]; ++slot) {
        EXPECT_EQ(gpos[dev.offsets[s] + static_cast<size_t>(g) * cap + slot], -1) << "seq " << s << " slot " << slot;
      }
    }
  }
  // 245-2,000 in the first four shapes (H200, 2026-12-03), 128 with one KV head (2026-12-04).
  EXPECT_GT(moved, G > 1 ? 200 : 100);
  if (G > 1) {
    EXPECT_GT(short_runs, 0) << "some head must keep fewer keys than the longest run";
  }
  DeviceBuffer dafter = PutRaw(*cuda_, after);
  a.seqs = dafter.as<KvPolicySeq>();
  ASSERT_EQ(kernels::LaunchKvPolicyDecode(a, Stream(*cuda_)), cudaSuccess);
  const std::vector<float> compacted = Get(*cuda_, dout, DType::kBF16);
  for (size_t i = 0; i < compacted.size(); ++i) {
    ASSERT_NEAR(compacted[i], got[i], 1e-2 * std::max(1.0f, std::fabs(got[i]))) << "element " << i;
  }
}

// MiKV on the device, the whole path of one layer against the CPU's: the queries' statistics
// (LaunchKvPolicyObserveQueries) and the choice (LaunchKvPolicyChoose, victims demoted, each head's
// key balance fixed at its first demotion from the cache's keys) give exactly the CPU's
// SequenceKvPolicy::ObserveQueries / Apply states and factors; the decode over demoted keys read
// quantized on the fly matches the CPU's DecodeAttention (tolerance as above); a compaction packs
// every head's low entries after its full run, byte for byte kvpolicy::EncodeLowEntry's, and the
// decode reading them from the run still matches. int4 and int2.
TEST_P(CudaKvPolicyDecodeTest, MikvDemotesReadsAndPacksAsTheCpu) {
  const Shape sh = std::get<0>(GetParam());
  const int H = sh.heads, G = sh.kv_heads, D = sh.hd, group = H / G;
  const int kBs = BlockSizeFor(sh);
  constexpr int kFrom = 16;
  for (int bits : {4, 2}) {
    // An int4 cache's regions (64 bytes at D 128) are smaller than an int4 entry (68): the runner
    // refuses that pairing (worker/model_runner.cc), so int4 caches take MiKV int2 only.
    if (bits == 4 && std::get<2>(GetParam()) == kernels::KvQuant::kInt4) continue;
    SCOPED_TRACE(bits == 4 ? "int4" : "int2");
    std::mt19937 rng(29 + D + H + bits);
    const DecodeCase dc(*cuda_, rng, sh, {37, 700, 3000, 257}, kBs, /*key_outliers=*/true, std::get<2>(GetParam()));
    const int64_t region = dc.RegionBytes();
    const std::vector<int32_t>& lens = dc.lens;
    const std::vector<float>& kc = dc.kc;
    const std::vector<float>& vc = dc.vc;
    const std::vector<float>& q = dc.q;
    const int S = dc.S, max_len = dc.max_len, max_blocks = dc.max_blocks;
    const int64_t kvw = dc.kvw, qw = dc.qw;
    auto cache_slot = [&](int s, int slot) { return dc.CacheSlot(s, slot); };

    KvPolicyConfig config;
    config.kind = KvPolicyKind::kMikv;
    config.low_bits = bits;
    config.window = 8;
    config.recent = 8;
    config.sinks = 4;
    config.budget_fraction = 0.3;
    const std::vector<kvpolicy::LayerShape> layers = {{D, D, true, 4 * D, region, region}};
    // Initial states (every key kFull, random last_hits), on both sides.
    std::vector<std::unique_ptr<kvpolicy::SequenceKvPolicy>> states;
    std::vector<kvpolicy::SequenceKvPolicy*> ptrs;
    std::vector<std::vector<uint8_t>> dstate(S);
    std::vector<std::vector<int32_t>> dslot(S), dlast(S);
    std::vector<KvPolicySeq> seqs(S);
    for (int s = 0; s < S; ++s) {
      states.push_back(std::make_unique<kvpolicy::SequenceKvPolicy>(&config, &layers, G, 0));
      auto& st = *states.back();
      st.Extend(lens[s]);
      const int cap = lens[s] + 3;
      dstate[s].assign(static_cast<size_t>(G) * cap, 0);
      dslot[s].assign(dstate[s].size(), -1);
      dlast[s].assign(dstate[s].size(), -1);
      for (int g = 0; g < G; ++g) {
        int32_t* lh = st.last_hit(0, g);
        for (int p = 0; p < lens[s]; ++p) {
          lh[p] = std::uniform_int_distribution<int>(p, lens[s] - 1)(rng);
          dstate[s][g * cap + p] = 1;
          dslot[s][g * cap + p] = p;
          dlast[s][g * cap + p] = lh[p];
        }
      }
      KvPolicySeq& e = seqs[s];
      e.capacity = cap;
      e.seq_len = lens[s];
      e.budget = static_cast<int32_t>(config.BudgetFor(lens[s]));
      e.choose = 1;
      e.count_from = kFrom;
      e.q_row = s;
      e.q_len = 1;
      // CPU: the query seen, then the choice with the keys as attention reads them (all kept).
      std::vector<float> krows(static_cast<size_t>(lens[s]) * D);
      std::vector<int32_t> kept(lens[s]);
      for (int g = 0; g < G; ++g) {
        st.ObserveQueries(0, g, q.data() + s * qw + g * group * D, 1, qw, group, D);
        for (int p = 0; p < lens[s]; ++p) {
          kept[p] = p;
          std::copy_n(kc.data() + cache_slot(s, p) * kvw + g * D, D, krows.data() + static_cast<size_t>(p) * D);
        }
        st.Apply(0, g, kept, krows.data());
      }
      st.set_choose(false);  // the attention below only records importance
      ptrs.push_back(&st);
    }
    // Per sequence, MiKV's per-head arrays (policy_test::MikvHeadArrays): [3][G] int32, then [2][G][D]
    // fp32, zeroed.
    const policy_test::MikvHeadArrays mikv = policy_test::AttachMikvHeads(*cuda_, &seqs, G, D);
    const size_t head_bytes = mikv.seq_bytes;
    const DeviceBuffer& heads = mikv.buf;
    DeviceStates dev = Upload(*cuda_, dstate, dslot, dlast, seqs, 1, G);
    const DeviceBuffer& dk = dc.dk;
    const DeviceBuffer& dv = dc.dv;
    const DeviceBuffer& dt = dc.dt;
    ASSERT_EQ(kernels::LaunchKvPolicyObserveQueries(dev.seqs.as<KvPolicySeq>(), S, 0,
                                                    static_cast<const __nv_bfloat16*>(dc.dq.data()), qw, H, G, D,
                                                    Stream(*cuda_)),
              cudaSuccess);
    auto counts = cuda_->Allocate(4 * sizeof(int32_t) * S * G);
    ASSERT_OK(counts);
    kernels::KvPolicyChooseArgs c;
    c.seqs = dev.seqs.as<KvPolicySeq>();
    c.num_seqs = S;
    c.num_layers = 1;
    c.num_kv_heads = G;
    c.sinks = config.sinks;
    c.recent = config.recent;
    c.window = config.window;
    c.victim_state = kernels::kKvPolicyLow;
    int32_t* cnt = static_cast<int32_t*>(counts->data());
    c.full_counts = cnt;
    c.from_counts = cnt + S * G;
    c.low_counts = cnt + 2 * S * G;
    c.low_from_counts = cnt + 3 * S * G;
    c.balance_keys = true;
    c.k_layers = dc.kptr.as<const __nv_bfloat16* const>();
    c.kv_stride = kvw;
    c.layout = dc.Layout();
    c.block_tables = dt.as<int32_t>();
    c.max_blocks = max_blocks;
    c.block_size = kBs;
    c.head_dim = D;
    ASSERT_EQ(kernels::LaunchKvPolicyChoose(c, Stream(*cuda_)), cudaSuccess);
    const std::vector<uint8_t> gstate = GetAll<uint8_t>(*cuda_, dev.state);
    const std::vector<uint8_t> gheads = GetAll<uint8_t>(*cuda_, heads);
    std::vector<int32_t> gcounts(4 * S * G);
    ASSERT_OK(cuda_->CopyToHost(gcounts.data(), cnt, gcounts.size() * 4));
    ASSERT_OK(cuda_->Synchronize());
    int64_t low_keys = 0;
    std::vector<std::vector<int>> low_from(S, std::vector<int>(G, 0)), full_from(S, std::vector<int>(G, 0));
    for (int s = 0; s < S; ++s) {
      const int cap = seqs[s].capacity;
      for (int g = 0; g < G; ++g) {
        int full = 0, low = 0;
        for (int p = 0; p < lens[s]; ++p) {
          const SlotState want = ptrs[s]->state(0, g, p);
          ASSERT_EQ(gstate[dev.offsets[s] + g * cap + p], static_cast<uint8_t>(want)) << "seq " << s << " head " << g
                                                                                         << " pos " << p;
          full += want == SlotState::kFull;
          low += want == SlotState::kLow;
          if (p >= kFrom) (want == SlotState::kFull ? full_from : low_from)[s][g] += want != SlotState::kDead;
        }
        low_keys += low;
        EXPECT_EQ(gcounts[s * G + g], full);
        EXPECT_EQ(gcounts[S * G + s * G + g], full_from[s][g]);
        EXPECT_EQ(gcounts[2 * S * G + s * G + g], low);
        EXPECT_EQ(gcounts[3 * S * G + s * G + g], low_from[s][g]);
        // The balance: fixed at this first demotion, the CPU's factors bit for bit.
        const char* h = reinterpret_cast<const char*>(gheads.data()) + head_bytes * s;
        const int32_t set = reinterpret_cast<const int32_t*>(h)[2 * G + g];
        const float* bal = reinterpret_cast<const float*>(h + 3 * 4 * G) + g * D;
        const float* want_bal = ptrs[s]->balance(0, g);
        ASSERT_EQ(set, low > 0 ? kernels::kKvBalanceFixed : kernels::kKvBalanceUnset);
        if (low > 0) {
          ASSERT_NE(want_bal, nullptr);
          for (int ch = 0; ch < D; ++ch) ASSERT_EQ(bal[ch], want_bal[ch]) << "seq " << s << " head " << g << " ch " << ch;
        }
      }
    }
    ASSERT_GT(low_keys, 1000) << "the states must demote keys for the test to mean something";

    // The decode over full and demoted keys against the CPU's.
    std::vector<float> want = dc.CpuDecode(*cpu_, ptrs);
    auto scratch = cuda_->Allocate(kernels::KvPolicyDecodeScratchBytes(S, H, G, D, 2 * max_len));
    ASSERT_OK(scratch);
    kernels::KvPolicyDecodeArgs a = dc.Args(dev.seqs.as<KvPolicySeq>(), max_len, scratch->data());
    a.cuda_cores = std::get<1>(GetParam());
    a.low_bits = bits;
    const DeviceBuffer& dout = dc.dout;
    ASSERT_EQ(kernels::LaunchKvPolicyDecode(a, Stream(*cuda_)), cudaSuccess);
    const std::vector<float> got = Get(*cuda_, dout, DType::kBF16);
    for (size_t i = 0; i < got.size(); ++i) {
      ASSERT_NEAR(got[i], want[i], 1e-2 * std::max(1.0f, std::fabs(want[i]))) << "element " << i;
    }
    // Importance with t counting full and low keys: the full keys' last_hit as the CPU's (a few
    // near ties aside; t over the full keys alone would raise the threshold ~3x and part hundreds).
    {
      const std::vector<int32_t> glast = GetAll<int32_t>(*cuda_, dev.last_hit);
      int64_t hits = 0, differ = 0;
      for (int s = 0; s < S; ++s) {
        const int cap = seqs[s].capacity;
        for (int g = 0; g < G; ++g) {
          for (int pos = 0; pos < lens[s]; ++pos) {
            if (ptrs[s]->state(0, g, pos) != SlotState::kFull) continue;  // low keys: never read again
            const int32_t cpu_hit = ptrs[s]->last_hit(0, g)[pos];
            hits += cpu_hit == lens[s] - 1 && dlast[s][g * cap + pos] != lens[s] - 1;
            differ += cpu_hit != glast[dev.offsets[s] + g * cap + pos];
          }
        }
      }
      // Enough hits for the comparison to mean something: the data's property, not the
      // device's (H200, 2026-12-03: 26 at h6kv2d128 int2, both kernels, every hit as the CPU's).
      EXPECT_GT(hits, 20);
      EXPECT_LE(differ, std::max<int64_t>(4, hits / 100)) << hits << " hits";
    }
    // Reading the low keys matters: the same decode with them skipped (CORM's kernels) differs.
    a.low_bits = 0;
    ASSERT_EQ(kernels::LaunchKvPolicyDecode(a, Stream(*cuda_)), cudaSuccess);
    const std::vector<float> skipped = Get(*cuda_, dout, DType::kBF16);
    double apart = 0;
    for (size_t i = 0; i < got.size(); ++i) apart = std::max(apart, double{std::fabs(skipped[i] - want[i])});
    EXPECT_GT(apart, 0.05);
    a.low_bits = bits;

    // Two compactions from kFrom, a second choice (15 %) between them: per head the full keys,
    // then one packed run of its low entries, the old run's first, then those demoted since in
    // position order, each byte for byte the CPU's encoding; the decode reading them matches the
    // CPU's over the same states.
    const int64_t entry = kvpolicy::LowEntryBytes(D, bits);
    auto stage = cuda_->Allocate(static_cast<size_t>(G) * max_len * 2 * entry);
    ASSERT_OK(stage);
    std::vector<KvPolicySeq> after = dev.host_seqs;
    std::vector<int> held(lens.begin(), lens.end());  // the slots each sequence holds
    // Per (sequence, head): the positions of its packed entries, in run order.
    std::vector<std::vector<std::vector<int>>> run(S, std::vector<std::vector<int>>(G));
    for (int round = 0; round < 2; ++round) {
      SCOPED_TRACE(round == 0 ? "first compaction" : "second compaction");
      if (round == 1) {
        // Fresh last_hits on both sides, then the choice at 15 % (balance already fixed).
        config.budget_fraction = 0.15;
        std::vector<int32_t> glh = GetAll<int32_t>(*cuda_, dev.last_hit);
        for (int s = 0; s < S; ++s) {
          const int cap = seqs[s].capacity;
          for (int g = 0; g < G; ++g) {
            int32_t* lh = ptrs[s]->last_hit(0, g);
            for (int pos = 0; pos < lens[s]; ++pos) {
              lh[pos] = std::uniform_int_distribution<int>(pos, lens[s] - 1)(rng);
              glh[dev.offsets[s] + g * cap + pos] = lh[pos];
            }
            // The keys as read (a head demoting for the first time fixes its balance from them).
            std::vector<float> krows(static_cast<size_t>(lens[s]) * D);
            std::vector<int32_t> kept(lens[s]);
            for (int pos = 0; pos < lens[s]; ++pos) {
              kept[pos] = pos;
              std::copy_n(kc.data() + cache_slot(s, pos) * kvw + g * D, D, krows.data() + static_cast<size_t>(pos) * D);
            }
            ptrs[s]->set_choose(true);
            ptrs[s]->Apply(0, g, kept, krows.data());
            ptrs[s]->set_choose(false);
          }
          after[s].budget = static_cast<int32_t>(config.BudgetFor(lens[s]));
          after[s].choose = 1;
        }
        ASSERT_OK(cuda_->CopyToDevice(dev.last_hit.data(), glh.data(), glh.size() * 4));
        DeviceBuffer dchoose = PutRaw(*cuda_, after);
        c.seqs = dchoose.as<KvPolicySeq>();
        ASSERT_EQ(kernels::LaunchKvPolicyChoose(c, Stream(*cuda_)), cudaSuccess);
        const std::vector<uint8_t> gs = GetAll<uint8_t>(*cuda_, dev.state);
        int64_t newly = 0;
        for (int s = 0; s < S; ++s) {
          const int cap = seqs[s].capacity;
          for (int g = 0; g < G; ++g) {
            for (int pos = 0; pos < lens[s]; ++pos) {
              const SlotState want_st = ptrs[s]->state(0, g, pos);
              const uint8_t got_st = gs[dev.offsets[s] + g * cap + pos];
              // Packed keys are kKvPolicyLowPacked on the device, kLow on the CPU.
              const bool same = got_st == static_cast<uint8_t>(want_st) ||
                                (want_st == SlotState::kLow && got_st == kernels::kKvPolicyLowPacked);
              ASSERT_TRUE(same) << "seq " << s << " head " << g << " pos " << pos << ": cpu "
                                << static_cast<int>(want_st) << " gpu " << static_cast<int>(got_st);
              newly += got_st == kernels::kKvPolicyLow && pos >= kFrom;
            }
          }
        }
        // (One KV head: 75, H200 2026-12-04.)
        ASSERT_GT(newly, G > 1 ? 100 : 50) << "the second choice must demote keys for the test to mean something";
      }
      for (int s = 0; s < S; ++s) {
        int most = 0, most_low = 0;
        for (int g = 0; g < G; ++g) {
          int full = 0, low = 0;
          for (int pos = kFrom; pos < lens[s]; ++pos) {
            full += ptrs[s]->state(0, g, pos) == SlotState::kFull;
            low += ptrs[s]->state(0, g, pos) == SlotState::kLow;
          }
          most = std::max<int>(most, full + kvpolicy::LowRunSlots(low, entry, region));
          most_low = std::max(most_low, low);
          // The run's order: the old run's entries, then the keys demoted since by position.
          std::vector<int>& r = run[s][g];
          const std::vector<int> old = r;
          for (int pos = kFrom; pos < lens[s]; ++pos) {
            if (ptrs[s]->state(0, g, pos) == SlotState::kLow && std::find(old.begin(), old.end(), pos) == old.end()) {
              r.push_back(pos);
            }
          }
        }
        const int new_slots = kFrom + most;
        ASSERT_LE(new_slots, held[s]);
        DeviceBuffer one = PutRaw(*cuda_, std::vector<KvPolicySeq>{dev.host_seqs[s]});
        kernels::KvPolicyCompactArgs cc = dc.CompactArgs(one.as<KvPolicySeq>(), s, kFrom, held[s]);
        cc.low_bits = bits;
        cc.stage = static_cast<uint8_t*>(stage->data());
        cc.stage_head_bytes = std::max(most_low, 1) * 2 * entry;
        ASSERT_EQ(kernels::LaunchKvPolicyCompact(cc, Stream(*cuda_)), cudaSuccess);
        ASSERT_OK(cuda_->Synchronize());
        held[s] = new_slots;
        after[s].slot_offset = lens[s] - new_slots;
        after[s].packed_max = most_low;
        after[s].choose = 0;
      }
      const std::vector<uint8_t> kbytes = GetAll<uint8_t>(*cuda_, dk), vbytes = GetAll<uint8_t>(*cuda_, dv);
      const std::vector<uint8_t> gh = GetAll<uint8_t>(*cuda_, heads);
      int64_t packed = 0;
      for (int s = 0; s < S; ++s) {
        for (int g = 0; g < G; ++g) {
          int full_from = 0;
          for (int pos = kFrom; pos < lens[s]; ++pos) full_from += ptrs[s]->state(0, g, pos) == SlotState::kFull;
          const int32_t* ints = reinterpret_cast<const int32_t*>(gh.data() + head_bytes * s);
          ASSERT_EQ(ints[g], kFrom + full_from) << "seq " << s << " head " << g << ": low_base";
          ASSERT_EQ(ints[G + g], static_cast<int32_t>(run[s][g].size())) << "seq " << s << " head " << g << ": num_packed";
          std::vector<float> row(D), scratch_row(D);
          std::vector<uint8_t> want_k(entry), want_v(entry), got_k(entry), got_v(entry);
          for (size_t e = 0; e < run[s][g].size(); ++e) {
            const int pos = run[s][g][e];
            for (int ch = 0; ch < D; ++ch) row[ch] = kc[cache_slot(s, pos) * kvw + g * D + ch];
            kvpolicy::EncodeLowEntry(row.data(), D, bits, ptrs[s]->balance(0, g), scratch_row.data(), want_k.data());
            for (int ch = 0; ch < D; ++ch) row[ch] = vc[cache_slot(s, pos) * kvw + g * D + ch];
            kvpolicy::EncodeLowEntry(row.data(), D, bits, nullptr, scratch_row.data(), want_v.data());
            kvpolicy::ForEachLowPiece(static_cast<int64_t>(e), entry, region, [&](int64_t i, int64_t off, int64_t n, int64_t at) {
              const int64_t b = dc.RegionOffset(cache_slot(s, ints[g] + static_cast<int>(i)), g) + off;
              std::copy_n(kbytes.data() + b, n, got_k.data() + at);
              std::copy_n(vbytes.data() + b, n, got_v.data() + at);
            });
            ASSERT_EQ(got_k, want_k) << "seq " << s << " head " << g << " entry " << e << " (position " << pos << ")";
            ASSERT_EQ(got_v, want_v) << "seq " << s << " head " << g << " entry " << e;
            ++packed;
          }
        }
      }
      EXPECT_GT(packed, 1000);
      // The CPU's decode over the current states (demoted keys read on the fly), the GPU's over
      // the compacted slots and runs.
      want = dc.CpuDecode(*cpu_, ptrs);
      DeviceBuffer dafter = PutRaw(*cuda_, after);
      a.seqs = dafter.as<KvPolicySeq>();
      a.max_seq_len = 2 * max_len;
      ASSERT_EQ(kernels::LaunchKvPolicyDecode(a, Stream(*cuda_)), cudaSuccess);
      const std::vector<float> compacted = Get(*cuda_, dout, DType::kBF16);
      for (size_t i = 0; i < compacted.size(); ++i) {
        ASSERT_NEAR(compacted[i], want[i], 1e-2 * std::max(1.0f, std::fabs(want[i]))) << "element " << i;
      }
    }
  }
}

std::string DecodeParamName(const ::testing::TestParamInfo<DecodeParam>& i) {
  const Shape& sh = std::get<0>(i.param);
  const kernels::KvQuant q = std::get<2>(i.param);
  return "h" + std::to_string(sh.heads) + "kv" + std::to_string(sh.kv_heads) + "d" + std::to_string(sh.hd) +
         (std::get<1>(i.param) ? "_cuda_cores" : "_tensor_cores") +
         (q == kernels::KvQuant::kNone       ? ""
          : q == kernels::KvQuant::kFp8E4m3 ? "_fp8"
          : q == kernels::KvQuant::kInt8    ? "_int8"
                                             : "_int4");
}

INSTANTIATE_TEST_SUITE_P(Shapes, CudaKvPolicyDecodeTest,
                         ::testing::Combine(::testing::Values(Shape{32, 8, 128}, Shape{8, 2, 64}, Shape{16, 2, 128},
                                                              Shape{4, 4, 64}, Shape{6, 2, 128}),
                                            ::testing::Bool(), ::testing::Values(kernels::KvQuant::kNone)),
                         DecodeParamName);
// Quantized caches, two shapes: both kernels for CORM (the tensor-core ones dequantize each tile as
// it lands); MiKV over a quantized cache runs the CUDA-core ones either way.
INSTANTIATE_TEST_SUITE_P(QuantizedCaches, CudaKvPolicyDecodeTest,
                         ::testing::Combine(::testing::Values(Shape{32, 8, 128}, Shape{8, 2, 64}, Shape{4, 1, 128},
                                                              Shape{6, 3, 64}),
                                            ::testing::Bool(),
                                            ::testing::Values(kernels::KvQuant::kFp8E4m3, kernels::KvQuant::kInt8,
                                                              kernels::KvQuant::kInt4)),
                         DecodeParamName);

class CudaKvPolicyChooseTest : public CpuCudaPair<> {};

// Random states and last_hits (ties included) over lengths 1 .. 70,000 (more radix digits than
// 2^16 positions), pinned prefixes, and three configurations: budget-free, a count budget and a
// fraction; one sequence with choose = 0 only counts.
TEST_F(CudaKvPolicyChooseTest, SameVictimsAsSelectVictims) {
  std::mt19937 rng(3);
  const int L = 2, G = 3;
  const std::vector<int> lens = {1, 9, 40, 300, 1000, 4097, 70000, 513};
  const std::vector<int> pinned = {0, 0, 16, 0, 100, 0, 5000, 0};
  for (int cfg = 0; cfg < 3; ++cfg) {
    KvPolicyConfig c;
    c.kind = KvPolicyKind::kCorm;
    c.window = cfg == 1 ? 32 : 8;
    c.recent = cfg == 2 ? 16 : 4;
    c.sinks = cfg == 0 ? 4 : 1;
    if (cfg == 1) c.budget_tokens = 200;
    if (cfg == 2) c.budget_fraction = 0.3;
    const int S = static_cast<int>(lens.size());
    std::vector<std::vector<uint8_t>> st(S), want_st(S);
    std::vector<std::vector<int32_t>> sl(S), lh(S);
    std::vector<KvPolicySeq> seqs(S);
    std::vector<int32_t> want_full;
    for (int s = 0; s < S; ++s) {
      const int len = lens[s], cap = len + 3;
      st[s].assign(static_cast<size_t>(L) * G * cap, 0);
      sl[s].assign(st[s].size(), 0);
      lh[s].assign(st[s].size(), 0);
      for (int lg = 0; lg < L * G; ++lg) {
        for (int p = 0; p < len; ++p) {
          st[s][lg * cap + p] = std::uniform_int_distribution<int>(0, 9)(rng) < 2 ? 0 : 1;
          // Coarse last_hits: many ties, which the budget breaks by position.
          lh[s][lg * cap + p] = std::min(len - 1, p + 8 * std::uniform_int_distribution<int>(0, std::max(0, (len - p) / 8))(rng));
        }
      }
      seqs[s].capacity = cap;
      seqs[s].seq_len = len;
      seqs[s].pinned = pinned[s];
      seqs[s].budget = c.has_budget() ? static_cast<int32_t>(c.BudgetFor(len)) : -1;
      seqs[s].choose = s != 3;
      want_st[s] = st[s];
      for (int lg = 0; lg < L * G; ++lg) {
        std::vector<int32_t> victims;
        if (seqs[s].choose) {
          kvpolicy::SelectVictims(c, len, pinned[s], st[s].data() + lg * cap, lh[s].data() + lg * cap, &victims);
        }
        for (int32_t v : victims) want_st[s][lg * cap + v] = 0;
        want_full.push_back(static_cast<int32_t>(
            std::count(want_st[s].begin() + lg * cap, want_st[s].begin() + lg * cap + len, uint8_t{1})));
      }
    }
    DeviceStates dev = Upload(*cuda_, st, sl, lh, seqs, L, G);
    auto counts = cuda_->Allocate(want_full.size() * 4);
    ASSERT_OK(counts);
    kernels::KvPolicyChooseArgs a;
    a.seqs = dev.seqs.as<KvPolicySeq>();
    a.num_seqs = S;
    a.num_layers = L;
    a.num_kv_heads = G;
    a.sinks = c.sinks;
    a.recent = c.recent;
    a.window = c.window;
    a.full_counts = static_cast<int32_t*>(counts->data());
    ASSERT_EQ(kernels::LaunchKvPolicyChoose(a, Stream(*cuda_)), cudaSuccess);
    const std::vector<uint8_t> got = GetAll<uint8_t>(*cuda_, dev.state);
    int64_t changed = 0;
    for (int s = 0; s < S; ++s) {
      for (size_t i = 0; i < want_st[s].size(); ++i) {
        ASSERT_EQ(got[dev.offsets[s] + i], want_st[s][i]) << "config " << cfg << " seq " << s << " index " << i;
        changed += want_st[s][i] != st[s][i];
      }
    }
    EXPECT_GT(changed, 100) << "config " << cfg;
    std::vector<int32_t> got_full(want_full.size());
    ASSERT_OK(cuda_->CopyToHost(got_full.data(), counts->data(), got_full.size() * 4));
    ASSERT_OK(cuda_->Synchronize());
    EXPECT_EQ(got_full, want_full) << "config " << cfg;
  }
}

TEST_F(CudaKvPolicyChooseTest, ExtendMatchesSequenceKvPolicy) {
  const int L = 3, G = 2;
  const std::vector<int> from = {0, 40, 7}, lens = {33, 41, 300}, offsets = {0, 16, 5};
  std::vector<std::vector<uint8_t>> st(3);
  std::vector<std::vector<int32_t>> sl(3), lh(3);
  std::vector<KvPolicySeq> seqs(3);
  for (int s = 0; s < 3; ++s) {
    const int cap = lens[s] + 2;
    st[s].assign(static_cast<size_t>(L) * G * cap, 0);
    sl[s].assign(st[s].size(), -1);
    lh[s].assign(st[s].size(), -1);
    seqs[s] = KvPolicySeq{nullptr, nullptr, nullptr, cap, lens[s], 0, -1, offsets[s], from[s], 0};
  }
  DeviceStates dev = Upload(*cuda_, st, sl, lh, seqs, L, G);
  ASSERT_EQ(kernels::LaunchKvPolicyExtend(dev.seqs.as<KvPolicySeq>(), 3, L, G, Stream(*cuda_)), cudaSuccess);
  const std::vector<uint8_t> gs = GetAll<uint8_t>(*cuda_, dev.state);
  const std::vector<int32_t> gsl = GetAll<int32_t>(*cuda_, dev.slot), glh = GetAll<int32_t>(*cuda_, dev.last_hit),
                             gps = GetAll<int32_t>(*cuda_, dev.pos);
  for (int s = 0; s < 3; ++s) {
    const int cap = lens[s] + 2;
    for (int lg = 0; lg < L * G; ++lg) {
      for (int p = 0; p < cap; ++p) {
        const size_t i = dev.offsets[s] + lg * cap + p;
        const bool fresh = p >= from[s] && p < lens[s];
        EXPECT_EQ(gs[i], fresh ? 1 : 0);
        EXPECT_EQ(glh[i], fresh ? p : -1);
        EXPECT_EQ(gsl[i], fresh ? p - offsets[s] : -1);
        if (fresh) {
          EXPECT_EQ(gps[dev.offsets[s] + lg * cap + p - offsets[s]], p);  // slot -> position
        }
      }
    }
  }
}

TEST_F(CudaKvPolicyChooseTest, RejectsWhatItDoesNotImplement) {
  kernels::KvPolicyDecodeArgs a;
  a.num_seqs = 1;
  a.max_seq_len = 4;
  a.num_heads = 32;
  a.num_kv_heads = 8;
  a.head_dim = 96;
  int dummy = 0;
  a.scratch = &dummy;
  a.seqs = reinterpret_cast<const KvPolicySeq*>(&dummy);
  EXPECT_EQ(kernels::LaunchKvPolicyDecode(a, Stream(*cuda_)), cudaErrorInvalidValue);  // head_dim
  a.head_dim = 128;
  a.num_kv_heads = 2;
  EXPECT_EQ(kernels::LaunchKvPolicyDecode(a, Stream(*cuda_)), cudaErrorInvalidValue);  // group 16
  a.num_kv_heads = 8;
  a.scratch = nullptr;
  EXPECT_EQ(kernels::LaunchKvPolicyDecode(a, Stream(*cuda_)), cudaErrorInvalidValue);
  kernels::KvPolicyChooseArgs c;
  c.seqs = a.seqs;
  c.num_seqs = 1;
  c.num_layers = 1;
  c.num_kv_heads = 1;
  c.window = 0;
  EXPECT_EQ(kernels::LaunchKvPolicyChoose(c, Stream(*cuda_)), cudaErrorInvalidValue);
}

}  // namespace
}  // namespace lorc
