// The host KV tier through the step protocol on the CUDA backend (host_kv_step_test_body.h):
// pinned host slots, batched copies on the copy stream, the compute stream waiting only where a
// step touches the copied blocks, decode steps replayed from CUDA graphs after loads. The CUDA
// backend stores auto (BF16) and bf16 caches. Skips without a device.
#include "tests/worker/host_kv_step_test_body.h"

namespace lorc {
namespace host_kv_step_test {

BackendKind HostKvStepBackend() { return BackendKind::kCuda; }

INSTANTIATE_TEST_SUITE_P(CudaKvCacheDtypes, HostKvStepTest,
                         ::testing::Values(DtypeCase{"Auto", KvCacheDtype::kAuto},
                                           DtypeCase{"Bf16", KvCacheDtype::kBf16}),
                         CaseName);

}  // namespace host_kv_step_test
}  // namespace lorc
