#include "cli/args.h"

#include <algorithm>
#include <limits>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "common/status_macros.h"

namespace lorc::cli {

absl::StatusOr<Args> Args::Parse(int argc, char** argv, int first, const std::vector<FlagSpec>& specs) {
  Args args;
  for (int i = first; i < argc; ++i) {
    absl::string_view arg = argv[i];
    if (!absl::ConsumePrefix(&arg, "--")) {
      return absl::InvalidArgumentError(absl::StrCat("unexpected argument '", arg, "'"));
    }
    std::string name(arg), value;
    bool has_inline = false;
    if (const size_t eq = name.find('='); eq != std::string::npos) {
      value = name.substr(eq + 1);
      name = name.substr(0, eq);
      has_inline = true;
    }
    const FlagSpec* spec = nullptr;
    for (const FlagSpec& s : specs) {
      if (s.name == name) spec = &s;
    }
    if (spec == nullptr) return absl::InvalidArgumentError(absl::StrCat("unknown flag --", name));
    if (spec->takes_value && !has_inline) {
      if (i + 1 >= argc) return absl::InvalidArgumentError(absl::StrCat("--", name, " needs a value"));
      value = argv[++i];
    } else if (!spec->takes_value && has_inline) {
      return absl::InvalidArgumentError(absl::StrCat("--", name, " takes no value"));
    }
    args.values_[name].push_back(value);
  }
  return args;
}

std::string Args::Get(const std::string& name, const std::string& def) const {
  auto it = values_.find(name);
  return it == values_.end() ? def : it->second.back();
}

std::vector<std::string> Args::GetAll(const std::string& name) const {
  auto it = values_.find(name);
  return it == values_.end() ? std::vector<std::string>{} : it->second;
}

absl::StatusOr<int64_t> Args::GetInt(const std::string& name, int64_t def) const {
  if (!Has(name)) return def;
  const std::string s = Get(name);
  int64_t v;
  if (!absl::SimpleAtoi(s, &v)) {
    return absl::InvalidArgumentError(absl::StrCat("--", name, ": '", s, "' is not an integer"));
  }
  return v;
}

absl::StatusOr<int64_t> Args::GetIntInRange(const std::string& name, int64_t def, int64_t lo,
                                            int64_t hi) const {
  ASSIGN_OR_RETURN(int64_t v, GetInt(name, def));
  if (v < lo || v > hi) {
    return absl::InvalidArgumentError(
        absl::StrCat("--", name, ": ", v, " is outside the range [", lo, ", ", hi, "]"));
  }
  return v;
}

absl::StatusOr<int32_t> Args::GetInt32(const std::string& name, int32_t def, int32_t lo,
                                       int32_t hi) const {
  ASSIGN_OR_RETURN(int64_t v, GetIntInRange(name, def, lo, hi));
  return static_cast<int32_t>(v);
}

absl::StatusOr<double> Args::GetDouble(const std::string& name, double def) const {
  if (!Has(name)) return def;
  const std::string s = Get(name);
  double v;
  if (!absl::SimpleAtod(s, &v)) {
    return absl::InvalidArgumentError(absl::StrCat("--", name, ": '", s, "' is not a number"));
  }
  return v;
}

absl::StatusOr<std::vector<int32_t>> Args::GetIntList(const std::string& name) const {
  std::vector<int32_t> out;
  for (absl::string_view part : absl::StrSplit(Get(name), ',')) {
    const absl::string_view item = absl::StripAsciiWhitespace(part);
    int32_t v;
    if (!absl::SimpleAtoi(item, &v)) {
      // An integer that does not fit is out of range, not "not an integer" (99999999999).
      absl::string_view digits = item;
      if (!digits.empty() && (digits.front() == '-' || digits.front() == '+')) digits.remove_prefix(1);
      if (!digits.empty() && std::all_of(digits.begin(), digits.end(), absl::ascii_isdigit)) {
        return absl::InvalidArgumentError(absl::StrCat(
            "--", name, ": ", item, " is outside the int32 range [",
            std::numeric_limits<int32_t>::min(), ", ", std::numeric_limits<int32_t>::max(), "]"));
      }
      return absl::InvalidArgumentError(absl::StrCat("--", name, ": '", part, "' is not an integer"));
    }
    out.push_back(v);
  }
  return out;
}

bool IsHostPort(absl::string_view addr, int64_t min_port) {
  const size_t colon = addr.rfind(':');
  int64_t port = -1;
  return colon != absl::string_view::npos && colon != 0 && absl::SimpleAtoi(addr.substr(colon + 1), &port) &&
         port >= min_port && port <= 65535;
}

absl::StatusOr<std::string> Args::GetListenAddress(const std::string& name, const std::string& def) const {
  const std::string addr = Get(name, def);
  if (!IsHostPort(addr, 0)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--", name, ": '", addr, "' is not HOST:PORT with a port in [0, 65535] (0: pick one)"));
  }
  return addr;
}

absl::StatusOr<std::string> Args::GetServerAddress(const std::string& name, const std::string& def) const {
  const std::string addr = Get(name, def);
  for (const char* scheme : {"unix:", "unix-abstract:", "dns:", "ipv4:", "ipv6:", "vsock:"}) {
    if (absl::StartsWith(addr, scheme) && addr.size() > std::string_view(scheme).size()) return addr;
  }
  if (!IsHostPort(addr, 1)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--", name, ": '", addr, "' is not HOST:PORT with a port in [1, 65535] (or a gRPC target such as unix:PATH)"));
  }
  return addr;
}

absl::StatusOr<std::vector<std::string>> Args::GetAddressList(const std::string& name) const {
  const std::vector<std::string> items = absl::StrSplit(Get(name), ',');
  std::vector<std::string> out;
  for (size_t i = 0; i < items.size(); ++i) {
    const std::string item(absl::StripAsciiWhitespace(items[i]));
    if (!IsHostPort(item, 1)) {
      return absl::InvalidArgumentError(absl::StrCat("--", name, ": item ", i + 1, " '", item,
                                                     "' is not HOST:PORT with a port in [1, 65535]"));
    }
    if (std::find(out.begin(), out.end(), item) != out.end()) {
      return absl::InvalidArgumentError(absl::StrCat("--", name, ": '", item, "' is listed twice"));
    }
    out.push_back(item);
  }
  return out;
}

std::string Usage(const std::string& command, const std::string& synopsis,
                  const std::vector<FlagSpec>& specs) {
  std::string out = absl::StrCat("Usage: lorcserve ", command, " ", synopsis, "\n");
  for (const FlagSpec& s : specs) {
    std::string lhs = absl::StrCat("  --", s.name, s.takes_value ? " " + s.value_name : "");
    if (lhs.size() < 28) lhs.resize(28, ' ');
    absl::StrAppend(&out, lhs, " ", s.help, "\n");
  }
  return out;
}

}  // namespace lorc::cli
