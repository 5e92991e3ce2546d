#include "moe/moe_layer.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <cstring>
#include <numeric>

#include "core/safetensors.h"
#include "kernels/gemm.h"

namespace switchyard {

using kernels::cpu::Activation;

void MoEConfig::validate() const {
  if (model_dim < 1) SY_THROW(InvalidArgument, "moe: model_dim = ", model_dim, ", expected >= 1");
  if (compute != DType::f32 && compute != DType::bf16)
    SY_THROW(InvalidArgument, "moe: compute = ", dtype_name(compute), ", expected f32 or bf16");
  if (hidden_dim < 1) SY_THROW(InvalidArgument, "moe: hidden_dim = ", hidden_dim, ", expected >= 1");
  router.validate();
}

namespace {
// Adds the time from construction to destruction to a phase counter.
class PhaseTimer {
 public:
  explicit PhaseTimer(double& into) : into_(into), start_(Clock::now()) {}
  ~PhaseTimer() { into_ += std::chrono::duration<double>(Clock::now() - start_).count(); }

 private:
  double& into_;
  Clock::time_point start_;
};
}  // namespace

Tensor MoELayer::scratch(Scratch which, Shape shape, DType dtype) {
  const auto i = static_cast<size_t>(which);
  if (scratch_storage_.empty()) {
    scratch_storage_.resize(static_cast<size_t>(Scratch::count));
    scratch_bytes_.assign(static_cast<size_t>(Scratch::count), 0);
  }
  const size_t bytes = static_cast<size_t>(shape_numel(shape)) * dtype_size(dtype);
  if (!scratch_storage_[i] || scratch_bytes_[i] < bytes) {
    scratch_storage_[i] = allocate_host(bytes + bytes / 8);  // headroom for the next batch's routing
    scratch_bytes_[i] = bytes + bytes / 8;
  }
  return Tensor::adopt(TensorView(scratch_storage_[i].get(), dtype, std::move(shape)), scratch_storage_[i]);
}

void MoELayer::gemm_bf16(const kernels::cpu::GemmBf16Args& args) {
  kernels::cpu::gemm_bf16(args);
  if (args.m && args.n && args.k)
    ++gemms_[GemmShape{args.m, args.n, args.k, args.transpose_a, args.transpose_b, true}];
}

void MoELayer::gemm(const kernels::cpu::GemmArgs& args) {
  kernels::cpu::gemm_f32(args);
  if (args.m && args.n && args.k) ++gemms_[GemmShape{args.m, args.n, args.k, args.transpose_a, args.transpose_b}];
}

double MoELayer::gemm_flops() const {
  double flops = 0;
  for (const auto& [shape, count] : gemms_) flops += 2.0 * shape.m * shape.n * shape.k * count;
  return flops;
}

void MoELayer::reset_profile() {
  times_ = {};
  gemms_.clear();
}

int64_t DispatchPlan::recv_rows() const {
  return std::accumulate(recv_rows_per_rank.begin(), recv_rows_per_rank.end(), int64_t{0});
}

MoELayer::MoELayer(MoEConfig config, std::shared_ptr<Communicator> expert_group)
    : config_(std::move(config)), group_(std::move(expert_group)), layout_(config_.router.experts, group_->size()) {
  config_.validate();
  const int64_t M = config_.model_dim, H = config_.hidden_dim, L = layout_.local_experts();
  gate_weight_ = Tensor::zeros({M, config_.router.experts}, DType::f32);
  gate_bias_ = Tensor::zeros({config_.router.experts}, DType::f32);
  params_.w1 = Tensor::zeros({L, M, hidden_in()}, DType::f32);
  params_.b1 = Tensor::zeros({L, hidden_in()}, DType::f32);
  params_.w2 = Tensor::zeros({L, H, M}, DType::f32);
  params_.b2 = Tensor::zeros({L, M}, DType::f32);
  zero_grad();
}

void MoELayer::sgd_step(double lr) {
  const std::pair<Tensor*, Tensor*> pairs[] = {{&gate_weight_, &gate_grad_}, {&params_.w1, &grads_.w1},
                                               {&params_.b1, &grads_.b1},     {&params_.w2, &grads_.w2},
                                               {&params_.b2, &grads_.b2}};
  const auto rate = static_cast<float>(lr);
  for (auto [param, grad] : pairs) {
    float* p = param->data_as<float>();
    const float* g = grad->data_as<float>();
    const int64_t n = param->numel();
#pragma omp parallel for schedule(static) if (n >= (1 << 15))
    for (int64_t i = 0; i < n; ++i) p[i] -= rate * g[i];
  }
}

void MoELayer::zero_grad() {
  gate_grad_ = Tensor::zeros(gate_weight_.shape(), DType::f32);
  grads_.w1 = Tensor::zeros(params_.w1.shape(), DType::f32);
  grads_.b1 = Tensor::zeros(params_.b1.shape(), DType::f32);
  grads_.w2 = Tensor::zeros(params_.w2.shape(), DType::f32);
  grads_.b2 = Tensor::zeros(params_.b2.shape(), DType::f32);
}

int64_t MoELayer::hidden_in() const {
  return config_.activation == Activation::swiglu ? 2 * config_.hidden_dim : config_.hidden_dim;
}

void MoELayer::set_placement(std::vector<int> position_of_expert) {
  layout_.set_placement(std::move(position_of_expert));
  saved_.valid = false;  // a saved plan used the old positions
}

void MoELayer::init_parameters(uint64_t seed) {
  const int64_t M = config_.model_dim, H = config_.hidden_dim, H1 = hidden_in();
  noise_ = Rng(seed * 7919u + static_cast<uint64_t>(group_->rank()) + 17);
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
  PhaseTimer timer(times_.gate);
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
  gemm({.m = T, .n = E, .k = M, .a = static_cast<const float*>(x.data()), .lda = M,
                          .b = gate_weight_.data_as<float>(), .ldb = E, .c = logits.data_as<float>(), .ldc = E});
  const TensorView bias = gate_bias_.view();
  return route(config_.router, logits, config_.router.gate == GateKind::sigmoid_bias ? &bias : nullptr,
               config_.router.noise_std > 0 ? &noise_ : nullptr);
}

DispatchPlan MoELayer::plan(const Routing& routing, int64_t tokens) {
  PhaseTimer timer(times_.gate);
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
  std::vector<int64_t> order(static_cast<size_t>(tokens));
  std::iota(order.begin(), order.end(), int64_t{0});
  if (config_.router.batch_prioritized)
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return weight[a * k] > weight[b * k]; });
  for (int j = 0; j < k; ++j)
    for (const int64_t t : order) {
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
  PhaseTimer timer(times_.dispatch_a2a);
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

MoELayer::Exchange MoELayer::dispatch_async(const DispatchPlan& p, const TensorView& x) {
  const int64_t M = config_.model_dim;
  Tensor send = scratch(Scratch::send, {p.send_rows(), M});
  {
    PhaseTimer timer(times_.encode);
    kernels::cpu::gather_rows(static_cast<const float*>(x.data()), p.token_of_row.data(), p.send_rows(), M,
                              send.data_as<float>());
  }
  Tensor recv = scratch(Scratch::recv, {p.recv_rows(), M});
  Work done = group_->alltoallv(send, times(p.rows_per_rank, M), recv, times(p.recv_rows_per_rank, M));
  return {recv, std::move(done)};
}

Tensor MoELayer::dispatch(const DispatchPlan& p, const TensorView& x) {
  Exchange e = dispatch_async(p, x);
  PhaseTimer timer(times_.dispatch_a2a);
  e.done.wait();
  return e.rows;
}

ExpertActivations MoELayer::run_experts(const DispatchPlan& p, const TensorView& rows) {
  PhaseTimer timer(times_.experts);
  const int64_t M = config_.model_dim, H = config_.hidden_dim, H1 = hidden_in();
  const int W = group_->size(), L = layout_.local_experts();
  const int64_t R = rows.size(0);
  const bool bf = config_.compute == DType::bf16;
  Tensor pre = scratch(Scratch::pre, {R, H1}), act = scratch(Scratch::act, {R, H});
  Tensor out = scratch(Scratch::expert_out, {R, M});
  const float* x = static_cast<const float*>(rows.data());
  Tensor x16, act16, w1_16, w2_16;
  if (bf) {
    x16 = scratch(Scratch::recv_bf16, {R, M}, DType::bf16);
    act16 = scratch(Scratch::act_bf16, {R, H}, DType::bf16);
    w1_16 = scratch(Scratch::w1_bf16, params_.w1.shape(), DType::bf16);
    w2_16 = scratch(Scratch::w2_bf16, params_.w2.shape(), DType::bf16);
    kernels::cpu::to_bf16(x, R * M, static_cast<uint16_t*>(x16.data()));
    kernels::cpu::to_bf16(params_.w1.data_as<float>(), params_.w1.numel(), static_cast<uint16_t*>(w1_16.data()));
    kernels::cpu::to_bf16(params_.w2.data_as<float>(), params_.w2.numel(), static_cast<uint16_t*>(w2_16.data()));
  }
  auto b16 = [](const Tensor& t, int64_t offset) { return static_cast<const uint16_t*>(t.data()) + offset; };
  int64_t offset = 0;
  for (int w = 0; w < W; ++w)
    for (int l = 0; l < L; ++l) {
      const int64_t m = p.recv_rows_per_block[static_cast<size_t>(w * L + l)];
      if (m == 0) continue;
      float* pre_b = pre.data_as<float>() + offset * H1;
      float* act_b = act.data_as<float>() + offset * H;
      float* out_b = out.data_as<float>() + offset * M;
      // Biases first, then GEMMs accumulate on top.
      kernels::cpu::broadcast_rows(params_.b1.data_as<float>() + l * H1, m, H1, pre_b);
      kernels::cpu::broadcast_rows(params_.b2.data_as<float>() + l * M, m, M, out_b);
      if (bf)
        gemm_bf16({.m = m, .n = H1, .k = M, .a = b16(x16, offset * M), .lda = M, .b = b16(w1_16, l * M * H1),
                   .ldb = H1, .accumulate = true, .c = pre_b, .ldc = H1});
      else
        gemm({.m = m, .n = H1, .k = M, .a = x + offset * M, .lda = M, .b = params_.w1.data_as<float>() + l * M * H1,
              .ldb = H1, .beta = 1.f, .c = pre_b, .ldc = H1});
      kernels::cpu::activation_forward(config_.activation, pre_b, m, H, act_b);
      if (bf) {
        uint16_t* a16 = static_cast<uint16_t*>(act16.data()) + offset * H;
        kernels::cpu::to_bf16(act_b, m * H, a16);
        gemm_bf16({.m = m, .n = M, .k = H, .a = a16, .lda = H, .b = b16(w2_16, l * H * M), .ldb = M,
                   .accumulate = true, .c = out_b, .ldc = M});
      } else {
        gemm({.m = m, .n = M, .k = H, .a = act_b, .lda = H, .b = params_.w2.data_as<float>() + l * H * M, .ldb = M,
              .beta = 1.f, .c = out_b, .ldc = M});
      }
      offset += m;
    }
  return {out, pre, act, x16, act16, w1_16, w2_16};
}

MoELayer::Exchange MoELayer::combine_exchange_async(const DispatchPlan& p, const TensorView& expert_out) {
  const int64_t M = config_.model_dim;
  Tensor back = scratch(Scratch::back, {p.send_rows(), M});
  Work done = group_->alltoallv(expert_out, times(p.recv_rows_per_rank, M), back, times(p.rows_per_rank, M));
  return {back, std::move(done)};
}

Tensor MoELayer::combine_exchange(const DispatchPlan& p, const TensorView& expert_out) {
  Exchange e = combine_exchange_async(p, expert_out);
  PhaseTimer timer(times_.combine_a2a);
  e.done.wait();
  return e.rows;
}

Tensor MoELayer::combine(const DispatchPlan& p, const TensorView& returned) {
  PhaseTimer timer(times_.decode);
  const int64_t M = config_.model_dim;
  Tensor out = Tensor::empty({p.tokens, M}, DType::f32);
  std::vector<float> scale(p.row_of_choice.size(), 0.f);
  for (size_t c = 0; c < scale.size(); ++c)
    if (p.row_of_choice[c] >= 0) scale[c] = p.weight_of_row[static_cast<size_t>(p.row_of_choice[c])];
  kernels::cpu::combine_rows(static_cast<const float*>(returned.data()), p.row_of_choice.data(), scale.data(),
                             p.tokens, p.k, M, out.data_as<float>());
  return out;
}

namespace {
std::string expert_key(int expert, const char* name) { return "experts." + std::to_string(expert) + "." + name; }
}  // namespace

void MoELayer::save(const std::string& prefix) const {
  const int me = group_->rank(), W = group_->size();
  const int64_t M = config_.model_dim, H = config_.hidden_dim, H1 = hidden_in();
  std::vector<std::pair<std::string, TensorView>> tensors;
  if (me == 0) tensors.emplace_back("gate.weight", gate_weight_.view());
  auto slice = [](const Tensor& t, int slot, Shape shape) {
    const int64_t n = shape_numel(shape);
    return TensorView(const_cast<float*>(t.data_as<float>()) + slot * n, DType::f32, std::move(shape));
  };
  for (int slot = 0; slot < layout_.local_experts(); ++slot) {
    const int e = layout_.expert_at(me, slot);
    tensors.emplace_back(expert_key(e, "w1"), slice(params_.w1, slot, {M, H1}));
    tensors.emplace_back(expert_key(e, "b1"), slice(params_.b1, slot, {H1}));
    tensors.emplace_back(expert_key(e, "w2"), slice(params_.w2, slot, {H, M}));
    tensors.emplace_back(expert_key(e, "b2"), slice(params_.b2, slot, {M}));
  }
  save_safetensors(prefix + ".rank" + std::to_string(me) + "-of-" + std::to_string(W) + ".safetensors", tensors,
                   {{"format", "switchyard-moe-v1"}, {"experts", std::to_string(config_.router.experts)}});
  group_->barrier().wait();  // every shard is on disk before anyone loads
}

void MoELayer::load(const std::string& prefix) {
  namespace fs = std::filesystem;
  const fs::path base(prefix);
  const fs::path dir = base.has_parent_path() ? base.parent_path() : fs::path(".");
  const std::string stem = base.filename().string() + ".rank";
  std::vector<SafetensorsFile> shards;
  if (fs::is_directory(dir))
    for (const auto& entry : fs::directory_iterator(dir)) {
      const std::string name = entry.path().filename().string();
      if (name.rfind(stem, 0) == 0 && name.size() > 12 && name.substr(name.size() - 12) == ".safetensors")
        shards.push_back(SafetensorsFile::open(entry.path().string()));
    }
  if (shards.empty()) SY_THROW(IoError, "moe: no checkpoint shards '", prefix, ".rank*-of-*.safetensors'");
  auto find = [&](const std::string& key) -> const SafetensorsFile& {
    const SafetensorsFile* found = nullptr;
    for (const auto& f : shards) {
      if (!f.contains(key)) continue;
      if (found)
        SY_THROW(InvalidArgument, "moe: checkpoint '", prefix, "': tensor '", key, "' is in both '", found->path(),
                 "' and '", f.path(), "'; shards of several saves share the prefix, remove the stale ones");
      found = &f;
    }
    if (!found)
      SY_THROW(InvalidArgument, "moe: checkpoint '", prefix, "' has no tensor '", key, "' (", shards.size(), " shards)");
    return *found;
  };
  const int64_t M = config_.model_dim, H = config_.hidden_dim, H1 = hidden_in();
  auto into = [&](Tensor& dst, int slot, const std::string& key, const Shape& shape) {
    Tensor t = find(key).load(key, shape, DType::f32);
    std::memcpy(dst.data_as<float>() + slot * t.numel(), t.data(), t.nbytes());
  };
  into(gate_weight_, 0, "gate.weight", gate_weight_.shape());
  const int me = group_->rank();
  for (int slot = 0; slot < layout_.local_experts(); ++slot) {
    const int e = layout_.expert_at(me, slot);
    into(params_.w1, slot, expert_key(e, "w1"), {M, H1});
    into(params_.b1, slot, expert_key(e, "b1"), {H1});
    into(params_.w2, slot, expert_key(e, "w2"), {H, M});
    into(params_.b2, slot, expert_key(e, "b2"), {M});
  }
  group_->barrier().wait();
}

void MoELayer::update_gate_bias(double rate) {
  if (config_.router.gate != GateKind::sigmoid_bias)
    SY_THROW(InvalidArgument, "moe: update_gate_bias needs the sigmoid_bias gate");
  if (!saved_.valid) SY_THROW(InvalidArgument, "moe: update_gate_bias without a forward");
  const int E = config_.router.experts;
  Tensor load = Tensor::empty({E}, DType::f64);
  for (int e = 0; e < E; ++e) load.data_as<double>()[e] = static_cast<double>(saved_.routing.expert_load[e]);
  group_->allreduce(load, load).wait();  // the group's load, so every replica moves its bias alike
  double mean = 0;
  for (int e = 0; e < E; ++e) mean += load.data_as<double>()[e] / E;
  for (int e = 0; e < E; ++e) {
    const double l = load.data_as<double>()[e];
    gate_bias_.data_as<float>()[e] += static_cast<float>(l < mean ? rate : l > mean ? -rate : 0.0);
  }
}

MoEForward MoELayer::forward(const TensorView& x) {
  Saved& sv = saved_;
  sv.valid = false;
  sv.routing = route_tokens(x, sv.logits);
  sv.plan = plan(sv.routing, x.size(0));
  exchange_layout(sv.plan);
  sv.rows = dispatch(sv.plan, x);
  sv.experts = run_experts(sv.plan, sv.rows);
  sv.returned = combine_exchange(sv.plan, sv.experts.out);
  sv.x = scratch(Scratch::input, x.shape());
  if (x.nbytes()) std::memcpy(sv.x.data(), x.data(), x.nbytes());
  sv.valid = true;
  MoEForward f;
  f.output = combine(sv.plan, sv.returned);
  f.balance_loss = sv.routing.balance_loss;
  f.z_loss = sv.routing.z_loss;
  f.dropped = sv.plan.dropped;
  return f;
}

Tensor MoELayer::backward(const TensorView& dout, double balance_coef, double z_coef, bool input_grad) {
  if (!saved_.valid) SY_THROW(InvalidArgument, "moe: backward without a forward to differentiate");
  PhaseTimer timer(times_.backward);
  const Saved& sv = saved_;
  const DispatchPlan& p = sv.plan;
  const int64_t T = p.tokens, M = config_.model_dim, H = config_.hidden_dim, H1 = hidden_in();
  const int E = config_.router.experts, k = config_.router.k, W = group_->size(), L = layout_.local_experts();
  if (dout.dtype() != DType::f32 || dout.shape() != Shape{T, M} || !dout.is_contiguous())
    SY_THROW(InvalidArgument, "moe: dout is ", dtype_name(dout.dtype()), " ", shape_string(dout.shape()),
             ", expected contiguous f32 [", T, ", ", M, "] like the output");
  const float* g = static_cast<const float*>(dout.data());

  // Combine: returned rows were weighted and summed into their tokens.
  Tensor d_returned = scratch(Scratch::d_returned, {p.send_rows(), M});
  kernels::cpu::gather_scaled_rows(g, p.token_of_row.data(), p.weight_of_row.data(), p.send_rows(), M,
                                   d_returned.data_as<float>());
  std::vector<float> d_weight_of_row(static_cast<size_t>(p.send_rows()));
  kernels::cpu::row_dots(g, p.token_of_row.data(), sv.returned.data_as<float>(), p.send_rows(), M,
                         d_weight_of_row.data());

  // To the experts, the way the tokens went.
  Tensor d_out = scratch(Scratch::d_out, {p.recv_rows(), M});
  group_->alltoallv(d_returned, times(p.rows_per_rank, M), d_out, times(p.recv_rows_per_rank, M)).wait();

  Tensor d_rows = scratch(Scratch::d_rows, {p.recv_rows(), M});
  Tensor d_act = scratch(Scratch::d_act, {p.recv_rows(), H}), d_pre = scratch(Scratch::d_pre, {p.recv_rows(), H1});
  const bool bf = config_.compute == DType::bf16;
  Tensor dy16, dp16;
  if (bf) {  // the bf16 copies of rows, activations and weights are the forward's
    dy16 = scratch(Scratch::d_out_bf16, {p.recv_rows(), M}, DType::bf16);
    dp16 = scratch(Scratch::d_pre_bf16, {p.recv_rows(), H1}, DType::bf16);
    kernels::cpu::to_bf16(d_out.data_as<float>(), d_out.numel(), static_cast<uint16_t*>(dy16.data()));
  }
  auto b16 = [](const Tensor& t, int64_t offset) { return static_cast<const uint16_t*>(t.data()) + offset; };
  int64_t offset = 0;
  for (int w = 0; w < W; ++w)
    for (int l = 0; l < L; ++l) {
      const int64_t m = p.recv_rows_per_block[static_cast<size_t>(w * L + l)];
      if (m == 0) continue;
      const float* dy = d_out.data_as<float>() + offset * M;
      const float* act = sv.experts.act.data_as<float>() + offset * H;
      const float* pre = sv.experts.pre.data_as<float>() + offset * H1;
      const float* x = sv.rows.data_as<float>() + offset * M;
      float* da = d_act.data_as<float>() + offset * H;
      float* dp = d_pre.data_as<float>() + offset * H1;
      float* dw1 = grads_.w1.data_as<float>() + l * M * H1;
      float* dw2 = grads_.w2.data_as<float>() + l * H * M;
      kernels::cpu::add_column_sums(dy, m, M, grads_.b2.data_as<float>() + l * M);
      if (bf) {
        const uint16_t* dy_b = static_cast<const uint16_t*>(dy16.data()) + offset * M;
        gemm_bf16({.transpose_a = true, .m = H, .n = M, .k = m, .a = b16(sv.experts.act16, offset * H), .lda = H,
                   .b = dy_b, .ldb = M, .accumulate = true, .c = dw2, .ldc = M});
        gemm_bf16({.transpose_b = true, .m = m, .n = H, .k = M, .a = dy_b, .lda = M,
                   .b = b16(sv.experts.w2_16, l * H * M), .ldb = M, .c = da, .ldc = H});
      } else {
        gemm({.transpose_a = true, .m = H, .n = M, .k = m, .a = act, .lda = H, .b = dy, .ldb = M, .beta = 1.f,
              .c = dw2, .ldc = M});
        gemm({.transpose_b = true, .m = m, .n = H, .k = M, .a = dy, .lda = M,
              .b = params_.w2.data_as<float>() + l * H * M, .ldb = M, .c = da, .ldc = H});
      }
      kernels::cpu::activation_backward(config_.activation, pre, da, m, H, dp);
      kernels::cpu::add_column_sums(dp, m, H1, grads_.b1.data_as<float>() + l * H1);
      if (bf) {
        uint16_t* dp_b = static_cast<uint16_t*>(dp16.data()) + offset * H1;
        kernels::cpu::to_bf16(dp, m * H1, dp_b);
        gemm_bf16({.transpose_a = true, .m = M, .n = H1, .k = m, .a = b16(sv.experts.rows16, offset * M), .lda = M,
                   .b = dp_b, .ldb = H1, .accumulate = true, .c = dw1, .ldc = H1});
        if (input_grad)
          gemm_bf16({.transpose_b = true, .m = m, .n = M, .k = H1, .a = dp_b, .lda = H1,
                     .b = b16(sv.experts.w1_16, l * M * H1), .ldb = H1, .c = d_rows.data_as<float>() + offset * M,
                     .ldc = M});
      } else {
        gemm({.transpose_a = true, .m = M, .n = H1, .k = m, .a = x, .lda = M, .b = dp, .ldb = H1, .beta = 1.f,
              .c = dw1, .ldc = H1});
        if (input_grad)
          gemm({.transpose_b = true, .m = m, .n = M, .k = H1, .a = dp, .lda = H1,
                .b = params_.w1.data_as<float>() + l * M * H1, .ldb = H1, .c = d_rows.data_as<float>() + offset * M,
                .ldc = M});
      }
      offset += m;
    }

  // Gate: the weights of the choices, then the losses, down to the logits.
  const float* s = sv.routing.scores.data_as<float>();
  const float* raw = sv.logits.data_as<float>();
  const int32_t* chosen = sv.routing.experts.data_as<int32_t>();
  const float* weight = sv.routing.weights.data_as<float>();
  Tensor d_logits = Tensor::zeros({T, E}, DType::f32);
  std::vector<double> ds(static_cast<size_t>(E)), gbal(static_cast<size_t>(E));
  for (int64_t t = 0; t < T; ++t) {
    std::fill(ds.begin(), ds.end(), 0.0);
    double chosen_sum = 0.0, dot = 0.0;
    for (int j = 0; j < k; ++j) {
      const int64_t row = p.row_of_choice[static_cast<size_t>(t * k + j)];
      const double dw = row < 0 ? 0.0 : d_weight_of_row[static_cast<size_t>(row)];
      chosen_sum += s[t * E + chosen[t * k + j]];
      dot += dw * weight[t * k + j];
      ds[chosen[t * k + j]] += dw;
    }
    if (config_.router.renormalize)  // w_j = s_j / sum_chosen s
      for (int j = 0; j < k; ++j) {
        const int e = chosen[t * k + j];
        ds[e] = (ds[e] - dot) / chosen_sum;
      }
    if (balance_coef != 0.0 && T > 0) {
      // balance = E * sum_e f_e * mean_t(s_te / sum_e s_te); f_e has no gradient.
      double row_sum = 0.0, gs = 0.0;
      for (int e = 0; e < E; ++e) row_sum += s[t * E + e];
      for (int e = 0; e < E; ++e) {
        const double f = static_cast<double>(sv.routing.expert_load[e]) / static_cast<double>(T * k);
        gbal[e] = balance_coef * E * f / static_cast<double>(T);
        gs += gbal[e] * s[t * E + e] / row_sum;
      }
      for (int e = 0; e < E; ++e) ds[e] += (gbal[e] - gs) / row_sum;
    }
    float* dl = d_logits.data_as<float>() + t * E;
    if (config_.router.gate == GateKind::softmax) {
      double sds = 0.0;
      for (int e = 0; e < E; ++e) sds += s[t * E + e] * ds[e];
      for (int e = 0; e < E; ++e) dl[e] = static_cast<float>(s[t * E + e] * (ds[e] - sds));
    } else {
      for (int e = 0; e < E; ++e) dl[e] = static_cast<float>(ds[e] * s[t * E + e] * (1.0 - s[t * E + e]));
    }
    if (z_coef != 0.0) {  // z = mean_t lse_t^2 on the raw logits
      double m = -INFINITY, sum = 0.0;
      for (int e = 0; e < E; ++e) m = std::max(m, static_cast<double>(raw[t * E + e]));
      for (int e = 0; e < E; ++e) sum += std::exp(raw[t * E + e] - m);
      const double lse = m + std::log(sum);
      for (int e = 0; e < E; ++e)
        dl[e] += static_cast<float>(z_coef * 2.0 * lse * std::exp(raw[t * E + e] - lse) / static_cast<double>(T));
    }
  }
  Tensor local_gate_grad = Tensor::zeros({M, E}, DType::f32);
  gemm({.transpose_a = true, .m = M, .n = E, .k = T, .a = sv.x.data_as<float>(), .lda = M,
                          .b = d_logits.data_as<float>(), .ldb = E, .c = local_gate_grad.data_as<float>(), .ldc = E});
  group_->allreduce(local_gate_grad, local_gate_grad).wait();
  for (int64_t i = 0; i < M * E; ++i) gate_grad_.data_as<float>()[i] += local_gate_grad.data_as<float>()[i];

  if (!input_grad) return Tensor();
  // Back to the tokens' ranks, the way the outputs came.
  Tensor d_sent = scratch(Scratch::d_sent, {p.send_rows(), M});
  group_->alltoallv(d_rows, times(p.recv_rows_per_rank, M), d_sent, times(p.rows_per_rank, M)).wait();
  Tensor dx = Tensor::empty({T, M}, DType::f32);
  kernels::cpu::combine_rows(d_sent.data_as<float>(), p.row_of_choice.data(), nullptr, T, k, M, dx.data_as<float>());
  gemm({.transpose_b = true, .m = T, .n = M, .k = E, .a = d_logits.data_as<float>(), .lda = E,
                          .b = gate_weight_.data_as<float>(), .ldb = E, .beta = 1.f, .c = dx.data_as<float>(), .ldc = M});
  return dx;
}

}  // namespace switchyard
