// Developer switches read from the environment: the LORC_* A/B switches of the measurements in
// docs/PERFORMANCE.md and the test modes of the kernels (kernels/README.md lists each with what
// it changes). They are not settings a user needs (those are flags with one default each, in
// common/defaults.h), so they live outside the flags; but a value a switch does not accept is
// never taken silently: it is said on stderr, naming the variable, the value and what the switch
// accepts, and the switch keeps its default.
//
// Plain C++17 and header-only: the CUDA kernels' host code (nvcc, C++17) reads switches too.
#pragma once

#include <charconv>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <initializer_list>
#include <string>
#include <string_view>
#include <system_error>

namespace lorc {

// The integer in all of `text` (decimal, an optional '-'), or false when `text` is not one.
inline bool ParseEnvInt(std::string_view text, int64_t* out) {
  const char* end = text.data() + text.size();
  const auto [ptr, ec] = std::from_chars(text.data(), end, *out);
  return ec == std::errc() && ptr == end && !text.empty();
}

// The line a rejected value gets: "lorcserve: NAME=VALUE is not WHAT; the default applies".
inline void ReportEnvSwitch(const char* name, std::string_view value, std::string_view what) {
  std::fprintf(stderr, "lorcserve: %s=%.*s is not %.*s; the default applies\n", name, static_cast<int>(value.size()),
               value.data(), static_cast<int>(what.size()), what.data());
}

// Switch `name` as an integer in [lo, hi]: `fallback` when unset or empty, or (reported) when the
// value is not such an integer.
inline int64_t EnvInt(const char* name, int64_t lo, int64_t hi, int64_t fallback) {
  const char* e = std::getenv(name);
  if (e == nullptr || *e == '\0') return fallback;
  int64_t v = 0;
  if (ParseEnvInt(e, &v) && v >= lo && v <= hi) return v;
  ReportEnvSwitch(name, e, "an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]");
  return fallback;
}

// Switch `name` as one of `choices`: `fallback` when unset or empty, or (reported) when the value
// is not one of them.
inline int64_t EnvIntOf(const char* name, std::initializer_list<int64_t> choices, int64_t fallback) {
  const char* e = std::getenv(name);
  if (e == nullptr || *e == '\0') return fallback;
  int64_t v = 0;
  if (ParseEnvInt(e, &v)) {
    for (const int64_t c : choices) {
      if (v == c) return v;
    }
  }
  std::string what = "one of";
  for (const int64_t c : choices) what += " " + std::to_string(c);
  ReportEnvSwitch(name, e, what);
  return fallback;
}

// Switch `name` as 0 or 1.
inline bool EnvFlag(const char* name, bool fallback) { return EnvInt(name, 0, 1, fallback ? 1 : 0) != 0; }

}  // namespace lorc
