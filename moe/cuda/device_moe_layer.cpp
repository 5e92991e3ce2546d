#include "moe/cuda/device_moe_layer.h"

#include <algorithm>
#include <numeric>
#include <optional>

#include "core/error.h"
#include "kernels/cuda/gemm.h"
#include "kernels/cuda/kernels.h"
#include "kernels/cuda/runtime.h"

namespace switchyard {

namespace kc = kernels::cuda;

namespace {

int64_t hidden_in(const MoEConfig& c) {
  return c.activation == kernels::Activation::swiglu ? 2 * c.hidden_dim : c.hidden_dim;
}

const float* fp(const Tensor& t, int64_t offset = 0) { return static_cast<const float*>(t.data()) + offset; }
float* mp(const Tensor& t, int64_t offset = 0) { return static_cast<float*>(t.data()) + offset; }
const uint16_t* bp(const Tensor& t, int64_t offset = 0) { return static_cast<const uint16_t*>(t.data()) + offset; }

// One GEMM, or `batch` of one shape with operand strides (padded blocks of one
// source rank, all slots at once); bf16 operands when a16/b16 are given.
struct BlockGemm {
  bool ta = false, tb = false;
  int64_t m = 0, n = 0, k = 0;
  const float* a = nullptr;
  const uint16_t* a16 = nullptr;
  int64_t lda = 0, stride_a = 0;
  const float* b = nullptr;
  const uint16_t* b16 = nullptr;
  int64_t ldb = 0, stride_b = 0;
  bool accumulate = false;
  float* c = nullptr;
  int64_t ldc = 0, stride_c = 0;
  int batch = 1;
};
void run_gemm(const BlockGemm& g, cudaStream_t s) {
  if (g.a16) {
    kc::gemm_bf16_batched({.transpose_a = g.ta, .transpose_b = g.tb, .m = g.m, .n = g.n, .k = g.k, .a = g.a16,
                           .lda = g.lda, .b = g.b16, .ldb = g.ldb, .accumulate = g.accumulate, .c = g.c, .ldc = g.ldc},
                          g.batch, g.stride_a, g.stride_b, g.stride_c, s);
  } else {
    kc::gemm_f32_batched({.transpose_a = g.ta, .transpose_b = g.tb, .m = g.m, .n = g.n, .k = g.k, .a = g.a,
                          .lda = g.lda, .b = g.b, .ldb = g.ldb, .beta = g.accumulate ? 1.f : 0.f, .c = g.c,
                          .ldc = g.ldc},
                         g.batch, g.stride_a, g.stride_b, g.stride_c, s);
  }
}

}  // namespace

int64_t DeviceMoELayer::Blocks::offset(int u, int l) const {
  return std::accumulate(rows.begin(), rows.begin() + u * slots + l, int64_t{0});
}

class DeviceMoELayer::Phase {
 public:
  Phase(DeviceMoELayer& layer, double MoEPhaseTimes::*field) : layer_(layer.profiling_ ? &layer : nullptr) {
    if (!layer_) return;
    mark_.field = field;
    cudaEvent_t b, e;
    SY_CUDA_CHECK(cudaEventCreate(&b));
    SY_CUDA_CHECK(cudaEventCreate(&e));
    mark_.begin = b, mark_.end = e;
    SY_CUDA_CHECK(cudaEventRecord(b, cuda::current_stream()));
  }
  ~Phase() {
    if (!layer_) return;
    (void)cudaEventRecord(static_cast<cudaEvent_t>(mark_.end), cuda::current_stream());
    layer_->marks_.push_back(mark_);
  }

 private:
  DeviceMoELayer* layer_;
  Mark mark_{};
};

const MoEPhaseTimes& DeviceMoELayer::phase_times() {
  for (const Mark& m : marks_) {
    auto b = static_cast<cudaEvent_t>(m.begin), e = static_cast<cudaEvent_t>(m.end);
    SY_CUDA_CHECK(cudaEventSynchronize(e));
    float ms = 0;
    SY_CUDA_CHECK(cudaEventElapsedTime(&ms, b, e));
    times_.*m.field += ms * 1e-3;
    (void)cudaEventDestroy(b);
    (void)cudaEventDestroy(e);
  }
  marks_.clear();
  return times_;
}

void DeviceMoELayer::reset_profile() {
  phase_times();
  times_ = MoEPhaseTimes{};
}

template <class Gemm>
void DeviceMoELayer::for_expert_blocks(int W, int L, Gemm&& gemm) const {
  const Saved& sv = saved_;
  for (int u = 0; u < W; ++u) {
    if (sv.padded) {
      gemm(0, L, sv.capacity, sv.recv.offset(u, 0));
    } else {
      for (int l = 0; l < L; ++l) gemm(l, 1, sv.recv.rows[static_cast<size_t>(u * L + l)], sv.recv.offset(u, l));
    }
  }
}

int64_t DeviceMoELayer::largest_block() const {
  int64_t largest = 0;
  for (int64_t m : saved_.recv.rows) largest = std::max(largest, m);
  return largest;
}

int64_t DeviceMoELayer::Blocks::total() const { return std::accumulate(rows.begin(), rows.end(), int64_t{0}); }

DeviceMoELayer::DeviceMoELayer(MoEConfig config, std::shared_ptr<Communicator> group, int device)
    : config_(std::move(config)),
      group_(std::move(group)),
      device_(device),
      layout_(config_.router.experts, group_->size()) {
  config_.validate();
  const int E = config_.router.experts, W = group_->size();
  if (E < W || E % W)
    SY_THROW(NotSupported, "device moe: experts = ", E, " on ", W,
             " ranks; the device layer needs whole experts per rank (experts a multiple of the ranks)");
  if (E > kc::kMaxGateExperts)
    SY_THROW(NotSupported, "device moe: experts = ", E, ", the CUDA gate takes at most ", kc::kMaxGateExperts);
  if (config_.skip_compute || config_.device_model)
    SY_THROW(NotSupported, "device moe: skip_compute / device_model are emulation settings of the host layer");
  SY_CUDA_CHECK(cudaSetDevice(device_));
  const int64_t M = config_.model_dim, H = config_.hidden_dim, H1 = hidden_in(config_), L = layout_.local_experts();
  gate_weight_ = cuda::zeros({M, E}, DType::f32, device_);
  gate_bias_ = cuda::zeros({E}, DType::f32, device_);
  params_.w1 = cuda::zeros({L, M, H1}, DType::f32, device_);
  params_.b1 = cuda::zeros({L, H1}, DType::f32, device_);
  params_.w2 = cuda::zeros({L, H, M}, DType::f32, device_);
  params_.b2 = cuda::zeros({L, M}, DType::f32, device_);
  std::vector<int32_t> identity(static_cast<size_t>(E));
  std::iota(identity.begin(), identity.end(), 0);
  position_of_expert_ = cuda::to_device(TensorView(identity.data(), DType::i32, {E}), device_);
  zero_grad();
}

Tensor DeviceMoELayer::device_empty(Shape shape, DType dtype) const { return cuda::empty(std::move(shape), dtype, device_); }

void DeviceMoELayer::zero_grad() {
  gate_grad_ = cuda::zeros(gate_weight_.shape(), DType::f32, device_);
  grads_.w1 = cuda::zeros(params_.w1.shape(), DType::f32, device_);
  grads_.b1 = cuda::zeros(params_.b1.shape(), DType::f32, device_);
  grads_.w2 = cuda::zeros(params_.w2.shape(), DType::f32, device_);
  grads_.b2 = cuda::zeros(params_.b2.shape(), DType::f32, device_);
}

void DeviceMoELayer::sgd_step(double lr) {
  cudaStream_t s = cuda::current_stream();
  const auto step = [&](Tensor& p, const Tensor& g) { kc::axpy(static_cast<float>(-lr), fp(g), p.numel(), mp(p), s); };
  step(gate_weight_, gate_grad_);
  step(params_.w1, grads_.w1);
  step(params_.b1, grads_.b1);
  step(params_.w2, grads_.w2);
  step(params_.b2, grads_.b2);
}

void DeviceMoELayer::copy_parameters_from(MoELayer& host) {
  const MoEConfig& h = host.config();
  if (h.model_dim != config_.model_dim || h.hidden_dim != config_.hidden_dim ||
      h.router.experts != config_.router.experts || h.activation != config_.activation ||
      host.layout().ranks() != layout_.ranks())
    SY_THROW(InvalidArgument, "device moe: copy_parameters_from a host layer of model_dim ", h.model_dim,
             ", hidden_dim ", h.hidden_dim, ", experts ", h.router.experts, " on ", host.layout().ranks(),
             " ranks; expected ", config_.model_dim, ", ", config_.hidden_dim, ", ", config_.router.experts, " on ",
             layout_.ranks(), " ranks with the same activation");
  if (!host.layout().is_permutation())
    SY_THROW(NotSupported, "device moe: the host layer's placement has ", host.layout().placement().describe(),
             "; the device layer runs one replica per expert with equal slots per rank only");
  const int E = config_.router.experts;
  std::vector<int> placement(static_cast<size_t>(E));
  std::vector<int32_t> placement32(static_cast<size_t>(E));
  for (int e = 0; e < E; ++e) placement32[static_cast<size_t>(e)] = placement[static_cast<size_t>(e)] = host.layout().position(e);
  layout_.set_placement(placement);
  SY_CUDA_CHECK(cudaSetDevice(device_));
  position_of_expert_ = cuda::to_device(TensorView(placement32.data(), DType::i32, {E}), device_);
  cuda::copy(gate_weight_, host.gate_weight());
  cuda::copy(gate_bias_, host.gate_bias());
  cuda::copy(params_.w1, host.params().w1);
  cuda::copy(params_.b1, host.params().b1);
  cuda::copy(params_.w2, host.params().w2);
  cuda::copy(params_.b2, host.params().b2);
  SY_CUDA_CHECK(cudaStreamSynchronize(cuda::current_stream()));  // the host tensors may go after this call
}

void DeviceMoELayer::check_plan(const ExecPlan& plan) const {
  if (plan.r != 1)
    SY_THROW(NotSupported, "device moe: plan r = ", plan.r, "; the device layer runs expert parallel (r = 1) only");
  if (plan.d != 1)
    SY_THROW(NotSupported, "device moe: plan d = ", plan.d, "; the device layer runs one chunk (d = 1) only");
  if (plan.a2a != A2AAlgorithm::flat)
    SY_THROW(NotSupported, "device moe: plan a2a = ", to_string(plan.a2a),
             "; the device layer runs the flat all-to-all only");
}

Work DeviceMoELayer::exchange(const TensorView& in, const Blocks& send, const TensorView& out, const Blocks& recv,
                              int64_t width) {
  const int W = group_->size(), L = layout_.local_experts();
  std::vector<int64_t> sc(static_cast<size_t>(W), 0), rc(static_cast<size_t>(W), 0);
  for (int u = 0; u < W; ++u)
    for (int l = 0; l < L; ++l) {
      sc[static_cast<size_t>(u)] += send.rows[static_cast<size_t>(u * L + l)] * width;
      rc[static_cast<size_t>(u)] += recv.rows[static_cast<size_t>(u * L + l)] * width;
    }
  return group_->alltoallv(in, std::move(sc), out, std::move(rc));
}

MoEForward DeviceMoELayer::forward(const TensorView& x, const RoutingChoice& routing, const ExecPlan& plan) {
  check_plan(plan);
  const int64_t M = config_.model_dim;
  if (x.dtype() != DType::f32 || x.dim() != 2 || x.size(1) != M || !x.is_contiguous() ||
      x.device() != Device::cuda(device_))
    SY_THROW(InvalidArgument, "device moe: input is ", dtype_name(x.dtype()), " ", shape_string(x.shape()), " on ",
             to_string(x.device()), ", expected contiguous f32 [tokens, ", M, "] on cuda:", device_);
  const int E = config_.router.experts;
  if (routing.k < 1 || routing.k > E) SY_THROW(InvalidArgument, "moe: routing k = ", routing.k, ", expected 1..", E);
  RouterConfig rc = config_.router;
  rc.k = routing.k;
  rc.capacity_factor = routing.capacity_factor;
  rc.validate();
  if (rc.balance_loss != BalanceLoss::all_choices)
    SY_THROW(InvalidArgument, "device moe: router.balance_loss = top1 is not built on the GPU path (its loss and "
             "gradient count all k choices); use all_choices");
  if (rc.batch_prioritized)
    SY_THROW(NotSupported, "device moe: router.batch_prioritized = true; the device layout ranks choices in GShard order only");
  if (rc.noise_std > 0)
    SY_THROW(NotSupported, "device moe: router.noise_std = ", rc.noise_std, "; the device gate takes no noise");
  SY_CUDA_CHECK(cudaSetDevice(device_));
  cudaStream_t s = cuda::current_stream();
  const int64_t T = x.size(0);
  const int k = rc.k, W = group_->size(), L = layout_.local_experts();
  Saved& sv = saved_;
  sv = Saved{};
  sv.tokens = T;
  sv.k = k;
  sv.padded = plan.exchange == ExchangeMode::padded;

  std::optional<Phase> phase;  // device time per phase when profiling
  phase.emplace(*this, &MoEPhaseTimes::gate);
  // Gate and router.
  sv.x = device_empty({T, M});
  cuda::copy(sv.x, x);
  sv.logits = device_empty({T, E});
  kc::gemm_f32({.m = T, .n = E, .k = M, .a = fp(sv.x), .lda = M, .b = fp(gate_weight_), .ldb = E,
                .c = mp(sv.logits), .ldc = E},
               s);
  sv.scores = device_empty({T, E});
  sv.experts = device_empty({T, k}, DType::i32);
  sv.weights = device_empty({T, k});
  kernels::TopKGateArgs gate;
  gate.logits = fp(sv.logits);
  gate.bias = rc.gate == GateKind::sigmoid_bias ? fp(gate_bias_) : nullptr;
  gate.tokens = T;
  gate.experts = E;
  gate.k = k;
  gate.score = rc.gate == GateKind::softmax ? kernels::GateScore::softmax : kernels::GateScore::sigmoid_bias;
  gate.renormalize = rc.renormalize;
  gate.groups = rc.groups;
  gate.topk_groups = rc.topk_groups;
  gate.experts_out = static_cast<int32_t*>(sv.experts.data());
  gate.weights_out = mp(sv.weights);
  gate.scores_out = mp(sv.scores);
  kc::topk_gate(gate, s);

  // Layout counts and the losses' statistics; then one small copy to the host.
  const int64_t tiles = kc::dispatch_tiles(T, k);
  Tensor tile_rank = device_empty({T * k}, DType::i32), tile_base = device_empty({tiles * E}, DType::i32);
  Tensor load = device_empty({E}, DType::i32);
  const auto* experts_i32 = static_cast<const int32_t*>(sv.experts.data());
  const auto* positions = static_cast<const int32_t*>(position_of_expert_.data());
  kc::dispatch_counts(experts_i32, positions, T, k, E, static_cast<int32_t*>(tile_rank.data()),
                      static_cast<int32_t*>(tile_base.data()), static_cast<int32_t*>(load.data()), s);
  Tensor normalized = device_empty({T, E}), lse2 = device_empty({T});
  Tensor stats = cuda::zeros({E + 1}, DType::f32, device_);
  Tensor scratch = device_empty({std::max<int64_t>(1, kc::column_sum_scratch(T, E))});
  kc::router_stats(fp(sv.scores), fp(sv.logits), T, E, mp(normalized), mp(lse2), s);
  kc::add_column_sums(fp(normalized), T, E, mp(stats), mp(scratch), s);
  kc::add_column_sums(fp(lse2), T, 1, mp(stats, E), mp(scratch), s);
  const Tensor load_host = cuda::to_host(load), stats_host = cuda::to_host(stats);  // synchronises
  const int32_t* load_of_position = load_host.data_as<int32_t>();
  const float* stat = stats_host.data_as<float>();
  Routing for_capacity;  // only expert_load is read by expert_capacity
  for_capacity.expert_load.resize(static_cast<size_t>(E));
  double balance = 0.0;
  for (int e = 0; e < E; ++e) {
    const int64_t n = load_of_position[layout_.position(e)];
    for_capacity.expert_load[static_cast<size_t>(e)] = n;
    if (T > 0) balance += (static_cast<double>(n) / static_cast<double>(T * k)) * (stat[e] / static_cast<double>(T));
  }
  sv.expert_load = for_capacity.expert_load;
  MoEForward result;
  result.balance_loss = T > 0 ? E * balance : 0.0;
  result.z_loss = T > 0 ? stat[E] / static_cast<double>(T) : 0.0;

  // The group's capacity: the largest any rank needs.
  int64_t capacity = expert_capacity(rc, T, for_capacity, nullptr);
  if (W > 1) {
    Tensor c = cuda::to_device(TensorView(&capacity, DType::i64, {1}), device_);
    // A host read follows: wait on the host with the group's timeout, so a
    // missing peer is an error naming the op rather than a stream that never drains.
    group_->allreduce(c, c, {.op = ReduceOp::max}).wait(group_->default_timeout());
    capacity = cuda::to_host(c).data_as<int64_t>()[0];
  }
  sv.capacity = capacity;

  // Rows of each destination block (positions are rank-major: u * L + l).
  sv.send.slots = sv.recv.slots = L;
  sv.send.rows.resize(static_cast<size_t>(E));
  std::vector<int64_t> row_base(static_cast<size_t>(E));
  int64_t rows = 0;
  for (int pos = 0; pos < E; ++pos) {
    const int64_t kept = std::min<int64_t>(load_of_position[pos], capacity);
    result.dropped += load_of_position[pos] - kept;
    sv.send.rows[static_cast<size_t>(pos)] = sv.padded ? capacity : kept;
    row_base[static_cast<size_t>(pos)] = rows;
    rows += sv.send.rows[static_cast<size_t>(pos)];
  }
  Tensor row_base_device = cuda::to_device(TensorView(row_base.data(), DType::i64, {E}), device_);
  sv.row_of_choice = device_empty({T * k}, DType::i64);
  sv.token_of_row = device_empty({rows}, DType::i64);
  sv.weight_of_row = cuda::zeros({rows}, DType::f32, device_);
  cuda::fill_bytes(sv.token_of_row, 0xFF);  // -1: padding
  kc::dispatch_slots(experts_i32, positions, fp(sv.weights), T, k, E, static_cast<const int32_t*>(tile_rank.data()),
                     static_cast<const int32_t*>(tile_base.data()), static_cast<const int64_t*>(row_base_device.data()),
                     capacity, static_cast<int64_t*>(sv.row_of_choice.data()),
                     static_cast<int64_t*>(sv.token_of_row.data()), mp(sv.weight_of_row), s);

  // Encode, and the exchange to the experts.
  phase.reset();
  phase.emplace(*this, &MoEPhaseTimes::encode);
  Tensor send = device_empty({rows, M});
  kc::gather_rows(fp(sv.x), static_cast<const int64_t*>(sv.token_of_row.data()), rows, M, mp(send), s);
  phase.reset();
  phase.emplace(*this, &MoEPhaseTimes::dispatch_a2a);
  if (W == 1) {
    sv.recv = sv.send;
  } else if (sv.padded) {
    sv.recv.rows.assign(static_cast<size_t>(W * L), capacity);
  } else {  // dropless: each source tells me its block sizes
    Tensor counts = cuda::to_device(TensorView(sv.send.rows.data(), DType::i64, {W * L}), device_);
    Tensor received = device_empty({W * L}, DType::i64);
    group_->alltoall(counts, received).wait(group_->default_timeout());
    const Tensor h = cuda::to_host(received);
    sv.recv.rows.assign(h.data_as<int64_t>(), h.data_as<int64_t>() + W * L);
  }
  if (W > 1) {
    sv.rows = device_empty({sv.recv.total(), M});
    exchange(send, sv.send, sv.rows, sv.recv, M).wait();
  } else {
    sv.rows = send;
  }

  phase.reset();
  phase.emplace(*this, &MoEPhaseTimes::experts);
  expert_forward();
  phase.reset();
  phase.emplace(*this, &MoEPhaseTimes::combine_a2a);

  if (W > 1) {
    sv.returned = device_empty({rows, M});
    exchange(sv.out, sv.recv, sv.returned, sv.send, M).wait();
  } else {
    sv.returned = sv.out;
  }
  phase.reset();
  phase.emplace(*this, &MoEPhaseTimes::decode);
  result.output = device_empty({T, M});
  kc::combine_rows(fp(sv.returned), static_cast<const int64_t*>(sv.row_of_choice.data()), fp(sv.weights), T, k, M,
                   mp(result.output), s);
  phase.reset();
  sv.valid = true;
  return result;
}

void DeviceMoELayer::expert_forward() {
  Saved& sv = saved_;
  cudaStream_t s = cuda::current_stream();
  const int64_t M = config_.model_dim, H = config_.hidden_dim, H1 = hidden_in(config_), R = sv.recv.total();
  const int W = group_->size(), L = layout_.local_experts();
  const bool bf = config_.compute == DType::bf16;
  sv.pre = device_empty({R, H1});
  sv.act = device_empty({R, H});
  sv.out = device_empty({R, M});
  if (bf) {
    sv.rows16 = device_empty({R, M}, DType::bf16);
    sv.act16 = device_empty({R, H}, DType::bf16);
    sv.w1_16 = device_empty(params_.w1.shape(), DType::bf16);
    sv.w2_16 = device_empty(params_.w2.shape(), DType::bf16);
    kc::to_bf16(fp(sv.rows), R * M, static_cast<uint16_t*>(sv.rows16.data()), s);
    kc::to_bf16(fp(params_.w1), params_.w1.numel(), static_cast<uint16_t*>(sv.w1_16.data()), s);
    kc::to_bf16(fp(params_.w2), params_.w2.numel(), static_cast<uint16_t*>(sv.w2_16.data()), s);
  }
  const auto per_block = [&](auto&& gemm) { for_expert_blocks(W, L, gemm); };
  // Biases first; the GEMMs accumulate on top. (One launch per block: rank-1
  // GEMMs batched per source rank would need fewer, see docs/gpu.md.)
  for (int u = 0; u < W; ++u)
    for (int l = 0; l < L; ++l) {
      const int64_t m = sv.recv.rows[static_cast<size_t>(u * L + l)], o = sv.recv.offset(u, l);
      kc::broadcast_rows(fp(params_.b1, l * H1), m, H1, mp(sv.pre, o * H1), s);
      kc::broadcast_rows(fp(params_.b2, l * M), m, M, mp(sv.out, o * M), s);
    }
  // fc1, activation, fc2.
  per_block([&](int l, int batch, int64_t m, int64_t o) {
    BlockGemm g{.m = m, .n = H1, .k = M, .lda = M, .stride_a = m * M, .ldb = H1, .stride_b = M * H1,
                .accumulate = true, .c = mp(sv.pre, o * H1), .ldc = H1, .stride_c = m * H1, .batch = batch};
    if (bf) g.a16 = bp(sv.rows16, o * M), g.b16 = bp(sv.w1_16, l * M * H1);
    else g.a = fp(sv.rows, o * M), g.b = fp(params_.w1, l * M * H1);
    run_gemm(g, s);
  });
  kc::activation_forward(config_.activation, fp(sv.pre), R, H, mp(sv.act), s);
  if (bf) kc::to_bf16(fp(sv.act), R * H, static_cast<uint16_t*>(sv.act16.data()), s);
  per_block([&](int l, int batch, int64_t m, int64_t o) {
    BlockGemm g{.m = m, .n = M, .k = H, .lda = H, .stride_a = m * H, .ldb = M, .stride_b = H * M, .accumulate = true,
                .c = mp(sv.out, o * M), .ldc = M, .stride_c = m * M, .batch = batch};
    if (bf) g.a16 = bp(sv.act16, o * H), g.b16 = bp(sv.w2_16, l * H * M);
    else g.a = fp(sv.act, o * H), g.b = fp(params_.w2, l * H * M);
    run_gemm(g, s);
  });
}

void DeviceMoELayer::expert_backward(const Tensor& d_out, bool input_grad, Tensor& d_rows) {
  Saved& sv = saved_;
  cudaStream_t s = cuda::current_stream();
  const int64_t M = config_.model_dim, H = config_.hidden_dim, H1 = hidden_in(config_), R = sv.recv.total();
  const int W = group_->size(), L = layout_.local_experts();
  const bool bf = config_.compute == DType::bf16;
  Tensor d_act = device_empty({R, H}), d_pre = device_empty({R, H1});
  Tensor dy16, dp16;
  if (bf) {
    dy16 = device_empty({R, M}, DType::bf16);
    dp16 = device_empty({R, H1}, DType::bf16);
    kc::to_bf16(fp(d_out), R * M, static_cast<uint16_t*>(dy16.data()), s);
  }
  const auto per_block = [&](auto&& gemm) { for_expert_blocks(W, L, gemm); };
  // Bias gradients: deterministic column sums per block.
  Tensor scratch = device_empty({std::max<int64_t>(1, kc::column_sum_scratch(largest_block(), std::max(H1, M)))});
  const auto bias_grad = [&](const Tensor& dy, int64_t width, const Tensor& db) {
    for (int u = 0; u < W; ++u)
      for (int l = 0; l < L; ++l) {
        const int64_t m = sv.recv.rows[static_cast<size_t>(u * L + l)], o = sv.recv.offset(u, l);
        kc::add_column_sums(fp(dy, o * width), m, width, mp(db, l * width), mp(scratch), s);
      }
  };
  bias_grad(d_out, M, grads_.b2);
  // dW2 += act^T dy; d_act = dy W2^T.
  per_block([&](int l, int batch, int64_t m, int64_t o) {
    BlockGemm g{.ta = true, .m = H, .n = M, .k = m, .lda = H, .stride_a = m * H, .ldb = M, .stride_b = m * M,
                .accumulate = true, .c = mp(grads_.w2, l * H * M), .ldc = M, .stride_c = H * M, .batch = batch};
    if (bf) g.a16 = bp(sv.act16, o * H), g.b16 = bp(dy16, o * M);
    else g.a = fp(sv.act, o * H), g.b = fp(d_out, o * M);
    run_gemm(g, s);
    BlockGemm d{.tb = true, .m = m, .n = H, .k = M, .lda = M, .stride_a = m * M, .ldb = M, .stride_b = H * M,
                .c = mp(d_act, o * H), .ldc = H, .stride_c = m * H, .batch = batch};
    if (bf) d.a16 = bp(dy16, o * M), d.b16 = bp(sv.w2_16, l * H * M);
    else d.a = fp(d_out, o * M), d.b = fp(params_.w2, l * H * M);
    run_gemm(d, s);
  });
  kc::activation_backward(config_.activation, fp(sv.pre), fp(d_act), R, H, mp(d_pre), s);
  if (bf) kc::to_bf16(fp(d_pre), R * H1, static_cast<uint16_t*>(dp16.data()), s);
  bias_grad(d_pre, H1, grads_.b1);
  // dW1 += rows^T d_pre; d_rows = d_pre W1^T.
  per_block([&](int l, int batch, int64_t m, int64_t o) {
    BlockGemm g{.ta = true, .m = M, .n = H1, .k = m, .lda = M, .stride_a = m * M, .ldb = H1, .stride_b = m * H1,
                .accumulate = true, .c = mp(grads_.w1, l * M * H1), .ldc = H1, .stride_c = M * H1, .batch = batch};
    if (bf) g.a16 = bp(sv.rows16, o * M), g.b16 = bp(dp16, o * H1);
    else g.a = fp(sv.rows, o * M), g.b = fp(d_pre, o * H1);
    run_gemm(g, s);
    if (!input_grad) return;
    BlockGemm d{.tb = true, .m = m, .n = M, .k = H1, .lda = H1, .stride_a = m * H1, .ldb = H1, .stride_b = M * H1,
                .c = mp(d_rows, o * M), .ldc = M, .stride_c = m * M, .batch = batch};
    if (bf) d.a16 = bp(dp16, o * H1), d.b16 = bp(sv.w1_16, l * M * H1);
    else d.a = fp(d_pre, o * H1), d.b = fp(params_.w1, l * M * H1);
    run_gemm(d, s);
  });
}

Tensor DeviceMoELayer::backward(const TensorView& dout, double balance_coef, double z_coef, bool input_grad) {
  if (!saved_.valid) SY_THROW(InvalidArgument, "device moe: backward without a forward to differentiate");
  Saved& sv = saved_;
  const int64_t T = sv.tokens, M = config_.model_dim, rows = sv.send.total();
  const int E = config_.router.experts, k = sv.k, W = group_->size();
  if (dout.dtype() != DType::f32 || dout.shape() != Shape{T, M} || !dout.is_contiguous() ||
      dout.device() != Device::cuda(device_))
    SY_THROW(InvalidArgument, "device moe: dout is ", dtype_name(dout.dtype()), " ", shape_string(dout.shape()), " on ",
             to_string(dout.device()), ", expected contiguous f32 [", T, ", ", M, "] on cuda:", device_);
  SY_CUDA_CHECK(cudaSetDevice(device_));
  cudaStream_t s = cuda::current_stream();
  const float* g = static_cast<const float*>(dout.data());
  const auto* token_of_row = static_cast<const int64_t*>(sv.token_of_row.data());

  // Decode's backward: each returned row's gradient, and its weight's.
  Phase whole(*this, &MoEPhaseTimes::backward);
  Tensor d_returned = device_empty({rows, M}), d_weight_of_row = device_empty({rows});
  kc::gather_scaled_rows(g, token_of_row, fp(sv.weight_of_row), rows, M, mp(d_returned), s);
  kc::row_dots(g, token_of_row, fp(sv.returned), rows, M, mp(d_weight_of_row), s);

  Tensor d_out = d_returned;
  if (W > 1) {
    d_out = device_empty({sv.recv.total(), M});
    exchange(d_returned, sv.send, d_out, sv.recv, M).wait();
  }
  Tensor d_rows = device_empty({sv.recv.total(), M});
  expert_backward(d_out, input_grad, d_rows);

  // Gate: the choices' weights, the losses, down to the logits.
  Tensor balance_grad;
  if (balance_coef != 0.0 && T > 0) {
    std::vector<float> gb(static_cast<size_t>(E));
    for (int e = 0; e < E; ++e)
      gb[static_cast<size_t>(e)] = static_cast<float>(balance_coef * E *
                                                      (static_cast<double>(sv.expert_load[static_cast<size_t>(e)]) /
                                                       static_cast<double>(T * k)) /
                                                      static_cast<double>(T));
    balance_grad = cuda::to_device(TensorView(gb.data(), DType::f32, {E}), device_);
  }
  Tensor d_logits = device_empty({T, E});
  kc::GateBackwardArgs gb;
  gb.scores = fp(sv.scores);
  gb.logits = fp(sv.logits);
  gb.experts = static_cast<const int32_t*>(sv.experts.data());
  gb.weights = fp(sv.weights);
  gb.row_of_choice = static_cast<const int64_t*>(sv.row_of_choice.data());
  gb.d_weight_of_row = fp(d_weight_of_row);
  gb.balance_grad = balance_grad.defined() ? fp(balance_grad) : nullptr;
  gb.tokens = T;
  gb.experts_total = E;
  gb.k = k;
  gb.renormalize = config_.router.renormalize;
  gb.score = config_.router.gate == GateKind::softmax ? kernels::GateScore::softmax : kernels::GateScore::sigmoid_bias;
  gb.z_coef = z_coef;
  gb.d_logits = mp(d_logits);
  kc::gate_backward(gb, s);
  Tensor local_gate_grad = device_empty({M, E});
  kc::gemm_f32({.transpose_a = true, .m = M, .n = E, .k = T, .a = fp(sv.x), .lda = M, .b = fp(d_logits), .ldb = E,
                .c = mp(local_gate_grad), .ldc = E},
               s);
  if (T == 0) SY_CUDA_CHECK(cudaMemsetAsync(local_gate_grad.data(), 0, local_gate_grad.nbytes(), s));
  if (W > 1) group_->allreduce(local_gate_grad, local_gate_grad).wait();
  kc::axpy(1.f, fp(local_gate_grad), local_gate_grad.numel(), mp(gate_grad_), s);

  if (!input_grad) return Tensor();
  Tensor d_sent = d_rows;
  if (W > 1) {
    d_sent = device_empty({rows, M});
    exchange(d_rows, sv.recv, d_sent, sv.send, M).wait();
  }
  Tensor dx = device_empty({T, M});
  kc::combine_rows(fp(d_sent), static_cast<const int64_t*>(sv.row_of_choice.data()), nullptr, T, k, M, mp(dx), s);
  kc::gemm_f32({.transpose_b = true, .m = T, .n = M, .k = E, .a = fp(d_logits), .lda = E, .b = fp(gate_weight_),
                .ldb = E, .beta = 1.f, .c = mp(dx), .ldc = M},
               s);
  return dx;
}

}  // namespace switchyard
