// The security flags of the `lorcserve` subcommands (security/README.md): TLS and bearer
// tokens on the public port (coordinator), internal mTLS (coordinator and worker), and the
// client side (client, bench). Parse errors are InvalidArgument naming the flag (and file).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "cli/args.h"
#include "grpcpp/grpcpp.h"
#include "security/auth.h"
#include "security/tls.h"

namespace lorc::cli {

// --tls-cert, --tls-key, --tls-client-ca, --auth-token-file, --auth-exempt.
std::vector<FlagSpec> ServerSecurityFlags();
struct ServerSecurity {
  security::ServerTlsOptions tls;
  std::shared_ptr<const security::Authenticator> auth;  // null without --auth-token-file
};
// Reads the token file (the certificate files are read when the server starts). Errors:
// --auth-exempt without --auth-token-file, a bad token file or exemption list.
absl::StatusOr<ServerSecurity> ParseServerSecurity(const Args& args);

// --internal-tls-cert, --internal-tls-key, --internal-tls-ca.
std::vector<FlagSpec> InternalTlsFlags();
security::InternalTlsOptions ParseInternalTls(const Args& args);
// The same flags as command-line arguments (for spawned workers); empty when unset.
std::vector<std::string> InternalTlsArgs(const security::InternalTlsOptions& o);

// --tls-ca, --tls-cert, --tls-key, --tls-server-name, --auth-token-file.
std::vector<FlagSpec> ClientSecurityFlags();
struct ClientSecurity {
  security::ClientTlsOptions tls;
  std::string token;  // the token file's first token; empty: none
};
absl::StatusOr<ClientSecurity> ParseClientSecurity(const Args& args);

}  // namespace lorc::cli
