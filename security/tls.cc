#include "security/tls.h"

#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "common/json_util.h"
#include "common/status_macros.h"

namespace lorc::security {
namespace {

// The newest OpenSSL error as text ("" when none), clearing the queue.
std::string OpenSslError() {
  const unsigned long e = ERR_peek_last_error();
  std::string out;
  if (e != 0) {
    char buf[256];
    ERR_error_string_n(e, buf, sizeof(buf));
    out = buf;
  }
  ERR_clear_error();
  return out;
}

absl::Status FileError(const std::string& flag, const std::string& path, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat(flag, " ", path, ": ", what));
}

absl::StatusOr<std::string> ReadPem(const std::string& flag, const std::string& path) {
  // A directory read as an empty file, /dev/zero forever, a FIFO blocked (common/json_util.h).
  if (absl::Status s = CheckReadableFile(path); !s.ok() && !absl::IsNotFound(s)) {
    return FileError(flag, path, std::string(absl::StripPrefix(s.message(), absl::StrCat(path, ": "))));
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) return FileError(flag, path, absl::StrCat("cannot open: ", std::strerror(errno)));
  std::stringstream ss;
  ss << in.rdbuf();
  if (in.bad()) return FileError(flag, path, "read error");
  if (ss.str().empty()) return FileError(flag, path, "empty file");
  return ss.str();
}

struct BioDeleter { void operator()(BIO* b) const { BIO_free(b); } };
struct X509Deleter { void operator()(X509* x) const { X509_free(x); } };
struct KeyDeleter { void operator()(EVP_PKEY* k) const { EVP_PKEY_free(k); } };
using BioPtr = std::unique_ptr<BIO, BioDeleter>;
using X509Ptr = std::unique_ptr<X509, X509Deleter>;
using KeyPtr = std::unique_ptr<EVP_PKEY, KeyDeleter>;

BioPtr MemBio(const std::string& pem) {
  return BioPtr(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
}

// The first certificate of `pem` (a bundle holds at least one).
absl::StatusOr<X509Ptr> FirstCertificate(const std::string& flag, const std::string& path,
                                         const std::string& pem) {
  BioPtr bio = MemBio(pem);
  X509Ptr cert(bio ? PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr) : nullptr);
  if (cert == nullptr) {
    return FileError(flag, path, absl::StrCat("no PEM certificate (", OpenSslError(), ")"));
  }
  return cert;
}

// "Jan  2 00:00:00 2020 GMT" (OpenSSL's ASN1_TIME_print).
std::string TimeText(const ASN1_TIME* t) {
  BioPtr bio(BIO_new(BIO_s_mem()));
  if (bio == nullptr || ASN1_TIME_print(bio.get(), t) != 1) return "?";
  char* data = nullptr;
  const long n = BIO_get_mem_data(bio.get(), &data);
  return std::string(data, static_cast<size_t>(n));
}

// A certificate this process presents must be valid now: an expired one (or one not yet valid)
// would start and then fail every handshake with the peer's "certificate verify failed".
absl::Status CheckValidNow(const std::string& flag, const std::string& path, X509* cert) {
  const ASN1_TIME* not_after = X509_get0_notAfter(cert);
  if (X509_cmp_current_time(not_after) < 0) {
    return FileError(flag, path, absl::StrCat("the certificate expired on ", TimeText(not_after), " (notAfter)"));
  }
  const ASN1_TIME* not_before = X509_get0_notBefore(cert);
  if (X509_cmp_current_time(not_before) > 0) {
    return FileError(flag, path,
                     absl::StrCat("the certificate is not valid before ", TimeText(not_before),
                                  " (notBefore; is this machine's clock right?)"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> ReadCertificates(const std::string& flag, const std::string& path) {
  ASSIGN_OR_RETURN(std::string pem, ReadPem(flag, path));
  RETURN_IF_ERROR(FirstCertificate(flag, path, pem).status());
  return pem;
}

// Reads a certificate and its key, checking that they belong together.
// `required_dns`, when set: a DNS name the certificate's subjectAltName must hold (the peers
// verify that name, not the address they dialled).
absl::StatusOr<grpc::SslServerCredentialsOptions::PemKeyCertPair> ReadKeyCertPair(
    const std::string& cert_flag, const std::string& cert_path, const std::string& key_flag,
    const std::string& key_path, const char* required_dns = nullptr) {
  ASSIGN_OR_RETURN(std::string cert_pem, ReadPem(cert_flag, cert_path));
  ASSIGN_OR_RETURN(X509Ptr cert, FirstCertificate(cert_flag, cert_path, cert_pem));
  RETURN_IF_ERROR(CheckValidNow(cert_flag, cert_path, cert.get()));
  if (required_dns != nullptr &&
      X509_check_host(cert.get(), required_dns, 0, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS, nullptr) != 1) {
    OpenSslError();
    return FileError(cert_flag, cert_path,
                     absl::StrCat("the certificate's subjectAltName has no DNS:", required_dns,
                                  " (internal links verify that name, not the address dialled; ",
                                  "security/README.md)"));
  }
  ASSIGN_OR_RETURN(std::string key_pem, ReadPem(key_flag, key_path));
  BioPtr bio = MemBio(key_pem);
  KeyPtr key(bio ? PEM_read_bio_PrivateKey(bio.get(), nullptr, nullptr, nullptr) : nullptr);
  if (key == nullptr) {
    return FileError(key_flag, key_path,
                     absl::StrCat("no unencrypted PEM private key (", OpenSslError(), ")"));
  }
  if (X509_check_private_key(cert.get(), key.get()) != 1) {
    OpenSslError();
    return FileError(key_flag, key_path,
                     absl::StrCat("does not match the certificate in ", cert_flag, " ", cert_path));
  }
  return grpc::SslServerCredentialsOptions::PemKeyCertPair{key_pem, cert_pem};
}

// Whether the certificate in cert_pem (its first; the others: intermediates) chains to a CA in
// ca_pem. A process whose own certificate its own CA does not sign is refused by every peer that
// shares that CA (a tester's coordinator then saw only "Socket closed").
absl::Status CheckSignedBy(const std::string& cert_flag, const std::string& cert_path,
                           const std::string& cert_pem, const std::string& ca_flag,
                           const std::string& ca_path, const std::string& ca_pem) {
  struct StoreDeleter { void operator()(X509_STORE* s) const { X509_STORE_free(s); } };
  struct CtxDeleter { void operator()(X509_STORE_CTX* c) const { X509_STORE_CTX_free(c); } };
  struct StackDeleter { void operator()(STACK_OF(X509)* s) const { sk_X509_pop_free(s, X509_free); } };
  std::unique_ptr<X509_STORE, StoreDeleter> store(X509_STORE_new());
  std::unique_ptr<STACK_OF(X509), StackDeleter> chain(sk_X509_new_null());
  if (store == nullptr || chain == nullptr) return absl::ResourceExhaustedError("out of memory");
  BioPtr ca_bio = MemBio(ca_pem);
  while (X509* ca = ca_bio ? PEM_read_bio_X509(ca_bio.get(), nullptr, nullptr, nullptr) : nullptr) {
    X509_STORE_add_cert(store.get(), ca);
    X509_free(ca);
  }
  OpenSslError();  // the end of the file
  BioPtr bio = MemBio(cert_pem);
  X509Ptr leaf(bio ? PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr) : nullptr);
  while (X509* more = bio ? PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr) : nullptr) {
    sk_X509_push(chain.get(), more);
  }
  OpenSslError();
  if (leaf == nullptr) return FileError(cert_flag, cert_path, "no PEM certificate");
  std::unique_ptr<X509_STORE_CTX, CtxDeleter> ctx(X509_STORE_CTX_new());
  if (ctx == nullptr || X509_STORE_CTX_init(ctx.get(), store.get(), leaf.get(), chain.get()) != 1) {
    return absl::ResourceExhaustedError("out of memory");
  }
  if (X509_verify_cert(ctx.get()) != 1) {
    const std::string why = X509_verify_cert_error_string(X509_STORE_CTX_get_error(ctx.get()));
    OpenSslError();
    return FileError(cert_flag, cert_path,
                     absl::StrCat("not signed by the CA in ", ca_flag, " ", ca_path, " (", why,
                                  "): every peer that trusts that CA would refuse it"));
  }
  return absl::OkStatus();
}

absl::Status NeedBoth(const std::string& a_flag, const std::string& a, const std::string& b_flag,
                      const std::string& b) {
  if (a.empty() != b.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(a.empty() ? a_flag : b_flag, " is required with ",
                                                   a.empty() ? b_flag : a_flag));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> ServerCredentials(const ServerTlsOptions& o) {
  if (!o.enabled()) return grpc::InsecureServerCredentials();
  RETURN_IF_ERROR(NeedBoth("--tls-cert", o.cert_file, "--tls-key", o.key_file));
  if (o.cert_file.empty()) {
    return absl::InvalidArgumentError("--tls-client-ca needs --tls-cert and --tls-key");
  }
  grpc::SslServerCredentialsOptions ssl(GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE);
  ASSIGN_OR_RETURN(auto pair, ReadKeyCertPair("--tls-cert", o.cert_file, "--tls-key", o.key_file));
  ssl.pem_key_cert_pairs.push_back(std::move(pair));
  if (!o.client_ca_file.empty()) {
    ASSIGN_OR_RETURN(ssl.pem_root_certs, ReadCertificates("--tls-client-ca", o.client_ca_file));
    ssl.client_certificate_request = GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY;
  }
  return grpc::SslServerCredentials(ssl);
}

absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> ChannelCredentials(const ClientTlsOptions& o) {
  if (!o.enabled()) {
    if (!o.server_name.empty()) {
      return absl::InvalidArgumentError("--tls-server-name needs TLS (--tls-ca or --tls-cert)");
    }
    return grpc::InsecureChannelCredentials();
  }
  RETURN_IF_ERROR(NeedBoth("--tls-cert", o.cert_file, "--tls-key", o.key_file));
  grpc::SslCredentialsOptions ssl;
  if (!o.ca_file.empty()) {
    ASSIGN_OR_RETURN(ssl.pem_root_certs, ReadCertificates("--tls-ca", o.ca_file));
  }
  if (!o.cert_file.empty()) {
    ASSIGN_OR_RETURN(auto pair, ReadKeyCertPair("--tls-cert", o.cert_file, "--tls-key", o.key_file));
    ssl.pem_private_key = std::move(pair.private_key);
    ssl.pem_cert_chain = std::move(pair.cert_chain);
  }
  return grpc::SslCredentials(ssl);
}

absl::StatusOr<std::shared_ptr<grpc::Channel>> CreateChannel(const std::string& address,
                                                             const ClientTlsOptions& o,
                                                             grpc::ChannelArguments args) {
  ASSIGN_OR_RETURN(std::shared_ptr<grpc::ChannelCredentials> creds, ChannelCredentials(o));
  if (!o.server_name.empty()) args.SetSslTargetNameOverride(o.server_name);
  return grpc::CreateCustomChannel(address, creds, args);
}

namespace {

absl::Status CheckInternalComplete(const InternalTlsOptions& o) {
  if (o.cert_file.empty() || o.key_file.empty() || o.ca_file.empty()) {
    std::string missing;
    for (const auto& [flag, v] : {std::pair<const char*, const std::string*>{"--internal-tls-cert", &o.cert_file},
                                  {"--internal-tls-key", &o.key_file},
                                  {"--internal-tls-ca", &o.ca_file}}) {
      if (v->empty()) absl::StrAppend(&missing, missing.empty() ? "" : ", ", flag);
    }
    return absl::InvalidArgumentError(absl::StrCat(
        "internal mTLS needs --internal-tls-cert, --internal-tls-key and --internal-tls-ca; missing: ",
        missing));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> InternalServerCredentials(
    const InternalTlsOptions& o) {
  if (!o.enabled()) return grpc::InsecureServerCredentials();
  RETURN_IF_ERROR(CheckInternalComplete(o));
  grpc::SslServerCredentialsOptions ssl(GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  ASSIGN_OR_RETURN(auto pair, ReadKeyCertPair("--internal-tls-cert", o.cert_file,
                                              "--internal-tls-key", o.key_file, kInternalTlsServerName));
  ASSIGN_OR_RETURN(ssl.pem_root_certs, ReadCertificates("--internal-tls-ca", o.ca_file));
  RETURN_IF_ERROR(CheckSignedBy("--internal-tls-cert", o.cert_file, pair.cert_chain, "--internal-tls-ca",
                                o.ca_file, ssl.pem_root_certs));
  ssl.pem_key_cert_pairs.push_back(std::move(pair));
  return grpc::SslServerCredentials(ssl);
}

absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> InternalChannelCredentials(
    const InternalTlsOptions& o) {
  if (!o.enabled()) return grpc::InsecureChannelCredentials();
  RETURN_IF_ERROR(CheckInternalComplete(o));
  grpc::SslCredentialsOptions ssl;
  ASSIGN_OR_RETURN(auto pair, ReadKeyCertPair("--internal-tls-cert", o.cert_file,
                                              "--internal-tls-key", o.key_file));
  ssl.pem_private_key = std::move(pair.private_key);
  ssl.pem_cert_chain = std::move(pair.cert_chain);
  ASSIGN_OR_RETURN(ssl.pem_root_certs, ReadCertificates("--internal-tls-ca", o.ca_file));
  return grpc::SslCredentials(ssl);
}

absl::Status CheckCertificateValidNow(const std::string& flag, const std::string& path) {
  ASSIGN_OR_RETURN(std::string pem, ReadPem(flag, path));
  ASSIGN_OR_RETURN(X509Ptr cert, FirstCertificate(flag, path, pem));
  return CheckValidNow(flag, path, cert.get());
}

absl::StatusOr<absl::Duration> CertificateTimeLeft(const std::string& flag, const std::string& path) {
  ASSIGN_OR_RETURN(std::string pem, ReadPem(flag, path));
  ASSIGN_OR_RETURN(X509Ptr cert, FirstCertificate(flag, path, pem));
  int days = 0, seconds = 0;
  if (ASN1_TIME_diff(&days, &seconds, nullptr, X509_get0_notAfter(cert.get())) != 1) {
    OpenSslError();
    return FileError(flag, path, "cannot read the certificate's notAfter");
  }
  return absl::Hours(24) * days + absl::Seconds(seconds);
}

}  // namespace lorc::security
