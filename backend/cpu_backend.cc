#include "backend/cpu_backend.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"

namespace lorc {
namespace {

absl::Status RequireF32(const Tensor2D& t, const char* what) {
  if (t.dtype != DType::kF32) {
    return absl::UnimplementedError(
        absl::StrCat("cpu backend: ", what, " must be F32, got ", DTypeName(t.dtype)));
  }
  return absl::OkStatus();
}

inline float* Row(const Tensor2D& t, int64_t r) { return t.as<float>() + r * t.stride(); }

class CpuBackend final : public Backend {
 public:
  explicit CpuBackend(int threads) {
    if (threads > 0) openblas_set_num_threads(threads);
  }

  const char* name() const override { return "cpu"; }
  std::string Describe() const override {
    return absl::StrCat("cpu: fp32, OpenBLAS ", openblas_get_config(), ", ",
                        openblas_get_num_threads(), " BLAS threads, ",
                        std::thread::hardware_concurrency(), " hardware threads");
  }

  absl::StatusOr<DeviceBuffer> Allocate(size_t bytes) override {
    if (bytes == 0) return DeviceBuffer();
    const size_t rounded = (bytes + 63) / 64 * 64;
    void* p = std::aligned_alloc(64, rounded);
    if (p == nullptr) {
      return absl::ResourceExhaustedError(absl::StrCat("cpu backend: cannot allocate ", bytes, " bytes"));
    }
    return DeviceBuffer(this, p, bytes);
  }
  absl::Status CopyToDevice(void* dst, const void* src, size_t bytes) override {
    if (bytes) std::memcpy(dst, src, bytes);
    return absl::OkStatus();
  }
  absl::Status CopyToHost(void* dst, const void* src, size_t bytes) override {
    if (bytes) std::memcpy(dst, src, bytes);
    return absl::OkStatus();
  }
  absl::Status Memset(void* dst, int value, size_t bytes) override {
    if (bytes) std::memset(dst, value, bytes);
    return absl::OkStatus();
  }
  absl::Status Synchronize() override { return absl::OkStatus(); }

  absl::Status Embedding(const Tensor2D& table, const int32_t* ids, Tensor2D out) override {
    if (auto s = RequireF32(table, "embedding table"); !s.ok()) return s;
    for (int64_t i = 0; i < out.rows; ++i) {
      std::memcpy(Row(out, i), Row(table, ids[i]), sizeof(float) * out.cols);
    }
    return absl::OkStatus();
  }

  absl::Status RmsNorm(const Tensor2D& x, const Tensor2D& weight, float eps, Tensor2D out) override {
    if (auto s = RequireF32(x, "rmsnorm input"); !s.ok()) return s;
    const float* w = weight.as<float>();
    for (int64_t i = 0; i < x.rows; ++i) {
      const float* xi = Row(x, i);
      float* oi = Row(out, i);
      float ss = 0.f;
      for (int64_t j = 0; j < x.cols; ++j) ss += xi[j] * xi[j];
      const float inv = 1.0f / std::sqrt(ss / static_cast<float>(x.cols) + eps);
      for (int64_t j = 0; j < x.cols; ++j) oi[j] = w[j] * (xi[j] * inv);
    }
    return absl::OkStatus();
  }

  absl::Status Matmul(const Tensor2D& x, const Tensor2D& w, Tensor2D out) override {
    if (auto s = RequireF32(w, "matmul weight"); !s.ok()) return s;
    if (x.cols != w.cols || out.rows != x.rows || out.cols != w.rows) {
      return absl::InternalError(absl::StrCat("cpu matmul: shape mismatch x[", x.rows, ",", x.cols,
                                              "] w[", w.rows, ",", w.cols, "] out[", out.rows, ",",
                                              out.cols, "]"));
    }
    if (x.rows == 0) return absl::OkStatus();
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(x.rows),
                static_cast<int>(w.rows), static_cast<int>(x.cols), 1.0f, x.as<float>(),
                static_cast<int>(x.stride()), w.as<float>(), static_cast<int>(w.stride()), 0.0f,
                out.as<float>(), static_cast<int>(out.stride()));
    return absl::OkStatus();
  }

  absl::Status AddInPlace(Tensor2D acc, const Tensor2D& x) override {
    for (int64_t i = 0; i < acc.rows; ++i) {
      float* a = Row(acc, i);
      const float* b = Row(x, i);
      for (int64_t j = 0; j < acc.cols; ++j) a[j] += b[j];
    }
    return absl::OkStatus();
  }

  absl::Status SiluMul(const Tensor2D& gate_up, Tensor2D out) override {
    const int64_t inter = out.cols;
    for (int64_t i = 0; i < out.rows; ++i) {
      const float* g = Row(gate_up, i);
      const float* u = g + inter;
      float* o = Row(out, i);
      for (int64_t j = 0; j < inter; ++j) o[j] = g[j] / (1.0f + std::exp(-g[j])) * u[j];
    }
    return absl::OkStatus();
  }

  absl::Status Rope(const RopeParams& p) override {
    const int half = p.head_dim / 2;
    std::vector<float> cos_v(half), sin_v(half);
    for (int64_t t = 0; t < p.x.rows; ++t) {
      const float pos = static_cast<float>(p.positions[t]);
      for (int i = 0; i < half; ++i) {
        // fp32 angle, as transformers computes it (inv_freq @ positions in float32).
        const float angle = pos * p.inv_freq[i];
        cos_v[i] = static_cast<float>(std::cos(static_cast<double>(angle)));
        sin_v[i] = static_cast<float>(std::sin(static_cast<double>(angle)));
      }
      float* row = Row(p.x, t);
      for (int h = 0; h < p.num_heads; ++h) {
        float* v = row + static_cast<int64_t>(h) * p.head_dim;
        for (int i = 0; i < half; ++i) {
          const float a = v[i], b = v[i + half];
          v[i] = a * cos_v[i] - b * sin_v[i];
          v[i + half] = b * cos_v[i] + a * sin_v[i];
        }
      }
    }
    return absl::OkStatus();
  }

  absl::Status WriteKv(const KvLayer& cache, const Tensor2D& k, const Tensor2D& v,
                       const int32_t* slot_mapping, int32_t block_size) override {
    if (cache.dtype != DType::kF32) return absl::UnimplementedError("cpu backend: F32 KV cache only");
    float* kc = static_cast<float*>(cache.k);
    float* vc = static_cast<float*>(cache.v);
    for (int64_t t = 0; t < k.rows; ++t) {
      const int64_t slot = slot_mapping[t];
      std::memcpy(kc + slot * cache.k_width, Row(k, t), sizeof(float) * cache.k_width);
      std::memcpy(vc + slot * cache.v_width, Row(v, t), sizeof(float) * cache.v_width);
    }
    return absl::OkStatus();
  }

  absl::Status PagedAttention(const AttentionParams& p) override;

  absl::Status GatherRows(const Tensor2D& x, const int32_t* rows, Tensor2D out) override {
    for (int64_t i = 0; i < out.rows; ++i) {
      std::memcpy(Row(out, i), Row(x, rows[i]), sizeof(float) * out.cols);
    }
    return absl::OkStatus();
  }

  absl::Status CopyBlock(const KvLayer& cache, int32_t block_size, int32_t src, int32_t dst) override {
    const size_t esz = DTypeSize(cache.dtype);
    auto copy = [&](void* base, int64_t width) {
      char* b = static_cast<char*>(base);
      const size_t block_bytes = static_cast<size_t>(block_size) * width * esz;
      std::memcpy(b + dst * block_bytes, b + src * block_bytes, block_bytes);
    };
    copy(cache.k, cache.k_width);
    copy(cache.v, cache.v_width);
    return absl::OkStatus();
  }

 protected:
  void Free(void* data) override { std::free(data); }

 private:
  std::vector<float> k_buf_, v_buf_, scores_;
};

absl::Status CpuBackend::PagedAttention(const AttentionParams& p) {
  if (p.cache.dtype != DType::kF32) return absl::UnimplementedError("cpu backend: F32 KV cache only");
  const AttentionBatch& b = p.batch;
  const int hd = p.head_dim;
  const int group = p.num_heads / p.num_kv_heads;
  const float* kc = static_cast<const float*>(p.cache.k);
  const float* vc = static_cast<const float*>(p.cache.v);
  const int64_t q_ld = p.q.stride();
  const int64_t o_ld = p.out.stride();
  for (int s = 0; s < b.num_seqs; ++s) {
    const int q0 = b.query_start[s];
    const int q_len = b.query_start[s + 1] - q0;
    if (q_len == 0) continue;
    const int ctx = b.context_len[s];
    const int32_t* table = b.block_tables + static_cast<int64_t>(s) * b.max_blocks_per_seq;
    k_buf_.resize(static_cast<size_t>(ctx) * hd);
    v_buf_.resize(static_cast<size_t>(ctx) * hd);
    scores_.resize(static_cast<size_t>(q_len) * ctx);
    for (int g = 0; g < p.num_kv_heads; ++g) {
      // Gather this KV head's keys and values for positions [0, ctx) into contiguous rows.
      for (int pos = 0; pos < ctx; ++pos) {
        const int64_t slot =
            static_cast<int64_t>(table[pos / b.block_size]) * b.block_size + pos % b.block_size;
        std::memcpy(&k_buf_[static_cast<size_t>(pos) * hd], kc + slot * p.cache.k_width + g * hd,
                    sizeof(float) * hd);
        std::memcpy(&v_buf_[static_cast<size_t>(pos) * hd], vc + slot * p.cache.v_width + g * hd,
                    sizeof(float) * hd);
      }
      for (int hh = 0; hh < group; ++hh) {
        const int h = g * group + hh;
        const float* q = p.q.as<float>() + static_cast<int64_t>(q0) * q_ld + h * hd;
        float* out = p.out.as<float>() + static_cast<int64_t>(q0) * o_ld + h * hd;
        // scores = scale * q k^T
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, q_len, ctx, hd, p.scale, q,
                    static_cast<int>(q_ld), k_buf_.data(), hd, 0.0f, scores_.data(), ctx);
        for (int i = 0; i < q_len; ++i) {
          float* row = &scores_[static_cast<size_t>(i) * ctx];
          const int last = ctx - q_len + i;  // causal: keys at positions <= last
          float mx = -std::numeric_limits<float>::infinity();
          for (int j = 0; j <= last; ++j) mx = std::max(mx, row[j]);
          float sum = 0.f;
          for (int j = 0; j <= last; ++j) {
            row[j] = std::exp(row[j] - mx);
            sum += row[j];
          }
          const float inv = 1.0f / sum;
          for (int j = 0; j <= last; ++j) row[j] *= inv;
          for (int j = last + 1; j < ctx; ++j) row[j] = 0.f;
        }
        // out = probs v
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, q_len, hd, ctx, 1.0f,
                    scores_.data(), ctx, v_buf_.data(), hd, 0.0f, out, static_cast<int>(o_ld));
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<Backend>> CreateCpuBackend(const BackendOptions& options) {
  return std::unique_ptr<Backend>(new CpuBackend(options.threads));
}

}  // namespace lorc
