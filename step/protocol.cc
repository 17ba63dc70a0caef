#include "step/protocol.h"

#include <openssl/sha.h>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "lorcserve/internal/join.pb.h"
#include "lorcserve/internal/worker.pb.h"

#ifndef LORC_VERSION
#define LORC_VERSION "unknown"
#endif

namespace lorc {

const std::string& WorkerProtocolFingerprint() {
  static const std::string* fingerprint = [] {
    const std::string text = absl::StrCat(lorcserve::internal::LoadModelRequest::descriptor()->file()->DebugString(),
                                          lorcserve::internal::JoinRequest::descriptor()->file()->DebugString());
    unsigned char digest[SHA256_DIGEST_LENGTH];
    SHA256(reinterpret_cast<const unsigned char*>(text.data()), text.size(), digest);
    return new std::string(absl::BytesToHexString(
        absl::string_view(reinterpret_cast<const char*>(digest), 8)));
  }();
  return *fingerprint;
}

std::string DescribeWorkerProtocol() {
  return absl::StrCat("worker protocol ", WorkerProtocolFingerprint(), ", lorcserve ", LORC_VERSION);
}

absl::Status CheckPeerProtocol(absl::string_view peer_fingerprint, absl::string_view peer, absl::string_view self) {
  if (peer_fingerprint == WorkerProtocolFingerprint()) return absl::OkStatus();
  // At most 32 bytes of what the peer sent, escaped: the status travels in gRPC metadata (a 20 KB
  // one became RESOURCE_EXHAUSTED, a tester).
  constexpr size_t kShown = 32;
  const std::string theirs =
      peer_fingerprint.empty()
          ? std::string("none (a lorcserve build before 2026-12-07)")
          : absl::StrCat("worker protocol ", absl::CEscape(peer_fingerprint.substr(0, kShown)),
                         peer_fingerprint.size() > kShown ? absl::StrCat("... (", peer_fingerprint.size(), " bytes)") : "");
  return absl::FailedPreconditionError(absl::StrCat(
      peer, " speaks ", theirs, "; ", self, " speaks ", DescribeWorkerProtocol(),
      ": run the same lorcserve build on the coordinator and every worker"));
}

}  // namespace lorc
