// JSON helpers shared by every module: errors name the file, the line and the field.
#include "common/json_util.h"

#include <sys/stat.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/status_matchers.h"

namespace lorc {
namespace {

using ::lorc::testing::StatusIs;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

std::string WriteTemp(const std::string& name, const std::string& text) {
  const std::string path = (std::filesystem::temp_directory_path() / name).string();
  std::ofstream(path) << text;
  return path;
}

// Found by fuzz/config_json_fuzz (fuzz/corpus/config_json_fuzz/crash-number-overflow): a number
// beyond a double made nlohmann throw out_of_range from the re-parse, which ended the process.
TEST(JsonUtilTest, ANumberTooLargeForADoubleIsAnErrorNotAnException) {
  for (const char* text : {"[1e309", "1e309", "{\"rope_theta\": -1e400}"}) {
    SCOPED_TRACE(text);
    EXPECT_THAT(ParseJson(text, "f.json"),
                StatusIs(absl::StatusCode::kInvalidArgument,
                         HasSubstr("f.json: invalid JSON: [json.exception.out_of_range.406] "
                                   "number overflow parsing")));
  }
}

TEST(JsonUtilTest, ReadJsonLinesSkipsBlankLinesAndNamesTheBadOne) {
  const std::string ok = WriteTemp("lorc_lines_ok.jsonl", "{\"a\": 1}\n\n  \n{\"a\": 2}\n");
  auto rows = ReadJsonLines(ok);
  ASSERT_OK(rows);
  ASSERT_EQ(rows->size(), 2u);
  EXPECT_EQ((*rows)[1]["a"], 2);
  EXPECT_EQ((*rows)[1]["__line"], 4);
  const std::string bad = WriteTemp("lorc_lines_bad.jsonl", "{\"a\": 1}\n[1, 2]\n");
  EXPECT_THAT(ReadJsonLines(bad), StatusIs(absl::StatusCode::kInvalidArgument,
                                           HasSubstr("lorc_lines_bad.jsonl:2: not a JSON object")));
  const std::string broken = WriteTemp("lorc_lines_broken.jsonl", "{\"a\": \n");
  EXPECT_THAT(ReadJsonLines(broken), StatusIs(absl::StatusCode::kInvalidArgument,
                                              HasSubstr("lorc_lines_broken.jsonl:1: invalid JSON")));
  EXPECT_THAT(ReadJsonLines("/nonexistent/x.jsonl"), StatusIs(absl::StatusCode::kNotFound));
}

// Found by a tester: config.json or tokenizer.json linked to /dev/zero grew the process to 8 GB,
// a FIFO blocked forever, and a directory read as an empty file ("unexpected end of input", or
// `eval --passkey DIR` silently skipped).
TEST(JsonUtilTest, OnlyRegularFilesOfBoundedSizeAreRead) {
  namespace fs = std::filesystem;
  const fs::path dir = fs::temp_directory_path() / "lorc_json_util_files";
  fs::remove_all(dir);
  fs::create_directories(dir / "a_dir");
  fs::create_symlink("/dev/zero", dir / "zero.json");
  ASSERT_EQ(mkfifo((dir / "fifo.json").c_str(), 0600), 0);
  {
    std::ofstream big(dir / "big.json");
  }
  fs::resize_file(dir / "big.json", kMaxReadFileBytes + 1);  // sparse: no disk
  const std::string small = WriteTemp("lorc_small.json", "{}");
  EXPECT_OK(ReadFileToString(small));
  for (const auto& [name, message] : std::vector<std::pair<std::string, std::string>>{
           {"a_dir", "is a directory, not a file"},
           {"zero.json", "not a regular file"},
           {"fifo.json", "not a regular file"},
           {"big.json", absl::StrCat(kMaxReadFileBytes + 1, " bytes, more than the ", kMaxReadFileBytes)}}) {
    SCOPED_TRACE(name);
    const std::string path = (dir / name).string();
    EXPECT_THAT(ReadFileToString(path), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr(path + ": " + message)));
    EXPECT_THAT(ReadJsonFile(path), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr(message)));
    EXPECT_THAT(ReadJsonLines(path), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr(message)));
  }
  EXPECT_THAT(ReadFileToString((dir / "missing").string()),
              StatusIs(absl::StatusCode::kNotFound, HasSubstr("no such file")));
  EXPECT_THAT(ReadJsonLines((dir / "missing").string()), StatusIs(absl::StatusCode::kNotFound));
  fs::remove_all(dir);
}

TEST(JsonUtilTest, GetInt32ListRejectsWhatDoesNotFit) {
  const nlohmann::json j = nlohmann::json::parse(
      R"({"ok": [0, -5, 2147483647], "big": [2147483648], "huge": [18446744073709551615],
          "float": [1.5], "str": "1,2"})");
  auto ok = GetInt32List(j, "ok", "f:3");
  ASSERT_OK(ok);
  EXPECT_THAT(*ok, ElementsAre(0, -5, 2147483647));
  for (const char* field : {"big", "huge", "float", "str", "missing"}) {
    EXPECT_THAT(GetInt32List(j, field, "f:3"),
                StatusIs(absl::StatusCode::kInvalidArgument,
                         HasSubstr(std::string("f:3: '") + field + "' must be a list of 32-bit integers")));
  }
}

}  // namespace
}  // namespace lorc
