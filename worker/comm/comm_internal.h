// Helpers shared by the communicator backends; not part of the public interface.
#pragma once

#include <algorithm>
#include <chrono>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "worker/comm/communicator.h"

namespace lorc::comm_internal {

inline absl::Status ValidateCommOptions(const CommOptions& options) {
  if (options.group.empty()) return absl::InvalidArgumentError("CommOptions.group is empty");
  if (options.join_timeout <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError(absl::StrCat("CommOptions.join_timeout must be > 0, got ",
                                                   absl::FormatDuration(options.join_timeout)));
  }
  if (options.op_timeout <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError(absl::StrCat("CommOptions.op_timeout must be > 0, got ",
                                                   absl::FormatDuration(options.op_timeout)));
  }
  return absl::OkStatus();
}

// Milliseconds for APIs where 0 means "no timeout" or "use the default": at least 1 ms, and an
// infinite duration becomes a year.
inline std::chrono::milliseconds ToMillis(absl::Duration d) {
  d = std::min(d, absl::Hours(24 * 365));
  return std::max(absl::ToChronoMilliseconds(d), std::chrono::milliseconds(1));
}

}  // namespace lorc::comm_internal
