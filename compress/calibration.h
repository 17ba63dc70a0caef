// Calibration for whitened factorization: second moments C_l = sum_t x_t x_t^T (fp64, [D, D]) of
// the inputs of every layer's K/V projections (the input_layernorm output), from running the
// model on the CPU backend over a calibration text (worker/ModelRunner's layer-input observer).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "compress/linalg.h"

namespace lorc::compress {

struct CalibrationText {
  std::string source;  // "default" or the file name as given
  std::string text;
};

// `path` empty: the default text compiled in from compress/calib/default.txt. Otherwise plain
// text, or JSONL (a file ending .jsonl, or whose first non-blank line starts with '{') with a
// string "text" field per non-blank line, joined with blank lines. NotFound / InvalidArgument
// naming the file and line (and naming --calib for a directory).
absl::StatusOr<CalibrationText> LoadCalibrationText(const std::string& path);

struct CalibrationMoments {
  std::vector<MatD> c;  // per layer, [hidden, hidden], symmetric
  int64_t tokens = 0;   // token rows accumulated (each chunk starts with BOS when the model has one)
};

// `text` tokenized with the model's tokenizer and cut into chunks of at most `chunk_tokens`
// tokens, each starting with BOS when the model has one. InvalidArgument when the text gives no
// tokens.
absl::StatusOr<std::vector<std::vector<int32_t>>> CalibrationChunks(const std::string& model_dir,
                                                                    const std::string& text,
                                                                    int32_t chunk_tokens = 512);

// Runs the chunks (one sequence each, on a CPU backend with fp32 weights) and accumulates every
// layer's input-norm output second moment in fp64.
absl::StatusOr<CalibrationMoments> ComputeCalibrationMoments(
    const std::string& model_dir, const std::vector<std::vector<int32_t>>& chunks);
// Tokenizes `text` (CalibrationChunks) and computes its moments.
absl::StatusOr<CalibrationMoments> ComputeCalibrationMoments(const std::string& model_dir,
                                                             const std::string& text,
                                                             int32_t chunk_tokens = 512);

struct CalibrationPpl {
  double ppl = 0;       // exp(mean next-token NLL), natural log
  int64_t tokens = 0;   // predicted tokens (chunk length - 1 per chunk)
};
// Perplexity of the model in `model_dir` (a plain or LoRC compressed directory) over the chunks,
// on a CPU backend in fp32: every token of a chunk but the first is predicted from the ones
// before it. InvalidArgument when no chunk has two tokens.
absl::StatusOr<CalibrationPpl> ComputeCalibrationPerplexity(
    const std::string& model_dir, const std::vector<std::vector<int32_t>>& chunks);

}  // namespace lorc::compress
