// `lorcserve compress` as a process: flag errors name the flag, --help, --out refusal and --force,
// a JSONL --calib file.
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include "common/json_util.h"
#include "gtest/gtest.h"
#include "tests/testing/fixtures.h"
#include "tests/testing/run_lorcserve.h"

namespace lorc {
namespace {

namespace fs = std::filesystem;
using testing::RunLorcserve;

std::string Tmp(const std::string& name) {
  const fs::path p = fs::temp_directory_path() / ("lorc_ccli_" + std::to_string(::getpid()) + "_" + name);
  fs::remove_all(p);
  return p.string();
}

TEST(CompressCli, HelpListsTheFlags) {
  const testing::RunResult r = RunLorcserve({"compress", "--help"});
  ASSERT_EQ(r.exit_code, 0) << r;
  for (const char* f : {"--kv-ratio", "--max-ppl-increase", "--search-chunks", "--ranks", "--schedule",
                        "--whiten", "--calib", "--tp", "--force"}) {
    EXPECT_NE(r.out.find(f), std::string::npos) << f << "\n" << r.out;
  }
}

TEST(CompressCli, ErrorsNameTheFlag) {
  REQUIRE_TINY_LLAMA();
  const std::string m = testing::TinyLlamaDir(), out = Tmp("err");
  const std::vector<std::pair<std::vector<std::string>, std::string>> cases = {
      {{"compress", "--model", m, "--kv-ratio", "0.5"}, "--out"},
      {{"compress", "--model", m, "--out", out, "--kv-ratio", "1.5"}, "--kv-ratio"},
      {{"compress", "--model", m, "--out", out, "--kv-ratio", "0"}, "--kv-ratio"},
      {{"compress", "--model", m, "--out", out, "--kv-ratio", "0.5", "--ranks", "64:64"}, "--ranks"},
      {{"compress", "--model", m, "--out", out}, "--kv-ratio"},
      {{"compress", "--model", m, "--out", out, "--ranks", "64"}, "--ranks"},
      {{"compress", "--model", m, "--out", out, "--ranks", "64:256"}, "--ranks"},
      {{"compress", "--model", m, "--out", out, "--kv-ratio", "0.5", "--tp", "3"}, "--tp"},
      {{"compress", "--model", m, "--out", out, "--kv-ratio", "0.5", "--schedule", "fancy"}, "--schedule"},
      {{"compress", "--model", m, "--out", out, "--kv-ratio", "0.5", "--calib", "x.txt"}, "--calib"},
      {{"compress", "--model", m, "--out", out, "--kv-ratio", "0.5", "--max-ppl-increase", "1"},
       "--max-ppl-increase"},
      {{"compress", "--model", m, "--out", out, "--max-ppl-increase", "-1"}, "--max-ppl-increase"},
      {{"compress", "--model", m, "--out", out, "--max-ppl-increase", "1", "--schedule", "progressive"},
       "--schedule"},
      {{"compress", "--model", m, "--out", out, "--max-ppl-increase", "1", "--search-chunks", "0"},
       "--search-chunks"},
  };
  for (const auto& [args, flag] : cases) {
    const testing::RunResult r = RunLorcserve(args);
    EXPECT_NE(r.exit_code, 0) << r;
    EXPECT_NE(r.err.find(flag), std::string::npos) << flag << ": " << r;
  }
  EXPECT_FALSE(fs::exists(out));
}

TEST(CompressCli, WritesRefusesNonEmptyOutAndOverwritesWithForce) {
  REQUIRE_TINY_LLAMA();
  const std::string m = testing::TinyLlamaDir(), out = Tmp("out"), calib = Tmp("calib.jsonl");
  {
    std::ofstream f(calib);
    f << "{\"text\": \"The river turned slowly past the old mill, and the miller counted sacks.\"}\n\n"
      << "{\"text\": \"Every spring the swallows came back to the barn under the eaves.\"}\n";
  }
  testing::RunResult r = RunLorcserve({"compress", "--model", m, "--out", out, "--ranks", "32:16",
                                       "--tp", "2"});
  ASSERT_EQ(r.exit_code, 0) << r;
  EXPECT_NE(r.out.find("kv_bytes_ratio 0.1875"), std::string::npos) << r.out;
  EXPECT_NE(r.err.find("layer 8/8: k_rank 32 v_rank 16, relative error K"), std::string::npos) << r.err;
  r = RunLorcserve({"compress", "--model", m, "--out", out, "--ranks", "32:16"});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("--out"), std::string::npos) << r;
  EXPECT_NE(r.err.find("--force"), std::string::npos) << r;
  r = RunLorcserve({"compress", "--model", m, "--out", out, "--kv-ratio", "0.25", "--whiten",
                    "--calib", calib, "--force"});
  ASSERT_EQ(r.exit_code, 0) << r;
  EXPECT_NE(r.err.find("(whitened)"), std::string::npos) << r.err;
  absl::StatusOr<nlohmann::json> j = ReadJsonFile(out + "/lorc.json");
  ASSERT_TRUE(j.ok()) << j.status();
  EXPECT_EQ((*j)["method"], "whitened-svd");
  EXPECT_EQ((*j)["calibration"]["source"], calib);
  EXPECT_GT((*j)["calibration"]["tokens"].get<int>(), 10);
  EXPECT_EQ((*j)["layers"][5]["v_rank"], 32);
  fs::remove_all(out);
  fs::remove(calib);
}

}  // namespace
}  // namespace lorc
