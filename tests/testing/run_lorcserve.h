// Running the built `lorcserve` binary from a test: a child process with stdout and stderr
// captured through files, and its exit code (128 + signal when killed by one).
#pragma once

#include <fcntl.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <ostream>
#include <sstream>
#include <string>
#include <vector>

#include "gtest/gtest.h"

extern char** environ;

namespace lorc::testing {

struct RunResult {
  int exit_code = -1;
  std::string out, err;
  std::string command;  // for failure messages
};

inline std::ostream& operator<<(std::ostream& os, const RunResult& r) {
  return os << "`" << r.command << "` exited " << r.exit_code << "\nstderr: " << r.err;
}

inline std::string ReadWholeFile(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

inline std::string LorcserveBinary() { return std::string(LORC_BIN_DIR) + "/lorcserve"; }

// Runs `lorcserve args...` to completion.
inline RunResult RunLorcserve(const std::vector<std::string>& args) {
  static std::atomic<int> counter{0};
  const std::string tag = std::to_string(::getpid()) + "_" + std::to_string(counter++);
  const std::filesystem::path out_path = std::filesystem::temp_directory_path() / ("lorc_out_" + tag);
  const std::filesystem::path err_path = std::filesystem::temp_directory_path() / ("lorc_err_" + tag);
  RunResult r;
  std::vector<std::string> argv_s = {LorcserveBinary()};
  argv_s.insert(argv_s.end(), args.begin(), args.end());
  for (const std::string& a : argv_s) r.command += (r.command.empty() ? "" : " ") + a;
  std::vector<char*> argv;
  for (std::string& a : argv_s) argv.push_back(a.data());
  argv.push_back(nullptr);

  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, 1, out_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_addopen(&fa, 2, err_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  pid_t pid;
  const int rc = posix_spawn(&pid, argv[0], &fa, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&fa);
  if (rc != 0) {
    ADD_FAILURE() << "cannot spawn " << argv[0] << ": " << std::strerror(rc);
    return r;
  }
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  r.out = ReadWholeFile(out_path);
  r.err = ReadWholeFile(err_path);
  std::error_code ec;
  std::filesystem::remove(out_path, ec);
  std::filesystem::remove(err_path, ec);
  return r;
}

}  // namespace lorc::testing
