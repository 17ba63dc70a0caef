#include "compress/safetensors_writer.h"

#include <array>
#include <cstdio>
#include <cstring>
#include <memory>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "nlohmann/json.hpp"

namespace lorc::compress {

absl::Status SafetensorsWriter::AddView(const std::string& name, DType dtype,
                                        std::vector<int64_t> shape, const uint8_t* data,
                                        size_t nbytes) {
  int64_t numel = 1;
  for (int64_t s : shape) numel *= s;
  if (static_cast<size_t>(numel) * DTypeSize(dtype) != nbytes) {
    return absl::InvalidArgumentError(absl::StrCat("tensor ", name, ": ", nbytes,
                                                   " bytes for ", numel, " elements"));
  }
  Entry e{dtype, std::move(shape), data, nbytes, {}};
  if (!entries_.emplace(name, std::move(e)).second) {
    return absl::InvalidArgumentError(absl::StrCat("tensor ", name, " added twice"));
  }
  return absl::OkStatus();
}

absl::Status SafetensorsWriter::AddMatrix(const std::string& name, DType dtype, const MatD& m) {
  const size_t n = m.v.size(), es = DTypeSize(dtype);
  std::vector<uint8_t> bytes(n * es);
  for (size_t i = 0; i < n; ++i) {
    const float f = static_cast<float>(m.v[i]);
    if (dtype == DType::kF32) {
      std::memcpy(&bytes[i * 4], &f, 4);
    } else if (dtype == DType::kBF16) {
      const uint16_t h = F32ToBf16(f);
      std::memcpy(&bytes[i * 2], &h, 2);
    } else if (dtype == DType::kF16) {
      const uint16_t h = F32ToF16(f);
      std::memcpy(&bytes[i * 2], &h, 2);
    } else {
      return absl::InvalidArgumentError(absl::StrCat("tensor ", name, ": cannot write dtype ",
                                                     DTypeName(dtype)));
    }
  }
  Entry e{dtype, {m.rows, m.cols}, nullptr, bytes.size(), std::move(bytes)};
  if (!entries_.emplace(name, std::move(e)).second) {
    return absl::InvalidArgumentError(absl::StrCat("tensor ", name, " added twice"));
  }
  return absl::OkStatus();
}

absl::Status SafetensorsWriter::Write(const std::string& path) const {
  nlohmann::ordered_json header;
  header["__metadata__"] = {{"format", "pt"}};
  size_t offset = 0;
  for (const auto& [name, e] : entries_) {
    header[name] = {{"dtype", DTypeName(e.dtype)},
                    {"shape", e.shape},
                    {"data_offsets", {offset, offset + e.nbytes}}};
    offset += e.nbytes;
  }
  std::string h = header.dump();
  while (h.size() % 8 != 0) h.push_back(' ');
  std::unique_ptr<FILE, int (*)(FILE*)> f(std::fopen(path.c_str(), "wb"), &std::fclose);
  if (!f) return absl::InternalError(absl::StrCat("cannot create ", path));
  std::array<uint8_t, 8> len{};
  uint64_t n = h.size();
  for (int i = 0; i < 8; ++i) len[i] = static_cast<uint8_t>(n >> (8 * i));
  bool ok = std::fwrite(len.data(), 1, 8, f.get()) == 8 &&
            std::fwrite(h.data(), 1, h.size(), f.get()) == h.size();
  for (const auto& [name, e] : entries_) {
    const uint8_t* p = e.view != nullptr ? e.view : e.owned.data();
    ok = ok && std::fwrite(p, 1, e.nbytes, f.get()) == e.nbytes;
  }
  if (!ok || std::fflush(f.get()) != 0) return absl::InternalError(absl::StrCat("writing ", path));
  return absl::OkStatus();
}

// FIPS 180-4.
std::string Sha256Hex(const std::string& data) {
  static constexpr uint32_t k[64] = {
      0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
      0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
      0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
      0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
      0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
      0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
      0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
      0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
      0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
      0xc67178f2};
  uint32_t hs[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                    0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
  std::string msg = data;
  const uint64_t bits = static_cast<uint64_t>(data.size()) * 8;
  msg.push_back(static_cast<char>(0x80));
  while (msg.size() % 64 != 56) msg.push_back('\0');
  for (int i = 7; i >= 0; --i) msg.push_back(static_cast<char>(bits >> (8 * i)));
  const auto rotr = [](uint32_t x, int n) { return (x >> n) | (x << (32 - n)); };
  for (size_t off = 0; off < msg.size(); off += 64) {
    uint32_t w[64];
    for (int i = 0; i < 16; ++i) {
      const auto* p = reinterpret_cast<const unsigned char*>(&msg[off + 4 * i]);
      w[i] = (uint32_t{p[0]} << 24) | (uint32_t{p[1]} << 16) | (uint32_t{p[2]} << 8) | p[3];
    }
    for (int i = 16; i < 64; ++i) {
      const uint32_t s0 = rotr(w[i - 15], 7) ^ rotr(w[i - 15], 18) ^ (w[i - 15] >> 3);
      const uint32_t s1 = rotr(w[i - 2], 17) ^ rotr(w[i - 2], 19) ^ (w[i - 2] >> 10);
      w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    uint32_t a = hs[0], b = hs[1], c = hs[2], d = hs[3], e = hs[4], f = hs[5], g = hs[6],
             h = hs[7];
    for (int i = 0; i < 64; ++i) {
      const uint32_t t1 = h + (rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)) + ((e & f) ^ (~e & g)) +
                          k[i] + w[i];
      const uint32_t t2 = (rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
      h = g; g = f; f = e; e = d + t1; d = c; c = b; b = a; a = t1 + t2;
    }
    hs[0] += a; hs[1] += b; hs[2] += c; hs[3] += d; hs[4] += e; hs[5] += f; hs[6] += g; hs[7] += h;
  }
  std::string out;
  for (uint32_t v : hs) out += absl::StrFormat("%08x", v);
  return out;
}

}  // namespace lorc::compress
