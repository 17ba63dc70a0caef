// Element types of tensors on disk and on devices, and scalar conversions between them.
#pragma once

#include <cstdint>
#include <cstring>
#include "absl/strings/string_view.h"

#include "absl/status/statusor.h"

namespace lorc {

enum class DType : uint8_t { kF32, kF16, kBF16, kI32, kI64, kU8 };

// Bytes per element.
size_t DTypeSize(DType t);
// "F32", "F16", "BF16", ... (safetensors spelling).
const char* DTypeName(DType t);
// Parses the safetensors dtype spelling; InvalidArgument for anything else.
absl::StatusOr<DType> ParseSafetensorsDType(absl::string_view s);

inline float Bf16ToF32(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// Round-to-nearest-even, NaN kept NaN.
inline uint16_t F32ToBf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

float F16ToF32(uint16_t h);
uint16_t F32ToF16(float f);

// Converts `n` elements of type `src_type` at `src` to fp32. Only float types are accepted.
absl::Status ConvertToF32(DType src_type, const void* src, size_t n, float* dst);

}  // namespace lorc
