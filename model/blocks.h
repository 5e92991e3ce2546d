// The decoder's per-layer pieces, so a schedule can run any layer on any rank:
// an attention block (RMSNorm, rotary multi-head attention over a per-layer
// KV cache, output projection) and an FFN block (RMSNorm, then an MoE layer
// over the expert group; later a remote FFN on other ranks).
//
// Every product is row-wise batch-invariant (kernels/rowwise.h) and attention
// reduces each query row over its keys in key order, so a row's result does
// not depend on which other rows share its step.
#pragma once

#include <algorithm>
#include <memory>
#include <vector>

#include "core/tensor.h"
#include "model/kv_cache.h"
#include "model/model_config.h"
#include "moe/moe_layer.h"
#include "parallel/cost_model.h"

namespace switchyard {

// A step's input for one sequence: tokens appended at its cache's length
// (each layer's own length).
struct Chunk {
  KVCache* cache = nullptr;
  std::vector<int> tokens;
};

// y[r] = x[r] / sqrt(mean(x[r]^2) + eps) * w, per row.
Tensor rmsnorm(const Tensor& x, const Tensor& w, double eps);
// The same on raw rows; rstd (may be null) gets each row's 1 / sqrt(mean + eps),
// which the training backward reuses.
void rmsnorm_rows(const float* x, const float* w, int64_t rows, int64_t d, double eps, float* y, float* rstd);
// x [rows, k] @ w [k, n], row-wise.
Tensor matmul_rowwise(const Tensor& x, const Tensor& w);

// cos / sin of pos * theta^(-j / half), as the Python model computes them in f32.
class RotaryTable {
 public:
  explicit RotaryTable(const ModelConfig& config);
  // Rotates `heads` heads of one row u [heads * head_dim] to position pos
  // (every head turns alike, so a tensor-parallel rank's share rotates as
  // the same heads of the whole row would).
  void apply(float* u, int pos, int heads) const;
  // The transposed rotation (turning back by the same angle): the gradient of
  // apply() with respect to its input.
  void apply_inverse(float* u, int pos, int heads) const;

 private:
  void rotate(float* u, int pos, int heads, bool inverse) const;
  int head_dim_, max_seq_;
  std::vector<float> cos_, sin_;  // [max_seq, head_dim / 2]
};

struct AttentionWeights {
  Tensor norm, wq, wk, wv, wo;  // [d], then [d, width] (q, k, v) and [width, d] (o); width = heads * head_dim
};

// What one step of an attention block costs an emulated device: GEMMs at
// the roofline of the device model (parallel/cost_model.h), the chunk's
// keys and values read once per chunk (a flash-decoding kernel streams a
// sequence's cache once for all of its query rows), FLOPs per query row
// over its positions. Charged to the calling thread's virtual time.
struct AttentionCost {
  double seconds = 0, kv_bytes = 0, flops = 0;
};
AttentionCost attention_cost(const DeviceModel& device, int64_t d_model, int64_t width,
                             const std::vector<Chunk>& chunks, int layer);

class AttentionBlock {
 public:
  AttentionBlock(const ModelConfig& config, int layer, AttentionWeights weights,
                 std::shared_ptr<const RotaryTable> rope);
  // Heads [first, first + count) alone (a tensor-parallel rank's share): the
  // columns of wq, wk, wv and the rows of wo that belong to them. Its KV
  // cache layers are count * head_dim wide; delta() is then this share's
  // partial sum of the output projection.
  std::unique_ptr<AttentionBlock> head_slice(int first, int count) const;
  int layer() const { return layer_; }
  int heads() const { return heads_; }
  int width() const { return heads_ * config_.head_dim(); }  // KV floats per position
  const AttentionWeights& weights() const { return w_; }
  // Emulation: each call charges its modelled cost on this device (nullptr: none).
  void set_device_model(std::shared_ptr<const DeviceModel> device) { device_ = std::move(device); }
  // x += attention(rmsnorm(x)): the output projection accumulates onto x (the
  // sequential model's arithmetic). Writes the chunks' keys and values at
  // each cache's length of this layer (LayerKV::advance makes them count).
  void apply(Tensor& x, const std::vector<Chunk>& chunks) const;
  // attention(rmsnorm(x)) alone, from any input: a layer-parallel schedule
  // adds several blocks' deltas to one residual.
  Tensor delta(const Tensor& x, const std::vector<Chunk>& chunks) const;

 private:
  Tensor mix(const Tensor& x, const std::vector<Chunk>& chunks) const;  // heads' outputs before wo
  ModelConfig config_;
  int layer_, heads_;
  AttentionWeights w_;
  std::shared_ptr<const RotaryTable> rope_;
  std::shared_ptr<const DeviceModel> device_;
};

class FfnBlock {
 public:
  virtual ~FfnBlock() = default;
  // ffn(rmsnorm(x)); collective over whatever group computes the FFN: every
  // rank of it calls, with its own rows (possibly none).
  virtual Tensor delta(const Tensor& x) = 0;
  void apply(Tensor& x);  // x += delta(x)
};

// The FFN as an MoE layer whose experts are spread over the expert group.
class MoEFfnBlock : public FfnBlock {
 public:
  MoEFfnBlock(Tensor norm, double eps, std::unique_ptr<MoELayer> moe) : norm_(std::move(norm)), eps_(eps), moe_(std::move(moe)) {}
  Tensor delta(const Tensor& x) override;
  // delta() in two halves, so several batches can be in flight on the layer
  // (attention-FFN disaggregation's micro-batches): post() norms the rows,
  // plans the batch and posts its exchanges (the experts' ranks compute
  // inside it); collect() waits for the results and returns the delta. Both
  // are collective in the layer's batch order (moe/moe_layer.h).
  // times (may be null) gets the seconds post() spent waiting for the rows
  // to arrive and computing the experts (wall, or virtual when emulated).
  struct PostTimes {
    double transfer = 0, compute = 0;
  };
  MoEHandle post(const Tensor& x, PostTimes* times = nullptr);
  Tensor collect(MoEBatch& batch);
  MoELayer& moe() { return *moe_; }
  // This rank's routed choices per logical expert since the last reset (for
  // re-placing redundant experts from measured loads).
  const std::vector<double>& load_since() const { return load_since_; }
  void reset_load() { std::fill(load_since_.begin(), load_since_.end(), 0.0); }

 private:
  Tensor norm_;
  double eps_;
  std::unique_ptr<MoELayer> moe_;
  std::vector<double> load_since_;
  void count_load(const Routing& routing);
};

}  // namespace switchyard
