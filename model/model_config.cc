#include "model/model_config.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <system_error>
#include <vector>
#include <cstdint>
#include <exception>
#include <numbers>
#include <optional>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/strings/strip.h"
#include "common/defaults.h"
#include "common/json_fields.h"
#include "common/json_util.h"
#include "common/status_macros.h"

namespace lorc {
namespace {

using json = nlohmann::json;

// Upper bound for every size field, so that products such as num_heads * head_dim or
// vocab_size * hidden_size cannot overflow int64.
constexpr int64_t kMaxDimension = int64_t{1} << 31;
// Upper bound for the parameter count (about 1.1e15, a thousand times today's largest models):
// fields each within kMaxDimension can still multiply past int64 (hidden_size *
// intermediate_size * num_hidden_layers), and what is derived from them (the parameter count,
// KV bytes per token over all layers) must fit.
constexpr int64_t kMaxParameters = int64_t{1} << 50;
// Upper bounds for the two sizes that per-layer and per-dimension tables are built from (the KV
// cache spec's per-layer widths, a LoRC rank schedule, the RoPE frequency table): without them a
// 200-byte config.json could ask for a 2^30-entry table (fuzz/config_json_fuzz found both:
// malloc(2^31) from head_dim 2^30 and from num_hidden_layers 2^30). Far above any Llama-family
// model (Llama-3.1-405B: 126 layers, head_dim 128; the widest heads in use are 256).
constexpr int64_t kMaxLayers = 1024;
constexpr int64_t kMaxHeadDim = 1024;

// ModelConfig::NumParameters in 128-bit arithmetic: every factor is below 2^31 (config fields)
// or a LoRC rank (<= head_dim), so no term overflows, and the sum of at most 2^31 layers of them
// stays far below 2^127.
__int128 ParameterCount(const ModelConfig& c) {
  using I = __int128;
  const I h = c.hidden_size, q = I{c.num_heads} * c.head_dim, kv = I{c.num_kv_heads} * c.head_dim;
  const I mlp = 3 * h * c.intermediate_size;
  const I norms = 2 * h;
  const I embeddings = I{c.vocab_size} * h;
  I layers = I{c.num_layers} * (h * q + 2 * h * kv + q * h + mlp + norms);
  if (c.lorc && static_cast<int64_t>(c.lorc->layers.size()) == c.num_layers) {
    // LoRC factors (compress/FORMAT.md): q, A_K, B_K, A_V and the r_v-wide o_proj per layer.
    layers = 0;
    for (const LorcLayerRanks& r : c.lorc->layers) {
      layers += h * q + I{c.num_kv_heads} * r.k_rank * h + kv * r.k_rank +
                I{c.num_kv_heads} * r.v_rank * h + h * c.num_heads * r.v_rank + mlp + norms;
    }
  }
  return embeddings + layers + h /* final norm */ + (c.tie_word_embeddings ? 0 : embeddings);
}

// InvalidArgument when the parameter count exceeds kMaxParameters (`file`: "config" or the
// lorc.json path), naming the size fields it comes from.
absl::Status CheckParameterCount(const ModelConfig& c, absl::string_view file) {
  const __int128 n = ParameterCount(c);
  if (n <= kMaxParameters) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(
      file, ": the model would have ", static_cast<double>(n),
      " parameters, more than the limit of 2^50 (from vocab_size ", c.vocab_size,
      ", hidden_size ", c.hidden_size, ", intermediate_size ", c.intermediate_size,
      ", num_hidden_layers ", c.num_layers, ", num_attention_heads ", c.num_heads,
      ", num_key_value_heads ", c.num_kv_heads, ", head_dim ", c.head_dim, ")"));
}

// Field path for messages: "config field 'hidden_size'" or "config field 'rope_scaling.factor'".
// The generic readers in common/json_fields.h prefix their messages with it.
std::string ConfigField(absl::string_view ctx, absl::string_view key) {
  return absl::StrCat("config field '", SubField(std::string(ctx), std::string(key)), "'");
}

absl::StatusOr<std::optional<int64_t>> OptInt(const json& obj, absl::string_view ctx,
                                              absl::string_view key) {
  const json* v = FindNonNull(obj, std::string(key));
  if (v == nullptr) return std::optional<int64_t>();
  ASSIGN_OR_RETURN(int64_t x, JsonAsInt64(*v, ConfigField(ctx, key)));
  return std::optional<int64_t>(x);
}

absl::StatusOr<std::optional<double>> OptDouble(const json& obj, absl::string_view ctx,
                                                absl::string_view key) {
  const json* v = FindNonNull(obj, std::string(key));
  if (v == nullptr) return std::optional<double>();
  ASSIGN_OR_RETURN(double x, JsonAsDouble(*v, ConfigField(ctx, key)));
  return std::optional<double>(x);
}

absl::StatusOr<std::optional<bool>> OptBool(const json& obj, absl::string_view key) {
  const json* v = FindNonNull(obj, std::string(key));
  if (v == nullptr) return std::optional<bool>();
  ASSIGN_OR_RETURN(bool x, JsonAsBool(*v, ConfigField("", key)));
  return std::optional<bool>(x);
}

absl::StatusOr<std::optional<std::string>> OptString(const json& obj, absl::string_view ctx,
                                                     absl::string_view key) {
  const json* v = FindNonNull(obj, std::string(key));
  if (v == nullptr) return std::optional<std::string>();
  ASSIGN_OR_RETURN(std::string x, JsonAsString(*v, ConfigField(ctx, key)));
  return std::optional<std::string>(std::move(x));
}

absl::StatusOr<int64_t> RequiredInt(const json& obj, absl::string_view key) {
  ASSIGN_OR_RETURN(std::optional<int64_t> v, OptInt(obj, "", key));
  if (!v.has_value()) return MissingFieldError(ConfigField("", key));
  return *v;
}

absl::Status CheckPositive(absl::string_view field, int64_t v, int64_t limit = kMaxDimension) {
  if (v <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("config field '", field, "' must be positive, got ", v));
  }
  if (v > limit) {
    return absl::InvalidArgumentError(absl::StrCat("config field '", field, "' is too large: ",
                                                   v, " (limit ", limit, ")"));
  }
  return absl::OkStatus();
}

absl::StatusOr<double> RequiredRopeDouble(const json& params, absl::string_view ctx,
                                          absl::string_view key, absl::string_view rope_type) {
  ASSIGN_OR_RETURN(std::optional<double> v, OptDouble(params, ctx, key));
  if (!v.has_value()) {
    return absl::InvalidArgumentError(absl::StrCat(ConfigField(ctx, key),
                                                   " is required for rope_type '", rope_type, "'"));
  }
  return *v;
}

absl::Status CheckTokenId(absl::string_view file, absl::string_view field, int64_t id,
                          int64_t vocab_size) {
  if (id >= 0 && id < vocab_size) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(file, " field '", field, "' is ", id,
                                                 ", outside the vocabulary [0, ", vocab_size,
                                                 ") (vocab_size)"));
}

// `eos_token_id`: one id or a list of ids (config.json and generation_config.json alike).
// `file` prefixes the field in messages: "config" or "generation config".
absl::StatusOr<std::vector<int64_t>> ParseEosIds(const json& j, absl::string_view file,
                                                 int64_t vocab_size) {
  std::vector<int64_t> ids;
  const json* eos = FindNonNull(j, "eos_token_id");
  if (eos == nullptr) return ids;
  const std::string prefix = absl::StrCat(file, " field '");
  auto one = [&](const json& v, const std::string& field) -> absl::Status {
    ASSIGN_OR_RETURN(int64_t id, JsonAsInt64(v, absl::StrCat(prefix, field, "'")));
    RETURN_IF_ERROR(CheckTokenId(file, field, id, vocab_size));
    ids.push_back(id);
    return absl::OkStatus();
  };
  if (eos->is_array()) {
    for (size_t i = 0; i < eos->size(); ++i) {
      RETURN_IF_ERROR(one((*eos)[i], IndexField("eos_token_id", i)));
    }
  } else {
    RETURN_IF_ERROR(one(*eos, "eos_token_id"));
  }
  return ids;
}

// RoPE settings: `rope_parameters` (newer transformers) or top-level `rope_theta` +
// `rope_scaling` (older checkpoints).
absl::StatusOr<RopeConfig> ParseRope(const json& j) {
  RopeConfig rope;
  const json* rope_parameters = FindNonNull(j, "rope_parameters");
  const json* rope_scaling = FindNonNull(j, "rope_scaling");
  const json* params = nullptr;
  std::string ctx;
  if (rope_parameters != nullptr) {
    RETURN_IF_ERROR(ExpectObject(*rope_parameters, ConfigField("", "rope_parameters")));
    params = rope_parameters;
    ctx = "rope_parameters";
  } else if (rope_scaling != nullptr) {
    RETURN_IF_ERROR(ExpectObject(*rope_scaling, ConfigField("", "rope_scaling")));
    params = rope_scaling;
    ctx = "rope_scaling";
  }

  // Theta: inside rope_parameters when given there, else top-level, else 10000.
  std::optional<double> theta;
  if (rope_parameters != nullptr) {
    ASSIGN_OR_RETURN(theta, OptDouble(*rope_parameters, "rope_parameters", "rope_theta"));
  }
  if (!theta.has_value()) {
    ASSIGN_OR_RETURN(theta, OptDouble(j, "", "rope_theta"));
  }
  if (theta.has_value()) rope.theta = *theta;
  if (!(rope.theta > 0.0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("config field 'rope_theta' must be positive, got ", rope.theta));
  }
  if (params == nullptr) return rope;

  // `rope_type`, or the legacy `type` key.
  ASSIGN_OR_RETURN(std::optional<std::string> type, OptString(*params, ctx, "rope_type"));
  if (!type.has_value()) {
    ASSIGN_OR_RETURN(type, OptString(*params, ctx, "type"));
  }
  const std::string rope_type = type.value_or("default");

  if (rope_type == "default") {
    rope.type = RopeType::kDefault;
    return rope;
  }
  if (rope_type == "linear") {
    rope.type = RopeType::kLinear;
    ASSIGN_OR_RETURN(rope.factor, RequiredRopeDouble(*params, ctx, "factor", rope_type));
    if (!(rope.factor > 0.0)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "config field '", SubField(ctx, "factor"), "' must be positive, got ", rope.factor));
    }
    return rope;
  }
  if (rope_type == "llama3") {
    rope.type = RopeType::kLlama3;
    ASSIGN_OR_RETURN(rope.factor, RequiredRopeDouble(*params, ctx, "factor", rope_type));
    ASSIGN_OR_RETURN(rope.low_freq_factor,
                     RequiredRopeDouble(*params, ctx, "low_freq_factor", rope_type));
    ASSIGN_OR_RETURN(rope.high_freq_factor,
                     RequiredRopeDouble(*params, ctx, "high_freq_factor", rope_type));
    ASSIGN_OR_RETURN(std::optional<int64_t> original,
                     OptInt(*params, ctx, "original_max_position_embeddings"));
    if (!original.has_value()) {
      return absl::InvalidArgumentError(
          absl::StrCat("config field '", SubField(ctx, "original_max_position_embeddings"),
                       "' is required for rope_type 'llama3'"));
    }
    rope.original_max_position_embeddings = *original;
    if (!(rope.factor > 0.0)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "config field '", SubField(ctx, "factor"), "' must be positive, got ", rope.factor));
    }
    if (!(rope.low_freq_factor > 0.0)) {
      return absl::InvalidArgumentError(
          absl::StrCat("config field '", SubField(ctx, "low_freq_factor"),
                       "' must be positive, got ", rope.low_freq_factor));
    }
    if (!(rope.high_freq_factor > rope.low_freq_factor)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "config field '", SubField(ctx, "high_freq_factor"), "' (", rope.high_freq_factor,
          ") must be greater than '", SubField(ctx, "low_freq_factor"), "' (",
          rope.low_freq_factor, ")"));
    }
    RETURN_IF_ERROR(CheckPositive(SubField(ctx, "original_max_position_embeddings"),
                                  rope.original_max_position_embeddings));
    return rope;
  }
  return absl::UnimplementedError(
      absl::StrCat("config field '", SubField(ctx, "rope_type"), "': rope_type '", rope_type,
                   "' is not supported (supported: default, linear, llama3)"));
}

absl::StatusOr<ModelConfig> ParseConfig(const json& j) {
  if (!j.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat("config must be a JSON object, got ", j.type_name()));
  }
  ModelConfig c;

  // Architecture.
  ASSIGN_OR_RETURN(std::optional<std::string> model_type, OptString(j, "", "model_type"));
  c.model_type = model_type.value_or("llama");  // absent: assume llama
  if (c.model_type == "mistral") {
    if (const json* sw = FindNonNull(j, "sliding_window"); sw != nullptr) {
      return absl::UnimplementedError(absl::StrCat(
          "config field 'sliding_window': mistral models with sliding-window attention are not "
          "supported (sliding_window = ",
          DescribeJson(*sw), "); only sliding_window null is accepted"));
    }
  } else if (c.model_type != "llama") {
    return absl::InvalidArgumentError(absl::StrCat(
        "config field 'model_type' must be \"llama\" (or \"mistral\" without sliding window), "
        "got \"",
        c.model_type, "\""));
  }
  for (absl::string_view field : {"attention_bias", "mlp_bias"}) {
    ASSIGN_OR_RETURN(std::optional<bool> bias, OptBool(j, field));
    if (bias.value_or(false)) {
      return absl::UnimplementedError(absl::StrCat(
          "config field '", field, "' is true: bias terms in linear layers are not supported"));
    }
  }
  ASSIGN_OR_RETURN(std::optional<std::string> act, OptString(j, "", "hidden_act"));
  if (act.has_value() && *act != "silu") {
    return absl::UnimplementedError(absl::StrCat("config field 'hidden_act' is \"", *act,
                                                 "\": only \"silu\" is supported"));
  }

  // Sizes.
  ASSIGN_OR_RETURN(c.vocab_size, RequiredInt(j, "vocab_size"));
  ASSIGN_OR_RETURN(c.hidden_size, RequiredInt(j, "hidden_size"));
  ASSIGN_OR_RETURN(c.intermediate_size, RequiredInt(j, "intermediate_size"));
  ASSIGN_OR_RETURN(c.num_layers, RequiredInt(j, "num_hidden_layers"));
  ASSIGN_OR_RETURN(c.num_heads, RequiredInt(j, "num_attention_heads"));
  RETURN_IF_ERROR(CheckPositive("vocab_size", c.vocab_size));
  RETURN_IF_ERROR(CheckPositive("hidden_size", c.hidden_size));
  RETURN_IF_ERROR(CheckPositive("intermediate_size", c.intermediate_size));
  RETURN_IF_ERROR(CheckPositive("num_hidden_layers", c.num_layers, kMaxLayers));
  RETURN_IF_ERROR(CheckPositive("num_attention_heads", c.num_heads));

  ASSIGN_OR_RETURN(std::optional<int64_t> kv_heads, OptInt(j, "", "num_key_value_heads"));
  c.num_kv_heads = kv_heads.value_or(c.num_heads);
  RETURN_IF_ERROR(CheckPositive("num_key_value_heads", c.num_kv_heads));
  if (c.num_heads % c.num_kv_heads != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "config field 'num_attention_heads' (", c.num_heads,
        ") must be divisible by 'num_key_value_heads' (", c.num_kv_heads, ")"));
  }

  ASSIGN_OR_RETURN(std::optional<int64_t> head_dim, OptInt(j, "", "head_dim"));
  if (head_dim.has_value()) {
    c.head_dim = *head_dim;
  } else {
    if (c.hidden_size % c.num_heads != 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "config field 'hidden_size' (", c.hidden_size,
          ") must be divisible by 'num_attention_heads' (", c.num_heads,
          ") when 'head_dim' is not given"));
    }
    c.head_dim = c.hidden_size / c.num_heads;
  }
  RETURN_IF_ERROR(CheckPositive("head_dim", c.head_dim, kMaxHeadDim));
  if (c.head_dim % 2 != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "config field 'head_dim' must be even for rotary embeddings, got ", c.head_dim));
  }
  if (c.num_heads * c.head_dim > kMaxDimension) {
    return absl::InvalidArgumentError(
        absl::StrCat("config fields 'num_attention_heads' * 'head_dim' = ",
                     c.num_heads * c.head_dim, " is too large"));
  }

  ASSIGN_OR_RETURN(std::optional<int64_t> max_pos, OptInt(j, "", "max_position_embeddings"));
  c.max_position_embeddings = max_pos.value_or(defaults::kMaxModelLen);
  RETURN_IF_ERROR(CheckPositive("max_position_embeddings", c.max_position_embeddings));

  ASSIGN_OR_RETURN(std::optional<double> eps, OptDouble(j, "", "rms_norm_eps"));
  c.rms_norm_eps = eps.value_or(1e-6);
  if (!(c.rms_norm_eps > 0.0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("config field 'rms_norm_eps' must be positive, got ", c.rms_norm_eps));
  }

  ASSIGN_OR_RETURN(std::optional<bool> tie, OptBool(j, "tie_word_embeddings"));
  c.tie_word_embeddings = tie.value_or(false);

  // Special tokens: ids inside the vocabulary [0, vocab_size).
  ASSIGN_OR_RETURN(std::optional<int64_t> bos, OptInt(j, "", "bos_token_id"));
  if (bos.has_value()) {
    RETURN_IF_ERROR(CheckTokenId("config", "bos_token_id", *bos, c.vocab_size));
    c.bos_token_id = *bos;
  }
  ASSIGN_OR_RETURN(c.eos_token_ids, ParseEosIds(j, "config", c.vocab_size));

  // Weight dtype: newer transformers write `dtype`, older `torch_dtype`.
  ASSIGN_OR_RETURN(std::optional<std::string> dtype, OptString(j, "", "dtype"));
  std::string dtype_field = "dtype";
  if (!dtype.has_value()) {
    ASSIGN_OR_RETURN(dtype, OptString(j, "", "torch_dtype"));
    dtype_field = "torch_dtype";
  }
  if (dtype.has_value()) {
    if (*dtype != "bfloat16" && *dtype != "float16" && *dtype != "float32") {
      return absl::InvalidArgumentError(absl::StrCat(
          "config field '", dtype_field,
          "' must be \"bfloat16\", \"float16\" or \"float32\", got \"", *dtype, "\""));
    }
    c.torch_dtype = *dtype;
  }

  ASSIGN_OR_RETURN(c.rope, ParseRope(j));
  RETURN_IF_ERROR(CheckParameterCount(c, "config"));
  return c;
}

}  // namespace

int64_t ModelConfig::NumParameters() const {
  const __int128 n = ParameterCount(*this);
  return n > INT64_MAX ? INT64_MAX : static_cast<int64_t>(n);
}

absl::StatusOr<ModelConfig> ModelConfigFromJson(const nlohmann::json& j) {
  // The parser uses only non-throwing accessors; this is a last line of defence.
  try {
    return ParseConfig(j);
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat("config: malformed JSON value: ", e.what()));
  }
}

absl::StatusOr<GenerationDefaults> GenerationDefaultsFromJson(const nlohmann::json& j,
                                                              int64_t vocab_size) {
  RETURN_IF_ERROR(ExpectObject(j, "generation config"));
  GenerationDefaults g;
  g.present = true;
  ASSIGN_OR_RETURN(g.eos_token_ids, ParseEosIds(j, "generation config", vocab_size));
  auto field = [](absl::string_view key) {
    return absl::StrCat("generation config field '", key, "'");
  };
  auto range = [&](absl::string_view key, double v, absl::string_view want) {
    return absl::InvalidArgumentError(absl::StrCat(field(key), " must be ", want, ", got ", v));
  };
  auto opt_double = [&](absl::string_view key) -> absl::StatusOr<std::optional<double>> {
    const json* v = FindNonNull(j, std::string(key));
    if (v == nullptr) return std::optional<double>();
    ASSIGN_OR_RETURN(double x, JsonAsDouble(*v, field(key)));
    return std::optional<double>(x);
  };
  auto opt_int = [&](absl::string_view key) -> absl::StatusOr<std::optional<int64_t>> {
    const json* v = FindNonNull(j, std::string(key));
    if (v == nullptr) return std::optional<int64_t>();
    ASSIGN_OR_RETURN(int64_t x, JsonAsInt64(*v, field(key)));
    return std::optional<int64_t>(x);
  };
  if (const json* v = FindNonNull(j, "do_sample"); v != nullptr) {
    ASSIGN_OR_RETURN(g.do_sample, JsonAsBool(*v, field("do_sample")));
  }
  ASSIGN_OR_RETURN(g.temperature, opt_double("temperature"));
  if (g.temperature.has_value() && *g.temperature < 0) return range("temperature", *g.temperature, ">= 0");
  ASSIGN_OR_RETURN(g.top_p, opt_double("top_p"));
  if (g.top_p.has_value() && !(*g.top_p > 0 && *g.top_p <= 1)) return range("top_p", *g.top_p, "in (0, 1]");
  ASSIGN_OR_RETURN(g.min_p, opt_double("min_p"));
  if (g.min_p.has_value() && !(*g.min_p >= 0 && *g.min_p <= 1)) return range("min_p", *g.min_p, "in [0, 1]");
  ASSIGN_OR_RETURN(g.repetition_penalty, opt_double("repetition_penalty"));
  if (g.repetition_penalty.has_value() && !(*g.repetition_penalty > 0)) {
    return range("repetition_penalty", *g.repetition_penalty, "> 0");
  }
  ASSIGN_OR_RETURN(g.top_k, opt_int("top_k"));
  if (g.top_k.has_value() && *g.top_k < 0) return range("top_k", *g.top_k, ">= 0");
  ASSIGN_OR_RETURN(g.max_new_tokens, opt_int("max_new_tokens"));
  if (g.max_new_tokens.has_value() && *g.max_new_tokens < 1) {
    return range("max_new_tokens", *g.max_new_tokens, ">= 1");
  }
  return g;
}

absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& model_dir) {
  std::string dir = model_dir;
  if (!dir.empty() && dir.back() != '/') dir += '/';
  const std::string path = dir + "config.json";
  ASSIGN_OR_RETURN(nlohmann::json j, ReadJsonFile(path));
  absl::StatusOr<ModelConfig> config = ModelConfigFromJson(j);
  if (!config.ok()) {
    return absl::Status(config.status().code(),
                        absl::StrCat(path, ": ", config.status().message()));
  }
  // generation_config.json (optional), as transformers' GenerationConfig.from_pretrained.
  std::error_code ec;
  // lorc.json (optional): the LoRC compressed K/V of this directory (compress/FORMAT.md).
  const std::string lorc_path = dir + kLorcJsonName;
  if (std::filesystem::exists(lorc_path, ec)) {
    ASSIGN_OR_RETURN(nlohmann::json lj, ReadJsonFile(lorc_path));
    absl::StatusOr<LorcConfig> lorc = [&]() -> absl::StatusOr<LorcConfig> {
      try {
        return LorcConfigFromJson(lj, config->num_layers, config->num_kv_heads, config->head_dim);
      } catch (const std::exception& e) {
        return absl::InvalidArgumentError(absl::StrCat("lorc.json: malformed JSON value: ", e.what()));
      }
    }();
    if (!lorc.ok()) {
      // The validator's messages start with "lorc.json: "; name the full path instead.
      absl::string_view msg = lorc.status().message();
      absl::ConsumePrefix(&msg, "lorc.json: ");
      return absl::Status(lorc.status().code(), absl::StrCat(lorc_path, ": ", msg));
    }
    config->lorc = *std::move(lorc);
    RETURN_IF_ERROR(CheckParameterCount(*config, lorc_path));
  }
  const std::string gen_path = dir + "generation_config.json";
  if (!std::filesystem::exists(gen_path, ec)) return config;
  ASSIGN_OR_RETURN(nlohmann::json gj, ReadJsonFile(gen_path));
  absl::StatusOr<GenerationDefaults> gen = [&]() -> absl::StatusOr<GenerationDefaults> {
    try {
      return GenerationDefaultsFromJson(gj, config->vocab_size);
    } catch (const std::exception& e) {
      return absl::InvalidArgumentError(absl::StrCat("malformed JSON value: ", e.what()));
    }
  }();
  if (!gen.ok()) {
    return absl::Status(gen.status().code(), absl::StrCat(gen_path, ": ", gen.status().message()));
  }
  for (int64_t id : gen->eos_token_ids) {
    if (std::find(config->eos_token_ids.begin(), config->eos_token_ids.end(), id) ==
        config->eos_token_ids.end()) {
      config->eos_token_ids.push_back(id);
    }
  }
  config->generation = *std::move(gen);
  return config;
}

// Float32 semantics, following transformers (torch float32 tensors):
//   exponent  = float(2i) / float(dim)                 (float32 division)
//   base^exp  = pow(double(float(theta)), double(exponent)) rounded to float32
//               (a correctly rounded powf for float inputs; torch's float pow is within 1 ulp)
//   inv_freq  = 1.0f / (base^exp)                        (float32 division)
// Scaling (linear, llama3) is then applied with float32 arithmetic, scalars cast to float32,
// operation order as in `_compute_linear_scaling_rope_parameters` / `_compute_llama3_parameters`.
std::vector<float> RopeInverseFrequencies(const ModelConfig& config) {
  const int64_t dim = config.head_dim;
  const int64_t half = dim / 2;
  std::vector<float> inv(static_cast<size_t>(half > 0 ? half : 0));
  const float base = static_cast<float>(config.rope.theta);
  const RopeConfig& r = config.rope;

  const float factor = static_cast<float>(r.factor);
  const float low = static_cast<float>(r.low_freq_factor);
  const float old_ctx = static_cast<float>(r.original_max_position_embeddings);
  // Python computes these in double; torch then compares/divides against float32 tensors.
  const float low_freq_wavelen = static_cast<float>(
      static_cast<double>(r.original_max_position_embeddings) / r.low_freq_factor);
  const float high_freq_wavelen = static_cast<float>(
      static_cast<double>(r.original_max_position_embeddings) / r.high_freq_factor);
  const float band = static_cast<float>(r.high_freq_factor - r.low_freq_factor);
  const float two_pi = static_cast<float>(2.0 * std::numbers::pi);

  for (int64_t i = 0; i < half; ++i) {
    const float exponent = static_cast<float>(2 * i) / static_cast<float>(dim);
    const float p = static_cast<float>(
        std::pow(static_cast<double>(base), static_cast<double>(exponent)));
    float f = 1.0f / p;
    switch (r.type) {
      case RopeType::kDefault:
        break;
      case RopeType::kLinear:
        f = f / factor;
        break;
      case RopeType::kLlama3: {
        const float wavelen = two_pi / f;
        if (wavelen > low_freq_wavelen) {
          f = f / factor;
        } else if (!(wavelen < high_freq_wavelen)) {
          const float smooth = (old_ctx / wavelen - low) / band;
          f = (1.0f - smooth) * f / factor + smooth * f;
        }
        break;
      }
    }
    inv[static_cast<size_t>(i)] = f;
  }
  return inv;
}

}  // namespace lorc
