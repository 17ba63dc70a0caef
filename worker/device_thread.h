// One thread that runs posted work items one at a time, in the order they were posted.
//
// The worker gives its device state (Backend, loaded model, Communicator, StepExecutor) to one
// DeviceThread: that state is created, used and destroyed only by work items running there
// (a CUDA device and stream are current per thread; CUDA graph capture needs one thread), and
// gRPC handler threads only post work and wait for, or stream back, its results.
//
// Shutdown: Shutdown() (also run by the destructor) stops accepting work (Post returns false,
// Call returns UNAVAILABLE), lets every item already queued run to completion, in order, and
// joins the thread. Accepted items are never dropped, so whoever waits on one gets its result.
//
// Threads: Post and Call from any thread but the device thread itself (a Call from there would
// wait on itself: a programmer error, CHECK-failed); Shutdown from any thread but the device
// thread. Work items must not throw.
#pragma once

#include <cstddef>
#include <deque>
#include <optional>
#include <thread>
#include <type_traits>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/functional/any_invocable.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "common/check.h"

namespace lorc {

class DeviceThread {
 public:
  using Work = absl::AnyInvocable<void() &&>;

  DeviceThread();  // starts the thread
  ~DeviceThread();
  DeviceThread(const DeviceThread&) = delete;
  DeviceThread& operator=(const DeviceThread&) = delete;

  // Queues `work` to run after every item posted before it and returns at once. False (and
  // `work` is destroyed unrun) once Shutdown has begun.
  bool Post(Work work) ABSL_LOCKS_EXCLUDED(mu_);

  // Runs `fn` (returning absl::Status or absl::StatusOr<T>) on the device thread after every
  // item posted before it, and returns its result; UNAVAILABLE when shutting down.
  template <typename F>
  std::invoke_result_t<F&> Call(F fn);

  // Stops accepting work, runs what is queued, joins the thread. Idempotent.
  void Shutdown() ABSL_LOCKS_EXCLUDED(mu_);

  // True when called on the device thread.
  bool IsCurrent() const { return std::this_thread::get_id() == id_; }
  std::thread::id id() const { return id_; }
  // Items queued and not yet started (the running one excluded).
  size_t queued() const ABSL_LOCKS_EXCLUDED(mu_);

 private:
  void Loop();

  mutable absl::Mutex mu_;
  std::deque<Work> queue_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::thread thread_;
  std::thread::id id_;
};

// The error Call returns once Shutdown has begun (UNAVAILABLE).
absl::Status DeviceThreadStopped();

template <typename F>
std::invoke_result_t<F&> DeviceThread::Call(F fn) {
  using R = std::invoke_result_t<F&>;
  static_assert(std::is_constructible_v<R, absl::Status>, "fn must return Status or StatusOr");
  CHECK(!IsCurrent()) << "DeviceThread::Call from the device thread would wait on itself";
  std::optional<R> result;
  absl::Notification done;
  if (!Post([&] {
        result.emplace(fn());
        done.Notify();
      })) {
    return DeviceThreadStopped();
  }
  done.WaitForNotification();
  return *std::move(result);
}

}  // namespace lorc
