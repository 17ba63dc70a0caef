// GoogleTest matchers for absl::Status / absl::StatusOr (Debian's Abseil predates absl's own).
#pragma once

#include <ostream>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace lorc::testing {

inline const absl::Status& GetStatus(const absl::Status& s) { return s; }
template <typename T>
const absl::Status& GetStatus(const absl::StatusOr<T>& s) { return s.status(); }

MATCHER(IsOk, "is OK") {
  const absl::Status& s = GetStatus(arg);
  if (!s.ok()) *result_listener << "status is " << s;
  return s.ok();
}

// StatusIs(code) or StatusIs(code, message_matcher).
MATCHER_P2(StatusIs, code, message_matcher,
           "has code " + absl::StatusCodeToString(code)) {
  const absl::Status& s = GetStatus(arg);
  *result_listener << "status is " << s;
  return s.code() == code &&
         ::testing::Matches(message_matcher)(std::string(s.message()));
}

MATCHER_P(StatusIs, code, "has code " + absl::StatusCodeToString(code)) {
  const absl::Status& s = GetStatus(arg);
  *result_listener << "status is " << s;
  return s.code() == code;
}

}  // namespace lorc::testing

#define ASSERT_OK(expr) ASSERT_THAT((expr), ::lorc::testing::IsOk())
#define EXPECT_OK(expr) EXPECT_THAT((expr), ::lorc::testing::IsOk())
// `ASSERT_OK_AND_ASSIGN(lhs, expr)`: asserts the StatusOr `expr` is OK and assigns its value to
// `lhs` (a declaration or an lvalue); the test function returns on failure.
#define LORC_TESTING_CAT2(a, b) a##b
#define LORC_TESTING_CAT(a, b) LORC_TESTING_CAT2(a, b)
#define ASSERT_OK_AND_ASSIGN(lhs, expr) \
  LORC_TESTING_ASSIGN_IMPL(LORC_TESTING_CAT(lorc_status_or_, __LINE__), lhs, expr)
#define LORC_TESTING_ASSIGN_IMPL(tmp, lhs, expr) \
  auto tmp = (expr);                             \
  ASSERT_TRUE(tmp.ok()) << tmp.status();         \
  lhs = *std::move(tmp)
