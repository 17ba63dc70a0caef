// For the request harnesses: any line libprotobuf logs while the service parses a request is a
// finding (a client must not be able to make the server log per request: docs/FUZZING.md #4).
#pragma once

#include <string>

#include "fuzz/fuzz_util.h"
#include "google/protobuf/stubs/logging.h"

namespace lorc::fuzz {

// Installs (once) a libprotobuf log handler that fails the run with the logged message.
inline void FailOnProtobufLog() {
  static const bool installed = [] {
    google::protobuf::SetLogHandler([](google::protobuf::LogLevel, const char* file, int line,
                                       const std::string& message) {
      Fail("libprotobuf logged (" + std::string(file) + ":" + std::to_string(line) + "): " + message);
    });
    return true;
  }();
  (void)installed;
}

}  // namespace lorc::fuzz
