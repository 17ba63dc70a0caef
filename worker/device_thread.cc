#include "worker/device_thread.h"

namespace lorc {

absl::Status DeviceThreadStopped() {
  return absl::UnavailableError("the worker's device thread is shutting down");
}

DeviceThread::DeviceThread() {
  absl::Notification started;
  thread_ = std::thread([this, &started] {
    id_ = std::this_thread::get_id();
    started.Notify();
    Loop();
  });
  started.WaitForNotification();  // id_ is set before anyone can ask IsCurrent()
}

DeviceThread::~DeviceThread() { Shutdown(); }

bool DeviceThread::Post(Work work) {
  absl::MutexLock lock(&mu_);
  if (stopping_) return false;
  queue_.push_back(std::move(work));
  return true;
}

size_t DeviceThread::queued() const {
  absl::MutexLock lock(&mu_);
  return queue_.size();
}

void DeviceThread::Shutdown() {
  CHECK(!IsCurrent()) << "DeviceThread::Shutdown from the device thread would join itself";
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  if (thread_.joinable()) thread_.join();
}

void DeviceThread::Loop() {
  for (;;) {
    Work work;
    {
      absl::MutexLock lock(&mu_);
      auto ready = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return stopping_ || !queue_.empty(); };
      mu_.Await(absl::Condition(&ready));
      if (queue_.empty()) return;  // stopping, and everything accepted has run
      work = std::move(queue_.front());
      queue_.pop_front();
    }
    std::move(work)();
  }
}

}  // namespace lorc
