#include "moe/moe_layer.h"

#include <cmath>
#include <cstring>
#include <numeric>

#include "kernels/gemm.h"

namespace switchyard {

using kernels::cpu::Activation;

void MoEConfig::validate() const {
  if (model_dim < 1) SY_THROW(InvalidArgument, "moe: model_dim = ", model_dim, ", expected >= 1");
  if (hidden_dim < 1) SY_THROW(InvalidArgument, "moe: hidden_dim = ", hidden_dim, ", expected >= 1");
  router.validate();
}

int64_t DispatchPlan::recv_rows() const {
  return std::accumulate(recv_rows_per_rank.begin(), recv_rows_per_rank.end(), int64_t{0});
}

MoELayer::MoELayer(MoEConfig config, std::shared_ptr<Communicator> expert_group)
    : config_(std::move(config)), group_(std::move(expert_group)), layout_(config_.router.experts, group_->size()) {
  config_.validate();
  const int64_t M = config_.model_dim, H = config_.hidden_dim, L = layout_.local_experts();
  gate_weight_ = Tensor::zeros({M, config_.router.experts}, DType::f32);
  params_.w1 = Tensor::zeros({L, M, hidden_in()}, DType::f32);
  params_.b1 = Tensor::zeros({L, hidden_in()}, DType::f32);
  params_.w2 = Tensor::zeros({L, H, M}, DType::f32);
  params_.b2 = Tensor::zeros({L, M}, DType::f32);
}

int64_t MoELayer::hidden_in() const {
  return config_.activation == Activation::swiglu ? 2 * config_.hidden_dim : config_.hidden_dim;
}

void MoELayer::init_parameters(uint64_t seed) {
  const int64_t M = config_.model_dim, H = config_.hidden_dim, H1 = hidden_in();
  Rng gate_rng(seed);
  gate_rng.fill_uniform(gate_weight_, -1.0 / std::sqrt(M), 1.0 / std::sqrt(M));
  const int me = group_->rank();
  for (int slot = 0; slot < layout_.local_experts(); ++slot) {
    Rng rng(seed * 1000003u + static_cast<uint64_t>(layout_.expert_at(me, slot)) + 1);
    auto fill = [&](const Tensor& t, int64_t offset, int64_t count, double bound) {
      rng.fill_uniform(TensorView(t.data_as<float>() + offset, DType::f32, {count}), -bound, bound);
    };
    fill(params_.w1, slot * M * H1, M * H1, 1.0 / std::sqrt(M));
    fill(params_.b1, slot * H1, H1, 1.0 / std::sqrt(M));
    fill(params_.w2, slot * H * M, H * M, 1.0 / std::sqrt(H));
    fill(params_.b2, slot * M, M, 1.0 / std::sqrt(H));
  }
}

Routing MoELayer::route_tokens(const TensorView& x, Tensor& logits) {
  const int64_t M = config_.model_dim;
  if (x.dtype() != DType::f32 || x.dim() != 2 || x.size(1) != M || !x.is_contiguous() || !x.device().is_cpu())
    SY_THROW(InvalidArgument, "moe: input is ", dtype_name(x.dtype()), " ", shape_string(x.shape()),
             ", expected contiguous host f32 [tokens, ", M, "]");
  const int64_t T = x.size(0);
  if (config_.check_finite) {
    const float* v = static_cast<const float*>(x.data());
    for (int64_t i = 0; i < T * M; ++i)
      if (!std::isfinite(v[i]))
        SY_THROW(InvalidArgument, "moe: input element ", i, " (token ", i / M, ") is ", v[i], "; expected finite values");
  }
  const int E = config_.router.experts;
  logits = Tensor::empty({T, E}, DType::f32);
  kernels::cpu::gemm_f32({.m = T, .n = E, .k = M, .a = static_cast<const float*>(x.data()), .lda = M,
                          .b = gate_weight_.data_as<float>(), .ldb = E, .c = logits.data_as<float>(), .ldc = E});
  return route(config_.router, logits);
}

DispatchPlan MoELayer::plan(const Routing& routing, int64_t tokens) {
  const int k = config_.router.k, E = config_.router.experts, W = group_->size();
  DispatchPlan p;
  p.tokens = tokens;
  p.k = k;
  p.capacity = expert_capacity(config_.router, tokens, routing, group_.get());
  const int32_t* chosen = routing.experts.data_as<int32_t>();
  const float* weight = routing.weights.data_as<float>();
  // Slots are handed out choice by choice (all first choices, then all second
  // ...), as GShard and Tutel do, so a token's best expert wins a slot first.
  std::vector<int64_t> slot_of_choice(static_cast<size_t>(tokens * k), -1);
  p.rows_per_position.assign(static_cast<size_t>(E), 0);
  for (int j = 0; j < k; ++j)
    for (int64_t t = 0; t < tokens; ++t) {
      const int pos = layout_.position(chosen[t * k + j]);
      int64_t& used = p.rows_per_position[static_cast<size_t>(pos)];
      if (used < p.capacity)
        slot_of_choice[static_cast<size_t>(t * k + j)] = used++;
      else
        ++p.dropped;
    }
  if (config_.exchange == ExchangeMode::padded) std::fill(p.rows_per_position.begin(), p.rows_per_position.end(), p.capacity);
  std::vector<int64_t> first_row(static_cast<size_t>(E) + 1, 0);
  for (int pos = 0; pos < E; ++pos) first_row[pos + 1] = first_row[pos] + p.rows_per_position[pos];
  p.token_of_row.assign(static_cast<size_t>(first_row[E]), -1);
  p.weight_of_row.assign(static_cast<size_t>(first_row[E]), 0.f);
  p.row_of_choice.assign(static_cast<size_t>(tokens * k), -1);
  for (int64_t t = 0; t < tokens; ++t)
    for (int j = 0; j < k; ++j) {
      const int64_t slot = slot_of_choice[static_cast<size_t>(t * k + j)];
      if (slot < 0) continue;
      const int64_t row = first_row[layout_.position(chosen[t * k + j])] + slot;
      p.row_of_choice[static_cast<size_t>(t * k + j)] = row;
      p.token_of_row[static_cast<size_t>(row)] = t;
      p.weight_of_row[static_cast<size_t>(row)] = weight[t * k + j];
    }
  const int L = layout_.local_experts();
  p.rows_per_rank.assign(static_cast<size_t>(W), 0);
  for (int pos = 0; pos < E; ++pos) p.rows_per_rank[static_cast<size_t>(pos / L)] += p.rows_per_position[pos];
  if (config_.exchange == ExchangeMode::padded) {
    p.recv_rows_per_block.assign(static_cast<size_t>(W * L), p.capacity);
    p.recv_rows_per_rank.assign(static_cast<size_t>(W), p.capacity * L);
  }
  return p;
}

void MoELayer::exchange_layout(DispatchPlan& p) {
  if (config_.exchange == ExchangeMode::padded) return;
  const int W = group_->size(), L = layout_.local_experts();
  // rows_per_position is already [W][L] in rank-major order: one alltoall of L counts per peer.
  Tensor send = Tensor::empty({static_cast<int64_t>(W) * L}, DType::i64), recv = Tensor::empty({static_cast<int64_t>(W) * L}, DType::i64);
  std::memcpy(send.data(), p.rows_per_position.data(), send.nbytes());
  group_->alltoall(send, recv).wait();
  p.recv_rows_per_block.assign(recv.data_as<int64_t>(), recv.data_as<int64_t>() + W * L);
  p.recv_rows_per_rank.assign(static_cast<size_t>(W), 0);
  for (int w = 0; w < W; ++w)
    for (int l = 0; l < L; ++l) p.recv_rows_per_rank[w] += p.recv_rows_per_block[static_cast<size_t>(w * L + l)];
}

namespace {
std::vector<int64_t> times(const std::vector<int64_t>& rows, int64_t width) {
  std::vector<int64_t> out(rows);
  for (auto& v : out) v *= width;
  return out;
}
}  // namespace

Tensor MoELayer::dispatch(const DispatchPlan& p, const TensorView& x) {
  const int64_t M = config_.model_dim;
  Tensor send = Tensor::empty({p.send_rows(), M}, DType::f32);
  kernels::cpu::gather_rows(static_cast<const float*>(x.data()), p.token_of_row.data(), p.send_rows(), M,
                            send.data_as<float>());
  Tensor recv = Tensor::empty({p.recv_rows(), M}, DType::f32);
  group_->alltoallv(send, times(p.rows_per_rank, M), recv, times(p.recv_rows_per_rank, M)).wait();
  return recv;
}

Tensor MoELayer::run_experts(const DispatchPlan& p, const TensorView& rows) {
  const int64_t M = config_.model_dim, H = config_.hidden_dim, H1 = hidden_in();
  const int W = group_->size(), L = layout_.local_experts();
  const int64_t R = rows.size(0);
  Tensor pre = Tensor::empty({R, H1}, DType::f32), act = Tensor::empty({R, H}, DType::f32);
  Tensor out = Tensor::empty({R, M}, DType::f32);
  const float* x = static_cast<const float*>(rows.data());
  int64_t offset = 0;
  for (int w = 0; w < W; ++w)
    for (int l = 0; l < L; ++l) {
      const int64_t m = p.recv_rows_per_block[static_cast<size_t>(w * L + l)];
      if (m == 0) continue;
      float* pre_b = pre.data_as<float>() + offset * H1;
      float* act_b = act.data_as<float>() + offset * H;
      float* out_b = out.data_as<float>() + offset * M;
      // Biases first, then GEMMs accumulate on top (beta = 1).
      for (int64_t i = 0; i < m; ++i) {
        std::memcpy(pre_b + i * H1, params_.b1.data_as<float>() + l * H1, H1 * sizeof(float));
        std::memcpy(out_b + i * M, params_.b2.data_as<float>() + l * M, M * sizeof(float));
      }
      kernels::cpu::gemm_f32({.m = m, .n = H1, .k = M, .a = x + offset * M, .lda = M,
                              .b = params_.w1.data_as<float>() + l * M * H1, .ldb = H1, .beta = 1.f, .c = pre_b,
                              .ldc = H1});
      kernels::cpu::activation_forward(config_.activation, pre_b, m, H, act_b);
      kernels::cpu::gemm_f32({.m = m, .n = M, .k = H, .a = act_b, .lda = H,
                              .b = params_.w2.data_as<float>() + l * H * M, .ldb = M, .beta = 1.f, .c = out_b,
                              .ldc = M});
      offset += m;
    }
  return out;
}

Tensor MoELayer::combine_exchange(const DispatchPlan& p, const TensorView& expert_out) {
  const int64_t M = config_.model_dim;
  Tensor back = Tensor::empty({p.send_rows(), M}, DType::f32);
  group_->alltoallv(expert_out, times(p.recv_rows_per_rank, M), back, times(p.rows_per_rank, M)).wait();
  return back;
}

Tensor MoELayer::combine(const DispatchPlan& p, const TensorView& returned) {
  const int64_t M = config_.model_dim;
  Tensor out = Tensor::zeros({p.tokens, M}, DType::f32);
  kernels::cpu::scatter_add_rows(static_cast<const float*>(returned.data()), p.token_of_row.data(),
                                 p.weight_of_row.data(), p.send_rows(), M, out.data_as<float>());
  return out;
}

MoEForward MoELayer::forward(const TensorView& x) {
  Tensor logits;
  Routing routing = route_tokens(x, logits);
  DispatchPlan p = plan(routing, x.size(0));
  exchange_layout(p);
  Tensor rows = dispatch(p, x);
  Tensor expert_out = run_experts(p, rows);
  Tensor returned = combine_exchange(p, expert_out);
  MoEForward f;
  f.output = combine(p, returned);
  f.balance_loss = routing.balance_loss;
  f.z_loss = routing.z_loss;
  f.dropped = p.dropped;
  return f;
}

}  // namespace switchyard
