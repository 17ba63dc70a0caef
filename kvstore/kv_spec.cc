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
  if (!rope.empty() && rope.size() != k_width.size()) {
    return absl::InvalidArgumentError(absl::StrCat("kv cache: rope has ", rope.size(),
                                                   " layers, k_width ", k_width.size()));
  }
  for (size_t l = 0; l < k_width.size(); ++l) {
    if (k_width[l] <= 0 || v_width[l] <= 0) {
      return absl::InvalidArgumentError(absl::StrCat("kv cache: layer ", l, " has width <= 0"));
    }
  }
  return absl::OkStatus();
}

std::string KvCacheSpec::CompressionName() const {
  for (KvRope r : rope) {
    if (r != KvRope::kBeforeCache) return "latent";
  }
  return "none";
}

absl::StatusOr<KvCacheSpec> MakeKvCacheSpec(const ModelConfig& config, const KvSpecOptions& options) {
  if (options.block_size <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("kv cache: block_size ", options.block_size,
                                                   " must be positive"));
  }
  const int64_t heads = options.num_kv_heads > 0 ? options.num_kv_heads : config.num_kv_heads;
  if (heads <= 0 || config.head_dim <= 0 || config.num_layers <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("kv cache: ", heads, " KV heads of dim ",
                                                   config.head_dim, " over ", config.num_layers,
                                                   " layers"));
  }
  KvCacheSpec spec;
  spec.block_size = options.block_size;
  spec.dtype = options.dtype;
  spec.k_width.assign(config.num_layers, heads * config.head_dim);
  spec.v_width.assign(config.num_layers, heads * config.head_dim);
  spec.rope.assign(config.num_layers, KvRope::kBeforeCache);
  return spec;
}

}  // namespace lorc
