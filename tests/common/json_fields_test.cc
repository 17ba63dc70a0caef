// common/json_fields: typed getters whose errors name the full field path and the value's type.
#include "common/json_fields.h"

#include <cmath>
#include <limits>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/status_matchers.h"

namespace lorc {
namespace {

using ::lorc::testing::StatusIs;
using ::testing::AllOf;
using ::testing::HasSubstr;
using json = nlohmann::json;

constexpr auto kInvalid = absl::StatusCode::kInvalidArgument;

TEST(JsonFieldsTest, PathsJoinKeysAndIndices) {
  EXPECT_EQ(SubField("f.json: model", "vocab"), "f.json: model.vocab");
  EXPECT_EQ(SubField("", "vocab_size"), "vocab_size");
  EXPECT_EQ(IndexField("added_tokens", 3), "added_tokens[3]");
  EXPECT_THAT(FieldError("a.b", "bad"), StatusIs(kInvalid, "a.b: bad"));
}

TEST(JsonFieldsTest, ObjectChecks) {
  const json obj = {{"a", 1}, {"n", nullptr}};
  EXPECT_OK(ExpectObject(obj, "root"));
  EXPECT_THAT(ExpectObject(json::array({1}), "root"),
              StatusIs(kInvalid, "root: expected an object, got array [1]"));
  EXPECT_TRUE(HasNonNull(obj, "a"));
  EXPECT_FALSE(HasNonNull(obj, "n"));
  EXPECT_FALSE(HasNonNull(obj, "zz"));
  EXPECT_FALSE(HasNonNull(json(5), "a"));  // not an object: nothing to find
  EXPECT_EQ(FindNonNull(obj, "n"), nullptr);
  ASSERT_NE(FindNonNull(obj, "a"), nullptr);
  EXPECT_EQ(*FindNonNull(obj, "a"), 1);
}

TEST(JsonFieldsTest, DescribeJsonCutsLongValues) {
  EXPECT_EQ(DescribeJson(json("abc")), "string \"abc\"");
  const std::string long_text(200, 'x');
  const std::string d = DescribeJson(json(long_text));
  EXPECT_LE(d.size(), 70u);
  EXPECT_THAT(d, HasSubstr("..."));
}

TEST(JsonFieldsTest, Bool) {
  const json obj = {{"t", true}, {"s", "yes"}, {"n", nullptr}};
  EXPECT_EQ(GetBool(obj, "t", false, "cfg").value(), true);
  EXPECT_EQ(GetBool(obj, "missing", true, "cfg").value(), true);
  EXPECT_EQ(GetBool(obj, "n", false, "cfg").value(), false);
  EXPECT_THAT(GetBool(obj, "s", false, "cfg"),
              StatusIs(kInvalid, "cfg.s: expected a bool, got string \"yes\""));
  EXPECT_EQ(GetOptionalBool(obj, "missing", "cfg").value(), std::nullopt);
  EXPECT_THAT(JsonAsBool(json(1), "x"), StatusIs(kInvalid, "x: expected a bool, got number 1"));
}

TEST(JsonFieldsTest, String) {
  const json obj = {{"s", "hi"}, {"i", 7}, {"n", nullptr}};
  EXPECT_EQ(GetString(obj, "s", "f.json: model").value(), "hi");
  EXPECT_THAT(GetString(obj, "zz", "f.json: model"),
              StatusIs(kInvalid, "f.json: model.zz: missing"));
  EXPECT_THAT(GetString(obj, "n", "f.json: model"),
              StatusIs(kInvalid, "f.json: model.n: missing"));
  EXPECT_THAT(GetString(obj, "i", "f.json: model"),
              StatusIs(kInvalid, "f.json: model.i: expected a string, got number 7"));
  EXPECT_EQ(GetOptionalString(obj, "zz", "m").value(), std::nullopt);
  EXPECT_EQ(GetOptionalString(obj, "s", "m").value(), "hi");
  EXPECT_THAT(GetOptionalString(obj, "i", "m"),
              StatusIs(kInvalid, "m.i: expected a string, got number 7"));
}

TEST(JsonFieldsTest, Int64AcceptsIntegralFloatsAndChecksRange) {
  const json obj = {{"i", -5},       {"f", 4096.0},     {"frac", 1.5},
                    {"s", "12"},     {"big", 1.0e16},   {"u", std::numeric_limits<uint64_t>::max()},
                    {"max", std::numeric_limits<int64_t>::max()}};
  EXPECT_EQ(GetInt64(obj, "i", "c").value(), -5);
  EXPECT_EQ(GetInt64(obj, "f", "c").value(), 4096);
  EXPECT_EQ(GetInt64(obj, "max", "c").value(), std::numeric_limits<int64_t>::max());
  EXPECT_THAT(GetInt64(obj, "zz", "c"), StatusIs(kInvalid, "c.zz: missing"));
  EXPECT_EQ(GetOptionalInt64(obj, "zz", "c").value(), std::nullopt);
  EXPECT_THAT(GetInt64(obj, "frac", "c"),
              StatusIs(kInvalid, "c.frac: expected an integer, got number 1.5"));
  EXPECT_THAT(GetInt64(obj, "s", "c"),
              StatusIs(kInvalid, "c.s: expected an integer, got string \"12\""));
  EXPECT_THAT(GetInt64(obj, "u", "c"),
              StatusIs(kInvalid, "c.u: 18446744073709551615 is out of range for int64"));
  EXPECT_THAT(GetOptionalInt64(obj, "big", "c"),
              StatusIs(kInvalid, AllOf(HasSubstr("c.big: "), HasSubstr("out of range"))));
}

TEST(JsonFieldsTest, DoubleMustBeAFiniteNumber) {
  const json obj = {{"d", 0.5},
                    {"i", 3},
                    {"s", "x"},
                    {"inf", std::numeric_limits<double>::infinity()},
                    {"nan", std::nan("")}};
  EXPECT_EQ(GetDouble(obj, "d", "c").value(), 0.5);
  EXPECT_EQ(GetDouble(obj, "i", "c").value(), 3.0);
  EXPECT_THAT(GetDouble(obj, "zz", "c"), StatusIs(kInvalid, "c.zz: missing"));
  EXPECT_EQ(GetOptionalDouble(obj, "zz", "c").value(), std::nullopt);
  EXPECT_THAT(GetDouble(obj, "s", "c"),
              StatusIs(kInvalid, "c.s: expected a number, got string \"x\""));
  EXPECT_THAT(GetDouble(obj, "inf", "c"),
              StatusIs(kInvalid, "c.inf: expected a finite number, got inf"));
  EXPECT_THAT(GetOptionalDouble(obj, "nan", "c"),
              StatusIs(kInvalid, HasSubstr("c.nan: expected a finite number")));
}

TEST(JsonFieldsTest, WrongTypeErrorNamesPathAndType) {
  EXPECT_THAT(WrongTypeError("config field 'hidden_size'", "an integer", json("4k")),
              StatusIs(kInvalid,
                       "config field 'hidden_size': expected an integer, got string \"4k\""));
  EXPECT_THAT(MissingFieldError("a[0].id"), StatusIs(kInvalid, "a[0].id: missing"));
}

}  // namespace
}  // namespace lorc
