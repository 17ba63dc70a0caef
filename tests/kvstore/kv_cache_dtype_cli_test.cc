// --kv-cache-dtype end to end on the fixture model (lorcserve as a process): a bad value names the
// flag; a LoRC model (`compress --ranks 64:64`) with an int4 cache evaluates, and eval --json
// reports the dtype, the bytes per token with the scales counted and the capacity in tokens.
#include <cmath>
#include <filesystem>
#include <string>

#include "common/json_util.h"
#include "gtest/gtest.h"
#include "tests/testing/fixtures.h"
#include "tests/testing/run_lorcserve.h"
#include "tests/testing/scratch_dir.h"

namespace lorc {
namespace {

namespace fs = std::filesystem;
using testing::RunLorcserve;

constexpr char kScratch[] = "lorc_kvdtype";
const auto* const kCleanup = ::testing::AddGlobalTestEnvironment(new testing::ScratchCleanup(kScratch));

TEST(KvCacheDtypeCli, BadValueNamesTheFlag) {
  REQUIRE_TINY_LLAMA();
  const testing::RunResult r = RunLorcserve(
      {"eval", "--model", testing::TinyLlamaDir(), "--kv-cache-dtype", "int3", "--limit", "1"});
  EXPECT_EQ(r.exit_code, 2) << r;
  EXPECT_NE(r.err.find("--kv-cache-dtype: 'int3'"), std::string::npos) << r;
  const testing::RunResult help = RunLorcserve({"eval", "--help"});
  EXPECT_NE(help.out.find("--kv-cache-dtype"), std::string::npos) << help.out;
}

TEST(KvCacheDtypeCli, LorcLatentsWithInt4CacheEvaluate) {
  REQUIRE_TINY_LLAMA();
  const fs::path out = testing::MakeScratchDir(kScratch, "lorc") / "r64";
  testing::RunResult r = RunLorcserve(
      {"compress", "--model", testing::TinyLlamaDir(), "--out", out.string(), "--ranks", "64:64"});
  ASSERT_EQ(r.exit_code, 0) << r;
  const std::string fixture = testing::TinyLlamaDir();
  r = RunLorcserve({"eval", "--model", out.string(), "--kv-cache-dtype", "int4", "--json", "--limit", "1",
                    "--kv-cache-mb", "64", "--ppl", fixture + "/eval_ppl_windows.jsonl", "--passkey",
                    fixture + "/eval_passkey.jsonl"});
  ASSERT_EQ(r.exit_code, 0) << r;
  absl::StatusOr<nlohmann::json> j = ParseJson(r.out, "eval --json");
  ASSERT_TRUE(j.ok()) << j.status() << "\n" << r.out;
  EXPECT_EQ((*j)["kv_cache_dtype"], "int4");
  EXPECT_EQ((*j)["kv_dtype"], "int4");
  EXPECT_EQ((*j)["kv_compression"], "lorc:svd k=64 v=64, 50% KV, int4");
  // 8 layers x (K, V) x (2 KV heads x 64 latents / 2 bytes + 2 heads x 2 groups x fp16 scale and
  // zero point) = 8 x 2 x (64 + 16).
  EXPECT_EQ((*j)["kv_bytes_per_token"], 1280);
  EXPECT_EQ((*j)["kv_capacity_tokens"], (int64_t{64} << 20) / (1280 * 16) * 16);
  const double ppl = (*j)["ppl"];
  EXPECT_TRUE(std::isfinite(ppl) && ppl > 1.0 && ppl < 20.0) << ppl;  // uncompressed F32: 4.92
  EXPECT_EQ((*j)["passkey_n"].size(), 4u) << r.out;
}

// CUDA serves quantized caches (kernels/kv_quant.cuh; parity in tests/backend/cuda_*_test.cc):
// an int8 eval of the fixture loads and reports the dtype and its bytes (skipped where no CUDA
// backend can be created).
TEST(KvCacheDtypeCli, CudaEvaluatesQuantizedCaches) {
  REQUIRE_TINY_LLAMA();
  const std::string fixture = testing::TinyLlamaDir();
  const testing::RunResult r =
      RunLorcserve({"eval", "--model", fixture, "--backend", "cuda", "--kv-cache-dtype", "int8", "--json", "--limit",
                    "1", "--ppl", fixture + "/eval_ppl_windows.jsonl", "--passkey", fixture + "/eval_passkey.jsonl"});
  if (r.exit_code != 0 && r.err.find("--kv-cache-dtype") == std::string::npos &&
      r.err.find("CUDA") != std::string::npos) {
    GTEST_SKIP() << "no CUDA backend here: " << r.err;
  }
  ASSERT_EQ(r.exit_code, 0) << r;
  absl::StatusOr<nlohmann::json> j = ParseJson(r.out, "eval --json");
  ASSERT_TRUE(j.ok()) << j.status() << "\n" << r.out;
  EXPECT_EQ((*j)["backend"], "cuda");
  EXPECT_EQ((*j)["kv_dtype"], "int8");
  const double ppl = (*j)["ppl"];
  EXPECT_TRUE(std::isfinite(ppl) && ppl > 1.0 && ppl < 20.0) << ppl;
}

}  // namespace
}  // namespace lorc
