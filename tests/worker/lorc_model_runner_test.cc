// LoRC compressed models (compress/FORMAT.md) served by the CPU backend, against references built
// in the test from the fixture model (tiny-llama-a):
//  - exact factors (r = head_dim, A = W, B = I): the uncompressed model's greedy tokens and logits;
//  - random rank-deficient factors at per-layer ranks: the logits of the uncompressed model whose
//    K/V/O weights are the reconstructed products (B_K A_K, B_V A_V; W_O unfolded), i.e. keys
//    reconstructed, rotated, attended and the value projection folded, computed naively here;
//  - tensor parallelism 2 over Gloo gives the tp 1 tokens, and with fp8 / int8 / int4 caches
//    layer 0's codes and scales of every KV head equal tp 1's (kvstore/README.md);
//  - inconsistent lorc.json and wrong tensor shapes fail the load naming field / tensor;
//  - KV bytes per token are the latent widths.
#include <unistd.h>

#include <array>
#include <condition_variable>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <random>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "absl/strings/str_cat.h"
#include "coordinator/engine.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/kv_quant.h"
#include "model/safetensors.h"
#include "model/safetensors_writer.h"
#include "tests/testing/scratch_dir.h"
#include "nlohmann/json.hpp"
#include "tests/testing/fixtures.h"
#include "tests/testing/golden.h"
#include "tests/testing/status_matchers.h"
#include "worker/comm/communicator.h"
#include "worker/comm/rendezvous.h"
#include "worker/model_loader.h"
#include "worker/step_executor.h"

namespace lorc {
namespace {

using ::lorc::testing::Golden;
using ::lorc::testing::GoldenPrompts;
using ::lorc::testing::StatusIs;
using ::testing::AllOf;
using ::testing::HasSubstr;
using json = nlohmann::json;
namespace fs = std::filesystem;

constexpr int64_t kLayers = 8, kHidden = 512, kHeads = 4, kKvHeads = 2, kHeadDim = 128;

constexpr char kScratch[] = "lorc_lorc_runner";
fs::path Scratch(const std::string& name) { return ::lorc::testing::MakeScratchDir(kScratch, name); }
const auto* const kCleanup =
    ::testing::AddGlobalTestEnvironment(new ::lorc::testing::ScratchCleanup(kScratch));

struct HostTensor {
  std::vector<int64_t> shape;
  std::vector<float> v;  // row-major
  DType dtype = DType::kF32;  // as written
};
using Tensors = std::map<std::string, HostTensor>;

Tensors ReadFixture() {
  Tensors out;
  auto r = CheckpointReader::Open(::lorc::testing::TinyLlamaDir());
  EXPECT_OK(r);
  if (!r.ok()) return out;
  for (const std::string& name : (*r)->TensorNames()) {
    const TensorInfo* t = *(*r)->Find(name);
    HostTensor h{t->shape, std::vector<float>(static_cast<size_t>(t->numel())), DType::kBF16};
    EXPECT_OK((*r)->ReadF32(name, t->shape, absl::MakeSpan(h.v)));
    out[name] = std::move(h);  // bf16 values: written back as BF16 exactly
  }
  return out;
}

const Tensors& Fixture() {
  static const Tensors* t = new Tensors(ReadFixture());
  return *t;
}

std::string L(int64_t l, const std::string& what) { return absl::StrCat("model.layers.", l, ".self_attn.", what, ".weight"); }

json LorcJson(const std::vector<std::pair<int64_t, int64_t>>& ranks, const std::string& method = "svd") {
  json j = {{"format", "lorcserve-lorc"}, {"version", 1}, {"method", method}, {"schedule", "uniform"},
            {"target", {{"kv_ratio", 1.0}}}, {"num_layers", kLayers}, {"num_kv_heads", kKvHeads},
            {"head_dim", kHeadDim}, {"calibration", nullptr},
            {"source_model", {{"dir", "tiny-llama-a"}, {"config_sha256", ""}}}};
  j["layers"] = json::array();
  for (auto [k, v] : ranks) j["layers"].push_back({{"k_rank", k}, {"v_rank", v}});
  return j;
}

// A model directory: the fixture's config.json (and generation config), `tensors` in one file,
// lorc.json when given.
void WriteDir(const fs::path& dir, const Tensors& tensors, const json* lorc) {
  fs::copy_file(::lorc::testing::TinyLlamaDir() + "/config.json", dir / "config.json");
  std::vector<TensorToWrite> out;
  for (const auto& [name, t] : tensors) {
    TensorToWrite w{name, t.dtype, t.shape, {}};
    ASSERT_OK(EncodeF32(t.v, t.dtype, &w.bytes));
    out.push_back(std::move(w));
  }
  ASSERT_OK(WriteSafetensors((dir / "model.safetensors").string(), out));
  if (lorc != nullptr) std::ofstream(dir / "lorc.json") << lorc->dump(2);
}

// B = I per KV head: k_up_proj [n_kv * d, d].
HostTensor IdentityUp() {
  HostTensor t{{kKvHeads * kHeadDim, kHeadDim}, std::vector<float>(kKvHeads * kHeadDim * kHeadDim), DType::kF32};
  for (int64_t h = 0; h < kKvHeads; ++h) {
    for (int64_t i = 0; i < kHeadDim; ++i) t.v[(h * kHeadDim + i) * kHeadDim + i] = 1.0f;
  }
  return t;
}

// The exact factorization at r = d as a directory: k_proj = A_K = W_K, k_up_proj = B_K = I,
// v_proj = W_V, o_proj = W_O B_V = W_O. `edit` changes the tensors or lorc.json before writing.
fs::path ExactDir(const std::string& name,
                  const std::function<void(Tensors&, json&)>& edit = nullptr) {
  const fs::path dir = Scratch(name);
  Tensors t = Fixture();
  for (int64_t l = 0; l < kLayers; ++l) t[L(l, "k_up_proj")] = IdentityUp();
  json lorc = LorcJson(std::vector<std::pair<int64_t, int64_t>>(kLayers, {kHeadDim, kHeadDim}));
  if (edit) edit(t, lorc);
  WriteDir(dir, t, &lorc);
  return dir;
}

// Per-layer ranks of the rank-deficient test (K and V differ, every layer different).
const std::vector<std::pair<int64_t, int64_t>> kRanks = {{16, 32}, {32, 16}, {48, 8},  {64, 64},
                                                         {8, 48},  {24, 24}, {40, 56}, {56, 40}};

// Progressive per-layer ranks: what `compress --schedule progressive --kv-ratio 0.5` picks for the
// fixture (every layer's latent widths differ, 88 and 72 are not multiples of the int4 group).
const std::vector<std::pair<int64_t, int64_t>> kProgressiveRanks = {
    {96, 96}, {88, 88}, {80, 80}, {72, 72}, {56, 56}, {48, 48}, {40, 40}, {32, 32}};

// Random factors A [r, D], B [d, r] per KV head at `ranks`; writes the LoRC directory and the
// uncompressed reference (W_K' = B_K A_K, W_V' = B_V A_V per head in fp64, W_O unchanged; the LoRC o_proj
// columns of query head j are W_O[:, j*d:(j+1)*d] B_V,g(j)).
void RandomFactorDirs(const fs::path& lorc_dir, const fs::path& full_dir,
                      const std::vector<std::pair<int64_t, int64_t>>& ranks = kRanks) {
  std::mt19937 rng(1234);
  std::normal_distribution<float> a_dist(0.0f, 0.05f), b_dist(0.0f, 0.3f);
  Tensors lorc = Fixture(), full = Fixture();
  const int64_t D = kHidden, d = kHeadDim, group = kHeads / kKvHeads;
  for (int64_t l = 0; l < kLayers; ++l) {
    const auto [rk, rv] = ranks[l];
    HostTensor ak{{kKvHeads * rk, D}, {}, DType::kF32}, bk{{kKvHeads * d, rk}, {}, DType::kF32};
    HostTensor av{{kKvHeads * rv, D}, {}, DType::kF32}, bv_all{{kKvHeads * d, rv}, {}, DType::kF32};
    for (HostTensor* t : {&ak, &bk, &av, &bv_all}) {
      t->v.resize(static_cast<size_t>(t->shape[0] * t->shape[1]));
      for (float& x : t->v) x = (t == &ak || t == &av) ? a_dist(rng) : b_dist(rng);
    }
    // W' = B A per head: [n_kv * d, D].
    auto product = [&](const HostTensor& b, const HostTensor& a, int64_t r) {
      HostTensor w{{kKvHeads * d, D}, std::vector<float>(static_cast<size_t>(kKvHeads * d * D)), DType::kF32};
      for (int64_t h = 0; h < kKvHeads; ++h) {
        for (int64_t i = 0; i < d; ++i) {
          for (int64_t c = 0; c < D; ++c) {
            double s = 0;
            for (int64_t j = 0; j < r; ++j) {
              s += static_cast<double>(b.v[(h * d + i) * r + j]) * a.v[(h * r + j) * D + c];
            }
            w.v[(h * d + i) * D + c] = static_cast<float>(s);
          }
        }
      }
      return w;
    };
    full[L(l, "k_proj")] = product(bk, ak, rk);
    full[L(l, "v_proj")] = product(bv_all, av, rv);
    // Folded o_proj [D, n_q * r_v].
    const HostTensor& wo = Fixture().at(L(l, "o_proj"));
    HostTensor o{{D, kHeads * rv}, std::vector<float>(static_cast<size_t>(D * kHeads * rv)), DType::kF32};
    for (int64_t row = 0; row < D; ++row) {
      for (int64_t j = 0; j < kHeads; ++j) {
        const int64_t g = j / group;
        for (int64_t c = 0; c < rv; ++c) {
          double s = 0;
          for (int64_t i = 0; i < d; ++i) {
            s += static_cast<double>(wo.v[row * kHeads * d + j * d + i]) * bv_all.v[(g * d + i) * rv + c];
          }
          o.v[row * kHeads * rv + j * rv + c] = static_cast<float>(s);
        }
      }
    }
    lorc[L(l, "k_proj")] = ak;
    lorc[L(l, "k_up_proj")] = bk;
    lorc[L(l, "v_proj")] = av;
    lorc[L(l, "o_proj")] = o;
  }
  const json j = LorcJson(ranks);
  WriteDir(lorc_dir, lorc, &j);
  WriteDir(full_dir, full, nullptr);
}

KvCacheOptions Cache() {
  KvCacheOptions kv;
  kv.block_size = 16;
  kv.num_blocks = 256;
  kv.max_num_seqs = 8;
  kv.max_num_batched_tokens = 256;
  return kv;
}

struct Served {
  std::unique_ptr<Backend> backend;
  LoadedModel model;
};

// fused_norm_rows: BackendOptions::fused_norm_rows (-1: the CPU's default, none).
Served Load(const std::string& dir, int64_t fused_norm_rows = -1) {
  Served s;
  BackendOptions bo;
  bo.fused_norm_rows = fused_norm_rows;
  auto b = CreateBackend(bo);
  EXPECT_OK(b);
  s.backend = *std::move(b);
  auto m = LoadModel({dir}, s.backend.get(), 0, 1, nullptr, Cache());
  EXPECT_OK(m);
  if (m.ok()) s.model = *std::move(m);
  return s;
}

// The last logits of a prompt run as one sequence in chunks of `chunk` (blocks 0, 1, ...).
std::vector<float> LastLogits(ModelRunner& r, const std::vector<int32_t>& ids, size_t chunk) {
  std::vector<float> last;
  for (size_t pos = 0; pos < ids.size(); pos += chunk) {
    const size_t n = std::min(chunk, ids.size() - pos);
    SequenceStep s;
    s.seq_id = 1;
    s.tokens.assign(ids.begin() + pos, ids.begin() + pos + n);
    s.num_computed_tokens = static_cast<int64_t>(pos);
    for (int32_t b = 0; b < r.kv_spec().BlocksForTokens(pos + n); ++b) s.block_table.push_back(b);
    auto out = r.Execute({s});
    EXPECT_OK(out);
    if (!out.ok()) return {};
    last.assign(out->Row(0), out->Row(0) + out->vocab_size);
  }
  return last;
}

// Greedy tokens of every golden prompt, batched through the engine.
std::vector<std::vector<int32_t>> Greedy(const LoadedModel& m, int max_tokens) {
  StepExecutor exec(m.runner.get());
  EngineOptions eo;
  eo.max_num_seqs = m.runner->limits().max_num_seqs;
  eo.max_num_batched_tokens = m.runner->limits().max_num_batched_tokens;
  auto engine = Engine::Create(&exec, m.config, m.runner->kv_spec(), nullptr, eo);
  EXPECT_OK(engine);
  std::vector<GenerationRequest> reqs;
  for (const Golden& g : GoldenPrompts()) {
    GenerationRequest r;
    r.prompt_ids = g.prompt_ids;
    r.params.max_tokens = max_tokens;
    reqs.push_back(r);
  }
  std::vector<std::vector<int32_t>> out;
  if (!engine.ok()) return out;
  auto res = (*engine)->Generate(reqs);
  EXPECT_OK(res);
  if (res.ok()) {
    for (const GenerationResult& r : *res) out.push_back(r.first().output_ids);
  }
  return out;
}

float MaxAbsDiff(const std::vector<float>& a, const std::vector<float>& b) {
  EXPECT_EQ(a.size(), b.size());
  float m = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) m = std::max(m, std::abs(a[i] - b[i]));
  return m;
}

TEST(LorcModelRunnerTest, ExactFactorsGiveTheUncompressedOutputs) {
  REQUIRE_TINY_LLAMA();
  const fs::path dir = ExactDir("exact");
  Served full = Load(::lorc::testing::TinyLlamaDir());
  Served lorc = Load(dir.string());
  ASSERT_NE(lorc.model.runner, nullptr);
  ASSERT_TRUE(lorc.model.config.lorc.has_value());
  const KvCacheSpec& spec = lorc.model.runner->kv_spec();
  EXPECT_EQ(spec.rope_at(0), KvRope::kAtAttention);
  EXPECT_EQ(spec.CompressionName(), "lorc:svd k=128 v=128, 100% KV");
  // (e) F32 on the CPU: 8 layers x (256 + 256) latent values x 4 bytes, as full K/V.
  EXPECT_EQ(spec.BytesPerToken(), 8 * (256 + 256) * 4);
  EXPECT_EQ(spec.BytesPerToken(), full.model.runner->kv_spec().BytesPerToken());
  float worst = 0;
  for (const Golden& g : GoldenPrompts()) {
    // The same chunking on both sides (chunking alone changes fp32 rounding, see
    // worker_model_runner_test): the latent path at r = d computes the same fp32 values.
    for (size_t chunk : {size_t{1} << 20, size_t{5}}) {
      const std::vector<float> want = LastLogits(*full.model.runner, g.prompt_ids, chunk);
      const float diff = MaxAbsDiff(LastLogits(*lorc.model.runner, g.prompt_ids, chunk), want);
      EXPECT_LE(diff, 1e-4f) << g.prompt << " (chunks of " << chunk << ")";
      worst = std::max(worst, diff);
    }
  }
  std::cout << "exact factors: max |logit difference| " << worst << "\n";
  const auto want = Greedy(full.model, 32);
  const auto got = Greedy(lorc.model, 32);
  ASSERT_EQ(got.size(), GoldenPrompts().size());
  EXPECT_EQ(got, want);
  for (size_t i = 0; i < got.size(); ++i) {
    const std::vector<int32_t>& g = GoldenPrompts()[i].greedy_ids;
    EXPECT_EQ(got[i], std::vector<int32_t>(g.begin(), g.begin() + 32)) << "prompt " << i;
  }
}

class RandomFactors : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    lorc_dir_ = new fs::path(Scratch("random_lorc"));
    full_dir_ = new fs::path(Scratch("random_full"));
    RandomFactorDirs(*lorc_dir_, *full_dir_);
  }
  static fs::path* lorc_dir_;
  static fs::path* full_dir_;
};
fs::path* RandomFactors::lorc_dir_ = nullptr;
fs::path* RandomFactors::full_dir_ = nullptr;

TEST_F(RandomFactors, RankDeficientLatentsMatchTheReconstructedModel) {
  REQUIRE_TINY_LLAMA();
  Served lorc = Load(lorc_dir_->string());
  Served full = Load(full_dir_->string());
  ASSERT_NE(lorc.model.runner, nullptr);
  ASSERT_NE(full.model.runner, nullptr);
  const KvCacheSpec& spec = lorc.model.runner->kv_spec();
  int64_t widths = 0;
  for (int64_t l = 0; l < kLayers; ++l) {
    EXPECT_EQ(spec.k_width[l], kKvHeads * kRanks[l].first);
    EXPECT_EQ(spec.v_width[l], kKvHeads * kRanks[l].second);
    widths += spec.k_width[l] + spec.v_width[l];
  }
  // (e) KV bytes per token: the sum of the latent widths x 4 (F32), 576 of 4096 values.
  EXPECT_EQ(spec.BytesPerToken(), widths * 4);
  EXPECT_EQ(widths, 2 * (288 + 288));
  EXPECT_EQ(spec.CompressionName(), "lorc:svd k=8-64 v=8-64, 28.1% KV");  // not monotone: min-max
  float worst = 0;
  for (const Golden& g : GoldenPrompts()) {
    const std::vector<float> want = LastLogits(*full.model.runner, g.prompt_ids, 1 << 20);
    float scale = 0;
    for (float x : want) scale = std::max(scale, std::abs(x));
    ASSERT_GT(scale, 1.0f);
    for (size_t chunk : {size_t{1} << 20, size_t{5}, size_t{1}}) {
      const float diff = MaxAbsDiff(LastLogits(*lorc.model.runner, g.prompt_ids, chunk), want);
      EXPECT_LE(diff, 2e-4f * scale) << g.prompt << ", chunks of " << chunk;
      worst = std::max(worst, diff / scale);
    }
  }
  std::cout << "rank-deficient factors: max |logit difference| / max |logit| " << worst << "\n";
  // Batched prefill + decode steps.
  EXPECT_EQ(Greedy(lorc.model, 16), Greedy(full.model, 16));
}

// Tensor parallelism 2 in one process over Gloo: each rank on its own thread runs the same
// greedy loop (every rank computes the full logits); rank 0's tokens must equal tp 1's.
std::vector<int32_t> GreedyLoop(ModelRunner& r, const std::vector<int32_t>& prompt, int n) {
  std::vector<int32_t> ids = prompt, out;
  int64_t computed = 0;
  for (int i = 0; i < n; ++i) {
    SequenceStep s;
    s.seq_id = 7;
    s.tokens.assign(ids.begin() + computed, ids.end());
    s.num_computed_tokens = computed;
    for (int32_t b = 0; b < r.kv_spec().BlocksForTokens(static_cast<int64_t>(ids.size())); ++b) {
      s.block_table.push_back(b);
    }
    auto step = r.Execute({s});
    EXPECT_OK(step);
    if (!step.ok()) return out;
    const float* row = step->Row(0);
    const int32_t tok = static_cast<int32_t>(std::max_element(row, row + step->vocab_size) - row);
    computed = static_cast<int64_t>(ids.size());
    ids.push_back(tok);
    out.push_back(tok);
  }
  return out;
}

// Latent layers take the unfused input norm in place, on whichever buffer the fused norms before
// them left the stream in (BackendOptions::fused_norm_rows on the CPU: the base class copies the
// stream into the runner's second buffer at every fused add): every golden prompt with its first
// 8 greedy tokens, in chunks of 5 tokens, gives the in-place run's last logits bit for bit.
TEST_F(RandomFactors, FusedNormStreamMatchesInPlaceBitForBit) {
  REQUIRE_TINY_LLAMA();
  Served plain = Load(lorc_dir_->string());
  Served fused = Load(lorc_dir_->string(), 16);
  ASSERT_NE(plain.model.runner, nullptr);
  ASSERT_NE(fused.model.runner, nullptr);
  EXPECT_EQ(plain.model.runner->fused_norm_rows(), 0);
  EXPECT_EQ(fused.model.runner->fused_norm_rows(), 16);
  for (const Golden& g : GoldenPrompts()) {
    std::vector<int32_t> ids = g.prompt_ids;
    ids.insert(ids.end(), g.greedy_ids.begin(), g.greedy_ids.begin() + 8);
    const std::vector<float> want = LastLogits(*plain.model.runner, ids, 5);
    ASSERT_FALSE(want.empty());
    EXPECT_EQ(LastLogits(*fused.model.runner, ids, 5), want);
  }
}

// Two ranks over Gloo in this process (rank 1 on a thread): each creates a backend with `options`
// and a communicator of `group`, then runs fn(rank, backend, comm); the ranks' statuses.
template <typename Fn>
std::array<absl::Status, 2> RunTwoRanks(const std::string& group, const BackendOptions& options, Fn fn) {
  InProcessStore store;
  std::array<absl::Status, 2> status;
  auto rank = [&](int r) {
    status[r] = [&]() -> absl::Status {
      auto backend = CreateBackend(options);
      if (!backend.ok()) return backend.status();
      CommOptions o;
      o.group = group;
      o.hostname_or_iface = "127.0.0.1";
      auto comm = CreateGlooCommunicator({r, 2}, &store, o);
      if (!comm.ok()) return comm.status();
      return fn(r, backend->get(), comm->get());
    }();
  };
  std::thread t1(rank, 1);
  rank(0);
  t1.join();
  return status;
}

// Two ranks over Gloo give one rank's greedy tokens, with the norms unfused and with them fused
// (BackendOptions::fused_norm_rows on the CPU: across ranks each add + norm stores the stream into
// the runner's second buffer, the all-reduce sitting between a projection and its add).
TEST_F(RandomFactors, TensorParallelTwoRanksGiveTheSameTokens) {
  REQUIRE_TINY_LLAMA();
  constexpr int kTokens = 12;
  std::vector<std::vector<int32_t>> want;
  {
    Served one = Load(lorc_dir_->string());
    ASSERT_NE(one.model.runner, nullptr);
    for (const Golden& g : GoldenPrompts()) want.push_back(GreedyLoop(*one.model.runner, g.prompt_ids, kTokens));
  }
  for (const bool fused : {false, true}) {
    SCOPED_TRACE(fused ? "norms fused" : "norms unfused");
    std::vector<std::vector<int32_t>> got[2];
    BackendOptions bo;
    if (fused) bo.fused_norm_rows = 16;
    const auto status = RunTwoRanks(fused ? "lorc_tp_fused" : "lorc_tp", bo,
                                    [&](int r, Backend* backend, Communicator* comm) -> absl::Status {
      auto m = LoadModel({lorc_dir_->string()}, backend, r, 2, comm, Cache());
      if (!m.ok()) return m.status();
      // One KV head per rank: widths of one head.
      if (m->runner->kv_spec().k_width[0] != kRanks[0].first) {
        return absl::InternalError(absl::StrCat("rank ", r, ": k_width ", m->runner->kv_spec().k_width[0]));
      }
      if (m->runner->fused_norm_rows() != (fused ? 16 : 0)) {
        return absl::InternalError(absl::StrCat("rank ", r, ": fused_norm_rows ", m->runner->fused_norm_rows()));
      }
      for (const Golden& g : GoldenPrompts()) got[r].push_back(GreedyLoop(*m->runner, g.prompt_ids, kTokens));
      return absl::OkStatus();
    });
    ASSERT_OK(status[0]);
    ASSERT_OK(status[1]);
    EXPECT_EQ(got[0], want);
    EXPECT_EQ(got[1], want);
  }
}

// A quantized cache's bytes per (layer, side 0 K / 1 V, slot, model-wide KV head): that head's
// codes, then its fp16 scales (kernels/kv_quant.h), for slots [0, num_slots).
using HeadBytes = std::map<std::tuple<int, int, int64_t, int64_t>, std::string>;
void ReadHeadBytes(const ModelRunner& r, int64_t num_slots, HeadBytes* out) {
  const KvCacheSpec& spec = r.kv_spec();
  const kernels::KvQuant q = spec.quant();
  const int64_t nkv = spec.num_kv_heads;
  for (int l = 0; l < spec.num_layers(); ++l) {
    for (int side = 0; side < 2; ++side) {
      const int64_t hw = (side ? spec.v_width[l] : spec.k_width[l]) / nkv;
      void* base = side ? r.kv_cache_layer(l).v : r.kv_cache_layer(l).k;
      const int64_t code_bytes = kernels::KvqHeadCodeBytes(q, hw);
      const int64_t scales = kernels::KvqGroupsPerHead(q, hw) * kernels::KvqScalesPerGroup(q);
      for (int64_t slot = 0; slot < num_slots; ++slot) {
        const uint8_t* c = kernels::KvqTokenCodes(base, q, spec.block_size, nkv, hw, slot);
        const uint16_t* sc = kernels::KvqTokenScales(base, q, spec.block_size, nkv, hw, slot);
        for (int64_t h = 0; h < nkv; ++h) {
          (*out)[{l, side, slot, r.shard().kv_head_begin + h}] =
              std::string(reinterpret_cast<const char*>(c + h * code_bytes), code_bytes) +
              std::string(reinterpret_cast<const char*>(sc + h * scales), 2 * scales);
        }
      }
    }
  }
}

// Every golden prompt followed by its first 8 greedy tokens (fixed inputs, so both degrees see the
// same tokens), run in chunks of 5; the cache bytes after each.
std::vector<HeadBytes> RunGoldenSequences(ModelRunner& r) {
  std::vector<HeadBytes> out;
  for (const Golden& g : GoldenPrompts()) {
    std::vector<int32_t> ids = g.prompt_ids;
    ids.insert(ids.end(), g.greedy_ids.begin(), g.greedy_ids.begin() + 8);
    EXPECT_FALSE(LastLogits(r, ids, 5).empty());
    ReadHeadBytes(r, static_cast<int64_t>(ids.size()), &out.emplace_back());
  }
  return out;
}

// Quantized caches and tensor parallelism (kvstore/README.md): layer 0's K/V latents are
// column-parallel projections of the embeddings, so for a progressive-ranked model TP 2 rank h
// writes exactly TP 1's head-h codes and scales, with fp8, int8 and int4. Deeper layers read the
// all-reduced residual (a different fp32 summation order than TP 1, about 1 ulp) and may round a
// code or an int4 zero point the other way; that is counted, not asserted.
TEST(LorcModelRunnerTest, TensorParallelQuantizedCachesMatchAtLayerZero) {
  REQUIRE_TINY_LLAMA();
  const fs::path dir = Scratch("progressive_lorc");
  RandomFactorDirs(dir, Scratch("progressive_full"), kProgressiveRanks);
  for (const KvCacheDtype dtype : {KvCacheDtype::kFp8, KvCacheDtype::kInt8, KvCacheDtype::kInt4}) {
    SCOPED_TRACE(KvCacheDtypeName(dtype));
    KvCacheOptions kv = Cache();
    kv.kv_cache_dtype = dtype;
    std::vector<HeadBytes> want;
    {
      auto backend = CreateBackend({});
      ASSERT_OK(backend);
      auto m = LoadModel({dir.string()}, backend->get(), 0, 1, nullptr, kv);
      ASSERT_OK(m);
      want = RunGoldenSequences(*m->runner);
    }
    std::vector<HeadBytes> got[2];
    const auto status = RunTwoRanks(absl::StrCat("lorc_tp_", KvCacheDtypeName(dtype)), {},
                                    [&](int r, Backend* backend, Communicator* comm) -> absl::Status {
      auto m = LoadModel({dir.string()}, backend, r, 2, comm, kv);
      if (!m.ok()) return m.status();
      got[r] = RunGoldenSequences(*m->runner);
      return absl::OkStatus();
    });
    ASSERT_OK(status[0]);
    ASSERT_OK(status[1]);
    ASSERT_EQ(got[0].size(), want.size());
    ASSERT_EQ(got[1].size(), want.size());
    int64_t layer0 = 0, deeper = 0, deeper_differ = 0;
    for (size_t p = 0; p < want.size(); ++p) {
      ASSERT_EQ(got[0][p].size() + got[1][p].size(), want[p].size());
      for (const HeadBytes* part : {&got[0][p], &got[1][p]}) {
        for (const auto& [key, bytes] : *part) {
          const auto it = want[p].find(key);
          ASSERT_NE(it, want[p].end());
          if (std::get<0>(key) == 0) {
            ++layer0;
            EXPECT_EQ(bytes, it->second) << "prompt " << p << " layer 0 side " << std::get<1>(key)
                                         << " slot " << std::get<2>(key) << " head " << std::get<3>(key);
          } else {
            ++deeper;
            deeper_differ += bytes != it->second;
          }
        }
      }
    }
    EXPECT_GT(layer0, 0);
    std::cout << KvCacheDtypeName(dtype) << ": layer 0 " << layer0 << " head rows identical; layers 1-7 "
              << deeper_differ << " of " << deeper << " head rows differ between tp 1 and tp 2\n";
  }
}

TEST(LorcModelRunnerTest, RandomWeightsTakeTheFactorShapesOfLorcJson) {
  REQUIRE_TINY_LLAMA();
  const fs::path dir = Scratch("random_weights");
  fs::copy_file(::lorc::testing::TinyLlamaDir() + "/config.json", dir / "config.json");
  std::ofstream(dir / "lorc.json") << LorcJson(kRanks, "whitened-svd").dump();
  auto backend = CreateBackend({});
  ASSERT_OK(backend);
  ModelSource src{dir.string()};
  src.random_weights = true;
  src.seed = 3;
  auto m = LoadModel(src, backend->get(), 0, 1, nullptr, Cache());
  ASSERT_OK(m);
  EXPECT_EQ(m->runner->kv_spec().k_width[2], kKvHeads * 48);
  const std::vector<float> logits = LastLogits(*m->runner, GoldenPrompts()[0].prompt_ids, 4);
  ASSERT_EQ(logits.size(), 4096u);
  for (float x : logits) ASSERT_TRUE(std::isfinite(x));
}

TEST(LorcModelRunnerTest, BadDirectoriesNameTheFieldOrTensor) {
  REQUIRE_TINY_LLAMA();
  auto load = [](const fs::path& dir) -> absl::Status {
    auto backend = CreateBackend({});
    if (!backend.ok()) return backend.status();
    return LoadModel({dir.string()}, backend->get(), 0, 1, nullptr, Cache()).status();
  };
  // A k_up of the wrong shape.
  EXPECT_THAT(load(ExactDir("bad_up", [](Tensors& t, json&) {
                t[L(3, "k_up_proj")].shape = {kKvHeads * kHeadDim / 2, kHeadDim * 2};
              })),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       AllOf(HasSubstr("model.layers.3.self_attn.k_up_proj.weight"), HasSubstr("[256, 128]"))));
  // A missing k_up.
  EXPECT_THAT(load(ExactDir("no_up", [](Tensors& t, json&) { t.erase(L(5, "k_up_proj")); })),
              StatusIs(absl::StatusCode::kNotFound, HasSubstr("model.layers.5.self_attn.k_up_proj.weight")));
  // Ranks in lorc.json that the tensors do not have.
  EXPECT_THAT(load(ExactDir("wrong_rank", [](Tensors&, json& j) { j["layers"][2]["k_rank"] = 64; })),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       AllOf(HasSubstr("model.layers.2.self_attn.k_proj.weight"), HasSubstr("[128, 512]"))));
  // lorc.json inconsistent with config.json.
  EXPECT_THAT(load(ExactDir("wrong_heads", [](Tensors&, json& j) { j["num_kv_heads"] = 4; })),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       AllOf(HasSubstr("lorc.json"), HasSubstr("num_kv_heads: 4 differs from config.json's 2"))));
  EXPECT_THAT(load(ExactDir("bad_rank", [](Tensors&, json& j) { j["layers"][6]["v_rank"] = 129; })),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("layers[6].v_rank: 129 is outside [1, 128]")));
}

// CUDA has the latent kernel (its parity: tests/backend/cuda_latent_attention_test.cc): a LoRC
// model with per-layer ranks loads there.
TEST(LorcModelRunnerTest, CudaLoadsLatentModels) {
  REQUIRE_TINY_LLAMA();
  BackendOptions o;
  o.kind = BackendKind::kCuda;
  auto backend = CreateBackend(o);
  if (!backend.ok()) GTEST_SKIP() << "no CUDA backend: " << backend.status();
  const fs::path dir = Scratch("cuda");
  fs::copy_file(::lorc::testing::TinyLlamaDir() + "/config.json", dir / "config.json");
  std::ofstream(dir / "lorc.json") << LorcJson(kRanks).dump();
  ModelSource src{dir.string()};
  src.random_weights = true;
  EXPECT_OK(LoadModel(src, backend->get(), 0, 1, nullptr, Cache()).status());
}

}  // namespace
}  // namespace lorc
