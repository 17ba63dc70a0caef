#include "security/auth.h"

#include <grpc/grpc.h>
#include <openssl/crypto.h>
#include <openssl/sha.h>

#include <cctype>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/json_util.h"
#include "common/status_macros.h"
#include "grpcpp/support/client_interceptor.h"
#include "grpcpp/support/interceptor.h"

namespace lorc::security {
namespace {

constexpr std::string_view kBearer = "bearer ";

// Strips ASCII whitespace at both ends (absl's takes absl::string_view, not std's, here).
std::string_view Trim(std::string_view s) {
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.front()))) s.remove_prefix(1);
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.back()))) s.remove_suffix(1);
  return s;
}

bool EqualsIgnoreCase(std::string_view a, std::string_view b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    if (std::tolower(static_cast<unsigned char>(a[i])) != std::tolower(static_cast<unsigned char>(b[i]))) {
      return false;
    }
  }
  return true;
}

}  // namespace

absl::StatusOr<std::vector<std::string>> ParseTokenFile(std::string_view contents,
                                                        const std::string& path) {
  std::vector<std::string> tokens;
  int line_no = 0;
  for (absl::string_view raw : absl::StrSplit(absl::string_view(contents.data(), contents.size()), '\n')) {
    ++line_no;
    const std::string_view line = Trim(std::string_view(raw.data(), raw.size()));
    if (line.empty() || line.front() == '#') continue;
    for (const char c : line) {
      const unsigned char u = static_cast<unsigned char>(c);
      if (std::isspace(u) || std::iscntrl(u)) {
        return absl::InvalidArgumentError(absl::StrCat(
            "--auth-token-file ", path, ": line ", line_no,
            ": a token may not contain whitespace or control characters"));
      }
    }
    tokens.emplace_back(line);
  }
  if (tokens.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--auth-token-file ", path, ": no token (one per line; blank lines and # comments are skipped)"));
  }
  return tokens;
}

absl::StatusOr<std::vector<std::string>> ReadTokenFile(const std::string& path) {
  if (absl::Status s = CheckReadableFile(path); !s.ok() && !absl::IsNotFound(s)) {
    return absl::InvalidArgumentError(absl::StrCat("--auth-token-file ", s.message()));
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    return absl::InvalidArgumentError(
        absl::StrCat("--auth-token-file ", path, ": cannot open: ", std::strerror(errno)));
  }
  std::stringstream ss;
  ss << in.rdbuf();
  return ParseTokenFile(ss.str(), path);
}

Sha256Digest Sha256(std::string_view data) {
  Sha256Digest d;
  SHA256(reinterpret_cast<const unsigned char*>(data.data()), data.size(), d.data());
  return d;
}

bool DigestsEqual(const Sha256Digest& a, const Sha256Digest& b) {
  return CRYPTO_memcmp(a.data(), b.data(), a.size()) == 0;
}

absl::StatusOr<AuthExemptions> ParseAuthExempt(std::string_view list) {
  AuthExemptions e;
  e.health = false;
  e.reflection = false;
  for (absl::string_view raw :
       absl::StrSplit(absl::string_view(list.data(), list.size()), ',', absl::SkipWhitespace())) {
    const std::string_view item = Trim(std::string_view(raw.data(), raw.size()));
    if (item == "health") {
      e.health = true;
    } else if (item == "reflection") {
      e.reflection = true;
    } else {
      return absl::InvalidArgumentError(absl::StrCat(
          "--auth-exempt: unknown service '", std::string(item), "' (a comma list of health, reflection; empty: none)"));
    }
  }
  return e;
}

bool NeedsToken(std::string_view method, const AuthExemptions& exempt) {
  if (method.starts_with("/lorcserve.internal.")) return false;
  if (method.starts_with("/grpc.health.v1.Health/")) return !exempt.health;
  if (method.starts_with("/grpc.reflection.")) return !exempt.reflection;
  return true;
}

absl::StatusOr<std::shared_ptr<const Authenticator>> Authenticator::Create(
    const std::vector<std::string>& tokens, AuthExemptions exempt) {
  if (tokens.empty()) return absl::InvalidArgumentError("--auth-token-file: no token");
  std::shared_ptr<Authenticator> a(new Authenticator());
  for (const std::string& t : tokens) a->digests_.push_back(Sha256(t));
  a->exempt_ = exempt;
  return std::shared_ptr<const Authenticator>(std::move(a));
}

bool Authenticator::Valid(std::string_view token) const {
  const Sha256Digest d = Sha256(token);
  bool found = false;
  for (const Sha256Digest& t : digests_) found |= DigestsEqual(d, t);  // no early exit
  return found;
}

grpc::Status Authenticator::CheckHeader(const std::string_view* authorization) const {
  if (authorization == nullptr) {
    return grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                        "missing 'authorization: Bearer <token>' metadata");
  }
  const std::string_view v = *authorization;
  if (v.size() < kBearer.size() ||
      !EqualsIgnoreCase(v.substr(0, kBearer.size()), kBearer)) {
    return grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                        "authorization metadata is not 'Bearer <token>'");
  }
  if (!Valid(Trim(v.substr(kBearer.size())))) {
    return grpc::Status(grpc::StatusCode::UNAUTHENTICATED, "invalid bearer token");
  }
  return grpc::Status::OK;
}

namespace {

grpc::Status CheckMetadata(const Authenticator& auth,
                           const std::multimap<grpc::string_ref, grpc::string_ref>& md) {
  auto it = md.find("authorization");
  if (it == md.end()) return auth.CheckHeader(nullptr);
  const std::string_view v(it->second.data(), it->second.size());
  return auth.CheckHeader(&v);
}

class AuthInterceptor final : public grpc::experimental::Interceptor {
 public:
  AuthInterceptor(grpc::experimental::ServerRpcInfo* info, const Authenticator* auth)
      : info_(info), auth_(auth) {}

  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    if (methods->QueryInterceptionHookPoint(
            grpc::experimental::InterceptionHookPoints::POST_RECV_INITIAL_METADATA)) {
      const grpc::Status s = CheckMetadata(*auth_, *methods->GetRecvInitialMetadata());
      if (!s.ok()) {
        // Ends the call with this status before the handler runs; whatever the handler then
        // writes is dropped.
        grpc_call_cancel_with_status(info_->server_context()->c_call(), GRPC_STATUS_UNAUTHENTICATED,
                                     s.error_message().c_str(), nullptr);
      }
    }
    methods->Proceed();
  }

 private:
  grpc::experimental::ServerRpcInfo* info_;
  const Authenticator* auth_;
};

class AuthInterceptorFactoryImpl final
    : public grpc::experimental::ServerInterceptorFactoryInterface {
 public:
  explicit AuthInterceptorFactoryImpl(std::shared_ptr<const Authenticator> auth)
      : auth_(std::move(auth)) {}
  grpc::experimental::Interceptor* CreateServerInterceptor(
      grpc::experimental::ServerRpcInfo* info) override {
    if (!NeedsToken(info->method(), auth_->exempt())) return nullptr;
    return new AuthInterceptor(info, auth_.get());
  }

 private:
  std::shared_ptr<const Authenticator> auth_;
};

class BearerInterceptor final : public grpc::experimental::Interceptor {
 public:
  explicit BearerInterceptor(const std::string* header) : header_(header) {}
  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    if (methods->QueryInterceptionHookPoint(
            grpc::experimental::InterceptionHookPoints::PRE_SEND_INITIAL_METADATA)) {
      methods->GetSendInitialMetadata()->emplace("authorization", *header_);
    }
    methods->Proceed();
  }

 private:
  const std::string* header_;
};

class BearerFactory final : public grpc::experimental::ClientInterceptorFactoryInterface {
 public:
  explicit BearerFactory(std::string token) : header_(absl::StrCat("Bearer ", token)) {}
  grpc::experimental::Interceptor* CreateClientInterceptor(grpc::experimental::ClientRpcInfo*) override {
    return new BearerInterceptor(&header_);
  }

 private:
  const std::string header_;
};

}  // namespace

grpc::Status Authenticator::Check(const grpc::ServerContextBase& ctx) const {
  return CheckMetadata(*this, ctx.client_metadata());
}

std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface> AuthInterceptorFactory(
    std::shared_ptr<const Authenticator> auth) {
  return std::make_unique<AuthInterceptorFactoryImpl>(std::move(auth));
}

std::unique_ptr<grpc::experimental::ClientInterceptorFactoryInterface> BearerTokenInterceptorFactory(
    std::string token) {
  return std::make_unique<BearerFactory>(std::move(token));
}

}  // namespace lorc::security
