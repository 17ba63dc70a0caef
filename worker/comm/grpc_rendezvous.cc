#include "worker/comm/grpc_rendezvous.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "common/grpc_status.h"
#include "grpcpp/grpcpp.h"
#include "worker/comm/internal_grpc.h"

namespace lorc {

GrpcRendezvousStore::GrpcRendezvousStore(const std::string& address)
    : address_(address),
      stub_(lorcserve::internal::Rendezvous::NewStub(InternalChannel(address))) {}

absl::Status GrpcRendezvousStore::Set(const std::string& key, const std::string& value) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  ctx.set_wait_for_ready(true);
  lorcserve::internal::SetRequest req;
  req.set_key(key);
  req.set_value(value);
  lorcserve::internal::SetResponse resp;
  const absl::Status s = FromGrpcStatus(stub_->Set(&ctx, req, &resp));
  if (!s.ok()) return absl::Status(s.code(), absl::StrCat("rendezvous ", address_, ": set ", key, ": ", s.message()));
  return s;
}

absl::StatusOr<std::string> GrpcRendezvousStore::Get(const std::string& key, absl::Duration timeout) {
  grpc::ClientContext ctx;
  const int64_t ms = std::max<int64_t>(0, absl::ToInt64Milliseconds(timeout));
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(ms + 10000));
  ctx.set_wait_for_ready(true);
  lorcserve::internal::GetRequest req;
  req.set_key(key);
  req.set_timeout_ms(ms);
  lorcserve::internal::GetResponse resp;
  const absl::Status s = FromGrpcStatus(stub_->Get(&ctx, req, &resp));
  if (s.code() == absl::StatusCode::kDeadlineExceeded) return s;  // the key did not appear
  if (!s.ok()) return absl::Status(s.code(), absl::StrCat("rendezvous ", address_, ": get ", key, ": ", s.message()));
  return resp.value();
}

grpc::Status RendezvousService::Set(grpc::ServerContext*, const lorcserve::internal::SetRequest* req,
                                    lorcserve::internal::SetResponse*) {
  return ToGrpcStatus(store_.Set(req->key(), req->value()));
}

grpc::Status RendezvousService::Get(grpc::ServerContext* ctx, const lorcserve::internal::GetRequest* req,
                                    lorcserve::internal::GetResponse* resp) {
  // A cancelled call ends within 100 ms: the coordinator's shutdown (its server cancels calls past
  // the shutdown deadline) waited for a handler blocked here up to the join timeout, and the
  // worker's Get, its InitCommunicator and so its owner's release waited with it (a worker stayed
  // locked to a coordinator that had failed its start and exited).
  absl::StatusOr<std::string> v = store_.Get(req->key(), absl::Milliseconds(req->timeout_ms()),
                                             [ctx] { return ctx->IsCancelled(); });
  if (v.status().code() == absl::StatusCode::kCancelled) {
    return grpc::Status(grpc::StatusCode::CANCELLED, "the rendezvous is shutting down (its coordinator stopped)");
  }
  if (!v.ok()) return ToGrpcStatus(v.status());
  resp->set_value(*std::move(v));
  return grpc::Status::OK;
}

}  // namespace lorc
