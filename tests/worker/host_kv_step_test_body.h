// The host KV tier through the step protocol (StepPlan::kv_offloads / kv_loads, executed by
// StepExecutor -> ModelRunner::TransferHostKv) on the fixture model, for the --kv-cache-dtype
// values the backend stores (host_kv_step_test.cc: CPU, all; cuda_host_kv_step_test.cc: CUDA,
// auto and bf16, skipped without a device): a request's blocks written by a real prefill are
// offloaded in the same step in which another request overwrites them, loaded back a step
// later, hold exactly the prefill's bytes again, and the request then decodes the same greedy
// tokens as without any of it. Bad block ids and slots fail the step as a whole, naming the
// list, and change nothing. Loads in the step that reads the blocks and one step ahead of it
// both work. Test-only header: one file of each binary includes it, defines
// HostKvStepBackend() and instantiates HostKvStepTest.
#pragma once

#include <cstring>
#include <ostream>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/fixture_model.h"
#include "tests/testing/fixtures.h"
#include "tests/testing/golden.h"
#include "tests/testing/status_matchers.h"
#include "worker/model_loader.h"
#include "worker/step_executor.h"
#include "backend/cuda_backend.h"

namespace lorc {
namespace host_kv_step_test {

// The backend the including binary runs on (defined there).
BackendKind HostKvStepBackend();

using ::lorc::testing::GoldenPrompts;
using ::lorc::testing::StatusIs;
using ::testing::AllOf;
using ::testing::HasSubstr;

constexpr int32_t kBlockSize = 16;
constexpr int kPromptLen = 40;  // 3 blocks, the last one partly filled
constexpr int kDecodeSteps = 6;

struct DtypeCase {
  const char* name;
  KvCacheDtype dtype;
};

inline void PrintTo(const DtypeCase& c, std::ostream* os) { *os << c.name; }

inline std::string CaseName(const ::testing::TestParamInfo<DtypeCase>& i) { return i.param.name; }

// kPromptLen tokens from the golden prompts (offset: a different prompt).
inline std::vector<int32_t> Prompt(size_t offset) {
  std::vector<int32_t> all;
  for (const auto& g : GoldenPrompts()) all.insert(all.end(), g.prompt_ids.begin(), g.prompt_ids.end());
  std::vector<int32_t> p;
  for (size_t i = 0; p.size() < kPromptLen; ++i) p.push_back(all[(offset + i) % all.size()]);
  return p;
}

inline ScheduledSequence Prefill(int64_t id, const std::vector<int32_t>& prompt, std::vector<int32_t> blocks) {
  ScheduledSequence s;
  s.seq_id = id;
  s.new_token_ids = prompt;
  s.num_scheduled_tokens = static_cast<int32_t>(prompt.size());
  s.new_block_ids = std::move(blocks);
  s.sample = true;
  SamplingParams p;
  p.temperature = 0.0f;
  p.max_tokens = 64;
  s.params = p;
  return s;
}

inline ScheduledSequence Decode(int64_t id, int64_t computed) {
  ScheduledSequence s;
  s.seq_id = id;
  s.num_computed_tokens = computed;
  s.num_scheduled_tokens = 1;
  s.sample = true;
  return s;
}

class HostKvStepTest
    : public ::lorc::testing::FixtureModelTest<::testing::TestWithParam<DtypeCase>> {
 protected:
  // The binary's backend (HostKvStepBackend), not the base's CPU one.
  void SetUp() override {
    REQUIRE_TINY_LLAMA();
    BackendOptions bo;
    bo.kind = HostKvStepBackend();
    auto b = CreateBackend(bo);
    if (!b.ok() && bo.kind == BackendKind::kCuda) {
      auto devices = ListCudaDevices();
      if (absl::IsUnimplemented(b.status()) || !devices.ok() || devices->empty()) {
        GTEST_SKIP() << "no CUDA device (" << b.status() << ")";
      }
    }
    ASSERT_OK(b);
    backend_ = *std::move(b);
  }

  // A runner with `host_bytes` of host tier (0: none) and an executor over it.
  void Load(int64_t host_bytes) {
    KvCacheOptions kv;
    kv.block_size = kBlockSize;
    kv.num_blocks = 8;
    kv.kv_cache_dtype = GetParam().dtype;
    kv.kv_offloading_bytes = host_bytes;
    kv.max_num_seqs = 4;  // few decode graphs to capture on CUDA
    kv.max_num_batched_tokens = 128;
    ASSERT_OK(LoadFixtureModel(kv));
  }

  // Blocks `blocks`' bytes, every layer, K then V (copied out of backend memory).
  std::vector<uint8_t> Bytes(const std::vector<int32_t>& blocks) const {
    std::vector<uint8_t> out;
    const ModelRunner& r = *model_.runner;
    for (int l = 0; l < r.kv_spec().num_layers(); ++l) {
      const KvLayer& c = r.kv_cache_layer(l);
      for (bool v : {false, true}) {
        const int64_t n = KvLayerBlockBytes(c, v, kBlockSize);
        const uint8_t* base = static_cast<const uint8_t*>(v ? c.v : c.k);
        for (int32_t b : blocks) {
          std::vector<uint8_t> part(static_cast<size_t>(n));
          EXPECT_OK(backend_->CopyToHost(part.data(), base + b * n, part.size()));
          EXPECT_OK(backend_->Synchronize());
          out.insert(out.end(), part.begin(), part.end());
        }
      }
    }
    return out;
  }

  int32_t Token(const StepResult& r, int64_t id) {
    for (const SampledToken& t : r.sampled) {
      if (t.seq_id == id) return t.token;
    }
    ADD_FAILURE() << "no token for " << id;
    return -1;
  }
};

TEST_P(HostKvStepTest, OffloadedBlocksComeBackBitExactAndDecodeTheSameTokens) {
  const std::vector<int32_t> a = Prompt(0), b = Prompt(17);
  const std::vector<int32_t> blocks = {0, 1, 2};
  // Reference: A prefilled and decoded with nothing else going on, no host tier.
  Load(0);
  std::vector<int32_t> want;
  {
    StepPlan p{1, {Prefill(1, a, blocks)}};
    ASSERT_OK_AND_ASSIGN(StepResult r, exec_->Execute(p));
    want.push_back(Token(r, 1));
    for (int i = 0; i < kDecodeSteps; ++i) {
      StepPlan d{static_cast<uint64_t>(2 + i), {Decode(1, kPromptLen + i)}};
      ASSERT_OK_AND_ASSIGN(StepResult rd, exec_->Execute(d));
      want.push_back(Token(rd, 1));
    }
  }

  Load(16 << 20);
  ASSERT_GE(model_.runner->num_host_blocks(), 8);
  std::vector<int32_t> got;
  StepPlan p1{1, {Prefill(1, a, blocks)}};
  ASSERT_OK_AND_ASSIGN(StepResult r1, exec_->Execute(p1));
  got.push_back(Token(r1, 1));
  const std::vector<uint8_t> a_bytes = Bytes(blocks);
  std::vector<std::vector<uint8_t>> a_block;
  for (int32_t blk : blocks) a_block.push_back(Bytes({blk}));
  // Step 2: A's blocks go to slots 5, 3, 7 while B is prefilled into the same blocks (the device
  // pool reused them): the offload must finish before B's forward pass overwrites them.
  StepPlan p2{2, {Prefill(2, b, blocks)}};
  p2.kv_offloads = {{0, 5}, {1, 3}, {2, 7}};
  ASSERT_OK_AND_ASSIGN(StepResult r2, exec_->Execute(p2));
  ASSERT_TRUE(r2.failed.empty()) << r2.failed[0].status;
  ASSERT_NE(Bytes(blocks), a_bytes) << "B did not overwrite A's blocks: the test proves nothing";
  // The slots hold A's blocks exactly (a slot is one block of every layer, K then V).
  const HostKvStorage& host = model_.runner->host_kv();
  for (auto [block, slot] : {std::pair{0, 5}, std::pair{1, 3}, std::pair{2, 7}}) {
    ASSERT_EQ(static_cast<int64_t>(a_block[block].size()), host.slot_bytes());
    EXPECT_EQ(std::vector<uint8_t>(host.slot(slot), host.slot(slot) + host.slot_bytes()), a_block[block])
        << "slot " << slot;
  }
  // Step 3: B ends; A's blocks come back from the host.
  StepPlan p3{3, {}};
  p3.finished = {2};
  p3.kv_loads = {{0, 5}, {1, 3}, {2, 7}};
  ASSERT_OK(exec_->Execute(p3).status());
  EXPECT_EQ(Bytes(blocks), a_bytes) << "the host tier did not return the bytes it was given";
  for (int i = 0; i < kDecodeSteps; ++i) {
    StepPlan d{static_cast<uint64_t>(4 + i), {Decode(1, kPromptLen + i)}};
    ASSERT_OK_AND_ASSIGN(StepResult rd, exec_->Execute(d));
    got.push_back(Token(rd, 1));
  }
  EXPECT_EQ(got, want);
}

// Loads in the same step as the forward pass that reads them, into blocks other than the ones
// offloaded: A's prefix is parked on the host, its device blocks are reused by B, and A
// continues after its blocks are loaded back in the step that decodes it.
TEST_P(HostKvStepTest, LoadInTheStepThatReadsTheBlocks) {
  const std::vector<int32_t> a = Prompt(5), b = Prompt(29);
  const std::vector<int32_t> blocks = {3, 4, 5};
  Load(0);
  std::vector<int32_t> want;
  {
    ASSERT_OK_AND_ASSIGN(StepResult r, exec_->Execute(StepPlan{1, {Prefill(1, a, blocks)}}));
    want.push_back(Token(r, 1));
    ASSERT_OK_AND_ASSIGN(StepResult rd, exec_->Execute(StepPlan{2, {Decode(1, kPromptLen)}}));
    want.push_back(Token(rd, 1));
  }
  Load(16 << 20);
  std::vector<int32_t> got;
  ASSERT_OK_AND_ASSIGN(StepResult r1, exec_->Execute(StepPlan{1, {Prefill(1, a, blocks)}}));
  got.push_back(Token(r1, 1));
  StepPlan p2{2, {Prefill(2, b, blocks)}};
  p2.kv_offloads = {{3, 0}, {4, 1}, {5, 2}};
  ASSERT_OK(exec_->Execute(p2).status());
  StepPlan p3{3, {Decode(1, kPromptLen)}};
  p3.finished = {2};
  p3.kv_loads = {{3, 0}, {4, 1}, {5, 2}};
  ASSERT_OK_AND_ASSIGN(StepResult r3, exec_->Execute(p3));
  got.push_back(Token(r3, 1));
  EXPECT_EQ(got, want);
}

// A load one step ahead (a prefetch): it overlaps with a forward pass that does not touch the
// loaded blocks, and the step that reads them comes after it has completed.
TEST_P(HostKvStepTest, LoadOneStepAheadOfTheStepThatReadsTheBlocks) {
  const std::vector<int32_t> a = Prompt(3), b = Prompt(21), c = Prompt(11);
  Load(0);
  ASSERT_OK_AND_ASSIGN(StepResult w0, exec_->Execute(StepPlan{1, {Prefill(1, a, {0, 1, 2})}}));
  ASSERT_OK_AND_ASSIGN(StepResult w1, exec_->Execute(StepPlan{2, {Decode(1, kPromptLen)}}));
  Load(16 << 20);
  ASSERT_OK_AND_ASSIGN(StepResult r1, exec_->Execute(StepPlan{1, {Prefill(1, a, {0, 1, 2})}}));
  EXPECT_EQ(Token(r1, 1), Token(w0, 1));
  StepPlan p2{2, {Prefill(2, b, {0, 1, 2})}};  // B reuses A's blocks: A goes to the host
  p2.kv_offloads = {{0, 4}, {1, 5}, {2, 6}};
  ASSERT_OK(exec_->Execute(p2).status());
  StepPlan p3{3, {Prefill(3, c, {3, 4, 5})}};  // C runs while A's blocks come back
  p3.finished = {2};
  p3.kv_loads = {{0, 4}, {1, 5}, {2, 6}};
  ASSERT_OK_AND_ASSIGN(StepResult r3, exec_->Execute(p3));
  ASSERT_TRUE(r3.failed.empty()) << r3.failed[0].status;
  ASSERT_OK_AND_ASSIGN(StepResult r4, exec_->Execute(StepPlan{4, {Decode(1, kPromptLen)}}));
  EXPECT_EQ(Token(r4, 1), Token(w1, 1));
}

TEST_P(HostKvStepTest, BadIdsFailTheStepAndChangeNothing) {
  Load(16 << 20);
  const int32_t slots = model_.runner->num_host_blocks();
  const std::vector<int32_t> a = Prompt(0);
  ASSERT_OK(exec_->Execute(StepPlan{1, {Prefill(1, a, {0, 1, 2})}}).status());
  const std::vector<uint8_t> before = Bytes({0, 1, 2});
  StepPlan bad{2, {Decode(1, kPromptLen)}};
  bad.kv_offloads = {{0, 0}};
  bad.kv_loads = {{1, 0}, {2, slots}};
  EXPECT_THAT(exec_->Execute(bad).status(),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       AllOf(HasSubstr("kv_loads 1"), HasSubstr("outside the host KV pool"))));
  bad.kv_loads = {};
  bad.kv_offloads = {{0, 0}, {8, 1}};
  EXPECT_THAT(exec_->Execute(bad).status(),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       AllOf(HasSubstr("kv_offloads 1"), HasSubstr("block 8 outside the cache of 8"))));
  EXPECT_EQ(Bytes({0, 1, 2}), before);
  // The step id was not consumed and A's state is intact: the corrected step runs.
  bad.kv_offloads = {{0, 0}};
  ASSERT_OK_AND_ASSIGN(StepResult r, exec_->Execute(bad));
  EXPECT_TRUE(r.failed.empty());
  EXPECT_EQ(r.sampled.size(), 1u);
}

TEST_P(HostKvStepTest, AWorkerWithoutAHostTierRefusesCopies) {
  Load(0);
  EXPECT_EQ(model_.runner->num_host_blocks(), 0);
  StepPlan p{1, {}};
  p.kv_loads = {{0, 0}};
  EXPECT_THAT(exec_->Execute(p).status(),
              StatusIs(absl::StatusCode::kFailedPrecondition,
                       AllOf(HasSubstr("kv_loads"), HasSubstr("--kv-offloading-size"))));
}

TEST_P(HostKvStepTest, ATierTooSmallForOneBlockNamesTheFlag) {
  KvCacheOptions kv;
  kv.block_size = kBlockSize;
  kv.num_blocks = 8;
  kv.kv_cache_dtype = GetParam().dtype;
  kv.kv_offloading_bytes = 1000;
  EXPECT_THAT(LoadFixtureModel(kv),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("--kv-offloading-size")));
}

}  // namespace host_kv_step_test
}  // namespace lorc
