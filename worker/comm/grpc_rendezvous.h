// The rendezvous store over gRPC: the coordinator serves `lorcserve.internal.Rendezvous`
// (RendezvousService, backed by an InProcessStore) and every worker reaches it through a
// GrpcRendezvousStore, so the ranks of one group can bootstrap Gloo or NCCL across hosts.
#pragma once

#include <memory>
#include <string>

#include "lorcserve/internal/worker.grpc.pb.h"
#include "worker/comm/rendezvous.h"

namespace lorc {

class GrpcRendezvousStore final : public RendezvousStore {
 public:
  explicit GrpcRendezvousStore(const std::string& address);
  absl::Status Set(const std::string& key, const std::string& value) override;
  absl::StatusOr<std::string> Get(const std::string& key, absl::Duration timeout) override;

 private:
  std::string address_;
  std::unique_ptr<lorcserve::internal::Rendezvous::Stub> stub_;
};

class RendezvousService final : public lorcserve::internal::Rendezvous::Service {
 public:
  grpc::Status Set(grpc::ServerContext* ctx, const lorcserve::internal::SetRequest* req,
                   lorcserve::internal::SetResponse* resp) override;
  grpc::Status Get(grpc::ServerContext* ctx, const lorcserve::internal::GetRequest* req,
                   lorcserve::internal::GetResponse* resp) override;

 private:
  InProcessStore store_;
};

}  // namespace lorc
