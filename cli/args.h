// Command-line parsing for the `lorcserve` subcommands: `--name value`, `--name=value` and
// boolean `--name` flags, each declared by the subcommand. Unknown flags, missing values and
// malformed numbers are InvalidArgument errors naming the flag.
#pragma once

#include <cstdint>
#include <limits>
#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace lorc::cli {

struct FlagSpec {
  std::string name;       // without dashes
  bool takes_value = true;
  std::string help;
  std::string value_name = "VALUE";
};

class Args {
 public:
  // Parses argv[first..argc).
  static absl::StatusOr<Args> Parse(int argc, char** argv, int first, const std::vector<FlagSpec>& specs);

  bool Has(const std::string& name) const { return values_.contains(name); }
  // The last value given for `name` (flags may repeat), or `def`.
  std::string Get(const std::string& name, const std::string& def = "") const;
  // Every value given for `name`, in order.
  std::vector<std::string> GetAll(const std::string& name) const;
  absl::StatusOr<int64_t> GetInt(const std::string& name, int64_t def) const;
  // The value of --name (or `def`) when it lies in [lo, hi]; otherwise InvalidArgument naming the
  // flag, the value and the range (so "--max-num-batched-tokens 4294967296" is an error, not a wrap to 0
  // in an int32).
  absl::StatusOr<int64_t> GetIntInRange(const std::string& name, int64_t def, int64_t lo,
                                        int64_t hi) const;
  // GetIntInRange into an int32 destination: [lo, hi] defaults to the whole int32 range.
  absl::StatusOr<int32_t> GetInt32(const std::string& name, int32_t def,
                                   int32_t lo = std::numeric_limits<int32_t>::min(),
                                   int32_t hi = std::numeric_limits<int32_t>::max()) const;
  absl::StatusOr<double> GetDouble(const std::string& name, double def) const;
  // A HOST:PORT to listen on, the port in [0, 65535]; InvalidArgument naming the flag otherwise.
  absl::StatusOr<std::string> GetListenAddress(const std::string& name, const std::string& def) const;
  // A gRPC server to dial: HOST:PORT with a port in [1, 65535], or a target with a gRPC URI
  // scheme (unix:, unix-abstract:, dns:, ipv4:, ipv6:, vsock:) as given; InvalidArgument naming
  // the flag otherwise ('127.0.0.1' dialled port 0, a tester).
  absl::StatusOr<std::string> GetServerAddress(const std::string& name, const std::string& def) const;
  // A comma-separated list of HOST:PORT addresses to connect to (port in [1, 65535]): at least
  // one, no empty item, none twice. INVALID_ARGUMENT naming the flag and the item.
  absl::StatusOr<std::vector<std::string>> GetAddressList(const std::string& name) const;
  // Comma-separated int32 integers ("0,1,2"); InvalidArgument naming the flag and the item that
  // is not an integer, or is one outside the int32 range.
  absl::StatusOr<std::vector<int32_t>> GetIntList(const std::string& name) const;

 private:
  std::map<std::string, std::vector<std::string>> values_;
};

// Whether `addr` is HOST:PORT (a non-empty host, not resolved) with a port in [min_port, 65535].
bool IsHostPort(absl::string_view addr, int64_t min_port);

// "Usage: lorcserve <command> ..." text for a command's flags.
std::string Usage(const std::string& command, const std::string& synopsis,
                  const std::vector<FlagSpec>& specs);

}  // namespace lorc::cli
