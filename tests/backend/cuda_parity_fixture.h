// The CPU reference and the CUDA backend side by side, for the GPU parity tests
// (cuda_kernels_test, cuda_attention_test, cuda_sampling_test). SetUp skips the test when there
// is no CUDA device: the only reason a GPU test may skip.
#pragma once

#include <algorithm>
#include <cstdlib>
#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "backend/backend.h"
#include "backend/cuda_backend.h"
#include "common/check.h"
#include "common/dtype.h"
#include "gtest/gtest.h"
#include "kernels/kv_quant.h"
#include "tests/testing/status_matchers.h"

namespace lorc {

// Host <-> backend values for the parity tests: F32 values stored as `d` (F32, BF16 or F16;
// rounded to nearest even) and read back as F32. CHECK-fails on a backend error (tests only).
namespace parity {

// x rounded to bf16 (nearest even) and back: the inputs the CPU reference runs in F32.
inline float RoundBf16(float x) { return Bf16ToF32(F32ToBf16(x)); }

inline DeviceBuffer Put(Backend& be, const std::vector<float>& v, DType d) {
  const size_t n = v.size(), esz = DTypeSize(d);
  auto buf = be.Allocate(std::max<size_t>(1, n) * esz);
  CHECK(buf.ok()) << buf.status();
  if (d == DType::kBF16 || d == DType::kF16) {
    std::vector<uint16_t> h(n);
    for (size_t i = 0; i < n; ++i) h[i] = d == DType::kBF16 ? F32ToBf16(v[i]) : F32ToF16(v[i]);
    CHECK_OK(be.CopyToDevice(buf->data(), h.data(), n * esz));
  } else {
    CHECK_OK(be.CopyToDevice(buf->data(), v.data(), n * esz));
  }
  CHECK_OK(be.Synchronize());
  return std::move(*buf);
}

template <typename T>
DeviceBuffer PutRaw(Backend& be, const std::vector<T>& v) {
  auto buf = be.Allocate(std::max<size_t>(1, v.size()) * sizeof(T));
  CHECK(buf.ok()) << buf.status();
  CHECK_OK(be.CopyToDevice(buf->data(), v.data(), v.size() * sizeof(T)));
  CHECK_OK(be.Synchronize());
  return std::move(*buf);
}

inline std::vector<float> Get(Backend& be, const DeviceBuffer& b, DType d) {
  const size_t n = b.bytes() / DTypeSize(d);
  std::vector<float> out(n);
  if (d == DType::kBF16 || d == DType::kF16) {
    std::vector<uint16_t> h(n);
    CHECK_OK(be.CopyToHost(h.data(), b.data(), n * 2));
    CHECK_OK(be.Synchronize());
    for (size_t i = 0; i < n; ++i) out[i] = d == DType::kBF16 ? Bf16ToF32(h[i]) : F16ToF32(h[i]);
  } else {
    CHECK_OK(be.CopyToHost(out.data(), b.data(), n * 4));
    CHECK_OK(be.Synchronize());
  }
  return out;
}

// --- quantized KV caches (--kv-cache-dtype fp8 / int8 / int4, kernels/kv_quant.h) ---

// One quantized layer on a backend: K and V of num_blocks zero-filled blocks and its KvLayer.
struct QuantCache {
  DeviceBuffer k, v;
  KvLayer layer;
};

inline QuantCache MakeQuantCache(Backend& be, kernels::KvQuant q, int num_blocks, int block_size, int kv_heads,
                                 int64_t k_width, int64_t v_width) {
  QuantCache c;
  const int64_t kb = kernels::KvqBlockBytes(q, block_size, kv_heads, k_width / kv_heads);
  const int64_t vb = kernels::KvqBlockBytes(q, block_size, kv_heads, v_width / kv_heads);
  auto k = be.Allocate(num_blocks * kb), v = be.Allocate(num_blocks * vb);
  CHECK(k.ok() && v.ok());
  c.k = std::move(*k);
  c.v = std::move(*v);
  CHECK_OK(be.Memset(c.k.data(), 0, c.k.bytes()));
  CHECK_OK(be.Memset(c.v.data(), 0, c.v.bytes()));
  c.layer = KvLayer{c.k.data(), c.v.data(), k_width, v_width, DType::kU8, q, kv_heads, block_size};
  return c;
}

inline std::vector<uint8_t> GetBytes(Backend& be, const DeviceBuffer& b) {
  std::vector<uint8_t> out(b.bytes());
  CHECK_OK(be.CopyToHost(out.data(), b.data(), out.size()));
  CHECK_OK(be.Synchronize());
  return out;
}

// Writes k [slots, k_width] and v [slots, v_width] (stored as `d`) into slots 0 .. slots-1 with
// WriteKv: the way the parity tests fill a whole quantized cache on each backend.
inline void WriteAllSlots(Backend& be, DType d, const KvLayer& c, const std::vector<float>& k,
                          const std::vector<float>& v, int64_t slots) {
  std::vector<int32_t> mapping(slots);
  for (int64_t i = 0; i < slots; ++i) mapping[i] = static_cast<int32_t>(i);
  DeviceBuffer dk = Put(be, k, d), dv = Put(be, v, d), dm = PutRaw(be, mapping);
  CHECK_OK(be.WriteKv(c, Tensor2D{dk.data(), d, slots, c.k_width, 0}, Tensor2D{dv.data(), d, slots, c.v_width, 0},
                      dm.as<int32_t>()));
  CHECK_OK(be.Synchronize());
}

// How two quantized sides (the bytes of num_blocks blocks of one side) differ: scales that are
// not bit-equal (and the largest distance of their fp16 bit patterns), and within heads whose
// scales agree the codes that differ and the largest code distance (int4: per nibble, fp8: of
// the code bytes, which are ordered by magnitude within a sign).
struct QuantDiff {
  int64_t codes = 0, code_mismatch = 0, max_code_dist = 0;
  int64_t scales = 0, scale_mismatch = 0, max_scale_dist = 0;
};

inline QuantDiff CompareQuantSide(kernels::KvQuant q, const std::vector<uint8_t>& got,
                                  const std::vector<uint8_t>& want, int num_blocks, int block_size, int heads,
                                  int64_t head_width) {
  QuantDiff d;
  CHECK_EQ(got.size(), want.size());
  const int64_t groups = kernels::KvqGroupsPerHead(q, head_width), spg = kernels::KvqScalesPerGroup(q);
  auto* g = const_cast<uint8_t*>(got.data());
  auto* w = const_cast<uint8_t*>(want.data());
  for (int64_t slot = 0; slot < int64_t{num_blocks} * block_size; ++slot) {
    const uint8_t* gc = kernels::KvqTokenCodes(g, q, block_size, heads, head_width, slot);
    const uint8_t* wc = kernels::KvqTokenCodes(w, q, block_size, heads, head_width, slot);
    const uint16_t* gs = kernels::KvqTokenScales(g, q, block_size, heads, head_width, slot);
    const uint16_t* ws = kernels::KvqTokenScales(w, q, block_size, heads, head_width, slot);
    for (int h = 0; h < heads; ++h) {
      bool same = true;
      for (int64_t i = h * groups * spg; i < (h + 1) * groups * spg; ++i) {
        ++d.scales;
        const int64_t dist = std::abs(int64_t{gs[i]} - int64_t{ws[i]});
        if (dist != 0) {
          same = false;
          ++d.scale_mismatch;
          d.max_scale_dist = std::max(d.max_scale_dist, dist);
        }
      }
      if (!same) continue;
      const int64_t hc = kernels::KvqHeadCodeBytes(q, head_width);
      for (int64_t i = 0; i < head_width; ++i) {
        int64_t a, b;
        if (q == kernels::KvQuant::kInt4) {
          a = (gc[h * hc + i / 2] >> ((i & 1) * 4)) & 0xf;
          b = (wc[h * hc + i / 2] >> ((i & 1) * 4)) & 0xf;
        } else if (q == kernels::KvQuant::kInt8) {
          a = static_cast<int8_t>(gc[h * hc + i]);
          b = static_cast<int8_t>(wc[h * hc + i]);
        } else {
          a = gc[h * hc + i];
          b = wc[h * hc + i];
        }
        ++d.codes;
        if (a != b) {
          ++d.code_mismatch;
          d.max_code_dist = std::max(d.max_code_dist, std::abs(a - b));
        }
      }
    }
  }
  return d;
}

}  // namespace parity

template <typename Base = ::testing::Test>
class CpuCudaPair : public Base {
 protected:
  void SetUp() override {
    auto devices = ListCudaDevices();
    if (!devices.ok() || devices->empty()) GTEST_SKIP() << "no CUDA device: " << devices.status();
    auto cpu = CreateBackend(BackendOptions{BackendKind::kCpu});
    ASSERT_OK(cpu);
    cpu_ = std::move(*cpu);
    auto cuda = CreatePartialCudaBackend(BackendOptions{BackendKind::kCuda});
    ASSERT_OK(cuda);
    cuda_ = std::move(*cuda);
  }

  std::unique_ptr<Backend> cpu_;   // the reference
  std::unique_ptr<Backend> cuda_;  // under test
};

}  // namespace lorc
