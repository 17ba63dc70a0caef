// ThreadSanitizer hooks for abseil's synchronization primitives (linked only into the
// LORC_SANITIZE=thread build; see scripts/sanitizers/README.md).
//
// Debian's libabsl_synchronization is not instrumented: absl::Mutex locks with atomics and futexes
// inside that library, so ThreadSanitizer sees none of its happens-before edges and would report
// every access guarded by an absl::Mutex as a race. These definitions interpose the library's own
// (an executable's symbols come first in the dynamic lookup), call the real function through
// dlsym(RTLD_NEXT) and tell ThreadSanitizer what it did: __tsan_release before a lock is given up
// (Unlock, and Await / CondVar::Wait, which give it up while waiting), __tsan_acquire after it is
// taken; Notification::Notify releases and the waits acquire. The mutex semantics stay abseil's.
#include <dlfcn.h>
#include <sanitizer/tsan_interface.h>

#include <cstdio>
#include <cstdlib>
#include <string>

#include "absl/base/options.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"

static_assert(ABSL_OPTION_USE_INLINE_NAMESPACE == 1,
              "the mangled names below assume abseil's inline namespace");

#define LORC_TSAN_STR2(x) #x
#define LORC_TSAN_STR(x) LORC_TSAN_STR2(x)

namespace {

// The library's definition of `absl::<ns>::<tail>`; `head` is "_ZN" (or "_ZNK" for a const
// member), `tail` the rest of the Itanium mangled name after the namespace.
template <typename Fn>
Fn Real(const char* head, const char* tail) {
  const std::string ns = LORC_TSAN_STR(ABSL_OPTION_INLINE_NAMESPACE_NAME);
  const std::string name = std::string(head) + "4absl" + std::to_string(ns.size()) + ns + tail;
  void* fn = dlsym(RTLD_NEXT, name.c_str());
  if (fn == nullptr) {
    std::fprintf(stderr, "tsan_absl_sync: %s not found in abseil\n", name.c_str());
    std::abort();
  }
  return reinterpret_cast<Fn>(fn);
}

void Acquire(const void* p) { __tsan_acquire(const_cast<void*>(p)); }
void Release(const void* p) { __tsan_release(const_cast<void*>(p)); }

// abseil evaluates a waiter's condition with the mutex held, on the waiting thread or on the one
// unlocking, inside the library: each evaluation is bracketed by an acquire and a release of the
// mutex, so what the condition reads is ordered with the writes made under the lock (without
// this, a condition reading a queue that another thread pushes to under the lock is a reported
// race: EngineLoop::Run's wake condition, seen in coordinator_engine_loop_test).
struct GuardedCondition {
  const absl::Condition* cond;
  const void* mu;
  static bool Eval(GuardedCondition* g) {
    Acquire(g->mu);
    const bool result = g->cond->Eval();
    Release(g->mu);
    return result;
  }
};

}  // namespace

namespace absl {
ABSL_NAMESPACE_BEGIN

// --- Mutex: lock, unlock ---------------------------------------------------------------------
void Mutex::Lock() {
  static const auto real = Real<void (*)(Mutex*)>("_ZN", "5Mutex4LockEv");
  real(this);
  Acquire(this);
}
void Mutex::ReaderLock() {
  static const auto real = Real<void (*)(Mutex*)>("_ZN", "5Mutex10ReaderLockEv");
  real(this);
  Acquire(this);
}
bool Mutex::TryLock() {
  static const auto real = Real<bool (*)(Mutex*)>("_ZN", "5Mutex7TryLockEv");
  const bool locked = real(this);
  if (locked) Acquire(this);
  return locked;
}
bool Mutex::ReaderTryLock() {
  static const auto real = Real<bool (*)(Mutex*)>("_ZN", "5Mutex13ReaderTryLockEv");
  const bool locked = real(this);
  if (locked) Acquire(this);
  return locked;
}
void Mutex::Unlock() {
  static const auto real = Real<void (*)(Mutex*)>("_ZN", "5Mutex6UnlockEv");
  Release(this);
  real(this);
}
void Mutex::ReaderUnlock() {
  static const auto real = Real<void (*)(Mutex*)>("_ZN", "5Mutex12ReaderUnlockEv");
  Release(this);
  real(this);
}

// --- Mutex: conditional locks (the lock is held on return, whatever the result) ---------------
void Mutex::LockWhen(const Condition& cond) {
  static const auto real =
      Real<void (*)(Mutex*, const Condition&)>("_ZN", "5Mutex8LockWhenERKNS0_9ConditionE");
  GuardedCondition g{&cond, this};
  real(this, absl::Condition(&GuardedCondition::Eval, &g));
  Acquire(this);
}
void Mutex::ReaderLockWhen(const Condition& cond) {
  static const auto real =
      Real<void (*)(Mutex*, const Condition&)>("_ZN", "5Mutex14ReaderLockWhenERKNS0_9ConditionE");
  GuardedCondition g{&cond, this};
  real(this, absl::Condition(&GuardedCondition::Eval, &g));
  Acquire(this);
}
bool Mutex::LockWhenWithTimeout(const Condition& cond, absl::Duration timeout) {
  static const auto real = Real<bool (*)(Mutex*, const Condition&, absl::Duration)>(
      "_ZN", "5Mutex19LockWhenWithTimeoutERKNS0_9ConditionENS0_8DurationE");
  GuardedCondition g{&cond, this};
  const bool met = real(this, absl::Condition(&GuardedCondition::Eval, &g), timeout);
  Acquire(this);
  return met;
}
bool Mutex::LockWhenWithDeadline(const Condition& cond, absl::Time deadline) {
  static const auto real = Real<bool (*)(Mutex*, const Condition&, absl::Time)>(
      "_ZN", "5Mutex20LockWhenWithDeadlineERKNS0_9ConditionENS0_4TimeE");
  GuardedCondition g{&cond, this};
  const bool met = real(this, absl::Condition(&GuardedCondition::Eval, &g), deadline);
  Acquire(this);
  return met;
}
bool Mutex::ReaderLockWhenWithTimeout(const Condition& cond, absl::Duration timeout) {
  static const auto real = Real<bool (*)(Mutex*, const Condition&, absl::Duration)>(
      "_ZN", "5Mutex25ReaderLockWhenWithTimeoutERKNS0_9ConditionENS0_8DurationE");
  GuardedCondition g{&cond, this};
  const bool met = real(this, absl::Condition(&GuardedCondition::Eval, &g), timeout);
  Acquire(this);
  return met;
}
bool Mutex::ReaderLockWhenWithDeadline(const Condition& cond, absl::Time deadline) {
  static const auto real = Real<bool (*)(Mutex*, const Condition&, absl::Time)>(
      "_ZN", "5Mutex26ReaderLockWhenWithDeadlineERKNS0_9ConditionENS0_4TimeE");
  GuardedCondition g{&cond, this};
  const bool met = real(this, absl::Condition(&GuardedCondition::Eval, &g), deadline);
  Acquire(this);
  return met;
}

// --- Mutex: Await gives the lock up while it waits ---------------------------------------------
void Mutex::Await(const Condition& cond) {
  static const auto real =
      Real<void (*)(Mutex*, const Condition&)>("_ZN", "5Mutex5AwaitERKNS0_9ConditionE");
  Release(this);
  GuardedCondition g{&cond, this};
  real(this, absl::Condition(&GuardedCondition::Eval, &g));
  Acquire(this);
}
bool Mutex::AwaitWithTimeout(const Condition& cond, absl::Duration timeout) {
  static const auto real = Real<bool (*)(Mutex*, const Condition&, absl::Duration)>(
      "_ZN", "5Mutex16AwaitWithTimeoutERKNS0_9ConditionENS0_8DurationE");
  Release(this);
  GuardedCondition g{&cond, this};
  const bool met = real(this, absl::Condition(&GuardedCondition::Eval, &g), timeout);
  Acquire(this);
  return met;
}
bool Mutex::AwaitWithDeadline(const Condition& cond, absl::Time deadline) {
  static const auto real = Real<bool (*)(Mutex*, const Condition&, absl::Time)>(
      "_ZN", "5Mutex17AwaitWithDeadlineERKNS0_9ConditionENS0_4TimeE");
  Release(this);
  GuardedCondition g{&cond, this};
  const bool met = real(this, absl::Condition(&GuardedCondition::Eval, &g), deadline);
  Acquire(this);
  return met;
}

// --- CondVar: the wait gives `mu` up and takes it again -----------------------------------------
void CondVar::Wait(Mutex* mu) {
  static const auto real = Real<void (*)(CondVar*, Mutex*)>("_ZN", "7CondVar4WaitEPNS0_5MutexE");
  Release(mu);
  real(this, mu);
  Acquire(mu);
}
bool CondVar::WaitWithTimeout(Mutex* mu, absl::Duration timeout) {
  static const auto real = Real<bool (*)(CondVar*, Mutex*, absl::Duration)>(
      "_ZN", "7CondVar15WaitWithTimeoutEPNS0_5MutexENS0_8DurationE");
  Release(mu);
  const bool timed_out = real(this, mu, timeout);
  Acquire(mu);
  return timed_out;
}
bool CondVar::WaitWithDeadline(Mutex* mu, absl::Time deadline) {
  static const auto real = Real<bool (*)(CondVar*, Mutex*, absl::Time)>(
      "_ZN", "7CondVar16WaitWithDeadlineEPNS0_5MutexENS0_4TimeE");
  Release(mu);
  const bool timed_out = real(this, mu, deadline);
  Acquire(mu);
  return timed_out;
}

// --- Notification --------------------------------------------------------------------------------
void Notification::Notify() {
  static const auto real = Real<void (*)(Notification*)>("_ZN", "12Notification6NotifyEv");
  Release(this);
  real(this);
}
void Notification::WaitForNotification() const {
  static const auto real =
      Real<void (*)(const Notification*)>("_ZNK", "12Notification19WaitForNotificationEv");
  real(this);
  Acquire(this);
}
bool Notification::WaitForNotificationWithTimeout(absl::Duration timeout) const {
  static const auto real = Real<bool (*)(const Notification*, absl::Duration)>(
      "_ZNK", "12Notification30WaitForNotificationWithTimeoutENS0_8DurationE");
  const bool notified = real(this, timeout);
  if (notified) Acquire(this);
  return notified;
}
bool Notification::WaitForNotificationWithDeadline(absl::Time deadline) const {
  static const auto real = Real<bool (*)(const Notification*, absl::Time)>(
      "_ZNK", "12Notification31WaitForNotificationWithDeadlineENS0_4TimeE");
  const bool notified = real(this, deadline);
  if (notified) Acquire(this);
  return notified;
}

ABSL_NAMESPACE_END
}  // namespace absl
