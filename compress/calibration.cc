#include "compress/calibration.h"

#include <cblas.h>

#include <algorithm>
#include <sstream>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "backend/backend.h"
#include "common/json_util.h"
#include "common/status_macros.h"
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

absl::StatusOr<CalibrationMoments> ComputeCalibrationMoments(const std::string& model_dir,
                                                             const std::string& text,
                                                             int32_t chunk_tokens) {
  ASSIGN_OR_RETURN(std::unique_ptr<Tokenizer> tok, Tokenizer::FromModelDir(model_dir));
  ASSIGN_OR_RETURN(std::vector<int32_t> ids, tok->Encode(text, false));
  if (ids.empty()) return absl::InvalidArgumentError("--calib: the text gives no tokens");
  ASSIGN_OR_RETURN(std::unique_ptr<Backend> backend, CreateBackend(BackendOptions{}));
  KvCacheOptions kv;
  kv.max_num_seqs = 1;
  kv.max_num_batched_tokens = chunk_tokens;
  kv.max_model_len = chunk_tokens;
  kv.num_blocks = (chunk_tokens + kv.block_size - 1) / kv.block_size + 1;
  kv.enforce_eager = true;
  ASSIGN_OR_RETURN(LoadedModel m, LoadModel(ModelSource{model_dir}, backend.get(), 0, 1, nullptr, kv));
  const int64_t d = m.config.hidden_size;
  CalibrationMoments out;
  out.c.assign(static_cast<size_t>(m.config.num_layers), MatD(d, d));
  std::vector<double> rows;
  RETURN_IF_ERROR(m.runner->SetLayerInputObserver([&](int layer, const Tensor2D& h) {
    rows.resize(static_cast<size_t>(h.rows * d));
    for (int64_t t = 0; t < h.rows; ++t) {
      const float* src = h.as<float>() + t * h.stride();
      std::copy(src, src + d, rows.begin() + t * d);
    }
    // C += X^T X (upper triangle; mirrored below).
    cblas_dsyrk(CblasRowMajor, CblasUpper, CblasTrans, static_cast<int>(d),
                static_cast<int>(h.rows), 1.0, rows.data(), static_cast<int>(d), 1.0,
                out.c[static_cast<size_t>(layer)].v.data(), static_cast<int>(d));
  }));
  const bool bos = m.config.bos_token_id >= 0;
  const int64_t per_chunk = chunk_tokens - (bos ? 1 : 0);
  for (size_t begin = 0; begin < ids.size(); begin += static_cast<size_t>(per_chunk)) {
    SequenceStep s;
    s.seq_id = static_cast<int64_t>(begin);
    if (bos) s.tokens.push_back(static_cast<int32_t>(m.config.bos_token_id));
    const size_t end = std::min(ids.size(), begin + static_cast<size_t>(per_chunk));
    s.tokens.insert(s.tokens.end(), ids.begin() + static_cast<std::ptrdiff_t>(begin),
                    ids.begin() + static_cast<std::ptrdiff_t>(end));
    const int32_t blocks = (static_cast<int32_t>(s.tokens.size()) + kv.block_size - 1) / kv.block_size;
    for (int32_t b = 0; b < blocks; ++b) s.block_table.push_back(b);
    s.logits = SequenceStep::Logits::kLast;
    RETURN_IF_ERROR(m.runner->Execute({&s, 1}).status());
    out.tokens += static_cast<int64_t>(s.tokens.size());
  }
  RETURN_IF_ERROR(m.runner->SetLayerInputObserver(nullptr));
  for (MatD& c : out.c) {
    for (int64_t i = 0; i < d; ++i) {
      for (int64_t j = 0; j < i; ++j) c.at(i, j) = c.at(j, i);
    }
  }
  return out;
}

}  // namespace lorc::compress
