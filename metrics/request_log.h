// Structured log lines on stderr: one per finished request (a Generate call) and one per worker
// event (join, failure, restart, recovery, give-up). `--log-format text` (default) writes
// human-readable lines, `--log-format json` one JSON object per line (nlohmann-json), for log
// shippers. The single place the coordinator's operational log lines are formatted.
//
// Threads: EventLog's methods are safe from any thread; each line goes out with one fwrite
// (stdio's lock keeps lines whole).
#pragma once

#include <cstdint>
#include <cstdio>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace lorc {

enum class LogFormat { kText, kJson };

// "text" or "json"; INVALID_ARGUMENT naming --log-format otherwise.
absl::StatusOr<LogFormat> ParseLogFormat(std::string_view s);

// One finished Generate call (all its completions), as its handler saw it.
struct RequestLogRecord {
  std::string request_id;           // the client's request_id, or "req-<n>"
  std::string outcome;              // lorcserve_requests_total's label ("stop", "cancelled", ...)
  std::string status_message;       // empty when served to the end
  int32_t n = 1;                    // completions
  int64_t prompt_tokens = 0;        // 0 when rejected before tokenization
  int64_t cached_prompt_tokens = 0; // found in the prefix cache
  int64_t completion_tokens = 0;    // tokens sent to the client, all completions
  double ttft_s = -1;               // call start to the first token sent; < 0: none sent
  double duration_s = 0;            // call start to its end
};

// Worker events: "join" (a group serves), "failure", "restart" (a local worker process),
// "kill" (an unresponsive local worker), "recovery" (re-joined and serving), "recovery_failed"
// (one attempt), "give_up" (out of restarts), "kv_cache_small" (a group serves with a KV cache
// smaller than one sequence of max_model_len).
struct WorkerEvent {
  std::string event;
  std::string message;  // human-readable, also the whole text-format line after the prefix
  int32_t rank = -1;    // the worker concerned, or -1
};

// The line (with its trailing '\n'). Text: `lorcserve request id="..." outcome=stop
// prompt_tokens=.. cached_prompt_tokens=.. completion_tokens=.. n=.. ttft_ms=.. duration_ms=..
// [status="..."]` (ttft_ms=-1 when no token was sent). JSON: {"ts": RFC 3339 UTC,
// "event": "request", "request_id", "outcome", "n", "prompt_tokens", "cached_prompt_tokens",
// "completion_tokens", "ttft_ms" (null when none), "duration_ms", ["status"]}.
std::string FormatRequestLine(const RequestLogRecord& r, LogFormat format, absl::Time now);
// Text: `lorcserve coordinator: <message>`. JSON: {"ts", "event": "worker_<event>", "message",
// ["rank"]}.
std::string FormatWorkerLine(const WorkerEvent& e, LogFormat format, absl::Time now);

class EventLog {
 public:
  explicit EventLog(LogFormat format, std::FILE* out = stderr) : format_(format), out_(out) {}
  LogFormat format() const { return format_; }
  void Request(const RequestLogRecord& r) const;
  void Worker(const WorkerEvent& e) const;

 private:
  void Write(const std::string& line) const;
  const LogFormat format_;
  std::FILE* const out_;
};

}  // namespace lorc
