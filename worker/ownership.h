// Which coordinator a worker serves (its owner), and for how long.
//
// A worker serves one coordinator at a time. A coordinator draws a random nonzero 64-bit id when
// it starts and names itself (id and serving address) on every worker call. Rules (the Worker
// service comment in proto/lorcserve/internal/worker.proto states them for clients):
// - an unowned worker is taken by the first claiming call (InitCommunicator, LoadModel);
// - while owned, any call from another coordinator is refused with FAILED_PRECONDITION naming
//   the owner (and changes nothing); the owner may claim again (a group restart);
// - ownership ends when the owner closes or cancels a step stream and no other call of its is
//   open, when its InitCommunicator or LoadModel fails and no other call of its is open (nothing
//   of its is left to protect: a coordinator that gives up after a failed load must not lock the
//   worker for the lease), or when the owner has sent nothing for `lease` while no call of its
//   is open.
//
// Threads: every method may be called from any thread; one mutex, held only for bookkeeping
// (never across device work), so Ping never waits behind a step.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "step/coordinator_ref.h"

namespace lorc {

class Ownership {
 public:
  // `now` is the clock (tests pass a fake one); default absl::Now.
  explicit Ownership(absl::Duration lease, std::function<absl::Time()> now = nullptr);

  // A call from `c` begins (`what` names it for messages). `claim`: the call may take an
  // unowned worker. Returns the ownership epoch the call runs under (pass it to End).
  // INVALID_ARGUMENT when c.id is 0; FAILED_PRECONDITION naming the owner when another
  // coordinator owns the worker, or (for a non-claiming call) when nobody owns it.
  absl::StatusOr<uint64_t> Begin(const CoordinatorRef& c, bool claim, absl::string_view what)
      ABSL_LOCKS_EXCLUDED(mu_);
  // The call begun under `epoch` ended. `owner_closed_stream`: it was a step stream that the
  // coordinator closed or cancelled, which releases the worker once no other call is open.
  void End(uint64_t epoch, bool owner_closed_stream) ABSL_LOCKS_EXCLUDED(mu_);
  // A claiming call begun under `epoch` (`what`: InitCommunicator, LoadModel) failed: ends it and
  // releases the worker once no other call is open; the owner may claim it again.
  void EndFailedSetup(uint64_t epoch, absl::string_view what) ABSL_LOCKS_EXCLUDED(mu_);
  // A Ping from `c`: renews the lease when `c` is the owner.
  void Touch(const CoordinatorRef& c) ABSL_LOCKS_EXCLUDED(mu_);
  // The owner `c` gives the worker up (a coordinator at its exit): released at once when none
  // of its calls is open, else when the last one ends. Returns whether `c` owned the worker; a
  // call from anyone else changes nothing. Without it a worker whose step stream the worker
  // itself had ended (a failed step) stayed owned for the lease after its coordinator exited,
  // and a restarted coordinator was refused.
  bool Release(const CoordinatorRef& c) ABSL_LOCKS_EXCLUDED(mu_);
  // The owner (none once its lease expired).
  std::optional<CoordinatorRef> owner() ABSL_LOCKS_EXCLUDED(mu_);

  absl::Duration lease() const { return lease_; }

 private:
  void ExpireLocked(absl::Time now) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void ReleaseLocked(absl::string_view why) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // End's bookkeeping; releases the worker with `release_why` (non-empty) once no call is open.
  void EndLocked(uint64_t epoch, absl::string_view release_why) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const absl::Duration lease_;
  const std::function<absl::Time()> now_;
  absl::Mutex mu_;
  std::optional<CoordinatorRef> owner_ ABSL_GUARDED_BY(mu_);
  uint64_t epoch_ ABSL_GUARDED_BY(mu_) = 0;      // bumped whenever the owner changes
  int open_calls_ ABSL_GUARDED_BY(mu_) = 0;      // the owner's calls in progress
  absl::Time last_seen_ ABSL_GUARDED_BY(mu_);    // the owner's last call (start or end) or Ping
  bool release_pending_ ABSL_GUARDED_BY(mu_) = false;  // Release came while calls were open
};

}  // namespace lorc
