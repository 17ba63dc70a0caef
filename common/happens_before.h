// Happens-before edges that ThreadSanitizer cannot see on its own: orderings that an
// uninstrumented library guarantees (Debian's gRPC is not built with -fsanitize=thread, so its
// internal locks and queues are invisible to TSan) and that our code relies on.
//
//   HappensBefore(tag): everything this thread did so far happens before ...
//   HappensAfter(tag):  ... what this thread does next, after any HappensBefore(tag) that the
//                       library's guarantee orders before this point.
//
// Each call site names the guarantee it relies on (e.g. "grpc::Server::Shutdown returns only
// after every handler returned and every reactor's OnDone ran"). `tag` is any address both sides
// agree on (usually the object whose state crosses threads). Outside a ThreadSanitizer build
// (`LORC_SANITIZE=thread`, scripts/sanitize.sh tsan) both are empty inline functions.
//
// Threads: any.
#pragma once

#if defined(__SANITIZE_THREAD__)
#define LORC_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define LORC_TSAN 1
#endif
#endif

#if defined(LORC_TSAN)
#include <sanitizer/tsan_interface.h>
#endif

namespace lorc {

inline void HappensBefore([[maybe_unused]] const void* tag) {
#if defined(LORC_TSAN)
  __tsan_release(const_cast<void*>(tag));
#endif
}

inline void HappensAfter([[maybe_unused]] const void* tag) {
#if defined(LORC_TSAN)
  __tsan_acquire(const_cast<void*>(tag));
#endif
}

// Calls HappensBefore(tag) when the scope ends: declared first in a callback, it runs after
// everything else the callback did (its other locals are destroyed before it).
class HappensBeforeOnExit {
 public:
  explicit HappensBeforeOnExit(const void* tag) : tag_(tag) {}
  ~HappensBeforeOnExit() { HappensBefore(tag_); }
  HappensBeforeOnExit(const HappensBeforeOnExit&) = delete;
  HappensBeforeOnExit& operator=(const HappensBeforeOnExit&) = delete;

 private:
  const void* const tag_;
};

}  // namespace lorc
