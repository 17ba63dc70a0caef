// Tokenizer internals: tokenizer-specific readers of tokenizer.json fields (errors name the field).
// `field` arguments are paths such as "/m/tokenizer.json: model.vocab".
#pragma once

#include <optional>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "common/json_fields.h"
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

// The generic field helpers live in common/json_fields.h (namespace lorc); re-exported here so
// that existing `tokenizer_internal::` references keep working. Only GetType and GetTokenId are
// tokenizer-specific.
using ::lorc::ExpectObject;
using ::lorc::FieldError;
using ::lorc::GetBool;
using ::lorc::GetOptionalString;
using ::lorc::GetString;
using ::lorc::HasNonNull;
using ::lorc::IndexField;
using ::lorc::SubField;

// The "type" of a component object (error if missing).
absl::StatusOr<std::string> GetType(const nlohmann::json& obj, std::string_view field);

// `value` as an int32 token id in [0, 2^30); error otherwise.
absl::StatusOr<int32_t> GetTokenId(const nlohmann::json& value, std::string_view field);

}  // namespace lorc::tokenizer_internal
