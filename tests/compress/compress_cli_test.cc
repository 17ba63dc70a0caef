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
                        "--whiten", "--calib", "--tp", "--threads", "--force"}) {
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
      // Flags that would do nothing.
      {{"compress", "--model", m, "--out", out, "--kv-ratio", "0.5", "--search-chunks", "4"}, "--search-chunks"},
      {{"compress", "--model", m, "--out", out, "--max-ppl-increase", "0"}, "--max-ppl-increase"},
      // 8 divides neither the 4 attention heads nor is 2 KV heads' multiple dividing them.
      {{"compress", "--model", m, "--out", out, "--kv-ratio", "0.5", "--tp", "8"}, "--tp"},
      {{"compress", "--model", m, "--out", out, "--kv-ratio", "0.5", "--threads", "-1"}, "--threads"},
      // Before the factorization, not after it (found by a tester).
      {{"compress", "--model", m, "--out", "/proc/lorc-compress-test/x", "--kv-ratio", "0.5"}, "--out: cannot create"},
      {{"eval", "--model", m, "--limit", "0"}, "--limit"},
      {{"eval", "--model", m, "--limit", "-1"}, "--limit"},
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
    // At least hidden_size (512) tokens: --whiten refuses fewer.
    std::ofstream f(calib);
    for (int i = 0; i < 40; ++i) {
      f << "{\"text\": \"The river turned slowly past the old mill, and the miller counted sacks " << i
        << ".\"}\n\n"
        << "{\"text\": \"Every spring the swallows came back to the barn under the eaves.\"}\n";
    }
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

// A compressed directory that lost its lorc.json: at full rank (128:128) its tensors have the
// original's shapes, and it loaded and generated garbage (a tester). Refused, naming lorc.json.
TEST(CompressCli, ACompressedDirectoryWithoutLorcJsonIsRefusedAtLoad) {
  REQUIRE_TINY_LLAMA();
  const std::string m = testing::TinyLlamaDir(), out = Tmp("nolorc");
  testing::RunResult r = RunLorcserve({"compress", "--model", m, "--out", out, "--ranks", "128:128"});
  ASSERT_EQ(r.exit_code, 0) << r;
  r = RunLorcserve({"generate", "--model", out, "--prompt", "Hi", "--max-tokens", "2", "--threads", "1"});
  ASSERT_EQ(r.exit_code, 0) << r;  // with lorc.json it loads
  fs::remove(out + "/lorc.json");
  r = RunLorcserve({"generate", "--model", out, "--prompt", "Hi", "--max-tokens", "2", "--threads", "1"});
  EXPECT_NE(r.exit_code, 0) << r;
  EXPECT_NE(r.err.find("holds LoRC factors (model.layers.0.self_attn.k_up_proj.weight)"), std::string::npos) << r;
  EXPECT_NE(r.err.find("no lorc.json"), std::string::npos) << r;
  // At a lower rank the shapes differ too: the missing lorc.json is still what is named (a second
  // tester got only "k_proj has shape [64, 512], expected [256, 512]").
  r = RunLorcserve({"compress", "--model", m, "--out", out, "--ranks", "32:16", "--force"});
  ASSERT_EQ(r.exit_code, 0) << r;
  fs::remove(out + "/lorc.json");
  r = RunLorcserve({"generate", "--model", out, "--prompt", "Hi", "--max-tokens", "2", "--threads", "1"});
  EXPECT_NE(r.exit_code, 0) << r;
  EXPECT_NE(r.err.find("no lorc.json"), std::string::npos) << r;
  fs::remove_all(out);
}

// Each case: the exit code of InvalidArgument (2) and the words the message must contain.
TEST(CompressCli, RefusesBadInputsWithPreciseMessages) {
  REQUIRE_TINY_LLAMA();
  const std::string m = testing::TinyLlamaDir(), out = Tmp("msg"), dir = Tmp("calibdir"),
                    bin = Tmp("bin.txt"), blank = Tmp("blank.txt"), small = Tmp("small.txt"),
                    afile = Tmp("afile"), done = Tmp("done");
  fs::create_directories(dir);
  { std::ofstream(bin, std::ios::binary) << "plain text here, then bytes: \xff\xfe\x80 and more"; }
  { std::ofstream(blank) << "  \n\n   \n"; }
  { std::ofstream(small) << "The river turned slowly past the old mill, and the miller counted sacks.\n"; }
  { std::ofstream(afile) << "x"; }
  ASSERT_EQ(RunLorcserve({"compress", "--model", m, "--out", done, "--ranks", "32:32"}).exit_code, 0);
  const std::vector<std::pair<std::vector<std::string>, std::vector<std::string>>> cases = {
      {{"compress", "--model", m, "--out", out, "--kv-ratio", "0.01"}, {"--kv-ratio", "0.0625"}},
      {{"compress", "--model", m, "--out", out, "--kv-ratio", "0.5", "--whiten", "--calib", dir},
       {"--calib", "is a directory"}},
      {{"compress", "--model", m, "--out", out, "--kv-ratio", "0.5", "--whiten", "--calib", bin},
       {"--calib " + bin + ": ", "UTF-8"}},
      // Named with the flag, exit 2, before the weights are read (NOT_FOUND, exit 1, a tester).
      {{"compress", "--model", m, "--out", out, "--kv-ratio", "0.5", "--whiten", "--calib", dir + "/nope.txt"},
       {"--calib " + dir + "/nope.txt"}},
      {{"compress", "--model", m, "--out", out, "--kv-ratio", "0.5", "--whiten", "--calib", blank},
       {"--calib " + blank + ": ", "tokens"}},
      {{"compress", "--model", m, "--out", out, "--kv-ratio", "0.5", "--whiten", "--calib", small},
       {"--calib " + small + ": ", "hidden_size = 512"}},
      {{"compress", "--model", done, "--out", out, "--kv-ratio", "0.5"},
       {"--model: " + done + " is already LoRC-compressed (lorc.json); compress the source model"}},
      {{"compress", "--model", m, "--out", afile + "/sub", "--kv-ratio", "0.5"}, {"--out", "not a directory"}},
  };
  for (const auto& [args, words] : cases) {
    const testing::RunResult r = RunLorcserve(args);
    EXPECT_EQ(r.exit_code, 2) << r;
    for (const std::string& w : words) EXPECT_NE(r.err.find(w), std::string::npos) << w << ": " << r;
  }
  EXPECT_FALSE(fs::exists(out));
  // --tp 4: a multiple of the 2 KV heads (replicated) that divides the 4 attention heads.
  const testing::RunResult r = RunLorcserve({"compress", "--model", m, "--out", out, "--ranks", "32:32",
                                             "--tp", "4", "--threads", "1"});
  EXPECT_EQ(r.exit_code, 0) << r;
  for (const std::string& p : {out, dir, bin, blank, small, afile, done}) fs::remove_all(p);
}

}  // namespace
}  // namespace lorc
