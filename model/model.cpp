#include "model/model.h"

#include <chrono>
#include <cmath>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/dtype.h"
#include "core/error.h"
#include "core/safetensors.h"
#include "kernels/rowwise.h"

namespace switchyard {
namespace {

using Json = nlohmann::json;
using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

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

// f32 copy of a checkpoint tensor of the expected shape (bf16 widened exactly).
Tensor load_f32(const SafetensorsFile& f, const std::string& name, const Shape& shape) {
  const SafetensorsEntry& e = f.entry(name);  // names the file and the tensor when missing
  if (e.shape != shape)
    SY_THROW(InvalidArgument, "model file '", f.path(), "': tensor '", name, "' has shape ", shape_string(e.shape),
             ", expected ", shape_string(shape), " (from config.json)");
  Tensor t = f.load(name);
  if (t.dtype() == DType::f32) return t;
  if (t.dtype() != DType::bf16)
    SY_THROW(InvalidArgument, "model file '", f.path(), "': tensor '", name, "' is ", dtype_name(t.dtype()),
             ", expected bf16 or f32");
  Tensor out = Tensor::empty(shape, DType::f32);
  const auto* in = static_cast<const bf16*>(t.data());
  for (int64_t i = 0; i < t.numel(); ++i) out.data_as<float>()[i] = in[i].to_float();
  return out;
}

// y[r] = x[r] / sqrt(mean(x[r]^2) + eps) * w, per row (batch-invariant).
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

Tensor matmul(const Tensor& x, const Tensor& w) {
  const int64_t rows = x.shape()[0], k = x.shape()[1], n = w.shape()[1];
  Tensor y = Tensor::empty({rows, n}, DType::f32);
  kernels::cpu::matmul_rows(x.data_as<float>(), rows, k, k, w.data_as<float>(), n, n, 0.f, y.data_as<float>(), n);
  return y;
}

}  // namespace

ModelConfig ModelConfig::load(const std::string& path) {
  std::ifstream in(path);
  if (!in) SY_THROW(IoError, "cannot read model config '", path, "'");
  Json j;
  try {
    j = Json::parse(in);
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
  if (!kernels::cpu::parse_activation(c.activation))
    SY_THROW(ConfigError, path, ": ffn.activation = '", c.activation, "', expected relu, gelu or swiglu");
  if (c.gate != "softmax" && c.gate != "sigmoid_bias")
    SY_THROW(ConfigError, path, ": ffn.gate = '", c.gate, "', expected softmax or sigmoid_bias");
  return c;
}

KVCache::KVCache(const ModelConfig& config, int capacity)
    : layers_(config.layers),
      d_(config.d_model),
      capacity_(capacity),
      k_(static_cast<size_t>(config.layers) * capacity * config.d_model),
      v_(k_.size()) {}

void KVCache::set_key(int layer, int position, const float* key) {
  for (int j = 0; j < d_; ++j) key_dim(layer, j)[position] = key[j];
}

void KVCache::crop(int length) {
  if (length < 0 || length > length_)
    SY_THROW(InvalidArgument, "kv cache: crop to ", length, ", expected 0..", length_, " (its length)");
  length_ = length;
}

void KVCache::advance(int n) {
  if (length_ + n > capacity_)
    SY_THROW(InvalidArgument, "kv cache: ", length_, " + ", n, " positions exceed its capacity ", capacity_);
  length_ += n;
}

Model::Model(const std::string& dir, std::shared_ptr<Communicator> group)
    : config_(ModelConfig::load(dir + "/config.json")), group_(std::move(group)) {
  const ModelConfig& c = config_;
  const int W = group_->size();
  if (c.experts % W)
    SY_THROW(InvalidArgument, "model '", dir, "': ", c.experts, " experts cannot be spread evenly over ", W,
             " ranks (expected a rank count dividing ffn.experts)");
  const SafetensorsFile f = SafetensorsFile::open(dir + "/model.safetensors");
  const int64_t d = c.d_model, V = c.vocab_size, E = c.experts, H = c.hidden;
  const auto act = *kernels::cpu::parse_activation(c.activation);
  const int64_t H1 = act == kernels::cpu::Activation::swiglu ? 2 * H : H;
  embed_ = load_f32(f, "embed.weight", {V, d});
  norm_ = load_f32(f, "norm.weight", {d});
  lm_head_ = load_f32(f, "lm_head.weight", {d, V});
  for (int i = 0; i < c.layers; ++i) {
    const std::string p = "layers." + std::to_string(i) + ".";
    Layer L;
    L.attn_norm = load_f32(f, p + "attn_norm.weight", {d});
    L.wq = load_f32(f, p + "attn.wq", {d, d});
    L.wk = load_f32(f, p + "attn.wk", {d, d});
    L.wv = load_f32(f, p + "attn.wv", {d, d});
    L.wo = load_f32(f, p + "attn.wo", {d, d});
    L.ffn_norm = load_f32(f, p + "ffn_norm.weight", {d});
    MoEConfig mc;
    mc.model_dim = d;
    mc.hidden_dim = H;
    mc.activation = act;
    mc.router.experts = c.experts;
    mc.router.k = c.k;
    mc.router.gate = c.gate == "softmax" ? GateKind::softmax : GateKind::sigmoid_bias;
    mc.router.renormalize = c.renormalize;
    mc.router.capacity_factor = 0.0;  // dropless, as trained
    mc.plan.exchange = ExchangeMode::dropless;
    mc.batch_invariant = true;
    L.moe = std::make_unique<MoELayer>(mc, group_);
    const Tensor gate = load_f32(f, p + "ffn.gate.weight", {d, E});
    std::memcpy(L.moe->gate_weight().data(), gate.data(), gate.nbytes());
    const Tensor w1 = load_f32(f, p + "ffn.experts.w1", {E, d, H1}), b1 = load_f32(f, p + "ffn.experts.b1", {E, H1});
    const Tensor w2 = load_f32(f, p + "ffn.experts.w2", {E, H, d}), b2 = load_f32(f, p + "ffn.experts.b2", {E, d});
    ExpertParams& ep = L.moe->params();
    for (int s = 0; s < L.moe->layout().local_experts(); ++s) {
      const int e = L.moe->layout().expert_at(group_->rank(), s);
      auto copy_slot = [&](const Tensor& from, Tensor& to, int64_t per) {
        std::memcpy(to.data_as<float>() + s * per, from.data_as<float>() + e * per, static_cast<size_t>(per) * sizeof(float));
      };
      copy_slot(w1, ep.w1, d * H1);
      copy_slot(b1, ep.b1, H1);
      copy_slot(w2, ep.w2, H * d);
      copy_slot(b2, ep.b2, d);
    }
    layers_.push_back(std::move(L));
  }
  // Rotary tables, as the Python model computes them in f32: freq_j = theta ** (-j / half), angle = pos * freq_j.
  const int half = c.head_dim() / 2;
  for (int pos = 0; pos < c.max_seq; ++pos)
    for (int j = 0; j < half; ++j) {
      const float freq = std::pow(static_cast<float>(c.rope_theta), -static_cast<float>(j) / static_cast<float>(half));
      const float angle = static_cast<float>(pos) * freq;
      rope_cos_.push_back(std::cos(angle));
      rope_sin_.push_back(std::sin(angle));
    }
}

Tensor Model::embed(const std::vector<Chunk>& chunks) {
  const auto start = Clock::now();
  const int64_t d = config_.d_model;
  int64_t rows = 0;
  for (const Chunk& c : chunks) rows += static_cast<int64_t>(c.tokens.size());
  Tensor x = Tensor::empty({rows, d}, DType::f32);
  int64_t r = 0;
  for (const Chunk& c : chunks)
    for (int t : c.tokens) {
      if (t < 0 || t >= config_.vocab_size)
        SY_THROW(InvalidArgument, "model: token ", t, ", expected 0..", config_.vocab_size - 1);
      std::memcpy(x.data_as<float>() + r++ * d, embed_.data_as<float>() + t * d, static_cast<size_t>(d) * sizeof(float));
    }
  times_.embed += seconds_since(start);
  return x;
}

void Model::attention(int layer, Tensor& x, const std::vector<Chunk>& chunks) {
  const auto start = Clock::now();
  const Layer& L = layers_.at(static_cast<size_t>(layer));
  const int64_t rows = x.shape()[0], d = config_.d_model;
  const int h = config_.heads, hd = config_.head_dim(), half = hd / 2;
  const Tensor xn = rmsnorm(x, L.attn_norm, config_.norm_eps);
  Tensor q = matmul(xn, L.wq), k = matmul(xn, L.wk), v = matmul(xn, L.wv);
  // Each row's position, and its cache.
  std::vector<int> position(static_cast<size_t>(rows));
  std::vector<KVCache*> cache_of(static_cast<size_t>(rows));
  int64_t r = 0;
  for (const Chunk& c : chunks) {
    const int n = static_cast<int>(c.tokens.size());
    if (!c.cache || !c.cache->fits(config_))
      SY_THROW(InvalidArgument, "model '", config_.name, "': a chunk's KV cache is missing or belongs to a model of "
               "another shape (expected ", config_.layers, " layers of width ", config_.d_model, ")");
    if (c.cache->length() + n > c.cache->capacity())
      SY_THROW(InvalidArgument, "model: a sequence of ", c.cache->length(), " + ", n, " positions exceeds its cache (",
               c.cache->capacity(), ")");
    for (int i = 0; i < n; ++i, ++r) position[static_cast<size_t>(r)] = c.cache->length() + i, cache_of[static_cast<size_t>(r)] = c.cache;
  }
  SY_CHECK_EQ(r, rows, "attention rows");
  auto rope = [&](float* u, int pos) {
    if (pos >= config_.max_seq)
      SY_THROW(InvalidArgument, "model: position ", pos, " is beyond max_seq = ", config_.max_seq);
    const float* cs = rope_cos_.data() + static_cast<size_t>(pos) * half;
    const float* sn = rope_sin_.data() + static_cast<size_t>(pos) * half;
    for (int head = 0; head < h; ++head) {
      float* a = u + head * hd;
      for (int j = 0; j < half; ++j) {
        const float x1 = a[j], x2 = a[j + half];
        a[j] = x1 * cs[j] - x2 * sn[j];
        a[j + half] = x1 * sn[j] + x2 * cs[j];
      }
    }
  };
  for (int64_t i = 0; i < rows; ++i) {
    rope(q.data_as<float>() + i * d, position[static_cast<size_t>(i)]);
    rope(k.data_as<float>() + i * d, position[static_cast<size_t>(i)]);
    KVCache* cache = cache_of[static_cast<size_t>(i)];
    cache->set_key(layer, position[static_cast<size_t>(i)], k.data_as<float>() + i * d);
    std::memcpy(cache->values(layer, position[static_cast<size_t>(i)]), v.data_as<float>() + i * d, static_cast<size_t>(d) * sizeof(float));
  }
  // Each query row over keys 0..its position, in key order: the same arithmetic in any batch.
  Tensor o = Tensor::empty({rows, d}, DType::f32);
  const float scale = 1.f / std::sqrt(static_cast<float>(hd));
#pragma omp parallel for schedule(dynamic) if (rows >= 8)
  for (int64_t i = 0; i < rows; ++i) {
    const KVCache* cache = cache_of[static_cast<size_t>(i)];
    const int pos = position[static_cast<size_t>(i)];
    thread_local std::vector<float> score;
    score.assign(static_cast<size_t>(pos + 1), 0.f);
    float* sc = score.data();
    for (int head = 0; head < h; ++head) {
      const float* qh = q.data_as<float>() + i * d + head * hd;
      // Scores of every key, dimension by dimension over the transposed keys:
      // each score sums its products in dimension order, whatever the batch.
      for (int j = 0; j <= pos; ++j) sc[j] = 0.f;
      for (int t = 0; t < hd; ++t) {
        const float qt = qh[t];
        const float* kt = cache->key_dim(layer, head * hd + t);
#pragma omp simd
        for (int j = 0; j <= pos; ++j) sc[j] += qt * kt[j];
      }
      float m = -INFINITY;
      for (int j = 0; j <= pos; ++j) {
        sc[j] *= scale;
        m = std::max(m, sc[j]);
      }
      float sum = 0.f;
      for (int j = 0; j <= pos; ++j) sum += score[static_cast<size_t>(j)] = std::exp(score[static_cast<size_t>(j)] - m);
      float* oh = o.data_as<float>() + i * d + head * hd;
      for (int t = 0; t < hd; ++t) oh[t] = 0.f;
      for (int j = 0; j <= pos; ++j) {
        const float p = score[static_cast<size_t>(j)] / sum;
        const float* vh = cache->values(layer, j) + head * hd;
        for (int t = 0; t < hd; ++t) oh[t] += p * vh[t];
      }
    }
  }
  kernels::cpu::matmul_rows(o.data_as<float>(), rows, d, d, L.wo.data_as<float>(), d, d, 1.f, x.data_as<float>(), d);
  times_.attention += seconds_since(start);
}

void Model::ffn(int layer, Tensor& x) {
  const auto start = Clock::now();
  Layer& L = layers_.at(static_cast<size_t>(layer));
  const Tensor xn = rmsnorm(x, L.ffn_norm, config_.norm_eps);
  const MoEForward f = L.moe->forward(xn);
  float* out = x.data_as<float>();
  const float* add = f.output.data_as<float>();
  for (int64_t i = 0; i < x.numel(); ++i) out[i] += add[i];
  times_.moe += seconds_since(start);
}

Tensor Model::head(const Tensor& x) {
  const auto start = Clock::now();
  Tensor logits = matmul(rmsnorm(x, norm_, config_.norm_eps), lm_head_);
  times_.head += seconds_since(start);
  return logits;
}

void Model::commit(const std::vector<Chunk>& chunks) {
  for (const Chunk& c : chunks) c.cache->advance(static_cast<int>(c.tokens.size()));
}

Tensor Model::forward(const std::vector<Chunk>& chunks) {
  Tensor x = embed(chunks);
  for (int l = 0; l < config_.layers; ++l) {
    attention(l, x, chunks);
    ffn(l, x);
  }
  Tensor logits = head(x);
  commit(chunks);
  return logits;
}

double Model::expert_bytes() const {
  const int64_t d = config_.d_model, H = config_.hidden;
  const int64_t H1 = config_.activation == "swiglu" ? 2 * H : H;
  return static_cast<double>(d * H1 + H1 + H * d + d) * sizeof(float);
}

double Model::weight_bytes() const {
  const double d = config_.d_model, V = config_.vocab_size;
  const double per_layer = 4 * d * d + 2 * d + d * config_.experts + config_.experts * expert_bytes() / sizeof(float);
  return (2 * V * d + d + config_.layers * per_layer) * sizeof(float);
}

}  // namespace switchyard
