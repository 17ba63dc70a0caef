// Op-by-op checks of a Backend (the Backend v2 ops are in backend_v2_ops_test.cc; both share
// backend_ops_fixture.h) against naive reference implementations written here (double
// accumulation, obviously correct loops). The CPU backend is the reference every CUDA kernel will
// be compared with, so these bodies are written against the Backend interface only and are
// parameterised by backend kind: all data goes through Allocate / CopyToDevice / CopyToHost, and
// every pointer handed to an op (ids, positions, slot mappings, block tables, ...) is device
// memory. The CUDA instantiation skips while CreateBackend({kCuda}) fails.
//
// Tolerance: an element passes when |got - want| <= kTol * max(1, scale) with kTol = 1e-4, where
// `scale` is |want| for elementwise ops and the magnitude of the summed terms (sum |x_k w_k|)
// for dot-product style ops (Matmul). Pure data movement (Embedding, GatherRows, WriteKv,
// CopyBlocks, RopeKvWrite's cache rows vs Rope's output) must be exact.
#include "tests/backend/backend_ops_fixture.h"

#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>

#include "absl/strings/str_cat.h"
#include "backend/cpu_device_memory.h"

namespace lorc {
namespace backend_test {
namespace {

// --- Matmul -------------------------------------------------------------------------------------

// out[t, n] = sum_k x[t, k] * w[n, k]; also the per-element magnitude sum_k |x w|.
void RefMatmul(const std::vector<float>& x, int64_t x_ld, int64_t x_c0, const std::vector<float>& w,
               int64_t w_ld, int64_t w_c0, int64_t T, int64_t K, int64_t N,
               std::vector<double>* out, std::vector<double>* mag) {
  out->assign(T * N, 0.0);
  mag->assign(T * N, 0.0);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t n = 0; n < N; ++n) {
      double acc = 0, m = 0;
      for (int64_t k = 0; k < K; ++k) {
        const double p = static_cast<double>(x[t * x_ld + x_c0 + k]) * w[n * w_ld + w_c0 + k];
        acc += p;
        m += std::abs(p);
      }
      (*out)[t * N + n] = acc;
      (*mag)[t * N + n] = m;
    }
  }
}

TEST_P(BackendOpsTest, MatmulContiguous) {
  for (int64_t T : {1, 7}) {
    SCOPED_TRACE(T);
    const int64_t K = 37, N = 23;
    const std::vector<float> x = RandomVec(rng_, T * K), w = RandomVec(rng_, N * K);
    DeviceBuffer dx = Upload(x), dw = Upload(w), dout = Upload(std::vector<float>(T * N, 0.f));
    ASSERT_OK(be_->Matmul(View(dx, T, K), View(dw, N, K), View(dout, T, N)));
    std::vector<double> want, mag;
    RefMatmul(x, K, 0, w, K, 0, T, K, N, &want, &mag);
    ExpectClose(Download<float>(dout, T * N), want, mag);
  }
}

TEST_P(BackendOpsTest, MatmulStridedViews) {
  // x: columns [5, 5 + K) of a [T, 50] buffer; w: rows [2, 2 + N), columns [3, 3 + K) of a
  // [31, 41] buffer; out: columns [4, 4 + N) of a [T, 30] buffer whose other columns must stay.
  const int64_t T = 9, K = 37, N = 23;
  const int64_t x_ld = 50, w_ld = 41, o_ld = 30;
  const std::vector<float> x = RandomVec(rng_, T * x_ld), w = RandomVec(rng_, 31 * w_ld);
  const float sentinel = 1234.5f;
  const std::vector<float> out0(T * o_ld, sentinel);
  DeviceBuffer dx = Upload(x), dw = Upload(w), dout = Upload(out0);
  const Tensor2D xv = View(dx, T, x_ld).ColSlice(5, K);
  const Tensor2D wv = View(dw, 31, w_ld).RowSlice(2, N).ColSlice(3, K);
  const Tensor2D ov = View(dout, T, o_ld).ColSlice(4, N);
  ASSERT_EQ(xv.stride(), x_ld);
  ASSERT_EQ(wv.stride(), w_ld);
  ASSERT_OK(be_->Matmul(xv, wv, ov));

  std::vector<float> w_shift(w.begin() + 2 * w_ld, w.end());
  std::vector<double> want, mag;
  RefMatmul(x, x_ld, 5, w_shift, w_ld, 3, T, K, N, &want, &mag);
  ExpectClose(ColumnsOfSliceRestUnchanged(Download<float>(dout, T * o_ld), out0, T, o_ld, 4, N), want, mag);
}

TEST_P(BackendOpsTest, MatmulRejectsShapeMismatch) {
  DeviceBuffer a = Upload(std::vector<float>(3 * 5, 1.f)), b = Upload(std::vector<float>(4 * 6, 1.f)),
               c = Upload(std::vector<float>(3 * 4, 0.f));
  EXPECT_FALSE(be_->Matmul(View(a, 3, 5), View(b, 4, 6), View(c, 3, 4)).ok());
  EXPECT_FALSE(be_->Matmul(View(a, 3, 5), View(b, 4, 5), View(c, 3, 3)).ok());
}

TEST_P(BackendOpsTest, RmsNorm) {
  const int64_t T = 5, H = 45;
  const float eps = 1e-5f;
  std::vector<float> x = RandomVec(rng_, T * H);
  // Rows of very different magnitude (the norm must be per row), one nearly zero (eps matters).
  const float row_scale[T] = {1.0f, 100.0f, 0.01f, 3.0f, 1e-4f};
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < H; ++j) x[t * H + j] *= row_scale[t];
  const std::vector<float> w = RandomVec(rng_, H, 0.5f, 1.5f);
  const std::vector<double> want = RefRmsNorm(x, w, T, H, eps);

  DeviceBuffer dx = Upload(x), dw = Upload(w), dout = Upload(std::vector<float>(T * H, 0.f));
  ASSERT_OK(be_->RmsNorm(View(dx, T, H), View(dw, 1, H), eps, View(dout, T, H)));
  ExpectClose(Download<float>(dout, T * H), want);
  EXPECT_EQ(Download<float>(dx, T * H), x) << "input modified";

  // In place (out aliases x).
  ASSERT_OK(be_->RmsNorm(View(dx, T, H), View(dw, 1, H), eps, View(dx, T, H)));
  ExpectClose(Download<float>(dx, T * H), want);
}

// --- SiluMul ------------------------------------------------------------------------------------

TEST_P(BackendOpsTest, SiluMul) {
  const int64_t T = 6, I = 19;
  std::vector<float> gu = RandomVec(rng_, T * 2 * I, -6.0f, 6.0f);
  // Saturated gates: silu(-100) ~ 0 (no NaN from exp overflow), silu(100) ~ 100.
  gu[0] = -100.0f;
  gu[1] = 100.0f;
  gu[2] = 0.0f;
  gu[2 * I + 5] = -30.0f;
  std::vector<double> want(T * I);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t j = 0; j < I; ++j) {
      const double g = gu[t * 2 * I + j], u = gu[t * 2 * I + I + j];
      want[t * I + j] = g / (1.0 + std::exp(-g)) * u;
    }
  }
  DeviceBuffer dgu = Upload(gu), dout = Upload(std::vector<float>(T * I, 0.f));
  ASSERT_OK(be_->SiluMul(View(dgu, T, 2 * I), View(dout, T, I)));
  ExpectClose(Download<float>(dout, T * I), want);
}

// --- AddInPlace ---------------------------------------------------------------------------------

TEST_P(BackendOpsTest, AddInPlace) {
  const int64_t T = 7, C = 29;
  const std::vector<float> a = RandomVec(rng_, T * C, -10.f, 10.f), b = RandomVec(rng_, T * C);
  std::vector<double> want(T * C);
  for (size_t i = 0; i < want.size(); ++i) want[i] = static_cast<double>(a[i]) + b[i];
  DeviceBuffer da = Upload(a), db = Upload(b);
  ASSERT_OK(be_->AddInPlace(View(da, T, C), View(db, T, C)));
  ExpectClose(Download<float>(da, T * C), want);
  EXPECT_EQ(Download<float>(db, T * C), b);
}

TEST_P(BackendOpsTest, AddInPlaceStrided) {
  // acc: columns [2, 2 + C) of a [T, 40] buffer; x: columns [7, 7 + C) of a [T, 37] buffer.
  const int64_t T = 5, C = 13, a_ld = 40, x_ld = 37;
  const std::vector<float> a = RandomVec(rng_, T * a_ld), x = RandomVec(rng_, T * x_ld);
  DeviceBuffer da = Upload(a), dx = Upload(x);
  ASSERT_OK(be_->AddInPlace(View(da, T, a_ld).ColSlice(2, C), View(dx, T, x_ld).ColSlice(7, C)));
  std::vector<double> want;
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t c = 0; c < C; ++c) want.push_back(static_cast<double>(a[t * a_ld + 2 + c]) + x[t * x_ld + 7 + c]);
  }
  ExpectClose(ColumnsOfSliceRestUnchanged(Download<float>(da, T * a_ld), a, T, a_ld, 2, C), want);
}

// --- Embedding / GatherRows ---------------------------------------------------------------------

TEST_P(BackendOpsTest, Embedding) {
  const int64_t V = 29, H = 13;
  const std::vector<float> table = RandomVec(rng_, V * H);
  const std::vector<int32_t> ids = {5, 0, 28, 5, 17, 3, 28, 11, 1};
  const int64_t T = static_cast<int64_t>(ids.size());
  DeviceBuffer dt = Upload(table), di = Upload(ids), dout = Upload(std::vector<float>(T * H, 0.f));
  ASSERT_OK(be_->Embedding(View(dt, V, H), di.as<int32_t>(), View(dout, T, H)));
  const std::vector<float> out = Download<float>(dout, T * H);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < H; ++j)
      ASSERT_EQ(out[t * H + j], table[ids[t] * H + j]) << "token " << t << " col " << j;
}

TEST_P(BackendOpsTest, GatherRows) {
  // x is a strided view (columns [3, 3 + C) of an [R, 21] buffer); out is contiguous.
  const int64_t R = 11, ld = 21, C = 17;
  const std::vector<float> x = RandomVec(rng_, R * ld);
  const std::vector<int32_t> rows = {10, 0, 3, 3, 7};
  const int64_t n = static_cast<int64_t>(rows.size());
  DeviceBuffer dx = Upload(x), dr = Upload(rows), dout = Upload(std::vector<float>(n * C, 0.f));
  ASSERT_OK(be_->GatherRows(View(dx, R, ld).ColSlice(3, C), dr.as<int32_t>(), View(dout, n, C)));
  const std::vector<float> out = Download<float>(dout, n * C);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < C; ++j)
      ASSERT_EQ(out[i * C + j], x[rows[i] * ld + 3 + j]) << "row " << i << " col " << j;
}

// --- Rope ---------------------------------------------------------------------------------------

TEST_P(BackendOpsTest, RopeMatchesRotateHalfFormula) {
  // q heads of a fused [T, q + k + v] buffer, like the forward pass: x is a strided column view.
  const int heads = 3, hd = 14;
  const int64_t T = 6, width = heads * hd, ld = width + 2 * 2 * hd, c0 = 0;
  const std::vector<int32_t> pos = {0, 1, 2, 17, 300, 4095};
  const std::vector<float> inv_freq = InvFreq(hd, 10000.0);
  const std::vector<float> x = RandomVec(rng_, T * ld);
  DeviceBuffer dx = Upload(x), dpos = Upload(pos), dinv = Upload(inv_freq);
  RopeParams p;
  p.x = View(dx, T, ld).ColSlice(c0, width);
  p.num_heads = heads;
  p.head_dim = hd;
  p.positions = dpos.as<int32_t>();
  p.inv_freq = dinv.as<float>();
  ASSERT_OK(be_->Rope(p));

  const std::vector<double> want = RefRope(x, ld, c0, T, heads, hd, pos, inv_freq);
  const std::vector<float> all = Download<float>(dx, T * ld);
  ExpectClose(ColumnsOfSliceRestUnchanged(all, x, T, ld, c0, width), want);

  for (int64_t t = 0; t < T; ++t) {
    for (int h = 0; h < heads; ++h) {
      for (int i = 0; i < hd / 2; ++i) {
        const int64_t a = t * ld + c0 + h * hd + i, b = a + hd / 2;
        if (pos[t] == 0) {
          // Position 0 is the identity.
          EXPECT_NEAR(all[a], x[a], 1e-6) << "t " << t << " h " << h << " i " << i;
          EXPECT_NEAR(all[b], x[b], 1e-6) << "t " << t << " h " << h << " i " << i;
        }
        // A rotation preserves the norm of each (i, i + half) pair.
        const double n0 = static_cast<double>(x[a]) * x[a] + static_cast<double>(x[b]) * x[b];
        const double n1 = static_cast<double>(all[a]) * all[a] + static_cast<double>(all[b]) * all[b];
        EXPECT_NEAR(n1, n0, kTol * std::max(1.0, n0)) << "t " << t << " h " << h << " i " << i;
      }
    }
  }
}

TEST_P(BackendOpsTest, RopeOnKeyHeadsOfFusedBuffer) {
  // The k part (columns [q, q + k)) with fewer heads and a different position set.
  const int q_heads = 6, kv_heads = 2, hd = 10;
  const int64_t T = 4, q = q_heads * hd, kw = kv_heads * hd, ld = q + 2 * kw;
  const std::vector<int32_t> pos = {13, 5, 6, 0};
  const std::vector<float> inv_freq = InvFreq(hd, 500000.0);
  const std::vector<float> x = RandomVec(rng_, T * ld);
  DeviceBuffer dx = Upload(x), dpos = Upload(pos), dinv = Upload(inv_freq);
  RopeParams p;
  p.x = View(dx, T, ld).ColSlice(q, kw);
  p.num_heads = kv_heads;
  p.head_dim = hd;
  p.positions = dpos.as<int32_t>();
  p.inv_freq = dinv.as<float>();
  ASSERT_OK(be_->Rope(p));
  const std::vector<double> want = RefRope(x, ld, q, T, kv_heads, hd, pos, inv_freq);
  ExpectClose(ColumnsOfSliceRestUnchanged(Download<float>(dx, T * ld), x, T, ld, q, kw), want);
}

// --- WriteKv / attention / CopyBlocks ----------------------------------------------------------

TEST_P(BackendOpsTest, WriteKvPlacesRowsAtFlatSlots) {
  // Different K and V widths (compressed-cache layout), strided sources.
  const int32_t bs = 4, num_blocks = 5;
  const int64_t kw = 7, vw = 3, T = 6, ld = kw + vw + 2;
  const std::vector<float> kv = RandomVec(rng_, T * ld);
  const std::vector<int32_t> slots = {17, 0, 3, 8, 19, 9};  // blocks 4, 0, 0, 2, 4, 2
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const size_t nslots = static_cast<size_t>(num_blocks) * bs;
  DeviceBuffer dkv = Upload(kv), dslots = Upload(slots);
  DeviceBuffer kc = Upload(std::vector<float>(nslots * kw, nan));
  DeviceBuffer vc = Upload(std::vector<float>(nslots * vw, nan));
  KvLayer cache{kc.data(), vc.data(), kw, vw, DType::kF32};
  const Tensor2D all = View(dkv, T, ld);
  ASSERT_OK(be_->WriteKv(cache, all.ColSlice(0, kw), all.ColSlice(kw, vw), dslots.as<int32_t>()));
  const std::vector<float> k = Download<float>(kc, nslots * kw), v = Download<float>(vc, nslots * vw);
  std::vector<int> row_of_slot(nslots, -1);
  for (int64_t t = 0; t < T; ++t) row_of_slot[slots[t]] = static_cast<int>(t);
  for (size_t s = 0; s < nslots; ++s) {
    const int t = row_of_slot[s];
    for (int64_t j = 0; j < kw; ++j) {
      if (t < 0) {
        EXPECT_TRUE(std::isnan(k[s * kw + j])) << "slot " << s << " written";
      } else {
        EXPECT_EQ(k[s * kw + j], kv[t * ld + j]) << "slot " << s << " col " << j;
      }
    }
    for (int64_t j = 0; j < vw; ++j) {
      if (t < 0) {
        EXPECT_TRUE(std::isnan(v[s * vw + j])) << "slot " << s << " written";
      } else {
        EXPECT_EQ(v[s * vw + j], kv[t * ld + kw + j]) << "slot " << s << " col " << j;
      }
    }
  }
}

// The CPU reference's paged attention against dense math, at small odd shapes (F32, head_dim
// 10 and 6). The CUDA kernels support BF16 and head_dim 64/128; their parity against this
// reference is tests/backend/cuda_attention_test.cc.
using CpuAttentionReferenceTest = BackendOpsTest;

TEST_P(CpuAttentionReferenceTest, PagedAttentionMatchesDenseCausalAttention) {
  // Three sequences: (already cached, new this step) = (0, 7) prefill, (13, 1) decode,
  // (5, 9) chunked prefill on top of a cached prefix. GQA: 6 query heads over 2 KV heads.
  const int num_heads = 6, kv_heads = 2, hd = 10, group = num_heads / kv_heads;
  const int32_t bs = 4, num_blocks = 17, max_blocks = 5;  // one more table column than needed
  const int64_t qw = num_heads * hd, kw = kv_heads * hd, ld = qw + 2 * kw;
  struct SeqSpec {
    int cached, fresh;
  };
  const std::vector<SeqSpec> seqs = {{0, 7}, {13, 1}, {5, 9}};
  const int S = static_cast<int>(seqs.size());
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));

  // Shuffled, non-contiguous block ids; the unused ones stay NaN-filled (any read of a slot that
  // is not part of a sequence's context would poison the output).
  std::vector<int32_t> ids(num_blocks);
  std::iota(ids.begin(), ids.end(), 0);
  std::shuffle(ids.begin(), ids.end(), rng_);
  size_t next = 0;
  const int32_t pad_block = ids.back();  // never assigned: filler for unused table columns
  std::vector<int32_t> tables(S * max_blocks, pad_block);
  std::vector<std::vector<float>> K(S), V(S);  // dense per-sequence keys/values [ctx, kw]
  std::vector<int32_t> qstart = {0}, ctx_len;
  for (int s = 0; s < S; ++s) {
    const int ctx = seqs[s].cached + seqs[s].fresh;
    for (int b = 0; b < (ctx + bs - 1) / bs; ++b) tables[s * max_blocks + b] = ids[next++];
    K[s] = RandomVec(rng_, ctx * kw);
    V[s] = RandomVec(rng_, ctx * kw);
    qstart.push_back(qstart.back() + seqs[s].fresh);
    ctx_len.push_back(ctx);
  }
  ASSERT_LT(next, ids.size() - 1);  // the pad block stays unassigned
  const int T = qstart.back();
  auto slot_of = [&](int s, int pos) { return tables[s * max_blocks + pos / bs] * bs + pos % bs; };

  const float nan = std::numeric_limits<float>::quiet_NaN();
  const size_t nslots = static_cast<size_t>(num_blocks) * bs;
  DeviceBuffer kc = Upload(std::vector<float>(nslots * kw, nan));
  DeviceBuffer vc = Upload(std::vector<float>(nslots * kw, nan));
  KvLayer cache{kc.data(), vc.data(), kw, kw, DType::kF32};

  // Earlier steps: write the cached prefixes (contiguous k / v rows).
  for (int s = 0; s < S; ++s) {
    if (seqs[s].cached == 0) continue;
    const int n = seqs[s].cached;
    std::vector<int32_t> slots;
    for (int p = 0; p < n; ++p) slots.push_back(slot_of(s, p));
    DeviceBuffer dk = Upload(std::vector<float>(K[s].begin(), K[s].begin() + n * kw));
    DeviceBuffer dv = Upload(std::vector<float>(V[s].begin(), V[s].begin() + n * kw));
    DeviceBuffer ds = Upload(slots);
    ASSERT_OK(be_->WriteKv(cache, View(dk, n, kw), View(dv, n, kw), ds.as<int32_t>()));
  }

  // This step: a fused [T, q | k | v] buffer, as the forward pass produces it.
  std::vector<float> qkv(T * ld);
  std::vector<float> qhost = RandomVec(rng_, T * qw, -2.0f, 2.0f);  // peaky-ish softmax
  std::vector<int32_t> step_slots;
  for (int s = 0, row = 0; s < S; ++s) {
    for (int i = 0; i < seqs[s].fresh; ++i, ++row) {
      const int p = seqs[s].cached + i;
      std::copy_n(&qhost[row * qw], qw, &qkv[row * ld]);
      std::copy_n(&K[s][p * kw], kw, &qkv[row * ld + qw]);
      std::copy_n(&V[s][p * kw], kw, &qkv[row * ld + qw + kw]);
      step_slots.push_back(slot_of(s, p));
    }
  }
  DeviceBuffer dqkv = Upload(qkv), dslots = Upload(step_slots);
  const Tensor2D fused = View(dqkv, T, ld);
  ASSERT_OK(be_->WriteKv(cache, fused.ColSlice(qw, kw), fused.ColSlice(qw + kw, kw),
                         dslots.as<int32_t>()));

  DeviceBuffer dqs = Upload(qstart), dctx = Upload(ctx_len), dtab = Upload(tables);
  // Output written into a strided view too; the columns around it must stay.
  const int64_t o_ld = qw + 3;
  const float sentinel = -777.0f;
  const std::vector<float> out0(T * o_ld, sentinel);
  DeviceBuffer dout = Upload(out0);
  AttentionParams ap;
  ap.q = fused.ColSlice(0, qw);
  ap.out = View(dout, T, o_ld).ColSlice(1, qw);
  ap.cache = cache;
  AttentionBatch batch;
  batch.num_seqs = S;
  batch.num_tokens = T;
  batch.max_seq_len = *std::max_element(ctx_len.begin(), ctx_len.end());
  batch.query_start = dqs.as<int32_t>();
  batch.seq_lens = dctx.as<int32_t>();
  batch.block_tables = dtab.as<int32_t>();
  batch.max_blocks_per_seq = max_blocks;
  batch.block_size = bs;
  batch.host_query_start = qstart.data();
  batch.host_seq_lens = ctx_len.data();
  ap.num_heads = num_heads;
  ap.num_kv_heads = kv_heads;
  ap.head_dim = hd;
  ap.scale = scale;
  ASSERT_OK(RunAttention(ap, batch, max_blocks));

  // Dense reference straight from the un-paged K / V.
  std::vector<double> want(T * qw);
  for (int s = 0, row = 0; s < S; ++s) {
    for (int i = 0; i < seqs[s].fresh; ++i, ++row) {
      const int pos = seqs[s].cached + i;  // attends to keys [0, pos]
      for (int h = 0; h < num_heads; ++h) {
        const int g = h / group;
        std::vector<double> sc(pos + 1);
        double mx = -std::numeric_limits<double>::infinity();
        for (int j = 0; j <= pos; ++j) {
          double d = 0;
          for (int e = 0; e < hd; ++e) {
            d += static_cast<double>(qhost[row * qw + h * hd + e]) * K[s][j * kw + g * hd + e];
          }
          sc[j] = d * scale;
          mx = std::max(mx, sc[j]);
        }
        double z = 0;
        for (double& x : sc) z += x = std::exp(x - mx);
        for (int e = 0; e < hd; ++e) {
          double acc = 0;
          for (int j = 0; j <= pos; ++j) acc += sc[j] / z * V[s][j * kw + g * hd + e];
          want[row * qw + h * hd + e] = acc;
        }
      }
    }
  }
  ExpectClose(ColumnsOfSliceRestUnchanged(Download<float>(dout, T * o_ld), out0, T, o_ld, 1, qw), want);

  // The paged cache holds exactly the dense rows at the slots the block tables name.
  const std::vector<float> kh = Download<float>(kc, nslots * kw), vh = Download<float>(vc, nslots * kw);
  for (int s = 0; s < S; ++s) {
    for (int p = 0; p < ctx_len[s]; ++p) {
      const int64_t slot = slot_of(s, p);
      for (int64_t j = 0; j < kw; ++j) {
        ASSERT_EQ(kh[slot * kw + j], K[s][p * kw + j]) << "seq " << s << " pos " << p;
        ASSERT_EQ(vh[slot * kw + j], V[s][p * kw + j]) << "seq " << s << " pos " << p;
      }
    }
  }
}

TEST_P(CpuAttentionReferenceTest, PagedAttentionSingleTokenContextIsTheValue) {
  // With one key the softmax is 1: the output is that token's value, for every head in the group.
  const int num_heads = 4, kv_heads = 2, hd = 6;
  const int32_t bs = 4;
  const int64_t qw = num_heads * hd, kw = kv_heads * hd;
  const std::vector<float> q = RandomVec(rng_, qw, -5.f, 5.f), k = RandomVec(rng_, kw),
                           v = RandomVec(rng_, kw);
  const std::vector<int32_t> slots = {2 * bs + 0}, qstart = {0, 1}, ctx = {1}, table = {2};
  DeviceBuffer kc = Upload(std::vector<float>(3 * bs * kw, 0.f));
  DeviceBuffer vc = Upload(std::vector<float>(3 * bs * kw, 0.f));
  KvLayer cache{kc.data(), vc.data(), kw, kw, DType::kF32};
  DeviceBuffer dq = Upload(q), dk = Upload(k), dv = Upload(v), ds = Upload(slots),
               dqs = Upload(qstart), dctx = Upload(ctx), dtab = Upload(table),
               dout = Upload(std::vector<float>(qw, 0.f));
  ASSERT_OK(be_->WriteKv(cache, View(dk, 1, kw), View(dv, 1, kw), ds.as<int32_t>()));
  AttentionParams ap;
  ap.q = View(dq, 1, qw);
  ap.out = View(dout, 1, qw);
  ap.cache = cache;
  const AttentionBatch batch{1, 1, 1, 1, bs, dqs.as<int32_t>(), dctx.as<int32_t>(),
                             dtab.as<int32_t>(), qstart.data(), ctx.data()};
  ap.num_heads = num_heads;
  ap.num_kv_heads = kv_heads;
  ap.head_dim = hd;
  ap.scale = 1.0f / std::sqrt(static_cast<float>(hd));
  ASSERT_OK(RunAttention(ap, batch, 1));
  std::vector<double> want(qw);
  for (int h = 0; h < num_heads; ++h)
    for (int e = 0; e < hd; ++e) want[h * hd + e] = v[(h / (num_heads / kv_heads)) * hd + e];
  ExpectClose(Download<float>(dout, qw), want);
}

TEST_P(BackendOpsTest, CopyBlocksCopiesWholeBlockOfKAndV) {
  const int32_t bs = 4, num_blocks = 6;
  const int64_t kw = 7, vw = 5;
  const size_t nslots = static_cast<size_t>(num_blocks) * bs;
  const std::vector<float> k = RandomVec(rng_, nslots * kw), v = RandomVec(rng_, nslots * vw);
  DeviceBuffer kc = Upload(k), vc = Upload(v);
  KvLayer cache{kc.data(), vc.data(), kw, vw, DType::kF32};
  const int32_t src = 4, dst = 1;
  const BlockCopy copy{src, dst};
  ASSERT_OK(be_->CopyBlocks({cache}, bs, num_blocks, {copy}));
  const std::vector<float> k2 = Download<float>(kc, nslots * kw), v2 = Download<float>(vc, nslots * vw);
  auto check = [&](const std::vector<float>& before, const std::vector<float>& after, int64_t w,
                   const char* what) {
    const size_t per_block = static_cast<size_t>(bs) * w;
    for (int32_t b = 0; b < num_blocks; ++b) {
      for (size_t i = 0; i < per_block; ++i) {
        const float want = b == dst ? before[src * per_block + i] : before[b * per_block + i];
        ASSERT_EQ(after[b * per_block + i], want) << what << " block " << b << " element " << i;
      }
    }
  };
  check(k, k2, kw, "K");
  check(v, v2, vw, "V");
}

INSTANTIATE_TEST_SUITE_P(Backends, BackendOpsTest,
                         ::testing::Values(BackendKind::kCpu, BackendKind::kCuda), KindName);
INSTANTIATE_TEST_SUITE_P(Cpu, CpuAttentionReferenceTest, ::testing::Values(BackendKind::kCpu), KindName);

TEST(BackendFactoryTest, CpuBackendIsAvailable) {
  auto b = CreateBackend(BackendOptions{BackendKind::kCpu});
  ASSERT_OK(b);
  EXPECT_STREQ((*b)->name(), "cpu");
  EXPECT_FALSE((*b)->Describe().empty());
}

TEST(BackendKindTest, NamesParseBackCaseInsensitivelyAndNothingElseDoes) {
  using ::lorc::testing::StatusIs;
  using ::testing::HasSubstr;
  for (BackendKind kind : {BackendKind::kCpu, BackendKind::kCuda}) {
    ASSERT_OK_AND_ASSIGN(const BackendKind parsed, ParseBackendKind(BackendKindName(kind)));
    EXPECT_EQ(parsed, kind);
  }
  EXPECT_STREQ(BackendKindName(BackendKind::kCuda), "cuda");
  ASSERT_OK_AND_ASSIGN(const BackendKind upper, ParseBackendKind("CUDA"));
  EXPECT_EQ(upper, BackendKind::kCuda);
  EXPECT_THAT(ParseBackendKind("gpu"),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("unknown backend 'gpu' (expected cpu or cuda)")));
  EXPECT_TRUE(IsBackendKind("cuda", BackendKind::kCuda));
  EXPECT_TRUE(IsBackendKind("Cuda", BackendKind::kCuda));
  EXPECT_FALSE(IsBackendKind("cpu", BackendKind::kCuda));
  EXPECT_TRUE(IsBackendKind("cpu", BackendKind::kCpu));
  EXPECT_FALSE(IsBackendKind("cuda0", BackendKind::kCuda));
  EXPECT_FALSE(IsBackendKind("", BackendKind::kCpu));
}

// The CPU backend's device memory (backend/cpu_device_memory.h): page-aligned, zero-filled, and
// (where kOwnMappings: outside AddressSanitizer, which keeps malloc's redzones) unmapped when
// freed, including a buffer under glibc's mmap threshold (a heap chunk would stay mapped).
bool IsMapped(const void* p) {
  std::ifstream maps("/proc/self/maps");
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  for (std::string line; std::getline(maps, line);) {
    uintptr_t lo = 0, hi = 0;
    if (std::sscanf(line.c_str(), "%lx-%lx", &lo, &hi) == 2 && lo <= a && a < hi) return true;
  }
  return false;
}

TEST(CpuDeviceMemoryTest, BuffersArePageAlignedZeroedOwnMappingsGoneWhenFreed) {
  CpuDeviceMemory memory;
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  for (size_t bytes : {size_t{1}, size_t{200} << 10, (size_t{3} << 20) + 5}) {
    absl::StatusOr<void*> p = memory.Allocate(bytes);
    ASSERT_TRUE(p.ok()) << p.status();
    EXPECT_EQ(reinterpret_cast<uintptr_t>(*p) % page, 0u) << bytes;
    const auto* bytes_in = static_cast<const unsigned char*>(*p);
    for (size_t i = 0; i < bytes; i += 997) ASSERT_EQ(bytes_in[i], 0) << "byte " << i << " of " << bytes;
    std::memset(*p, 0x5a, bytes);
    ASSERT_TRUE(IsMapped(*p));
    memory.Free(*p);
    // A heap chunk (malloc) would stay mapped after free; a buffer's own mapping does not.
    if (CpuDeviceMemory::kOwnMappings) {
      EXPECT_FALSE(IsMapped(*p)) << bytes << " bytes: still mapped after Free";
    }
  }
  memory.Free(nullptr);  // ignored
}

TEST(CpuDeviceMemoryTest, RefusedSizesAreErrorsNamingTheSize) {
  CpuDeviceMemory memory;
  absl::StatusOr<void*> huge = memory.Allocate(size_t{1} << 62);
  ASSERT_FALSE(huge.ok());
  EXPECT_EQ(huge.status().code(), absl::StatusCode::kResourceExhausted) << huge.status();
  EXPECT_NE(huge.status().message().find(std::to_string(size_t{1} << 62)), std::string::npos)
      << huge.status();
  EXPECT_EQ(memory.Allocate(0).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace backend_test
}  // namespace lorc
