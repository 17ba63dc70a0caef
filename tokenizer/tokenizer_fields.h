// Tokenizer internals: typed access to tokenizer.json fields with errors naming the field.
// `field` arguments are paths such as "/m/tokenizer.json: model.vocab".
#pragma once

#include <optional>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "nlohmann/json.hpp"

namespace lorc::tokenizer_internal {

// Debian's Abseil has its own absl::string_view, distinct from std::string_view: Sv converts
// (for StrCat and heterogeneous flat_hash_map lookups), Cat is StrCat over std::string_view.
inline absl::string_view Sv(std::string_view s) { return absl::string_view(s.data(), s.size()); }
template <typename T>
const T& Sv(const T& value) {
  return value;
}
template <typename... Args>
std::string Cat(const Args&... args) {
  return absl::StrCat(Sv(args)...);
}

// InvalidArgument "<field>: <message>".
absl::Status FieldError(std::string_view field, std::string_view message);

// "<field>.<key>".
std::string SubField(std::string_view field, std::string_view key);

// "<field>[<index>]".
std::string IndexField(std::string_view field, size_t index);

// InvalidArgument unless `value` is a JSON object.
absl::Status ExpectObject(const nlohmann::json& value, std::string_view field);

// obj[key] as a bool; `default_value` when missing or null.
absl::StatusOr<bool> GetBool(const nlohmann::json& obj, std::string_view key, bool default_value,
                             std::string_view field);

// obj[key] as a string; error when missing or not a string.
absl::StatusOr<std::string> GetString(const nlohmann::json& obj, std::string_view key,
                                      std::string_view field);

// obj[key] as a string; nullopt when missing or null.
absl::StatusOr<std::optional<std::string>> GetOptionalString(const nlohmann::json& obj,
                                                             std::string_view key,
                                                             std::string_view field);

// The "type" of a component object (error if missing).
absl::StatusOr<std::string> GetType(const nlohmann::json& obj, std::string_view field);

// `value` as an int32 token id in [0, 2^30); error otherwise.
absl::StatusOr<int32_t> GetTokenId(const nlohmann::json& value, std::string_view field);

// True when obj has `key` with a non-null value.
bool HasNonNull(const nlohmann::json& obj, std::string_view key);

}  // namespace lorc::tokenizer_internal
