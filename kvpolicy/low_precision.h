// MiKV's low-precision retention (arXiv 2402.18096): one KV head vector of one token quantized
// per token, asymmetric round-to-nearest, `bits` = 4 or 2: zero = min (rounded down to fp16),
// scale = (max - zero) / (2^bits - 1) (rounded up to fp16, so the codes span [min, max]),
// code = round((x - zero) / scale). Codes packed little-end first: int4 two per byte, int2 four.
// Error bound (tests/kvpolicy): |x - dequantized| <= scale / 2 (+ fp32 rounding, < 1e-6 |x|max).
// The same format is what a CUDA kernel will read (codes then the fp16 pair, per entry).
#pragma once

#include <cstdint>

namespace lorc::kvpolicy {

struct LowParams {
  uint16_t scale = 0;  // fp16
  uint16_t zero = 0;   // fp16
};

// Code bytes of a `width`-value vector: ceil(width * bits / 8).
int64_t LowCodeBytes(int64_t width, int bits);
// Code bytes plus the fp16 scale and zero.
int64_t LowEntryBytes(int64_t width, int bits);
// x[width] (finite) -> codes[LowCodeBytes] and *p.
void QuantizeLow(const float* x, int64_t width, int bits, uint8_t* codes, LowParams* p);
// codes -> out[width] = zero + code * scale (fp32).
void DequantizeLow(const uint8_t* codes, const LowParams& p, int64_t width, int bits, float* out);

}  // namespace lorc::kvpolicy
