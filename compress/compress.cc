#include "compress/compress.h"

#include <cblas.h>

#include <cmath>
#include <cstring>
#include <unistd.h>
#include <filesystem>
#include <limits>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/json_util.h"
#include "common/status_macros.h"
#include "compress/calibration.h"
#include "compress/rank_search.h"
#include "model/lorc_config.h"
#include "model/safetensors_writer.h"

namespace lorc::compress {

namespace fs = std::filesystem;

constexpr char kPartialSuffix[] = ".partial";
// Every file a run writes (as NAME.partial first): the model directory's files it copies, the
// factored checkpoint and lorc.json. Only these NAME.partial files are an interrupted run's
// leftovers; any other file in --out is the user's and is never removed.
constexpr const char* kCopiedFiles[] = {"config.json", "generation_config.json", "tokenizer.json",
                                        "tokenizer_config.json", "special_tokens_map.json"};

bool IsOwnPartial(const std::string& filename) {
  for (const char* f : {"model.safetensors", "lorc.json"}) {
    if (filename == std::string(f) + kPartialSuffix) return true;
  }
  for (const char* f : kCopiedFiles) {
    if (filename == std::string(f) + kPartialSuffix) return true;
  }
  return false;
}

absl::StatusOr<MatD> ReadMatrix(const CheckpointReader& reader, const std::string& name,
                                int64_t rows, int64_t cols) {
  std::vector<float> f(static_cast<size_t>(rows * cols));
  const int64_t shape[2] = {rows, cols};
  RETURN_IF_ERROR(reader.ReadF32(name, shape, absl::MakeSpan(f)));
  // LAPACK's SVD of a matrix with a NaN or inf ends in "dgesdd ... info -4", naming nothing.
  for (size_t i = 0; i < f.size(); ++i) {
    if (!std::isfinite(f[i])) {
      return absl::InvalidArgumentError(absl::StrCat(
          name, ": element [", static_cast<int64_t>(i) / cols, ", ", static_cast<int64_t>(i) % cols, "] is ",
          f[i], ": the checkpoint's weights must be finite to be factored"));
    }
  }
  MatD m(rows, cols);
  std::copy(f.begin(), f.end(), m.v.begin());
  return m;
}

MatD RowBlock(const MatD& m, int64_t begin, int64_t n) {
  MatD out(n, m.cols);
  std::copy_n(m.v.begin() + begin * m.cols, n * m.cols, out.v.begin());
  return out;
}

namespace {

// The fp64 matrix `m` as a [rows, cols] tensor of `dtype` (F32, BF16 or F16; rounded to nearest
// even).
absl::Status AddMatrix(SafetensorsWriter& w, const std::string& name, DType dtype, const MatD& m) {
  std::vector<float> f(m.v.begin(), m.v.end());
  std::vector<uint8_t> bytes;
  absl::Status s = EncodeF32(f, dtype, &bytes);
  if (!s.ok()) return absl::InvalidArgumentError(absl::StrCat("tensor ", name, ": ", s.message()));
  return w.AddBytes(name, dtype, {m.rows, m.cols}, std::move(bytes));
}

std::string LayerName(int64_t l, const char* what) {
  return absl::StrCat("model.layers.", l, ".self_attn.", what, ".weight");
}

absl::StatusOr<DType> OutputDType(const ModelConfig& c) {
  if (c.torch_dtype == "bfloat16") return DType::kBF16;
  if (c.torch_dtype == "float16") return DType::kF16;
  if (c.torch_dtype.empty() || c.torch_dtype == "float32") return DType::kF32;
  return absl::InvalidArgumentError(absl::StrCat("config.json: dtype ", c.torch_dtype,
                                                 " is not bfloat16, float16 or float32"));
}

absl::Status CheckOptions(const CompressOptions& o, const ModelConfig& c) {
  if (static_cast<int>(o.kv_ratio.has_value()) + static_cast<int>(o.ranks.has_value()) +
          static_cast<int>(o.max_ppl_increase.has_value()) != 1) {
    return absl::InvalidArgumentError("give exactly one of --kv-ratio, --max-ppl-increase and --ranks");
  }
  if (o.max_ppl_increase.has_value() && !(*o.max_ppl_increase > 0 && *o.max_ppl_increase <= 1000)) {
    return absl::InvalidArgumentError(absl::StrCat("--max-ppl-increase: ", *o.max_ppl_increase,
                                                   " is outside (0, 1000] (percent)"));
  }
  if (o.max_ppl_increase.has_value() && (c.head_dim % kRankMultiple != 0 || c.head_dim < kRankMultiple)) {
    return absl::InvalidArgumentError(absl::StrCat("--max-ppl-increase: head_dim ", c.head_dim,
                                                   " is not a multiple of ", kRankMultiple));
  }
  if (o.search_chunks < 1) {
    return absl::InvalidArgumentError(absl::StrCat("--search-chunks: ", o.search_chunks, " is not positive"));
  }
  if (o.kv_ratio.has_value() && !(*o.kv_ratio > 0 && *o.kv_ratio <= 1)) {
    return absl::InvalidArgumentError(absl::StrCat("--kv-ratio: ", *o.kv_ratio,
                                                   " is outside (0, 1]"));
  }
  if (o.ranks.has_value()) {
    for (int64_t r : {o.ranks->k_rank, o.ranks->v_rank}) {
      if (r < 1 || r > c.head_dim) {
        return absl::InvalidArgumentError(absl::StrCat("--ranks: rank ", r, " is outside [1, ",
                                                       c.head_dim, "] (head_dim)"));
      }
    }
  }
  if (o.schedule != "uniform" && o.schedule != "progressive") {
    return absl::InvalidArgumentError(absl::StrCat("--schedule: '", o.schedule,
                                                   "' is not uniform or progressive"));
  }
  // Both schedules use ranks of at least kRankMultiple (uniform would silently round up to it).
  if (o.kv_ratio.has_value() &&
      *o.kv_ratio * static_cast<double>(c.head_dim) < static_cast<double>(kRankMultiple) - 1e-9) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--kv-ratio: ", *o.kv_ratio, " is below the smallest ratio ",
        static_cast<double>(kRankMultiple) / static_cast<double>(c.head_dim), " (rank ",
        kRankMultiple, " of head_dim ", c.head_dim, ")"));
  }
  if (o.ranks.has_value() && o.schedule != "uniform") {
    return absl::InvalidArgumentError("--schedule: applies only with --kv-ratio, not --ranks");
  }
  if (!o.calib_path.empty() && !o.whiten && !o.max_ppl_increase.has_value()) {
    return absl::InvalidArgumentError("--calib: needs --whiten or --max-ppl-increase");
  }
  // Before the weights are read (minutes on a large model): a missing file is named at once.
  if (std::error_code ec; !o.calib_path.empty() && !std::filesystem::is_directory(o.calib_path, ec)) {
    RETURN_IF_ERROR(NameFileFlag("calib", CheckReadableFile(o.calib_path)));
  }
  if (o.max_ppl_increase.has_value() && o.schedule != "uniform") {
    return absl::InvalidArgumentError("--schedule: applies only with --kv-ratio, not --max-ppl-increase");
  }
  // Latents are per KV head and shard with the heads; at a degree that is a multiple of the KV
  // heads each rank holds a replica of one KV head (kvstore/README.md).
  if (o.tp < 1 || (c.num_kv_heads % o.tp != 0 && o.tp % c.num_kv_heads != 0) ||
      c.num_heads % o.tp != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--tp: ", o.tp, " must divide the model's ", c.num_heads,
        " attention heads and either divide its ", c.num_kv_heads,
        " KV heads or be a multiple of them (latents shard with the KV heads)"));
  }
  if (o.out_dir.empty()) return absl::InvalidArgumentError("--out DIR is required");
  std::error_code ec;
  // A path under a regular file can never be created.
  for (fs::path p = fs::path(o.out_dir).parent_path(); !p.empty(); p = p.parent_path()) {
    if (fs::is_directory(p, ec)) break;
    if (fs::exists(p, ec)) {
      return absl::InvalidArgumentError(absl::StrCat("--out: ", o.out_dir, ": ", p.string(),
                                                     " is not a directory"));
    }
    if (p == p.parent_path()) break;
  }
  if (fs::exists(o.out_dir, ec)) {
    if (fs::equivalent(o.out_dir, o.model_dir, ec)) {
      return absl::InvalidArgumentError("--out: is the --model directory");
    }
    if (!fs::is_directory(o.out_dir, ec)) {
      return absl::InvalidArgumentError(absl::StrCat("--out: ", o.out_dir, " is not a directory"));
    }
    // Only an interrupted run's leftovers (`*.partial`, never loadable): the retry needs no
    // --force (it removes them when it finishes; a tester's SIGINT left one and the retry was
    // refused).
    bool only_partials = true;
    for (const fs::directory_entry& e : fs::directory_iterator(o.out_dir, ec)) {
      if (!(e.is_regular_file(ec) && IsOwnPartial(e.path().filename().string()))) {
        only_partials = false;
        break;
      }
    }
    if (ec) only_partials = false;
    if (!only_partials && !o.force) {
      return absl::AlreadyExistsError(absl::StrCat(
          "--out: ", o.out_dir, " exists and is not empty (--force writes into it)"));
    }
  }
  return absl::OkStatus();
}

}  // namespace

namespace {

// Everything rank-independent: the per-head SVDs of the (metric-weighted) K and V weights, their
// metric factors (owned here, pointed to by the HeadSvds) and o_proj for the fold.
struct LayerSvds {
  MatD chol;                 // input whitening factor (empty: plain)
  std::vector<MatD> mk, mv;  // per KV head: Cholesky factors of the key / value output metrics
  std::vector<HeadSvd> k, v; // per KV head
  MatD wo;                   // [D, n_q d]
};

absl::StatusOr<std::vector<std::unique_ptr<LayerSvds>>> ComputeSvds(
    const ModelConfig& c, const CheckpointReader& reader, const CalibrationMoments* moments) {
  const int64_t L = c.num_layers, D = c.hidden_size, d = c.head_dim, nkv = c.num_kv_heads,
                nq = c.num_heads, group = nq / nkv;
  const std::vector<float> inv_freq = RopeInverseFrequencies(c);
  std::vector<std::unique_ptr<LayerSvds>> out;
  for (int64_t l = 0; l < L; ++l) {
    auto s = std::make_unique<LayerSvds>();
    ASSIGN_OR_RETURN(const MatD wk, ReadMatrix(reader, LayerName(l, "k_proj"), nkv * d, D));
    ASSIGN_OR_RETURN(const MatD wv, ReadMatrix(reader, LayerName(l, "v_proj"), nkv * d, D));
    ASSIGN_OR_RETURN(s->wo, ReadMatrix(reader, LayerName(l, "o_proj"), D, nq * d));
    if (moments != nullptr) {
      ASSIGN_OR_RETURN(s->chol, WhiteningFactor(moments->c[static_cast<size_t>(l)]));
      ASSIGN_OR_RETURN(const MatD wq, ReadMatrix(reader, LayerName(l, "q_proj"), nq * d, D));
      // HeadSvd points into mk / mv: reserved, so never reallocated.
      s->mk.reserve(static_cast<size_t>(nkv));
      s->mv.reserve(static_cast<size_t>(nkv));
      for (int64_t h = 0; h < nkv; ++h) {
        ASSIGN_OR_RETURN(MatD mk, WhiteningFactor(RopeQueryMetric(
                                      RowBlock(wq, h * group * d, group * d),
                                      moments->c[static_cast<size_t>(l)], inv_freq, kRopeMetricWindow)));
        s->mk.push_back(std::move(mk));
        ASSIGN_OR_RETURN(MatD mv, WhiteningFactor(OProjMetric(s->wo, h * group, group, d)));
        s->mv.push_back(std::move(mv));
      }
    }
    const MatD* lp = moments != nullptr ? &s->chol : nullptr;
    for (int64_t h = 0; h < nkv; ++h) {
      ASSIGN_OR_RETURN(HeadSvd hk, ComputeHeadSvd(RowBlock(wk, h * d, d), lp,
                                                  moments != nullptr ? &s->mk[h] : nullptr));
      ASSIGN_OR_RETURN(HeadSvd hv, ComputeHeadSvd(RowBlock(wv, h * d, d), lp,
                                                  moments != nullptr ? &s->mv[h] : nullptr));
      s->k.push_back(std::move(hk));
      s->v.push_back(std::move(hv));
    }
    out.push_back(std::move(s));
  }
  return out;
}

// Relative truncation error energy of a layer's heads at every rank in [0, d].
std::vector<double> ErrorTable(const std::vector<HeadSvd>& heads, int64_t d) {
  std::vector<double> tail(static_cast<size_t>(d + 1), 0.0);
  double total = 0;
  for (const HeadSvd& h : heads) {
    for (int64_t i = 0; i < static_cast<int64_t>(h.svd.s.size()) && i < d; ++i) {
      const double e = h.svd.s[static_cast<size_t>(i)] * h.svd.s[static_cast<size_t>(i)];
      total += e;
      for (int64_t r = 0; r <= i; ++r) tail[static_cast<size_t>(r)] += e;
    }
  }
  for (double& t : tail) t = total > 0 ? t / total : 0;
  return tail;
}

// Writes OUT (tensors, copied files, lorc.json from `j` with the ranks added) for `ranks`.
absl::Status WriteModel(const CompressOptions& o, const ModelConfig& c, const CheckpointReader& reader,
                        const std::vector<std::unique_ptr<LayerSvds>>& svds,
                        const std::vector<LayerRanks>& ranks, const std::string& out_dir,
                        nlohmann::ordered_json j, const ProgressFn& progress) {
  ASSIGN_OR_RETURN(const DType out_dtype, OutputDType(c));
  const int64_t L = c.num_layers, D = c.hidden_size, d = c.head_dim, nkv = c.num_kv_heads,
                nq = c.num_heads;
  SafetensorsWriter writer;
  for (int64_t l = 0; l < L; ++l) {
    const LayerRanks r = ranks[static_cast<size_t>(l)];
    const LayerSvds& s = *svds[static_cast<size_t>(l)];
    MatD ak(nkv * r.k_rank, D), bk(nkv * d, r.k_rank), av(nkv * r.v_rank, D), o2(D, nq * r.v_rank);
    for (int64_t h = 0; h < nkv; ++h) {
      ASSIGN_OR_RETURN(HeadFactors fk, TruncateHead(s.k[static_cast<size_t>(h)], r.k_rank));
      ASSIGN_OR_RETURN(HeadFactors fv, TruncateHead(s.v[static_cast<size_t>(h)], r.v_rank));
      std::copy(fk.a.v.begin(), fk.a.v.end(), ak.v.begin() + h * r.k_rank * D);
      std::copy(fk.b.v.begin(), fk.b.v.end(), bk.v.begin() + h * d * r.k_rank);
      std::copy(fv.a.v.begin(), fv.a.v.end(), av.v.begin() + h * r.v_rank * D);
      // Query heads of group h: o_proj columns [j*d, (j+1)*d) times B_V,h -> [j*r_v, (j+1)*r_v).
      for (int64_t q = h * (nq / nkv); q < (h + 1) * (nq / nkv); ++q) {
        cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, static_cast<int>(D),
                    static_cast<int>(r.v_rank), static_cast<int>(d), 1.0, &s.wo.v[q * d],
                    static_cast<int>(nq * d), fv.b.v.data(), static_cast<int>(r.v_rank), 0.0,
                    &o2.v[q * r.v_rank], static_cast<int>(nq * r.v_rank));
      }
    }
    RETURN_IF_ERROR(AddMatrix(writer, LayerName(l, "k_proj"), out_dtype, ak));
    RETURN_IF_ERROR(AddMatrix(writer, LayerName(l, "k_up_proj"), out_dtype, bk));
    RETURN_IF_ERROR(AddMatrix(writer, LayerName(l, "v_proj"), out_dtype, av));
    RETURN_IF_ERROR(AddMatrix(writer, LayerName(l, "o_proj"), out_dtype, o2));
    if (progress) {
      progress(absl::StrFormat("layer %d/%d: k_rank %d v_rank %d, relative error K %.4f V %.4f%s",
                               l + 1, L, r.k_rank, r.v_rank,
                               std::sqrt(ErrorTable(s.k, d)[static_cast<size_t>(r.k_rank)]),
                               std::sqrt(ErrorTable(s.v, d)[static_cast<size_t>(r.v_rank)]),
                               o.whiten ? " (whitened)" : ""));
    }
  }
  for (const std::string& name : reader.TensorNames()) {
    if (name.find(".self_attn.k_proj.") != std::string::npos ||
        name.find(".self_attn.v_proj.") != std::string::npos ||
        name.find(".self_attn.o_proj.") != std::string::npos) {
      continue;
    }
    ASSIGN_OR_RETURN(const TensorInfo* t, reader.Find(name));
    RETURN_IF_ERROR(writer.AddView(name, t->dtype, t->shape, t->data, t->nbytes));
  }

  std::error_code ec;
  fs::create_directories(out_dir, ec);
  if (ec) return absl::InternalError(absl::StrCat("--out: cannot create ", out_dir, ": ", ec.message()));
  // Every file goes to NAME.partial first and is renamed into place only once all are written
  // (model.safetensors first, lorc.json last): an interrupted or failed run leaves an existing
  // directory as it was (a new one Compress removes on failure).
  const auto out = [&](const std::string& name) { return fs::path(out_dir) / name; };
  const auto partial = [&](const std::string& name) { return fs::path(out_dir) / (name + kPartialSuffix); };
  std::vector<std::string> names = {"model.safetensors"};
  RETURN_IF_ERROR(writer.Write(partial("model.safetensors").string()));
  for (const char* f : kCopiedFiles) {
    const fs::path src = fs::path(o.model_dir) / f;
    if (!fs::exists(src)) continue;
    fs::copy_file(src, partial(f), fs::copy_options::overwrite_existing, ec);
    if (ec) return absl::InternalError(absl::StrCat("copying ", src.string(), ": ", ec.message()));
    names.push_back(f);
  }
  j["layers"] = nlohmann::ordered_json::array();
  for (const LayerRanks& r : ranks) j["layers"].push_back({{"k_rank", r.k_rank}, {"v_rank", r.v_rank}});
  j["kv_bytes_ratio"] = KvBytesRatio(ranks, d);
  const std::string path = partial("lorc.json").string();
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr) return absl::InternalError(absl::StrCat("cannot create ", path));
  const std::string text = j.dump(2) + "\n";
  const bool ok = std::fwrite(text.data(), 1, text.size(), f) == text.size();
  if (std::fclose(f) != 0 || !ok) return absl::InternalError(absl::StrCat("writing ", path));
  names.push_back("lorc.json");
  // A stale index would point the loader at other shards.
  fs::remove(out("model.safetensors.index.json"), ec);
  for (const std::string& name : names) {
    fs::rename(partial(name), out(name), ec);
    if (ec) {
      return absl::InternalError(absl::StrCat("renaming ", partial(name).string(), ": ", ec.message()));
    }
  }
  return absl::OkStatus();
}

// Removes the NAME.partial files an interrupted run left in `dir` (this writer's names only: a
// tester's own thesis.partial was deleted).
void RemoveStalePartials(const std::string& dir) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return;
  std::vector<fs::path> stale;
  for (const fs::directory_entry& e : fs::directory_iterator(dir, ec)) {
    if (IsOwnPartial(e.path().filename().string())) stale.push_back(e.path());
  }
  for (const fs::path& p : stale) fs::remove(p, ec);
}

// Evenly spaced chunks, at most n of them.
std::vector<std::vector<int32_t>> SpreadChunks(const std::vector<std::vector<int32_t>>& chunks, int64_t n) {
  if (static_cast<int64_t>(chunks.size()) <= n) return chunks;
  std::vector<std::vector<int32_t>> out;
  for (int64_t i = 0; i < n; ++i) {
    out.push_back(chunks[static_cast<size_t>(i * static_cast<int64_t>(chunks.size()) / n)]);
  }
  return out;
}

// Compress after its checks: the factorization and the write into the existing o.out_dir.
absl::StatusOr<CompressResult> CompressInto(const CompressOptions& o, const ModelConfig& c,
                                            const ProgressFn& progress) {
  RemoveStalePartials(o.out_dir);
  RETURN_IF_ERROR(OutputDType(c).status());
  ASSIGN_OR_RETURN(std::unique_ptr<CheckpointReader> reader, CheckpointReader::Open(o.model_dir));
  const int64_t L = c.num_layers, D = c.hidden_size, d = c.head_dim, nkv = c.num_kv_heads;

  // Ranks of the fixed schedules.
  CompressResult res;
  bool checked_finite = false;  // every k_proj and v_proj read (ReadMatrix names a NaN or an inf)
  if (o.ranks.has_value()) {
    res.ranks.assign(static_cast<size_t>(L), *o.ranks);
  } else if (o.kv_ratio.has_value() && o.schedule == "uniform") {
    res.ranks = UniformRanks(L, d, *o.kv_ratio);
  } else if (o.kv_ratio.has_value()) {
    std::vector<double> kk, kv;
    for (int64_t l = 0; l < L; ++l) {
      ASSIGN_OR_RETURN(MatD wk, ReadMatrix(*reader, LayerName(l, "k_proj"), nkv * d, D));
      ASSIGN_OR_RETURN(MatD wv, ReadMatrix(*reader, LayerName(l, "v_proj"), nkv * d, D));
      ASSIGN_OR_RETURN(const Svd sk, ComputeSvd(wk));
      ASSIGN_OR_RETURN(const Svd sv, ComputeSvd(wv));
      const auto kappa = [](const Svd& x) {
        return x.s.back() > 0 ? x.s.front() / x.s.back() : std::numeric_limits<double>::infinity();
      };
      kk.push_back(kappa(sk));
      kv.push_back(kappa(sv));
      if (progress) {
        progress(absl::StrFormat(
            "layer %d/%d: condition number K %.4g (s %.4g..%.4g) V %.4g (s %.4g..%.4g)", l + 1, L,
            kk.back(), sk.s.front(), sk.s.back(), kv.back(), sv.s.front(), sv.s.back()));
      }
    }
    ASSIGN_OR_RETURN(res.ranks, ProgressiveRanks(kk, kv, d, *o.kv_ratio));
    checked_finite = true;
  }

  // Calibration: moments for --whiten, perplexity chunks for --max-ppl-increase.
  std::optional<CalibrationMoments> moments;
  std::optional<CalibrationText> calib;
  std::vector<std::vector<int32_t>> chunks;
  // --max-ppl-increase: the chunks every trial scores and their scored tokens.
  std::vector<std::vector<int32_t>> search_chunks;
  int64_t search_tokens = 0;
  if ((o.whiten || o.max_ppl_increase.has_value()) && !checked_finite) {
    // The projections to factor are read (and a NaN or an infinity in them named) before the
    // calibration runs the model, not after it (the progressive schedule above read them already).
    for (int64_t l = 0; l < L; ++l) {
      for (const char* proj : {"k_proj", "v_proj"}) {
        RETURN_IF_ERROR(ReadMatrix(*reader, LayerName(l, proj), nkv * d, D).status());
      }
    }
  }
  if (o.whiten || o.max_ppl_increase.has_value()) {
    absl::StatusOr<CalibrationText> text = LoadCalibrationText(o.calib_path);
    if (!text.ok()) return NameFileFlag("calib", text.status());
    calib = *std::move(text);
    absl::StatusOr<std::vector<std::vector<int32_t>>> ch = CalibrationChunks(o.model_dir, calib->text);
    if (!ch.ok()) {
      return absl::Status(ch.status().code(),
                          absl::StrCat("--calib ", calib->source, ": ", ch.status().message()));
    }
    chunks = *std::move(ch);
  }
  if (o.whiten) {
    // Fewer token rows than hidden_size leave every C_l singular: the whitening would only
    // protect the few directions seen (worse than plain SVD).
    int64_t tokens = 0;
    for (const auto& ch : chunks) tokens += static_cast<int64_t>(ch.size());
    if (tokens < D) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--calib ", calib->source, ": the text gives ", tokens,
          " tokens; --whiten needs at least hidden_size = ", D, " (better many thousands)"));
    }
  }
  if (o.max_ppl_increase.has_value()) {
    // One short chunk is a legitimate (fast, noisy) search, e.g. in tests; a handful of tokens
    // is not: a 5-token text recorded "-44.8 %" for a model 81 % worse on the evaluation windows.
    search_chunks = SpreadChunks(chunks, o.search_chunks);
    for (const auto& ch : search_chunks) search_tokens += static_cast<int64_t>(ch.size()) - 1;
    if (search_tokens < kMinSearchTokens) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--calib ", calib->source, ": the text gives ", search_tokens, " scored tokens; --max-ppl-increase needs at "
          "least ", kMinSearchTokens, " to measure a perplexity change (better --search-chunks x 512)"));
    }
    if (static_cast<int64_t>(chunks.size()) < o.search_chunks && progress) {
      progress(absl::StrCat("warning: --search-chunks ", o.search_chunks, ": the calibration text gives only ",
                            chunks.size(), chunks.size() == 1 ? " chunk" : " chunks", " (", search_tokens,
                            " scored tokens); using ", chunks.size()));
    }
  }
  if (o.whiten) {
    ASSIGN_OR_RETURN(moments, ComputeCalibrationMoments(o.model_dir, chunks));
    if (progress) progress(absl::StrCat("calibration: ", moments->tokens, " tokens from ", calib->source));
  }
  ASSIGN_OR_RETURN(const auto svds, ComputeSvds(c, *reader, moments.has_value() ? &*moments : nullptr));

  ASSIGN_OR_RETURN(const std::string config_text,
                   ReadFileToString((fs::path(o.model_dir) / "config.json").string()));
  nlohmann::ordered_json j;
  j["format"] = "lorcserve-lorc";
  j["version"] = 1;
  j["method"] = o.whiten ? "whitened-svd" : "svd";
  j["schedule"] = o.max_ppl_increase.has_value() ? "search" : o.ranks.has_value() ? "uniform" : o.schedule;
  if (o.max_ppl_increase.has_value()) {
    j["target"] = {{"max_ppl_increase_pct", *o.max_ppl_increase}};
  } else {
    j["target"] = {{"kv_ratio", o.kv_ratio.has_value() ? *o.kv_ratio : KvBytesRatio(res.ranks, d)}};
  }
  if (o.whiten) j["objective"] = {{"k", "rope-scores"}, {"v", "o_proj-output"}};
  j["num_layers"] = L;
  j["num_kv_heads"] = nkv;
  j["head_dim"] = d;
  j["layers"] = nullptr;          // WriteModel fills these two
  j["kv_bytes_ratio"] = nullptr;
  if (moments.has_value()) {
    j["calibration"] = {{"source", calib->source}, {"tokens", moments->tokens}};
  } else if (calib.has_value()) {
    j["calibration"] = {{"source", calib->source}, {"tokens", nullptr}};
  } else {
    j["calibration"] = nullptr;
  }
  j["source_model"] = {{"dir", o.model_dir}, {"config_sha256", Sha256Hex(config_text)}};

  if (o.max_ppl_increase.has_value()) {
    ASSIGN_OR_RETURN(const CalibrationPpl base, ComputeCalibrationPerplexity(o.model_dir, search_chunks));
    if (progress) {
      progress(absl::StrFormat("search: uncompressed calibration ppl %.4f over %d tokens (%d chunks)",
                               base.ppl, search_tokens, search_chunks.size()));
    }
    RankSearchInput in;
    in.head_dim = d;
    for (const auto& s : svds) {
      in.k_err.push_back(ErrorTable(s->k, d));
      in.v_err.push_back(ErrorTable(s->v, d));
    }
    in.base_ppl = base.ppl;
    in.max_increase_pct = *o.max_ppl_increase;
    const fs::path trial_dir = fs::temp_directory_path() /
                               absl::StrCat("lorc_search_", ::getpid(), "_", reinterpret_cast<uintptr_t>(&in));
    const auto measure = [&](const std::vector<LayerRanks>& ranks) -> absl::StatusOr<double> {
      RETURN_IF_ERROR(WriteModel(o, c, *reader, svds, ranks, trial_dir.string(), j, nullptr));
      ASSIGN_OR_RETURN(const CalibrationPpl p, ComputeCalibrationPerplexity(trial_dir.string(), search_chunks));
      return p.ppl;
    };
    absl::StatusOr<RankSearchResult> found = SearchRanks(in, measure, progress);
    std::error_code ec;
    fs::remove_all(trial_dir, ec);
    if (!found.ok()) return found.status();
    res.ranks = found->ranks;
    j["search"] = {{"calibration_tokens", search_tokens},
                   {"uncompressed_ppl", base.ppl},
                   {"compressed_ppl", found->ppl},
                   {"ppl_increase_pct", 100.0 * (found->ppl / base.ppl - 1.0)},
                   {"trials", found->trials}};
  }
  res.kv_bytes_ratio = KvBytesRatio(res.ranks, d);
  RETURN_IF_ERROR(WriteModel(o, c, *reader, svds, res.ranks, o.out_dir, j, progress));
  j["layers"] = nlohmann::ordered_json::array();
  for (const LayerRanks& r : res.ranks) j["layers"].push_back({{"k_rank", r.k_rank}, {"v_rank", r.v_rank}});
  j["kv_bytes_ratio"] = res.kv_bytes_ratio;
  res.lorc_json = std::move(j);
  return res;
}

}  // namespace

absl::StatusOr<CompressResult> Compress(const CompressOptions& o, const ProgressFn& progress) {
  std::error_code model_ec;
  if (fs::exists(fs::path(o.model_dir) / "lorc.json", model_ec)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--model: ", o.model_dir, " is already LoRC-compressed (lorc.json); compress the source model"));
  }
  ASSIGN_OR_RETURN(const ModelConfig c, LoadModelConfig(o.model_dir));
  RETURN_IF_ERROR(CheckOptions(o, c));
  // The files copied at the end are checked now, not after the factorization (a FIFO as
  // tokenizer.json failed the copy after every SVD; a tester).
  for (const char* f : kCopiedFiles) {
    const absl::Status readable = CheckReadableFile((fs::path(o.model_dir) / f).string());
    if (!readable.ok() && !absl::IsNotFound(readable)) {  // optional files may be missing
      return absl::Status(readable.code(), absl::StrCat("--model: ", readable.message()));
    }
  }
  if (o.threads < 0) {
    return absl::InvalidArgumentError(absl::StrCat("--threads: ", o.threads, " is negative"));
  }
  if (o.threads > 0) openblas_set_num_threads(o.threads);
  // --out is made now, not after minutes of factorization (found by a tester: --out /proc/foo
  // failed only at the end, as INTERNAL); a failed run removes it again when it made it.
  std::error_code ec;
  const bool created = !fs::exists(o.out_dir, ec);
  fs::create_directories(o.out_dir, ec);
  if (ec) {
    return absl::InvalidArgumentError(absl::StrCat("--out: cannot create ", o.out_dir, ": ", ec.message()));
  }
  absl::StatusOr<CompressResult> res = CompressInto(o, c, progress);
  if (!res.ok() && created) fs::remove_all(o.out_dir, ec);
  return res;
}

absl::Status ValidateLorcJson(const nlohmann::json& j, const ModelConfig& c) {
  // The loader's validation (model/lorc_config.h), plus the fields the loader treats as optional
  // but this writer always records.
  RETURN_IF_ERROR(LorcConfigFromJson(j, c.num_layers, c.num_kv_heads, c.head_dim).status());
  for (const char* field : {"kv_bytes_ratio", "calibration", "source_model"}) {
    if (!j.contains(field)) return absl::InvalidArgumentError(absl::StrCat("lorc.json: ", field, ": missing"));
  }
  return absl::OkStatus();
}

}  // namespace lorc::compress
