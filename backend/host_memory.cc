#include "backend/host_memory.h"

#include <algorithm>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"

namespace lorc {
namespace {

std::string ReadAll(const std::string& path) {
  std::ifstream f(path);
  if (!f) return "";
  return std::string((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

// The integer after `key` at the start of a line of `text` ("MemAvailable:   123 kB"), or -1.
int64_t FieldOf(const std::string& text, absl::string_view key) {
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    if (!absl::ConsumePrefix(&line, key)) continue;
    if (!line.empty() && line[0] != ' ' && line[0] != '\t' && line[0] != ':') continue;  // a longer key
    absl::ConsumePrefix(&line, ":");
    std::vector<absl::string_view> parts = absl::StrSplit(line, ' ', absl::SkipWhitespace());
    int64_t v = 0;
    if (!parts.empty() && absl::SimpleAtoi(parts[0], &v)) return v;
  }
  return -1;
}

// A limit file's value: bytes, or -1 for none ("max", v1's page-rounded 2^63, absent).
int64_t LimitOf(const std::string& path) {
  int64_t v = 0;
  const std::string text = ReadAll(path);
  if (!absl::SimpleAtoi(absl::StripAsciiWhitespace(text), &v) || v <= 0 || v >= (int64_t{1} << 60)) return -1;
  return v;
}

int64_t ValueOf(const std::string& path) {
  int64_t v = 0;
  return absl::SimpleAtoi(absl::StripAsciiWhitespace(ReadAll(path)), &v) ? v : -1;
}

struct Files {
  const char* limit;
  const char* usage;
  const char* inactive_file;  // in memory.stat
};
constexpr Files kV2 = {"memory.max", "memory.current", "inactive_file"};
constexpr Files kV1 = {"memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"};

// Walks `mount` + `path` up to `mount`: the tightest limit and the least headroom (limit less
// usage without inactive file cache) over the levels with a limit.
void Walk(const std::string& mount, std::string path, const Files& f, HostMemory* m) {
  while (true) {
    const std::string dir = mount + (path == "/" ? "" : path);
    const int64_t limit = LimitOf(dir + "/" + f.limit);
    if (limit > 0) {
      int64_t usage = std::max<int64_t>(0, ValueOf(dir + "/" + f.usage));
      const int64_t inactive = FieldOf(ReadAll(dir + "/memory.stat"), f.inactive_file);
      if (inactive > 0) usage = std::max<int64_t>(0, usage - inactive);
      const int64_t headroom = std::max<int64_t>(0, limit - usage);
      m->cgroup_limit_bytes = m->cgroup_limit_bytes < 0 ? limit : std::min(m->cgroup_limit_bytes, limit);
      m->total_bytes = m->total_bytes < 0 ? limit : std::min(m->total_bytes, limit);
      m->available_bytes = m->available_bytes < 0 ? headroom : std::min(m->available_bytes, headroom);
    }
    if (path.empty() || path == "/") return;
    const size_t slash = path.rfind('/');
    path = slash == 0 || slash == std::string::npos ? "/" : path.substr(0, slash);
  }
}

}  // namespace

HostMemory ReadHostMemory(const std::string& proc, const std::string& cgroup_root) {
  HostMemory m;
  const std::string meminfo = ReadAll(proc + "/meminfo");
  const int64_t total_kb = FieldOf(meminfo, "MemTotal"), avail_kb = FieldOf(meminfo, "MemAvailable");
  if (total_kb > 0) m.total_bytes = total_kb * 1024;
  if (avail_kb >= 0) m.available_bytes = avail_kb * 1024;
  // /proc/self/cgroup: "0::PATH" (v2) and "N:CONTROLLERS:PATH" lines (v1; memory among them).
  for (absl::string_view line : absl::StrSplit(ReadAll(proc + "/self/cgroup"), '\n')) {
    std::vector<std::string> parts = absl::StrSplit(line, absl::MaxSplits(':', 2));
    if (parts.size() != 3 || parts[2].empty() || parts[2][0] != '/') continue;
    if (parts[0] == "0" && parts[1].empty()) {
      // Unified at the root (v2 only), or at unified/ beside the v1 controllers (hybrid).
      const bool unified_root = !ReadAll(cgroup_root + "/cgroup.controllers").empty();
      Walk(unified_root ? cgroup_root : cgroup_root + "/unified", parts[2], kV2, &m);
    } else {
      for (absl::string_view c : absl::StrSplit(parts[1], ',')) {
        if (c == "memory") Walk(cgroup_root + "/memory", parts[2], kV1, &m);
      }
    }
  }
  return m;
}

}  // namespace lorc
