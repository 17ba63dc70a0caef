// security/: the token-file parser, the constant-time token check, --auth-exempt, TLS credential
// loading (errors naming flag and file) and, over a real in-process gRPC server (grpc.health.v1),
// TLS / mTLS / internal mTLS handshakes and the bearer-token interceptor.
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#include <atomic>
#include <cstdio>
#include <fstream>
#include <memory>
#include <string>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "security/auth.h"
#include "security/tls.h"
#include "tests/testing/scratch_dir.h"
#include "tests/testing/test_certs.h"

namespace lorc::security {
namespace {

using ::grpc::health::v1::Health;
using ::grpc::health::v1::HealthCheckRequest;
using ::grpc::health::v1::HealthCheckResponse;
using ::testing::HasSubstr;

const ::testing::Environment* const kCleanup =
    ::testing::AddGlobalTestEnvironment(new lorc::testing::ScratchCleanup("lorc_security_test"));

// ---- token file ----------------------------------------------------------------------------

TEST(TokenFile, SkipsCommentsAndBlankLinesAndTrims) {
  auto t = ParseTokenFile("# tokens\n\n  alpha  \n#beta\n\tgamma-1\r\n\n", "f");
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(*t, (std::vector<std::string>{"alpha", "gamma-1"}));
}

TEST(TokenFile, EmptyOrOnlyCommentsIsAnError) {
  for (const char* contents : {"", "\n\n", "# only a comment\n   \n"}) {
    auto t = ParseTokenFile(contents, "/etc/tokens");
    ASSERT_FALSE(t.ok()) << "'" << contents << "'";
    EXPECT_EQ(t.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(t.status().message(), HasSubstr("--auth-token-file /etc/tokens: no token"));
  }
}

TEST(TokenFile, InnerWhitespaceNamesTheLine) {
  auto t = ParseTokenFile("ok\n# c\nbad token\n", "f");
  ASSERT_FALSE(t.ok());
  EXPECT_THAT(t.status().message(), HasSubstr("line 3"));
}

TEST(TokenFile, MissingFileNamesFlagAndPath) {
  auto t = ReadTokenFile("/nonexistent/tokens.txt");
  ASSERT_FALSE(t.ok());
  EXPECT_THAT(t.status().message(), HasSubstr("--auth-token-file /nonexistent/tokens.txt: cannot open"));
}

// ---- constant-time comparison ----------------------------------------------------------------

TEST(Tokens, DigestComparison) {
  EXPECT_TRUE(DigestsEqual(Sha256("secret"), Sha256("secret")));
  EXPECT_FALSE(DigestsEqual(Sha256("secret"), Sha256("secreT")));
  Sha256Digest a = Sha256("x"), b = a;
  b[31] ^= 1;  // differs in the last byte only
  EXPECT_FALSE(DigestsEqual(a, b));
  b = a;
  b[0] ^= 0x80;  // the first byte only
  EXPECT_FALSE(DigestsEqual(a, b));
}

TEST(Tokens, ValidOnlyForExactTokens) {
  auto auth = Authenticator::Create({"alpha", "beta-token"}, AuthExemptions{});
  ASSERT_TRUE(auth.ok());
  EXPECT_TRUE((*auth)->Valid("alpha"));
  EXPECT_TRUE((*auth)->Valid("beta-token"));
  for (const char* bad : {"", "alph", "alphaa", "beta", "Alpha", "beta-token "}) {
    EXPECT_FALSE((*auth)->Valid(bad)) << bad;
  }
  std::string_view h = "Bearer alpha";
  EXPECT_TRUE((*auth)->CheckHeader(&h).ok());
  h = "bearer   beta-token";
  EXPECT_TRUE((*auth)->CheckHeader(&h).ok());
  for (std::string_view bad : {"alpha", "Basic alpha", "Bearer", "Bearer alphb"}) {
    grpc::Status s = (*auth)->CheckHeader(&bad);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAUTHENTICATED) << bad;
  }
  EXPECT_EQ((*auth)->CheckHeader(nullptr).error_code(), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_FALSE(Authenticator::Create({}, AuthExemptions{}).ok());
}

// ---- --auth-exempt ---------------------------------------------------------------------------

TEST(AuthExempt, Parse) {
  auto e = ParseAuthExempt("health");
  ASSERT_TRUE(e.ok());
  EXPECT_TRUE(e->health);
  EXPECT_FALSE(e->reflection);
  e = ParseAuthExempt("");
  ASSERT_TRUE(e.ok());
  EXPECT_FALSE(e->health);
  EXPECT_FALSE(e->reflection);
  e = ParseAuthExempt("reflection, health");
  ASSERT_TRUE(e.ok());
  EXPECT_TRUE(e->health);
  EXPECT_TRUE(e->reflection);
  e = ParseAuthExempt("health,metrics");
  ASSERT_FALSE(e.ok());
  EXPECT_THAT(e.status().message(), HasSubstr("--auth-exempt: unknown service 'metrics'"));
}

TEST(AuthExempt, NeedsToken) {
  const AuthExemptions def;  // health only
  EXPECT_FALSE(NeedsToken("/grpc.health.v1.Health/Check", def));
  EXPECT_TRUE(NeedsToken("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", def));
  EXPECT_TRUE(NeedsToken("/lorcserve.v1.LorcServe/Generate", def));
  EXPECT_TRUE(NeedsToken("/unknown.Service/Method", def));
  EXPECT_FALSE(NeedsToken("/lorcserve.internal.Rendezvous/Get", def));
  const AuthExemptions none{false, false};
  EXPECT_TRUE(NeedsToken("/grpc.health.v1.Health/Watch", none));
}

// ---- TLS files -------------------------------------------------------------------------------

class TlsTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    certs_ = new lorc::testing::TestCerts(
        lorc::testing::MakeTestCerts(lorc::testing::MakeScratchDir("lorc_security_test", "certs")));
  }
  static void TearDownTestSuite() { delete certs_; }
  void SetUp() override { ASSERT_EQ(certs_->error, ""); }
  static lorc::testing::TestCerts* certs_;
};
lorc::testing::TestCerts* TlsTest::certs_ = nullptr;

TEST_F(TlsTest, BadFilesNameFlagAndFile) {
  const auto& c = *certs_;
  auto s = ServerCredentials({"/nonexistent.pem", c.server_key, ""});
  ASSERT_FALSE(s.ok());
  EXPECT_THAT(s.status().message(), HasSubstr("--tls-cert /nonexistent.pem: cannot open"));
  const std::string junk = (c.dir / "junk.pem").string();
  std::ofstream(junk) << "not a certificate\n";
  s = ServerCredentials({junk, c.server_key, ""});
  ASSERT_FALSE(s.ok());
  EXPECT_THAT(s.status().message(), HasSubstr(absl::StrCat("--tls-cert ", junk, ": no PEM certificate")));
  s = ServerCredentials({c.server_cert, junk, ""});
  ASSERT_FALSE(s.ok());
  EXPECT_THAT(s.status().message(), HasSubstr(absl::StrCat("--tls-key ", junk, ": no unencrypted PEM private key")));
  s = ServerCredentials({c.server_cert, c.client_key, ""});  // someone else's key
  ASSERT_FALSE(s.ok());
  EXPECT_THAT(s.status().message(), HasSubstr("does not match the certificate in --tls-cert"));
  s = ServerCredentials({c.server_cert, "", ""});
  ASSERT_FALSE(s.ok());
  EXPECT_THAT(s.status().message(), HasSubstr("--tls-key is required with --tls-cert"));
  s = ServerCredentials({"", "", c.ca});
  ASSERT_FALSE(s.ok());
  EXPECT_THAT(s.status().message(), HasSubstr("--tls-client-ca needs --tls-cert"));
  s = ServerCredentials({c.server_cert, c.server_key, junk});
  ASSERT_FALSE(s.ok());
  EXPECT_THAT(s.status().message(), HasSubstr("--tls-client-ca"));
  auto ch = ChannelCredentials({"/nope/ca.pem", "", "", ""});
  ASSERT_FALSE(ch.ok());
  EXPECT_THAT(ch.status().message(), HasSubstr("--tls-ca /nope/ca.pem: cannot open"));
  ch = ChannelCredentials({"", "", "", "localhost"});
  ASSERT_FALSE(ch.ok());
  EXPECT_THAT(ch.status().message(), HasSubstr("--tls-server-name needs TLS"));
  auto in = InternalServerCredentials({c.server_cert, c.server_key, ""});
  ASSERT_FALSE(in.ok());
  EXPECT_THAT(in.status().message(), HasSubstr("missing: --internal-tls-ca"));
  auto inc = InternalChannelCredentials({"", c.client_key, c.ca});
  ASSERT_FALSE(inc.ok());
  EXPECT_THAT(inc.status().message(), HasSubstr("missing: --internal-tls-cert"));
  // A directory read as "empty file"; /dev/zero would be read forever (a tester's findings).
  s = ServerCredentials({c.dir.string(), c.server_key, ""});
  ASSERT_FALSE(s.ok());
  EXPECT_THAT(s.status().message(), HasSubstr(absl::StrCat("--tls-cert ", c.dir.string(), ": is a directory")));
  auto zero = InternalServerCredentials({c.server_cert, c.server_key, "/dev/zero"});
  ASSERT_FALSE(zero.ok());
  EXPECT_THAT(zero.status().message(), HasSubstr("--internal-tls-ca /dev/zero: not a regular file"));
  EXPECT_THAT(ReadTokenFile("/dev/zero").status().message(),
              HasSubstr("--auth-token-file /dev/zero: not a regular file"));
  EXPECT_TRUE(ServerCredentials({}).ok());  // nothing set: insecure
  EXPECT_TRUE(InternalChannelCredentials({}).ok());
}

// Writes a self-signed EC P-256 certificate valid from now + from_s to now + to_s, and its key.
void WriteCertValidBetween(const std::string& cert_path, const std::string& key_path, long from_s, long to_s) {
  EVP_PKEY* key = EVP_EC_gen("P-256");
  ASSERT_NE(key, nullptr);
  X509* x = X509_new();
  ASSERT_NE(x, nullptr);
  X509_set_version(x, 2);
  ASN1_INTEGER_set(X509_get_serialNumber(x), 1);
  X509_gmtime_adj(X509_getm_notBefore(x), from_s);
  X509_gmtime_adj(X509_getm_notAfter(x), to_s);
  X509_set_pubkey(x, key);
  X509_NAME* name = X509_get_subject_name(x);
  X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC, reinterpret_cast<const unsigned char*>("localhost"), -1, -1, 0);
  X509_set_issuer_name(x, name);
  ASSERT_GT(X509_sign(x, key, EVP_sha256()), 0);
  FILE* f = std::fopen(cert_path.c_str(), "w");
  ASSERT_NE(f, nullptr);
  PEM_write_X509(f, x);
  std::fclose(f);
  f = std::fopen(key_path.c_str(), "w");
  ASSERT_NE(f, nullptr);
  PEM_write_PrivateKey(f, key, nullptr, nullptr, 0, nullptr, nullptr);
  std::fclose(f);
  X509_free(x);
  EVP_PKEY_free(key);
}

TEST_F(TlsTest, ExpiredOrNotYetValidCertificateIsRefusedNamingFlagAndDates) {
  // An expired --tls-cert started and served; every client's handshake then failed with
  // "certificate verify failed", which does not say why.
  const std::string cert = (certs_->dir / "expired.pem").string(), key = (certs_->dir / "expired.key").string();
  WriteCertValidBetween(cert, key, -2 * 86400, -86400);
  auto s = ServerCredentials({cert, key, ""});
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.status().message(), HasSubstr(absl::StrCat("--tls-cert ", cert, ": the certificate expired on ")));
  EXPECT_THAT(s.status().message(), HasSubstr("GMT (notAfter)"));
  auto in = InternalServerCredentials({cert, key, certs_->ca});
  ASSERT_FALSE(in.ok());
  EXPECT_THAT(in.status().message(), HasSubstr("--internal-tls-cert"));
  WriteCertValidBetween(cert, key, 86400, 2 * 86400);
  s = ServerCredentials({cert, key, ""});
  ASSERT_FALSE(s.ok());
  EXPECT_THAT(s.status().message(), HasSubstr("the certificate is not valid before "));
  WriteCertValidBetween(cert, key, -60, 86400);  // valid now
  EXPECT_TRUE(ServerCredentials({cert, key, ""}).ok());
  // Read again while running: a certificate that expired since start is named with its date.
  EXPECT_TRUE(CheckCertificateValidNow("--internal-tls-cert", cert).ok());
  absl::StatusOr<absl::Duration> left = CertificateTimeLeft("--internal-tls-cert", cert);
  ASSERT_TRUE(left.ok()) << left.status();
  EXPECT_GT(*left, absl::Hours(23));
  EXPECT_LE(*left, absl::Hours(24));
  WriteCertValidBetween(cert, key, -2 * 86400, -3600);
  EXPECT_THAT(CheckCertificateValidNow("--internal-tls-cert", cert).message(),
              HasSubstr(absl::StrCat("--internal-tls-cert ", cert, ": the certificate expired on ")));
  left = CertificateTimeLeft("--internal-tls-cert", cert);
  ASSERT_TRUE(left.ok()) << left.status();
  EXPECT_LT(*left, absl::ZeroDuration());
}

TEST_F(TlsTest, InternalCertificateWithoutTheInternalNameIsRefusedAtStart) {
  // Peers verify DNS:lorcserve-internal, not the address: a certificate without it started, and
  // every join then failed as "not reachable" (a tester's finding).
  const std::string cert = (certs_->dir / "noname.pem").string(), key = (certs_->dir / "noname.key").string();
  WriteCertValidBetween(cert, key, -60, 86400);  // CN=localhost, no subjectAltName
  auto in = InternalServerCredentials({cert, key, certs_->ca});
  ASSERT_FALSE(in.ok());
  EXPECT_EQ(in.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(in.status().message(),
              HasSubstr(absl::StrCat("--internal-tls-cert ", cert, ": the certificate's subjectAltName has no "
                                     "DNS:lorcserve-internal")));
  EXPECT_TRUE(InternalServerCredentials({certs_->server_cert, certs_->server_key, certs_->ca}).ok());
  EXPECT_TRUE(ServerCredentials({cert, key, ""}).ok());  // the public port checks no fixed name
}

TEST_F(TlsTest, InternalCertificateNotSignedByTheInternalCaIsRefusedAtStart) {
  // Every peer trusting that CA refuses such a process; a tester's coordinator only saw "Socket
  // closed" from each worker.
  auto in = InternalServerCredentials({certs_->server_cert, certs_->server_key, certs_->other_ca});
  ASSERT_FALSE(in.ok());
  EXPECT_EQ(in.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(in.status().message(),
              HasSubstr(absl::StrCat("--internal-tls-cert ", certs_->server_cert, ": not signed by the CA in "
                                     "--internal-tls-ca ", certs_->other_ca, " (")));
  // A CA file holding both CAs: signed by one of them is enough.
  const std::string both = (certs_->dir / "both_cas.pem").string();
  {
    std::ifstream a(certs_->other_ca), b(certs_->ca);
    std::ofstream out(both);
    out << a.rdbuf() << b.rdbuf();
  }
  EXPECT_TRUE(InternalServerCredentials({certs_->server_cert, certs_->server_key, both}).ok());
}

// A synchronous grpc.health.v1 service that answers SERVING and counts its calls.
class CountingHealth final : public Health::Service {
 public:
  grpc::Status Check(grpc::ServerContext*, const HealthCheckRequest*, HealthCheckResponse* r) override {
    ++calls;
    r->set_status(HealthCheckResponse::SERVING);
    return grpc::Status::OK;
  }
  std::atomic<int> calls{0};
};

// A gRPC server with CountingHealth on 127.0.0.1:0.
struct HealthServer {
  CountingHealth health;
  std::unique_ptr<grpc::Server> server;
  int port = 0;
  HealthServer(std::shared_ptr<grpc::ServerCredentials> creds,
               std::shared_ptr<const Authenticator> auth = nullptr) {
    grpc::ServerBuilder b;
    b.AddListeningPort("127.0.0.1:0", std::move(creds), &port);
    b.RegisterService(&health);
    if (auth != nullptr) {
      std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>> f;
      f.push_back(AuthInterceptorFactory(auth));
      b.experimental().SetInterceptorCreators(std::move(f));
    }
    server = b.BuildAndStart();
  }
  ~HealthServer() {
    if (server) server->Shutdown(std::chrono::system_clock::now());
  }
  std::string address() const { return absl::StrCat("127.0.0.1:", port); }
};

grpc::Status Check(const std::shared_ptr<grpc::Channel>& ch, const std::string& token = "") {
  auto stub = Health::NewStub(ch);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  if (!token.empty()) ctx.AddMetadata("authorization", absl::StrCat("Bearer ", token));
  HealthCheckRequest req;
  HealthCheckResponse resp;
  grpc::Status s = stub->Check(&ctx, req, &resp);
  if (s.ok() && resp.status() != HealthCheckResponse::SERVING) {
    return grpc::Status(grpc::StatusCode::INTERNAL, "not SERVING");
  }
  return s;
}

std::shared_ptr<grpc::Channel> Channel(const std::string& addr, const ClientTlsOptions& o) {
  auto ch = CreateChannel(addr, o);
  EXPECT_TRUE(ch.ok()) << ch.status();
  return ch.ok() ? *ch : nullptr;
}

TEST_F(TlsTest, ServerTls) {
  const auto& c = *certs_;
  auto creds = ServerCredentials({c.server_cert, c.server_key, ""});
  ASSERT_TRUE(creds.ok()) << creds.status();
  HealthServer s(*creds);
  ASSERT_NE(s.server, nullptr);
  // Plaintext client: refused (the handshake never completes).
  EXPECT_FALSE(Check(grpc::CreateChannel(s.address(), grpc::InsecureChannelCredentials())).ok());
  // A CA that did not sign the server's certificate: refused.
  EXPECT_EQ(Check(Channel(s.address(), {c.other_ca, "", "", ""})).error_code(),
            grpc::StatusCode::UNAVAILABLE);
  // The right CA: served (127.0.0.1 is in the certificate's SAN; localhost by override).
  EXPECT_TRUE(Check(Channel(s.address(), {c.ca, "", "", ""})).ok());
  EXPECT_TRUE(Check(Channel(s.address(), {c.ca, "", "", "localhost"})).ok());
  // A name not in the certificate: refused.
  EXPECT_FALSE(Check(Channel(s.address(), {c.ca, "", "", "example.com"})).ok());
}

TEST_F(TlsTest, ServerMutualTls) {
  const auto& c = *certs_;
  auto creds = ServerCredentials({c.server_cert, c.server_key, c.ca});
  ASSERT_TRUE(creds.ok()) << creds.status();
  HealthServer s(*creds);
  ASSERT_NE(s.server, nullptr);
  EXPECT_FALSE(Check(Channel(s.address(), {c.ca, "", "", ""})).ok());  // no client certificate
  EXPECT_FALSE(Check(Channel(s.address(), {c.ca, c.other_client_cert, c.other_client_key, ""})).ok());
  EXPECT_TRUE(Check(Channel(s.address(), {c.ca, c.client_cert, c.client_key, ""})).ok());
}

TEST_F(TlsTest, InternalMutualTls) {
  const auto& c = *certs_;
  auto creds = InternalServerCredentials({c.server_cert, c.server_key, c.ca});
  ASSERT_TRUE(creds.ok()) << creds.status();
  HealthServer s(*creds);
  ASSERT_NE(s.server, nullptr);
  // Both ends present a certificate from the same CA (the server's serves as a client too).
  auto good = InternalChannelCredentials({c.server_cert, c.server_key, c.ca});
  ASSERT_TRUE(good.ok()) << good.status();
  EXPECT_TRUE(Check(grpc::CreateChannel(s.address(), *good)).ok());
  auto stranger = InternalChannelCredentials({c.other_client_cert, c.other_client_key, c.ca});
  ASSERT_TRUE(stranger.ok());
  EXPECT_FALSE(Check(grpc::CreateChannel(s.address(), *stranger)).ok());
  auto no_cert = ChannelCredentials({c.ca, "", "", ""});
  ASSERT_TRUE(no_cert.ok());
  EXPECT_FALSE(Check(grpc::CreateChannel(s.address(), *no_cert)).ok());
  EXPECT_FALSE(Check(grpc::CreateChannel(s.address(), grpc::InsecureChannelCredentials())).ok());
}

// ---- the interceptor, over plaintext and TLS ---------------------------------------------------

TEST_F(TlsTest, TokenInterceptor) {
  auto auth = Authenticator::Create({"right-token"}, AuthExemptions{false, false});
  ASSERT_TRUE(auth.ok());
  HealthServer s(grpc::InsecureServerCredentials(), *auth);
  ASSERT_NE(s.server, nullptr);
  auto ch = grpc::CreateChannel(s.address(), grpc::InsecureChannelCredentials());
  grpc::Status st = Check(ch);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::UNAUTHENTICATED) << st.error_message();
  EXPECT_THAT(st.error_message(), HasSubstr("missing 'authorization: Bearer <token>'"));
  st = Check(ch, "wrong-token");
  EXPECT_EQ(st.error_code(), grpc::StatusCode::UNAUTHENTICATED) << st.error_message();
  EXPECT_THAT(st.error_message(), HasSubstr("invalid bearer token"));
  EXPECT_TRUE(Check(ch, "right-token").ok());
  // The client interceptor adds the header to every call.
  grpc::ChannelArguments args;
  std::vector<std::unique_ptr<grpc::experimental::ClientInterceptorFactoryInterface>> f;
  f.push_back(BearerTokenInterceptorFactory("right-token"));
  auto with_token = grpc::experimental::CreateCustomChannelWithInterceptors(
      s.address(), grpc::InsecureChannelCredentials(), args, std::move(f));
  EXPECT_TRUE(Check(with_token).ok());
}

TEST_F(TlsTest, TokenInterceptorExemptsHealth) {
  auto auth = Authenticator::Create({"right-token"}, AuthExemptions{});
  ASSERT_TRUE(auth.ok());
  const auto& c = *certs_;
  auto creds = ServerCredentials({c.server_cert, c.server_key, ""});
  ASSERT_TRUE(creds.ok());
  HealthServer s(*creds, *auth);
  ASSERT_NE(s.server, nullptr);
  EXPECT_TRUE(Check(Channel(s.address(), {c.ca, "", "", ""})).ok());  // exempt: no token needed
}

}  // namespace
}  // namespace lorc::security
