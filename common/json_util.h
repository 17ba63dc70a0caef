// Reading JSON files with errors that name the file (nlohmann-json underneath).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace lorc {

// The most ReadFileToString and ReadJsonLines read: model JSON files, tokenizer.json (~10 MB for
// Llama 3), calibration and evaluation texts are far smaller.
inline constexpr int64_t kMaxReadFileBytes = int64_t{256} << 20;

// Whether `path` (links followed) is a regular file of at most kMaxReadFileBytes: NotFound for a
// missing one, InvalidArgument naming the path for a directory, a device or FIFO (/dev/zero would
// be read forever, a FIFO blocks) or a larger file.
absl::Status CheckReadableFile(const std::string& path);

// A file flag's failure (`status`, OK passes through) as InvalidArgument prefixed "--FLAG ":
// the flag, then the message (which names the path), and exit code 2 in the CLI (NotFound was
// exit 1 without the flag: a tester). A message that already starts with the flag is kept.
absl::Status NameFileFlag(std::string_view flag, const absl::Status& status);

// Reads a whole file into a string (CheckReadableFile first). NotFound / InvalidArgument name the
// path.
absl::StatusOr<std::string> ReadFileToString(const std::string& path);

// Parses a JSON document; the error names `what` (usually the path) and the parser's message.
absl::StatusOr<nlohmann::json> ParseJson(std::string_view text, std::string_view what);

// ReadFileToString + ParseJson.
absl::StatusOr<nlohmann::json> ReadJsonFile(const std::string& path);

// One JSON object per non-blank line (CheckReadableFile first). NotFound for a missing file; InvalidArgument naming
// "<path>:<line>" for a line that is not a JSON object. Each object gets "__line": its line number.
absl::StatusOr<std::vector<nlohmann::json>> ReadJsonLines(const std::string& path);

// obj[field] as a list of int32 (token ids and the like). InvalidArgument naming `where` and the
// field when it is missing, not a list, or holds a non-integer or a value outside int32.
absl::StatusOr<std::vector<int32_t>> GetInt32List(const nlohmann::json& obj, std::string_view field,
                                                  std::string_view where);

}  // namespace lorc
