#include "worker/comm/internal_grpc.h"

namespace lorc {

void AddInternalListeningPort(grpc::ServerBuilder& builder, const std::string& address, int* port) {
  builder.AddListeningPort(address, grpc::InsecureServerCredentials(), port);
}

std::shared_ptr<grpc::Channel> InternalChannel(const std::string& address,
                                               const grpc::ChannelArguments& args) {
  return grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(), args);
}

}  // namespace lorc
