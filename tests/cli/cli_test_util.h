// What the `lorcserve` binary's end-to-end tests share (cli_test.cc, cli_bench_test.cc): the
// fixture model's path, a scratch directory of the test process, running the binary, its stdout
// as JSON, and the CliTest fixture (skips without the fixture model).
#pragma once

#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <sstream>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/testing/fixtures.h"
#include "tests/testing/run_lorcserve.h"

namespace lorc::cli_test {

namespace fs = std::filesystem;
using json = nlohmann::json;

inline std::string Tiny() { return ::lorc::testing::TinyLlamaDir(); }

// A scratch directory of this test process, removed at exit.
inline const fs::path& ScratchDir() {
  static const fs::path* dir = [] {
    auto* p = new fs::path(fs::temp_directory_path() /
                           ("lorc_cli_test_" + std::to_string(::getpid())));
    fs::remove_all(*p);
    fs::create_directories(*p);
    std::atexit([] { std::error_code ec; fs::remove_all(ScratchDir(), ec); });
    return p;
  }();
  return *dir;
}

using ::lorc::testing::RunResult;

// stdout as JSON (a test failure, and an empty object, when it is not).
inline json Json(const RunResult& r) {
  json j = json::parse(r.out, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) {
    ADD_FAILURE() << "stdout of `" << r.command << "` is not JSON:\n" << r.out << "\nstderr:\n" << r.err;
    return json::object();
  }
  return j;
}

// stdout as JSON Lines into *lines (one object a line); a fatal failure at the first line that is
// not JSON (call under ASSERT_NO_FATAL_FAILURE).
inline void JsonLines(const RunResult& r, std::vector<json>* lines) {
  std::istringstream in(r.out);
  for (std::string line; std::getline(in, line);) {
    lines->push_back(json::parse(line, nullptr, /*allow_exceptions=*/false));
    ASSERT_FALSE(lines->back().is_discarded()) << line;
  }
}

inline RunResult Lorcserve(const std::vector<std::string>& args) { return ::lorc::testing::RunLorcserve(args); }

inline std::string JoinIds(const std::vector<int32_t>& ids) {
  std::string s;
  for (int32_t id : ids) {
    if (!s.empty()) s += ',';
    s += std::to_string(id);
  }
  return s;
}

class CliTest : public ::testing::Test {
 protected:
  void SetUp() override { REQUIRE_TINY_LLAMA(); }
};

}  // namespace lorc::cli_test
