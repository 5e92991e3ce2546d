// The architecture of a decoder model, read from its config.json.
#pragma once

#include <cstdint>
#include <string>

namespace switchyard {

struct ModelConfig {
  std::string name;
  int vocab_size = 256;
  int d_model = 0;
  int layers = 0;
  int heads = 0;
  double norm_eps = 1e-5;
  double rope_theta = 10000.0;
  int max_seq = 0;
  int experts = 0;
  int k = 2;
  int64_t hidden = 0;
  std::string activation = "gelu";
  std::string gate = "softmax";
  bool renormalize = false;
  int head_dim() const { return d_model / heads; }
  // Reads config.json; ConfigError naming the file and the key that is missing or wrong.
  static ModelConfig load(const std::string& path);
  // The same from config.json's text (`path` names it in errors).
  static ModelConfig parse(const std::string& text, const std::string& path);
};

}  // namespace switchyard
