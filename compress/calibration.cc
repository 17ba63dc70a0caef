#include "compress/calibration.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <functional>
#include <sstream>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "backend/sampling.h"
#include "backend/backend.h"
#include "common/json_util.h"
#include "common/status_macros.h"
#include "model/model_config.h"
#include "model/model_source.h"
#include "tokenizer/tokenizer.h"
#include "worker/model_loader.h"

namespace lorc::compress {

namespace {
constexpr char kDefaultText[] =
#include "compress/calib/default.txt.inc"
    ;
}  // namespace

absl::StatusOr<CalibrationText> LoadCalibrationText(const std::string& path) {
  if (path.empty()) return CalibrationText{"default", kDefaultText};
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec)) {
    return absl::InvalidArgumentError(absl::StrCat("--calib: ", path, " is a directory, not a text file"));
  }
  ASSIGN_OR_RETURN(std::string content, ReadFileToString(path));
  const absl::string_view first = absl::StripLeadingAsciiWhitespace(content);
  if (!absl::EndsWith(path, ".jsonl") && !absl::StartsWith(first, "{")) {
    return CalibrationText{path, std::move(content)};
  }
  std::istringstream in(content);
  std::string line, text;
  for (int lineno = 1; std::getline(in, line); ++lineno) {
    if (absl::StripAsciiWhitespace(line).empty()) continue;
    const std::string what = absl::StrCat(path, ":", lineno);
    ASSIGN_OR_RETURN(nlohmann::json j, ParseJson(line, what));
    if (!j.is_object() || !j.contains("text") || !j["text"].is_string()) {
      return absl::InvalidArgumentError(absl::StrCat(what, ": no string \"text\" field"));
    }
    if (!text.empty()) text += "\n\n";
    text += j["text"].get<std::string>();
  }
  return CalibrationText{path, std::move(text)};
}

absl::StatusOr<std::vector<std::vector<int32_t>>> CalibrationChunks(const std::string& model_dir,
                                                                    const std::string& text,
                                                                    int32_t chunk_tokens) {
  ASSIGN_OR_RETURN(const ModelConfig config, LoadModelConfig(model_dir));
  ASSIGN_OR_RETURN(std::unique_ptr<Tokenizer> tok, Tokenizer::FromModelDir(model_dir));
  ASSIGN_OR_RETURN(std::vector<int32_t> ids, tok->Encode(text, false));
  if (ids.empty()) return absl::InvalidArgumentError("the text gives no tokens");
  const bool bos = config.bos_token_id >= 0;
  const size_t per_chunk = static_cast<size_t>(chunk_tokens - (bos ? 1 : 0));
  std::vector<std::vector<int32_t>> chunks;
  for (size_t begin = 0; begin < ids.size(); begin += per_chunk) {
    std::vector<int32_t>& c = chunks.emplace_back();
    if (bos) c.push_back(static_cast<int32_t>(config.bos_token_id));
    const size_t end = std::min(ids.size(), begin + per_chunk);
    c.insert(c.end(), ids.begin() + static_cast<std::ptrdiff_t>(begin),
             ids.begin() + static_cast<std::ptrdiff_t>(end));
  }
  return chunks;
}

namespace {

// Loads `model_dir` on a CPU backend (fp32) and runs each chunk as one sequence; `logits` gets
// the chunk's index and its host logit rows (one per token) when `all_logits`.
absl::Status RunChunks(const std::string& model_dir, const std::vector<std::vector<int32_t>>& chunks,
                       ModelRunner::LayerInputObserver observer, bool all_logits,
                       const std::function<void(size_t, const StepOutput&)>& logits,
                       size_t* current_chunk = nullptr) {
  int32_t max_len = 1;
  for (const auto& c : chunks) max_len = std::max(max_len, static_cast<int32_t>(c.size()));
  ASSIGN_OR_RETURN(std::unique_ptr<Backend> backend, CreateBackend(BackendOptions{}));
  KvCacheOptions kv;
  kv.max_num_seqs = 1;
  kv.max_num_batched_tokens = max_len;
  kv.max_model_len = max_len;
  kv.num_blocks = (max_len + kv.block_size - 1) / kv.block_size + 1;
  kv.enforce_eager = true;
  ModelSource model_source;  // every other field at its default
  model_source.dir = model_dir;
  ASSIGN_OR_RETURN(LoadedModel m, LoadModel(model_source, backend.get(), 0, 1, nullptr, kv));
  if (observer) RETURN_IF_ERROR(m.runner->SetLayerInputObserver(std::move(observer)));
  for (size_t i = 0; i < chunks.size(); ++i) {
    if (current_chunk != nullptr) *current_chunk = i;
    SequenceStep s;
    s.seq_id = static_cast<int64_t>(i);
    s.tokens = chunks[i];
    const int32_t blocks = (static_cast<int32_t>(s.tokens.size()) + kv.block_size - 1) / kv.block_size;
    for (int32_t b = 0; b < blocks; ++b) s.block_table.push_back(b);
    s.logits = all_logits ? SequenceStep::Logits::kAll : SequenceStep::Logits::kLast;
    ASSIGN_OR_RETURN(const StepOutput out, m.runner->Execute({&s, 1}, /*host_logits=*/all_logits));
    if (all_logits) logits(i, out);
  }
  return m.runner->SetLayerInputObserver(nullptr);
}

}  // namespace

absl::StatusOr<CalibrationMoments> ComputeCalibrationMoments(
    const std::string& model_dir, const std::vector<std::vector<int32_t>>& chunks) {
  ASSIGN_OR_RETURN(const ModelConfig config, LoadModelConfig(model_dir));
  const int64_t d = config.hidden_size;
  CalibrationMoments out;
  out.c.assign(static_cast<size_t>(config.num_layers), MatD(d, d));
  std::vector<double> rows;
  absl::Status bad;  // the first non-finite layer input: NaN moments only fail Cholesky later, unnamed
  size_t chunk = 0;
  const auto observer = [&](int layer, const Tensor2D& h) {
    rows.resize(static_cast<size_t>(h.rows * d));
    for (int64_t t = 0; t < h.rows; ++t) {
      const float* src = h.as<float>() + t * h.stride();
      std::copy(src, src + d, rows.begin() + t * d);
      if (bad.ok() && !RowIsFinite({src, static_cast<size_t>(d)})) {
        bad = absl::InvalidArgumentError(absl::StrCat(
            "calibration: the input of layer ", layer, " at token ", t, " of chunk ", chunk,
            " holds NaN or infinite values: the model's weights or activations are not finite"));
      }
    }
    // C += X^T X (upper triangle; mirrored below).
    cblas_dsyrk(CblasRowMajor, CblasUpper, CblasTrans, static_cast<int>(d),
                static_cast<int>(h.rows), 1.0, rows.data(), static_cast<int>(d), 1.0,
                out.c[static_cast<size_t>(layer)].v.data(), static_cast<int>(d));
  };
  RETURN_IF_ERROR(RunChunks(model_dir, chunks, observer, false, nullptr, &chunk));
  RETURN_IF_ERROR(bad);
  for (const auto& c : chunks) out.tokens += static_cast<int64_t>(c.size());
  for (MatD& c : out.c) {
    for (int64_t i = 0; i < d; ++i) {
      for (int64_t j = 0; j < i; ++j) c.at(i, j) = c.at(j, i);
    }
  }
  return out;
}

absl::StatusOr<CalibrationMoments> ComputeCalibrationMoments(const std::string& model_dir,
                                                             const std::string& text,
                                                             int32_t chunk_tokens) {
  ASSIGN_OR_RETURN(const auto chunks, CalibrationChunks(model_dir, text, chunk_tokens));
  return ComputeCalibrationMoments(model_dir, chunks);
}

absl::StatusOr<CalibrationPpl> ComputeCalibrationPerplexity(
    const std::string& model_dir, const std::vector<std::vector<int32_t>>& chunks) {
  double nll = 0;
  int64_t n = 0;
  absl::Status bad;  // NaN logits gave a NaN perplexity, which every comparison of the search lost
  RETURN_IF_ERROR(RunChunks(model_dir, chunks, nullptr, true, [&](size_t i, const StepOutput& out) {
    const std::vector<int32_t>& c = chunks[i];
    for (size_t t = 0; t + 1 < c.size(); ++t) {
      const float* row = out.Row(static_cast<int64_t>(t));
      if (bad.ok() && !RowIsFinite({row, static_cast<size_t>(out.vocab_size)})) {
        bad = absl::InvalidArgumentError(absl::StrCat(
            "calibration perplexity: the logits at token ", t, " of chunk ", i,
            " hold NaN or infinite values: the model's weights or activations are not finite"));
      }
      double mx = row[0];
      for (int64_t v = 1; v < out.vocab_size; ++v) mx = std::max(mx, static_cast<double>(row[v]));
      double z = 0;
      for (int64_t v = 0; v < out.vocab_size; ++v) z += std::exp(static_cast<double>(row[v]) - mx);
      nll += mx + std::log(z) - static_cast<double>(row[c[t + 1]]);
      ++n;
    }
  }));
  RETURN_IF_ERROR(bad);
  if (n == 0) return absl::InvalidArgumentError("calibration perplexity: no chunk has two tokens");
  return CalibrationPpl{std::exp(nll / static_cast<double>(n)), n};
}

}  // namespace lorc::compress
