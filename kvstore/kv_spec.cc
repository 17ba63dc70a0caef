#include "kvstore/kv_spec.h"

#include <algorithm>

#include <cstdio>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace lorc {

absl::StatusOr<KvCacheDtype> ParseKvCacheDtype(absl::string_view s) {
  if (s == "auto") return KvCacheDtype::kAuto;
  if (s == "bf16" || s == "bfloat16") return KvCacheDtype::kBf16;
  if (s == "fp8" || s == "fp8_e4m3") return KvCacheDtype::kFp8;
  if (s == "int8") return KvCacheDtype::kInt8;
  if (s == "int4") return KvCacheDtype::kInt4;
  return absl::InvalidArgumentError(absl::StrCat(
      "--kv-cache-dtype: '", s, "' is not one of auto, bf16, fp8, int8, int4"));
}

kernels::KvQuant KvQuantOf(KvCacheDtype d) {
  switch (d) {
    case KvCacheDtype::kFp8: return kernels::KvQuant::kFp8E4m3;
    case KvCacheDtype::kInt8: return kernels::KvQuant::kInt8;
    case KvCacheDtype::kInt4: return kernels::KvQuant::kInt4;
    default: return kernels::KvQuant::kNone;
  }
}

int64_t KvCacheSpec::SideBytesPerToken(int64_t width) const {
  const kernels::KvQuant q = quant();
  if (q == kernels::KvQuant::kNone) return width * static_cast<int64_t>(DTypeSize(dtype));
  if (num_kv_heads <= 0) return 0;  // Validate() reports it
  return kernels::KvqTokenBytes(q, num_kv_heads, width / num_kv_heads);
}

int64_t KvCacheSpec::BytesPerToken() const {
  int64_t bytes = 0;
  for (size_t l = 0; l < k_width.size(); ++l) {
    bytes += SideBytesPerToken(k_width[l]) + SideBytesPerToken(v_width[l]);
  }
  return bytes;
}

std::string KvCacheSpec::StorageName() const {
  switch (quant()) {
    case kernels::KvQuant::kFp8E4m3: return "fp8_e4m3";
    case kernels::KvQuant::kInt8: return "int8";
    case kernels::KvQuant::kInt4: return "int4";
    case kernels::KvQuant::kNone: break;
  }
  return DTypeName(dtype);
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
    if (quant() != kernels::KvQuant::kNone &&
        (num_kv_heads <= 0 || k_width[l] % num_kv_heads != 0 || v_width[l] % num_kv_heads != 0)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "kv cache: --kv-cache-dtype ", KvCacheDtypeName(kv_cache_dtype), " needs the KV heads (",
          num_kv_heads, ") to divide layer ", l, "'s widths ", k_width[l], "/", v_width[l]));
    }
  }
  return absl::OkStatus();
}

namespace {

std::string Ranks(const std::vector<int64_t>& r) {
  if (r.empty()) return "?";
  bool uniform = true, non_increasing = true;
  for (size_t i = 0; i < r.size(); ++i) {
    uniform = uniform && r[i] == r.front();
    non_increasing = non_increasing && (i == 0 || r[i] <= r[i - 1]);
  }
  if (uniform) return absl::StrCat(r.front());
  if (non_increasing) return absl::StrCat(r.front(), "..", r.back());
  const auto [lo, hi] = std::minmax_element(r.begin(), r.end());
  return absl::StrCat(*lo, "-", *hi);  // any order (a searched schedule): the range
}

}  // namespace

std::string KvCacheSpec::CompressionName() const {
  bool latent = false;
  for (KvRope r : rope) latent = latent || r != KvRope::kBeforeCache;
  const bool lowp = kv_cache_dtype != KvCacheDtype::kAuto;
  if (!latent) return lowp ? KvCacheDtypeName(kv_cache_dtype) : "none";
  int64_t elems = 0;
  for (size_t l = 0; l < k_width.size(); ++l) elems += k_width[l] + v_width[l];
  std::string pct = "?";
  if (full_width > 0) {
    char buf[32];
    std::snprintf(buf, sizeof(buf), "%.1f",
                  100.0 * static_cast<double>(elems) /
                      static_cast<double>(2 * full_width * static_cast<int64_t>(k_width.size())));
    pct = buf;
    if (absl::EndsWith(pct, ".0")) pct.resize(pct.size() - 2);
  }
  return absl::StrCat("lorc:", latent_method.empty() ? "latent" : latent_method, " k=", Ranks(k_rank),
                      " v=", Ranks(v_rank), ", ", pct, "% KV",
                      lowp ? absl::StrCat(", ", KvCacheDtypeName(kv_cache_dtype)) : "");
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
  spec.kv_cache_dtype = options.kv_cache_dtype;
  spec.dtype = options.kv_cache_dtype == KvCacheDtype::kAuto   ? options.dtype
               : options.kv_cache_dtype == KvCacheDtype::kBf16 ? DType::kBF16
                                                                : DType::kU8;
  spec.num_kv_heads = heads;
  spec.full_width = heads * config.head_dim;
  if (!config.lorc) {
    spec.k_width.assign(config.num_layers, heads * config.head_dim);
    spec.v_width.assign(config.num_layers, heads * config.head_dim);
    spec.rope.assign(config.num_layers, KvRope::kBeforeCache);
    return spec;
  }
  // LoRC: unrotated latents, r_k / r_v per KV head (compress/FORMAT.md).
  const LorcConfig& lorc = *config.lorc;
  if (static_cast<int64_t>(lorc.layers.size()) != config.num_layers) {
    return absl::InvalidArgumentError(absl::StrCat("kv cache: lorc.json has ", lorc.layers.size(),
                                                   " layers, the model ", config.num_layers));
  }
  spec.latent_method = lorc.method;
  for (const LorcLayerRanks& r : lorc.layers) {
    spec.k_width.push_back(heads * r.k_rank);
    spec.v_width.push_back(heads * r.v_rank);
    spec.rope.push_back(KvRope::kAtAttention);
    spec.k_rank.push_back(r.k_rank);
    spec.v_rank.push_back(r.v_rank);
  }
  return spec;
}

}  // namespace lorc
