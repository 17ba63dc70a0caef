#include "backend/backend.h"

#include <limits>
#include <string>
#include <tuple>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "backend/cpu_backend.h"
#include "backend/cuda_backend.h"
#include "common/status_macros.h"
#include "kvpolicy/sequence_policy.h"

namespace lorc {

DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& o) noexcept {
  if (this != &o) {
    Reset();
    owner_ = std::exchange(o.owner_, nullptr);
    data_ = std::exchange(o.data_, nullptr);
    bytes_ = std::exchange(o.bytes_, 0);
    kind_ = o.kind_;
  }
  return *this;
}

void DeviceBuffer::Reset() {
  if (data_ != nullptr && owner_ != nullptr) owner_->Free(data_, kind_);
  data_ = nullptr;
  bytes_ = 0;
  owner_ = nullptr;
}

Tensor2D Tensor2D::ColSlice(int64_t c0, int64_t n) const {
  Tensor2D t = *this;
  t.data = static_cast<char*>(data) + c0 * static_cast<int64_t>(DTypeSize(dtype));
  t.cols = n;
  t.ld = stride();
  return t;
}

Tensor2D Tensor2D::RowSlice(int64_t r0, int64_t n) const {
  Tensor2D t = *this;
  t.data = static_cast<char*>(data) + r0 * stride() * static_cast<int64_t>(DTypeSize(dtype));
  t.rows = n;
  t.ld = stride();
  return t;
}

absl::StatusOr<BackendKind> ParseBackendKind(absl::string_view s) {
  for (BackendKind kind : {BackendKind::kCpu, BackendKind::kCuda}) {
    if (absl::EqualsIgnoreCase(s, BackendKindName(kind))) return kind;
  }
  return absl::InvalidArgumentError(absl::StrCat("unknown backend '", s, "' (expected ",
                                                 BackendKindName(BackendKind::kCpu), " or ",
                                                 BackendKindName(BackendKind::kCuda), ")"));
}

bool IsBackendKind(absl::string_view name, BackendKind kind) {
  absl::StatusOr<BackendKind> parsed = ParseBackendKind(name);
  return parsed.ok() && *parsed == kind;
}

absl::Status RequireF32(const char* backend, const char* op, const char* what, DType dtype) {
  if (dtype == DType::kF32) return absl::OkStatus();
  return absl::UnimplementedError(absl::StrCat(backend, " backend: ", op, ": ", what, " dtype ",
                                               DTypeName(dtype), " not implemented"));
}

absl::Status ValidateBlockCopies(absl::Span<const BlockCopy> copies, int32_t num_blocks) {
  for (size_t i = 0; i < copies.size(); ++i) {
    for (auto [field, b] : {std::pair{"src", copies[i].src}, std::pair{"dst", copies[i].dst}}) {
      if (b < 0 || b >= num_blocks) {
        return absl::InvalidArgumentError(absl::StrCat("block copy ", i, ": ", field, " block ", b,
                                                       " outside the cache of ", num_blocks,
                                                       " blocks"));
      }
    }
  }
  return absl::OkStatus();
}

int64_t KvLayerBlockBytes(const KvLayer& layer, bool v_side, int32_t block_size) {
  const int64_t w = v_side ? layer.v_width : layer.k_width;
  if (layer.quant == kernels::KvQuant::kNone) return block_size * w * static_cast<int64_t>(DTypeSize(layer.dtype));
  return kernels::KvqBlockBytes(layer.quant, block_size, layer.num_kv_heads, w / layer.num_kv_heads);
}

int64_t KvHeadSlotBytes(const KvLayer& layer, bool v_side) {
  const int64_t hw = (v_side ? layer.v_width : layer.k_width) / layer.num_kv_heads;
  if (layer.quant == kernels::KvQuant::kNone) return hw * static_cast<int64_t>(DTypeSize(layer.dtype));
  return kernels::KvqHeadCodeBytes(layer.quant, hw);
}

absl::StatusOr<HostKvStorage> Backend::CreateHostKvStorage(absl::Span<const KvLayer> layers,
                                                           int32_t block_size, int32_t num_slots) {
  if (num_slots <= 0 || block_size <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(name(), " backend: CreateHostKvStorage: ",
                                                   num_slots, " slots of blocks of ", block_size,
                                                   " tokens (both must be positive)"));
  }
  HostKvStorage h;
  for (const KvLayer& l : layers) {
    if (l.quant != kernels::KvQuant::kNone && l.num_kv_heads <= 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          name(), " backend: CreateHostKvStorage: a quantized layer without KV heads"));
    }
    h.offsets_.push_back(h.slot_bytes_);
    h.k_bytes_.push_back(KvLayerBlockBytes(l, false, block_size));
    h.v_bytes_.push_back(KvLayerBlockBytes(l, true, block_size));
    h.slot_bytes_ += h.k_bytes_.back() + h.v_bytes_.back();
  }
  if (h.slot_bytes_ > 0 && num_slots > std::numeric_limits<int64_t>::max() / h.slot_bytes_) {
    return absl::InvalidArgumentError(absl::StrCat(name(), " backend: CreateHostKvStorage: ", num_slots,
                                                   " slots of ", h.slot_bytes_, " bytes overflow"));
  }
  ASSIGN_OR_RETURN(h.memory_, AllocateHost(static_cast<size_t>(num_slots) * h.slot_bytes_));
  h.num_slots_ = num_slots;
  return h;
}

absl::Status ValidateHostBlockCopies(const char* what, absl::Span<const HostBlockCopy> copies,
                                     int32_t num_blocks, int32_t num_slots) {
  for (size_t i = 0; i < copies.size(); ++i) {
    if (copies[i].block < 0 || copies[i].block >= num_blocks) {
      return absl::InvalidArgumentError(absl::StrCat(what, " ", i, ": block ", copies[i].block,
                                                     " outside the cache of ", num_blocks, " blocks"));
    }
    if (copies[i].slot < 0 || copies[i].slot >= num_slots) {
      return absl::InvalidArgumentError(absl::StrCat(what, " ", i, ": slot ", copies[i].slot,
                                                     " outside the host KV pool of ", num_slots,
                                                     " slots"));
    }
  }
  return absl::OkStatus();
}

absl::Status ValidateKvTransfer(const char* backend, const char* what,
                                absl::Span<const KvLayer> layers, int32_t block_size,
                                int32_t num_blocks, const HostKvStorage& host,
                                absl::Span<const HostBlockCopy> copies) {
  RETURN_IF_ERROR(ValidateHostBlockCopies(what, copies, num_blocks, host.num_slots()));
  if (host.num_layers() != static_cast<int>(layers.size())) {
    return absl::InvalidArgumentError(absl::StrCat(backend, " backend: ", what,
                                                   ": the host storage holds ", host.num_layers(),
                                                   " layers, the cache ", layers.size()));
  }
  for (size_t l = 0; l < layers.size(); ++l) {
    const int li = static_cast<int>(l);
    if (KvLayerBlockBytes(layers[l], false, block_size) != host.k_bytes(li) ||
        KvLayerBlockBytes(layers[l], true, block_size) != host.v_bytes(li)) {
      return absl::InvalidArgumentError(absl::StrCat(backend, " backend: ", what, ": layer ", l,
                                                     "'s blocks differ from the host storage's"));
    }
  }
  return absl::OkStatus();
}

void AppendKvTransferSegments(absl::Span<const KvLayer> layers, const HostKvStorage& host,
                              absl::Span<const HostBlockCopy> copies, bool to_host,
                              KvTransferSegments* out) {
  for (const HostBlockCopy& c : copies) {
    uint8_t* slot = host.slot(c.slot);
    for (size_t l = 0; l < layers.size(); ++l) {
      const int li = static_cast<int>(l);
      const int64_t kb = host.k_bytes(li), vb = host.v_bytes(li);
      uint8_t* hk = slot + host.k_offset(li);
      uint8_t* dk = static_cast<uint8_t*>(layers[l].k) + c.block * kb;
      uint8_t* dv = static_cast<uint8_t*>(layers[l].v) + c.block * vb;
      for (auto [dev, hst, bytes] : {std::tuple{dk, hk, kb}, std::tuple{dv, hk + kb, vb}}) {
        if (bytes == 0) continue;
        out->dsts.push_back(to_host ? static_cast<void*>(hst) : dev);
        out->srcs.push_back(to_host ? static_cast<const void*>(dev) : hst);
        out->sizes.push_back(static_cast<size_t>(bytes));
      }
    }
  }
}

absl::Status ValidateWeightFill(const char* backend, const WeightFillParams& p) {
  const Tensor2D& o = p.out;
  auto bad = [&](const std::string& what) {
    return absl::InvalidArgumentError(absl::StrCat(backend, " backend: FillWeights: ", what));
  };
  if (o.rows < 0 || o.cols < 0 || o.stride() < o.cols) {
    return bad(absl::StrCat("out [", o.rows, ", ", o.cols, "] with ld ", o.ld));
  }
  if (o.data == nullptr && o.rows > 0 && o.cols > 0) return bad("out.data is null");
  if (p.constant) return absl::OkStatus();
  if (p.row0 < 0 || p.col0 < 0 || p.full_cols < 0 || p.col0 + o.cols > p.full_cols) {
    return bad(absl::StrCat("block at row0 ", p.row0, ", col0 ", p.col0, " of ", o.cols,
                            " columns outside a tensor of full_cols ", p.full_cols));
  }
  if (p.full_cols > 0 && p.row0 + o.rows > std::numeric_limits<int64_t>::max() / p.full_cols) {
    return bad(absl::StrCat("rows up to ", p.row0 + o.rows, " x full_cols ", p.full_cols,
                            " overflow a 64-bit index"));
  }
  return absl::OkStatus();
}

namespace {

// "[rows, cols] DTYPE, pitch P" for the NormedInput errors.
std::string Describe(const Tensor2D& t) {
  return absl::StrCat("[", t.rows, ", ", t.cols, "] ", DTypeName(t.dtype), ", pitch ", t.stride());
}

bool Overlap(const Tensor2D& a, const Tensor2D& b) {
  if (a.data == nullptr || b.data == nullptr || a.rows == 0 || b.rows == 0) return false;
  const char* a0 = static_cast<const char*>(a.data);
  const char* b0 = static_cast<const char*>(b.data);
  const char* a1 = a0 + ((a.rows - 1) * a.stride() + a.cols) * static_cast<int64_t>(DTypeSize(a.dtype));
  const char* b1 = b0 + ((b.rows - 1) * b.stride() + b.cols) * static_cast<int64_t>(DTypeSize(b.dtype));
  return a0 < b1 && b0 < a1;
}

}  // namespace

absl::Status CheckNormedInput(const char* op, const NormedInput& in) {
  const Tensor2D& r = in.residual;
  auto bad = [&](const char* field, const Tensor2D& t, const std::string& want) {
    return absl::InvalidArgumentError(
        absl::StrCat(op, ": NormedInput.", field, " ", Describe(t), " (want ", want, ")"));
  };
  auto like_r = [&](const Tensor2D& t) { return t.rows == r.rows && t.cols == r.cols && t.dtype == r.dtype; };
  const std::string rs = absl::StrCat("residual's [", r.rows, ", ", r.cols, "] ", DTypeName(r.dtype));
  if (r.data == nullptr) return bad("residual", r, "a tensor");
  if (in.weight.rows != 1 || in.weight.cols != r.cols) return bad("weight", in.weight, absl::StrCat("[1, ", r.cols, "]"));
  if (!like_r(in.normed)) return bad("normed", in.normed, rs);
  if (in.add.data == nullptr) return absl::OkStatus();
  if (!like_r(in.add)) return bad("add", in.add, rs);
  if (in.next.data == r.data && in.next.stride() == r.stride() && like_r(in.next)) return absl::OkStatus();
  // Another buffer: the stream is copied into it (dense, so one copy; never over its inputs).
  if (!like_r(in.next) || in.next.stride() != in.next.cols || r.stride() != r.cols) {
    return bad("next", in.next, absl::StrCat(rs, ", dense like residual (pitch ", r.stride(), "), or residual itself"));
  }
  if (Overlap(in.next, r) || Overlap(in.next, in.add)) return bad("next", in.next, "no overlap with residual or add");
  return absl::OkStatus();
}

namespace {

// The unfused (add +) RMSNorm of a NormedInput into in.normed; the stream ends in in.next.
absl::Status NormInto(Backend& b, const char* op, const NormedInput& in) {
  RETURN_IF_ERROR(CheckNormedInput(op, in));
  if (in.add.data == nullptr) return b.RmsNorm(in.residual, in.weight, in.eps, in.normed);
  if (in.next.data != in.residual.data) {
    RETURN_IF_ERROR(b.CopyOnDevice(in.next.data, in.residual.data,
                                   static_cast<size_t>(in.residual.rows * in.residual.cols) *
                                       DTypeSize(in.residual.dtype)));
  }
  return b.FusedAddRmsNorm(in.next, in.add, in.weight, in.eps, in.normed);
}

}  // namespace

absl::Status Backend::SumSquaresPartials(const Tensor2D& x, float* out) {
  (void)x;
  (void)out;
  return absl::UnimplementedError(absl::StrCat("SumSquaresPartials: not implemented by the ", name(), " backend"));
}

absl::Status Backend::ScaleColumns(Tensor2D w, const Tensor2D& g) {
  (void)w;
  (void)g;
  return absl::UnimplementedError(absl::StrCat("ScaleColumns: not implemented by the ", name(), " backend"));
}

absl::Status Backend::MatmulAdd(const Tensor2D& x, const Tensor2D& w, Tensor2D acc, Tensor2D scratch,
                                float* sum_squares) {
  if (acc.rows != scratch.rows || acc.cols != scratch.cols || acc.dtype != scratch.dtype) {
    return absl::InvalidArgumentError(absl::StrCat("MatmulAdd: acc [", acc.rows, ", ", acc.cols, "] ",
                                                   DTypeName(acc.dtype), " and scratch [", scratch.rows, ", ",
                                                   scratch.cols, "] ", DTypeName(scratch.dtype), " differ"));
  }
  RETURN_IF_ERROR(Matmul(x, w, scratch));
  RETURN_IF_ERROR(AddInPlace(acc, scratch));
  return sum_squares == nullptr ? absl::OkStatus() : SumSquaresPartials(acc, sum_squares);
}

absl::Status Backend::NormMatmulRopeKvWrite(const NormedInput& in, const Tensor2D& w, Tensor2D out,
                                            const RopeKvWriteParams& p) {
  RETURN_IF_ERROR(NormInto(*this, "NormMatmulRopeKvWrite", in));
  return MatmulRopeKvWrite(in.normed, w, out, p);
}

absl::Status Backend::NormMatmulSiluMul(const NormedInput& in, const Tensor2D& w, Tensor2D gate_up, Tensor2D act) {
  RETURN_IF_ERROR(NormInto(*this, "NormMatmulSiluMul", in));
  return MatmulSiluMul(in.normed, w, gate_up, act);
}

absl::StatusOr<std::unique_ptr<Backend>> CreateBackend(const BackendOptions& options) {
  switch (options.kind) {
    case BackendKind::kCpu:
      return CreateCpuBackend(options);
    case BackendKind::kCuda:
      return CreateCudaBackend(options);
  }
  return absl::InvalidArgumentError("unknown backend kind");
}

KvCacheCompaction ToCacheCompaction(const kvpolicy::SequenceKvPolicy& st, absl::Span<const kvpolicy::SlotMove> moves,
                                    absl::Span<const kvpolicy::LowRepack> low, const int32_t* table,
                                    int32_t block_size) {
  auto slot = [&](int64_t s) { return static_cast<int64_t>(table[s / block_size]) * block_size + s % block_size; };
  KvCacheCompaction c;
  c.moves.reserve(moves.size());
  for (const kvpolicy::SlotMove& m : moves) c.moves.push_back({m.layer, m.head, slot(m.src), slot(m.dst)});
  // MiKV's runs: sequence slots to cache slots (a run's slots may span blocks).
  c.runs.resize(low.size());
  for (size_t r = 0; r < low.size(); ++r) {
    const kvpolicy::LowRepack& lr = low[r];
    KvLowRun& run = c.runs[r];
    run.layer = lr.layer;
    run.head = lr.head;
    run.balance = st.balance(lr.layer, lr.head);
    const int64_t old_slots = st.LowRunSlotsOf(lr.layer, lr.old_entries);
    const int64_t new_slots = st.LowRunSlotsOf(lr.layer, static_cast<int64_t>(lr.sources.size()));
    for (int64_t i = 0; i < old_slots; ++i) run.old_slots.push_back(slot(lr.old_base + i));
    for (int64_t i = 0; i < new_slots; ++i) run.new_slots.push_back(slot(lr.new_base + i));
    run.sources.reserve(lr.sources.size());
    for (int64_t src : lr.sources) run.sources.push_back(src >= 0 ? src : -1 - slot(-1 - src));
  }
  return c;
}

}  // namespace lorc
