#include "worker/comm/rendezvous.h"

#include <algorithm>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status_macros.h"

namespace lorc {

absl::Status InProcessStore::Set(const std::string& key, const std::string& value) {
  absl::MutexLock lock(&mu_);
  values_[key] = value;
  changed_.SignalAll();
  return absl::OkStatus();
}

absl::StatusOr<std::string> InProcessStore::Get(const std::string& key, absl::Duration timeout) {
  return Get(key, timeout, nullptr);
}

absl::StatusOr<std::string> InProcessStore::Get(const std::string& key, absl::Duration timeout,
                                                const std::function<bool()>& cancelled) {
  const absl::Time deadline =
      timeout == absl::InfiniteDuration() ? absl::InfiniteFuture() : absl::Now() + timeout;
  absl::MutexLock lock(&mu_);
  while (true) {
    auto it = values_.find(key);
    if (it != values_.end()) return it->second;
    // WaitWithDeadline returns true once the deadline has passed; re-check the key once more
    // so that a value set exactly at the deadline is still seen.
    if (absl::Now() >= deadline) break;
    if (cancelled != nullptr && cancelled()) {
      return absl::CancelledError(absl::StrCat("rendezvous key '", key, "': the wait was cancelled"));
    }
    changed_.WaitWithDeadline(
        &mu_, cancelled != nullptr ? std::min(deadline, absl::Now() + absl::Milliseconds(100)) : deadline);
  }
  return absl::DeadlineExceededError(absl::StrCat("rendezvous key '", key,
                                                  "' not set within ",
                                                  absl::FormatDuration(timeout)));
}

std::string GroupKey(const std::string& group, const std::string& name) {
  return absl::StrCat(group, "/", name);
}

absl::Status JoinGroup(RendezvousStore* store, const std::string& group,
                       const WorldConfig& world, absl::Time start, absl::Duration timeout) {
  RETURN_IF_ERROR(ValidateWorldConfig(world));
  if (store == nullptr) return absl::InvalidArgumentError("rendezvous store is null");
  const absl::Time deadline = start + timeout;
  RETURN_IF_ERROR(
      store->Set(GroupKey(group, absl::StrCat("arrived/", world.rank)), std::to_string(world.rank)));

  std::vector<int> missing;
  for (int r = 0; r < world.world_size; ++r) {
    if (r == world.rank) continue;
    // Once the deadline has passed the remaining keys are only checked, not waited for, so the
    // error can name every absent rank rather than the first one.
    const absl::Duration left = std::max(deadline - absl::Now(), absl::ZeroDuration());
    absl::StatusOr<std::string> v = store->Get(GroupKey(group, absl::StrCat("arrived/", r)), left);
    if (v.ok()) continue;
    if (v.status().code() != absl::StatusCode::kDeadlineExceeded) {
      return absl::Status(v.status().code(),
                          absl::StrCat(group, " group: rendezvous store failed while waiting for rank ",
                                       r, ": ", v.status().message()));
    }
    missing.push_back(r);
  }
  if (missing.empty()) return absl::OkStatus();
  return absl::DeadlineExceededError(absl::StrCat(
      group, " group: rank(s) ", absl::StrJoin(missing, ", "), " of ", world.world_size,
      " did not join within ", absl::FormatDuration(timeout), " (waiting on rank ", world.rank,
      ")"));
}

}  // namespace lorc
