// Communicator over NCCL (device memory). NCCL stays inside this file: the communicator is created
// non-blocking (config.blocking = 0) so that every NCCL call, init included, can be bounded by a
// deadline and aborted instead of hanging when a peer is gone.
#include <cuda_runtime_api.h>
#include <nccl.h>

#include <algorithm>
#include <cstring>
#include <iostream>
#include <memory>
#include <string>
#include <thread>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "common/status_macros.h"
#include "worker/comm/comm_internal.h"
#include "worker/comm/communicator.h"
#include "worker/comm/custom_all_reduce.h"
#include "worker/comm/rendezvous.h"

namespace lorc {
namespace {

// Makes `device` current for the scope and restores the caller's device afterwards.
class ScopedCudaDevice {
 public:
  explicit ScopedCudaDevice(int device) {
    if (cudaGetDevice(&previous_) != cudaSuccess) previous_ = -1;
    if (previous_ != device) {
      status_ = cudaSetDevice(device);
      changed_ = status_ == cudaSuccess;
    }
  }
  ~ScopedCudaDevice() {
    if (changed_ && previous_ >= 0) cudaSetDevice(previous_);
  }
  ScopedCudaDevice(const ScopedCudaDevice&) = delete;
  ScopedCudaDevice& operator=(const ScopedCudaDevice&) = delete;

  cudaError_t status() const { return status_; }

 private:
  int previous_ = -1;
  bool changed_ = false;
  cudaError_t status_ = cudaSuccess;
};

std::string CudaErrorText(cudaError_t e) {
  return absl::StrCat(cudaGetErrorName(e), " (", cudaGetErrorString(e), ")");
}

// Peer / network trouble is Unavailable (retry by re-creating the group); misuse is
// InvalidArgument; the rest is Internal.
absl::StatusCode NcclStatusCode(ncclResult_t r) {
  switch (r) {
    case ncclRemoteError:
    case ncclSystemError:
      return absl::StatusCode::kUnavailable;
    case ncclInvalidArgument:
    case ncclInvalidUsage:
      return absl::StatusCode::kInvalidArgument;
    default:
      return absl::StatusCode::kInternal;
  }
}

// `comm` may be null (ncclGetLastError then reports the last error of any communicator).
absl::Status NcclError(ncclResult_t r, ncclComm_t comm, const std::string& context) {
  const char* last = ncclGetLastError(comm);
  return absl::Status(NcclStatusCode(r),
                      absl::StrCat(context, ": ", ncclGetErrorString(r), " (NCCL error ",
                                   static_cast<int>(r), "); last NCCL error: ",
                                   last != nullptr && *last != '\0' ? last : "none"));
}

// Waits while the communicator's state is ncclInProgress (non-blocking init, enqueue, finalize).
// Returns the final state, ncclInProgress if `deadline` passed first, or the query's own error.
ncclResult_t WaitWhileInProgress(ncclComm_t comm, absl::Time deadline) {
  for (int spins = 0;; ++spins) {
    ncclResult_t state = ncclInProgress;
    const ncclResult_t r = ncclCommGetAsyncError(comm, &state);
    if (r != ncclSuccess) return r;
    if (state != ncclInProgress) return state;
    if (absl::Now() >= deadline) return ncclInProgress;
    if (spins < 1000) {
      std::this_thread::yield();
    } else {
      absl::SleepFor(absl::Microseconds(100));
    }
  }
}

struct CudaFree {
  void operator()(float* p) const { cudaFree(p); }
};

class NcclCommunicator final : public Communicator {
 public:
  NcclCommunicator(const WorldConfig& world, const CommOptions& options, int device,
                   cudaStream_t stream, ncclComm_t comm, std::unique_ptr<float, CudaFree> scratch,
                   std::unique_ptr<CustomAllReduce> custom, std::string all_reduce_description)
      : world_(world),
        group_(options.group),
        op_timeout_(options.op_timeout),
        device_(device),
        stream_(stream),
        scratch_(std::move(scratch)),
        custom_(std::move(custom)),
        all_reduce_description_(std::move(all_reduce_description)),
        comm_(comm) {}

  ~NcclCommunicator() override {
    ScopedCudaDevice guard(device_);
    absl::MutexLock lock(&mu_);
    if (comm_ != nullptr) {
      // Finalize flushes the enqueued work and quiesces the communicator with its peers; if that
      // fails or takes longer than an op may, abort instead of hanging in a destructor.
      ncclResult_t r = ncclCommFinalize(comm_);
      if (r == ncclSuccess || r == ncclInProgress) {
        r = WaitWhileInProgress(comm_, absl::Now() + op_timeout_);
      }
      if (r == ncclSuccess) {
        ncclCommDestroy(comm_);
      } else {
        ncclCommAbort(comm_);
      }
      comm_ = nullptr;
    }
    if (custom_ != nullptr) {
      // Its kernels read peers' buffers and write this rank's: none may run when it is freed. A
      // kernel waiting on a dead peer ends by its barrier timeout.
      const absl::Time deadline = absl::Now() + 2 * op_timeout_;
      while (cudaStreamQuery(stream_) == cudaErrorNotReady && absl::Now() < deadline) {
        absl::SleepFor(absl::Microseconds(100));
      }
      (void)cudaGetLastError();
      custom_.reset();
    }
    scratch_.reset();
  }

  const WorldConfig& world() const override { return world_; }
  std::string_view backend_name() const override { return "nccl"; }

  using Communicator::AllGather;
  using Communicator::AllReduceSum;

  std::string AllReduceDescription() const override { return all_reduce_description_; }

  std::string_view AllReduceAlgorithm(size_t count, DType dtype) const override {
    return custom_ != nullptr && custom_->Applies(count, dtype) ? "custom" : "nccl";
  }

  absl::Status AllReduceSum(void* data, size_t count, DType dtype) override {
    if (count == 0) return absl::OkStatus();
    if (data == nullptr) return NullArgument("AllReduceSum");
    ASSIGN_OR_RETURN(ncclDataType_t t, NcclType(dtype));
    absl::MutexLock lock(&mu_);
    if (custom_ != nullptr && custom_->Applies(count, dtype)) {
      ScopedCudaDevice guard(device_);
      RETURN_IF_ERROR(CheckUsableLocked("AllReduceSum"));
      if (const cudaError_t e = custom_->Enqueue(data, count, stream_); e != cudaSuccess) {
        return BreakLocked(absl::InternalError(
            absl::StrCat(group_, " group: custom all-reduce launch failed on ", Where(), ": ",
                         CudaErrorText(e))));
      }
      return absl::OkStatus();
    }
    return EnqueueLocked("AllReduceSum", [&] {
      return ncclAllReduce(data, data, count, t, ncclSum, comm_, stream_);
    });
  }

  absl::Status AllGather(const void* send, void* recv, size_t count, DType dtype) override {
    if (count == 0) return absl::OkStatus();
    if (send == nullptr || recv == nullptr) return NullArgument("AllGather");
    ASSIGN_OR_RETURN(ncclDataType_t t, NcclType(dtype));
    absl::MutexLock lock(&mu_);
    return EnqueueLocked("AllGather", [&] {
      return ncclAllGather(send, recv, count, t, comm_, stream_);
    });
  }

  absl::StatusOr<ncclDataType_t> NcclType(DType dtype) const {
    switch (dtype) {
      case DType::kF32: return ncclFloat32;
      case DType::kF16: return ncclFloat16;
      case DType::kBF16: return ncclBfloat16;
      default:
        return absl::UnimplementedError(
            absl::StrCat(group_, " group: NCCL collective of ", DTypeName(dtype)));
    }
  }

  absl::Status Broadcast(void* data, size_t bytes, int root) override {
    if (root < 0 || root >= world_.world_size) {
      return absl::InvalidArgumentError(absl::StrCat(group_, " group: Broadcast root ", root,
                                                     " is not in [0, ", world_.world_size, ")"));
    }
    if (bytes == 0) return absl::OkStatus();
    if (data == nullptr) return NullArgument("Broadcast");
    absl::MutexLock lock(&mu_);
    return EnqueueLocked("Broadcast", [&] {
      return ncclBroadcast(data, data, bytes, ncclUint8, root, comm_, stream_);
    });
  }

  // NCCL has no barrier: a one-float all-reduce on the scratch buffer, then a stream sync.
  absl::Status Barrier() override {
    absl::MutexLock lock(&mu_);
    RETURN_IF_ERROR(EnqueueLocked("Barrier", [&] {
      return ncclAllReduce(scratch_.get(), scratch_.get(), 1, ncclFloat, ncclSum, comm_, stream_);
    }));
    return SyncLocked("Barrier");
  }

  absl::Status Sync() override {
    absl::MutexLock lock(&mu_);
    return SyncLocked("Sync");
  }

 private:
  std::string Where() const {
    return absl::StrCat(WorldConfigDebugString(world_), ", cuda device ", device_);
  }

  absl::Status NullArgument(const char* op) const {
    return absl::InvalidArgumentError(
        absl::StrCat(group_, " group: ", op, " called with a null buffer"));
  }

  // Records the first failure, aborts the communicator (ending any kernels still waiting on
  // peers) and returns `status`.
  absl::Status BreakLocked(absl::Status status) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (broken_.ok()) broken_ = status;
    if (comm_ != nullptr) {
      ncclCommAbort(comm_);
      comm_ = nullptr;
    }
    return status;
  }

  // FailedPrecondition once broken; otherwise reports (and breaks on) an asynchronous error
  // raised since the last call.
  absl::Status CheckUsableLocked(const char* op) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (!broken_.ok()) {
      return absl::FailedPreconditionError(
          absl::StrCat(group_, " group: ", op,
                       " on an NCCL communicator broken by an earlier failure: ",
                       broken_.message()));
    }
    if (custom_ != nullptr && custom_->TimedOut()) {
      return BreakLocked(absl::DeadlineExceededError(absl::StrCat(
          group_, " group: a custom all-reduce barrier timed out (a wait of more than ",
          absl::FormatDuration(op_timeout_ / 2), " for a peer) on ", Where(),
          " (a peer is probably dead or stuck, or issued different collectives); communicator "
          "aborted")));
    }
    ncclResult_t state = ncclSuccess;
    ncclResult_t r = ncclCommGetAsyncError(comm_, &state);
    if (r == ncclSuccess) r = state;
    if (r != ncclSuccess && r != ncclInProgress) {
      return BreakLocked(NcclError(
          r, comm_, absl::StrCat(group_, " group: asynchronous NCCL error before ", op, " on ",
                                 Where())));
    }
    return absl::OkStatus();
  }

  template <typename Fn>
  absl::Status EnqueueLocked(const char* op, Fn&& fn) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    ScopedCudaDevice guard(device_);
    if (guard.status() != cudaSuccess) {
      return absl::InternalError(absl::StrCat(group_, " group: ", op, ": cudaSetDevice(",
                                              device_, ") failed: ",
                                              CudaErrorText(guard.status())));
    }
    RETURN_IF_ERROR(CheckUsableLocked(op));
    ncclResult_t r = fn();
    // Non-blocking communicator: the call may return ncclInProgress (e.g. while connections are
    // set up lazily on first use); no other NCCL call may be made until the state settles.
    if (r == ncclSuccess || r == ncclInProgress) {
      r = WaitWhileInProgress(comm_, absl::Now() + op_timeout_);
    }
    if (r == ncclInProgress) {
      return BreakLocked(absl::DeadlineExceededError(
          absl::StrCat(group_, " group: NCCL ", op, " could not be enqueued within ",
                       absl::FormatDuration(op_timeout_), " on ", Where())));
    }
    if (r != ncclSuccess) {
      return BreakLocked(
          NcclError(r, comm_, absl::StrCat(group_, " group: NCCL ", op, " failed on ", Where())));
    }
    return absl::OkStatus();
  }

  absl::Status SyncLocked(const char* op) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    ScopedCudaDevice guard(device_);
    RETURN_IF_ERROR(CheckUsableLocked(op));
    const absl::Time deadline = absl::Now() + op_timeout_;
    for (int spins = 0;; ++spins) {
      const cudaError_t e = cudaStreamQuery(stream_);
      if (e == cudaSuccess) break;
      if (e != cudaErrorNotReady) {
        return BreakLocked(absl::InternalError(absl::StrCat(
            group_, " group: ", op, ": CUDA error on the stream on ", Where(), ": ",
            CudaErrorText(e))));
      }
      ncclResult_t state = ncclSuccess;
      ncclResult_t r = ncclCommGetAsyncError(comm_, &state);
      if (r == ncclSuccess) r = state;
      if (r != ncclSuccess && r != ncclInProgress) {
        return BreakLocked(NcclError(
            r, comm_, absl::StrCat(group_, " group: NCCL error during ", op, " on ", Where())));
      }
      if (absl::Now() >= deadline) {
        return BreakLocked(absl::DeadlineExceededError(absl::StrCat(
            group_, " group: collectives did not complete within ",
            absl::FormatDuration(op_timeout_), " on ", Where(),
            " (a peer is probably dead or stuck); communicator aborted")));
      }
      if (spins < 1000) {
        std::this_thread::yield();
      } else {
        absl::SleepFor(absl::Microseconds(50));
      }
    }
    return CheckUsableLocked(op);
  }

  const WorldConfig world_;
  const std::string group_;
  const absl::Duration op_timeout_;
  const int device_;
  const cudaStream_t stream_;
  std::unique_ptr<float, CudaFree> scratch_;  // one float on device_, for Barrier()
  std::unique_ptr<CustomAllReduce> custom_;   // null: NCCL for every all-reduce
  const std::string all_reduce_description_;

  absl::Mutex mu_;
  ncclComm_t comm_ ABSL_GUARDED_BY(mu_);  // null once aborted
  absl::Status broken_ ABSL_GUARDED_BY(mu_);
};

}  // namespace

absl::StatusOr<std::unique_ptr<Communicator>> CreateNcclCommunicator(const WorldConfig& world,
                                                                     RendezvousStore* store,
                                                                     int cuda_device,
                                                                     void* cuda_stream,
                                                                     const CommOptions& options) {
  RETURN_IF_ERROR(ValidateWorldConfig(world));
  RETURN_IF_ERROR(comm_internal::ValidateCommOptions(options));
  if (store == nullptr) return absl::InvalidArgumentError("rendezvous store is null");
  const std::string& group = options.group;
  const absl::Time start = absl::Now();
  const absl::Time deadline = start + options.join_timeout;
  const std::string where =
      absl::StrCat(WorldConfigDebugString(world), ", cuda device ", cuda_device);

  int device_count = 0;
  if (cudaError_t e = cudaGetDeviceCount(&device_count); e != cudaSuccess) {
    return absl::FailedPreconditionError(
        absl::StrCat(group, " group: no usable CUDA device: ", CudaErrorText(e)));
  }
  if (cuda_device < 0 || cuda_device >= device_count) {
    return absl::InvalidArgumentError(absl::StrCat(group, " group: cuda_device ", cuda_device,
                                                   " is not in [0, ", device_count, ")"));
  }
  ScopedCudaDevice guard(cuda_device);
  if (guard.status() != cudaSuccess) {
    return absl::InternalError(absl::StrCat(group, " group: cudaSetDevice(", cuda_device,
                                            ") failed: ", CudaErrorText(guard.status())));
  }
  std::unique_ptr<float, CudaFree> scratch;
  {
    void* p = nullptr;
    if (cudaError_t e = cudaMalloc(&p, sizeof(float)); e != cudaSuccess) {
      return absl::ResourceExhaustedError(absl::StrCat(
          group, " group: cudaMalloc of the barrier scratch failed on ", where, ": ",
          CudaErrorText(e)));
    }
    scratch.reset(static_cast<float*>(p));
    if (cudaError_t e = cudaMemset(p, 0, sizeof(float)); e != cudaSuccess) {
      return absl::InternalError(
          absl::StrCat(group, " group: cudaMemset failed on ", where, ": ", CudaErrorText(e)));
    }
  }

  RETURN_IF_ERROR(JoinGroup(store, group, world, start, options.join_timeout));

  ncclUniqueId id;
  static_assert(sizeof(id.internal) == NCCL_UNIQUE_ID_BYTES);
  const std::string id_key = GroupKey(group, "nccl_id");
  if (world.rank == 0) {
    if (ncclResult_t r = ncclGetUniqueId(&id); r != ncclSuccess) {
      return NcclError(r, nullptr, absl::StrCat(group, " group: ncclGetUniqueId failed on ", where));
    }
    RETURN_IF_ERROR(store->Set(id_key, std::string(id.internal, sizeof(id.internal))));
  } else {
    absl::StatusOr<std::string> v =
        store->Get(id_key, std::max(deadline - absl::Now(), absl::ZeroDuration()));
    if (!v.ok()) {
      return absl::Status(v.status().code(),
                          absl::StrCat(group, " group: rank 0 did not publish the NCCL id within ",
                                       absl::FormatDuration(options.join_timeout), " (",
                                       where, "): ", v.status().message()));
    }
    if (v->size() != sizeof(id.internal)) {
      return absl::InternalError(absl::StrCat(group, " group: NCCL id under '", id_key, "' has ",
                                              v->size(), " bytes, expected ",
                                              sizeof(id.internal)));
    }
    std::memcpy(id.internal, v->data(), sizeof(id.internal));
  }

  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;
  ncclComm_t comm = nullptr;
  ncclResult_t r = ncclCommInitRankConfig(&comm, world.world_size, id, world.rank, &config);
  if ((r == ncclSuccess || r == ncclInProgress) && comm != nullptr) {
    r = WaitWhileInProgress(comm, deadline);
  }
  if (r == ncclInProgress) {
    ncclCommAbort(comm);
    return absl::DeadlineExceededError(
        absl::StrCat(group, " group: NCCL communicator init did not complete within ",
                     absl::FormatDuration(options.join_timeout), " on ", where,
                     " (all ranks had joined; check NCCL_SOCKET_IFNAME / network reachability)"));
  }
  if (r != ncclSuccess || comm == nullptr) {
    absl::Status s = NcclError(r != ncclSuccess ? r : ncclInternalError, comm,
                               absl::StrCat(group, " group: NCCL communicator init failed on ",
                                            where));
    if (comm != nullptr) ncclCommAbort(comm);
    return s;
  }
  // The custom all-reduce after NCCL: its setup exchanges buffers through the same store; its
  // failure to set up only turns it off (NCCL works), a store error fails the group.
  std::unique_ptr<CustomAllReduce> custom;
  std::string description = "nccl";
  if (world.world_size > 1) {
    CustomAllReduce::Options co;
    co.group = group;
    co.device = cuda_device;
    co.max_bytes = options.custom_all_reduce_max_bytes;
    co.disabled = options.disable_custom_all_reduce;
    // Two barriers a call: the kernel ends within op_timeout, before Sync's own deadline.
    co.barrier_timeout = options.op_timeout / 2;
    co.deadline = deadline;
    std::string why_not;
    absl::StatusOr<std::unique_ptr<CustomAllReduce>> c =
        CustomAllReduce::Create(world, store, co, &why_not);
    if (!c.ok()) {
      ncclCommAbort(comm);
      return c.status();
    }
    custom = *std::move(c);
    description = custom != nullptr
                      ? absl::StrCat("custom one-shot for BF16 up to ", custom->max_bytes_for_world(),
                                     " bytes, nccl above")
                      : absl::StrCat("nccl (custom all-reduce off: ", why_not, ")");
    if (world.rank == 0) {  // once per group
      std::cerr << "lorcserve: " << group << " group all-reduce: " << description << "\n";
    }
  }
  return std::unique_ptr<Communicator>(new NcclCommunicator(
      world, options, cuda_device, static_cast<cudaStream_t>(cuda_stream), comm,
      std::move(scratch), std::move(custom), std::move(description)));
}

}  // namespace lorc
