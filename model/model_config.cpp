#include "model/model_config.h"

#include <algorithm>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/untrusted.h"
#include "kernels/moe.h"

namespace switchyard {
namespace {

using Json = nlohmann::json;

// A key's value: integers in T's range (4294967552 is not 256), finite numbers, strings.
template <typename T>
T required(const Json& j, const std::string& key, const std::string& path, const std::string& prefix = "") {
  if (!j.contains(key)) SY_THROW(ConfigError, path, ": key '", prefix, key, "' is missing");
  const Json& v = j.at(key);
  const std::string field = path + ": key '" + prefix + key + "'";
  if constexpr (std::is_same_v<T, std::string> || std::is_same_v<T, bool>) {
    if ((std::is_same_v<T, bool> && !v.is_boolean()) || (std::is_same_v<T, std::string> && !v.is_string()))
      SY_THROW(ConfigError, field, " is ", json_excerpt(v), ", expected a ",
               std::is_same_v<T, std::string> ? "string" : "boolean");
    return v.get<T>();
  } else if constexpr (std::is_floating_point_v<T>) {
    return static_cast<T>(json_finite(v, field));
  } else {
    return json_integer<T>(v, field);
  }
}

}  // namespace

ModelConfig ModelConfig::load(const std::string& path) {
  std::string text;
  try {
    text = read_untrusted_file(path);
  } catch (const IoError& e) {
    SY_THROW(IoError, "model config ", e.what());
  }
  return parse(text, path);
}

ModelConfig ModelConfig::parse(const std::string& text, const std::string& path) {
  Json j;
  try {
    j = parse_untrusted_json(text, path);
  } catch (const InvalidArgument& e) {
    SY_THROW(ConfigError, e.what());
  }
  if (!j.is_object()) SY_THROW(ConfigError, path, ": expected a JSON object, got ", json_excerpt(j));
  ModelConfig c;
  c.name = j.contains("name") ? required<std::string>(j, "name", path) : std::string("model");
  c.vocab_size = required<int>(j, "vocab_size", path);
  c.d_model = required<int>(j, "d_model", path);
  c.layers = required<int>(j, "layers", path);
  c.heads = required<int>(j, "heads", path);
  c.norm_eps = required<double>(j, "norm_eps", path);
  c.rope_theta = required<double>(j, "rope_theta", path);
  c.max_seq = required<int>(j, "max_seq", path);
  if (!j.contains("ffn") || !j["ffn"].is_object()) SY_THROW(ConfigError, path, ": key 'ffn' is missing or not an object");
  const Json& f = j["ffn"];
  c.experts = required<int>(f, "experts", path, "ffn.");
  c.k = required<int>(f, "k", path, "ffn.");
  c.hidden = required<int64_t>(f, "hidden", path, "ffn.");
  c.activation = required<std::string>(f, "activation", path, "ffn.");
  c.gate = required<std::string>(f, "gate", path, "ffn.");
  c.renormalize = f.contains("renormalize") ? required<bool>(f, "renormalize", path, "ffn.") : false;
  // Limits far above any model this runs, so a hostile config cannot size allocations the weights never back.
  auto in_range = [&](const char* key, int64_t v, int64_t most) {
    if (v < 1 || v > most) SY_THROW(ConfigError, path, ": ", key, " = ", v, ", expected 1..", most);
  };
  in_range("vocab_size", c.vocab_size, int64_t{1} << 24);
  in_range("d_model", c.d_model, int64_t{1} << 16);
  in_range("layers", c.layers, 4096);
  in_range("heads", c.heads, 4096);
  in_range("max_seq", c.max_seq, int64_t{1} << 24);
  in_range("ffn.experts", c.experts, int64_t{1} << 16);
  in_range("ffn.hidden", c.hidden, int64_t{1} << 20);
  // The rotary table (max_seq x head width floats) is built before any weight is read.
  if (static_cast<int64_t>(c.max_seq) * (c.d_model / std::max(1, c.heads)) > (int64_t{1} << 25))
    SY_THROW(ConfigError, path, ": max_seq = ", c.max_seq, " with a head width of ", c.d_model / std::max(1, c.heads),
             " needs a rotary table of ", static_cast<int64_t>(c.max_seq) * (c.d_model / std::max(1, c.heads)),
             " floats, expected at most ", int64_t{1} << 25);
  if (!(c.norm_eps > 0) || c.norm_eps > 1)
    SY_THROW(ConfigError, path, ": norm_eps = ", c.norm_eps, ", expected a small positive number (0, 1]");
  if (!(c.rope_theta > 1))
    SY_THROW(ConfigError, path, ": rope_theta = ", c.rope_theta, ", expected a base > 1 (e.g. 10000)");
  if (c.d_model % c.heads || c.head_dim() % 2)
    SY_THROW(ConfigError, path, ": d_model = ", c.d_model, " with heads = ", c.heads,
             "; expected an even head width d_model / heads");
  if (c.k < 1 || c.k > c.experts)
    SY_THROW(ConfigError, path, ": ffn.k = ", c.k, ", expected 1..ffn.experts (", c.experts, ")");
  if (!kernels::parse_activation(c.activation))
    SY_THROW(ConfigError, path, ": ffn.activation = '", c.activation, "', expected relu, gelu or swiglu");
  if (c.gate != "softmax" && c.gate != "sigmoid_bias")
    SY_THROW(ConfigError, path, ": ffn.gate = '", c.gate, "', expected softmax or sigmoid_bias");
  return c;
}

}  // namespace switchyard
