#include "model/safetensors_writer.h"

#include <openssl/evp.h>

#include <array>
#include <cstring>
#include <fstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "nlohmann/json.hpp"

namespace lorc {

absl::Status SafetensorsWriter::Add(const std::string& name, Entry e) {
  uint64_t numel = 1;
  for (int64_t d : e.shape) numel *= static_cast<uint64_t>(d);
  if (numel * DTypeSize(e.dtype) != e.nbytes) {
    return absl::InvalidArgumentError(absl::StrCat("tensor '", name, "' has ", e.nbytes,
                                                   " bytes, its shape and dtype need ",
                                                   numel * DTypeSize(e.dtype)));
  }
  if (!entries_.emplace(name, std::move(e)).second) {
    return absl::InvalidArgumentError(absl::StrCat("tensor '", name, "' given twice"));
  }
  return absl::OkStatus();
}

absl::Status SafetensorsWriter::AddView(const std::string& name, DType dtype, std::vector<int64_t> shape,
                                        const uint8_t* data, size_t nbytes) {
  return Add(name, Entry{dtype, std::move(shape), data, nbytes, {}});
}

absl::Status SafetensorsWriter::AddBytes(const std::string& name, DType dtype, std::vector<int64_t> shape,
                                         std::vector<uint8_t> bytes) {
  const size_t n = bytes.size();
  return Add(name, Entry{dtype, std::move(shape), nullptr, n, std::move(bytes)});
}

absl::Status SafetensorsWriter::Write(const std::string& path) const {
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata_.empty()) header["__metadata__"] = metadata_;
  uint64_t offset = 0;
  for (const auto& [name, e] : entries_) {
    header[name] = {{"dtype", DTypeName(e.dtype)},
                    {"shape", e.shape},
                    {"data_offsets", {offset, offset + e.nbytes}}};
    offset += e.nbytes;
  }
  std::string h = header.dump();
  h.resize((h.size() + 7) / 8 * 8, ' ');  // 8-byte aligned data, as the reference writer does
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  std::array<char, 8> len{};
  for (int i = 0; i < 8; ++i) len[i] = static_cast<char>(static_cast<uint64_t>(h.size()) >> (8 * i));
  out.write(len.data(), 8);
  out.write(h.data(), static_cast<std::streamsize>(h.size()));
  for (const auto& [name, e] : entries_) {
    const uint8_t* p = e.view != nullptr ? e.view : e.owned.data();
    out.write(reinterpret_cast<const char*>(p), static_cast<std::streamsize>(e.nbytes));
  }
  out.close();
  if (!out) return absl::InternalError(absl::StrCat("cannot write ", path));
  return absl::OkStatus();
}

absl::Status EncodeF32(absl::Span<const float> v, DType dtype, std::vector<uint8_t>* out) {
  if (dtype != DType::kF32 && dtype != DType::kBF16 && dtype != DType::kF16) {
    return absl::InvalidArgumentError(absl::StrCat("EncodeF32: dtype ", DTypeName(dtype),
                                                   " not supported (F32, BF16, F16)"));
  }
  out->resize(v.size() * DTypeSize(dtype));
  for (size_t i = 0; i < v.size(); ++i) {
    if (dtype == DType::kF32) {
      std::memcpy(out->data() + 4 * i, &v[i], 4);
    } else {
      const uint16_t b = dtype == DType::kBF16 ? F32ToBf16(v[i]) : F32ToF16(v[i]);
      std::memcpy(out->data() + 2 * i, &b, 2);
    }
  }
  return absl::OkStatus();
}

absl::Status WriteSafetensors(const std::string& path, absl::Span<const TensorToWrite> tensors,
                              const std::map<std::string, std::string>& metadata) {
  SafetensorsWriter w(metadata);
  for (const TensorToWrite& t : tensors) {
    absl::Status s = w.AddView(t.name, t.dtype, t.shape, t.bytes.data(), t.bytes.size());
    if (!s.ok()) return absl::InvalidArgumentError(absl::StrCat(path, ": ", s.message()));
  }
  return w.Write(path);
}

std::string Sha256Hex(const std::string& data) {
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int n = 0;
  EVP_Digest(data.data(), data.size(), md, &n, EVP_sha256(), nullptr);
  std::string out;
  for (unsigned int i = 0; i < n; ++i) out += absl::StrFormat("%02x", md[i]);
  return out;
}

}  // namespace lorc
