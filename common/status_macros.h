// Status propagation helpers used across every module boundary.
#pragma once

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define LORC_CONCAT_INNER_(a, b) a##b
#define LORC_CONCAT_(a, b) LORC_CONCAT_INNER_(a, b)

// Returns from the enclosing function when `expr` (an absl::Status) is not OK.
#define RETURN_IF_ERROR(expr)                      \
  do {                                             \
    ::absl::Status lorc_status_ = (expr);          \
    if (!lorc_status_.ok()) return lorc_status_;   \
  } while (0)

// `lhs` = value of the absl::StatusOr `rexpr`, or return its status.
#define ASSIGN_OR_RETURN(lhs, rexpr) \
  ASSIGN_OR_RETURN_IMPL_(LORC_CONCAT_(lorc_statusor_, __LINE__), lhs, rexpr)
#define ASSIGN_OR_RETURN_IMPL_(tmp, lhs, rexpr) \
  auto tmp = (rexpr);                           \
  if (!tmp.ok()) return std::move(tmp).status(); \
  lhs = std::move(tmp).value()
