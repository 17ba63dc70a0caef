// Element types the forward-pass launchers take, shared by their host headers. Framework-free and
// host-only (no device code), so backend/ can include it from plain C++.
#pragma once

#include <cstddef>
#include <cstdint>

namespace lorc::kernels {

// The dtype of the activation, weight and cache tensors one launch reads and writes (all of one
// launch share it). Arithmetic is fp32 either way; BF16 rounds once per stored value (RNE).
enum class ElemType : uint8_t { kF32, kBF16 };

inline size_t ElemSize(ElemType t) { return t == ElemType::kF32 ? 4 : 2; }

// True when `p` may be read with 16-byte vector loads.
inline bool Aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

}  // namespace lorc::kernels
