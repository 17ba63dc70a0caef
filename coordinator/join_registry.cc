#include "coordinator/join_registry.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/grpc_status.h"
#include "common/status_macros.h"

namespace lorc {

namespace internal = ::lorcserve::internal;

JoinRegistry::JoinRegistry(int tensor_parallel_size, int num_local, StillThereFn still_there,
                           ChangeFn on_change)
    : size_(tensor_parallel_size),
      num_local_(num_local),
      still_there_(std::move(still_there)),
      on_change_(std::move(on_change)) {
  absl::MutexLock lock(&mu_);
  slots_.resize(static_cast<size_t>(std::max(0, size_ - num_local_)));
}

absl::StatusOr<int> JoinRegistry::RankOf(const internal::JoinRequest& req) const {
  if (req.worker_address().empty()) {
    return absl::InvalidArgumentError("JoinRequest.worker_address is empty");
  }
  if (req.tensor_parallel_size() != 0 && req.tensor_parallel_size() != size_) {
    return absl::InvalidArgumentError(absl::StrCat(
        "group size mismatch: the worker expects --tensor-parallel-size ", req.tensor_parallel_size(),
        ", the coordinator serves ", size_, " ranks"));
  }
  int64_t rank = 0;
  if (req.has_lws()) {
    const internal::LwsSlot& s = req.lws();
    if (s.local_count() < 1 || s.local_index() < 0 || s.local_index() >= s.local_count()) {
      return absl::InvalidArgumentError(absl::StrCat("LWS slot: local device ", s.local_index(),
                                                     " outside [0, ", s.local_count(), ")"));
    }
    if (s.worker_index() < 1 || (s.group_size() > 0 && s.worker_index() >= s.group_size())) {
      return absl::InvalidArgumentError(absl::StrCat(
          "LWS_WORKER_INDEX ", s.worker_index(), " is not a worker pod of a group of ", s.group_size(),
          " (index 0 is the leader, which runs the coordinator)"));
    }
    if (s.group_size() > 0) {
      const int64_t expected = num_local_ + static_cast<int64_t>(s.group_size() - 1) * s.local_count();
      if (expected != size_) {
        return absl::InvalidArgumentError(absl::StrCat(
            "group size mismatch: LWS_GROUP_SIZE ", s.group_size(), " with ", s.local_count(),
            " worker(s) per pod and ", num_local_, " on the leader makes ", expected,
            " ranks, the coordinator serves --tensor-parallel-size ", size_));
      }
    }
    rank = num_local_ + static_cast<int64_t>(s.worker_index() - 1) * s.local_count() + s.local_index();
  } else if (req.rank_source_case() == internal::JoinRequest::kRank) {
    rank = req.rank();
  } else {
    return absl::InvalidArgumentError("JoinRequest names no rank (rank or lws)");
  }
  if (rank < 0 || rank >= size_) {
    return absl::InvalidArgumentError(
        absl::StrCat("rank ", rank, " is out of range: the group has ranks 0..", size_ - 1,
                     " (--tensor-parallel-size ", size_, ")"));
  }
  if (rank < num_local_) {
    return absl::InvalidArgumentError(absl::StrCat(
        "rank ", rank, " is one of the coordinator's ", num_local_,
        " local workers (ranks 0..", num_local_ - 1, "); joining ranks are ", num_local_, "..", size_ - 1));
  }
  return static_cast<int>(rank);
}

absl::StatusOr<int> JoinRegistry::Join(const internal::JoinRequest& req) {
  ASSIGN_OR_RETURN(const int rank, RankOf(req));
  const size_t slot = static_cast<size_t>(rank - num_local_);
  JoinedWorker now;
  now.rank = rank;
  now.address = req.worker_address();
  now.instance_id = req.instance_id();
  now.hostname = req.hostname();
  now.joined_at = absl::Now();
  JoinedWorker holder;
  {
    absl::MutexLock lock(&mu_);
    holder = slots_[slot];
    if (!holder.address.empty() && holder.instance_id == now.instance_id &&
        holder.address == now.address) {
      return rank;  // a heartbeat
    }
  }
  if (!holder.address.empty() && holder.address != now.address && still_there_ &&
      still_there_(holder.address)) {
    return absl::AlreadyExistsError(absl::StrCat(
        "rank ", rank, " is already held by the worker at ", holder.address,
        holder.hostname.empty() ? "" : absl::StrCat(" (", holder.hostname, ")"),
        ", which still answers; refusing ", now.address));
  }
  {
    absl::MutexLock lock(&mu_);
    const JoinedWorker& current = slots_[slot];
    if (current.address != holder.address || current.instance_id != holder.instance_id) {
      return absl::AbortedError(absl::StrCat("rank ", rank, " changed hands meanwhile; retry"));
    }
    slots_[slot] = now;
    ++changes_;
  }
  if (on_change_) on_change_(now, holder);
  return rank;
}

bool JoinRegistry::complete() const { return missing().empty(); }

std::vector<int> JoinRegistry::missing() const {
  absl::MutexLock lock(&mu_);
  std::vector<int> out;
  for (size_t i = 0; i < slots_.size(); ++i) {
    if (slots_[i].address.empty()) out.push_back(num_local_ + static_cast<int>(i));
  }
  return out;
}

std::vector<std::string> JoinRegistry::addresses() const {
  absl::MutexLock lock(&mu_);
  std::vector<std::string> out;
  for (const JoinedWorker& w : slots_) out.push_back(w.address);
  return out;
}

std::vector<JoinedWorker> JoinRegistry::joined() const {
  absl::MutexLock lock(&mu_);
  std::vector<JoinedWorker> out;
  for (const JoinedWorker& w : slots_) {
    if (!w.address.empty()) out.push_back(w);
  }
  return out;
}

uint64_t JoinRegistry::changes() const {
  absl::MutexLock lock(&mu_);
  return changes_;
}

std::string JoinRegistry::Describe() const {
  const std::vector<int> miss = missing();
  std::vector<std::string> have;
  for (const JoinedWorker& w : joined()) have.push_back(absl::StrCat("rank ", w.rank, " at ", w.address));
  return absl::StrCat("missing rank", miss.size() == 1 ? " " : "s ", absl::StrJoin(miss, ", "), " of ",
                      size_, num_local_ > 0 ? absl::StrCat(" (0..", num_local_ - 1, " local)") : "",
                      "; joined: ", have.empty() ? "none" : absl::StrJoin(have, ", "));
}

grpc::Status WorkerJoinService::Join(grpc::ServerContext*, const internal::JoinRequest* req,
                                     internal::JoinResponse* resp) {
  absl::StatusOr<int> rank = registry_->Join(*req);
  if (!rank.ok()) return ToGrpcStatus(rank.status());
  resp->set_rank(*rank);
  resp->set_tensor_parallel_size(registry_->size());
  resp->set_coordinator_id(coordinator_id_);
  resp->set_missing_ranks(static_cast<int32_t>(registry_->missing().size()));
  return grpc::Status::OK;
}

}  // namespace lorc
