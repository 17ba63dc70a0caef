// The host KV tier on the CPU backend: the byte round trip, ordering and errors of
// host_kv_test_body.h for every --kv-cache-dtype geometry and LoRC latent specs.
#include "tests/backend/host_kv_test_body.h"

namespace lorc {
namespace backend_test {

BackendKind HostKvBackendKind() { return BackendKind::kCpu; }

INSTANTIATE_TEST_SUITE_P(Cpu, HostKvTest, ::testing::ValuesIn(kHostKvGeometries), GeometryName);

}  // namespace backend_test
}  // namespace lorc
