// Typed access to JSON fields with errors that name the full field path and the value's type.
// Used by the tokenizer (tokenizer.json) and the model config (config.json).
//
// `field` arguments are paths naming a value for messages, e.g. "/m/tokenizer.json: model.vocab"
// or "config field 'rope_scaling.factor'". Getters that take (obj, key, field) name the member
// as SubField(field, key). Every error is InvalidArgument "<path>: <message>":
//   missing:     "<path>: missing"
//   wrong type:  "<path>: expected <what>, got <type> <short dump>"   (e.g. "got string \"x\"")
//   range:       "<path>: <value> is out of range ..."
// Nothing here throws (only non-throwing nlohmann accessors are used).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace lorc {

// InvalidArgument "<field>: <message>".
absl::Status FieldError(std::string_view field, std::string_view message);

// InvalidArgument "<field>: missing".
absl::Status MissingFieldError(std::string_view field);

// InvalidArgument "<field>: expected <expected>, got <DescribeJson(value)>"; `expected` reads
// like "an integer", "a string".
absl::Status WrongTypeError(std::string_view field, std::string_view expected,
                            const nlohmann::json& value);

// "<type> <compact dump>" cut to ~60 characters, e.g. `string "abc"`, `number 1.5`.
std::string DescribeJson(const nlohmann::json& value);

// "<field>.<key>"; just `key` when `field` is empty.
std::string SubField(std::string_view field, std::string_view key);

// "<field>[<index>]".
std::string IndexField(std::string_view field, size_t index);

// InvalidArgument (wrong type, naming `field`) unless `value` is a JSON object.
absl::Status ExpectObject(const nlohmann::json& value, std::string_view field);

// obj[key] when obj is an object holding `key` with a non-null value; else nullptr.
const nlohmann::json* FindNonNull(const nlohmann::json& obj, std::string_view key);

// True when obj has `key` with a non-null value.
bool HasNonNull(const nlohmann::json& obj, std::string_view key);

// --- Single values (`field` names `value` itself). ---

// A JSON bool.
absl::StatusOr<bool> JsonAsBool(const nlohmann::json& value, std::string_view field);

// A JSON string.
absl::StatusOr<std::string> JsonAsString(const nlohmann::json& value, std::string_view field);

// An integer in int64 range. Integral floats such as 4096.0 (which some exporters write) are
// accepted when |value| < 9e15; unsigned values above INT64_MAX and larger integral floats are
// "out of range"; fractional floats and non-numbers are a wrong type ("an integer").
absl::StatusOr<int64_t> JsonAsInt64(const nlohmann::json& value, std::string_view field);

// A finite number (integer or float); NaN / infinity are "not finite".
absl::StatusOr<double> JsonAsDouble(const nlohmann::json& value, std::string_view field);

// --- Members of an object (`field` names the object; errors name SubField(field, key)). ---
// Optional getters return nullopt when the member is missing or null (or `obj` is not an
// object); required getters return MissingFieldError then.

absl::StatusOr<bool> GetBool(const nlohmann::json& obj, std::string_view key, bool default_value,
                             std::string_view field);
absl::StatusOr<std::optional<bool>> GetOptionalBool(const nlohmann::json& obj,
                                                    std::string_view key, std::string_view field);

absl::StatusOr<std::string> GetString(const nlohmann::json& obj, std::string_view key,
                                      std::string_view field);
absl::StatusOr<std::optional<std::string>> GetOptionalString(const nlohmann::json& obj,
                                                             std::string_view key,
                                                             std::string_view field);

absl::StatusOr<int64_t> GetInt64(const nlohmann::json& obj, std::string_view key,
                                 std::string_view field);
absl::StatusOr<std::optional<int64_t>> GetOptionalInt64(const nlohmann::json& obj,
                                                        std::string_view key,
                                                        std::string_view field);

absl::StatusOr<double> GetDouble(const nlohmann::json& obj, std::string_view key,
                                 std::string_view field);
absl::StatusOr<std::optional<double>> GetOptionalDouble(const nlohmann::json& obj,
                                                        std::string_view key,
                                                        std::string_view field);

}  // namespace lorc
