#include "cli/security_flags.h"

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace lorc::cli {

std::vector<FlagSpec> ServerSecurityFlags() {
  return {
      {"tls-cert", true, "TLS on the public port: PEM certificate chain", "FILE"},
      {"tls-key", true, "TLS: PEM private key of --tls-cert", "FILE"},
      {"tls-client-ca", true, "mTLS: require client certificates signed by this PEM CA bundle", "FILE"},
      {"auth-token-file", true,
       "require 'authorization: Bearer <token>' with a token of FILE (one per line, # comments)", "FILE"},
      {"auth-exempt", true,
       "with --auth-token-file: comma list of health, reflection served without a token "
       "(default health; empty: none)",
       "LIST"},
  };
}

absl::StatusOr<ServerSecurity> ParseServerSecurity(const Args& args) {
  ServerSecurity s;
  s.tls.cert_file = args.Get("tls-cert");
  s.tls.key_file = args.Get("tls-key");
  s.tls.client_ca_file = args.Get("tls-client-ca");
  if (args.Has("auth-exempt") && !args.Has("auth-token-file")) {
    return absl::InvalidArgumentError("--auth-exempt needs --auth-token-file");
  }
  if (args.Has("auth-token-file")) {
    ASSIGN_OR_RETURN(std::vector<std::string> tokens,
                     security::ReadTokenFile(args.Get("auth-token-file")));
    ASSIGN_OR_RETURN(security::AuthExemptions exempt,
                     security::ParseAuthExempt(args.Get("auth-exempt", "health")));
    ASSIGN_OR_RETURN(s.auth, security::Authenticator::Create(tokens, exempt));
  }
  return s;
}

std::vector<FlagSpec> InternalTlsFlags() {
  return {
      {"internal-tls-cert", true, "mTLS on the coordinator <-> worker links: this end's PEM certificate", "FILE"},
      {"internal-tls-key", true, "internal mTLS: PEM private key of --internal-tls-cert", "FILE"},
      {"internal-tls-ca", true, "internal mTLS: the PEM CA both ends' certificates chain to", "FILE"},
  };
}

security::InternalTlsOptions ParseInternalTls(const Args& args) {
  return {args.Get("internal-tls-cert"), args.Get("internal-tls-key"), args.Get("internal-tls-ca")};
}

std::vector<std::string> InternalTlsArgs(const security::InternalTlsOptions& o) {
  std::vector<std::string> out;
  for (const auto& [flag, v] : {std::pair<const char*, const std::string*>{"--internal-tls-cert", &o.cert_file},
                                {"--internal-tls-key", &o.key_file},
                                {"--internal-tls-ca", &o.ca_file}}) {
    if (!v->empty()) out.insert(out.end(), {flag, *v});
  }
  return out;
}

std::vector<FlagSpec> ClientSecurityFlags() {
  return {
      {"tls-ca", true, "TLS: verify the server's certificate against this PEM CA bundle", "FILE"},
      {"tls-cert", true, "mTLS: client PEM certificate", "FILE"},
      {"tls-key", true, "mTLS: PEM private key of --tls-cert", "FILE"},
      {"tls-server-name", true, "TLS: the name the server's certificate must carry (default: the --server host)", "NAME"},
      {"auth-token-file", true, "send 'authorization: Bearer <token>' with FILE's first token", "FILE"},
  };
}

absl::StatusOr<ClientSecurity> ParseClientSecurity(const Args& args) {
  ClientSecurity s;
  s.tls = {args.Get("tls-ca"), args.Get("tls-cert"), args.Get("tls-key"), args.Get("tls-server-name")};
  if (args.Has("auth-token-file")) {
    ASSIGN_OR_RETURN(std::vector<std::string> tokens,
                     security::ReadTokenFile(args.Get("auth-token-file")));
    s.token = tokens.front();
  }
  return s;
}

}  // namespace lorc::cli
