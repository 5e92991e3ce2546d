#include "model/model_config.h"

#include <fstream>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "kernels/moe.h"

namespace switchyard {
namespace {

using Json = nlohmann::json;

template <typename T>
T required(const Json& j, const std::string& key, const std::string& path, const std::string& prefix = "") {
  if (!j.contains(key)) SY_THROW(ConfigError, path, ": key '", prefix, key, "' is missing");
  try {
    return j.at(key).get<T>();
  } catch (const Json::exception&) {
    SY_THROW(ConfigError, path, ": key '", prefix, key, "' is ", j.at(key).dump(), ", expected a ",
             std::is_same_v<T, std::string> ? "string" : std::is_same_v<T, bool> ? "boolean" : "number");
  }
}

}  // namespace

ModelConfig ModelConfig::load(const std::string& path) {
  std::ifstream in(path);
  if (!in) SY_THROW(IoError, "cannot read model config '", path, "'");
  return parse(std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>()), path);
}

ModelConfig ModelConfig::parse(const std::string& text, const std::string& path) {
  Json j;
  try {
    j = Json::parse(text);
  } catch (const Json::exception& e) {
    SY_THROW(ConfigError, path, ": not valid JSON: ", e.what());
  }
  ModelConfig c;
  c.name = j.value("name", std::string("model"));
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
  c.renormalize = f.value("renormalize", false);
  auto positive = [&](const char* key, int64_t v) {
    if (v < 1) SY_THROW(ConfigError, path, ": ", key, " = ", v, ", expected >= 1");
  };
  positive("vocab_size", c.vocab_size);
  positive("d_model", c.d_model);
  positive("layers", c.layers);
  positive("heads", c.heads);
  positive("max_seq", c.max_seq);
  positive("ffn.experts", c.experts);
  positive("ffn.hidden", c.hidden);
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
