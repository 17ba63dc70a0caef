// The one place internal gRPC links are made: every server of an internal service (the
// coordinator's --internal-listen port: Rendezvous, WorkerJoin; a worker's Worker service; the
// bench's loopback rendezvous) adds its port through AddInternalListeningPort, and every channel
// to one (coordinator -> worker, worker -> rendezvous / join) comes from InternalChannel. Today
// both are plaintext (insecure credentials); mTLS on the internal links plugs in here.
#pragma once

#include <memory>
#include <string>

#include "grpcpp/grpcpp.h"

namespace lorc {

// Adds `address` (HOST:PORT, port 0: pick one; the bound port lands in *port, 0 on failure
// once the server is built) to `builder` with the internal links' server credentials.
void AddInternalListeningPort(grpc::ServerBuilder& builder, const std::string& address, int* port);

// A channel to the internal service at `address` (HOST:PORT) with the internal links'
// credentials and `args`.
std::shared_ptr<grpc::Channel> InternalChannel(const std::string& address,
                                               const grpc::ChannelArguments& args = grpc::ChannelArguments());

}  // namespace lorc
