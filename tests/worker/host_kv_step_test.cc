// The host KV tier through the step protocol on the CPU backend, every --kv-cache-dtype
// (host_kv_step_test_body.h).
#include "tests/worker/host_kv_step_test_body.h"

namespace lorc {
namespace host_kv_step_test {

BackendKind HostKvStepBackend() { return BackendKind::kCpu; }

INSTANTIATE_TEST_SUITE_P(KvCacheDtypes, HostKvStepTest,
                         ::testing::Values(DtypeCase{"Auto", KvCacheDtype::kAuto},
                                           DtypeCase{"Bf16", KvCacheDtype::kBf16},
                                           DtypeCase{"Fp8", KvCacheDtype::kFp8},
                                           DtypeCase{"Int8", KvCacheDtype::kInt8},
                                           DtypeCase{"Int4", KvCacheDtype::kInt4}),
                         CaseName);

}  // namespace host_kv_step_test
}  // namespace lorc
