#include "model/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <exception>
#include <filesystem>
#include <limits>
#include <set>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/string_view.h"
#include "common/json_util.h"
#include "common/status_macros.h"
#include "nlohmann/json.hpp"

namespace lorc {
namespace {

using json = nlohmann::json;

std::string ShapeString(absl::Span<const int64_t> shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

std::string JoinPath(const std::string& dir, const std::string& name) {
  return (std::filesystem::path(dir) / name).string();
}

// Exact fp16 -> fp32 (same results as F16ToF32, without ldexp per element).
inline float HalfToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t em = h & 0x7fffu;
  uint32_t bits;
  if (em >= 0x7c00u) {  // inf / NaN (NaN made quiet)
    bits = sign | 0x7f800000u | ((em & 0x3ffu) << 13) | ((em & 0x3ffu) ? 0x400000u : 0u);
  } else if (em >= 0x0400u) {  // normal
    bits = sign | ((em << 13) + ((127u - 15u) << 23));
  } else {  // zero / subnormal: em * 2^-24, exact in fp32
    const float f = static_cast<float>(em) * (1.0f / 16777216.0f);
    std::memcpy(&bits, &f, sizeof(bits));
    bits |= sign;
  }
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

// DTypeName as a std::string (whatever string type DTypeName returns; Debian's Abseil has its
// own absl::string_view, which absl::StrCat needs).
std::string Name(DType t) { return std::string(DTypeName(t)); }

bool IsFloatDType(DType t) { return t == DType::kF32 || t == DType::kF16 || t == DType::kBF16; }

// Converts `n` contiguous elements; `src` need not be aligned. With n == 0 either pointer may be
// null (an empty output span, a zero-size tensor): nothing is touched, memcpy included (its
// pointers must be non-null even for 0 bytes; UBSan, found by safetensors_fuzz).
void ConvertRun(DType t, const uint8_t* src, size_t n, float* dst) {
  if (n == 0) return;
  switch (t) {
    case DType::kF32:
      std::memcpy(dst, src, n * sizeof(float));
      return;
    case DType::kBF16:
      for (size_t i = 0; i < n; ++i) {
        uint16_t v;
        std::memcpy(&v, src + 2 * i, sizeof(v));
        dst[i] = Bf16ToF32(v);
      }
      return;
    case DType::kF16:
      for (size_t i = 0; i < n; ++i) {
        uint16_t v;
        std::memcpy(&v, src + 2 * i, sizeof(v));
        dst[i] = HalfToFloat(v);
      }
      return;
    default:
      return;  // callers check IsFloatDType first
  }
}

// Reads a non-negative JSON integer (signed or unsigned representation).
bool AsNonNegative(const json& v, uint64_t* out) {
  if (v.is_number_unsigned()) {
    *out = v.get<uint64_t>();
    return true;
  }
  if (v.is_number_integer()) {
    const int64_t x = v.get<int64_t>();
    if (x < 0) return false;
    *out = static_cast<uint64_t>(x);
    return true;
  }
  return false;
}

struct Span64 {
  uint64_t begin;
  uint64_t end;
  const std::string* name;
};

// Parses and validates the JSON header of the file at `path`. `data`/`data_size` describe the
// data section (after the header).
absl::Status ParseHeader(const std::string& path, std::string_view header, const uint8_t* data,
                         uint64_t data_size, std::map<std::string, TensorInfo>* tensors,
                         std::map<std::string, std::string>* metadata) {
  // std::string converts to whichever string_view type ParseJson takes.
  ASSIGN_OR_RETURN(json j, ParseJson(std::string(header), absl::StrCat(path, ": header")));
  if (!j.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": header must be a JSON object, got ", j.type_name()));
  }
  std::vector<Span64> spans;
  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& name = it.key();
    const json& v = it.value();
    if (name == "__metadata__") {
      if (v.is_null()) continue;
      if (!v.is_object()) {
        return absl::InvalidArgumentError(absl::StrCat(
            path, ": '__metadata__' must be an object of strings, got ", v.type_name()));
      }
      for (auto m = v.begin(); m != v.end(); ++m) {
        if (!m.value().is_string()) {
          return absl::InvalidArgumentError(
              absl::StrCat(path, ": '__metadata__' entry '", m.key(), "' must be a string, got ",
                           m.value().type_name()));
        }
        (*metadata)[m.key()] = m.value().get_ref<const std::string&>();
      }
      continue;
    }

    const std::string where = absl::StrCat(path, ": tensor '", name, "'");
    if (!v.is_object()) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": header entry must be an object, got ", v.type_name()));
    }
    TensorInfo info;
    info.name = name;
    info.file = path;

    // dtype
    auto dt = v.find("dtype");
    if (dt == v.end()) return absl::InvalidArgumentError(absl::StrCat(where, ": missing 'dtype'"));
    if (!dt->is_string()) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": 'dtype' must be a string, got ", dt->type_name()));
    }
    absl::StatusOr<DType> dtype = ParseSafetensorsDType(dt->get_ref<const std::string&>());
    if (!dtype.ok()) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": ", dtype.status().message()));
    }
    info.dtype = *dtype;

    // shape
    auto sh = v.find("shape");
    if (sh == v.end()) return absl::InvalidArgumentError(absl::StrCat(where, ": missing 'shape'"));
    if (!sh->is_array()) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": 'shape' must be an array, got ", sh->type_name()));
    }
    uint64_t numel = 1;
    bool overflow = false;
    for (const json& d : *sh) {
      if (d.is_number_integer() && !d.is_number_unsigned() && d.get<int64_t>() < 0) {
        return absl::InvalidArgumentError(absl::StrCat(where, ": negative dimension ",
                                                       d.get<int64_t>(), " in 'shape'"));
      }
      uint64_t dim;
      if (!AsNonNegative(d, &dim)) {
        return absl::InvalidArgumentError(absl::StrCat(
            where, ": 'shape' entries must be integers, got ", d.type_name()));
      }
      if (dim > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
        return absl::InvalidArgumentError(
            absl::StrCat(where, ": dimension ", dim, " in 'shape' is too large"));
      }
      info.shape.push_back(static_cast<int64_t>(dim));
      overflow = overflow || __builtin_mul_overflow(numel, dim, &numel);
    }
    uint64_t nbytes = 0;
    overflow = overflow || __builtin_mul_overflow(numel, DTypeSize(info.dtype), &nbytes);
    if (overflow) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": shape ", ShapeString(info.shape), " is too large"));
    }

    // data_offsets
    auto off = v.find("data_offsets");
    if (off == v.end()) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": missing 'data_offsets'"));
    }
    uint64_t begin = 0, end = 0;
    if (!off->is_array() || off->size() != 2 || !AsNonNegative((*off)[0], &begin) ||
        !AsNonNegative((*off)[1], &end)) {
      return absl::InvalidArgumentError(absl::StrCat(
          where, ": 'data_offsets' must be an array of two non-negative integers, got ",
          off->dump(-1, ' ', false, json::error_handler_t::replace)));
    }
    if (begin > end) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": data_offsets [", begin, ", ",
                                                     end, "] have begin > end"));
    }
    if (end - begin != nbytes) {
      return absl::InvalidArgumentError(absl::StrCat(
          where, ": shape ", ShapeString(info.shape), " with dtype ", Name(info.dtype),
          " needs ", nbytes, " bytes but data_offsets [", begin, ", ", end, "] span ",
          end - begin, " bytes"));
    }
    if (end > data_size) {
      return absl::DataLossError(absl::StrCat(where, ": data_offsets [", begin, ", ", end,
                                              "] extend past the end of the data section (",
                                              data_size, " bytes; file truncated?)"));
    }
    info.data = data + begin;
    info.nbytes = static_cast<size_t>(nbytes);
    auto [pos, inserted] = tensors->emplace(name, std::move(info));
    spans.push_back({begin, end, &pos->first});
  }

  // Overlaps: sort by begin, compare each non-empty range with the furthest end seen so far.
  std::sort(spans.begin(), spans.end(), [](const Span64& a, const Span64& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  const Span64* furthest = nullptr;
  for (const Span64& s : spans) {
    if (s.begin == s.end) continue;
    if (furthest != nullptr && s.begin < furthest->end) {
      return absl::InvalidArgumentError(absl::StrCat(
          path, ": tensors '", *furthest->name, "' (bytes [", furthest->begin, ", ",
          furthest->end, ")) and '", *s.name, "' (bytes [", s.begin, ", ", s.end,
          ")) overlap"));
    }
    if (furthest == nullptr || s.end > furthest->end) furthest = &s;
  }
  return absl::OkStatus();
}

absl::Status OpenError(const std::string& path, int err, absl::string_view what) {
  const std::string msg = absl::StrCat(path, ": ", what, ": ", std::strerror(err));
  if (err == ENOENT) return absl::NotFoundError(absl::StrCat(path, ": no such file"));
  if (err == EACCES || err == EPERM) return absl::PermissionDeniedError(msg);
  return absl::UnavailableError(msg);
}

}  // namespace

int64_t TensorInfo::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

SafetensorsFile::~SafetensorsFile() {
  if (map_ != nullptr) ::munmap(map_, map_size_);
}

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(const std::string& path) {
  // Named by its type before opening: a socket cannot be opened at all (ENXIO, "No such device
  // or address") and a FIFO would wait for a writer.
  struct stat before;
  if (::stat(path.c_str(), &before) == 0 && !S_ISREG(before.st_mode)) {
    return absl::InvalidArgumentError(absl::StrCat(
        path, S_ISDIR(before.st_mode) ? ": is a directory, not a file" : ": not a regular file (a device, FIFO or socket)"));
  }
  // O_NONBLOCK: should the path become a FIFO after that check, the open still returns (and the
  // fstat check below refuses it). Regular files ignore the flag.
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) return OpenError(path, errno, "cannot open");
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    return OpenError(path, err, "cannot stat");
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a regular file (a device, FIFO or socket)"));
  }
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  if (size == 0) {
    ::close(fd);
    return absl::DataLossError(
        absl::StrCat(path, ": empty file (a safetensors file starts with an 8-byte header "
                           "length)"));
  }
  if (size < 8) {
    ::close(fd);
    return absl::DataLossError(absl::StrCat(
        path, ": file is ", size, " bytes, shorter than the 8-byte header length"));
  }
  void* map = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  const int map_err = errno;
  ::close(fd);
  if (map == MAP_FAILED) return OpenError(path, map_err, "mmap failed");

  std::unique_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->path_ = path;
  file->map_ = map;  // unmapped by the destructor on every return path below
  file->map_size_ = size;

  const auto* base = static_cast<const uint8_t*>(map);
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | base[i];
  if (header_len > size - 8) {
    return absl::DataLossError(absl::StrCat(path, ": header length ", header_len,
                                            " exceeds the file size (", size,
                                            " bytes including the 8-byte length)"));
  }
  const std::string_view header(reinterpret_cast<const char*>(base + 8), header_len);
  const uint8_t* data = base + 8 + header_len;
  const uint64_t data_size = size - 8 - header_len;
  try {
    RETURN_IF_ERROR(
        ParseHeader(path, header, data, data_size, &file->tensors_, &file->metadata_));
  } catch (const std::exception& e) {  // defensive: the parser uses non-throwing accessors
    return absl::InvalidArgumentError(absl::StrCat(path, ": malformed header: ", e.what()));
  }
  return file;
}

absl::StatusOr<std::unique_ptr<CheckpointReader>> CheckpointReader::Open(
    const std::string& model_dir) {
  auto reader = std::unique_ptr<CheckpointReader>(new CheckpointReader());
  reader->dir_ = model_dir;
  const std::string index_path = JoinPath(model_dir, "model.safetensors.index.json");
  const std::string single_path = JoinPath(model_dir, "model.safetensors");
  std::error_code ec;

  if (std::filesystem::exists(index_path, ec)) {
    ASSIGN_OR_RETURN(json index, ReadJsonFile(index_path));
    if (!index.is_object()) {
      return absl::InvalidArgumentError(
          absl::StrCat(index_path, ": must be a JSON object, got ", index.type_name()));
    }
    auto wm = index.find("weight_map");
    if (wm == index.end()) {
      return absl::InvalidArgumentError(absl::StrCat(index_path, ": missing 'weight_map'"));
    }
    if (!wm->is_object()) {
      return absl::InvalidArgumentError(absl::StrCat(
          index_path, ": 'weight_map' must be an object, got ", wm->type_name()));
    }
    if (wm->empty()) {
      return absl::InvalidArgumentError(absl::StrCat(index_path, ": 'weight_map' is empty"));
    }
    std::map<std::string, std::string> weight_map;  // tensor -> shard file name
    std::set<std::string> shard_names;
    for (auto it = wm->begin(); it != wm->end(); ++it) {
      if (!it.value().is_string()) {
        return absl::InvalidArgumentError(
            absl::StrCat(index_path, ": 'weight_map' entry for tensor '", it.key(),
                         "' must be a shard file name (string), got ", it.value().type_name()));
      }
      const std::string& shard = it.value().get_ref<const std::string&>();
      const std::filesystem::path p(shard);
      bool bad = shard.empty() || p.is_absolute();
      for (const auto& part : p) bad = bad || part == "..";
      if (bad) {
        return absl::InvalidArgumentError(absl::StrCat(index_path, ": tensor '", it.key(),
                                                       "' has invalid shard file name '",
                                                       shard, "'"));
      }
      weight_map[it.key()] = shard;
      shard_names.insert(shard);
    }

    std::map<std::string, const SafetensorsFile*> shards;
    for (const std::string& shard : shard_names) {
      absl::StatusOr<std::unique_ptr<SafetensorsFile>> f =
          SafetensorsFile::Open(JoinPath(model_dir, shard));
      if (!f.ok()) {
        return absl::Status(f.status().code(),
                            absl::StrCat(index_path, ": cannot open shard '", shard,
                                         "': ", f.status().message()));
      }
      shards[shard] = f->get();
      reader->files_.push_back(*std::move(f));
    }
    for (const auto& file : reader->files_) {
      for (const auto& [name, info] : file->tensors()) {
        auto [pos, inserted] = reader->index_.emplace(name, &info);
        if (!inserted) {
          return absl::InvalidArgumentError(
              absl::StrCat(model_dir, ": tensor '", name, "' appears in two shards: '",
                           pos->second->file, "' and '", file->path(), "'"));
        }
      }
    }
    for (const auto& [name, shard] : weight_map) {
      const SafetensorsFile* f = shards.at(shard);
      if (f->tensors().find(name) == f->tensors().end()) {
        return absl::DataLossError(absl::StrCat(index_path, ": tensor '", name,
                                                "' is mapped to shard '", shard, "' but ",
                                                f->path(), " does not contain it"));
      }
    }
    return reader;
  }

  if (!std::filesystem::exists(single_path, ec)) {
    return absl::NotFoundError(
        absl::StrCat(model_dir,
                     ": no checkpoint found (neither model.safetensors nor "
                     "model.safetensors.index.json exists)"));
  }
  ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsFile> f, SafetensorsFile::Open(single_path));
  for (const auto& [name, info] : f->tensors()) reader->index_.emplace(name, &info);
  reader->files_.push_back(std::move(f));
  return reader;
}

bool CheckpointReader::Has(const std::string& name) const { return index_.count(name) > 0; }

absl::StatusOr<const TensorInfo*> CheckpointReader::Find(const std::string& name) const {
  auto it = index_.find(name);
  if (it == index_.end()) {
    return absl::NotFoundError(
        absl::StrCat("tensor '", name, "' not found in checkpoint ", dir_));
  }
  return it->second;
}

std::vector<std::string> CheckpointReader::TensorNames() const {
  std::vector<std::string> names;
  names.reserve(index_.size());
  for (const auto& [name, info] : index_) names.push_back(name);
  return names;
}

absl::Status CheckpointReader::ReadF32(const std::string& name,
                                       absl::Span<const int64_t> expected_shape,
                                       absl::Span<float> out) const {
  return ReadF32Slice(name, expected_shape, TensorSlice{0, 0, -1}, out);
}

absl::Status CheckpointReader::CheckFloatTensor(const std::string& name,
                                                absl::Span<const int64_t> expected_shape) const {
  ASSIGN_OR_RETURN(const TensorInfo* t, Find(name));
  const std::string where = absl::StrCat(t->file, ": tensor '", name, "'");
  if (absl::Span<const int64_t>(t->shape) != expected_shape) {
    return absl::InvalidArgumentError(absl::StrCat(where, " has shape ", ShapeString(t->shape),
                                                   ", expected ",
                                                   ShapeString(expected_shape)));
  }
  if (!IsFloatDType(t->dtype)) {
    return absl::InvalidArgumentError(absl::StrCat(where, " has dtype ", Name(t->dtype),
                                                   "; only F32, F16 and BF16 can be read as "
                                                   "float"));
  }
  return absl::OkStatus();
}

absl::Status CheckpointReader::ReadF32Slice(const std::string& name,
                                            absl::Span<const int64_t> expected_shape,
                                            const TensorSlice& slice,
                                            absl::Span<float> out) const {
  RETURN_IF_ERROR(CheckFloatTensor(name, expected_shape));
  ASSIGN_OR_RETURN(const TensorInfo* t, Find(name));
  const std::string where = absl::StrCat(t->file, ": tensor '", name, "'");
  const size_t esize = DTypeSize(t->dtype);
  const int64_t rank = static_cast<int64_t>(t->shape.size());

  // Whole tensor: rank 0 tensors, or a slice covering all of dim 0.
  const bool whole = rank == 0 || (slice.dim == 0 && slice.begin == 0 &&
                                   (slice.end == -1 || slice.end == t->shape[0]));
  if (whole) {
    const int64_t n = t->numel();
    if (out.size() != static_cast<size_t>(n)) {
      return absl::InvalidArgumentError(absl::StrCat(where, " has ", n,
                                                     " elements but the output buffer has ",
                                                     out.size()));
    }
    ConvertRun(t->dtype, t->data, static_cast<size_t>(n), out.data());
    return absl::OkStatus();
  }

  if (slice.dim < 0 || slice.dim >= rank) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": cannot slice dimension ",
                                                   slice.dim, " of a tensor with shape ",
                                                   ShapeString(t->shape)));
  }
  const int64_t len = t->shape[slice.dim];
  const int64_t begin = slice.begin;
  const int64_t end = slice.end == -1 ? len : slice.end;
  if (begin < 0 || end < begin || end > len) {
    return absl::InvalidArgumentError(absl::StrCat(
        where, ": invalid slice [", slice.begin, ", ", slice.end, ") of dimension ", slice.dim,
        " (size ", len, ") of shape ", ShapeString(t->shape)));
  }
  // View the tensor as [outer, len, inner] and copy rows [begin, end) of the middle dimension.
  int64_t outer = 1;
  for (int64_t d = 0; d < slice.dim; ++d) outer *= t->shape[d];
  int64_t inner = 1;
  for (int64_t d = slice.dim + 1; d < rank; ++d) inner *= t->shape[d];
  const int64_t run = (end - begin) * inner;  // contiguous elements per outer index
  const int64_t n = outer * run;
  if (out.size() != static_cast<size_t>(n)) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, ": slice [", begin, ", ", end, ") of dimension ", slice.dim,
                     " has ", n, " elements but the output buffer has ", out.size()));
  }
  for (int64_t o = 0; o < outer; ++o) {
    const uint8_t* src = t->data + static_cast<size_t>((o * len + begin) * inner) * esize;
    ConvertRun(t->dtype, src, static_cast<size_t>(run), out.data() + o * run);
  }
  return absl::OkStatus();
}

}  // namespace lorc
