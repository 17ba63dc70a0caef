// A model directory's model.safetensors, any bytes: CheckpointReader::Open (the 8-byte header
// length, the JSON header, dtypes, shapes, offsets, overlaps, sizes), then every tensor read as
// fp32 whole and as a slice, as the weight loader does. Errors must be statuses; reads of an
// accepted file must stay inside it (ASan).
#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "fuzz/fuzz_util.h"
#include "model/safetensors.h"

namespace {
constexpr int64_t kMaxReadElements = 1 << 20;  // per tensor: bounds a harness step's time
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace lorc;
  fuzz::WriteScratchFile("model.safetensors",
                         std::string_view(reinterpret_cast<const char*>(data), size));
  absl::StatusOr<std::unique_ptr<CheckpointReader>> reader = CheckpointReader::Open(fuzz::ScratchDir());
  if (!reader.ok()) {
    if (reader.status().message().empty()) fuzz::Fail("an error without a message");
    return 0;
  }
  std::vector<float> out;
  for (const std::string& name : (*reader)->TensorNames()) {
    absl::StatusOr<const TensorInfo*> info = (*reader)->Find(name);
    if (!info.ok()) fuzz::Fail("a listed tensor is not found: " + name);
    const TensorInfo& t = **info;
    const int64_t numel = t.numel();
    if (numel < 0 || numel > kMaxReadElements) continue;
    out.assign(static_cast<size_t>(numel), 0.0f);
    (void)(*reader)->ReadF32(name, t.shape, absl::MakeSpan(out));
    if (t.shape.empty() || t.shape.size() > 2) continue;
    // The second half of the rows (or columns), as a tensor-parallel rank reads its slice.
    for (int dim = 0; dim < static_cast<int>(t.shape.size()); ++dim) {
      TensorSlice slice{dim, t.shape[dim] / 2, -1};
      const int64_t len = t.shape[dim] - slice.begin;
      const int64_t other = t.shape.size() == 2 ? t.shape[1 - dim] : 1;
      out.assign(static_cast<size_t>(len * other), 0.0f);
      (void)(*reader)->ReadF32Slice(name, t.shape, slice, absl::MakeSpan(out));
    }
  }
  // A wrong expected shape and a too-small output must be errors, not overruns.
  for (const std::string& name : (*reader)->TensorNames()) {
    std::vector<float> one(1);
    const std::vector<int64_t> shape = {1};
    (void)(*reader)->ReadF32(name, shape, absl::MakeSpan(one));
  }
  return 0;
}
