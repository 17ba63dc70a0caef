// Reading JSON files with errors that name the file (nlohmann-json underneath).
#pragma once

#include <string>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace lorc {

// Reads a whole file into a string. NotFound / InvalidArgument name the path.
absl::StatusOr<std::string> ReadFileToString(const std::string& path);

// Parses a JSON document; the error names `what` (usually the path) and the parser's message.
absl::StatusOr<nlohmann::json> ParseJson(std::string_view text, std::string_view what);

// ReadFileToString + ParseJson.
absl::StatusOr<nlohmann::json> ReadJsonFile(const std::string& path);

}  // namespace lorc
