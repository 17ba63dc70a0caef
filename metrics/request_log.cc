#include "metrics/request_log.h"

#include <cmath>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "nlohmann/json.hpp"

namespace lorc {
namespace {

std::string Timestamp(absl::Time now) {
  return absl::FormatTime("%Y-%m-%dT%H:%M:%E3SZ", now, absl::UTCTimeZone());
}

std::string Ms(double seconds) { return absl::StrFormat("%.3f", seconds * 1e3); }
// Milliseconds rounded to microseconds (JSON numbers).
double RoundedMs(double seconds) { return std::round(seconds * 1e6) / 1e3; }

// A logfmt value between double quotes: backslash, the quote and control bytes escaped (\n, \t,
// \r, else \xHH), bytes outside ASCII as \xHH too (a client's request_id need not be UTF-8);
// everything else as is. (absl::CEscape also escaped the apostrophe: "the model\'s".)
std::string LogfmtQuoted(std::string_view v) {
  std::string out = "\"";
  for (const char ch : v) {
    const unsigned char c = static_cast<unsigned char>(ch);
    switch (c) {
      case '\\': out += "\\\\"; break;
      case '"': out += "\\\""; break;
      case '\n': out += "\\n"; break;
      case '\t': out += "\\t"; break;
      case '\r': out += "\\r"; break;
      default:
        if (c < 0x20 || c >= 0x7f) {
          absl::StrAppendFormat(&out, "\\x%02x", c);
        } else {
          out += ch;
        }
    }
  }
  return out + "\"";
}

}  // namespace

absl::StatusOr<LogFormat> ParseLogFormat(std::string_view s) {
  if (s == "text") return LogFormat::kText;
  if (s == "json") return LogFormat::kJson;
  return absl::InvalidArgumentError(absl::StrCat("--log-format must be text or json, got '", std::string(s), "'"));
}

std::string FormatRequestLine(const RequestLogRecord& r, LogFormat format, absl::Time now) {
  if (format == LogFormat::kJson) {
    nlohmann::ordered_json j = {
        {"ts", Timestamp(now)},
        {"event", "request"},
        {"request_id", r.request_id},
        {"outcome", r.outcome},
        {"n", r.n},
        {"prompt_tokens", r.prompt_tokens},
        {"cached_prompt_tokens", r.cached_prompt_tokens},
        {"completion_tokens", r.completion_tokens},
        {"ttft_ms", r.ttft_s >= 0 ? nlohmann::ordered_json(RoundedMs(r.ttft_s))
                                  : nlohmann::ordered_json(nullptr)},
        {"duration_ms", RoundedMs(r.duration_s)},
    };
    if (!r.status_message.empty()) j["status"] = r.status_message;
    // Invalid UTF-8 (a client's request_id) is replaced rather than thrown on.
    return j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) + "\n";
  }
  std::string line = absl::StrCat(
      "lorcserve request id=", LogfmtQuoted(r.request_id), " outcome=", r.outcome,
      " prompt_tokens=", r.prompt_tokens, " cached_prompt_tokens=", r.cached_prompt_tokens,
      " completion_tokens=", r.completion_tokens, " n=", r.n,
      " ttft_ms=", r.ttft_s >= 0 ? Ms(r.ttft_s) : "-1", " duration_ms=", Ms(r.duration_s));
  if (!r.status_message.empty()) {
    absl::StrAppend(&line, " status=", LogfmtQuoted(r.status_message));
  }
  return line + "\n";
}

std::string FormatWorkerLine(const WorkerEvent& e, LogFormat format, absl::Time now) {
  if (format == LogFormat::kJson) {
    nlohmann::ordered_json j = {{"ts", Timestamp(now)},
                        {"event", absl::StrCat("worker_", e.event)},
                        {"message", e.message}};
    if (e.rank >= 0) j["rank"] = e.rank;
    return j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) + "\n";
  }
  return absl::StrCat("lorcserve coordinator: ", e.message, "\n");
}

void EventLog::Request(const RequestLogRecord& r) const {
  Write(FormatRequestLine(r, format_, absl::Now()));
}

void EventLog::Worker(const WorkerEvent& e) const {
  Write(FormatWorkerLine(e, format_, absl::Now()));
}

void EventLog::Write(const std::string& line) const {
  std::fwrite(line.data(), 1, line.size(), out_);
  std::fflush(out_);
}

}  // namespace lorc
