// Bootstrap key-value store used by communicators to find each other, plus the join protocol that
// every communicator factory runs before its backend's own setup.
#pragma once

#include <functional>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "worker/comm/world_config.h"

namespace lorc {

// Write-mostly key-value store shared by all ranks of a group: rank 0 publishes, others wait.
// Values are arbitrary bytes (std::string may hold NULs). Keys are namespaced by the caller, by
// convention "<group>/<name>" (see GroupKey); a group name must not be reused on the same store
// for a second communicator (stale keys would be seen), so callers that re-create a group put a
// generation number into the group name.
//
// Implementations must be thread-safe. A remote implementation (the coordinator's) only has to
// provide these two calls; Get is expected to long-poll until the key exists or the timeout ends.
class RendezvousStore {
 public:
  virtual ~RendezvousStore() = default;

  // Stores `value` under `key`, replacing any earlier value, and wakes waiters.
  virtual absl::Status Set(const std::string& key, const std::string& value) = 0;

  // Blocks until `key` exists or `timeout` passes (DeadlineExceeded naming the key). A timeout
  // <= 0 checks once without waiting; absl::InfiniteDuration() waits forever.
  virtual absl::StatusOr<std::string> Get(const std::string& key, absl::Duration timeout) = 0;
};

// In-memory store for the threads of one process (tests, single-process multi-GPU).
class InProcessStore final : public RendezvousStore {
 public:
  InProcessStore() = default;
  InProcessStore(const InProcessStore&) = delete;
  InProcessStore& operator=(const InProcessStore&) = delete;

  absl::Status Set(const std::string& key, const std::string& value) override;
  absl::StatusOr<std::string> Get(const std::string& key, absl::Duration timeout) override;
  // As Get, and ends early with CANCELLED once `cancelled()` returns true (asked at least every
  // 100 ms while waiting; null: never): a server's handler whose call was cancelled.
  absl::StatusOr<std::string> Get(const std::string& key, absl::Duration timeout,
                                  const std::function<bool()>& cancelled);

 private:
  absl::Mutex mu_;
  absl::CondVar changed_;
  absl::flat_hash_map<std::string, std::string> values_ ABSL_GUARDED_BY(mu_);
};

// "<group>/<name>": the key layout every communicator uses.
std::string GroupKey(const std::string& group, const std::string& name);

// The join protocol: publishes GroupKey(group, "arrived/<rank>"), then waits until
// `start + timeout` for every other rank's arrived key. On timeout returns DeadlineExceeded
// naming every rank that is missing, e.g.
//   "tp group: rank(s) 1, 3 of 4 did not join within 5s (waiting on rank 0)".
// Store errors other than DeadlineExceeded are returned as they are.
absl::Status JoinGroup(RendezvousStore* store, const std::string& group,
                       const WorldConfig& world, absl::Time start, absl::Duration timeout);

}  // namespace lorc
