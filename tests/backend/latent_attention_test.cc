// LoRC latent attention (backend.h LatentAttentionParams) against a naive fp64 reference written
// here: keys reconstructed from unrotated latents (k_t = B_K,g c_K,t), rotated at their positions
// with llama3-scaled inverse frequencies, causal softmax per query head of the group, outputs
// sum_t p_t c_V,t. Paged over shuffled blocks; one batch holds a decode with cached context, a
// prefill chunk over cached context and a fresh prompt. The new tokens' latents go through
// RopeKvWrite with rotate_k false (q rotated, latents stored as given), on both backends in F32;
// CUDA's latent attention is BF16 only (its parity test: cuda_latent_attention_test.cc), so here
// it must refuse F32 by name.
#include "tests/backend/backend_ops_fixture.h"
#include "model/model_config.h"

namespace lorc {
namespace backend_test {
namespace {

using ::lorc::testing::StatusIs;
using ::testing::HasSubstr;

std::vector<float> Llama3InvFreq(int head_dim) {
  ModelConfig c;
  c.head_dim = head_dim;
  c.rope.type = RopeType::kLlama3;
  c.rope.theta = 500000.0;
  c.rope.factor = 8.0;
  c.rope.low_freq_factor = 1.0;
  c.rope.high_freq_factor = 4.0;
  c.rope.original_max_position_embeddings = 16;  // small, so the scaled bands matter at these lengths
  return RopeInverseFrequencies(c);
}

TEST_P(BackendOpsTest, LatentAttentionMatchesNaiveReconstruction) {
  const int heads = 6, kv_heads = 2, hd = 16, rk = 6, rv = 5, group = heads / kv_heads;
  const int32_t bs = 4, num_blocks = 16, max_blocks = 8;
  const int64_t kw = kv_heads * rk, vw = kv_heads * rv, qw = heads * hd;
  // Sequences: (cached, new) = (9, 1) decode, (6, 5) chunk over a cached prefix, (0, 7) prompt.
  const std::vector<int32_t> cached = {9, 6, 0}, fresh = {1, 5, 7};
  const std::vector<std::vector<int32_t>> tables = {{11, 3, 7}, {0, 14, 5}, {9, 2}};
  const int S = 3;
  std::vector<int32_t> qstart = {0}, seq_lens, positions, slots, flat_tables(S * max_blocks, 0);
  for (int s = 0; s < S; ++s) {
    for (int i = 0; i < fresh[s]; ++i) {
      const int pos = cached[s] + i;
      positions.push_back(pos);
      slots.push_back(tables[s][pos / bs] * bs + pos % bs);
    }
    qstart.push_back(qstart.back() + fresh[s]);
    seq_lens.push_back(cached[s] + fresh[s]);
    std::copy(tables[s].begin(), tables[s].end(), flat_tables.begin() + s * max_blocks);
  }
  const int64_t T = qstart.back();
  const std::vector<float> inv_freq = Llama3InvFreq(hd);
  const std::vector<float> k_up = RandomVec(rng_, kv_heads * hd * rk);
  // The cache: random latents for every slot (cached tokens); the new tokens' are written below.
  std::vector<float> kc = RandomVec(rng_, num_blocks * bs * kw), vc = RandomVec(rng_, num_blocks * bs * vw);
  const std::vector<float> qkv = RandomVec(rng_, T * (qw + kw + vw));
  const int64_t ld = qw + kw + vw;
  std::vector<float> want_kc = kc, want_vc = vc;
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t c = 0; c < kw; ++c) want_kc[slots[t] * kw + c] = qkv[t * ld + qw + c];
    for (int64_t c = 0; c < vw; ++c) want_vc[slots[t] * vw + c] = qkv[t * ld + qw + kw + c];
  }

  DeviceBuffer dqkv = Upload(qkv), dkc = Upload(kc), dvc = Upload(vc), dup = Upload(k_up),
               dinv = Upload(inv_freq), dpos = Upload(positions), dslots = Upload(slots),
               dqs = Upload(qstart), dlens = Upload(seq_lens), dtables = Upload(flat_tables),
               dout = Upload(std::vector<float>(T * heads * rv, 0.f));
  const KvLayer cache{dkc.data(), dvc.data(), kw, vw, DType::kF32};
  RopeKvWriteParams w;
  const Tensor2D fused = View(dqkv, T, ld);
  w.q = fused.ColSlice(0, qw);
  w.k = fused.ColSlice(qw, kw);
  w.v = fused.ColSlice(qw + kw, vw);
  w.cache = cache;
  w.rotate_k = false;
  w.num_heads = heads;
  w.num_kv_heads = kv_heads;
  w.head_dim = hd;
  w.positions = dpos.as<int32_t>();
  w.inv_freq = dinv.as<float>();
  w.slot_mapping = dslots.as<int32_t>();
  ASSERT_TRUE(be_->SupportsLatentAttention());
  ASSERT_OK(be_->RopeKvWrite(w));
  EXPECT_EQ(Download<float>(dkc, kc.size()), want_kc) << "latents must be stored unrotated";
  EXPECT_EQ(Download<float>(dvc, vc.size()), want_vc);
  const std::vector<float> q_rot = Download<float>(dqkv, T * ld);
  ExpectClose([&] {
    std::vector<float> got;
    for (int64_t t = 0; t < T; ++t) got.insert(got.end(), &q_rot[t * ld], &q_rot[t * ld + qw]);
    return got;
  }(), RefRope(qkv, ld, 0, T, heads, hd, positions, inv_freq));

  AttentionBatch batch;
  batch.num_seqs = S;
  batch.num_tokens = static_cast<int32_t>(T);
  batch.max_seq_len = *std::max_element(seq_lens.begin(), seq_lens.end());
  batch.max_blocks_per_seq = max_blocks;
  batch.block_size = bs;
  batch.query_start = dqs.as<int32_t>();
  batch.seq_lens = dlens.as<int32_t>();
  batch.block_tables = dtables.as<int32_t>();
  batch.host_query_start = qstart.data();
  batch.host_seq_lens = seq_lens.data();
  auto plan = be_->CreateAttentionPlan({S, static_cast<int32_t>(T), max_blocks});
  ASSERT_OK(plan);
  ASSERT_OK(be_->PlanAttention(batch, **plan));
  LatentAttentionParams p;
  p.q = w.q;
  p.k_up = View(dup, kv_heads * hd, rk);
  p.out = View(dout, T, heads * rv);
  p.cache = cache;
  p.num_heads = heads;
  p.num_kv_heads = kv_heads;
  p.head_dim = hd;
  p.k_rank = rk;
  p.v_rank = rv;
  p.scale = 1.0f / std::sqrt(static_cast<float>(hd));
  p.inv_freq = dinv.as<float>();
  if (GetParam() == BackendKind::kCuda) {  // BF16 at head_dim 128: cuda_latent_attention_test.cc
    EXPECT_THAT(be_->LatentAttention(p, **plan), StatusIs(absl::StatusCode::kUnimplemented, HasSubstr("F32")));
    return;
  }
  ASSERT_OK(be_->LatentAttention(p, **plan));

  // The naive reference, fp64, from the unrotated q and the latents as written.
  const std::vector<double> q_ref = RefRope(qkv, ld, 0, T, heads, hd, positions, inv_freq);
  std::vector<double> want(T * heads * rv, 0.0);
  for (int s = 0; s < S; ++s) {
    const int len = seq_lens[s];
    for (int g = 0; g < kv_heads; ++g) {
      // Keys of every position: reconstruct, then rotate at the position.
      std::vector<double> keys(static_cast<size_t>(len) * hd);
      for (int t = 0; t < len; ++t) {
        const int64_t slot = tables[s][t / bs] * bs + t % bs;
        std::vector<float> k(hd);
        for (int i = 0; i < hd; ++i) {
          double acc = 0;
          for (int j = 0; j < rk; ++j) acc += static_cast<double>(k_up[(g * hd + i) * rk + j]) * want_kc[slot * kw + g * rk + j];
          k[i] = static_cast<float>(acc);
        }
        const std::vector<double> rot = RefRope(k, hd, 0, 1, 1, hd, {t}, inv_freq);
        std::copy(rot.begin(), rot.end(), keys.begin() + static_cast<int64_t>(t) * hd);
      }
      for (int hh = 0; hh < group; ++hh) {
        const int h = g * group + hh;
        for (int i = 0; i < fresh[s]; ++i) {
          const int64_t row = qstart[s] + i;
          const int last = cached[s] + i;
          std::vector<double> sc(last + 1);
          double mx = -1e300;
          for (int t = 0; t <= last; ++t) {
            double dot = 0;
            for (int d = 0; d < hd; ++d) dot += q_ref[(row * heads + h) * hd + d] * keys[t * hd + d];
            sc[t] = dot / std::sqrt(static_cast<double>(hd));
            mx = std::max(mx, sc[t]);
          }
          double sum = 0;
          for (double& x : sc) sum += (x = std::exp(x - mx));
          for (int t = 0; t <= last; ++t) {
            const int64_t slot = tables[s][t / bs] * bs + t % bs;
            for (int c = 0; c < rv; ++c) {
              want[row * heads * rv + h * rv + c] += sc[t] / sum * want_vc[slot * vw + g * rv + c];
            }
          }
        }
      }
    }
  }
  ExpectClose(Download<float>(dout, T * heads * rv), want);

  // Shapes that do not match the ranks are rejected naming them.
  p.v_rank = rv + 1;
  EXPECT_THAT(be_->LatentAttention(p, **plan),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("v_rank 6")));
}

INSTANTIATE_TEST_SUITE_P(Backends, BackendOpsTest,
                         ::testing::Values(BackendKind::kCpu, BackendKind::kCuda), KindName);

}  // namespace
}  // namespace backend_test
}  // namespace lorc
