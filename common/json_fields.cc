#include "common/json_fields.h"

#include <cmath>
#include <limits>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"

namespace lorc {
namespace {

using json = nlohmann::json;

// Debian's Abseil has its own absl::string_view, distinct from std::string_view.
absl::string_view Sv(std::string_view s) { return absl::string_view(s.data(), s.size()); }

// Integral floats below this magnitude convert to int64 exactly.
constexpr double kMaxIntegralFloat = 9.0e15;

template <typename T, typename Convert>
absl::StatusOr<std::optional<T>> Optional(const json& obj, std::string_view key,
                                          std::string_view field, Convert convert) {
  const json* v = FindNonNull(obj, key);
  if (v == nullptr) return std::optional<T>();
  absl::StatusOr<T> x = convert(*v, SubField(field, key));
  if (!x.ok()) return x.status();
  return std::optional<T>(*std::move(x));
}

template <typename T>
absl::StatusOr<T> Required(absl::StatusOr<std::optional<T>> v, std::string_view key,
                           std::string_view field) {
  if (!v.ok()) return v.status();
  if (!v->has_value()) return MissingFieldError(SubField(field, key));
  return **std::move(v);
}

}  // namespace

absl::Status FieldError(std::string_view field, std::string_view message) {
  return absl::InvalidArgumentError(absl::StrCat(Sv(field), ": ", Sv(message)));
}

absl::Status MissingFieldError(std::string_view field) { return FieldError(field, "missing"); }

absl::Status WrongTypeError(std::string_view field, std::string_view expected,
                            const json& value) {
  return FieldError(field, absl::StrCat("expected ", Sv(expected), ", got ", DescribeJson(value)));
}

std::string DescribeJson(const json& value) {
  std::string s = value.dump(-1, ' ', /*ensure_ascii=*/false, json::error_handler_t::replace);
  if (s.size() > 60) s = s.substr(0, 57) + "...";
  if (value.is_null()) return "null";  // type and value are the same word
  return absl::StrCat(value.type_name(), " ", s);
}

std::string SubField(std::string_view field, std::string_view key) {
  if (field.empty()) return std::string(key);
  return absl::StrCat(Sv(field), ".", Sv(key));
}

std::string IndexField(std::string_view field, size_t index) {
  return absl::StrCat(Sv(field), "[", index, "]");
}

absl::Status ExpectObject(const json& value, std::string_view field) {
  if (value.is_object()) return absl::OkStatus();
  return WrongTypeError(field, "an object", value);
}

const json* FindNonNull(const json& obj, std::string_view key) {
  if (!obj.is_object()) return nullptr;
  auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return nullptr;
  return &*it;
}

bool HasNonNull(const json& obj, std::string_view key) { return FindNonNull(obj, key) != nullptr; }

absl::StatusOr<bool> JsonAsBool(const json& value, std::string_view field) {
  if (!value.is_boolean()) return WrongTypeError(field, "a bool", value);
  return value.get<bool>();
}

absl::StatusOr<std::string> JsonAsString(const json& value, std::string_view field) {
  if (!value.is_string()) return WrongTypeError(field, "a string", value);
  return value.get_ref<const std::string&>();
}

absl::StatusOr<int64_t> JsonAsInt64(const json& value, std::string_view field) {
  if (value.is_number_unsigned()) {
    const uint64_t u = value.get<uint64_t>();
    if (u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      return FieldError(field, absl::StrCat(u, " is out of range for int64"));
    }
    return static_cast<int64_t>(u);
  }
  if (value.is_number_integer()) return value.get<int64_t>();
  if (value.is_number_float()) {
    const double d = value.get<double>();
    if (std::isfinite(d) && d == std::floor(d)) {
      if (std::fabs(d) < kMaxIntegralFloat) return static_cast<int64_t>(d);
      return FieldError(field, absl::StrCat(d, " is out of range for an integer (|value| < 9e15)"));
    }
  }
  return WrongTypeError(field, "an integer", value);
}

absl::StatusOr<double> JsonAsDouble(const json& value, std::string_view field) {
  if (!value.is_number()) return WrongTypeError(field, "a number", value);
  const double d = value.get<double>();
  if (!std::isfinite(d)) {
    return FieldError(field, absl::StrCat("expected a finite number, got ", d));
  }
  return d;
}

absl::StatusOr<bool> GetBool(const json& obj, std::string_view key, bool default_value,
                             std::string_view field) {
  absl::StatusOr<std::optional<bool>> v = GetOptionalBool(obj, key, field);
  if (!v.ok()) return v.status();
  return v->value_or(default_value);
}

absl::StatusOr<std::optional<bool>> GetOptionalBool(const json& obj, std::string_view key,
                                                    std::string_view field) {
  return Optional<bool>(obj, key, field, JsonAsBool);
}

absl::StatusOr<std::string> GetString(const json& obj, std::string_view key,
                                      std::string_view field) {
  return Required(GetOptionalString(obj, key, field), key, field);
}

absl::StatusOr<std::optional<std::string>> GetOptionalString(const json& obj,
                                                             std::string_view key,
                                                             std::string_view field) {
  return Optional<std::string>(obj, key, field, JsonAsString);
}

absl::StatusOr<int64_t> GetInt64(const json& obj, std::string_view key, std::string_view field) {
  return Required(GetOptionalInt64(obj, key, field), key, field);
}

absl::StatusOr<std::optional<int64_t>> GetOptionalInt64(const json& obj, std::string_view key,
                                                        std::string_view field) {
  return Optional<int64_t>(obj, key, field, JsonAsInt64);
}

absl::StatusOr<double> GetDouble(const json& obj, std::string_view key, std::string_view field) {
  return Required(GetOptionalDouble(obj, key, field), key, field);
}

absl::StatusOr<std::optional<double>> GetOptionalDouble(const json& obj, std::string_view key,
                                                        std::string_view field) {
  return Optional<double>(obj, key, field, JsonAsDouble);
}

}  // namespace lorc
