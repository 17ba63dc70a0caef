#include "worker/ownership.h"

#include <iostream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace lorc {

Ownership::Ownership(absl::Duration lease, std::function<absl::Time()> now)
    : lease_(lease), now_(now != nullptr ? std::move(now) : [] { return absl::Now(); }) {}

void Ownership::ReleaseLocked(absl::string_view why) {
  // One string, one write (workers sharing a coordinator's stderr stop together).
  std::cerr << absl::StrCat("lorcserve worker: no longer serving ", DescribeCoordinator(*owner_), ": ", why, "\n");
  owner_.reset();
  open_calls_ = 0;
  release_pending_ = false;
  ++epoch_;
}

void Ownership::ExpireLocked(absl::Time now) {
  if (owner_.has_value() && open_calls_ == 0 && now - last_seen_ >= lease_) {
    ReleaseLocked(absl::StrCat("silent for ", absl::FormatDuration(now - last_seen_),
                               " (lease ", absl::FormatDuration(lease_), ")"));
  }
}

absl::StatusOr<uint64_t> Ownership::Begin(const CoordinatorRef& c, bool claim, absl::string_view what) {
  if (c.id == 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        what, ": the caller names no coordinator (a nonzero `coordinator.id`, or metadata `",
        kCoordinatorIdMetadata, "` on step calls)"));
  }
  absl::MutexLock lock(&mu_);
  const absl::Time now = now_();
  ExpireLocked(now);
  if (!owner_.has_value()) {
    if (!claim) {
      return absl::FailedPreconditionError(absl::StrCat(
          what, " from ", DescribeCoordinator(c),
          ": no coordinator owns this worker (InitCommunicator or LoadModel first)"));
    }
    owner_ = c;
    ++epoch_;
    std::cerr << absl::StrCat("lorcserve worker: serving ", DescribeCoordinator(c), "\n");
  } else if (owner_->id != c.id) {
    return absl::FailedPreconditionError(
        absl::StrCat(what, " from ", DescribeCoordinator(c), " refused: this worker is serving ",
                     DescribeCoordinator(*owner_), " (it is free once that coordinator exits or closes its ",
                     "step stream, or after about ", absl::FormatDuration(lease_),
                     " without a call from it while none is open, or without answers to the keepalive ",
                     "pings on its connection while its stream is open: a hung coordinator)"));
  }
  if (!c.address.empty()) owner_->address = c.address;
  ++open_calls_;
  last_seen_ = now;
  return epoch_;
}

void Ownership::EndLocked(uint64_t epoch, absl::string_view release_why) {
  if (epoch != epoch_ || !owner_.has_value()) return;  // the worker changed hands meanwhile
  --open_calls_;
  last_seen_ = now_();
  if (open_calls_ > 0) return;
  if (!release_why.empty()) {
    ReleaseLocked(release_why);
  } else if (release_pending_) {
    ReleaseLocked("it released this worker (its last call ended)");
  }
}

void Ownership::End(uint64_t epoch, bool owner_closed_stream) {
  absl::MutexLock lock(&mu_);
  EndLocked(epoch, owner_closed_stream ? "it closed its step stream" : "");
}

void Ownership::EndFailedSetup(uint64_t epoch, absl::string_view what) {
  absl::MutexLock lock(&mu_);
  EndLocked(epoch, absl::StrCat("its ", what, " failed"));
}

bool Ownership::Release(const CoordinatorRef& c) {
  absl::MutexLock lock(&mu_);
  ExpireLocked(now_());
  if (!owner_.has_value() || c.id == 0 || owner_->id != c.id) return false;
  if (open_calls_ == 0) {
    ReleaseLocked("it released this worker");
  } else {
    release_pending_ = true;
  }
  return true;
}

void Ownership::Touch(const CoordinatorRef& c) {
  absl::MutexLock lock(&mu_);
  const absl::Time now = now_();
  ExpireLocked(now);
  if (owner_.has_value() && c.id != 0 && owner_->id == c.id) last_seen_ = now;
}

std::optional<CoordinatorRef> Ownership::owner() {
  absl::MutexLock lock(&mu_);
  ExpireLocked(now_());
  return owner_;
}

}  // namespace lorc
