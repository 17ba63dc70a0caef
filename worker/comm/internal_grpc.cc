#include "worker/comm/internal_grpc.h"

#include <algorithm>
#include <cstdint>
#include <iostream>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "common/status_macros.h"

namespace lorc {
namespace {

struct InternalCredentials {
  absl::Mutex mu;
  std::shared_ptr<grpc::ServerCredentials> server ABSL_GUARDED_BY(mu);
  std::shared_ptr<grpc::ChannelCredentials> channel ABSL_GUARDED_BY(mu);
  bool tls ABSL_GUARDED_BY(mu) = false;
  std::string cert_file ABSL_GUARDED_BY(mu);  // --internal-tls-cert
};

InternalCredentials& Credentials() {
  static InternalCredentials* c = new InternalCredentials();  // never destroyed: used at exit
  return *c;
}

}  // namespace

absl::Status ConfigureInternalTls(const security::InternalTlsOptions& options) {
  ASSIGN_OR_RETURN(std::shared_ptr<grpc::ServerCredentials> server,
                   security::InternalServerCredentials(options));
  ASSIGN_OR_RETURN(std::shared_ptr<grpc::ChannelCredentials> channel,
                   security::InternalChannelCredentials(options));
  if (options.enabled()) {
    absl::StatusOr<absl::Duration> left = security::CertificateTimeLeft("--internal-tls-cert", options.cert_file);
    if (left.ok() && *left < absl::Hours(24 * 7)) {
      std::cerr << "lorcserve: warning: --internal-tls-cert " << options.cert_file << " expires in "
                << absl::FormatDuration(absl::Trunc(*left, absl::Minutes(1)))
                << "; after that no new internal connection can be made (a restarted worker cannot "
                   "rejoin) until this process restarts with a renewed certificate\n";
    }
  }
  InternalCredentials& c = Credentials();
  absl::MutexLock lock(&c.mu);
  c.server = std::move(server);
  c.channel = std::move(channel);
  c.tls = options.enabled();
  c.cert_file = options.cert_file;
  return absl::OkStatus();
}

bool InternalTlsEnabled() {
  InternalCredentials& c = Credentials();
  absl::MutexLock lock(&c.mu);
  return c.tls;
}

absl::Status InternalCertificateValidNow() {
  std::string cert;
  {
    InternalCredentials& c = Credentials();
    absl::MutexLock lock(&c.mu);
    if (!c.tls) return absl::OkStatus();
    cert = c.cert_file;
  }
  return security::CheckCertificateValidNow("--internal-tls-cert", cert);
}

void ExclusivePort(grpc::ServerBuilder& builder) { builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0); }

void AddOwnerKeepalive(grpc::ServerBuilder& builder, absl::Duration owner_lease) {
  const int half_ms = static_cast<int>(
      std::clamp<int64_t>(absl::ToInt64Milliseconds(owner_lease / 2), 1000, int64_t{1} << 30));
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIME_MS, half_ms);
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, half_ms);
  // Only connections with a call open (a coordinator's step stream; an idle one has the lease).
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 0);
  // Keep pinging an idle step stream (no steps between requests): no cap on pings without data
  // and none of the 5-minute spacing gRPC puts between them by default.
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MAX_PINGS_WITHOUT_DATA, 0);
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MIN_SENT_PING_INTERVAL_WITHOUT_DATA_MS, half_ms);
}

void AddInternalListeningPort(grpc::ServerBuilder& builder, const std::string& address, int* port) {
  ExclusivePort(builder);
  InternalCredentials& c = Credentials();
  absl::MutexLock lock(&c.mu);
  builder.AddListeningPort(address, c.server != nullptr ? c.server : grpc::InsecureServerCredentials(), port);
}

std::shared_ptr<grpc::Channel> InternalChannel(const std::string& address, const grpc::ChannelArguments& args) {
  InternalCredentials& c = Credentials();
  absl::MutexLock lock(&c.mu);
  if (c.channel == nullptr || !c.tls) {
    return grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(), args);
  }
  grpc::ChannelArguments with_name = args;
  with_name.SetSslTargetNameOverride(kInternalTlsServerName);
  return grpc::CreateCustomChannel(address, c.channel, with_name);
}

}  // namespace lorc
