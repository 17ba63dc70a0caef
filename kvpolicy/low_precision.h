// MiKV's low-precision retention (arXiv 2402.18096): one KV head vector of one token quantized
// per token, asymmetric round-to-nearest, `bits` = 4 or 2: zero = min (rounded down to fp16),
// scale = (max - zero) / (2^bits - 1) (rounded up to fp16, so the codes span [min, max]),
// code = round((x - zero) / scale). Codes packed little-end first: int4 two per byte, int2 four.
// Error bound (tests/kvpolicy): |x - dequantized| <= scale / 2 (+ fp32 rounding, < 1e-6 |x|max).
// The same format is what the CUDA kernels read and write (codes then the fp16 pair, per entry;
// kernels/kv_policy.cu ReadLowEntry / StageLowEntries).
//
// Entries live in the paged cache (kvpolicy/README.md "Low entries in the paged cache"): a
// (layer, KV head)'s entries, once a compaction packed them, are one byte run through consecutive
// slots of the sequence, each slot lending that head's region of its K (keys' entries) or V
// (values') row: `slot_bytes` = the head's elements in the cache's dtype, or a quantized cache's
// codes (backend.h KvHeadSlotBytes). Entry e occupies bytes [e * entry_bytes, (e + 1) *
// entry_bytes) of the run; run byte b is byte b % slot_bytes of run slot b / slot_bytes.
#pragma once

#include <algorithm>
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

// One entry: x[width] (keys: times the MiKV balance b[width] when `balance` is non-null; `scratch`
// [width] holds the product) -> entry[LowEntryBytes] (codes then LowParams), and back (keys:
// divided by b).
void EncodeLowEntry(const float* x, int64_t width, int bits, const float* balance, float* scratch,
                    uint8_t* entry);
void DecodeLowEntry(const uint8_t* entry, int64_t width, int bits, const float* balance, float* out);

// Slots of a run of `entries` entries of `entry_bytes` (header): ceil(entries * entry_bytes /
// slot_bytes).
inline int64_t LowRunSlots(int64_t entries, int64_t entry_bytes, int64_t slot_bytes) {
  return (entries * entry_bytes + slot_bytes - 1) / slot_bytes;
}

// Where entry e's bytes are: fn(run_slot, offset in that slot's region, bytes, offset in the
// entry) for each piece, in order (an entry straddles at most ceil(entry_bytes / slot_bytes) + 1
// slots).
template <typename Fn>
void ForEachLowPiece(int64_t e, int64_t entry_bytes, int64_t slot_bytes, Fn&& fn) {
  int64_t b = e * entry_bytes;
  for (int64_t done = 0; done < entry_bytes;) {
    const int64_t off = b % slot_bytes;
    const int64_t n = std::min(entry_bytes - done, slot_bytes - off);
    fn(b / slot_bytes, off, n, done);
    done += n;
    b += n;
  }
}

}  // namespace lorc::kvpolicy
