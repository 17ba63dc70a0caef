// Communicator over Gloo's TCP transport (host memory). Gloo reports failures by throwing; every
// entry point here catches everything and turns it into a Status.
#include <limits.h>
#include <net/if.h>
#include <netdb.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <exception>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "common/status_macros.h"
#include "gloo/allgather.h"
#include "gloo/allreduce.h"
#include "gloo/barrier.h"
#include "gloo/broadcast.h"
#include "gloo/common/error.h"
#include "gloo/math.h"
#include "gloo/rendezvous/context.h"
#include "gloo/rendezvous/store.h"
#include "gloo/transport/tcp/attr.h"
#include "gloo/transport/tcp/device.h"
#include "worker/comm/comm_internal.h"
#include "worker/comm/communicator.h"
#include "worker/comm/rendezvous.h"

namespace lorc {
namespace {

using comm_internal::ToMillis;

// Thrown out of the store adapter through Gloo and caught again by the factory, so that the
// store's own status (DeadlineExceeded naming the key, a remote store's Unavailable, ...) survives.
class StoreError : public gloo::Exception {
 public:
  explicit StoreError(absl::Status status)
      : gloo::Exception(std::string(status.message())), status_(std::move(status)) {}
  const absl::Status& status() const { return status_; }

 private:
  absl::Status status_;
};

// gloo::rendezvous::Store over our RendezvousStore: keys get `prefix`, and every wait is bounded
// by the construction deadline (Gloo's get() blocks until the key exists).
class GlooStoreAdapter final : public gloo::rendezvous::Store {
 public:
  GlooStoreAdapter(RendezvousStore* store, std::string prefix, absl::Time deadline)
      : store_(store), prefix_(std::move(prefix)), deadline_(deadline) {}

  void set(const std::string& key, const std::vector<char>& data) override {
    absl::Status s = store_->Set(prefix_ + key, std::string(data.begin(), data.end()));
    if (!s.ok()) throw StoreError(std::move(s));
  }

  std::vector<char> get(const std::string& key) override {
    absl::StatusOr<std::string> v = store_->Get(prefix_ + key, Left(deadline_));
    if (!v.ok()) throw StoreError(v.status());
    return std::vector<char>(v->begin(), v->end());
  }

  void wait(const std::vector<std::string>& keys) override { wait(keys, gloo::kNoTimeout); }

  void wait(const std::vector<std::string>& keys,
            const std::chrono::milliseconds& timeout) override {
    absl::Time deadline = deadline_;
    if (timeout != gloo::kNoTimeout) {
      deadline = std::min(deadline, absl::Now() + absl::FromChrono(timeout));
    }
    for (const std::string& key : keys) {
      absl::StatusOr<std::string> v = store_->Get(prefix_ + key, Left(deadline));
      if (!v.ok()) throw StoreError(v.status());
    }
  }

 private:
  static absl::Duration Left(absl::Time deadline) {
    return std::max(deadline - absl::Now(), absl::ZeroDuration());
  }

  RendezvousStore* const store_;
  const std::string prefix_;
  const absl::Time deadline_;
};

// Interface name -> that interface's address; anything else is a hostname or IP literal; empty
// means this machine's hostname.
//
// Hostnames are resolved here first: the Debian Gloo (2022-05) only checks getaddrinfo() for -1,
// so a name that does not resolve (EAI_NONAME) makes it walk an uninitialized list and crash.
absl::StatusOr<gloo::transport::tcp::attr> MakeAttr(const std::string& hostname_or_iface) {
  gloo::transport::tcp::attr attr;
  if (!hostname_or_iface.empty() && if_nametoindex(hostname_or_iface.c_str()) != 0) {
    attr.iface = hostname_or_iface;
    return attr;
  }
  std::string host = hostname_or_iface;
  if (host.empty()) {
    char name[HOST_NAME_MAX + 1] = {};
    if (gethostname(name, sizeof(name) - 1) != 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("gethostname failed (errno ", errno, "); set CommOptions.hostname_or_iface"));
    }
    host = name;
  }
  struct addrinfo hints;
  std::memset(&hints, 0, sizeof(hints));
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  struct addrinfo* result = nullptr;
  const int rv = getaddrinfo(host.c_str(), nullptr, &hints, &result);
  if (rv != 0 || result == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(
        "cannot resolve '", host, "': ", rv != 0 ? gai_strerror(rv) : "no address",
        hostname_or_iface.empty() ? " (this machine's hostname; set CommOptions.hostname_or_iface)"
                                  : ""));
  }
  freeaddrinfo(result);
  attr.hostname = host;
  return attr;
}

class GlooCommunicator final : public Communicator {
 public:
  GlooCommunicator(const WorldConfig& world, const CommOptions& options,
                   std::shared_ptr<gloo::transport::Device> device,
                   std::shared_ptr<gloo::rendezvous::Context> context)
      : world_(world),
        group_(options.group),
        op_timeout_(ToMillis(options.op_timeout)),
        device_(std::move(device)),
        context_(std::move(context)) {}

  // Members go in reverse order: the context (its pairs) before the device (its event loop).
  ~GlooCommunicator() override = default;

  const WorldConfig& world() const override { return world_; }
  std::string_view backend_name() const override { return "gloo"; }

  using Communicator::AllGather;
  using Communicator::AllReduceSum;

  absl::Status AllReduceSum(void* data, size_t count, DType dtype) override {
    if (count == 0) return absl::OkStatus();
    if (data == nullptr) return NullArgument("AllReduceSum");
    switch (dtype) {
      case DType::kF32: return AllReduceAs<float>(data, count);
      case DType::kF16: return AllReduceAs<gloo::float16>(data, count);
      default:
        return absl::UnimplementedError(absl::StrCat(group_, " group: gloo AllReduceSum of ",
                                                     DTypeName(dtype), " (F32 and F16 only)"));
    }
  }

  absl::Status AllGather(const void* send, void* recv, size_t count, DType dtype) override {
    if (count == 0) return absl::OkStatus();
    if (send == nullptr || recv == nullptr) return NullArgument("AllGather");
    // A gather moves bytes: any dtype is its width in bytes.
    const size_t bytes = count * static_cast<size_t>(DTypeSize(dtype));
    return Run("AllGather", [&](uint32_t tag) {
      gloo::AllgatherOptions opts(context_);
      // Gloo only reads the input buffer; its API just lacks a const overload.
      opts.setInput<uint8_t>(static_cast<uint8_t*>(const_cast<void*>(send)), bytes);
      opts.setOutput<uint8_t>(static_cast<uint8_t*>(recv), bytes * static_cast<size_t>(world_.world_size));
      opts.setTag(tag);
      opts.setTimeout(op_timeout_);
      gloo::allgather(opts);
    });
  }

  absl::Status Broadcast(void* data, size_t bytes, int root) override {
    if (root < 0 || root >= world_.world_size) {
      return absl::InvalidArgumentError(absl::StrCat(group_, " group: Broadcast root ", root,
                                                     " is not in [0, ", world_.world_size, ")"));
    }
    if (bytes == 0) return absl::OkStatus();
    if (data == nullptr) return NullArgument("Broadcast");
    return Run("Broadcast", [&](uint32_t tag) {
      gloo::BroadcastOptions opts(context_);
      opts.setOutput<uint8_t>(static_cast<uint8_t*>(data), bytes);
      opts.setRoot(root);
      opts.setTag(tag);
      opts.setTimeout(op_timeout_);
      gloo::broadcast(opts);
    });
  }

  absl::Status Barrier() override {
    return Run("Barrier", [&](uint32_t tag) {
      gloo::BarrierOptions opts(context_);
      opts.setTag(tag);
      opts.setTimeout(op_timeout_);
      gloo::barrier(opts);
    });
  }

 private:
  template <typename T>
  absl::Status AllReduceAs(void* data, size_t count) {
    return Run("AllReduceSum", [&](uint32_t tag) {
      gloo::AllreduceOptions opts(context_);
      opts.setOutput<T>(static_cast<T*>(data), count);
      opts.setReduceFunction(
          static_cast<void (*)(void*, const void*, const void*, size_t)>(&gloo::sum<T>));
      opts.setTag(tag);
      opts.setTimeout(op_timeout_);
      gloo::allreduce(opts);
    });
  }

  absl::Status NullArgument(const char* op) const {
    return absl::InvalidArgumentError(
        absl::StrCat(group_, " group: ", op, " called with a null buffer"));
  }

  // Runs one collective under the lock, with a fresh tag (identical on every rank because every
  // rank issues the same sequence), turning any exception into a sticky Unavailable.
  template <typename Fn>
  absl::Status Run(const char* op, Fn&& fn) {
    absl::MutexLock lock(&mu_);
    if (!broken_.ok()) {
      return absl::FailedPreconditionError(
          absl::StrCat(group_, " group: ", op,
                       " on a gloo communicator broken by an earlier failure: ",
                       broken_.message()));
    }
    const uint32_t tag = next_tag_++;
    std::string what;
    try {
      fn(tag);
      return absl::OkStatus();
    } catch (const std::exception& e) {
      what = e.what();
    } catch (...) {
      what = "unknown exception";
    }
    broken_ = absl::UnavailableError(absl::StrCat(group_, " group: gloo ", op, " failed on ",
                                                  WorldConfigDebugString(world_), ": ", what));
    return broken_;
  }

  const WorldConfig world_;
  const std::string group_;
  const std::chrono::milliseconds op_timeout_;
  std::shared_ptr<gloo::transport::Device> device_;
  std::shared_ptr<gloo::rendezvous::Context> context_;

  absl::Mutex mu_;
  uint32_t next_tag_ ABSL_GUARDED_BY(mu_) = 0;
  absl::Status broken_ ABSL_GUARDED_BY(mu_);
};

}  // namespace

absl::StatusOr<std::unique_ptr<Communicator>> CreateGlooCommunicator(const WorldConfig& world,
                                                                     RendezvousStore* store,
                                                                     const CommOptions& options) {
  RETURN_IF_ERROR(ValidateWorldConfig(world));
  RETURN_IF_ERROR(comm_internal::ValidateCommOptions(options));
  if (store == nullptr) return absl::InvalidArgumentError("rendezvous store is null");
  const absl::Time start = absl::Now();
  const absl::Time deadline = start + options.join_timeout;
  const std::string& group = options.group;

  // The device first: a bad address is a configuration error worth reporting before joining.
  absl::StatusOr<gloo::transport::tcp::attr> attr = MakeAttr(options.hostname_or_iface);
  if (!attr.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(
        group, " group: cannot create the gloo TCP device: ", attr.status().message()));
  }
  std::shared_ptr<gloo::transport::Device> device;
  try {
    device = gloo::transport::tcp::CreateDevice(*attr);
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(
        group, " group: cannot create the gloo TCP device on '",
        attr->iface.empty() ? attr->hostname : attr->iface, "': ", e.what()));
  } catch (...) {
    return absl::InternalError(
        absl::StrCat(group, " group: cannot create the gloo TCP device: unknown exception"));
  }

  RETURN_IF_ERROR(JoinGroup(store, group, world, start, options.join_timeout));

  auto context = std::make_shared<gloo::rendezvous::Context>(world.rank, world.world_size);
  // Pairs created by connectFullMesh take the context timeout for their connect phase.
  context->setTimeout(ToMillis(deadline - absl::Now()));
  GlooStoreAdapter adapter(store, GroupKey(group, "gloo/"), deadline);
  const std::string where = WorldConfigDebugString(world);
  try {
    context->connectFullMesh(adapter, device);
  } catch (const StoreError& e) {
    const absl::Status& s = e.status();
    if (s.code() == absl::StatusCode::kDeadlineExceeded) {
      return absl::DeadlineExceededError(absl::StrCat(
          group, " group: gloo connection setup did not complete within ",
          absl::FormatDuration(options.join_timeout), " on ", where, ": ", s.message()));
    }
    return absl::Status(s.code(), absl::StrCat(group, " group: gloo connection setup failed on ",
                                               where, ": ", s.message()));
  } catch (const std::exception& e) {
    return absl::UnavailableError(absl::StrCat(group, " group: gloo connection setup failed on ",
                                               where, ": ", e.what()));
  } catch (...) {
    return absl::UnavailableError(absl::StrCat(
        group, " group: gloo connection setup failed on ", where, ": unknown exception"));
  }
  context->setTimeout(ToMillis(options.op_timeout));
  return std::unique_ptr<Communicator>(
      new GlooCommunicator(world, options, std::move(device), std::move(context)));
}

}  // namespace lorc
