// The decoder-only MoE transformer of examples/tiny_lm (README.md there is
// the architecture), run on Switchyard's own kernels and communicators: the
// FFNs are MoELayers whose experts are spread over the expert group, every
// rank runs the same tokens (attention replicated, experts parallel).
//
// Inference only. Every product is row-wise batch-invariant
// (kernels/rowwise.h) and attention reduces each query row in key order, so
// a position's logits are bit-identical whether it is computed in a prefill,
// in a multi-token verification chunk or in a one-token decode step, alone
// or beside other sequences, on any number of ranks.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "core/tensor.h"
#include "moe/moe_layer.h"

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
};

// One sequence's keys and values for every layer, positions [0, length).
// Keys are stored transposed, [layer][dim][position], so a query's scores
// over all positions are one vectorised pass per dimension; values are
// [layer][position][dim].
class KVCache {
 public:
  KVCache(const ModelConfig& config, int capacity);
  int length() const { return length_; }
  int capacity() const { return capacity_; }
  // Forget positions >= length (speculative tokens that were rejected).
  void crop(int length);
  KVCache copy() const { return *this; }
  // Key dimension `dim` of every position of a layer (contiguous over positions).
  float* key_dim(int layer, int dim) { return k_.data() + offset(layer, dim, capacity_); }
  const float* key_dim(int layer, int dim) const { return k_.data() + offset(layer, dim, capacity_); }
  float* values(int layer, int position) { return v_.data() + offset(layer, position, d_); }
  const float* values(int layer, int position) const { return v_.data() + offset(layer, position, d_); }
  void set_key(int layer, int position, const float* key);  // d_model floats
  void advance(int n);  // the model's commit: n more positions hold data
  bool fits(const ModelConfig& c) const { return layers_ == c.layers && d_ == c.d_model; }

 private:
  // Element (layer, row, 0) of a [layer][rows][width] array of capacity * d_ per layer.
  size_t offset(int layer, int row, int width) const {
    return static_cast<size_t>(layer) * capacity_ * d_ + static_cast<size_t>(row) * width;
  }
  int layers_, d_, capacity_, length_ = 0;
  std::vector<float> k_, v_;
};

// A step's input for one sequence: tokens appended at its cache's length.
struct Chunk {
  KVCache* cache = nullptr;
  std::vector<int> tokens;
};

// Wall seconds per phase, summed over calls.
struct ModelPhaseTimes {
  double embed = 0, attention = 0, moe = 0, head = 0;
};

class Model {
 public:
  // DIR/config.json and DIR/model.safetensors (bf16 or f32). Errors name the
  // file, the tensor and the expected shape. Collective over `group` (its
  // size must divide the expert count).
  Model(const std::string& dir, std::shared_ptr<Communicator> group);
  const ModelConfig& config() const { return config_; }
  KVCache new_cache(int capacity = 0) const { return KVCache(config_, capacity > 0 ? capacity : config_.max_seq); }

  // Rows are the chunks' tokens, sequence after sequence.
  Tensor embed(const std::vector<Chunk>& chunks);
  // x += attention(rmsnorm(x)) for layer `layer`; writes the chunks' keys and
  // values at each cache's length..length+n-1 (commit() makes them count).
  void attention(int layer, Tensor& x, const std::vector<Chunk>& chunks);
  // x += moe(rmsnorm(x)): collective over the expert group.
  void ffn(int layer, Tensor& x);
  Tensor head(const Tensor& x);  // logits [rows, vocab]
  void commit(const std::vector<Chunk>& chunks);
  // Every layer, then commit: logits [rows, vocab].
  Tensor forward(const std::vector<Chunk>& chunks);

  const ModelPhaseTimes& times() const { return times_; }
  void reset_times() { times_ = {}; }
  // Bytes of weights (all of them: attention, experts of every rank, embedding, head).
  double weight_bytes() const;
  double expert_bytes() const;  // one expert of one layer

 private:
  struct Layer {
    Tensor attn_norm, wq, wk, wv, wo, ffn_norm;
    std::unique_ptr<MoELayer> moe;
  };
  ModelConfig config_;
  std::shared_ptr<Communicator> group_;
  Tensor embed_, norm_, lm_head_;
  std::vector<Layer> layers_;
  std::vector<float> rope_cos_, rope_sin_;  // [max_seq, head_dim / 2]: the same values the Python model computes
  ModelPhaseTimes times_;
};

}  // namespace switchyard
