// lorcserve compress: writes a LoRC compressed model directory (compress/FORMAT.md).
#include <cstdio>
#include <iostream>
#include <optional>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "cli/commands.h"
#include "cli/session.h"
#include "compress/compress.h"

namespace lorc::cli {

namespace {

absl::StatusOr<compress::LayerRanks> ParseRanks(const std::string& v) {
  const std::vector<std::string> parts = absl::StrSplit(v, ':');
  compress::LayerRanks r;
  if (parts.size() != 2 || !absl::SimpleAtoi(parts[0], &r.k_rank) ||
      !absl::SimpleAtoi(parts[1], &r.v_rank)) {
    return absl::InvalidArgumentError(absl::StrCat("--ranks: '", v, "' is not K:V (e.g. 64:32)"));
  }
  return r;
}

}  // namespace

int RunCompress(int argc, char** argv) {
  const std::vector<FlagSpec> flags = {
      {"model", true, "source Hugging Face Llama directory (config.json, safetensors)", "DIR"},
      {"out", true, "output directory (created; must be absent or empty unless --force)", "DIR"},
      {"kv-ratio", true, "target KV bytes per token relative to the full cache, in (0, 1]", "R"},
      {"max-ppl-increase", true, "instead of --kv-ratio: search per-layer ranks with the fewest KV "
                                 "bytes whose calibration perplexity rises by at most P percent", "P"},
      {"search-chunks", true, "--max-ppl-increase: calibration chunks of 512 tokens per trial "
                              "(default 16, spread over the text)", "N"},
      {"ranks", true, "key and value rank of every layer instead of --kv-ratio", "K:V"},
      {"schedule", true, "with --kv-ratio: uniform (default) or progressive (LoRC)", "S"},
      {"whiten", false, "activation-aware (whitened) SVD from calibration second moments"},
      {"calib", true, "calibration text for --whiten and --max-ppl-increase: plain text or JSONL with \"text\" "
                      "(default: the built-in compress/calib/default.txt)", "FILE"},
      {"tp", true, "tensor-parallel degree to check the output for (divides the attention heads; "
                   "divides the KV heads or is a multiple of them)", "N"},
      {"threads", true, "BLAS threads for the SVDs and the calibration runs (default, 0: all cores)", "N"},
      {"force", false, "write into a non-empty --out (files of the same name are replaced)"},
      {"help", false, "show this help"},
  };
  const char* synopsis =
      "--model DIR --out DIR (--kv-ratio R | --max-ppl-increase P | --ranks K:V) "
      "[--schedule uniform|progressive] [--whiten] [--calib FILE] [--search-chunks N] [--tp N] "
      "[--threads N] [--force]";
  int exit_code = 0;
  const std::optional<Args> args = ParseCommand("compress", synopsis, flags, argc, argv, &exit_code);
  if (!args.has_value()) return exit_code;
  if (absl::Status m = CheckModelDirFlag(*args); !m.ok()) return Fail("compress", m);
  if (!args->Has("out")) return Fail("compress", absl::InvalidArgumentError("--out DIR is required"));
  compress::CompressOptions o;
  o.model_dir = args->Get("model");
  o.out_dir = args->Get("out");
  if (args->Has("kv-ratio")) {
    absl::StatusOr<double> r = args->GetDouble("kv-ratio", 1.0);
    if (!r.ok()) return Fail("compress", r.status());
    o.kv_ratio = *r;
  }
  if (args->Has("max-ppl-increase")) {
    absl::StatusOr<double> p = args->GetDouble("max-ppl-increase", 1.0);
    if (!p.ok()) return Fail("compress", p.status());
    o.max_ppl_increase = *p;
  }
  if (args->Has("search-chunks") && !args->Has("max-ppl-increase")) {
    return Fail("compress", absl::InvalidArgumentError("--search-chunks: needs --max-ppl-increase"));
  }
  absl::StatusOr<int64_t> chunks = args->GetIntInRange("search-chunks", o.search_chunks, 1, 1 << 20);
  if (!chunks.ok()) return Fail("compress", chunks.status());
  o.search_chunks = *chunks;
  if (args->Has("ranks")) {
    absl::StatusOr<compress::LayerRanks> r = ParseRanks(args->Get("ranks"));
    if (!r.ok()) return Fail("compress", r.status());
    o.ranks = *r;
  }
  o.schedule = args->Get("schedule", "uniform");
  o.whiten = args->Has("whiten");
  o.calib_path = args->Get("calib");
  if (args->Has("calib") && o.calib_path.empty()) {
    return Fail("compress", absl::InvalidArgumentError("--calib: empty file name"));
  }
  absl::StatusOr<int64_t> tp = args->GetIntInRange("tp", 1, 1, 1 << 20);
  if (!tp.ok()) return Fail("compress", tp.status());
  o.tp = *tp;
  o.force = args->Has("force");
  absl::StatusOr<int32_t> threads = args->GetInt32("threads", 0, 0);
  if (!threads.ok()) return Fail("compress", threads.status());
  o.threads = *threads;
  absl::StatusOr<compress::CompressResult> res =
      compress::Compress(o, [](const std::string& line) { std::fprintf(stderr, "%s\n", line.c_str()); });
  if (!res.ok()) return Fail("compress", res.status());
  std::cout << absl::StrFormat("wrote %s: kv_bytes_ratio %.4f (%s, %s)", o.out_dir,
                               res->kv_bytes_ratio, res->lorc_json["method"].get<std::string>(),
                               res->lorc_json["schedule"].get<std::string>());
  if (o.tp > 1) {
    std::cout << absl::StrFormat(", shards with the KV heads at --tp %d", o.tp);
  }
  std::cout << "\n";
  return 0;
}

}  // namespace lorc::cli
