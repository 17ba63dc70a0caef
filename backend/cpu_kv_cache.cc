// The CPU backend's KV cache storage (cpu_kernels.h): F32, BF16 or quantized (kernels/kv_quant.h)
// rows at flat slots, read back one KV head at a time as fp32. The reference every other
// backend's cache format is checked against.
#include <cstring>

#include "absl/strings/str_cat.h"
#include "backend/cpu_kernels.h"

namespace lorc::cpu_internal {
namespace {

using kernels::KvQuant;

int64_t Width(const KvLayer& c, bool v_side) { return v_side ? c.v_width : c.k_width; }
void* Base(const KvLayer& c, bool v_side) { return v_side ? c.v : c.k; }

}  // namespace

absl::Status CheckKvCache(const char* op, const KvLayer& c) {
  if (c.quant == KvQuant::kNone) {
    if (c.dtype == DType::kF32 || c.dtype == DType::kBF16) return absl::OkStatus();
    return absl::UnimplementedError(absl::StrCat("cpu backend: ", op, ": cache dtype ",
                                                 DTypeName(c.dtype), " not implemented"));
  }
  if (c.num_kv_heads <= 0 || c.block_size <= 0 || c.k_width % c.num_kv_heads != 0 ||
      c.v_width % c.num_kv_heads != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "cpu backend: ", op, ": quantized cache needs KV heads dividing its widths and a block size: ",
        c.num_kv_heads, " heads, widths ", c.k_width, "/", c.v_width, ", block_size ", c.block_size));
  }
  return absl::OkStatus();
}

void StoreKvRow(const KvLayer& c, bool v_side, int64_t slot, const float* row) {
  const int64_t w = Width(c, v_side);
  void* base = Base(c, v_side);
  if (c.quant == KvQuant::kNone) {
    if (c.dtype == DType::kF32) {
      std::memcpy(static_cast<float*>(base) + slot * w, row, sizeof(float) * w);
    } else {
      uint16_t* dst = static_cast<uint16_t*>(base) + slot * w;
      for (int64_t i = 0; i < w; ++i) dst[i] = F32ToBf16(row[i]);
    }
    return;
  }
  const int64_t hw = w / c.num_kv_heads;
  kernels::KvqQuantizeToken(c.quant, row, c.num_kv_heads, hw,
                            kernels::KvqTokenCodes(base, c.quant, c.block_size, c.num_kv_heads, hw, slot),
                            kernels::KvqTokenScales(base, c.quant, c.block_size, c.num_kv_heads, hw, slot));
}

void LoadKvHead(const KvLayer& c, bool v_side, int64_t slot, int64_t head, int64_t head_width,
                float* out) {
  const int64_t w = Width(c, v_side);
  void* base = Base(c, v_side);
  if (c.quant == KvQuant::kNone) {
    const int64_t at = slot * w + head * head_width;
    if (c.dtype == DType::kF32) {
      std::memcpy(out, static_cast<const float*>(base) + at, sizeof(float) * head_width);
    } else {
      const uint16_t* src = static_cast<const uint16_t*>(base) + at;
      for (int64_t i = 0; i < head_width; ++i) out[i] = Bf16ToF32(src[i]);
    }
    return;
  }
  kernels::KvqDequantizeHead(
      c.quant, kernels::KvqTokenCodes(base, c.quant, c.block_size, c.num_kv_heads, head_width, slot),
      kernels::KvqTokenScales(base, c.quant, c.block_size, c.num_kv_heads, head_width, slot),
      head_width, head, out);
}

uint8_t* KvHeadSlot(const KvLayer& c, bool v_side, int64_t slot, int64_t head) {
  const int64_t w = Width(c, v_side);
  const int64_t hw = w / c.num_kv_heads;
  void* base = Base(c, v_side);
  if (c.quant == KvQuant::kNone) {
    return static_cast<uint8_t*>(base) + (slot * w + head * hw) * static_cast<int64_t>(DTypeSize(c.dtype));
  }
  return kernels::KvqTokenCodes(base, c.quant, c.block_size, c.num_kv_heads, hw, slot) +
         head * kernels::KvqHeadCodeBytes(c.quant, hw);
}

void MoveKvHead(const KvLayer& c, bool v_side, int64_t src, int64_t dst, int64_t head) {
  const int64_t w = Width(c, v_side);
  const int64_t hw = w / c.num_kv_heads;
  void* base = Base(c, v_side);
  if (c.quant == KvQuant::kNone) {
    const size_t elem = c.dtype == DType::kF32 ? sizeof(float) : sizeof(uint16_t);
    char* b = static_cast<char*>(base);
    std::memmove(b + (dst * w + head * hw) * elem, b + (src * w + head * hw) * elem, hw * elem);
    return;
  }
  const int64_t code_bytes = kernels::KvqHeadCodeBytes(c.quant, hw);
  const int64_t scales = kernels::KvqGroupsPerHead(c.quant, hw) * kernels::KvqScalesPerGroup(c.quant);
  std::memmove(kernels::KvqTokenCodes(base, c.quant, c.block_size, c.num_kv_heads, hw, dst) + head * code_bytes,
               kernels::KvqTokenCodes(base, c.quant, c.block_size, c.num_kv_heads, hw, src) + head * code_bytes,
               static_cast<size_t>(code_bytes));
  std::memmove(kernels::KvqTokenScales(base, c.quant, c.block_size, c.num_kv_heads, hw, dst) + head * scales,
               kernels::KvqTokenScales(base, c.quant, c.block_size, c.num_kv_heads, hw, src) + head * scales,
               static_cast<size_t>(scales) * sizeof(uint16_t));
}

}  // namespace lorc::cpu_internal
