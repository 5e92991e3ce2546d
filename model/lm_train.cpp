#include "model/lm_train.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>

#include "core/error.h"
#include "core/untrusted.h"
#include "core/rng.h"
#include "kernels/gemm.h"
#include "kernels/moe.h"
#include "parallel/checkpoint.h"

namespace switchyard {
namespace {

// C = alpha op(A) op(B) + beta C, row-major; empty products leave beta * C.
void mm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb,
        float beta, float* c, int64_t ldc, float alpha = 1.f) {
  if (m == 0 || n == 0) return;
  if (k == 0) {
    if (beta == 0.f)
      for (int64_t i = 0; i < m; ++i) std::memset(c + i * ldc, 0, static_cast<size_t>(n) * sizeof(float));
    return;
  }
  kernels::GemmArgs g;
  g.transpose_a = ta, g.transpose_b = tb, g.m = m, g.n = n, g.k = k, g.alpha = alpha;
  g.a = a, g.lda = lda, g.b = b, g.ldb = ldb, g.beta = beta, g.c = c, g.ldc = ldc;
  kernels::cpu::gemm_f32(g);
}

Tensor zeros_like(const Tensor& t) { return Tensor::zeros(t.shape(), DType::f32); }

void fill_normal(Tensor& t, Rng& rng, double stddev) { rng.fill_normal(t, 0.0, stddev); }

void fill_ones(Tensor& t) { std::fill(t.data_as<float>(), t.data_as<float>() + t.numel(), 1.f); }

// dx += rstd (dy * w) - x rstd^3 mean(dy * w * x); dw += sum_r dy x rstd.
void rmsnorm_backward(const float* x, const float* w, const float* rstd, const float* dy, int64_t rows, int64_t d,
                      float* dx, float* dw) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * d;
    const float* dyr = dy + r * d;
    double dot = 0;
    for (int64_t j = 0; j < d; ++j) dot += static_cast<double>(dyr[j]) * w[j] * xr[j];
    const double s = rstd[r];
    const float coef = static_cast<float>(s * s * s * dot / static_cast<double>(d));
    for (int64_t j = 0; j < d; ++j) {
      dx[r * d + j] += static_cast<float>(s) * dyr[j] * w[j] - xr[j] * coef;
      dw[j] += dyr[j] * xr[j] * static_cast<float>(s);
    }
  }
}


}  // namespace

TrainableLM::TrainableLM(const ModelConfig& config, std::shared_ptr<Communicator> world, LmTrainOptions options)
    : config_(config), world_(std::move(world)), options_(std::move(options)), rope_(config_) {
  const ModelConfig& c = config_;
  const int W = world_->size();
  if (c.experts % W != 0)
    SY_THROW(InvalidArgument, "training '", c.name, "': ", c.experts, " experts cannot be split into whole experts "
             "over ", W, " ranks (expected a rank count dividing the expert count)");
  if (c.d_model % c.heads != 0 || c.head_dim() % 2 != 0)
    SY_THROW(InvalidArgument, "training '", c.name, "': d_model ", c.d_model, " over ", c.heads,
             " heads, expected an even head width");
  const int64_t d = c.d_model, V = c.vocab_size;
  embed_ = Tensor::zeros({V, d}, DType::f32);
  norm_ = Tensor::zeros({d}, DType::f32);
  lm_head_ = Tensor::zeros({d, V}, DType::f32);
  const auto act = kernels::parse_activation(c.activation);
  if (!act) SY_THROW(InvalidArgument, "training: activation '", c.activation, "', expected relu, gelu or swiglu");
  for (int i = 0; i < c.layers; ++i) {
    Dense w{Tensor::zeros({d}, DType::f32),    Tensor::zeros({d, d}, DType::f32), Tensor::zeros({d, d}, DType::f32),
            Tensor::zeros({d, d}, DType::f32), Tensor::zeros({d, d}, DType::f32), Tensor::zeros({d}, DType::f32)};
    dense_.push_back(w);
    MoEConfig mc;
    mc.model_dim = d;
    mc.hidden_dim = c.hidden;
    mc.activation = *act;
    mc.router.experts = c.experts;
    mc.router.k = c.k;
    mc.router.gate = c.gate == "sigmoid_bias" ? GateKind::sigmoid_bias : GateKind::softmax;
    mc.router.renormalize = c.renormalize;
    mc.router.capacity_factor = options_.capacity_factor;
    mc.router.capacity_rounding = options_.capacity_rounding;
    mc.router.balance_loss = options_.balance_loss;
    mc.plan = options_.plan;
    mc.node_size = options_.node_size;
    mc.compute = options_.compute;
    moe_.push_back(std::make_unique<MoELayer>(mc, world_));
  }
  zero_grad();
}

int TrainableLM::local_experts(int layer) const {
  return moe_.at(static_cast<size_t>(layer))->layout().slots(world_->rank());
}

int TrainableLM::expert_at_slot(int layer, int slot) const {
  return moe_.at(static_cast<size_t>(layer))->layout().expert_at(world_->rank(), slot);
}

void TrainableLM::init_parameters(uint64_t seed) {
  const double d = config_.d_model;
  Rng rng(seed);  // replicated tensors: the same draws on every rank
  fill_normal(embed_, rng, 0.02);
  fill_ones(norm_);
  fill_normal(lm_head_, rng, 1.0 / std::sqrt(d));
  for (size_t i = 0; i < dense_.size(); ++i) {
    Dense& w = dense_[i];
    fill_ones(w.attn_norm);
    fill_ones(w.ffn_norm);
    for (Tensor* t : {&w.wq, &w.wk, &w.wv, &w.wo}) fill_normal(*t, rng, 1.0 / std::sqrt(d));
    moe_[i]->init_parameters(seed * 1000 + i);
  }
}

void TrainableLM::zero_grad() {
  g_embed_ = zeros_like(embed_);
  g_norm_ = zeros_like(norm_);
  g_lm_head_ = zeros_like(lm_head_);
  grads_.clear();
  for (const Dense& w : dense_)
    grads_.push_back({zeros_like(w.attn_norm), zeros_like(w.wq), zeros_like(w.wk), zeros_like(w.wv), zeros_like(w.wo),
                      zeros_like(w.ffn_norm)});
  for (auto& m : moe_) m->zero_grad();
}

std::vector<TrainParam> TrainableLM::parameters() {
  std::vector<TrainParam> out;
  auto add = [&](std::string name, const Tensor& v, const Tensor& g, ParamKind kind, int layer) {
    out.push_back({std::move(name), v, g, kind, layer});
  };
  add("embed.weight", embed_, g_embed_, ParamKind::replicated, -1);
  for (size_t i = 0; i < dense_.size(); ++i) {
    const std::string p = "layers." + std::to_string(i) + ".";
    const int l = static_cast<int>(i);
    const Dense &w = dense_[i], &g = grads_[i];
    add(p + "attn_norm.weight", w.attn_norm, g.attn_norm, ParamKind::replicated, l);
    add(p + "attn.wq", w.wq, g.wq, ParamKind::replicated, l);
    add(p + "attn.wk", w.wk, g.wk, ParamKind::replicated, l);
    add(p + "attn.wv", w.wv, g.wv, ParamKind::replicated, l);
    add(p + "attn.wo", w.wo, g.wo, ParamKind::replicated, l);
    add(p + "ffn_norm.weight", w.ffn_norm, g.ffn_norm, ParamKind::replicated, l);
    MoELayer& m = *moe_[i];
    add(p + "ffn.gate.weight", m.gate_weight(), m.gate_grad(), ParamKind::gate, l);
    add(p + "ffn.experts.w1", m.params().w1, m.expert_grads().w1, ParamKind::expert, l);
    add(p + "ffn.experts.b1", m.params().b1, m.expert_grads().b1, ParamKind::expert, l);
    add(p + "ffn.experts.w2", m.params().w2, m.expert_grads().w2, ParamKind::expert, l);
    add(p + "ffn.experts.b2", m.params().b2, m.expert_grads().b2, ParamKind::expert, l);
  }
  add("norm.weight", norm_, g_norm_, ParamKind::replicated, -1);
  add("lm_head.weight", lm_head_, g_lm_head_, ParamKind::replicated, -1);
  return out;
}

void TrainableLM::all_reduce_gradients() {
  // One flat buffer, one all-reduce: the replicated gradients are many small tensors.
  std::vector<TrainParam> params = parameters();
  int64_t total = 0;
  for (const TrainParam& p : params)
    if (p.kind == ParamKind::replicated) total += p.grad.numel();
  Tensor flat = Tensor::empty({total}, DType::f32);
  int64_t at = 0;
  for (const TrainParam& p : params)
    if (p.kind == ParamKind::replicated) {
      std::memcpy(flat.data_as<float>() + at, p.grad.data(), p.grad.nbytes());
      at += p.grad.numel();
    }
  world_->allreduce(flat, flat).wait();
  at = 0;
  for (const TrainParam& p : params)
    if (p.kind == ParamKind::replicated) {
      std::memcpy(p.grad.data(), flat.data_as<float>() + at, p.grad.nbytes());
      at += p.grad.numel();
    }
}

double TrainableLM::gradient_norm() {
  double shared = 0, experts = 0;  // shared: identical on every rank once reduced
  for (const TrainParam& p : parameters()) {
    double s = 0;
    const float* g = p.grad.data_as<float>();
    const int64_t n = p.grad.numel();
    for (int64_t i = 0; i < n; ++i) s += static_cast<double>(g[i]) * g[i];
    (p.kind == ParamKind::expert ? experts : shared) += s;
  }
  return std::sqrt(shared + allreduce_scalar(*world_, experts));
}

TrainableLM::Loss TrainableLM::forward_backward(const std::vector<int>& tokens, const std::vector<int>& targets,
                                                int sequences, int seq, double global_targets, double balance_coef,
                                                double z_coef) {
  return run(tokens, &targets, sequences, seq, true, global_targets, balance_coef, z_coef, nullptr);
}

TrainableLM::Loss TrainableLM::evaluate(const std::vector<int>& tokens, const std::vector<int>& targets, int sequences,
                                        int seq) {
  return run(tokens, &targets, sequences, seq, false, 1.0, 0.0, 0.0, nullptr);
}

Tensor TrainableLM::logits(const std::vector<int>& tokens, int sequences, int seq) {
  Tensor out;
  run(tokens, nullptr, sequences, seq, false, 1.0, 0.0, 0.0, &out);
  return out;
}

void TrainableLM::attention_forward(const Dense& w, LayerCache& c, int B, int T) {
  const int64_t d = config_.d_model, N = static_cast<int64_t>(B) * T;
  const int h = config_.heads, hd = config_.head_dim();
  c.q = Tensor::empty({N, d}, DType::f32);
  c.k = Tensor::empty({N, d}, DType::f32);
  c.v = Tensor::empty({N, d}, DType::f32);
  mm(false, false, N, d, d, c.a.data_as<float>(), d, w.wq.data_as<float>(), d, 0.f, c.q.data_as<float>(), d);
  mm(false, false, N, d, d, c.a.data_as<float>(), d, w.wk.data_as<float>(), d, 0.f, c.k.data_as<float>(), d);
  mm(false, false, N, d, d, c.a.data_as<float>(), d, w.wv.data_as<float>(), d, 0.f, c.v.data_as<float>(), d);
  for (int64_t r = 0; r < N; ++r) {
    rope_.apply(c.q.data_as<float>() + r * d, static_cast<int>(r % T), h);
    rope_.apply(c.k.data_as<float>() + r * d, static_cast<int>(r % T), h);
  }
  c.p = Tensor::empty({static_cast<int64_t>(B) * h, T, T}, DType::f32);
  c.o = Tensor::empty({N, d}, DType::f32);
  const float scale = 1.f / std::sqrt(static_cast<float>(hd));
  float* const p_all = c.p.data_as<float>();
  const float *const qd = c.q.data_as<float>(), *const kd = c.k.data_as<float>(), *const vd = c.v.data_as<float>();
  float* const od = c.o.data_as<float>();
  // One (sequence, head) per iteration: the GEMMs are small, so the threads split the pairs, each GEMM on one.
#pragma omp parallel for schedule(static) if (B * h > 1)
  for (int bh = 0; bh < B * h; ++bh) {
    const int b = bh / h, head = bh % h;
    {
      float* P = p_all + static_cast<int64_t>(bh) * T * T;
      const int64_t at = static_cast<int64_t>(b) * T * d + head * hd;
      mm(false, true, T, T, hd, qd + at, d, kd + at, d, 0.f, P, T, scale);
      for (int i = 0; i < T; ++i) {  // causal softmax: query i sees keys 0..i
        float* row = P + static_cast<int64_t>(i) * T;
        float mx = row[0];
        for (int j = 1; j <= i; ++j) mx = std::max(mx, row[j]);
        double sum = 0;
        for (int j = 0; j <= i; ++j) sum += row[j] = std::exp(row[j] - mx);
        const float inv = static_cast<float>(1.0 / sum);
        for (int j = 0; j <= i; ++j) row[j] *= inv;
        for (int j = i + 1; j < T; ++j) row[j] = 0.f;
      }
      mm(false, false, T, hd, T, P, T, vd + at, d, 0.f, od + at, d);
    }
  }
}

void TrainableLM::attention_backward(const Dense& w, Dense& g, const LayerCache& c, int B, int T, Tensor& dx) {
  const int64_t d = config_.d_model, N = static_cast<int64_t>(B) * T;
  const int h = config_.heads, hd = config_.head_dim();
  // x_mid = x_in + o wo: the residual passes dx through; wo and o get theirs.
  Tensor d_o = Tensor::empty({N, d}, DType::f32);
  mm(true, false, d, d, N, c.o.data_as<float>(), d, dx.data_as<float>(), d, 1.f, g.wo.data_as<float>(), d);
  mm(false, true, N, d, d, dx.data_as<float>(), d, w.wo.data_as<float>(), d, 0.f, d_o.data_as<float>(), d);
  Tensor dq = Tensor::empty({N, d}, DType::f32), dk = Tensor::empty({N, d}, DType::f32);
  Tensor dv = Tensor::empty({N, d}, DType::f32);
  const float scale = 1.f / std::sqrt(static_cast<float>(hd));
  const float* const p_all = c.p.data_as<float>();
  const float *const qd = c.q.data_as<float>(), *const kd = c.k.data_as<float>(), *const vd = c.v.data_as<float>();
  const float* const dod = d_o.data_as<float>();
  float *const dqd = dq.data_as<float>(), *const dkd = dk.data_as<float>(), *const dvd = dv.data_as<float>();
#pragma omp parallel for schedule(static) if (B * h > 1)
  for (int bh = 0; bh < B * h; ++bh) {
    const int b = bh / h, head = bh % h;
    thread_local std::vector<float> dP;
    dP.resize(static_cast<size_t>(T) * T);
    {
      const float* P = p_all + static_cast<int64_t>(bh) * T * T;
      const int64_t at = static_cast<int64_t>(b) * T * d + head * hd;
      mm(false, true, T, T, hd, dod + at, d, vd + at, d, 0.f, dP.data(), T);
      mm(true, false, T, hd, T, P, T, dod + at, d, 0.f, dvd + at, d);
      for (int i = 0; i < T; ++i) {  // dS = P (dP - rowsum(dP P)) * scale, zero above the diagonal
        float* row = dP.data() + static_cast<int64_t>(i) * T;
        const float* prow = P + static_cast<int64_t>(i) * T;
        double dot = 0;
        for (int j = 0; j <= i; ++j) dot += static_cast<double>(row[j]) * prow[j];
        for (int j = 0; j <= i; ++j) row[j] = prow[j] * (row[j] - static_cast<float>(dot)) * scale;
        for (int j = i + 1; j < T; ++j) row[j] = 0.f;
      }
      mm(false, false, T, hd, T, dP.data(), T, kd + at, d, 0.f, dqd + at, d);
      mm(true, false, T, hd, T, dP.data(), T, qd + at, d, 0.f, dkd + at, d);
    }
  }
  for (int64_t r = 0; r < N; ++r) {  // back through the rotation: its transpose
    rope_.apply_inverse(dq.data_as<float>() + r * d, static_cast<int>(r % T), h);
    rope_.apply_inverse(dk.data_as<float>() + r * d, static_cast<int>(r % T), h);
  }
  const float* a = c.a.data_as<float>();
  mm(true, false, d, d, N, a, d, dq.data_as<float>(), d, 1.f, g.wq.data_as<float>(), d);
  mm(true, false, d, d, N, a, d, dk.data_as<float>(), d, 1.f, g.wk.data_as<float>(), d);
  mm(true, false, d, d, N, a, d, dv.data_as<float>(), d, 1.f, g.wv.data_as<float>(), d);
  Tensor da = Tensor::empty({N, d}, DType::f32);
  mm(false, true, N, d, d, dq.data_as<float>(), d, w.wq.data_as<float>(), d, 0.f, da.data_as<float>(), d);
  mm(false, true, N, d, d, dk.data_as<float>(), d, w.wk.data_as<float>(), d, 1.f, da.data_as<float>(), d);
  mm(false, true, N, d, d, dv.data_as<float>(), d, w.wv.data_as<float>(), d, 1.f, da.data_as<float>(), d);
  rmsnorm_backward(c.x_in.data_as<float>(), w.attn_norm.data_as<float>(), c.rstd1.data_as<float>(),
                   da.data_as<float>(), N, d, dx.data_as<float>(), g.attn_norm.data_as<float>());
}

TrainableLM::Loss TrainableLM::run(const std::vector<int>& tokens, const std::vector<int>* targets, int B, int T,
                                   bool backward, double global_targets, double balance_coef, double z_coef,
                                   Tensor* logits_out) {
  const ModelConfig& cfg = config_;
  const int64_t d = cfg.d_model, V = cfg.vocab_size, N = static_cast<int64_t>(B) * T;
  if (B < 0 || T < 1 || T > cfg.max_seq)
    SY_THROW(InvalidArgument, "training: ", B, " sequences of ", T, " tokens, expected seq in 1..max_seq = ", cfg.max_seq);
  if (static_cast<int64_t>(tokens.size()) != N || (targets && static_cast<int64_t>(targets->size()) != N))
    SY_THROW(InvalidArgument, "training: ", tokens.size(), " tokens and ", targets ? targets->size() : 0,
             " targets for ", B, " x ", T);
  for (int64_t r = 0; r < N; ++r)
    for (int t : {tokens[static_cast<size_t>(r)], targets ? (*targets)[static_cast<size_t>(r)] : 0})
      if (t < 0 || t >= V) SY_THROW(InvalidArgument, "training: token ", t, " at row ", r, ", expected 0..", V - 1);
  Tensor x = Tensor::empty({N, d}, DType::f32);
  for (int64_t r = 0; r < N; ++r)
    std::memcpy(x.data_as<float>() + r * d, embed_.data_as<float>() + tokens[static_cast<size_t>(r)] * d,
                static_cast<size_t>(d) * sizeof(float));
  Loss loss;
  std::vector<LayerCache> caches(static_cast<size_t>(cfg.layers));
  // The losses' weights per layer and rank: the job's loss averages the layers and sums the ranks' over W.
  const double layer_coef = balance_coef / world_->size() / cfg.layers, layer_z = z_coef / world_->size() / cfg.layers;
  for (int l = 0; l < cfg.layers; ++l) {
    const Dense& w = dense_[static_cast<size_t>(l)];
    LayerCache& c = caches[static_cast<size_t>(l)];
    c.x_in = x.clone();
    c.rstd1 = Tensor::empty({N}, DType::f32);
    c.a = Tensor::empty({N, d}, DType::f32);
    rmsnorm_rows(x.data_as<float>(), w.attn_norm.data_as<float>(), N, d, cfg.norm_eps, c.a.data_as<float>(),
                    c.rstd1.data_as<float>());
    attention_forward(w, c, B, T);
    mm(false, false, N, d, d, c.o.data_as<float>(), d, w.wo.data_as<float>(), d, 1.f, x.data_as<float>(), d);
    c.x_mid = x.clone();
    c.rstd2 = Tensor::empty({N}, DType::f32);
    c.xn2 = Tensor::empty({N, d}, DType::f32);
    rmsnorm_rows(x.data_as<float>(), w.ffn_norm.data_as<float>(), N, d, cfg.norm_eps, c.xn2.data_as<float>(),
                    c.rstd2.data_as<float>());
    MoELayer& moe = *moe_[static_cast<size_t>(l)];
    PlanChooser* chooser = static_cast<size_t>(l) < choosers_.size() ? choosers_[static_cast<size_t>(l)] : nullptr;
    const MoEForward f = chooser ? moe.forward(c.xn2, moe.routing_choice(), *chooser)
                                 : moe.forward(c.xn2, moe.routing_choice(), options_.plan);
    kernels::cpu::axpy(1.f, f.output.data_as<float>(), x.numel(), x.data_as<float>());
    loss.balance += f.balance_loss / cfg.layers;
  }
  Tensor rstd_f = Tensor::empty({N}, DType::f32), xf = Tensor::empty({N, d}, DType::f32);
  rmsnorm_rows(x.data_as<float>(), norm_.data_as<float>(), N, d, cfg.norm_eps, xf.data_as<float>(),
                  rstd_f.data_as<float>());
  Tensor logits = Tensor::empty({N, V}, DType::f32);
  mm(false, false, N, V, d, xf.data_as<float>(), d, lm_head_.data_as<float>(), V, 0.f, logits.data_as<float>(), V);
  if (logits_out) *logits_out = logits.clone();
  if (!targets) return loss;
  // Cross-entropy; dlogits = (softmax - onehot) / global_targets, in place.
  const double inv = 1.0 / global_targets;
  for (int64_t r = 0; r < N; ++r) {
    float* row = logits.data_as<float>() + r * V;
    const float mx = *std::max_element(row, row + V);
    double sum = 0;
    for (int64_t j = 0; j < V; ++j) sum += std::exp(static_cast<double>(row[j] - mx));
    const double lse = mx + std::log(sum);
    const int target = (*targets)[static_cast<size_t>(r)];
    loss.ce_sum += lse - row[target];
    if (backward) {
      for (int64_t j = 0; j < V; ++j) row[j] = static_cast<float>(std::exp(row[j] - lse) * inv);
      row[target] -= static_cast<float>(inv);
    }
  }
  loss.targets = N;
  if (!backward) return loss;
  // Head and final norm.
  mm(true, false, d, V, N, xf.data_as<float>(), d, logits.data_as<float>(), V, 1.f, g_lm_head_.data_as<float>(), V);
  Tensor dxf = Tensor::empty({N, d}, DType::f32);
  mm(false, true, N, d, V, logits.data_as<float>(), V, lm_head_.data_as<float>(), V, 0.f, dxf.data_as<float>(), d);
  Tensor dx = Tensor::zeros({N, d}, DType::f32);
  rmsnorm_backward(x.data_as<float>(), norm_.data_as<float>(), rstd_f.data_as<float>(), dxf.data_as<float>(), N, d,
                   dx.data_as<float>(), g_norm_.data_as<float>());
  for (int l = cfg.layers - 1; l >= 0; --l) {
    const Dense& w = dense_[static_cast<size_t>(l)];
    Dense& g = grads_[static_cast<size_t>(l)];
    const LayerCache& c = caches[static_cast<size_t>(l)];
    // x_out = x_mid + moe(norm(x_mid)): dx flows on, and through the layer and its norm.
    const Tensor dxn2 = moe_[static_cast<size_t>(l)]->backward(dx, layer_coef, layer_z, true);
    rmsnorm_backward(c.x_mid.data_as<float>(), w.ffn_norm.data_as<float>(), c.rstd2.data_as<float>(),
                     dxn2.data_as<float>(), N, d, dx.data_as<float>(), g.ffn_norm.data_as<float>());
    attention_backward(w, g, c, B, T, dx);
  }
  for (int64_t r = 0; r < N; ++r) {
    float* ge = g_embed_.data_as<float>() + tokens[static_cast<size_t>(r)] * d;
    const float* dr = dx.data_as<float>() + r * d;
    for (int64_t j = 0; j < d; ++j) ge[j] += dr[j];
  }
  return loss;
}

// ---- AdamW ----

AdamW::Moments& AdamW::moments(const TrainParam& p) {
  auto it = state_.find(p.name);
  if (it == state_.end())
    it = state_.emplace(p.name, Moments{Tensor::zeros(p.value.shape(), DType::f32), Tensor::zeros(p.value.shape(), DType::f32)})
             .first;
  if (it->second.m.shape() != p.value.shape())
    SY_THROW(InvalidArgument, "AdamW: parameter '", p.name, "' is ", shape_string(p.value.shape()), ", its moments ",
             shape_string(it->second.m.shape()));
  return it->second;
}

void AdamW::step(std::vector<TrainParam>& params, double lr) {
  ++steps_;
  const double b1 = options_.beta1, b2 = options_.beta2;
  const double c1 = 1.0 - std::pow(b1, static_cast<double>(steps_)), c2 = 1.0 - std::pow(b2, static_cast<double>(steps_));
  for (TrainParam& p : params) {
    Moments& s = moments(p);
    float* w = p.value.data_as<float>();
    const float* g = p.grad.data_as<float>();
    float* m = s.m.data_as<float>();
    float* v = s.v.data_as<float>();
    // In float, so the loop vectorises (the moments are stored in float anyway).
    const float decay = static_cast<float>(1.0 - lr * options_.weight_decay);
    const float fb1 = static_cast<float>(b1), fb2 = static_cast<float>(b2), rest1 = static_cast<float>(1 - b1),
                rest2 = static_cast<float>(1 - b2), inv_c1 = static_cast<float>(1 / c1),
                inv_c2 = static_cast<float>(1 / c2), eps = static_cast<float>(options_.eps), step = static_cast<float>(lr);
    const int64_t n = p.value.numel();
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      m[i] = fb1 * m[i] + rest1 * g[i];
      v[i] = fb2 * v[i] + rest2 * g[i] * g[i];
      w[i] = w[i] * decay - step * ((m[i] * inv_c1) / (std::sqrt(v[i] * inv_c2) + eps));
    }
  }
}

double warmup_cosine_lr(double lr, int64_t step, int64_t warmup, int64_t steps, double min_ratio) {
  const double warm = warmup > 0 ? std::min(1.0, static_cast<double>(step + 1) / static_cast<double>(warmup)) : 1.0;
  const double progress = steps > 1 ? std::min(1.0, static_cast<double>(step) / static_cast<double>(steps - 1)) : 1.0;
  return lr * warm * (min_ratio + (1 - min_ratio) * 0.5 * (1 + std::cos(M_PI * progress)));
}

// ---- checkpoints ----

std::string model_config_json(const ModelConfig& c) {
  nlohmann::ordered_json j = {{"name", c.name},         {"vocab_size", c.vocab_size}, {"d_model", c.d_model},
                              {"layers", c.layers},     {"heads", c.heads},           {"norm_eps", c.norm_eps},
                              {"rope_theta", c.rope_theta}, {"max_seq", c.max_seq}};
  j["ffn"] = {{"experts", c.experts},       {"k", c.k},       {"hidden", c.hidden},
              {"activation", c.activation}, {"gate", c.gate}, {"renormalize", c.renormalize}};
  return j.dump(2) + "\n";
}

namespace {

// The checkpoint's name of slot `slot`'s part of an expert tensor ("layers.0.ffn.experts.w1" -> "...experts.5.w1").
std::string expert_name(const std::string& stacked, int expert) {
  const auto dot = stacked.rfind('.');
  return stacked.substr(0, dot) + "." + std::to_string(expert) + stacked.substr(dot);
}

// One slot of a [L, ...] tensor as a view.
TensorView slot_view(const Tensor& t, int slot) {
  Shape inner(t.shape().begin() + 1, t.shape().end());
  const int64_t per = shape_numel(inner);
  return TensorView(t.data_as<float>() + slot * per, DType::f32, inner);
}

}  // namespace

uint64_t save_lm_checkpoint(TrainableLM& model, const AdamW& optimizer, const std::string& dir,
                            std::map<std::string, std::string> metadata) {
  const bool leader = model.world().rank() == 0;
  std::vector<std::pair<std::string, TensorView>> tensors;
  auto add = [&](const std::string& name, const TrainParam& p, const Tensor& t) {
    if (p.kind != ParamKind::expert) {
      if (leader) tensors.emplace_back(name, t.view());
      return;
    }
    for (int s = 0; s < model.local_experts(p.layer); ++s)
      tensors.emplace_back(expert_name(name, model.expert_at_slot(p.layer, s)), slot_view(t, s));
  };
  const std::vector<TrainParam> params = model.parameters();
  for (const TrainParam& p : params) {
    add(p.name, p, p.value);
    const auto it = optimizer.state().find(p.name);
    if (it == optimizer.state().end()) continue;  // not stepped yet
    add("adamw.m." + p.name, p, it->second.m);
    add("adamw.v." + p.name, p, it->second.v);
  }
  metadata["adamw_steps"] = std::to_string(optimizer.steps());
  metadata["model_config"] = model_config_json(model.config());
  // The architecture also beside the manifest, for people and tools that read config.json.
  return save_checkpoint(model.world(), dir, tensors, metadata, {{"config.json", model_config_json(model.config())}});
}

static std::map<std::string, std::string> load_lm_checkpoint_here(TrainableLM& model, AdamW* optimizer,
                                                                  const std::string& dir);

std::map<std::string, std::string> load_lm_checkpoint(TrainableLM& model, AdamW* optimizer, const std::string& dir) {
  // Every rank reads; one rank's failure (a missing expert, a directory it cannot see) fails them all alike.
  std::map<std::string, std::string> meta;
  std::string error;
  try {
    meta = load_lm_checkpoint_here(model, optimizer, dir);
  } catch (const std::exception& e) {
    error = e.what();
  }
  agree_on_success(model.world(), dir, error, "load it");
  return meta;
}

static std::map<std::string, std::string> load_lm_checkpoint_here(TrainableLM& model, AdamW* optimizer,
                                                                  const std::string& dir) {
  const Checkpoint ckpt = Checkpoint::open(dir);
  const std::string ours = model_config_json(model.config()), theirs = ckpt.meta("model_config");
  if (parse_untrusted_json(ours, "this run's model config") != parse_untrusted_json(theirs, "the checkpoint's model config"))
    SY_THROW(InvalidArgument, "checkpoint '", dir, "' holds another architecture:\n", theirs, "expected:\n", ours);
  auto load_into = [&](const std::string& name, const TrainParam& p, Tensor& t) {
    if (p.kind != ParamKind::expert) {
      const Tensor v = ckpt.load_f32(name, t.shape());
      std::memcpy(t.data(), v.data(), v.nbytes());
      return;
    }
    for (int s = 0; s < model.local_experts(p.layer); ++s) {
      const TensorView slot = slot_view(t, s);
      const Tensor v = ckpt.load_f32(expert_name(name, model.expert_at_slot(p.layer, s)), slot.shape());
      std::memcpy(slot.data(), v.data(), v.nbytes());
    }
  };
  for (TrainParam& p : model.parameters()) {
    load_into(p.name, p, p.value);
    if (!optimizer || !ckpt.contains(p.kind == ParamKind::expert
                                         ? expert_name("adamw.m." + p.name, model.expert_at_slot(p.layer, 0))
                                         : "adamw.m." + p.name))
      continue;
    AdamW::Moments& m = optimizer->moments(p);
    load_into("adamw.m." + p.name, p, m.m);
    load_into("adamw.v." + p.name, p, m.v);
  }
  if (optimizer) optimizer->set_steps(std::stoll(ckpt.meta("adamw_steps")));
  auto meta = ckpt.metadata();
  meta["generation"] = std::to_string(ckpt.generation());
  meta["world_size"] = std::to_string(ckpt.world_size());
  return meta;
}

}  // namespace switchyard

namespace switchyard {

// ---- data ----

TextCorpus TextCorpus::fortunes(const std::string& dir) {
  namespace fs = std::filesystem;
  std::vector<std::string> names;
  if (fs::is_directory(dir))
    for (const auto& entry : fs::directory_iterator(dir)) {
      const std::string name = entry.path().filename().string();
      if (entry.is_regular_file() && name.find('.') == std::string::npos && name != "art" && name != "ascii-art")
        names.push_back(name);
    }
  if (names.empty())
    SY_THROW(IoError, "no fortune files in '", dir, "': install the Debian package fortunes (scripts/install-deps.sh)");
  std::sort(names.begin(), names.end());
  TextCorpus c;
  int64_t index = 0;
  for (const std::string& name : names) {
    std::ifstream in(dir + "/" + name, std::ios::binary);
    const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    size_t at = 0;
    while (at <= text.size()) {  // split on "\n%\n", as Python's bytes.split does
      size_t end = text.find("\n%\n", at);
      if (end == std::string::npos) end = text.size();
      std::string fortune = text.substr(at, end - at);
      const size_t first = fortune.find_first_not_of('\n');
      fortune = first == std::string::npos ? std::string() : fortune.substr(first);
      while (!fortune.empty() && fortune.back() == '\n') fortune.pop_back();
      if (index % 10 == 9) {
        c.held_out += fortune + "\n\n";
        c.held_out_documents.push_back(fortune + "\n\n");
      } else {
        c.train += fortune + "\n\n";
      }
      ++index;
      if (end == text.size()) break;
      at = end + 3;
    }
  }
  return c;
}

double TextCorpus::unigram_nats() const {
  std::vector<double> counts(256, 1.0);
  for (unsigned char b : train) counts[b] += 1;
  double total = 0;
  for (double n : counts) total += n;
  double sum = 0;
  for (unsigned char b : held_out) sum -= std::log(counts[b] / total);
  return held_out.empty() ? 0.0 : sum / static_cast<double>(held_out.size());
}

// ---- the loop ----

LmTrainer::LmTrainer(TrainableLM& model, const TextCorpus& corpus, LmTrainSchedule schedule)
    : model_(model), corpus_(corpus), schedule_(schedule), optimizer_(schedule.adam) {
  if (schedule_.seq < 1 || schedule_.seq > model_.config().max_seq)
    SY_THROW(InvalidArgument, "training: seq = ", schedule_.seq, ", expected 1..max_seq = ", model_.config().max_seq);
  if (schedule_.batch < 1) SY_THROW(InvalidArgument, "training: batch = ", schedule_.batch, ", expected >= 1");
  if (static_cast<int64_t>(corpus_.train.size()) < schedule_.seq + 2)
    SY_THROW(InvalidArgument, "training: the text has ", corpus_.train.size(), " bytes, fewer than seq + 2 = ",
             schedule_.seq + 2);
}

std::vector<int64_t> LmTrainer::starts(int64_t step) const {
  // The whole batch from the step alone, then this rank's share (the first batch % W ranks one more).
  std::mt19937_64 rng(schedule_.seed * 0x9E3779B97F4A7C15ull + static_cast<uint64_t>(step));
  std::uniform_int_distribution<int64_t> pick(0, static_cast<int64_t>(corpus_.train.size()) - schedule_.seq - 2);
  std::vector<int64_t> all(static_cast<size_t>(schedule_.batch));
  for (int64_t& s : all) s = pick(rng);
  const int W = model_.world().size(), R = model_.world().rank();
  const int base = schedule_.batch / W, extra = schedule_.batch % W;
  const int first = R * base + std::min(R, extra), count = base + (R < extra ? 1 : 0);
  return {all.begin() + first, all.begin() + first + count};
}

std::vector<int> LmTrainer::window(const std::string& text, int64_t start, int offset) const {
  std::vector<int> out(static_cast<size_t>(schedule_.seq));
  for (int t = 0; t < schedule_.seq; ++t) out[static_cast<size_t>(t)] = static_cast<unsigned char>(text[static_cast<size_t>(start + t + offset)]);
  return out;
}

LmTrainer::Step LmTrainer::step() {
  const int T = schedule_.seq;
  std::vector<int> tokens, targets;
  const std::vector<int64_t> mine = starts(next_);
  for (int64_t s : mine) {
    const auto x = window(corpus_.train, s, 0), y = window(corpus_.train, s, 1);
    tokens.insert(tokens.end(), x.begin(), x.end());
    targets.insert(targets.end(), y.begin(), y.end());
  }
  Step out;
  out.step = next_;
  out.lr = warmup_cosine_lr(schedule_.lr, next_, schedule_.warmup, schedule_.steps, schedule_.min_lr_ratio);
  model_.zero_grad();
  const TrainableLM::Loss loss = model_.forward_backward(tokens, targets, static_cast<int>(mine.size()), T,
                                                         static_cast<double>(schedule_.batch) * T, schedule_.balance_coef,
                                                         schedule_.z_coef);
  model_.all_reduce_gradients();
  std::vector<TrainParam> params = model_.parameters();
  out.grad_norm = model_.gradient_norm();
  if (schedule_.clip > 0 && out.grad_norm > schedule_.clip) {
    const float scale = static_cast<float>(schedule_.clip / out.grad_norm);
    for (TrainParam& p : params) {
      float* g = p.grad.data_as<float>();
      const int64_t n = p.grad.numel();
      for (int64_t i = 0; i < n; ++i) g[i] *= scale;
    }
  }
  optimizer_.step(params, out.lr);
  double sums[2] = {loss.ce_sum, loss.balance};
  model_.world().allreduce(TensorView(sums, DType::f64, {2}), TensorView(sums, DType::f64, {2})).wait();
  out.loss = sums[0] / (static_cast<double>(schedule_.batch) * T);
  out.balance = sums[1] / model_.world().size();
  ++next_;
  return out;
}

double LmTrainer::held_out_loss(int sequences) {
  const int T = schedule_.seq, W = model_.world().size(), R = model_.world().rank();
  const int64_t n = std::min<int64_t>(sequences, (static_cast<int64_t>(corpus_.held_out.size()) - 1) / T);
  if (n < 1)
    SY_THROW(InvalidArgument, "training: the held-out text has ", corpus_.held_out.size(), " bytes, fewer than seq + 1 = ",
             T + 1, ": nothing to evaluate");
  std::vector<int64_t> mine;
  for (int64_t j = R; j < n; j += W) mine.push_back(j * T);
  // Every rank runs as many rounds as the busiest one (an empty batch still joins each all-to-all).
  const int per_round = 8;
  const int64_t rounds = (((n + W - 1) / W) + per_round - 1) / per_round;
  double sums[2] = {0, 0};
  for (int64_t round = 0; round < rounds; ++round) {
    std::vector<int> tokens, targets;
    int count = 0;
    for (size_t i = static_cast<size_t>(round * per_round); i < mine.size() && count < per_round; ++i, ++count) {
      const auto x = window(corpus_.held_out, mine[i], 0), y = window(corpus_.held_out, mine[i], 1);
      tokens.insert(tokens.end(), x.begin(), x.end());
      targets.insert(targets.end(), y.begin(), y.end());
    }
    const TrainableLM::Loss loss = model_.evaluate(tokens, targets, count, T);
    sums[0] += loss.ce_sum;
    sums[1] += static_cast<double>(loss.targets);
  }
  model_.world().allreduce(TensorView(sums, DType::f64, {2}), TensorView(sums, DType::f64, {2})).wait();
  return sums[1] > 0 ? sums[0] / sums[1] : 0.0;
}

uint64_t LmTrainer::save(const std::string& dir, std::map<std::string, std::string> extra) {
  extra["next_step"] = std::to_string(next_);
  extra["data_seed"] = std::to_string(schedule_.seed);
  extra["data_position"] = std::to_string(next_);  // batches are drawn from the step number
  extra["batch"] = std::to_string(schedule_.batch);
  extra["seq"] = std::to_string(schedule_.seq);
  return save_lm_checkpoint(model_, optimizer_, dir, std::move(extra));
}

std::map<std::string, std::string> LmTrainer::resume(const std::string& dir) {
  auto meta = load_lm_checkpoint(model_, &optimizer_, dir);
  // The batches a resumed run draws must be the ones the saved run would have drawn next (the same metadata
  // on every rank, so all refuse alike).
  for (const auto& [key, ours] : {std::pair<std::string, std::string>{"data_seed", std::to_string(schedule_.seed)},
                                  {"batch", std::to_string(schedule_.batch)},
                                  {"seq", std::to_string(schedule_.seq)}}) {
    const auto it = meta.find(key);
    if (it == meta.end() || it->second != ours)
      SY_THROW(InvalidArgument, "checkpoint '", dir, "' was trained with ", key, " = ",
               it == meta.end() ? std::string("(not recorded)") : it->second, ", this run has ", ours,
               "; resuming would not continue that run");
  }
  next_ = std::stoll(meta.at("next_step"));
  return meta;
}

}  // namespace switchyard
