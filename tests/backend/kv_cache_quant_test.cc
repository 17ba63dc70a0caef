// The CPU backend's low-precision KV caches (--kv-cache-dtype bf16 / fp8 / int8 / int4; layout in
// kvstore/kv_spec.h, math in kernels/kv_quant.h): WriteKv quantizes on write, Attention and
// LatentAttention dequantize inside, CopyBlocks moves codes and scales together. Each attention
// over a quantized cache must equal (bit for bit) the same attention over an F32 cache that holds
// the dequantized values, and stay within a stated tolerance of the F32 cache of the raw values.
#include <cstdio>
#include <cstring>
#include <tuple>

#include "kernels/kv_quant.h"
#include "tests/backend/backend_ops_fixture.h"

namespace lorc {
namespace backend_test {
namespace {

using kernels::KvQuant;
using ::lorc::testing::StatusIs;
using ::testing::HasSubstr;

struct Format {
  const char* name;
  DType dtype;  // element dtype when quant is kNone
  KvQuant quant;
  double attention_tol;  // max |out - out_f32| for values in [-1, 1]
};

const Format kFormats[] = {
    {"bf16", DType::kBF16, KvQuant::kNone, 1e-2},
    {"fp8", DType::kU8, KvQuant::kFp8E4m3, 6e-2},
    {"int8", DType::kU8, KvQuant::kInt8, 1e-2},
    {"int4", DType::kU8, KvQuant::kInt4, 1.5e-1},
};

// Host copy of what a stored row reads back as (the reference the backend must match).
std::vector<float> Dequantized(const Format& f, const std::vector<float>& row, int64_t heads) {
  const int64_t w = static_cast<int64_t>(row.size()), hw = w / heads;
  std::vector<float> out(row.size());
  if (f.quant == KvQuant::kNone) {
    for (int64_t i = 0; i < w; ++i) out[i] = Bf16ToF32(F32ToBf16(row[i]));
    return out;
  }
  std::vector<uint8_t> codes(kernels::KvqCodeRowBytes(f.quant, heads, hw));
  std::vector<uint16_t> scales(kernels::KvqScaleRowBytes(f.quant, heads, hw) / 2);
  kernels::KvqQuantizeToken(f.quant, row.data(), heads, hw, codes.data(), scales.data());
  for (int64_t h = 0; h < heads; ++h) {
    kernels::KvqDequantizeHead(f.quant, codes.data(), scales.data(), hw, h, &out[h * hw]);
  }
  return out;
}

class KvCacheQuantTest : public BackendOpsTest {
 protected:
  // One layer's cache of `num_blocks` blocks in format f (nullptr: F32), poisoned.
  struct Cache {
    DeviceBuffer k, v;
    KvLayer layer;
  };
  Cache MakeCache(const Format* f, int32_t bs, int32_t num_blocks, int64_t kw, int64_t vw, int32_t heads) {
    Cache c;
    c.layer.k_width = kw;
    c.layer.v_width = vw;
    c.layer.dtype = f ? f->dtype : DType::kF32;
    c.layer.quant = f ? f->quant : KvQuant::kNone;
    c.layer.num_kv_heads = heads;
    c.layer.block_size = bs;
    auto bytes = [&](int64_t w) -> size_t {
      if (c.layer.quant != KvQuant::kNone) {
        return static_cast<size_t>(num_blocks) * kernels::KvqBlockBytes(c.layer.quant, bs, heads, w / heads);
      }
      return static_cast<size_t>(num_blocks) * bs * w * DTypeSize(c.layer.dtype);
    };
    c.k = Upload(std::vector<uint8_t>(bytes(kw), 0xff));  // NaN-ish everywhere unwritten
    c.v = Upload(std::vector<uint8_t>(bytes(vw), 0xff));
    c.layer.k = c.k.data();
    c.layer.v = c.v.data();
    return c;
  }
  void Write(const KvLayer& cache, const std::vector<float>& k, const std::vector<float>& v,
             const std::vector<int32_t>& slots) {
    const int64_t T = static_cast<int64_t>(slots.size());
    DeviceBuffer dk = Upload(k), dv = Upload(v), ds = Upload(slots);
    ASSERT_OK(be_->WriteKv(cache, View(dk, T, cache.k_width), View(dv, T, cache.v_width), ds.as<int32_t>()));
  }
};

// Three sequences (cached + new): (0, 7) prefill, (13, 1) decode, (5, 9) chunk; GQA 4 over 2 KV
// heads of 64 (int4: two groups per head); shuffled blocks of 4.
struct Batch {
  int32_t bs = 4, num_blocks = 16, max_blocks = 6;
  std::vector<int32_t> qstart = {0}, seq_lens, tables, slots;  // slots: every context token
  int T = 0;
  Batch() {
    const std::vector<std::pair<int, int>> seqs = {{0, 7}, {13, 1}, {5, 9}};
    const std::vector<int32_t> ids = {11, 3, 7, 0, 14, 5, 9, 2, 12, 6, 1, 15, 4, 8, 10, 13};
    size_t next = 0;
    tables.assign(seqs.size() * max_blocks, 13);
    for (size_t s = 0; s < seqs.size(); ++s) {
      const int len = seqs[s].first + seqs[s].second;
      for (int b = 0; b < (len + bs - 1) / bs; ++b) tables[s * max_blocks + b] = ids[next++];
      for (int p = 0; p < len; ++p) slots.push_back(tables[s * max_blocks + p / bs] * bs + p % bs);
      qstart.push_back(qstart.back() + seqs[s].second);
      seq_lens.push_back(len);
    }
    T = qstart.back();
  }
};

TEST_P(KvCacheQuantTest, AttentionDequantizesInside) {
  const int heads = 4, kv_heads = 2, hd = 64;
  const int64_t kw = kv_heads * hd, qw = heads * hd;
  const Batch b;
  const int64_t n = static_cast<int64_t>(b.slots.size());
  const std::vector<float> k = RandomVec(rng_, n * kw), v = RandomVec(rng_, n * kw);
  const std::vector<float> q = RandomVec(rng_, b.T * qw, -2.f, 2.f);
  DeviceBuffer dq = Upload(q), dqs = Upload(b.qstart), dlens = Upload(b.seq_lens), dtab = Upload(b.tables);
  const AttentionBatch batch{3, b.T, 14, b.max_blocks, b.bs, dqs.as<int32_t>(), dlens.as<int32_t>(),
                             dtab.as<int32_t>(), b.qstart.data(), b.seq_lens.data()};
  auto attend = [&](const KvLayer& cache) {
    DeviceBuffer dout = Upload(std::vector<float>(b.T * qw, 0.f));
    AttentionParams ap;
    ap.q = View(dq, b.T, qw);
    ap.out = View(dout, b.T, qw);
    ap.cache = cache;
    ap.num_heads = heads;
    ap.num_kv_heads = kv_heads;
    ap.head_dim = hd;
    ap.scale = 1.0f / std::sqrt(static_cast<float>(hd));
    EXPECT_OK(RunAttention(ap, batch, b.max_blocks));
    return Download<float>(dout, b.T * qw);
  };
  Cache f32 = MakeCache(nullptr, b.bs, b.num_blocks, kw, kw, kv_heads);
  Write(f32.layer, k, v, b.slots);
  const std::vector<float> want = attend(f32.layer);
  for (const Format& f : kFormats) {
    SCOPED_TRACE(f.name);
    Cache c = MakeCache(&f, b.bs, b.num_blocks, kw, kw, kv_heads);
    Write(c.layer, k, v, b.slots);
    const std::vector<float> got = attend(c.layer);
    // The same attention over an F32 cache of the dequantized rows: identical bits.
    std::vector<float> kd, vd;
    for (int64_t t = 0; t < n; ++t) {
      const std::vector<float> kr(k.begin() + t * kw, k.begin() + (t + 1) * kw);
      const std::vector<float> vr(v.begin() + t * kw, v.begin() + (t + 1) * kw);
      for (float x : Dequantized(f, kr, kv_heads)) kd.push_back(x);
      for (float x : Dequantized(f, vr, kv_heads)) vd.push_back(x);
    }
    Cache deq = MakeCache(nullptr, b.bs, b.num_blocks, kw, kw, kv_heads);
    Write(deq.layer, kd, vd, b.slots);
    EXPECT_EQ(got, attend(deq.layer));
    double worst = 0;
    for (size_t i = 0; i < got.size(); ++i) worst = std::max(worst, std::fabs(static_cast<double>(got[i]) - want[i]));
    EXPECT_LE(worst, f.attention_tol);
    EXPECT_GT(worst, 0.0) << "a lossy format changed nothing";
    std::printf("[ kv dtype ] %-5s attention max |err| vs F32 cache %.3g (tolerance %.3g)\n", f.name,
                worst, f.attention_tol);
  }
}

TEST_P(KvCacheQuantTest, LatentAttentionDequantizesInside) {
  // r_k 40 (int4: groups of 32 and 8), r_v 5 (odd: one short group, code rows padded).
  const int heads = 4, kv_heads = 2, hd = 48, rk = 40, rv = 5;
  const int64_t kw = kv_heads * rk, vw = kv_heads * rv, qw = heads * hd;
  const Batch b;
  const int64_t n = static_cast<int64_t>(b.slots.size());
  const std::vector<float> k = RandomVec(rng_, n * kw), v = RandomVec(rng_, n * vw);
  const std::vector<float> q = RandomVec(rng_, b.T * qw), k_up = RandomVec(rng_, kv_heads * hd * rk, -0.3f, 0.3f);
  const std::vector<float> inv_freq = InvFreq(hd, 10000.0);
  DeviceBuffer dq = Upload(q), dup = Upload(k_up), dinv = Upload(inv_freq), dqs = Upload(b.qstart),
               dlens = Upload(b.seq_lens), dtab = Upload(b.tables);
  const AttentionBatch batch{3, b.T, 14, b.max_blocks, b.bs, dqs.as<int32_t>(), dlens.as<int32_t>(),
                             dtab.as<int32_t>(), b.qstart.data(), b.seq_lens.data()};
  auto plan = be_->CreateAttentionPlan({3, b.T, b.max_blocks});
  ASSERT_OK(plan);
  ASSERT_OK(be_->PlanAttention(batch, **plan));
  auto attend = [&](const KvLayer& cache) {
    DeviceBuffer dout = Upload(std::vector<float>(b.T * heads * rv, 0.f));
    LatentAttentionParams p;
    p.q = View(dq, b.T, qw);
    p.k_up = View(dup, kv_heads * hd, rk);
    p.out = View(dout, b.T, heads * rv);
    p.cache = cache;
    p.num_heads = heads;
    p.num_kv_heads = kv_heads;
    p.head_dim = hd;
    p.k_rank = rk;
    p.v_rank = rv;
    p.scale = 1.0f / std::sqrt(static_cast<float>(hd));
    p.inv_freq = dinv.as<float>();
    EXPECT_OK(be_->LatentAttention(p, **plan));
    return Download<float>(dout, b.T * heads * rv);
  };
  Cache f32 = MakeCache(nullptr, b.bs, b.num_blocks, kw, vw, kv_heads);
  Write(f32.layer, k, v, b.slots);
  const std::vector<float> want = attend(f32.layer);
  for (const Format& f : kFormats) {
    SCOPED_TRACE(f.name);
    Cache c = MakeCache(&f, b.bs, b.num_blocks, kw, vw, kv_heads);
    Write(c.layer, k, v, b.slots);
    const std::vector<float> got = attend(c.layer);
    std::vector<float> kd, vd;
    for (int64_t t = 0; t < n; ++t) {
      for (float x : Dequantized(f, std::vector<float>(k.begin() + t * kw, k.begin() + (t + 1) * kw), kv_heads)) kd.push_back(x);
      for (float x : Dequantized(f, std::vector<float>(v.begin() + t * vw, v.begin() + (t + 1) * vw), kv_heads)) vd.push_back(x);
    }
    Cache deq = MakeCache(nullptr, b.bs, b.num_blocks, kw, vw, kv_heads);
    Write(deq.layer, kd, vd, b.slots);
    EXPECT_EQ(got, attend(deq.layer));
    double worst = 0;
    for (size_t i = 0; i < got.size(); ++i) worst = std::max(worst, std::fabs(static_cast<double>(got[i]) - want[i]));
    EXPECT_LE(worst, f.attention_tol);
    std::printf("[ kv dtype ] %-5s latent attention max |err| vs F32 cache %.3g\n", f.name, worst);
  }
}

TEST_P(KvCacheQuantTest, CopyBlocksCopiesCodesAndScales) {
  const int32_t bs = 4, num_blocks = 5, kv_heads = 2;
  const int64_t kw = kv_heads * 48, vw = kv_heads * 5;
  for (const Format& f : kFormats) {
    SCOPED_TRACE(f.name);
    Cache c = MakeCache(&f, bs, num_blocks, kw, vw, kv_heads);
    std::vector<int32_t> slots(num_blocks * bs);
    std::iota(slots.begin(), slots.end(), 0);
    Write(c.layer, RandomVec(rng_, slots.size() * kw, -3.f, 3.f), RandomVec(rng_, slots.size() * vw), slots);
    const size_t kbytes = c.k.bytes(), vbytes = c.v.bytes();
    const std::vector<uint8_t> k0 = Download<uint8_t>(c.k, kbytes), v0 = Download<uint8_t>(c.v, vbytes);
    ASSERT_OK(be_->CopyBlocks({c.layer}, bs, num_blocks, {BlockCopy{3, 1}}));
    const std::vector<uint8_t> k1 = Download<uint8_t>(c.k, kbytes), v1 = Download<uint8_t>(c.v, vbytes);
    for (const auto& [before, after, bytes] :
         {std::tuple{&k0, &k1, kbytes}, std::tuple{&v0, &v1, vbytes}}) {
      const size_t block = bytes / num_blocks;  // the block stride: codes and scales
      for (int32_t blk = 0; blk < num_blocks; ++blk) {
        const int32_t from = blk == 1 ? 3 : blk;
        ASSERT_EQ(0, std::memcmp(after->data() + blk * block, before->data() + from * block, block))
            << "block " << blk;
      }
      ASSERT_NE(0, std::memcmp(before->data() + block, before->data() + 3 * block, block));
    }
  }
}

TEST_P(KvCacheQuantTest, BadCachesAreRefused) {
  Cache c = MakeCache(&kFormats[2], 4, 2, 8, 8, 2);
  c.layer.num_kv_heads = 3;  // does not divide 8
  std::vector<float> row(8, 1.f);
  DeviceBuffer dr = Upload(row), ds = Upload(std::vector<int32_t>{0});
  EXPECT_THAT(be_->WriteKv(c.layer, View(dr, 1, 8), View(dr, 1, 8), ds.as<int32_t>()),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("quantized cache")));
  Cache h = MakeCache(nullptr, 4, 2, 8, 8, 2);
  h.layer.dtype = DType::kF16;
  EXPECT_THAT(be_->WriteKv(h.layer, View(dr, 1, 8), View(dr, 1, 8), ds.as<int32_t>()),
              StatusIs(absl::StatusCode::kUnimplemented, HasSubstr("F16")));
  EXPECT_TRUE(be_->SupportsQuantizedKvCache());
}

INSTANTIATE_TEST_SUITE_P(Cpu, KvCacheQuantTest, ::testing::Values(BackendKind::kCpu), KindName);

}  // namespace
}  // namespace backend_test
}  // namespace lorc
