#include "common/json_util.h"

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace lorc {

absl::Status NameFileFlag(std::string_view flag, const absl::Status& status) {
  if (status.ok()) return status;
  const std::string name = "--" + std::string(flag);
  if (absl::StartsWith(status.message(), name)) return absl::InvalidArgumentError(status.message());
  return absl::InvalidArgumentError(absl::StrCat(name, " ", status.message()));
}

absl::Status CheckReadableFile(const std::string& path) {
  std::error_code ec;
  const std::filesystem::file_status st = std::filesystem::status(path, ec);
  if (st.type() == std::filesystem::file_type::not_found) {
    return absl::NotFoundError(absl::StrCat(path, ": no such file"));
  }
  if (ec) return absl::InvalidArgumentError(absl::StrCat(path, ": cannot open: ", ec.message()));
  if (st.type() == std::filesystem::file_type::directory) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": is a directory, not a file"));
  }
  if (st.type() != std::filesystem::file_type::regular) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a regular file (a device, FIFO or socket)"));
  }
  const uintmax_t size = std::filesystem::file_size(path, ec);
  if (ec) return absl::InvalidArgumentError(absl::StrCat(path, ": cannot open: ", ec.message()));
  if (size > static_cast<uintmax_t>(kMaxReadFileBytes)) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": ", size, " bytes, more than the ",
                                                   kMaxReadFileBytes, " this reads"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> ReadFileToString(const std::string& path) {
  if (absl::Status s = CheckReadableFile(path); !s.ok()) return s;
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    const int err = errno;
    if (err == ENOENT) return absl::NotFoundError(absl::StrCat(path, ": no such file"));
    return absl::InvalidArgumentError(absl::StrCat(path, ": cannot open: ", std::strerror(err)));
  }
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) return absl::DataLossError(absl::StrCat(path, ": read error"));
  return std::move(ss).str();
}

absl::StatusOr<nlohmann::json> ParseJson(std::string_view text, std::string_view what) {
  nlohmann::json j = nlohmann::json::parse(text, /*cb=*/nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) {
    // Re-parse with exceptions only to get the position of the error for the message. Any
    // nlohmann exception, not only parse_error: a number too large for a double ("1e309") is an
    // out_of_range (fuzz/corpus/config_json_fuzz/crash-number-overflow).
    try {
      const nlohmann::json unused = nlohmann::json::parse(text);  // throws: the message
      (void)unused;
    } catch (const nlohmann::json::exception& e) {
      return absl::InvalidArgumentError(absl::StrCat(std::string(what), ": invalid JSON: ", e.what()));
    }
    return absl::InvalidArgumentError(absl::StrCat(std::string(what), ": invalid JSON"));
  }
  return j;
}

absl::StatusOr<nlohmann::json> ReadJsonFile(const std::string& path) {
  auto text = ReadFileToString(path);
  if (!text.ok()) return text.status();
  return ParseJson(*text, path);
}

absl::StatusOr<std::vector<nlohmann::json>> ReadJsonLines(const std::string& path) {
  if (absl::Status s = CheckReadableFile(path); !s.ok()) return s;
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat(path, ": cannot open"));
  std::vector<nlohmann::json> out;
  std::string line;
  for (int n = 1; std::getline(in, line); ++n) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    absl::StatusOr<nlohmann::json> j = ParseJson(line, absl::StrCat(path, ":", n));
    if (!j.ok()) return j.status();
    if (!j->is_object()) {
      return absl::InvalidArgumentError(absl::StrCat(path, ":", n, ": not a JSON object"));
    }
    (*j)["__line"] = n;
    out.push_back(*std::move(j));
  }
  return out;
}

absl::StatusOr<std::vector<int32_t>> GetInt32List(const nlohmann::json& obj, std::string_view field,
                                                  std::string_view where) {
  const std::string name(field);
  auto bad = [&]() {
    return absl::InvalidArgumentError(
        absl::StrCat(std::string(where), ": '", name, "' must be a list of 32-bit integers"));
  };
  auto it = obj.find(name);
  if (it == obj.end() || !it->is_array()) return bad();
  std::vector<int32_t> v;
  v.reserve(it->size());
  for (const auto& x : *it) {
    if (!x.is_number_integer()) return bad();
    const int64_t n = x.is_number_unsigned() && x.get<uint64_t>() > INT64_MAX ? INT64_MAX : x.get<int64_t>();
    if (n < INT32_MIN || n > INT32_MAX) return bad();
    v.push_back(static_cast<int32_t>(n));
  }
  return v;
}

}  // namespace lorc
