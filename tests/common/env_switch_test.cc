// common/env_switch.h: the developer switches' parsing and the line a rejected value gets.
#include "common/env_switch.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <cstdlib>
#include <string>

namespace lorc {
namespace {

constexpr char kVar[] = "LORC_ENV_SWITCH_TEST";

class EnvSwitchTest : public ::testing::Test {
 protected:
  void TearDown() override { unsetenv(kVar); }
  // Sets the switch (nullptr: unsets it), evaluates f and returns what it printed to stderr.
  template <class F>
  std::string With(const char* value, F f) {
    if (value == nullptr) {
      unsetenv(kVar);
    } else {
      setenv(kVar, value, 1);
    }
    ::testing::internal::CaptureStderr();
    f();
    return ::testing::internal::GetCapturedStderr();
  }
};

TEST_F(EnvSwitchTest, ParseEnvIntTakesWholeDecimalIntegersOnly) {
  int64_t v = 0;
  EXPECT_TRUE(ParseEnvInt("42", &v));
  EXPECT_EQ(v, 42);
  EXPECT_TRUE(ParseEnvInt("-7", &v));
  EXPECT_EQ(v, -7);
  for (const char* bad : {"", " 1", "1 ", "1x", "0x10", "+1", "1.0", "99999999999999999999"}) {
    EXPECT_FALSE(ParseEnvInt(bad, &v)) << "'" << bad << "'";
  }
}

TEST_F(EnvSwitchTest, UnsetOrEmptyGivesTheDefaultSilently) {
  int64_t got = -1;
  EXPECT_EQ(With(nullptr, [&] { got = EnvInt(kVar, 0, 10, 5); }), "");
  EXPECT_EQ(got, 5);
  EXPECT_EQ(With("", [&] { got = EnvIntOf(kVar, {2, 3}, 0); }), "");
  EXPECT_EQ(got, 0);
  bool flag = false;
  EXPECT_EQ(With("", [&] { flag = EnvFlag(kVar, true); }), "");
  EXPECT_TRUE(flag);
}

TEST_F(EnvSwitchTest, AcceptedValuesAreTaken) {
  int64_t got = -1;
  EXPECT_EQ(With("10", [&] { got = EnvInt(kVar, 0, 10, 5); }), "");
  EXPECT_EQ(got, 10);
  EXPECT_EQ(With("3", [&] { got = EnvIntOf(kVar, {2, 3}, 0); }), "");
  EXPECT_EQ(got, 3);
  bool flag = true;
  EXPECT_EQ(With("0", [&] { flag = EnvFlag(kVar, true); }), "");
  EXPECT_FALSE(flag);
  EXPECT_EQ(With("1", [&] { flag = EnvFlag(kVar, false); }), "");
  EXPECT_TRUE(flag);
}

TEST_F(EnvSwitchTest, RejectedValuesAreReportedAndKeepTheDefault) {
  int64_t got = -1;
  EXPECT_EQ(With("11", [&] { got = EnvInt(kVar, 0, 10, 5); }),
            "lorcserve: LORC_ENV_SWITCH_TEST=11 is not an integer in [0, 10]; the default applies\n");
  EXPECT_EQ(got, 5);
  EXPECT_EQ(With("4", [&] { got = EnvIntOf(kVar, {2, 3}, 0); }),
            "lorcserve: LORC_ENV_SWITCH_TEST=4 is not one of 2 3; the default applies\n");
  EXPECT_EQ(got, 0);
  bool flag = false;
  EXPECT_EQ(With("yes", [&] { flag = EnvFlag(kVar, false); }),
            "lorcserve: LORC_ENV_SWITCH_TEST=yes is not an integer in [0, 1]; the default applies\n");
  EXPECT_FALSE(flag);
  EXPECT_EQ(With("true", [&] { flag = EnvFlag(kVar, true); }),
            "lorcserve: LORC_ENV_SWITCH_TEST=true is not an integer in [0, 1]; the default applies\n");
  EXPECT_TRUE(flag);
}

}  // namespace
}  // namespace lorc
