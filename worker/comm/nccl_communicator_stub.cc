// CreateNcclCommunicator for builds without CUDA.
#include "absl/status/status.h"
#include "worker/comm/communicator.h"

namespace lorc {

absl::StatusOr<std::unique_ptr<Communicator>> CreateNcclCommunicator(const WorldConfig& world,
                                                                     RendezvousStore* store,
                                                                     int cuda_device,
                                                                     void* cuda_stream,
                                                                     const CommOptions& options) {
  return absl::UnimplementedError("NCCL communicator: lorcserve was built without CUDA");
}

}  // namespace lorc
