// The one place internal gRPC links are made: every server of an internal service (the
// coordinator's --internal-listen port: Rendezvous, WorkerJoin; a worker's Worker service; the
// bench's loopback rendezvous) adds its port through AddInternalListeningPort, and every channel
// to one (coordinator -> worker, worker -> rendezvous / join, the coordinator's pings) comes from
// InternalChannel. Both use the process's internal credentials: plaintext until
// ConfigureInternalTls is given the --internal-tls-* files, then mTLS (security/tls.h): the
// server requires a client certificate from the internal CA, and the channel checks the server's
// certificate against that CA for the fixed name kInternalTlsServerName (so one certificate
// serves every pod and address; the CA, not the address, is the identity).
#pragma once

#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "grpcpp/grpcpp.h"
#include "security/tls.h"

namespace lorc {

using security::kInternalTlsServerName;  // the name internal channels verify (security/tls.h)

// Sets the process's internal-link credentials (call once at start-up, before any internal
// server or channel is made). Empty options: plaintext. Errors: INVALID_ARGUMENT naming the
// --internal-tls-* flag and file (a partial set, unreadable or malformed PEM).
absl::Status ConfigureInternalTls(const security::InternalTlsOptions& options);

// Whether internal links use TLS (ConfigureInternalTls was given the --internal-tls-* files).
bool InternalTlsEnabled();

// With internal TLS: whether this process's --internal-tls-cert is still valid (read again now;
// it may have expired since start, when ConfigureInternalTls checked it and warned if it had less
// than 7 days left). OK without TLS. The error names the flag, the file and the date.
absl::Status InternalCertificateValidNow();

// Turns off gRPC's default SO_REUSEPORT on the builder's ports: a port another process holds
// is then a bind failure, not a port two servers share (the kernel would split the connections
// between them: two coordinators on one --listen). Every lorcserve server calls it.
void ExclusivePort(grpc::ServerBuilder& builder);

// A worker's server pings each coordinator connection (HTTP/2 keepalive) every `owner_lease` / 2
// (at least 1 s), also while nothing flows on it, and closes it when a ping goes unanswered for
// as long: a coordinator that hangs with its step stream open (SIGSTOP, a frozen VM, a network
// partition that drops packets silently) loses the worker after about `owner_lease`, as one that
// stays silent with no call open does (worker/ownership.h). The coordinator's gRPC answers the
// pings on its own threads, so a busy coordinator keeps the worker.
void AddOwnerKeepalive(grpc::ServerBuilder& builder, absl::Duration owner_lease);

// Adds `address` (HOST:PORT, port 0: pick one; the bound port lands in *port, 0 on failure
// once the server is built; a port in use fails: ExclusivePort) to `builder` with the internal
// links' server credentials.
void AddInternalListeningPort(grpc::ServerBuilder& builder, const std::string& address, int* port);

// A channel to the internal service at `address` (HOST:PORT) with the internal links'
// credentials and `args`.
std::shared_ptr<grpc::Channel> InternalChannel(const std::string& address,
                                               const grpc::ChannelArguments& args = grpc::ChannelArguments());

}  // namespace lorc
