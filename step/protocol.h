// Which coordinator <-> worker protocol this binary speaks, so that a coordinator and workers of
// different builds (a rolling update that replaced some pods, a worker host left on an old
// image) refuse each other with a message naming both instead of misreading each other's
// messages: proto3 drops fields one side does not know and reads the rest as their defaults.
#pragma once

#include <string>
#include "absl/strings/string_view.h"

#include "absl/status/status.h"

namespace lorc {

// The fingerprint of proto/lorcserve/internal/worker.proto and join.proto as this binary was
// compiled with them: the first 16 hex digits of SHA-256 (OpenSSL) over their descriptors'
// FileDescriptor::DebugString() (packages, messages, fields with their numbers, types and labels,
// enums, services; no comments). Any change to a field, message or RPC changes it; comments and
// code outside the .proto files do not. Computed once per process.
const std::string& WorkerProtocolFingerprint();

// "worker protocol 1a2b3c4d5e6f7a8b, lorcserve 0.1.0": this binary's, for messages.
std::string DescribeWorkerProtocol();

// OK when `peer_fingerprint` (what `peer` sent: "coordinator 0x... (at ...)", "worker 1 at
// host:port") equals WorkerProtocolFingerprint(); else FAILED_PRECONDITION naming the peer, both
// fingerprints (an empty one: a build before 2026-12-07, which sends none), `self` ("this
// worker", "this coordinator") and the remedy.
absl::Status CheckPeerProtocol(absl::string_view peer_fingerprint, absl::string_view peer, absl::string_view self);

}  // namespace lorc
