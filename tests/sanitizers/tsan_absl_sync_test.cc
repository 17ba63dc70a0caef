// Built only with LORC_SANITIZE=thread (scripts/sanitize.sh tsan): checks that the abseil hooks of
// scripts/sanitizers/tsan_absl_sync.cc give ThreadSanitizer the happens-before edges of
// absl::Mutex, CondVar and Notification. Without them each case below is reported as a data race
// (and the report fails the run: halt_on_error, and sanitize.sh fails on any report file).
#include <thread>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "gtest/gtest.h"

namespace {

TEST(TsanAbslSync, MutexGuardedCountersAreNotRaces) {
  absl::Mutex mu;
  int count = 0;  // guarded by mu, a plain int so that a missing edge is a race
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 500; ++i) {
        absl::MutexLock lock(&mu);
        ++count;
      }
    });
  }
  for (auto& t : threads) t.join();
  absl::MutexLock lock(&mu);
  EXPECT_EQ(count, 2000);
}

TEST(TsanAbslSync, AwaitAndCondVarHandOffData) {
  absl::Mutex mu;
  absl::CondVar cv;
  int payload = 0;
  bool ready = false;
  bool seen = false;
  std::thread producer([&] {
    absl::MutexLock lock(&mu);
    payload = 42;
    ready = true;
    cv.Signal();
  });
  {
    absl::MutexLock lock(&mu);
    mu.Await(absl::Condition(&ready));
    EXPECT_EQ(payload, 42);
    payload = 43;
  }
  std::thread consumer([&] {
    absl::MutexLock lock(&mu);
    while (!seen) cv.WaitWithTimeout(&mu, absl::Milliseconds(10));
    EXPECT_EQ(payload, 44);
  });
  {
    absl::MutexLock lock(&mu);
    payload = 44;
    seen = true;
    cv.Signal();
  }
  producer.join();
  consumer.join();
}

TEST(TsanAbslSync, NotificationPublishesWhatWasWrittenBefore) {
  absl::Notification done;
  int payload = 0;
  std::thread t([&] {
    payload = 7;
    done.Notify();
  });
  done.WaitForNotification();
  EXPECT_EQ(payload, 7);
  t.join();
}

}  // namespace
