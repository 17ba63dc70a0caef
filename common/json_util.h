// Reading JSON files with errors that name the file (nlohmann-json underneath).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace lorc {

// Reads a whole file into a string. NotFound / InvalidArgument name the path.
absl::StatusOr<std::string> ReadFileToString(const std::string& path);

// Parses a JSON document; the error names `what` (usually the path) and the parser's message.
absl::StatusOr<nlohmann::json> ParseJson(std::string_view text, std::string_view what);

// ReadFileToString + ParseJson.
absl::StatusOr<nlohmann::json> ReadJsonFile(const std::string& path);

// One JSON object per non-blank line. NotFound for a missing file; InvalidArgument naming
// "<path>:<line>" for a line that is not a JSON object. Each object gets "__line": its line number.
absl::StatusOr<std::vector<nlohmann::json>> ReadJsonLines(const std::string& path);

// obj[field] as a list of int32 (token ids and the like). InvalidArgument naming `where` and the
// field when it is missing, not a list, or holds a non-integer or a value outside int32.
absl::StatusOr<std::vector<int32_t>> GetInt32List(const nlohmann::json& obj, std::string_view field,
                                                  std::string_view where);

}  // namespace lorc
