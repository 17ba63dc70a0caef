// `lorcserve compress`: writes a LoRC compressed model directory (FORMAT.md) from a Hugging Face
// Llama directory. Host-only (fp64 LAPACK); --whiten also runs the model on the CPU backend.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "compress/factorize.h"
#include "compress/linalg.h"
#include "model/model_config.h"
#include "model/safetensors.h"
#include "nlohmann/json.hpp"

namespace lorc::compress {

// --max-ppl-increase: the fewest calibration tokens the search scores (over the chunks it uses):
// below it Compress refuses, naming --calib (a perplexity over a few tokens is noise).
inline constexpr int64_t kMinSearchTokens = 256;

struct CompressOptions {
  std::string model_dir;
  std::string out_dir;
  std::optional<double> kv_ratio;     // --kv-ratio, in (0, 1]
  std::optional<LayerRanks> ranks;    // --ranks K:V, every layer
  std::optional<double> max_ppl_increase;  // --max-ppl-increase P (percent): rank search
  int64_t search_chunks = 16;         // --search-chunks: calibration chunks (512 tokens) per trial
  std::string schedule = "uniform";   // --schedule uniform|progressive (with --kv-ratio)
  bool whiten = false;
  std::string calib_path;             // --calib; empty: compress/calib/default.txt
  int64_t tp = 1;                     // --tp: checked against the heads (Compress), nothing else
  bool force = false;                 // write into an existing non-empty --out
  int threads = 0;                    // --threads: BLAS threads (openblas_set_num_threads); 0: all cores
};

struct CompressResult {
  std::vector<LayerRanks> ranks;
  double kv_bytes_ratio = 0;
  nlohmann::ordered_json lorc_json;   // as written to OUT/lorc.json
};

// Per-line progress (one per layer), e.g. "layer 3/8: k_rank 64 v_rank 64, relative error K 0.12
// V 0.08 (whitened)"; the relative error is sqrt(sum of dropped s_i^2 / sum s_i^2) over the
// layer's heads: of W (plain) or of W L, i.e. the activation error on the calibration set
// (whitened).
using ProgressFn = std::function<void(const std::string&)>;

// Checks the options against the model (InvalidArgument naming the flag: --model when it is
// already compressed, --out, --kv-ratio, --max-ppl-increase, --ranks, --schedule, --calib, --tp,
// --threads), then factors and writes OUT. --tp N: N divides num_attention_heads and either
// divides num_kv_heads or is a multiple of it. --whiten: InvalidArgument naming --calib when the
// calibration text gives fewer tokens than hidden_size; --max-ppl-increase: a progress line
// "warning: --search-chunks N: ... using M" when the text gives fewer chunks than asked. With
// --max-ppl-increase, searches the ranks first (rank_search.h; trial directories under the
// system temp directory, removed afterwards). AlreadyExists for a non-empty OUT without force.
// Files are written as NAME.partial in OUT and renamed into place at the end (model.safetensors
// first, lorc.json last); stale *.partial files in OUT are removed at the start.
absl::StatusOr<CompressResult> Compress(const CompressOptions& options, const ProgressFn& progress);

// Tensor `name` [rows, cols] of the checkpoint as fp64 (read as fp32, exact for BF16/F16/F32).
absl::StatusOr<MatD> ReadMatrix(const CheckpointReader& reader, const std::string& name,
                                int64_t rows, int64_t cols);
// Rows [begin, begin + n) of m.
MatD RowBlock(const MatD& m, int64_t begin, int64_t n);

// Validates a parsed lorc.json against FORMAT.md for `config`: the loader's LorcConfigFromJson plus
// the presence of kv_bytes_ratio, calibration and source_model (InvalidArgument naming the field,
// e.g. "lorc.json: layers[3].k_rank: 200 is outside [1, 128]").
absl::Status ValidateLorcJson(const nlohmann::json& j, const ModelConfig& config);

}  // namespace lorc::compress
