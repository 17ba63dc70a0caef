// Bearer-token authentication for the public gRPC port (`--auth-token-file`, `--auth-exempt`).
//
// A request is authenticated when its metadata holds `authorization: Bearer <token>` with a
// token from the file. Tokens are never compared as strings: each is stored as its SHA-256
// digest and a presented token's digest is compared with every stored one with CRYPTO_memcmp
// (constant time, no early exit over the set), so neither the length nor a prefix of a valid
// token leaks through timing.
//
// Enforcement (gRPC 1.51's server interceptors cannot fail a call before its handler, and an
// AuthMetadataProcessor only runs on TLS ports; this works on plaintext ports too):
// - AuthInterceptorFactory: a server interceptor that, for every method not exempt, checks the
//   metadata when it arrives and, without a valid token, ends the call at once with
//   UNAUTHENTICATED (grpc_call_cancel_with_status): the handler may still run but nothing it
//   writes reaches the client. Covers grpc.health.v1 and reflection when not exempt.
// - Handlers with side effects (lorcserve.v1.LorcServe) also call Authenticator::Check first and
//   return its status, so an unauthenticated Generate or CloseSession never reaches the engine.
// Tokens over a plaintext port travel in the clear: use that for loopback and tests only.
//
// Threads: an Authenticator is immutable after Create; Check is safe from any thread.
#pragma once

#include <array>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "grpcpp/grpcpp.h"
#include "grpcpp/support/client_interceptor.h"
#include "grpcpp/support/server_interceptor.h"

namespace lorc::security {

// The tokens of a token file: one per line; surrounding whitespace is trimmed; blank lines and
// lines starting with `#` are skipped. Errors (INVALID_ARGUMENT naming `path`): no token at all,
// a token with whitespace or control characters inside ("line 3"). `path` is for messages.
absl::StatusOr<std::vector<std::string>> ParseTokenFile(std::string_view contents,
                                                        const std::string& path);
// Reads and parses `path` (errors name --auth-token-file and the file).
absl::StatusOr<std::vector<std::string>> ReadTokenFile(const std::string& path);

// Constant-time equality of two equal-size SHA-256 digests (CRYPTO_memcmp).
using Sha256Digest = std::array<unsigned char, 32>;
Sha256Digest Sha256(std::string_view data);
bool DigestsEqual(const Sha256Digest& a, const Sha256Digest& b);

// What --auth-exempt lets through without a token.
struct AuthExemptions {
  bool health = true;       // grpc.health.v1.Health (kubelet probes)
  bool reflection = false;  // grpc.reflection.v1alpha / v1 ServerReflection
};
// "health", "reflection", "health,reflection", "" (nothing). Errors name --auth-exempt.
absl::StatusOr<AuthExemptions> ParseAuthExempt(std::string_view list);

// Whether a method of the public port ("/grpc.health.v1.Health/Check") needs a token.
// Internal services (`/lorcserve.internal.`) never do here: they belong on the internal port,
// which uses mTLS instead (until they move there they share the public port).
bool NeedsToken(std::string_view method, const AuthExemptions& exempt);

class Authenticator {
 public:
  // Errors: an empty token list.
  static absl::StatusOr<std::shared_ptr<const Authenticator>> Create(
      const std::vector<std::string>& tokens, AuthExemptions exempt);

  // OK when `authorization` metadata (case-insensitive "Bearer ", then the token) matches a
  // token; UNAUTHENTICATED otherwise ("missing ..." / "invalid bearer token").
  grpc::Status Check(const grpc::ServerContextBase& ctx) const;
  // The same, from the metadata value itself (`nullptr`: no authorization header).
  grpc::Status CheckHeader(const std::string_view* authorization) const;
  // True when `token` is one of the tokens (constant time in the token and the set).
  bool Valid(std::string_view token) const;
  const AuthExemptions& exempt() const { return exempt_; }

 private:
  Authenticator() = default;
  std::vector<Sha256Digest> digests_;
  AuthExemptions exempt_;
};

// The server interceptor described above; `auth` outlives the server.
std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface> AuthInterceptorFactory(
    std::shared_ptr<const Authenticator> auth);

// A client interceptor adding `authorization: Bearer <token>` to every call of a channel (works
// on plaintext channels, where gRPC's call credentials refuse to send).
std::unique_ptr<grpc::experimental::ClientInterceptorFactoryInterface> BearerTokenInterceptorFactory(
    std::string token);

}  // namespace lorc::security
