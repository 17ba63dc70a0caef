// The host KV tier on the CUDA backend (pinned host memory, batched copies on the copy stream,
// event ordering against the compute stream): the byte round trip, ordering and errors of
// host_kv_test_body.h for every --kv-cache-dtype geometry and LoRC latent specs (the caches hold
// random bytes, so quantized layouts are covered although CUDA does not write them yet). Skips
// without a CUDA device.
#include "tests/backend/host_kv_test_body.h"

namespace lorc {
namespace backend_test {

BackendKind HostKvBackendKind() { return BackendKind::kCuda; }

INSTANTIATE_TEST_SUITE_P(Cuda, HostKvTest, ::testing::ValuesIn(kHostKvGeometries), GeometryName);

}  // namespace backend_test
}  // namespace lorc
