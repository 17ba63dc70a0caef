#include "tokenizer/tokenizer_fields.h"

#include <algorithm>

namespace lorc::tokenizer_internal {
namespace {

constexpr int64_t kMaxTokenId = int64_t{1} << 30;

}  // namespace

absl::StatusOr<std::string> GetType(const nlohmann::json& obj, std::string_view field) {
  if (absl::Status s = ExpectObject(obj, field); !s.ok()) return s;
  return GetString(obj, "type", field);
}

absl::StatusOr<int32_t> GetTokenId(const nlohmann::json& value, std::string_view field) {
  if (!value.is_number_integer()) return WrongTypeError(field, "an integer token id", value);
  const int64_t id = value.is_number_unsigned()
                         ? static_cast<int64_t>(std::min<uint64_t>(value.get<uint64_t>(),
                                                                   uint64_t{kMaxTokenId}))
                         : value.get<int64_t>();
  if (id < 0 || id >= kMaxTokenId) {
    return FieldError(field, Cat("token id ", id, " is out of range [0, ", kMaxTokenId, ")"));
  }
  return static_cast<int32_t>(id);
}

}  // namespace lorc::tokenizer_internal
