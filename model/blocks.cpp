#include "model/blocks.h"

#include <cmath>
#include <cstring>

#include "core/error.h"
#include "comm/virtual_time.h"
#include "kernels/rowwise.h"

namespace switchyard {

void rmsnorm_rows(const float* in, const float* g, int64_t rows, int64_t d, double eps, float* out, float* rstd) {
#pragma omp parallel for schedule(static) if (rows >= 64)
  for (int64_t r = 0; r < rows; ++r) {
    double ss = 0;
    for (int64_t j = 0; j < d; ++j) ss += static_cast<double>(in[r * d + j]) * in[r * d + j];
    const float inv = static_cast<float>(1.0 / std::sqrt(ss / static_cast<double>(d) + eps));
    if (rstd) rstd[r] = inv;
    for (int64_t j = 0; j < d; ++j) out[r * d + j] = in[r * d + j] * inv * g[j];
  }
}

Tensor rmsnorm(const Tensor& x, const Tensor& w, double eps) {
  const int64_t rows = x.shape()[0], d = x.shape()[1];
  Tensor y = Tensor::empty({rows, d}, DType::f32);
  rmsnorm_rows(x.data_as<float>(), w.data_as<float>(), rows, d, eps, y.data_as<float>(), nullptr);
  return y;
}

Tensor matmul_rowwise(const Tensor& x, const Tensor& w) {
  const int64_t rows = x.shape()[0], k = x.shape()[1], n = w.shape()[1];
  Tensor y = Tensor::empty({rows, n}, DType::f32);
  kernels::cpu::matmul_rows(x.data_as<float>(), rows, k, k, w.data_as<float>(), n, n, 0.f, y.data_as<float>(), n);
  return y;
}

RotaryTable::RotaryTable(const ModelConfig& c) : head_dim_(c.head_dim()), max_seq_(c.max_seq) {
  const int half = head_dim_ / 2;
  for (int pos = 0; pos < c.max_seq; ++pos)
    for (int j = 0; j < half; ++j) {
      const float freq = std::pow(static_cast<float>(c.rope_theta), -static_cast<float>(j) / static_cast<float>(half));
      const float angle = static_cast<float>(pos) * freq;
      cos_.push_back(std::cos(angle));
      sin_.push_back(std::sin(angle));
    }
}

void RotaryTable::apply(float* u, int pos, int heads) const { rotate(u, pos, heads, false); }

void RotaryTable::apply_inverse(float* u, int pos, int heads) const { rotate(u, pos, heads, true); }

void RotaryTable::rotate(float* u, int pos, int heads, bool inverse) const {
  if (pos >= max_seq_) SY_THROW(InvalidArgument, "model: position ", pos, " is beyond max_seq = ", max_seq_);
  const int half = head_dim_ / 2;
  const float* cs = cos_.data() + static_cast<size_t>(pos) * half;
  const float* sn = sin_.data() + static_cast<size_t>(pos) * half;
  const float sign = inverse ? -1.f : 1.f;  // the transpose turns by the negative angle
  for (int head = 0; head < heads; ++head) {
    float* a = u + head * head_dim_;
    for (int j = 0; j < half; ++j) {
      const float x1 = a[j], x2 = a[j + half], s = sign * sn[j];
      a[j] = x1 * cs[j] - x2 * s;
      a[j + half] = x1 * s + x2 * cs[j];
    }
  }
}

AttentionBlock::AttentionBlock(const ModelConfig& config, int layer, AttentionWeights weights,
                               std::shared_ptr<const RotaryTable> rope)
    : config_(config), layer_(layer), w_(std::move(weights)), rope_(std::move(rope)) {
  const int64_t d = config_.d_model, width = w_.wq.shape()[1];
  if (width % config_.head_dim() != 0 || width < config_.head_dim() || width > d)
    SY_THROW(InvalidArgument, "attention block: wq is ", shape_string(w_.wq.shape()), ", expected [", d,
             ", a multiple of head_dim ", config_.head_dim(), " up to ", d, "]");
  heads_ = static_cast<int>(width / config_.head_dim());
  for (const Tensor* t : {&w_.wk, &w_.wv, &w_.wo})
    if (t->shape() != (t == &w_.wo ? Shape{width, d} : Shape{d, width}))
      SY_THROW(InvalidArgument, "attention block: a projection is ", shape_string(t->shape()), " beside wq ",
               shape_string(w_.wq.shape()), " (expected wk, wv [d, width] and wo [width, d])");
}

std::unique_ptr<AttentionBlock> AttentionBlock::head_slice(int first, int count) const {
  if (first < 0 || count < 1 || first + count > heads_)
    SY_THROW(InvalidArgument, "attention block: heads [", first, ", ", first + count, "), expected a range inside 0..",
             heads_);
  const int64_t d = config_.d_model, hd = config_.head_dim(), width = count * hd, from = first * hd;
  const int64_t full = w_.wq.shape()[1];
  auto columns = [&](const Tensor& w) {
    Tensor out = Tensor::empty({d, width}, DType::f32);
    for (int64_t r = 0; r < d; ++r)
      std::memcpy(out.data_as<float>() + r * width, w.data_as<float>() + r * full + from,
                  static_cast<size_t>(width) * sizeof(float));
    return out;
  };
  AttentionWeights part{w_.norm, columns(w_.wq), columns(w_.wk), columns(w_.wv), Tensor::empty({width, d}, DType::f32)};
  std::memcpy(part.wo.data(), w_.wo.data_as<float>() + from * d, static_cast<size_t>(width * d) * sizeof(float));
  auto block = std::make_unique<AttentionBlock>(config_, layer_, std::move(part), rope_);
  block->set_device_model(device_);
  return block;
}

AttentionCost attention_cost(const DeviceModel& dev, int64_t d, int64_t width, const std::vector<Chunk>& chunks,
                             int layer) {
  double rows = 0, kv_positions = 0, score_terms = 0;
  for (const Chunk& c : chunks) {
    const double n = static_cast<double>(c.tokens.size()), before = c.cache ? c.cache->layer(layer).length() : 0;
    if (n == 0) continue;
    rows += n;
    kv_positions += before + n;
    score_terms += n * before + n * (n + 1) / 2;  // query i of the chunk sees before + i + 1 positions
  }
  AttentionCost cost;
  if (rows == 0) return cost;
  cost.kv_bytes = kv_positions * 2.0 * static_cast<double>(width) * sizeof(float);
  cost.flops = score_terms * 4.0 * static_cast<double>(width);  // q.k and p.v per position and dimension
  const double act = rows * static_cast<double>(d) * sizeof(float);
  cost.seconds = dev.memory_seconds(2 * act + static_cast<double>(d) * sizeof(float))         // rmsnorm
                 + 3 * dev.gemm_seconds(rows, static_cast<double>(width), static_cast<double>(d), false)  // q, k, v
                 + dev.memory_seconds(rows * 6.0 * static_cast<double>(width) * sizeof(float))  // rotary, KV write
                 + dev.kernel_seconds(cost.flops, cost.kv_bytes + 2 * rows * width * sizeof(float), false)
                 + dev.gemm_seconds(rows, static_cast<double>(d), static_cast<double>(width), false);  // wo
  return cost;
}

Tensor AttentionBlock::mix(const Tensor& x, const std::vector<Chunk>& chunks) const {
  const int64_t rows = x.shape()[0], w = width();
  const int h = heads_, hd = config_.head_dim();
  if (device_) virtual_time::charge(attention_cost(*device_, config_.d_model, w, chunks, layer_).seconds);
  const Tensor xn = rmsnorm(x, w_.norm, config_.norm_eps);
  Tensor q = matmul_rowwise(xn, w_.wq), k = matmul_rowwise(xn, w_.wk), v = matmul_rowwise(xn, w_.wv);
  // Each row's position, and its layer cache.
  std::vector<int> position(static_cast<size_t>(rows));
  std::vector<LayerKV*> cache_of(static_cast<size_t>(rows));
  int64_t r = 0;
  for (const Chunk& c : chunks) {
    const int n = static_cast<int>(c.tokens.size());
    if (!c.cache || !c.cache->fits(config_, static_cast<int>(w)))
      SY_THROW(InvalidArgument, "model '", config_.name, "': a chunk's KV cache is missing or belongs to a model of "
               "another shape (expected ", config_.layers, " layers of width ", w, ")");
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
    rope_->apply(q.data_as<float>() + i * w, pos, h);
    rope_->apply(k.data_as<float>() + i * w, pos, h);
    cache_of[static_cast<size_t>(i)]->write(pos, k.data_as<float>() + i * w, v.data_as<float>() + i * w);
  }
  // Each query row over keys 0..its position, in key order: the same arithmetic in any batch.
  Tensor o = Tensor::empty({rows, w}, DType::f32);
  const float scale = 1.f / std::sqrt(static_cast<float>(hd));
#pragma omp parallel for schedule(dynamic) if (rows >= 8)
  for (int64_t i = 0; i < rows; ++i) {
    const LayerKV* cache = cache_of[static_cast<size_t>(i)];
    const int pos = position[static_cast<size_t>(i)];
    thread_local std::vector<float> score;
    score.resize(static_cast<size_t>(h) * static_cast<size_t>(pos + 1));
    // Keys are [dim][capacity], values [position][width] (model/kv_cache.h).
    kernels::cpu::attend_heads(q.data_as<float>() + i * w, h, hd, cache->key_dim(0), cache->capacity(),
                               cache->values(0), cache->width(), pos + 1, scale, score.data(),
                               o.data_as<float>() + i * w);
  }
  return o;
}

void AttentionBlock::apply(Tensor& x, const std::vector<Chunk>& chunks) const {
  const Tensor o = mix(x, chunks);
  const int64_t rows = x.shape()[0], d = config_.d_model, w = width();
  kernels::cpu::matmul_rows(o.data_as<float>(), rows, w, w, w_.wo.data_as<float>(), d, d, 1.f, x.data_as<float>(), d);
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

Tensor MoEFfnBlock::delta(const Tensor& x) { return collect(*post(x)); }

void MoEFfnBlock::count_load(const Routing& routing) {
  const std::vector<int64_t>& load = routing.expert_load;
  if (load_since_.size() != load.size()) load_since_.assign(load.size(), 0.0);
  for (size_t e = 0; e < load.size(); ++e) load_since_[e] += static_cast<double>(load[e]);
}

MoEHandle MoEFfnBlock::post(const Tensor& x, PostTimes* times) {
  const DeviceModel* dev = moe_->ops().device_model();
  if (dev) virtual_time::charge(dev->memory_seconds(2.0 * static_cast<double>(x.nbytes())));
  MoEHandle batch = moe_->plan(rmsnorm(x, norm_, eps_), moe_->routing_choice(), moe_->config().plan);
  moe_->dispatch(*batch);
  const MoEPhaseTimes& t = dev ? moe_->virtual_phase_times() : moe_->phase_times();
  const double waited = t.dispatch_a2a, computed = t.experts + t.encode + t.decode;
  moe_->combine(*batch);  // waits for each chunk's rows, computes it, posts its return
  if (times) {
    times->transfer = t.dispatch_a2a - waited;
    times->compute = t.experts + t.encode + t.decode - computed;
  }
  return batch;
}

Tensor MoEFfnBlock::collect(MoEBatch& batch) {
  Tensor out = moe_->finish(batch).output;
  count_load(batch.routing());
  return out;
}

}  // namespace switchyard
