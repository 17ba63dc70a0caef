// TLS credentials for lorcserve's gRPC servers and channels, loaded from PEM files.
//
// Public port (`lorcserve coordinator --tls-cert/--tls-key [--tls-client-ca]`): server TLS, and
// mTLS when a client CA is given (client certificates required and verified against it).
// Clients (`lorcserve client --tls-ca [--tls-cert --tls-key] [--tls-server-name]`): the server's
// certificate verified against the CA; a client certificate for mTLS.
// Internal links (coordinator <-> workers: `--internal-tls-cert/--internal-tls-key/
// --internal-tls-ca`, the same three on both ends): mutual TLS, each end presenting its
// certificate and verifying the peer's against the CA. Unset: insecure (plaintext).
//
// Every file is read and parsed here (OpenSSL) before gRPC sees it, so a missing, unreadable or
// malformed file, or a key that does not match its certificate, is INVALID_ARGUMENT naming the
// flag and the file instead of a failure deep inside gRPC.
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "grpcpp/grpcpp.h"

namespace lorc::security {

// The public port. `cert_file` and `key_file` both or neither; `client_ca_file` only with them.
struct ServerTlsOptions {
  std::string cert_file;       // --tls-cert: PEM certificate chain (leaf first)
  std::string key_file;        // --tls-key: PEM private key of the leaf
  std::string client_ca_file;  // --tls-client-ca: PEM CA bundle; set: mTLS
  bool enabled() const { return !cert_file.empty() || !key_file.empty() || !client_ca_file.empty(); }
};

// Server credentials for the public port: insecure when `o` is empty, TLS, or mTLS with a client
// CA. Errors (INVALID_ARGUMENT, naming the flag and file): a missing/unreadable/non-PEM file, a
// key not matching the certificate, --tls-cert without --tls-key (or the reverse), a client CA
// without a certificate.
absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> ServerCredentials(const ServerTlsOptions& o);

// A client of the public port.
struct ClientTlsOptions {
  std::string ca_file;      // --tls-ca: PEM CA bundle the server's certificate must chain to
  std::string cert_file;    // --tls-cert: client certificate (mTLS)
  std::string key_file;     // --tls-key
  std::string server_name;  // --tls-server-name: the name checked against the server's
                            // certificate instead of the address's host (tests, IP addresses)
  bool enabled() const { return !ca_file.empty() || !cert_file.empty() || !key_file.empty(); }
};

// Channel credentials: insecure when `o` is empty, else TLS (a client certificate when
// cert/key are given). With TLS but no --tls-ca, the system's default roots verify the server.
// Errors as ServerCredentials (naming --tls-ca / --tls-cert / --tls-key); --tls-server-name
// without TLS is an error too.
absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> ChannelCredentials(const ClientTlsOptions& o);

// A channel to `address` with `o`'s credentials (and --tls-server-name as the SSL target name
// override); `args` may carry other channel arguments.
absl::StatusOr<std::shared_ptr<grpc::Channel>> CreateChannel(const std::string& address,
                                                             const ClientTlsOptions& o,
                                                             grpc::ChannelArguments args = {});

// The internal links: all three files or none.
// The name internal channels verify the server certificate for: an --internal-tls-cert's
// subjectAltName must hold DNS:lorcserve-internal (pod addresses change, this name does not).
inline constexpr char kInternalTlsServerName[] = "lorcserve-internal";

struct InternalTlsOptions {
  std::string cert_file;  // --internal-tls-cert: this end's certificate
  std::string key_file;   // --internal-tls-key
  std::string ca_file;    // --internal-tls-ca: the CA both ends' certificates chain to
  bool enabled() const { return !cert_file.empty() || !key_file.empty() || !ca_file.empty(); }
};

// Insecure when `o` is empty; else mTLS: the server requires and verifies the client's
// certificate, the channel presents its certificate and verifies the server's. Errors
// (INVALID_ARGUMENT naming the --internal-tls-* flag and file): a partial set, bad files; for the
// server credentials also a certificate without DNS:kInternalTlsServerName in its subjectAltName
// (every lorcserve process serves an internal port and presents the same certificate as a client).
absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> InternalServerCredentials(
    const InternalTlsOptions& o);
absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> InternalChannelCredentials(
    const InternalTlsOptions& o);

// The certificate in `path` (given as `flag`), read again now: OK while it is valid, else
// INVALID_ARGUMENT naming flag, path and the date it expired (or becomes valid). A running
// process's certificate can expire after its start: connections made before stay up, every new
// handshake (a restarted peer) fails; messages about failed connections use this to say so.
absl::Status CheckCertificateValidNow(const std::string& flag, const std::string& path);
// How long the certificate in `path` stays valid from now (negative once expired); errors as
// reading it at start.
absl::StatusOr<absl::Duration> CertificateTimeLeft(const std::string& flag, const std::string& path);

}  // namespace lorc::security
