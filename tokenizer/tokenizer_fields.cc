#include "tokenizer/tokenizer_fields.h"

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace lorc::tokenizer_internal {
namespace {

constexpr int64_t kMaxTokenId = int64_t{1} << 30;

const char* TypeName(const nlohmann::json& value) { return value.type_name(); }

}  // namespace

absl::Status FieldError(std::string_view field, std::string_view message) {
  return absl::InvalidArgumentError(Cat(field, ": ", message));
}

std::string SubField(std::string_view field, std::string_view key) {
  return Cat(field, ".", key);
}

std::string IndexField(std::string_view field, size_t index) {
  return Cat(field, "[", index, "]");
}

absl::Status ExpectObject(const nlohmann::json& value, std::string_view field) {
  if (value.is_object()) return absl::OkStatus();
  return FieldError(field, Cat("expected an object, got ", TypeName(value)));
}

bool HasNonNull(const nlohmann::json& obj, std::string_view key) {
  if (!obj.is_object()) return false;
  auto it = obj.find(key);
  return it != obj.end() && !it->is_null();
}

absl::StatusOr<bool> GetBool(const nlohmann::json& obj, std::string_view key, bool default_value,
                             std::string_view field) {
  if (!HasNonNull(obj, key)) return default_value;
  const nlohmann::json& value = obj.at(std::string(key));
  if (!value.is_boolean()) {
    return FieldError(SubField(field, key), Cat("expected a bool, got ", TypeName(value)));
  }
  return value.get<bool>();
}

absl::StatusOr<std::string> GetString(const nlohmann::json& obj, std::string_view key,
                                      std::string_view field) {
  if (!HasNonNull(obj, key)) return FieldError(SubField(field, key), "missing");
  const nlohmann::json& value = obj.at(std::string(key));
  if (!value.is_string()) {
    return FieldError(SubField(field, key),
                      Cat("expected a string, got ", TypeName(value)));
  }
  return value.get<std::string>();
}

absl::StatusOr<std::optional<std::string>> GetOptionalString(const nlohmann::json& obj,
                                                             std::string_view key,
                                                             std::string_view field) {
  if (!HasNonNull(obj, key)) return std::optional<std::string>();
  absl::StatusOr<std::string> value = GetString(obj, key, field);
  if (!value.ok()) return value.status();
  return std::optional<std::string>(*std::move(value));
}

absl::StatusOr<std::string> GetType(const nlohmann::json& obj, std::string_view field) {
  if (absl::Status s = ExpectObject(obj, field); !s.ok()) return s;
  return GetString(obj, "type", field);
}

absl::StatusOr<int32_t> GetTokenId(const nlohmann::json& value, std::string_view field) {
  if (!value.is_number_integer()) {
    return FieldError(field, Cat("expected an integer token id, got ", TypeName(value)));
  }
  const int64_t id = value.is_number_unsigned()
                         ? static_cast<int64_t>(std::min<uint64_t>(value.get<uint64_t>(),
                                                                   uint64_t{kMaxTokenId}))
                         : value.get<int64_t>();
  if (id < 0 || id >= kMaxTokenId) {
    return FieldError(field, Cat("token id ", id, " is out of range [0, ", kMaxTokenId,
                                          ")"));
  }
  return static_cast<int32_t>(id);
}

}  // namespace lorc::tokenizer_internal
