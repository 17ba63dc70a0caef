// The measured ceilings of the GPUs lorcserve's benchmarks are run on: what a decode step's bytes
// and a prefill's FLOPs are divided by to give the "floor" the bench tables report against
// (`lorcserve bench`, gemm_bench). One table, in one place; a device not in it gets no floor unless
// the bench is told the ceilings (--hbm-tbps, --gemm-peak-tflops). A new device's row comes from
// `gemm_bench ceilings` run on it (bench/README.md).
#pragma once

#include <optional>
#include <string_view>

namespace lorc {

struct DeviceCeilings {
  const char* name;         // matched as a substring of the backend's Describe() (the CUDA device name)
  double copy_tbps;         // device-to-device copy, bytes read + written per second / 1e12
  double gemm_peak_tflops;  // BF16 GEMM (cuBLASLt, fp32 accumulation), best of 8192^3 and 16384^3
  // Matmul reading a 1 GiB BF16 weight at M = 1 (the decode's access), bytes read per second /
  // 1e12; 0: not measured.
  double weight_read_tbps;
  const char* measured;     // where and when

  // The bandwidth of the decode floor: the faster of the copy and the weight read, since a floor a
  // kernel beats is none (an H100 reads weights 29 % faster than it copies: a copy also writes).
  // Where the weight read was not measured, the copy (issue #8's definition).
  double decode_tbps() const { return weight_read_tbps > copy_tbps ? weight_read_tbps : copy_tbps; }
};

// Longer names first: "H100" must not claim an "H100 PCIe" row added later.
inline constexpr DeviceCeilings kDeviceCeilings[] = {
    {"H200", 4.275, 696.0, 4.438,
     "H200 141 GB: copy from shared/device/README.md (2026-11-22; gemm_bench's copy measured 2.714 there on "
     "2026-12-06), GEMM gemm_bench (docs/PERFORMANCE.md), weight read gemm_bench ceilings 2026-12-06"},
    {"H100", 2.447, 729.6, 3.152,
     "H100 80GB HBM3: gemm_bench ceilings 2026-12-05 (docs/PERFORMANCE.md): copy and weight read of the "
     "second run, GEMM peak the better of two (729.6, 694.1)"},
};

// The row of the first entry whose name `device` contains, or nullopt.
inline std::optional<DeviceCeilings> CeilingsFor(std::string_view device) {
  for (const DeviceCeilings& c : kDeviceCeilings) {
    if (device.find(std::string_view(c.name)) != std::string_view::npos) return c;
  }
  return std::nullopt;
}

}  // namespace lorc
