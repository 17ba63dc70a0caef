#include "model/lorc_config.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "absl/strings/str_cat.h"

namespace lorc {
namespace {

using json = nlohmann::json;

absl::Status Bad(const std::string& field, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat("lorc.json: ", field, ": ", what));
}

absl::StatusOr<const json*> Field(const json& j, const std::string& key, const std::string& path) {
  auto it = j.find(key);
  if (it == j.end()) return Bad(path, "missing");
  return &*it;
}

absl::StatusOr<int64_t> Int(const json& j, const std::string& key, const std::string& path) {
  auto f = Field(j, key, path);
  if (!f.ok()) return f.status();
  if (!(*f)->is_number_integer()) return Bad(path, absl::StrCat("must be an integer, got ", (*f)->dump()));
  return (*f)->get<int64_t>();
}

absl::StatusOr<std::string> String(const json& j, const std::string& key, const std::string& path) {
  auto f = Field(j, key, path);
  if (!f.ok()) return f.status();
  if (!(*f)->is_string()) return Bad(path, absl::StrCat("must be a string, got ", (*f)->dump()));
  return (*f)->get<std::string>();
}

absl::Status OneOf(const std::string& value, std::initializer_list<const char*> allowed,
                   const std::string& path) {
  std::string list;
  for (const char* a : allowed) {
    if (value == a) return absl::OkStatus();
    absl::StrAppend(&list, list.empty() ? "" : ", ", "\"", a, "\"");
  }
  return Bad(path, absl::StrCat("\"", value, "\" is not one of ", list));
}

absl::Status CountMatches(const json& j, const char* key, int64_t want) {
  auto v = Int(j, key, key);
  if (!v.ok()) return v.status();
  if (*v != want) {
    return Bad(key, absl::StrCat(*v, " differs from config.json's ", want));
  }
  return absl::OkStatus();
}

}  // namespace

int64_t LorcConfig::max_k_rank() const {
  int64_t m = 0;
  for (const LorcLayerRanks& r : layers) m = std::max(m, r.k_rank);
  return m;
}

int64_t LorcConfig::max_v_rank() const {
  int64_t m = 0;
  for (const LorcLayerRanks& r : layers) m = std::max(m, r.v_rank);
  return m;
}

absl::StatusOr<LorcConfig> LorcConfigFromJson(const json& j, int64_t num_layers,
                                              int64_t num_kv_heads, int64_t head_dim) {
  if (!j.is_object()) return Bad("document", absl::StrCat("must be a JSON object, got ", j.type_name()));
  LorcConfig c;
  auto format = String(j, "format", "format");
  if (!format.ok()) return format.status();
  if (*format != "lorcserve-lorc") return Bad("format", absl::StrCat("\"", *format, "\" is not \"lorcserve-lorc\""));
  auto version = Int(j, "version", "version");
  if (!version.ok()) return version.status();
  if (*version != 1) return Bad("version", absl::StrCat(*version, " is not supported (1)"));
  c.version = *version;
  auto method = String(j, "method", "method");
  if (!method.ok()) return method.status();
  if (absl::Status s = OneOf(*method, {"svd", "whitened-svd"}, "method"); !s.ok()) return s;
  c.method = *method;
  if (j.contains("schedule")) {
    auto schedule = String(j, "schedule", "schedule");
    if (!schedule.ok()) return schedule.status();
    if (absl::Status s = OneOf(*schedule, {"uniform", "progressive", "search"}, "schedule"); !s.ok()) return s;
    c.schedule = *schedule;
  }
  if (absl::Status s = CountMatches(j, "num_layers", num_layers); !s.ok()) return s;
  if (absl::Status s = CountMatches(j, "num_kv_heads", num_kv_heads); !s.ok()) return s;
  if (absl::Status s = CountMatches(j, "head_dim", head_dim); !s.ok()) return s;
  auto layers = Field(j, "layers", "layers");
  if (!layers.ok()) return layers.status();
  if (!(*layers)->is_array()) return Bad("layers", absl::StrCat("must be an array, got ", (*layers)->type_name()));
  if (static_cast<int64_t>((*layers)->size()) != num_layers) {
    return Bad("layers", absl::StrCat("has ", (*layers)->size(), " entries, num_layers is ", num_layers));
  }
  int64_t rank_sum = 0;
  for (size_t l = 0; l < (*layers)->size(); ++l) {
    const json& e = (**layers)[l];
    const std::string at = absl::StrCat("layers[", l, "]");
    if (!e.is_object()) return Bad(at, absl::StrCat("must be an object, got ", e.type_name()));
    LorcLayerRanks r;
    for (auto [key, dst] : {std::pair<const char*, int64_t*>{"k_rank", &r.k_rank}, {"v_rank", &r.v_rank}}) {
      const std::string path = absl::StrCat(at, ".", key);
      auto v = Int(e, key, path);
      if (!v.ok()) return v.status();
      if (*v < 1 || *v > head_dim) return Bad(path, absl::StrCat(*v, " is outside [1, ", head_dim, "]"));
      *dst = *v;
    }
    rank_sum += r.k_rank + r.v_rank;
    c.layers.push_back(r);
  }
  const double ratio = static_cast<double>(rank_sum) / static_cast<double>(num_layers * 2 * head_dim);
  c.kv_bytes_ratio = ratio;
  if (auto it = j.find("kv_bytes_ratio"); it != j.end()) {
    if (!it->is_number()) return Bad("kv_bytes_ratio", absl::StrCat("must be a number, got ", it->dump()));
    if (std::abs(it->get<double>() - ratio) > 1e-3) {
      return Bad("kv_bytes_ratio", absl::StrCat(it->get<double>(), " differs from the ranks' ", ratio));
    }
  }
  if (auto it = j.find("target"); it != j.end() && !it->is_object() && !it->is_null()) {
    return Bad("target", absl::StrCat("must be an object, got ", it->type_name()));
  }
  if (auto it = j.find("calibration"); it != j.end() && !it->is_null()) {
    if (!it->is_object()) return Bad("calibration", absl::StrCat("must be an object or null, got ", it->type_name()));
    if (it->contains("source")) {
      auto s = String(*it, "source", "calibration.source");
      if (!s.ok()) return s.status();
      c.calibration_source = *s;
    }
  }
  if (auto it = j.find("source_model"); it != j.end() && !it->is_null()) {
    if (!it->is_object()) return Bad("source_model", absl::StrCat("must be an object, got ", it->type_name()));
    if (it->contains("dir")) {
      auto s = String(*it, "dir", "source_model.dir");
      if (!s.ok()) return s.status();
      c.source_model_dir = *s;
    }
    if (it->contains("config_sha256")) {
      auto s = String(*it, "config_sha256", "source_model.config_sha256");
      if (!s.ok()) return s.status();
      c.source_config_sha256 = *s;
    }
  }
  return c;
}

}  // namespace lorc
