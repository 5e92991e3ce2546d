// The layer's experts: parameters, working weights per plan (gathered and
// their gradients scattered back), and each chunk's FFN forward and backward.
#include <cmath>
#include <cstring>

#include "core/logging.h"
#include "kernels/gemm.h"
#include "kernels/rowwise.h"
#include "moe/eplb.h"
#include "moe/layer_internal.h"

namespace switchyard {

using kernels::Activation;
using moe_detail::copy_hidden_piece;
using moe_detail::PhaseTimer;

namespace moe_detail {

void copy_hidden_piece(MoEOps& ops, bool gated, int64_t rows, int64_t hidden, int piece, int pieces, float* full,
                       float* part, bool to_part) {
  const int64_t hp = hidden / pieces;
  const int halves = gated ? 2 : 1;
  const auto f32 = static_cast<int64_t>(sizeof(float));
  const int64_t full_pitch = halves * hidden * f32, part_pitch = halves * hp * f32;
  for (int h = 0; h < halves; ++h) {
    float* f = full + h * hidden + piece * hp;
    float* q = part + h * hp;
    if (to_part)
      ops.copy_2d(q, part_pitch, f, full_pitch, hp * f32, rows);
    else
      ops.copy_2d(f, full_pitch, q, part_pitch, hp * f32, rows);
  }
}

void copy_hidden_piece(bool gated, int64_t rows, int64_t hidden, int piece, int pieces, float* full, float* part,
                       bool to_part) {
  CpuOps host;
  copy_hidden_piece(host, gated, rows, hidden, piece, pieces, full, part, to_part);
}

}  // namespace moe_detail

void MoELayer::gemm_bf16(const kernels::GemmBf16Args& args, bool weights_read) {
  ops_->gemm_bf16(args, weights_read);
  if (args.m && args.n && args.k)
    ++gemms_[GemmShape{args.m, args.n, args.k, args.transpose_a, args.transpose_b, true}];
}

void MoELayer::gemm(const kernels::GemmArgs& args, OpData data, bool weights_read) {
  ops_->gemm(args, data, weights_read);
  if (args.m && args.n && args.k) ++gemms_[GemmShape{args.m, args.n, args.k, args.transpose_a, args.transpose_b}];
}

double MoELayer::gemm_flops() const {
  double flops = 0;
  for (const auto& [shape, count] : gemms_) flops += 2.0 * shape.m * shape.n * shape.k * count;
  return flops;
}

void MoELayer::reset_profile() {
  times_ = {};
  virtual_times_ = {};
  gemms_.clear();
}

Tensor MoELayer::fresh(Shape shape) const { return ops_->allocate(std::move(shape), DType::f32, true); }

void MoELayer::zero_grad() {
  gate_grad_ = ops_zeros(gate_weight_.shape());
  grads_.w1 = fresh(params_.w1.shape());
  grads_.b1 = fresh(params_.b1.shape());
  grads_.w2 = fresh(params_.w2.shape());
  grads_.b2 = fresh(params_.b2.shape());
}

int64_t MoELayer::hidden_in() const {
  return config_.activation == Activation::swiglu ? 2 * config_.hidden_dim : config_.hidden_dim;
}

void MoELayer::sgd_step(double lr) {
  parameters_changed();
  const std::pair<Tensor*, Tensor*> pairs[] = {{&gate_weight_, &gate_grad_}, {&params_.w1, &grads_.w1},
                                               {&params_.b1, &grads_.b1},     {&params_.w2, &grads_.w2},
                                               {&params_.b2, &grads_.b2}};
  for (auto [param, grad] : pairs)
    ops_->axpy(-static_cast<float>(lr), grad->data_as<float>(), param->numel(), param->data_as<float>(),
               param == &gate_weight_ ? OpData::gate : OpData::bulk);
}

void MoELayer::init_parameters(uint64_t seed) {
  const int64_t M = config_.model_dim, H = config_.hidden_dim, H1 = hidden_in();
  const bool gated = config_.activation == Activation::swiglu;
  const int S = layout_.shards(), shard = layout_.shard_of_rank(group_->rank());
  const int64_t Hs = local_hidden_, H1s = H1 / S;
  parameters_exist_ = true;
  parameters_changed();
  noise_ = Rng(seed * 7919u + static_cast<uint64_t>(group_->rank()) + 17);
  Rng gate_rng(seed);
  {
    Tensor gate = Tensor::empty(gate_weight_.shape(), DType::f32);
    gate_rng.fill_uniform(gate, -1.0 / std::sqrt(M), 1.0 / std::sqrt(M));
    ops_->from_host(gate_weight_.data(), gate.data(), static_cast<int64_t>(gate.nbytes()));
  }
  const int me = group_->rank();
  if (!ops_->computes()) return;  // timing only: expert weights stay untouched
  // The whole logical expert is drawn, then this rank's slice kept, so every
  // layout holds the same weights.
  Tensor w1 = Tensor::empty({M, H1}, DType::f32), b1 = Tensor::empty({H1}, DType::f32);
  Tensor w2 = Tensor::empty({H, M}, DType::f32), b2 = Tensor::empty({M}, DType::f32);
  for (int slot = 0; slot < layout_.slots(me); ++slot) {
    const int expert = layout_.expert_at(me, slot);
    if (expert < 0) continue;  // an unused slot stays zero
    Rng rng(seed * 1000003u + static_cast<uint64_t>(expert) + 1);
    rng.fill_uniform(w1, -1.0 / std::sqrt(M), 1.0 / std::sqrt(M));
    rng.fill_uniform(b1, -1.0 / std::sqrt(M), 1.0 / std::sqrt(M));
    rng.fill_uniform(w2, -1.0 / std::sqrt(H), 1.0 / std::sqrt(H));
    rng.fill_uniform(b2, -1.0 / std::sqrt(H), 1.0 / std::sqrt(H));
    // Drawn on the host, moved into the ops' memory, and this rank's slice copied by the ops.
    const Tensor w1o = ops_->copy_in(w1), b1o = ops_->copy_in(b1), w2o = ops_->copy_in(w2), b2o = ops_->copy_in(b2);
    copy_hidden_piece(*ops_, gated, M, H, shard, S, w1o.data_as<float>(), params_.w1.data_as<float>() + slot * M * H1s,
                      true);
    copy_hidden_piece(*ops_, gated, 1, H, shard, S, b1o.data_as<float>(), params_.b1.data_as<float>() + slot * H1s,
                      true);
    ops_->copy(params_.w2.data_as<float>() + slot * Hs * M, w2o.data_as<float>() + shard * Hs * M,
               Hs * M * static_cast<int64_t>(sizeof(float)));
    ops_->copy(params_.b2.data_as<float>() + slot * M, b2o.data(), static_cast<int64_t>(b2o.nbytes()));
  }
}

void MoELayer::gather_weights(const DispatchPlan& p, Working& w) {
  const PlanShape shape = shape_of(p.exec.r);
  w.r = p.exec.r;
  w.adds_bias = shape.piece == 0;
  w.gathered = shape.gather != nullptr;
  if (!w.gathered) {
    w.p = params_;
    return;
  }
  PhaseTimer timer(times_, virtual_times_, &MoEPhaseTimes::weights);
  Communicator& g = *shape.gather;
  const int64_t G = g.size(), L = layout_.local_experts(), M = config_.model_dim;
  const int64_t H1s = hidden_in() / layout_.shards();
  const int P = shape.pieces, Lw = shape.slots;
  const bool gated = config_.activation == Activation::swiglu;
  const int64_t Hw = shape.hidden, H1w = gated ? 2 * Hw : Hw;
  // w2 and b2 blocks concatenate into the working layout as they are; w1 and b1
  // interleave their pieces' columns.
  Tensor raw_w1 = P > 1 ? buffer(Buffer::gathered, {G * L, M, H1s}) : buffer(Buffer::gw1, {Lw, M, H1w});
  Tensor raw_b1 = ops_empty({G * L, H1s});
  w.p.w2 = buffer(Buffer::gw2, {Lw, Hw, M});
  Tensor raw_b2 = ops_empty({G * L, M});
  Work works[] = {g.allgather(params_.w1, raw_w1), g.allgather(params_.b1, raw_b1), g.allgather(params_.w2, w.p.w2),
                  g.allgather(params_.b2, raw_b2)};
  for (auto& work : works) work.wait();
  w.p.b2 = ops_empty({Lw, M});
  const auto f32 = static_cast<int64_t>(sizeof(float));
  ops_->copy_2d(w.p.b2.data(), M * f32, raw_b2.data(), P * M * f32, M * f32, Lw);  // piece 0's bias of each expert
  if (P == 1) {
    w.p.w1 = raw_w1;
    w.p.b1 = raw_b1;
    return;
  }
  w.p.w1 = buffer(Buffer::gw1, {Lw, M, H1w});
  w.p.b1 = ops_empty({Lw, H1w});
  for (int i = 0; i < Lw; ++i)
    for (int piece = 0; piece < P; ++piece) {
      const int64_t b = static_cast<int64_t>(i) * P + piece;
      copy_hidden_piece(*ops_, gated, M, Hw, piece, P, w.p.w1.data_as<float>() + i * M * H1w,
                        raw_w1.data_as<float>() + b * M * H1s, false);
      copy_hidden_piece(*ops_, gated, 1, Hw, piece, P, w.p.b1.data_as<float>() + i * H1w,
                        raw_b1.data_as<float>() + b * H1s, false);
    }
}

void MoELayer::scatter_gradients(const PlanShape& shape, const ExpertParams& wg, bool gathered) {
  const int S = layout_.shards();
  Tensor b2_delta = wg.b2;
  if (gathered) {
    Communicator& g = *shape.gather;
    const int64_t G = g.size(), L = layout_.local_experts(), M = config_.model_dim;
    const int64_t H1s = hidden_in() / S;
    const int P = shape.pieces, Lw = shape.slots;
    const bool gated = config_.activation == Activation::swiglu;
    const int64_t Hw = shape.hidden, H1w = gated ? 2 * Hw : Hw;
    Tensor raw_w1 = wg.w1, raw_b1 = wg.b1, raw_b2 = wg.b2;
    if (P > 1) {
      raw_w1 = buffer(Buffer::grad_blocks, {G * L, M, H1s});
      raw_b1 = ops_empty({G * L, H1s});
      raw_b2 = ops_empty({G * L, M});  // one piece of each expert carries the bias gradient
      const auto f32 = static_cast<int64_t>(sizeof(float));
      ops_->zero(raw_b2.data(), static_cast<int64_t>(raw_b2.nbytes()));
      ops_->copy_2d(raw_b2.data(), P * M * f32, wg.b2.data(), M * f32, M * f32, Lw);
      for (int i = 0; i < Lw; ++i)
        for (int piece = 0; piece < P; ++piece) {
          const int64_t b = static_cast<int64_t>(i) * P + piece;
          copy_hidden_piece(*ops_, gated, M, Hw, piece, P, wg.w1.data_as<float>() + i * M * H1w,
                            raw_w1.data_as<float>() + b * M * H1s, true);
          copy_hidden_piece(*ops_, gated, 1, Hw, piece, P, wg.b1.data_as<float>() + i * H1w,
                            raw_b1.data_as<float>() + b * H1s, true);
        }
    }
    Tensor mine_w1 = buffer(Buffer::grad_mine, params_.w1.shape());
    Tensor mine_b1 = ops_empty(params_.b1.shape());
    Tensor mine_w2 = ops_empty(params_.w2.shape());
    b2_delta = ops_empty(params_.b2.shape());
    Work works[] = {g.reduce_scatter(raw_w1, mine_w1), g.reduce_scatter(raw_b1, mine_b1),
                    g.reduce_scatter(wg.w2, mine_w2), g.reduce_scatter(raw_b2, b2_delta)};
    for (auto& work : works) work.wait();
    for (auto [acc, part] : {std::pair{&grads_.w1, &mine_w1}, {&grads_.b1, &mine_b1}, {&grads_.w2, &mine_w2}})
      ops_->axpy(1.f, part->data_as<float>(), part->numel(), acc->data_as<float>());
  }
  // fc2's bias is replicated on the S ranks of an expert: each gets the sum.
  if (S > 1) shard_group_->allreduce(b2_delta, b2_delta).wait();
  if (S > 1 || gathered) ops_->axpy(1.f, b2_delta.data_as<float>(), b2_delta.numel(), grads_.b2.data_as<float>());
}

ExpertActivations MoELayer::allocate_activations(const DispatchPlan& p, const Working& w) {
  const int64_t M = config_.model_dim, R = p.recv_rows();
  const PlanShape shape = shape_of(p.exec.r);
  const int64_t Hw = shape.hidden, H1w = config_.activation == Activation::swiglu ? 2 * Hw : Hw;
  ExpertActivations a;
  a.pre = buffer(Buffer::pre, {R, H1w});
  a.act = buffer(Buffer::act, {R, Hw});
  a.out = buffer(Buffer::expert_out, {R, M});
  if (config_.compute == DType::bf16) {
    a.rows16 = buffer(Buffer::recv_bf16, {R, M}, DType::bf16);
    a.act16 = buffer(Buffer::act_bf16, {R, Hw}, DType::bf16);
    PhaseTimer timer(times_, virtual_times_, &MoEPhaseTimes::convert);
    if (w.gathered) {  // this plan's gathered weights: copies for this batch
      a.w1_16 = buffer(Buffer::w1_bf16, w.p.w1.shape(), DType::bf16);
      a.w2_16 = buffer(Buffer::w2_bf16, w.p.w2.shape(), DType::bf16);
      ops_->to_bf16(w.p.w1.data_as<float>(), w.p.w1.numel(), static_cast<uint16_t*>(a.w1_16.data()));
      ops_->to_bf16(w.p.w2.data_as<float>(), w.p.w2.numel(), static_cast<uint16_t*>(a.w2_16.data()));
    } else {  // the stored weights: copies kept while they are unchanged
      if (bf16_version_ != parameters_version_ || bf16_w1_.shape() != w.p.w1.shape() || bf16_w2_.shape() != w.p.w2.shape()) {
        // New storage only while a batch in flight still holds the old copies (its backward reads them).
        const bool shared = bf16_w1_.storage().use_count() > 1 || bf16_w2_.storage().use_count() > 1;
        if (shared || bf16_w1_.shape() != w.p.w1.shape() || bf16_w2_.shape() != w.p.w2.shape()) {
          bf16_w1_ = ops_empty(w.p.w1.shape(), DType::bf16);
          bf16_w2_ = ops_empty(w.p.w2.shape(), DType::bf16);
        }
        ops_->to_bf16(w.p.w1.data_as<float>(), w.p.w1.numel(), static_cast<uint16_t*>(bf16_w1_.data()));
        ops_->to_bf16(w.p.w2.data_as<float>(), w.p.w2.numel(), static_cast<uint16_t*>(bf16_w2_.data()));
        bf16_version_ = parameters_version_;
        ++bf16_conversions_;
      }
      a.w1_16 = bf16_w1_;
      a.w2_16 = bf16_w2_;
    }
  }
  return a;
}

void MoELayer::run_chunk(MoEBatch& batch, int chunk) {
  PhaseTimer timer(times_, virtual_times_, &MoEPhaseTimes::experts);
  const DispatchPlan& p = batch.plan_;
  const Working& w = batch.weights_;
  ExpertActivations& a = batch.experts_;
  const int64_t M = config_.model_dim;
  const int64_t Hw = w.p.w2.shape()[1], H1w = w.p.w1.shape()[2];
  const bool bf = config_.compute == DType::bf16;
  // bf16 dropless: one primitive for every row count (no JIT per batch); the backward keeps exact ones (a few %
  // faster in training, where the counts repeat).
  const bool rows_vary = p.exec.exchange == ExchangeMode::dropless;
  const float* x = batch.rows_.data_as<float>();
  auto b16 = [](const Tensor& t, int64_t offset) { return static_cast<const uint16_t*>(t.data()) + offset; };
  int64_t offset = p.recv_offset(chunk);
  if (bf) {
    const int64_t n = p.recv_offset(chunk + 1) - offset;
    ops_->to_bf16(x + offset * M, n * M, static_cast<uint16_t*>(a.rows16.data()) + offset * M);
  }
  std::vector<char> read(static_cast<size_t>(p.slots), 0);  // slots whose weights this chunk has read
  for (int u = 0; u < p.exchange_ranks; ++u)
    for (int l = 0; l < p.slots; ++l) {
      const int64_t m = p.recv_block(chunk, u, l);
      if (m == 0) continue;
      const bool weights_read = read[static_cast<size_t>(l)];
      read[static_cast<size_t>(l)] = 1;
      float* pre_b = a.pre.data_as<float>() + offset * H1w;
      float* act_b = a.act.data_as<float>() + offset * Hw;
      float* out_b = a.out.data_as<float>() + offset * M;
      // Biases first, then GEMMs accumulate on top. With r > 1 only the first
      // hidden piece adds fc2's bias: the pieces' outputs are summed.
      ops_->broadcast_rows(w.p.b1.data_as<float>() + l * H1w, m, H1w, pre_b);
      if (w.adds_bias)
        ops_->broadcast_rows(w.p.b2.data_as<float>() + l * M, m, M, out_b);
      else
        ops_->zero(out_b, m * M * static_cast<int64_t>(sizeof(float)));
      if (bf)
        gemm_bf16({.m = m, .n = H1w, .k = M, .a = b16(a.rows16, offset * M), .lda = M, .b = b16(a.w1_16, l * M * H1w),
                   .ldb = H1w, .accumulate = true, .c = pre_b, .ldc = H1w, .rows_vary = rows_vary}, weights_read);
      else
        gemm({.m = m, .n = H1w, .k = M, .a = x + offset * M, .lda = M, .b = w.p.w1.data_as<float>() + l * M * H1w,
              .ldb = H1w, .beta = 1.f, .c = pre_b, .ldc = H1w}, OpData::bulk, weights_read);
      ops_->activation_forward(config_.activation, pre_b, m, Hw, act_b);
      if (bf) {
        uint16_t* a16 = static_cast<uint16_t*>(a.act16.data()) + offset * Hw;
        ops_->to_bf16(act_b, m * Hw, a16);
        gemm_bf16({.m = m, .n = M, .k = Hw, .a = a16, .lda = Hw, .b = b16(a.w2_16, l * Hw * M), .ldb = M,
                   .accumulate = true, .c = out_b, .ldc = M, .rows_vary = rows_vary}, weights_read);
      } else {
        gemm({.m = m, .n = M, .k = Hw, .a = act_b, .lda = Hw, .b = w.p.w2.data_as<float>() + l * Hw * M, .ldb = M,
              .beta = 1.f, .c = out_b, .ldc = M}, OpData::bulk, weights_read);
      }
      offset += m;
    }
}

void MoELayer::backward_chunk(const MoEBatch& batch, int chunk, const Tensor& d_out, bool input_grad,
                              ExpertParams& grads, Tensor& d_rows, Tensor& dy16, Tensor& dp16) {
  const DispatchPlan& p = batch.plan_;
  const Working& w = batch.weights_;
  const ExpertActivations& saved = batch.experts_;
  const int64_t M = config_.model_dim;
  const int64_t Hw = w.p.w2.shape()[1], H1w = w.p.w1.shape()[2];
  const bool bf = config_.compute == DType::bf16;
  auto b16 = [](const Tensor& t, int64_t offset) { return static_cast<const uint16_t*>(t.data()) + offset; };
  int64_t offset = p.recv_offset(chunk);
  if (bf) {
    const int64_t n = p.recv_offset(chunk + 1) - offset;
    ops_->to_bf16(d_out.data_as<float>() + offset * M, n * M, static_cast<uint16_t*>(dy16.data()) + offset * M);
  }
  Tensor d_act = buffer(Buffer::d_act, {p.recv_rows(), Hw}), d_pre = buffer(Buffer::d_pre, {p.recv_rows(), H1w});
  std::vector<char> read(static_cast<size_t>(p.slots), 0);  // slots whose weights and gradients this chunk paid for
  for (int u = 0; u < p.exchange_ranks; ++u)
    for (int l = 0; l < p.slots; ++l) {
      const int64_t m = p.recv_block(chunk, u, l);
      if (m == 0) continue;
      const bool weights_read = read[static_cast<size_t>(l)];
      read[static_cast<size_t>(l)] = 1;
      const float* dy = d_out.data_as<float>() + offset * M;
      const float* act = saved.act.data_as<float>() + offset * Hw;
      const float* pre = saved.pre.data_as<float>() + offset * H1w;
      const float* x = batch.rows_.data_as<float>() + offset * M;
      float* da = d_act.data_as<float>() + offset * Hw;
      float* dp = d_pre.data_as<float>() + offset * H1w;
      float* dw1 = grads.w1.data_as<float>() + l * M * H1w;
      float* dw2 = grads.w2.data_as<float>() + l * Hw * M;
      if (w.adds_bias) ops_->add_column_sums(dy, m, M, grads.b2.data_as<float>() + l * M);
      if (bf) {
        const uint16_t* dy_b = static_cast<const uint16_t*>(dy16.data()) + offset * M;
        gemm_bf16({.transpose_a = true, .m = Hw, .n = M, .k = m, .a = b16(saved.act16, offset * Hw), .lda = Hw,
                   .b = dy_b, .ldb = M, .accumulate = true, .c = dw2, .ldc = M}, weights_read);
        gemm_bf16({.transpose_b = true, .m = m, .n = Hw, .k = M, .a = dy_b, .lda = M,
                   .b = b16(saved.w2_16, l * Hw * M), .ldb = M, .c = da, .ldc = Hw}, weights_read);
      } else {
        gemm({.transpose_a = true, .m = Hw, .n = M, .k = m, .a = act, .lda = Hw, .b = dy, .ldb = M, .beta = 1.f,
              .c = dw2, .ldc = M}, OpData::bulk, weights_read);
        gemm({.transpose_b = true, .m = m, .n = Hw, .k = M, .a = dy, .lda = M,
              .b = w.p.w2.data_as<float>() + l * Hw * M, .ldb = M, .c = da, .ldc = Hw}, OpData::bulk, weights_read);
      }
      ops_->activation_backward(config_.activation, pre, da, m, Hw, dp);
      ops_->add_column_sums(dp, m, H1w, grads.b1.data_as<float>() + l * H1w);
      if (bf) {
        uint16_t* dp_b = static_cast<uint16_t*>(dp16.data()) + offset * H1w;
        ops_->to_bf16(dp, m * H1w, dp_b);
        gemm_bf16({.transpose_a = true, .m = M, .n = H1w, .k = m, .a = b16(saved.rows16, offset * M), .lda = M,
                   .b = dp_b, .ldb = H1w, .accumulate = true, .c = dw1, .ldc = H1w}, weights_read);
        if (input_grad)
          gemm_bf16({.transpose_b = true, .m = m, .n = M, .k = H1w, .a = dp_b, .lda = H1w,
                     .b = b16(saved.w1_16, l * M * H1w), .ldb = H1w, .c = d_rows.data_as<float>() + offset * M,
                     .ldc = M}, weights_read);
      } else {
        gemm({.transpose_a = true, .m = M, .n = H1w, .k = m, .a = x, .lda = M, .b = dp, .ldb = H1w, .beta = 1.f,
              .c = dw1, .ldc = H1w}, OpData::bulk, weights_read);
        if (input_grad)
          gemm({.transpose_b = true, .m = m, .n = M, .k = H1w, .a = dp, .lda = H1w,
                .b = w.p.w1.data_as<float>() + l * M * H1w, .ldb = H1w, .c = d_rows.data_as<float>() + offset * M,
                .ldc = M}, OpData::bulk, weights_read);
      }
      offset += m;
    }
}

}  // namespace switchyard

namespace switchyard {

void MoELayer::migrate(const ExpertPlacement& to, const std::vector<ExpertParams*>& state) {
  if (layout_.shards() > 1)
    SY_THROW(InvalidArgument, "moe: migrate needs whole experts; ", config_.router.experts, " experts on ",
             group_->size(), " ranks are sliced (", layout_.shards(), " ranks per expert) and keep their layout");
  const int E = config_.router.experts, W = group_->size(), me = group_->rank();
  ParamLayout next(E, W, to);  // validates the placement against this group
  parameters_changed();
  const ExpertPlacement& from = layout_.placement();
  const int64_t M = config_.model_dim, H = config_.hidden_dim, H1 = hidden_in();
  const int64_t sizes[4] = {M * H1, H1, H * M, M};  // w1, b1, w2, b2 of one expert
  const int64_t per_expert = sizes[0] + sizes[1] + sizes[2] + sizes[3];
  std::vector<ExpertParams*> moved{&params_};
  std::string problem;
  for (ExpertParams* s : state) {
    for (auto [t, want] : {std::pair{&s->w1, &params_.w1}, {&s->b1, &params_.b1}, {&s->w2, &params_.w2},
                           {&s->b2, &params_.b2}})
      if (problem.empty() && (t->shape() != want->shape() || t->dtype() != DType::f32))
        problem = detail::make_string("a per-expert state tensor is ", dtype_name(t->dtype()), " ",
                                      shape_string(t->shape()), ", expected f32 ", shape_string(want->shape()),
                                      " like the parameters");
    moved.push_back(s);
  }
  if (problem.empty() && config_.plan.r != 1 && !next.is_permutation())
    problem = detail::make_string("the layer's plan has r = ", config_.plan.r, ", which the new placement (",
                                  to.describe(), ") cannot run; expected r = 1");
  // Every rank must move the same placement and as many state sets, or the
  // all-to-all below would mismatch: agreed first, and a problem anywhere fails everyone.
  uint64_t h = 1469598103934665603ull;
  for (int v : to.phy2log()) h = (h ^ static_cast<uint64_t>(v + 2)) * 1099511628211ull;
  for (int w = 0; w < W; ++w) h = (h ^ static_cast<uint64_t>(to.slots(w))) * 1099511628211ull;
  const auto hs = static_cast<double>(h >> 12), sets = static_cast<double>(state.size());
  double agree[5] = {problem.empty() ? -1.0 : static_cast<double>(me), hs, -hs, sets, -sets};
  host_group_->allreduce(TensorView(agree, DType::f64, {5}), TensorView(agree, DType::f64, {5}), {.op = ReduceOp::max})
      .wait();
  if (agree[0] >= 0)
    SY_THROW(InvalidArgument, "moe: migrate: rank ", static_cast<int>(agree[0]), ": ",
             static_cast<int>(agree[0]) == me ? problem : std::string("refused (it says why)"));
  if (agree[1] != hs || -agree[2] != hs || agree[3] != sets || -agree[4] != sets)
    SY_THROW(InvalidArgument, "moe: migrate: the ranks of '", group_->name(), "' passed different placements or "
             "numbers of per-expert state sets (rank ", me, ": ", to.describe(), ", ", state.size(), " sets)");
  const int64_t per_slot = per_expert * static_cast<int64_t>(moved.size());
  // Each logical expert comes from its primary replica under the old placement.
  auto source_rank = [&](int e) { return from.rank_of_slot(from.primary_slot(e)); };
  auto source_slot = [&](int e) { return from.primary_slot(e) - from.first_slot(source_rank(e)); };
  std::vector<int64_t> send_counts(static_cast<size_t>(W), 0), recv_counts(static_cast<size_t>(W), 0);
  std::vector<int> outgoing;  // my old slots, in the order the receivers' new slots ask for them
  for (int q = 0; q < W; ++q)
    for (int s = 0; s < to.slots(q); ++s) {
      const int e = to.expert_at(q, s);
      if (e < 0 || source_rank(e) != me) continue;
      outgoing.push_back(source_slot(e));
      send_counts[static_cast<size_t>(q)] += per_slot;
    }
  for (int s = 0; s < to.slots(me); ++s) {
    const int e = to.expert_at(me, s);
    if (e >= 0) recv_counts[static_cast<size_t>(source_rank(e))] += per_slot;
  }
  // Timing only: the stored weights are untouched memory; nothing is worth moving.
  const bool move = ops_->computes();
  // The weights move through the host (device ops: copied out first, the new sets copied in at the end).
  std::vector<ExpertParams> sources;
  for (ExpertParams* p : move ? moved : std::vector<ExpertParams*>{}) sources.push_back(to_host(*p));
  Tensor send = Tensor::empty({move ? static_cast<int64_t>(outgoing.size()) * per_slot : 0}, DType::f32);
  float* out = send.data_as<float>();
  for (int slot : move ? outgoing : std::vector<int>{})
    for (const ExpertParams& p : sources) {
      const Tensor* parts[4] = {&p.w1, &p.b1, &p.w2, &p.b2};
      for (int i = 0; i < 4; ++i) {
        std::memcpy(out, parts[i]->data_as<float>() + slot * sizes[i], static_cast<size_t>(sizes[i]) * sizeof(float));
        out += sizes[i];
      }
    }
  int64_t incoming = 0;
  for (int64_t c : recv_counts) incoming += c;
  Tensor recv = Tensor::empty({move ? incoming : 0}, DType::f32);
  if (move) host_group_->alltoallv(send, send_counts, recv, recv_counts).wait();
  // Where each source's block starts; within it, my new slots in order.
  std::vector<int64_t> cursor(static_cast<size_t>(W), 0);
  for (int u = 1; u < W; ++u) cursor[static_cast<size_t>(u)] = cursor[static_cast<size_t>(u - 1)] + recv_counts[u - 1];
  const int64_t L = to.slots(me);
  std::vector<ExpertParams> fresh_sets(moved.size());
  const bool on_host = ops_->host_memory();
  auto made = [&](Shape shape) { return on_host ? fresh(std::move(shape)) : Tensor::zeros(std::move(shape), DType::f32); };
  for (auto& f : fresh_sets) {
    f.w1 = made({L, M, H1});
    f.b1 = made({L, H1});
    f.w2 = made({L, H, M});
    f.b2 = made({L, M});
  }
  for (int s = 0; s < (move ? L : 0); ++s) {
    const int e = to.expert_at(me, s);
    if (e < 0) continue;
    const float* in = recv.data_as<float>() + cursor[static_cast<size_t>(source_rank(e))];
    for (ExpertParams& f : fresh_sets) {
      Tensor* parts[4] = {&f.w1, &f.b1, &f.w2, &f.b2};
      for (int i = 0; i < 4; ++i) {
        std::memcpy(parts[i]->data_as<float>() + s * sizes[i], in, static_cast<size_t>(sizes[i]) * sizeof(float));
        in += sizes[i];
      }
    }
    cursor[static_cast<size_t>(source_rank(e))] += per_slot;
  }
  for (size_t i = 0; i < moved.size(); ++i) {
    ExpertParams& f = fresh_sets[i];
    *moved[i] = on_host ? std::move(f) : ExpertParams{ops_->copy_in(f.w1), ops_->copy_in(f.b1), ops_->copy_in(f.w2), ops_->copy_in(f.b2)};
  }
  layout_ = std::move(next);
  config_.placement = to;
  ++placement_generation_;  // batches planned on the old placement are refused
  current_.reset();
  if (last_ && last_.use_count() == 1) last_->release_buffers();
  zero_grad();
  geometries_.clear();
  nearest_share_cache_.clear();
  make_exchange_group();
  // The plan asked for at construction, as far as the new exchange can run it (every rank decides alike from
  // the same placement): 2dh needs the exchange to span two or more whole nodes.
  config_.plan.a2a = requested_a2a_;
  if (requested_a2a_ == A2AAlgorithm::hierarchical && !hierarchical_ && exchange_group_->size() > 1) {
    if (group_->rank() == 0)
      SY_LOG_WARN("moe", "'", group_->name(), "': after migrate the all-to-all spans ", exchange_group_->size(),
                  " ranks, not two or more whole nodes of ", config_.node_size,
                  "; the layer's plan runs the flat all-to-all until a placement allows 2dh again");
    config_.plan.a2a = A2AAlgorithm::flat;
  }
  make_replica_groups();
  parameters_exist_ = true;
}

MoELayer::Rebalanced MoELayer::rebalance(const std::vector<double>& local_load, int physical,
                                         const std::vector<ExpertParams*>& per_expert_state) {
  const int E = config_.router.experts;
  Rebalanced r{ExpertPlacement(), local_load};
  r.load.resize(static_cast<size_t>(E), 0.0);
  host_group_->allreduce(TensorView(r.load.data(), DType::f64, {E}), TensorView(r.load.data(), DType::f64, {E}))
      .wait();
  r.placement = config_.eplb_placement(r.load, physical, group_->size());
  migrate(r.placement, per_expert_state);
  return r;
}

}  // namespace switchyard
