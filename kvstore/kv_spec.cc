#include "kvstore/kv_spec.h"

#include "absl/strings/str_cat.h"

namespace lorc {

int64_t KvCacheSpec::BytesPerToken() const {
  int64_t elems = 0;
  for (size_t l = 0; l < k_width.size(); ++l) elems += k_width[l] + v_width[l];
  return elems * static_cast<int64_t>(DTypeSize(dtype));
}

absl::Status KvCacheSpec::Validate() const {
  if (block_size <= 0) return absl::InvalidArgumentError("kv cache: block_size must be positive");
  if (num_blocks < 0) return absl::InvalidArgumentError("kv cache: num_blocks must be >= 0");
  if (k_width.empty() || k_width.size() != v_width.size()) {
    return absl::InvalidArgumentError(absl::StrCat("kv cache: k_width has ", k_width.size(),
                                                   " layers, v_width ", v_width.size()));
  }
  for (size_t l = 0; l < k_width.size(); ++l) {
    if (k_width[l] <= 0 || v_width[l] <= 0) {
      return absl::InvalidArgumentError(absl::StrCat("kv cache: layer ", l, " has width <= 0"));
    }
  }
  return absl::OkStatus();
}

}  // namespace lorc
