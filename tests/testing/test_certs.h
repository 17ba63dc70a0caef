// Test certificates made at test time with the `openssl` CLI (Debian package openssl): a CA, a
// server certificate (SAN IP:127.0.0.1, DNS:localhost, DNS:lorcserve-internal) and a client certificate signed by it,
// and an unrelated second CA with its own client certificate. EC P-256 keys, valid 1 day.
#pragma once

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

#include "absl/strings/str_cat.h"

namespace lorc::testing {

struct TestCerts {
  std::filesystem::path dir;
  std::string ca, server_cert, server_key, client_cert, client_key;
  std::string other_ca, other_client_cert, other_client_key;  // the unrelated CA
  std::string error;  // empty on success
};

// Writes the files into `dir` (which exists). `error` says what failed (e.g. no openssl).
inline TestCerts MakeTestCerts(const std::filesystem::path& dir) {
  TestCerts c;
  c.dir = dir;
  auto p = [&](const std::string& name) { return (dir / name).string(); };
  c.ca = p("ca.pem");
  c.server_cert = p("server.pem");
  c.server_key = p("server.key");
  c.client_cert = p("client.pem");
  c.client_key = p("client.key");
  c.other_ca = p("other_ca.pem");
  c.other_client_cert = p("other_client.pem");
  c.other_client_key = p("other_client.key");
  {
    std::ofstream ext(p("server.ext"));
    ext << "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:lorcserve-internal\n"
           "extendedKeyUsage=serverAuth,clientAuth\n";
    std::ofstream cext(p("client.ext"));
    cext << "extendedKeyUsage=clientAuth\n";
  }
  const std::string q = "2>>" + p("openssl.log");
  auto key = [&](const std::string& k) {
    return absl::StrCat("openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out ", k, " ", q);
  };
  auto ca = [&](const std::string& cert, const std::string& k, const std::string& cn) {
    return absl::StrCat(key(k), " && openssl req -x509 -new -key ", k, " -out ", cert,
                        " -days 1 -subj /CN=", cn, " ", q);
  };
  auto leaf = [&](const std::string& cert, const std::string& k, const std::string& cn,
                  const std::string& ca_cert, const std::string& ca_key, const std::string& ext) {
    return absl::StrCat(key(k), " && openssl req -new -key ", k, " -subj /CN=", cn, " -out ",
                        cert, ".csr ", q, " && openssl x509 -req -in ", cert, ".csr -CA ", ca_cert,
                        " -CAkey ", ca_key, " -CAcreateserial -days 1 -extfile ", ext, " -out ",
                        cert, " ", q);
  };
  const std::string cmd = absl::StrCat(
      ca(c.ca, p("ca.key"), "lorcserve-test-ca"), " && ",
      leaf(c.server_cert, c.server_key, "localhost", c.ca, p("ca.key"), p("server.ext")), " && ",
      leaf(c.client_cert, c.client_key, "lorcserve-test-client", c.ca, p("ca.key"), p("client.ext")),
      " && ", ca(c.other_ca, p("other_ca.key"), "unrelated-ca"), " && ",
      leaf(c.other_client_cert, c.other_client_key, "other-client", c.other_ca, p("other_ca.key"),
           p("client.ext")));
  if (std::system(cmd.c_str()) != 0) {
    std::ifstream log(p("openssl.log"));
    std::string text((std::istreambuf_iterator<char>(log)), std::istreambuf_iterator<char>());
    c.error = absl::StrCat("openssl failed (is the openssl CLI installed?): ", text);
  }
  return c;
}

}  // namespace lorc::testing
