// Per-process scratch directories for tests that write model directories:
// $TMPDIR/<prefix>_<pid>/<name>, emptied when made and removed when the test binary ends.
#pragma once

#include <unistd.h>

#include <filesystem>
#include <string>
#include <system_error>

#include "gtest/gtest.h"

namespace lorc::testing {

inline std::filesystem::path ScratchRoot(const std::string& prefix) {
  return std::filesystem::temp_directory_path() / (prefix + "_" + std::to_string(::getpid()));
}

// Removes ScratchRoot(prefix) when the test binary ends (register once per binary).
class ScratchCleanup : public ::testing::Environment {
 public:
  explicit ScratchCleanup(std::string prefix) : prefix_(std::move(prefix)) {}
  void TearDown() override {
    std::error_code ec;
    std::filesystem::remove_all(ScratchRoot(prefix_), ec);
  }

 private:
  std::string prefix_;
};

// An empty directory ScratchRoot(prefix)/name (made again if it exists).
inline std::filesystem::path MakeScratchDir(const std::string& prefix, const std::string& name) {
  const std::filesystem::path dir = ScratchRoot(prefix) / name;
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  return dir;
}

}  // namespace lorc::testing
