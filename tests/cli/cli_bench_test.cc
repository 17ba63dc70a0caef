// End-to-end tests of `lorcserve bench --model` (the offline engine benchmark; cli/bench_engine.cc),
// run as a user runs it: a child process whose stdout (JSON lines), stderr and exit code are
// checked, with the tiny-llama-a fixture. Split from cli_test.cc (the binary's other commands).
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/json_util.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/cli/cli_test_util.h"

namespace lorc {
namespace {

using namespace ::lorc::cli_test;  // Tiny, Json, Lorcserve, CliTest
using ::testing::HasSubstr;
using ::testing::Not;

#ifdef LORC_WITH_GRPC
// bench --model: the offline engine benchmark prints one JSON object a line (config, each
// decode (batch, context), each prefill length), skips a shape the KV cache cannot hold, and
// frees every block (it fails otherwise). Floors against the ceilings given as flags (the CPU
// has no row in common/device_ceilings.h).
TEST_F(CliTest, EngineBenchPrintsDecodeAndPrefillLinesAndSkipsWhatDoesNotFit) {
  const RunResult r = Lorcserve({"bench", "--model", Tiny(), "--decode-batches", "1,16",
                                 "--contexts", "8,100", "--prefill", "16", "--steps", "3",
                                 "--warmup-steps", "1", "--prefill-reps", "1", "--num-blocks", "8",
                                 "--block-size", "16", "--threads", "1", "--hbm-tbps", "4.275",
                                 "--gemm-peak-tflops", "696", "--json"});
  ASSERT_EQ(r.exit_code, 0) << r;
  std::vector<json> lines;
  ASSERT_NO_FATAL_FAILURE(JsonLines(r, &lines));
  ASSERT_EQ(lines.size(), 1u + 4u + 1u) << r;  // config, 2 x 2 decode shapes, 1 prefill
  EXPECT_EQ(lines[0]["kv_policy"], "none");
  EXPECT_EQ(lines[0]["kind"], "config");
  EXPECT_EQ(lines[0]["kv_capacity_tokens"], 8 * 16);
  EXPECT_EQ(lines[0]["weight_bytes_read"], lines[0]["params"].get<double>() * 4 - 4096.0 * 512 * 4);
  EXPECT_EQ(lines[0]["hbm_tbps"], 4.275);
  EXPECT_EQ(lines[0]["gemm_peak_tflops"], 696.0);
  EXPECT_EQ(lines[0]["ceilings_from"], "flags");
  int measured = 0, skipped = 0;
  for (size_t i = 1; i < 5; ++i) {
    const json& j = lines[i];
    EXPECT_EQ(j["kind"], "decode");
    if (j.contains("skipped")) {
      ++skipped;
      EXPECT_EQ(j["batch"], 16) << j;
      continue;
    }
    ++measured;
    EXPECT_EQ(j["steps"], 3) << j;
    EXPECT_GT(j["ms_per_step"].get<double>(), 0.0) << j;
    EXPECT_GT(j["pct_of_floor"].get<double>(), 0.0) << j;
    EXPECT_LT(j["floor_ms"].get<double>(), j["ms_per_step"].get<double>()) << j;
  }
  EXPECT_EQ(measured, 2);  // batch 1 at contexts 8 and 100 (7 blocks); batch 16 needs > 8 blocks
  EXPECT_EQ(skipped, 2);
  EXPECT_EQ(lines[5]["kind"], "prefill");
  EXPECT_EQ(lines[5]["tokens"], 16);
  EXPECT_GT(lines[5]["ttft_ms"].get<double>(), 0.0);
  EXPECT_GT(lines[5]["tokens_per_s"].get<double>(), 0.0);
  EXPECT_GT(lines[5]["pct_of_gemm_peak"].get<double>(), 0.0);

  const RunResult bad = Lorcserve({"bench", "--model", Tiny(), "--decode-batches", "1,0"});
  EXPECT_NE(bad.exit_code, 0);
  EXPECT_THAT(bad.err, HasSubstr("--decode-batches: 0"));
  for (const char* flag : {"--hbm-tbps", "--gemm-peak-tflops"}) {
    const RunResult zero = Lorcserve({"bench", "--model", Tiny(), flag, "0"});
    EXPECT_NE(zero.exit_code, 0) << flag;
    EXPECT_THAT(zero.err, HasSubstr(std::string(flag) + ": 0 is not in [1e-6, 1e6]"));
  }
}

// --working-set without --mixed-requests runs its documented default (4 requests per context);
// it was refused ("--mixed-requests: 0 is outside the range", a tester).
TEST_F(CliTest, EngineBenchWorkingSetRunsWithItsDefaultRequestCount) {
  const RunResult r = Lorcserve({"bench", "--model", Tiny(), "--threads", "1", "--num-blocks", "16",
                                 "--shared-prefix", "16", "--question", "4", "--working-set", "1",
                                 "--chat-output", "2", "--json"});
  ASSERT_EQ(r.exit_code, 0) << r;
  const std::string last = r.out.substr(r.out.rfind('{'));
  const json j = json::parse(last, nullptr, /*allow_exceptions=*/false);
  ASSERT_FALSE(j.is_discarded()) << r;
  EXPECT_EQ(j["kind"], "mixed_working_set");
  EXPECT_EQ(j["requests"].get<int>(), 4 * j["contexts"].get<int>()) << j;
}

// One ceiling given on a device without a row: that floor only, and the config line says which
// is missing. Values outside (0, 1e6] (inf, NaN, 0) are refused naming the flag.
TEST_F(CliTest, EngineBenchOneCeilingGivesOneFloorAndOutOfRangeCeilingsAreRefused) {
  const RunResult r = Lorcserve({"bench", "--model", Tiny(), "--decode-batches", "1", "--contexts", "16",
                                 "--prefill", "16", "--steps", "2", "--warmup-steps", "1", "--prefill-reps", "1",
                                 "--threads", "1", "--hbm-tbps", "1", "--json"});
  ASSERT_EQ(r.exit_code, 0) << r;
  std::vector<json> lines;
  ASSERT_NO_FATAL_FAILURE(JsonLines(r, &lines));
  ASSERT_EQ(lines.size(), 3u) << r;
  EXPECT_EQ(lines[0]["hbm_tbps"], 1.0);
  EXPECT_FALSE(lines[0].contains("gemm_peak_tflops")) << lines[0];
  EXPECT_THAT(lines[0]["ceilings_from"].get<std::string>(), HasSubstr("no prefill floor (--gemm-peak-tflops)"));
  EXPECT_THAT(lines[0]["ceilings_from"].get<std::string>(), Not(HasSubstr("no decode floor")));
  EXPECT_TRUE(lines[1].contains("floor_ms")) << lines[1];
  EXPECT_FALSE(lines[2].contains("pct_of_gemm_peak")) << lines[2];
  for (const char* v : {"inf", "nan", "-1", "1e7", "1e-320"}) {
    const RunResult bad = Lorcserve({"bench", "--model", Tiny(), "--gemm-peak-tflops", v});
    EXPECT_NE(bad.exit_code, 0) << v;
    EXPECT_THAT(bad.err, HasSubstr(absl::StrCat("--gemm-peak-tflops: ", v, " is not in [1e-6, 1e6]"))) << bad;
  }
  const RunResult huge = Lorcserve({"bench", "--model", Tiny(), "--shared-prefix", "16", "--working-set", "1e9"});
  EXPECT_NE(huge.exit_code, 0);
  EXPECT_THAT(huge.err, HasSubstr("--working-set: 1e9 is not in (0, 1000]")) << huge;
}

// A flag of one kind of run given to another is refused naming it (a tester ran --chat-turns
// without --shared-prefix and got the decode table, exit 0), before the model loads.
TEST_F(CliTest, EngineBenchRefusesFlagsOfAnotherRun) {
  const std::vector<std::pair<std::vector<std::string>, std::string>> cases = {
      {{"--chat-turns", "3"}, "--chat-turns: needs --shared-prefix"},
      {{"--working-set", "2"}, "--working-set: needs --shared-prefix"},
      {{"--question", "5"}, "--question: needs --shared-prefix"},
      {{"--shared-prefix", "8", "--chat-turns", "2", "--working-set", "2"}, "--chat-turns and --working-set"},
      {{"--shared-prefix", "8", "--mixed-requests", "2"}, "--mixed-requests: needs --working-set"},
      {{"--shared-prefix", "8", "--chat-output", "2"}, "--chat-output: needs --chat-turns or --working-set"},
      {{"--shared-prefix", "8", "--chat-turns", "2", "--prefix-reps", "2"}, "--prefix-reps: not used by --chat-turns"},
      {{"--shared-prefix", "8", "--steps", "3"}, "--steps: not used with --shared-prefix"},
      {{"--lm-head", "split"}, "--lm-head: only with --local-workers"},
  };
  for (const auto& [flags, message] : cases) {
    std::vector<std::string> args = {"bench", "--model", Tiny()};
    args.insert(args.end(), flags.begin(), flags.end());
    const RunResult r = Lorcserve(args);
    EXPECT_EQ(r.exit_code, 2) << r;
    EXPECT_THAT(r.err, HasSubstr(message)) << r;
    EXPECT_THAT(r.err, Not(HasSubstr("weights:"))) << r;  // refused before loading
  }
}

// The random prompts take ids from 3 up: a vocabulary of 3 or fewer ids is refused naming the
// field (it divided by zero: SIGFPE, a tester), and a shape held back by --max-num-seqs says so.
TEST_F(CliTest, EngineBenchRefusesATinyVocabularyAndNamesWhatSkipsAShape) {
  const std::filesystem::path dir = ScratchDir() / "vocab3";
  std::filesystem::create_directories(dir);
  absl::StatusOr<json> config = ReadJsonFile(Tiny() + "/config.json");
  ASSERT_TRUE(config.ok()) << config.status();
  (*config)["vocab_size"] = 3;
  (*config)["bos_token_id"] = 1;
  (*config)["eos_token_id"] = 2;
  std::ofstream(dir / "config.json") << config->dump(2);
  for (const char* run : {"--shared-prefix", "--prefill"}) {
    const RunResult r = Lorcserve({"bench", "--model", dir.string(), "--random-weights", "--threads", "1", run, "8"});
    EXPECT_EQ(r.exit_code, 2) << r;
    EXPECT_THAT(r.err, HasSubstr("config.json vocab_size 3")) << r;
    EXPECT_THAT(r.err, Not(HasSubstr("weights:"))) << r;  // before loading
  }
  const RunResult r = Lorcserve({"bench", "--model", Tiny(), "--decode-batches", "4", "--contexts", "16", "--prefill",
                                 "16", "--steps", "2", "--warmup-steps", "1", "--prefill-reps", "1", "--threads", "1",
                                 "--max-num-seqs", "2"});
  ASSERT_EQ(r.exit_code, 0) << r;
  EXPECT_THAT(r.out, HasSubstr("skipped (max_num_seqs)")) << r;
}

// The config line names the KV policy a benchmark ran under (a saved result says which ran).
TEST_F(CliTest, EngineBenchNamesItsKvPolicy) {
  const RunResult r = Lorcserve({"bench", "--model", Tiny(), "--decode-batches", "1", "--contexts", "16",
                                 "--prefill", "16", "--steps", "2", "--warmup-steps", "1", "--prefill-reps", "1",
                                 "--threads", "1", "--kv-policy", "mikv", "--kv-token-budget", "30%", "--json"});
  ASSERT_EQ(r.exit_code, 0) << r;
  const json cfg = json::parse(r.out.substr(0, r.out.find('\n')), nullptr, /*allow_exceptions=*/false);
  ASSERT_FALSE(cfg.is_discarded()) << r;
  EXPECT_EQ(cfg["kind"], "config");
  EXPECT_THAT(cfg["kv_policy"].get<std::string>(), HasSubstr("mikv-int4 budget 30%"));
}

// bench --model --local-workers 2: the same benchmark with the model split over two worker
// processes (Gloo on the CPU backend), driven through a WorkerGroup; the config line says so and
// halves the per-rank KV bytes; every figure is positive and every block is free at the end
// (exit 0). A bad worker count names the flag.
TEST_F(CliTest, EngineBenchRunsOverLocalWorkers) {
  const RunResult r = Lorcserve({"bench", "--model", Tiny(), "--local-workers", "2",
                                 "--decode-batches", "1,2", "--contexts", "16", "--prefill", "16",
                                 "--steps", "2", "--warmup-steps", "1", "--prefill-reps", "1",
                                 "--threads", "1", "--json"});
  ASSERT_EQ(r.exit_code, 0) << r;
  std::vector<json> lines;
  ASSERT_NO_FATAL_FAILURE(JsonLines(r, &lines));
  ASSERT_EQ(lines.size(), 1u + 2u + 1u) << r;  // config, 2 decode shapes, 1 prefill
  const json& cfg = lines[0];
  EXPECT_EQ(cfg["kind"], "config");
  EXPECT_EQ(cfg["tensor_parallel_size"], 2);
  EXPECT_EQ(cfg["shard_lm_head"], false);
  EXPECT_EQ(cfg["backend"], "cpu");
  // tiny-llama-a: 8 layers x 2 KV heads x 128 x (K, V) x fp32, one KV head per rank.
  EXPECT_EQ(cfg["kv_bytes_per_token"], 8 * 1 * 128 * 2 * 4);
  // Per rank: everything but the embedding and the replicated LM head halved, plus that head.
  const double head = 4096.0 * 512;
  EXPECT_EQ(cfg["weight_bytes_read"], ((cfg["params"].get<double>() - 2 * head) / 2 + head) * 4);
  EXPECT_THAT(cfg["floor_assumes"].get<std::string>(), HasSubstr("split 2 ways"));
  // No ceilings given and none known for a CPU: no floor, and the config line says why.
  EXPECT_FALSE(cfg.contains("hbm_tbps")) << cfg;
  EXPECT_THAT(cfg["ceilings_from"].get<std::string>(), HasSubstr("no row in common/device_ceilings.h"));
  for (size_t i = 1; i < 3; ++i) {
    const json& j = lines[i];
    EXPECT_EQ(j["kind"], "decode") << j;
    EXPECT_EQ(j["batch"], i) << j;
    EXPECT_EQ(j["steps"], 2) << j;
    for (const char* k : {"ms_per_step", "tokens_per_s", "fill_s"}) {
      ASSERT_TRUE(j.contains(k)) << j;
      EXPECT_GT(j[k].get<double>(), 0.0) << k << " " << j;
    }
    EXPECT_FALSE(j.contains("floor_ms")) << j;
    EXPECT_FALSE(j.contains("pct_of_floor")) << j;
  }
  EXPECT_EQ(lines[3]["kind"], "prefill");
  for (const char* k : {"ttft_ms", "tokens_per_s", "tflops"}) {
    ASSERT_TRUE(lines[3].contains(k)) << lines[3];
    EXPECT_GT(lines[3][k].get<double>(), 0.0) << k << " " << lines[3];
  }
  EXPECT_FALSE(lines[3].contains("pct_of_gemm_peak")) << lines[3];

  const RunResult zero = Lorcserve({"bench", "--model", Tiny(), "--local-workers", "0"});
  EXPECT_EQ(zero.exit_code, 2) << zero;
  EXPECT_THAT(zero.err, HasSubstr("--local-workers: 0"));
  // Three ranks cannot split tiny-llama-a's 4 heads: refused before any worker starts.
  const RunResult three = Lorcserve({"bench", "--model", Tiny(), "--local-workers", "3"});
  EXPECT_EQ(three.exit_code, 2) << three;
  EXPECT_THAT(three.err, HasSubstr("--local-workers 3: tensor parallelism 3"));
}
#endif

TEST_F(CliTest, BenchSharedPrefixAndChatReportTheCache) {
  RunResult r = Lorcserve({"bench", "--model", Tiny(), "--shared-prefix", "64", "--question", "8",
                           "--prefix-reps", "2", "--json"});
  ASSERT_EQ(r.exit_code, 0) << r;
  json j = Json(r);
  EXPECT_EQ(j["kind"], "shared_prefix");
  EXPECT_EQ(j["first_cached_prompt_tokens"], 0);
  EXPECT_EQ(j["later_cached_prompt_tokens"], 64);
  r = Lorcserve({"bench", "--model", Tiny(), "--shared-prefix", "40", "--question", "10",
                 "--chat-turns", "3", "--chat-output", "4", "--json"});
  ASSERT_EQ(r.exit_code, 0) << r;
  j = Json(r);
  EXPECT_EQ(j["kind"], "chat");
  EXPECT_EQ(j["prompt_tokens"], 50 + 64 + 78);
  // Turn 2 finds 48 of its 64 tokens (3 blocks), turn 3 64 of 78.
  EXPECT_EQ(j["prompt_tokens_computed"], 50 + 16 + 14);
  r = Lorcserve({"bench", "--model", Tiny(), "--shared-prefix", "40", "--question", "10",
                 "--chat-turns", "3", "--chat-output", "4", "--no-enable-prefix-caching", "--json"});
  ASSERT_EQ(r.exit_code, 0) << r;
  EXPECT_EQ(Json(r)["prompt_tokens_computed"], 50 + 64 + 78);
}

TEST_F(CliTest, PrefixCachingFlagsAreChecked) {
  RunResult r = Lorcserve({"bench", "--model", Tiny(), "--shared-prefix", "16",
                           "--enable-prefix-caching", "--no-enable-prefix-caching"});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_THAT(r.err, HasSubstr("contradict"));
  r = Lorcserve({"bench", "--model", Tiny(), "--shared-prefix", "16", "--session-ttl-s", "0"});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_THAT(r.err, HasSubstr("--session-ttl-s"));
  r = Lorcserve({"bench", "--model", Tiny(), "--shared-prefix", "16", "--max-session-kv-fraction", "2"});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_THAT(r.err, HasSubstr("--max-session-kv-fraction"));
  // Session settings with prefix caching off contradict it: the error names both flags.
  for (const char* flag : {"--session-ttl-s", "--max-session-kv-fraction"}) {
    r = Lorcserve({"bench", "--model", Tiny(), "--shared-prefix", "16", "--no-enable-prefix-caching",
                   flag, "0.5"});
    EXPECT_NE(r.exit_code, 0) << flag;
    EXPECT_THAT(r.err, HasSubstr(flag));
    EXPECT_THAT(r.err, HasSubstr("--no-enable-prefix-caching"));
  }
  // So does a host tier, which only holds blocks the prefix cache evicted (accepted and never used
  // before, 2026-12-05); an explicit 0 (no tier) is no contradiction.
  r = Lorcserve({"bench", "--model", Tiny(), "--shared-prefix", "16", "--no-enable-prefix-caching",
                 "--kv-offloading-size", "0.01"});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_THAT(r.err, HasSubstr("--kv-offloading-size and --no-enable-prefix-caching contradict"));
  r = Lorcserve({"bench", "--model", Tiny(), "--shared-prefix", "16", "--question", "4", "--no-enable-prefix-caching",
                 "--kv-offloading-size", "0", "--json"});
  EXPECT_EQ(r.exit_code, 0) << r;
}

}  // namespace
}  // namespace lorc
