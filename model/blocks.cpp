#include "model/blocks.h"

#include <cmath>
#include <cstring>

#include "core/error.h"
#include "kernels/rowwise.h"

namespace switchyard {

Tensor rmsnorm(const Tensor& x, const Tensor& w, double eps) {
  const int64_t rows = x.shape()[0], d = x.shape()[1];
  Tensor y = Tensor::empty({rows, d}, DType::f32);
  const float* in = x.data_as<float>();
  const float* g = w.data_as<float>();
  float* out = y.data_as<float>();
#pragma omp parallel for schedule(static) if (rows >= 64)
  for (int64_t r = 0; r < rows; ++r) {
    double ss = 0;
    for (int64_t j = 0; j < d; ++j) ss += static_cast<double>(in[r * d + j]) * in[r * d + j];
    const float inv = static_cast<float>(1.0 / std::sqrt(ss / static_cast<double>(d) + eps));
    for (int64_t j = 0; j < d; ++j) out[r * d + j] = in[r * d + j] * inv * g[j];
  }
  return y;
}

Tensor matmul_rowwise(const Tensor& x, const Tensor& w) {
  const int64_t rows = x.shape()[0], k = x.shape()[1], n = w.shape()[1];
  Tensor y = Tensor::empty({rows, n}, DType::f32);
  kernels::cpu::matmul_rows(x.data_as<float>(), rows, k, k, w.data_as<float>(), n, n, 0.f, y.data_as<float>(), n);
  return y;
}

RotaryTable::RotaryTable(const ModelConfig& c) : heads_(c.heads), head_dim_(c.head_dim()), max_seq_(c.max_seq) {
  const int half = head_dim_ / 2;
  for (int pos = 0; pos < c.max_seq; ++pos)
    for (int j = 0; j < half; ++j) {
      const float freq = std::pow(static_cast<float>(c.rope_theta), -static_cast<float>(j) / static_cast<float>(half));
      const float angle = static_cast<float>(pos) * freq;
      cos_.push_back(std::cos(angle));
      sin_.push_back(std::sin(angle));
    }
}

void RotaryTable::apply(float* u, int pos) const {
  if (pos >= max_seq_) SY_THROW(InvalidArgument, "model: position ", pos, " is beyond max_seq = ", max_seq_);
  const int half = head_dim_ / 2;
  const float* cs = cos_.data() + static_cast<size_t>(pos) * half;
  const float* sn = sin_.data() + static_cast<size_t>(pos) * half;
  for (int head = 0; head < heads_; ++head) {
    float* a = u + head * head_dim_;
    for (int j = 0; j < half; ++j) {
      const float x1 = a[j], x2 = a[j + half];
      a[j] = x1 * cs[j] - x2 * sn[j];
      a[j + half] = x1 * sn[j] + x2 * cs[j];
    }
  }
}

AttentionBlock::AttentionBlock(const ModelConfig& config, int layer, AttentionWeights weights,
                               std::shared_ptr<const RotaryTable> rope)
    : config_(config), layer_(layer), w_(std::move(weights)), rope_(std::move(rope)) {}

Tensor AttentionBlock::mix(const Tensor& x, const std::vector<Chunk>& chunks) const {
  const int64_t rows = x.shape()[0], d = config_.d_model;
  const int h = config_.heads, hd = config_.head_dim();
  const Tensor xn = rmsnorm(x, w_.norm, config_.norm_eps);
  Tensor q = matmul_rowwise(xn, w_.wq), k = matmul_rowwise(xn, w_.wk), v = matmul_rowwise(xn, w_.wv);
  // Each row's position, and its layer cache.
  std::vector<int> position(static_cast<size_t>(rows));
  std::vector<LayerKV*> cache_of(static_cast<size_t>(rows));
  int64_t r = 0;
  for (const Chunk& c : chunks) {
    const int n = static_cast<int>(c.tokens.size());
    if (!c.cache || !c.cache->fits(config_))
      SY_THROW(InvalidArgument, "model '", config_.name, "': a chunk's KV cache is missing or belongs to a model of "
               "another shape (expected ", config_.layers, " layers of width ", config_.d_model, ")");
    LayerKV& kv = c.cache->layer(layer_);
    if (kv.length() + n > kv.capacity())
      SY_THROW(InvalidArgument, "model: a sequence of ", kv.length(), " + ", n, " positions exceeds its cache (",
               kv.capacity(), ")");
    for (int i = 0; i < n; ++i, ++r) {
      if (r >= rows) SY_THROW(InvalidArgument, "attention: the chunks hold more tokens than x's ", rows, " rows");
      position[static_cast<size_t>(r)] = kv.length() + i, cache_of[static_cast<size_t>(r)] = &kv;
    }
  }
  SY_CHECK_EQ(r, rows, "attention rows (chunk tokens vs x rows)");
  for (int64_t i = 0; i < rows; ++i) {
    const int pos = position[static_cast<size_t>(i)];
    rope_->apply(q.data_as<float>() + i * d, pos);
    rope_->apply(k.data_as<float>() + i * d, pos);
    cache_of[static_cast<size_t>(i)]->write(pos, k.data_as<float>() + i * d, v.data_as<float>() + i * d);
  }
  // Each query row over keys 0..its position, in key order: the same arithmetic in any batch.
  Tensor o = Tensor::empty({rows, d}, DType::f32);
  const float scale = 1.f / std::sqrt(static_cast<float>(hd));
#pragma omp parallel for schedule(dynamic) if (rows >= 8)
  for (int64_t i = 0; i < rows; ++i) {
    const LayerKV* cache = cache_of[static_cast<size_t>(i)];
    const int pos = position[static_cast<size_t>(i)];
    thread_local std::vector<float> score;
    score.resize(static_cast<size_t>(h) * static_cast<size_t>(pos + 1));
    // Keys are [dim][capacity], values [position][width] (model/kv_cache.h).
    kernels::cpu::attend_heads(q.data_as<float>() + i * d, h, hd, cache->key_dim(0), cache->capacity(),
                               cache->values(0), cache->width(), pos + 1, scale, score.data(),
                               o.data_as<float>() + i * d);
  }
  return o;
}

void AttentionBlock::apply(Tensor& x, const std::vector<Chunk>& chunks) const {
  const Tensor o = mix(x, chunks);
  const int64_t rows = x.shape()[0], d = config_.d_model;
  kernels::cpu::matmul_rows(o.data_as<float>(), rows, d, d, w_.wo.data_as<float>(), d, d, 1.f, x.data_as<float>(), d);
}

Tensor AttentionBlock::delta(const Tensor& x, const std::vector<Chunk>& chunks) const {
  return matmul_rowwise(mix(x, chunks), w_.wo);
}

void FfnBlock::apply(Tensor& x) {
  const Tensor add = delta(x);
  float* out = x.data_as<float>();
  const float* a = add.data_as<float>();
  for (int64_t i = 0; i < x.numel(); ++i) out[i] += a[i];
}

Tensor MoEFfnBlock::delta(const Tensor& x) {
  Tensor out = moe_->forward(rmsnorm(x, norm_, eps_)).output;
  const std::vector<int64_t>& load = moe_->last_routing().expert_load;
  if (load_since_.size() != load.size()) load_since_.assign(load.size(), 0.0);
  for (size_t e = 0; e < load.size(); ++e) load_since_[e] += static_cast<double>(load[e]);
  return out;
}

}  // namespace switchyard
