// lorcserve info: versions, compiled backends, devices seen, and optionally a model's shape.
#include <cblas.h>

#include <iostream>
#include <optional>
#include <thread>

#include "absl/base/config.h"
#include "absl/strings/str_cat.h"
#include "cli/commands.h"
#include "cli/session.h"
#include "kvstore/kv_spec.h"
#include "nlohmann/json.hpp"
#include "backend/cuda_backend.h"
#include "model/model_config.h"

#ifndef LORC_VERSION
#define LORC_VERSION "unknown"
#endif
#include "git_revision.h"  // LORC_GIT_REVISION, generated at build time (cmake/GitRevision.cmake)
#ifndef LORC_GIT_REVISION
#define LORC_GIT_REVISION "unknown"
#endif

namespace lorc::cli {
namespace {

// The model's KV cache at TP 1 in BF16 (the CUDA backend's), LoRC latents included.
absl::StatusOr<KvCacheSpec> Bf16KvSpec(const ModelConfig& c) {
  KvSpecOptions o;
  o.dtype = DType::kBF16;
  return MakeKvCacheSpec(c, o);
}
int64_t BfloatKvBytesPerToken(const ModelConfig& c) {
  absl::StatusOr<KvCacheSpec> s = Bf16KvSpec(c);
  return s.ok() ? s->BytesPerToken() : 2 * 2 * c.num_layers * c.kv_size();
}
// KV bytes per token at TP 1 for each --kv-cache-dtype (scales of fp8 / int8 / int4 counted).
nlohmann::json KvBytesPerTokenByDtype(const ModelConfig& c) {
  nlohmann::json j = nlohmann::json::object();
  for (KvCacheDtype d : {KvCacheDtype::kBf16, KvCacheDtype::kFp8, KvCacheDtype::kInt8,
                         KvCacheDtype::kInt4}) {
    KvSpecOptions o;
    o.kv_cache_dtype = d;
    absl::StatusOr<KvCacheSpec> s = MakeKvCacheSpec(c, o);
    if (s.ok()) j[KvCacheDtypeName(d)] = s->BytesPerToken();
  }
  return j;
}
std::string KvCompression(const ModelConfig& c) {
  absl::StatusOr<KvCacheSpec> s = Bf16KvSpec(c);
  return s.ok() ? s->CompressionName() : std::string(s.status().message());
}

}  // namespace

int RunInfo(int argc, char** argv) {
  const std::vector<FlagSpec> flags = {
      {"model", true, "also describe this model directory's config.json", "DIR"},
      {"json", false, "print one JSON object"},
      {"help", false, "show this help"},
  };
  int exit_code = 0;
  const std::optional<Args> args =
      ParseCommand("info", "[--model DIR] [--json]", flags, argc, argv, &exit_code);
  if (!args.has_value()) return exit_code;
  nlohmann::json j;
  j["version"] = LORC_VERSION;
  j["git_revision"] = LORC_GIT_REVISION;
  j["compiler"] = __VERSION__;
  j["backends"] = nlohmann::json::array({"cpu"});
  if (CudaCompiledIn()) j["backends"].push_back("cuda");
  j["libraries"]["openblas"] = openblas_get_config();
  j["libraries"]["abseil_lts"] = ABSL_LTS_RELEASE_VERSION;
  j["libraries"]["cuda"] = CudaVersionString();
  j["devices"]["cpu"] = {{"hardware_threads", std::thread::hardware_concurrency()},
                         {"blas_threads", openblas_get_num_threads()}};
  absl::StatusOr<std::vector<CudaDeviceInfo>> gpus = ListCudaDevices();
  if (gpus.ok()) {
    j["devices"]["cuda"] = nlohmann::json::array();
    for (const CudaDeviceInfo& d : *gpus) {
      j["devices"]["cuda"].push_back({{"ordinal", d.ordinal},
                                      {"name", d.name},
                                      {"memory_bytes", d.memory_bytes},
                                      {"compute_capability", absl::StrCat(d.compute_major, ".", d.compute_minor)},
                                      {"multiprocessors", d.multiprocessors}});
    }
  } else {
    j["devices"]["cuda_error"] = std::string(gpus.status().message());
  }
  if (args->Has("model")) {
    absl::StatusOr<ModelConfig> c = LoadModelConfig(args->Get("model"));
    if (!c.ok()) return Fail("info", c.status());
    j["model"] = {{"layers", c->num_layers},      {"hidden_size", c->hidden_size},
                  {"heads", c->num_heads},        {"kv_heads", c->num_kv_heads},
                  {"head_dim", c->head_dim},      {"intermediate_size", c->intermediate_size},
                  {"vocab_size", c->vocab_size},  {"parameters", c->NumParameters()},
                  {"max_position_embeddings", c->max_position_embeddings},
                  {"kv_bytes_per_token_bf16", BfloatKvBytesPerToken(*c)},
                  {"kv_bytes_per_token_by_dtype", KvBytesPerTokenByDtype(*c)},
                  {"kv_compression", KvCompression(*c)},
                  {"eos_token_ids", c->eos_token_ids}};
    // generation_config.json's defaults, as given (reported, not applied).
    const GenerationDefaults& g = c->generation;
    nlohmann::json gen = nlohmann::json::object();
    if (g.present) {
      gen["eos_token_ids"] = g.eos_token_ids;
      if (g.do_sample) gen["do_sample"] = *g.do_sample;
      if (g.temperature) gen["temperature"] = *g.temperature;
      if (g.top_p) gen["top_p"] = *g.top_p;
      if (g.top_k) gen["top_k"] = *g.top_k;
      if (g.min_p) gen["min_p"] = *g.min_p;
      if (g.repetition_penalty) gen["repetition_penalty"] = *g.repetition_penalty;
      if (g.max_new_tokens) gen["max_new_tokens"] = *g.max_new_tokens;
    }
    j["model"]["generation_defaults"] = g.present ? gen : nlohmann::json(nullptr);
  }
  if (args->Has("json")) {
    std::cout << j.dump(2) << "\n";
    return 0;
  }
  std::cout << "lorcserve " << LORC_VERSION << " (" << LORC_GIT_REVISION << "), " << __VERSION__ << "\n";
  std::cout << "backends: " << j["backends"].dump() << "\n";
  std::cout << "cpu: " << std::thread::hardware_concurrency() << " hardware threads, OpenBLAS "
            << openblas_get_config() << "\n";
  std::cout << "cuda: " << CudaVersionString() << "\n";
  if (gpus.ok()) {
    for (const CudaDeviceInfo& d : *gpus) {
      std::cout << "  gpu " << d.ordinal << ": " << d.name << ", " << (d.memory_bytes >> 20)
                << " MiB, sm_" << d.compute_major << d.compute_minor << ", " << d.multiprocessors
                << " SMs\n";
    }
    if (gpus->empty()) std::cout << "  no CUDA devices\n";
  } else {
    std::cout << "  no CUDA devices: " << gpus.status().message() << "\n";
  }
  if (j.contains("model")) std::cout << "model: " << j["model"].dump() << "\n";
  return 0;
}

}  // namespace lorc::cli
