#include "kvpolicy/low_precision.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "kernels/kv_quant.h"

namespace lorc::kvpolicy {

int64_t LowCodeBytes(int64_t width, int bits) { return (width * bits + 7) / 8; }
int64_t LowEntryBytes(int64_t width, int bits) {
  return LowCodeBytes(width, bits) + static_cast<int64_t>(sizeof(LowParams));
}

void QuantizeLow(const float* x, int64_t width, int bits, uint8_t* codes, LowParams* p) {
  float mn = x[0], mx = x[0];
  for (int64_t i = 1; i < width; ++i) {
    mn = std::min(mn, x[i]);
    mx = std::max(mx, x[i]);
  }
  const int levels = (1 << bits) - 1;
  p->zero = kernels::KvqF16RoundDown(mn);
  const float zero = kernels::KvqF16ToF32(p->zero);
  p->scale = kernels::KvqF16RoundUp((mx - zero) / static_cast<float>(levels));
  const float scale = kernels::KvqF16ToF32(p->scale);
  const float inv = scale > 0.f ? 1.0f / scale : 0.f;
  std::memset(codes, 0, static_cast<size_t>(LowCodeBytes(width, bits)));
  const int per_byte = 8 / bits;
  for (int64_t i = 0; i < width; ++i) {
    const int c = std::clamp(static_cast<int>(std::nearbyint((x[i] - zero) * inv)), 0, levels);
    codes[i / per_byte] |= static_cast<uint8_t>(c << ((i % per_byte) * bits));
  }
}

void DequantizeLow(const uint8_t* codes, const LowParams& p, int64_t width, int bits, float* out) {
  const float zero = kernels::KvqF16ToF32(p.zero), scale = kernels::KvqF16ToF32(p.scale);
  const int per_byte = 8 / bits, mask = (1 << bits) - 1;
  for (int64_t i = 0; i < width; ++i) {
    const int c = (codes[i / per_byte] >> ((i % per_byte) * bits)) & mask;
    out[i] = zero + static_cast<float>(c) * scale;
  }
}

void EncodeLowEntry(const float* x, int64_t width, int bits, const float* balance, float* scratch,
                    uint8_t* entry) {
  if (balance != nullptr) {
    for (int64_t c = 0; c < width; ++c) scratch[c] = x[c] * balance[c];
    x = scratch;
  }
  LowParams p;
  QuantizeLow(x, width, bits, entry, &p);
  std::memcpy(entry + LowCodeBytes(width, bits), &p, sizeof(p));
}

void DecodeLowEntry(const uint8_t* entry, int64_t width, int bits, const float* balance, float* out) {
  LowParams p;
  std::memcpy(&p, entry + LowCodeBytes(width, bits), sizeof(p));
  DequantizeLow(entry, p, width, bits, out);
  if (balance != nullptr) {
    for (int64_t c = 0; c < width; ++c) out[c] /= balance[c];
  }
}

}  // namespace lorc::kvpolicy
