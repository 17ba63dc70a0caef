// CHECK macros for programmer errors (never for request data, files or configs, which get an
// absl::Status). Debian 12's Abseil predates absl/log, so this is the project's own small version:
//   CHECK(cond) << "context";  CHECK_OK(status);  CHECK_GT(a, b);
#pragma once

#include <cstdlib>
#include <iostream>
#include <sstream>

#include "absl/status/status.h"

namespace lorc::internal {

class CheckFailure {
 public:
  CheckFailure(const char* file, int line, const char* cond) {
    stream_ << file << ":" << line << ": CHECK failed: " << cond << " ";
  }
  [[noreturn]] ~CheckFailure() {
    std::cerr << stream_.str() << std::endl;
    std::abort();
  }
  std::ostream& stream() { return stream_; }

 private:
  std::ostringstream stream_;
};

// Lets `CHECK(x) << ...` be an expression of type void.
struct Voidify {
  void operator&(std::ostream&) {}
};

}  // namespace lorc::internal

#define CHECK(cond)                 \
  (cond) ? (void)0                  \
         : ::lorc::internal::Voidify() & \
               ::lorc::internal::CheckFailure(__FILE__, __LINE__, #cond).stream()
#define CHECK_OK(expr)                                                               \
  do {                                                                               \
    const ::absl::Status lorc_check_status_ = (expr);                                \
    CHECK(lorc_check_status_.ok()) << lorc_check_status_;                            \
  } while (0)
#define CHECK_EQ(a, b) CHECK((a) == (b)) << "(" << (a) << " vs " << (b) << ") "
#define CHECK_NE(a, b) CHECK((a) != (b)) << "(" << (a) << " vs " << (b) << ") "
#define CHECK_GT(a, b) CHECK((a) > (b)) << "(" << (a) << " vs " << (b) << ") "
#define CHECK_GE(a, b) CHECK((a) >= (b)) << "(" << (a) << " vs " << (b) << ") "
#define CHECK_LT(a, b) CHECK((a) < (b)) << "(" << (a) << " vs " << (b) << ") "
#define CHECK_LE(a, b) CHECK((a) <= (b)) << "(" << (a) << " vs " << (b) << ") "
