#include "moe/moe_layer.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <cstring>
#include <numeric>

#include "comm/virtual_time.h"
#include "core/safetensors.h"
#include "moe/checkpoint.h"
#include "kernels/gemm.h"
#include "kernels/rowwise.h"

namespace switchyard {

using kernels::cpu::Activation;

void MoEConfig::validate() const {
  if (model_dim < 1) SY_THROW(InvalidArgument, "moe: model_dim = ", model_dim, ", expected >= 1");
  if (compute != DType::f32 && compute != DType::bf16)
    SY_THROW(InvalidArgument, "moe: compute = ", dtype_name(compute), ", expected f32 or bf16");
  if (hidden_dim < 1) SY_THROW(InvalidArgument, "moe: hidden_dim = ", hidden_dim, ", expected >= 1");
  if (batch_invariant && compute != DType::f32)
    SY_THROW(InvalidArgument, "moe: batch_invariant needs compute = f32, got ", dtype_name(compute));
  router.validate();
}

namespace {
// Adds the wall and virtual (emulated) time from construction to destruction
// to a phase's counters.
class PhaseTimer {
 public:
  PhaseTimer(MoEPhaseTimes& wall, MoEPhaseTimes& virt, double MoEPhaseTimes::*phase)
      : wall_(wall.*phase), virtual_(virt.*phase), start_(Clock::now()), virtual_start_(virtual_time::now()) {}
  ~PhaseTimer() {
    wall_ += std::chrono::duration<double>(Clock::now() - start_).count();
    virtual_ += virtual_time::now() - virtual_start_;
  }

 private:
  double& wall_;
  double& virtual_;
  Clock::time_point start_;
  double virtual_start_;
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

void MoELayer::charge_memory(double bytes) const {
  if (config_.device_model) virtual_time::charge(config_.device_model->memory_seconds(bytes));
}

void MoELayer::gemm_bf16(const kernels::cpu::GemmBf16Args& args) {
  if (config_.device_model)
    virtual_time::charge(config_.device_model->gemm_seconds(2.0 * args.m * args.n * args.k, true));
  if (!config_.skip_compute) kernels::cpu::gemm_bf16(args);
  if (args.m && args.n && args.k)
    ++gemms_[GemmShape{args.m, args.n, args.k, args.transpose_a, args.transpose_b, true}];
}

void MoELayer::gemm(const kernels::cpu::GemmArgs& args, bool always) {
  if (config_.device_model)
    virtual_time::charge(config_.device_model->gemm_seconds(2.0 * args.m * args.n * args.k, false));
  if (always || !config_.skip_compute) {
    if (config_.batch_invariant && !args.transpose_a && !args.transpose_b && args.alpha == 1.f)
      kernels::cpu::matmul_rows(args.a, args.m, args.k, args.lda, args.b, args.n, args.ldb, args.beta, args.c, args.ldc);
    else
      kernels::cpu::gemm_f32(args);
  }
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

int64_t DispatchPlan::recv_rows() const {
  return std::accumulate(recv_block_rows.begin(), recv_block_rows.end(), int64_t{0});
}

namespace {
std::vector<int64_t> chunk_counts(const std::vector<int64_t>& blocks, int chunk, int ranks, int slots) {
  std::vector<int64_t> out(static_cast<size_t>(ranks), 0);
  for (int u = 0; u < ranks; ++u)
    for (int l = 0; l < slots; ++l) out[u] += blocks[static_cast<size_t>((chunk * ranks + u) * slots + l)];
  return out;
}
int64_t chunk_offset(const std::vector<int64_t>& blocks, int chunk, int ranks, int slots) {
  return std::accumulate(blocks.begin(), blocks.begin() + static_cast<ptrdiff_t>(chunk) * ranks * slots, int64_t{0});
}

// Hidden piece `piece` of `pieces` of a row block of a weight whose columns are
// the hidden units (w1, b1): `hidden` units, or gate|up halves of `hidden`
// each for gated activations. to_part: full -> part, else part -> full.
void copy_hidden_piece(bool gated, int64_t rows, int64_t hidden, int piece, int pieces, float* full, float* part,
                       bool to_part) {
  const int64_t hp = hidden / pieces;
  const int halves = gated ? 2 : 1;
  const int64_t full_width = halves * hidden, part_width = halves * hp;
  for (int64_t i = 0; i < rows; ++i)
    for (int h = 0; h < halves; ++h) {
      float* f = full + i * full_width + h * hidden + piece * hp;
      float* q = part + i * part_width + h * hp;
      if (to_part)
        std::memcpy(q, f, static_cast<size_t>(hp) * sizeof(float));
      else
        std::memcpy(f, q, static_cast<size_t>(hp) * sizeof(float));
    }
}

// Works posted on buffers the layer owns: waited for before those buffers can
// be reused or freed, also when an exception unwinds the phase that posted them.
class PendingWorks {
 public:
  PendingWorks() = default;
  PendingWorks(const PendingWorks&) = delete;
  PendingWorks& operator=(const PendingWorks&) = delete;
  ~PendingWorks() {
    for (auto& w : works_) try {
        w.wait();
      } catch (...) {  // the error was or will be reported by whoever waited first
      }
  }
  void push_back(Work w) { works_.push_back(std::move(w)); }
  Work& operator[](size_t i) { return works_[i]; }
  void wait_all() {
    for (auto& w : works_) w.wait();
  }

 private:
  std::vector<Work> works_;
};

Work completed_work(const char* op) {
  auto state = std::make_shared<WorkState>(WorkLabel{op, "local", 0, 1, "none"});
  state->complete();
  return Work(state);
}

void add_into(Tensor& acc, const TensorView& delta) {
  float* a = acc.data_as<float>();
  const float* d = static_cast<const float*>(delta.data());
  const int64_t n = acc.numel();
#pragma omp parallel for schedule(static) if (n >= (1 << 16))
  for (int64_t i = 0; i < n; ++i) a[i] += d[i];
}
}  // namespace

std::vector<int64_t> DispatchPlan::send_counts(int chunk) const {
  return chunk_counts(send_block_rows, chunk, exchange_ranks, slots);
}
std::vector<int64_t> DispatchPlan::recv_counts(int chunk) const {
  return chunk_counts(recv_block_rows, chunk, exchange_ranks, slots);
}
int64_t DispatchPlan::send_offset(int chunk) const { return chunk_offset(send_block_rows, chunk, exchange_ranks, slots); }
int64_t DispatchPlan::recv_offset(int chunk) const { return chunk_offset(recv_block_rows, chunk, exchange_ranks, slots); }

MoELayer::MoELayer(MoEConfig config, std::shared_ptr<Communicator> expert_group)
    : config_(std::move(config)),
      router_(config_.router),
      group_(std::move(expert_group)),
      layout_(config_.router.experts, group_->size()),
      local_hidden_(layout_.local_hidden(config_.hidden_dim)) {
  config_.validate();
  const int64_t M = config_.model_dim, L = layout_.local_experts();
  const int64_t H1s = hidden_in() / layout_.shards();
  gate_weight_ = Tensor::zeros({M, config_.router.experts}, DType::f32);
  gate_bias_ = Tensor::zeros({config_.router.experts}, DType::f32);
  params_.w1 = fresh({L, M, H1s});
  params_.b1 = fresh({L, H1s});
  params_.w2 = fresh({L, local_hidden_, M});
  params_.b2 = fresh({L, M});
  zero_grad();
  // Every group any plan needs, once: the S ranks of my expert, and for each r
  // the S/r consecutive ranks whose slices form one 1/r piece.
  const int S = layout_.shards(), me = group_->rank(), W = group_->size();
  if (S > 1) {
    std::vector<int> members;
    for (int s = 0; s < S; ++s) members.push_back(me / S * S + s);
    shard_group_ = group_->create_group(members, group_->name() + "/expert-shards");
    for (int r : valid_sharding_degrees(S)) {
      if (r == 0 || S / r == 1) continue;
      if (S / r == S) {
        gather_groups_[r] = shard_group_;
        continue;
      }
      const int R = S / r, first = me / R * R;
      std::vector<int> piece;
      for (int i = 0; i < R; ++i) piece.push_back(first + i);
      gather_groups_[r] = group_->create_group(piece, group_->name() + "/r" + std::to_string(r));
    }
  }
  if (config_.node_size > 1 && config_.node_size < W) {
    if (W % config_.node_size != 0)
      SY_THROW(InvalidArgument, "moe: node_size = ", config_.node_size, " does not divide the ", W,
               " ranks of the expert group; expected a divisor (ranks per node)");
    hierarchical_ = std::make_unique<algorithms::HierarchicalAlltoall>(*group_, config_.node_size);
    if (config_.device_model) hierarchical_->set_copy_bandwidth(config_.device_model->memory_bandwidth);
    hierarchical_->set_skip_copies(config_.skip_compute);
  }
  check_plan(config_.plan);
}

void MoELayer::check_plan(const ExecPlan& plan) const {
  const auto valid = valid_sharding_degrees(layout_.shards());
  if (std::find(valid.begin(), valid.end(), plan.r) == valid.end()) {
    std::string list;
    for (int r : valid) list += (list.empty() ? "" : ", ") + std::to_string(r);
    SY_THROW(InvalidArgument, "moe plan: r = ", plan.r, " is not a valid sharding degree for ", layout_.shards(),
             " ranks per expert (", config_.router.experts, " experts on ", group_->size(), " ranks); expected one of ",
             list);
  }
  if (plan.d < 1 || plan.d > 64)
    SY_THROW(InvalidArgument, "moe plan: d (pipelining degree) = ", plan.d, ", expected 1..64");
  if (plan.a2a == A2AAlgorithm::hierarchical && !hierarchical_ && group_->size() > 1)
    SY_THROW(InvalidArgument, "moe plan: a2a = 2dh needs nodes: node_size = ", config_.node_size,
             " on ", group_->size(), " ranks; expected a divisor of the ranks between 2 and ", group_->size() - 1);
}

MoELayer::PlanShape MoELayer::shape_of(int r) const {
  const int S = layout_.shards(), W = group_->size();
  const int64_t H = config_.hidden_dim;
  if (r == 0) return {1, config_.router.experts, S, 0, 1, 1, H, W > 1 ? group_.get() : nullptr};
  if (S == 1) return {W, layout_.local_experts(), 1, 0, 1, 1, H, nullptr};
  const int R = S / r;
  auto it = gather_groups_.find(r);
  return {W, 1, R, layout_.shard_of_rank(group_->rank()) / R, r, R, H / r,
          it == gather_groups_.end() ? nullptr : it->second.get()};
}

void MoELayer::sgd_step(double lr) {
  const std::pair<Tensor*, Tensor*> pairs[] = {{&gate_weight_, &gate_grad_}, {&params_.w1, &grads_.w1},
                                               {&params_.b1, &grads_.b1},     {&params_.w2, &grads_.w2},
                                               {&params_.b2, &grads_.b2}};
  const auto rate = static_cast<float>(lr);
  for (auto [param, grad] : pairs) {
    charge_memory(3.0 * static_cast<double>(param->nbytes()));
    if (config_.skip_compute && param != &gate_weight_) continue;
    float* p = param->data_as<float>();
    const float* g = grad->data_as<float>();
    const int64_t n = param->numel();
#pragma omp parallel for schedule(static) if (n >= (1 << 15))
    for (int64_t i = 0; i < n; ++i) p[i] -= rate * g[i];
  }
}

Tensor MoELayer::fresh(Shape shape) const {
  // Timing only: expert tensors are allocated, never touched, so clusters far
  // larger than this machine's memory can be emulated.
  return config_.skip_compute ? Tensor::empty(std::move(shape), DType::f32) : Tensor::zeros(std::move(shape), DType::f32);
}

void MoELayer::zero_grad() {
  gate_grad_ = Tensor::zeros(gate_weight_.shape(), DType::f32);
  grads_.w1 = fresh(params_.w1.shape());
  grads_.b1 = fresh(params_.b1.shape());
  grads_.w2 = fresh(params_.w2.shape());
  grads_.b2 = fresh(params_.b2.shape());
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
  const bool gated = config_.activation == Activation::swiglu;
  const int S = layout_.shards(), shard = layout_.shard_of_rank(group_->rank());
  const int64_t Hs = local_hidden_, H1s = H1 / S;
  noise_ = Rng(seed * 7919u + static_cast<uint64_t>(group_->rank()) + 17);
  Rng gate_rng(seed);
  gate_rng.fill_uniform(gate_weight_, -1.0 / std::sqrt(M), 1.0 / std::sqrt(M));
  const int me = group_->rank();
  if (config_.skip_compute) return;  // timing only: expert weights stay untouched
  // The whole logical expert is drawn, then this rank's slice kept, so every
  // layout holds the same weights.
  Tensor w1 = Tensor::empty({M, H1}, DType::f32), b1 = Tensor::empty({H1}, DType::f32);
  Tensor w2 = Tensor::empty({H, M}, DType::f32), b2 = Tensor::empty({M}, DType::f32);
  for (int slot = 0; slot < layout_.local_experts(); ++slot) {
    Rng rng(seed * 1000003u + static_cast<uint64_t>(layout_.expert_at(me, slot)) + 1);
    rng.fill_uniform(w1, -1.0 / std::sqrt(M), 1.0 / std::sqrt(M));
    rng.fill_uniform(b1, -1.0 / std::sqrt(M), 1.0 / std::sqrt(M));
    rng.fill_uniform(w2, -1.0 / std::sqrt(H), 1.0 / std::sqrt(H));
    rng.fill_uniform(b2, -1.0 / std::sqrt(H), 1.0 / std::sqrt(H));
    copy_hidden_piece(gated, M, H, shard, S, w1.data_as<float>(), params_.w1.data_as<float>() + slot * M * H1s, true);
    copy_hidden_piece(gated, 1, H, shard, S, b1.data_as<float>(), params_.b1.data_as<float>() + slot * H1s, true);
    std::memcpy(params_.w2.data_as<float>() + slot * Hs * M, w2.data_as<float>() + shard * Hs * M,
                static_cast<size_t>(Hs * M) * sizeof(float));
    std::memcpy(params_.b2.data_as<float>() + slot * M, b2.data(), b2.nbytes());
  }
}

Routing MoELayer::route_tokens(const TensorView& x, Tensor& logits) {
  PhaseTimer timer(times_, virtual_times_, &MoEPhaseTimes::gate);
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
        .b = gate_weight_.data_as<float>(), .ldb = E, .c = logits.data_as<float>(), .ldc = E},
       true);  // routing needs real logits even when timing only
  const TensorView bias = gate_bias_.view();
  return route(router_, logits, router_.gate == GateKind::sigmoid_bias ? &bias : nullptr,
               router_.noise_std > 0 ? &noise_ : nullptr);
}

DispatchPlan MoELayer::plan(const Routing& routing, int64_t tokens) { return plan(routing, tokens, config_.plan); }

DispatchPlan MoELayer::plan(const Routing& routing, int64_t tokens, const ExecPlan& exec, int64_t capacity) {
  PhaseTimer timer(times_, virtual_times_, &MoEPhaseTimes::gate);
  check_plan(exec);
  const int k = static_cast<int>(routing.experts.shape().size() == 2 ? routing.experts.shape()[1] : router_.k);
  const int E = config_.router.experts, S = layout_.shards(), d = exec.d;
  const PlanShape shape = shape_of(exec.r);
  const bool padded = exec.exchange == ExchangeMode::padded;
  DispatchPlan p;
  p.exec = exec;
  p.tokens = tokens;
  p.k = k;
  p.copies = shape.copies;
  p.exchange_ranks = shape.exchange_ranks;
  p.slots = shape.slots;
  // Uncapped dropless (capacity factor 0) drops nothing whatever the capacity
  // and sizes the exchange by counts, so it needs no all-reduce to agree one
  // (a collective per layer saved: decode steps are latency-bound).
  const bool agree = !(exec.exchange == ExchangeMode::dropless && router_.capacity_factor == 0);
  p.capacity = capacity >= 0 ? capacity : expert_capacity(router_, tokens, routing, agree ? group_.get() : nullptr);
  const int32_t* chosen = routing.experts.data_as<int32_t>();
  const float* weight = routing.weights.data_as<float>();
  // Slots are handed out choice by choice (all first choices, then all second
  // ...), as GShard and Tutel do, so a token's best expert wins a slot first.
  std::vector<std::vector<int64_t>> choice_at(static_cast<size_t>(E));  // per position, in slot order
  std::vector<int64_t> order(static_cast<size_t>(tokens));
  std::iota(order.begin(), order.end(), int64_t{0});
  if (router_.batch_prioritized)
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return weight[a * k] > weight[b * k]; });
  for (int j = 0; j < k; ++j)
    for (const int64_t t : order) {
      auto& at = choice_at[static_cast<size_t>(layout_.position(chosen[t * k + j]))];
      if (static_cast<int64_t>(at.size()) < p.capacity)
        at.push_back(t * k + j);
      else
        ++p.dropped;
    }
  p.rows_per_position.resize(static_cast<size_t>(E));
  for (int pos = 0; pos < E; ++pos) p.rows_per_position[pos] = static_cast<int64_t>(choice_at[pos].size());

  // The slot range of a position each destination block takes, and which copy it is.
  struct Block {
    int position;
    int64_t lo, hi;
    int copy;
  };
  auto block = [&](int u, int l) -> Block {
    if (exec.r == 0 || S == 1) {
      const int pos = exec.r == 0 ? l : u * shape.slots + l;
      return {pos, 0, padded ? p.capacity : p.rows_per_position[pos], 0};
    }
    const int pos = u / S, s = u % S, R = shape.replicas, q = s % R;
    const int64_t n = p.rows_per_position[pos];
    if (padded) {
      const int64_t per = (p.capacity + R - 1) / R;
      return {pos, q * per, (q + 1) * per, s / R};
    }
    return {pos, q * n / R, (q + 1) * n / R, s / R};
  };
  auto chunk_range = [&](const Block& b, int i) {
    const int64_t width = b.hi - b.lo;
    return std::pair<int64_t, int64_t>{b.lo + i * width / d, b.lo + (i + 1) * width / d};
  };
  const int X = shape.exchange_ranks, Lw = shape.slots;
  p.send_block_rows.assign(static_cast<size_t>(d * X * Lw), 0);
  p.row_of_choice.assign(static_cast<size_t>(tokens * k * p.copies), -1);
  int64_t row = 0;
  for (int i = 0; i < d; ++i)
    for (int u = 0; u < X; ++u)
      for (int l = 0; l < Lw; ++l) {
        const Block b = block(u, l);
        const auto [lo, hi] = chunk_range(b, i);
        p.send_block_rows[static_cast<size_t>((i * X + u) * Lw + l)] = hi - lo;
        const auto& at = choice_at[static_cast<size_t>(b.position)];
        for (int64_t slot = lo; slot < hi; ++slot, ++row) {
          if (slot >= static_cast<int64_t>(at.size())) {  // padding
            p.token_of_row.push_back(-1);
            p.weight_of_row.push_back(0.f);
            continue;
          }
          const int64_t c = at[static_cast<size_t>(slot)];
          p.token_of_row.push_back(c / k);
          p.weight_of_row.push_back(weight[c]);
          p.row_of_choice[static_cast<size_t>(c * p.copies + b.copy)] = row;
        }
      }
  if (X == 1) {
    p.recv_block_rows = p.send_block_rows;
  } else if (padded) {  // every source sends my blocks the same padded sizes
    p.recv_block_rows.resize(p.send_block_rows.size());
    for (int i = 0; i < d; ++i)
      for (int l = 0; l < Lw; ++l) {
        const auto [lo, hi] = chunk_range(block(group_->rank(), l), i);
        for (int u = 0; u < X; ++u) p.recv_block_rows[static_cast<size_t>((i * X + u) * Lw + l)] = hi - lo;
      }
  }
  return p;
}

void MoELayer::exchange_layout(DispatchPlan& p) {
  if (p.exec.exchange == ExchangeMode::padded || p.exchange_ranks == 1) return;
  PhaseTimer timer(times_, virtual_times_, &MoEPhaseTimes::dispatch_a2a);
  const int X = p.exchange_ranks, Lw = p.slots, d = p.exec.d;
  const int64_t per_peer = static_cast<int64_t>(d) * Lw;
  Tensor send = Tensor::empty({X * per_peer}, DType::i64), recv = Tensor::empty({X * per_peer}, DType::i64);
  for (int u = 0; u < X; ++u)
    for (int i = 0; i < d; ++i)
      for (int l = 0; l < Lw; ++l)
        send.data_as<int64_t>()[u * per_peer + i * Lw + l] = p.send_block_rows[static_cast<size_t>((i * X + u) * Lw + l)];
  group_->alltoall(send, recv).wait();
  p.recv_block_rows.resize(p.send_block_rows.size());
  for (int u = 0; u < X; ++u)
    for (int i = 0; i < d; ++i)
      for (int l = 0; l < Lw; ++l)
        p.recv_block_rows[static_cast<size_t>((i * X + u) * Lw + l)] = recv.data_as<int64_t>()[u * per_peer + i * Lw + l];
}

namespace {
std::vector<int64_t> times(std::vector<int64_t> rows, int64_t width) {
  for (auto& v : rows) v *= width;
  return rows;
}
}  // namespace

Work MoELayer::exchange(const DispatchPlan& p, int chunk, const TensorView& in, const TensorView& out,
                        bool to_experts) {
  const int64_t M = config_.model_dim;
  auto send = times(to_experts ? p.send_counts(chunk) : p.recv_counts(chunk), M);
  auto recv = times(to_experts ? p.recv_counts(chunk) : p.send_counts(chunk), M);
  const int64_t in_off = (to_experts ? p.send_offset(chunk) : p.recv_offset(chunk)) * M;
  const int64_t out_off = (to_experts ? p.recv_offset(chunk) : p.send_offset(chunk)) * M;
  const int64_t in_n = std::accumulate(send.begin(), send.end(), int64_t{0});
  const int64_t out_n = std::accumulate(recv.begin(), recv.end(), int64_t{0});
  TensorView a(static_cast<float*>(in.data()) + in_off, DType::f32, {in_n});
  TensorView b(static_cast<float*>(out.data()) + out_off, DType::f32, {out_n});
  if (p.exec.a2a == A2AAlgorithm::hierarchical && hierarchical_) {
    if (p.exec.exchange == ExchangeMode::padded) return hierarchical_->alltoall(a, b);  // equal blocks
    return hierarchical_->alltoallv(a, std::move(send), b, std::move(recv));
  }
  return group_->alltoallv(a, std::move(send), b, std::move(recv));
}

Work MoELayer::exchange_all(const DispatchPlan& p, const TensorView& in, const TensorView& out, bool to_experts) {
  Work last;  // the executor is FIFO: the last chunk done means all are
  for (int i = 0; i < p.exec.d; ++i) last = exchange(p, i, in, out, to_experts);
  return last;
}

Tensor MoELayer::encode(const DispatchPlan& p, const TensorView& x) {
  const int64_t M = config_.model_dim;
  Tensor send = scratch(Scratch::send, {p.send_rows(), M});
  PhaseTimer timer(times_, virtual_times_, &MoEPhaseTimes::encode);
  if (!config_.skip_compute)  // timing only: the rows are not moved either
    kernels::cpu::gather_rows(static_cast<const float*>(x.data()), p.token_of_row.data(), p.send_rows(), M,
                              send.data_as<float>());
  charge_memory(2.0 * p.send_rows() * M * sizeof(float));
  return send;
}

MoELayer::Exchange MoELayer::dispatch_async(const DispatchPlan& p, const TensorView& x) {
  const int64_t M = config_.model_dim;
  Tensor send = encode(p, x);
  if (p.exchange_ranks == 1) return {send, completed_work("dispatch")};
  Tensor recv = scratch(Scratch::recv, {p.recv_rows(), M});
  return {recv, exchange_all(p, send, recv, true)};
}

Tensor MoELayer::dispatch(const DispatchPlan& p, const TensorView& x) {
  Exchange e = dispatch_async(p, x);
  PhaseTimer timer(times_, virtual_times_, &MoEPhaseTimes::dispatch_a2a);
  e.done.wait();
  return e.rows;
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
  Tensor raw_w1 = P > 1 ? scratch(Scratch::gathered, {G * L, M, H1s}) : scratch(Scratch::gw1, {Lw, M, H1w});
  Tensor raw_b1 = Tensor::empty({G * L, H1s}, DType::f32);
  w.p.w2 = scratch(Scratch::gw2, {Lw, Hw, M});
  Tensor raw_b2 = Tensor::empty({G * L, M}, DType::f32);
  Work works[] = {g.allgather(params_.w1, raw_w1), g.allgather(params_.b1, raw_b1), g.allgather(params_.w2, w.p.w2),
                  g.allgather(params_.b2, raw_b2)};
  for (auto& work : works) work.wait();
  w.p.b2 = Tensor::empty({Lw, M}, DType::f32);
  for (int i = 0; i < Lw; ++i)
    std::memcpy(w.p.b2.data_as<float>() + i * M, raw_b2.data_as<float>() + static_cast<int64_t>(i) * P * M,
                static_cast<size_t>(M) * sizeof(float));
  if (P == 1) {
    w.p.w1 = raw_w1;
    w.p.b1 = raw_b1;
    return;
  }
  w.p.w1 = scratch(Scratch::gw1, {Lw, M, H1w});
  w.p.b1 = Tensor::empty({Lw, H1w}, DType::f32);
  charge_memory(2.0 * static_cast<double>(w.p.w1.nbytes()));
  if (config_.skip_compute) return;  // timing only: leave the gathered pages untouched
  for (int i = 0; i < Lw; ++i)
    for (int piece = 0; piece < P; ++piece) {
      const int64_t b = static_cast<int64_t>(i) * P + piece;
      copy_hidden_piece(gated, M, Hw, piece, P, w.p.w1.data_as<float>() + i * M * H1w,
                        raw_w1.data_as<float>() + b * M * H1s, false);
      copy_hidden_piece(gated, 1, Hw, piece, P, w.p.b1.data_as<float>() + i * H1w, raw_b1.data_as<float>() + b * H1s,
                        false);
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
      raw_w1 = scratch(Scratch::grad_blocks, {G * L, M, H1s});
      raw_b1 = Tensor::empty({G * L, H1s}, DType::f32);
      raw_b2 = Tensor::zeros({G * L, M}, DType::f32);  // one piece of each expert carries the bias gradient
      for (int i = 0; i < Lw && !config_.skip_compute; ++i) {
        std::memcpy(raw_b2.data_as<float>() + static_cast<int64_t>(i) * P * M, wg.b2.data_as<float>() + i * M,
                    static_cast<size_t>(M) * sizeof(float));
        for (int piece = 0; piece < P; ++piece) {
          const int64_t b = static_cast<int64_t>(i) * P + piece;
          copy_hidden_piece(gated, M, Hw, piece, P, wg.w1.data_as<float>() + i * M * H1w,
                            raw_w1.data_as<float>() + b * M * H1s, true);
          copy_hidden_piece(gated, 1, Hw, piece, P, wg.b1.data_as<float>() + i * H1w,
                            raw_b1.data_as<float>() + b * H1s, true);
        }
      }
    }
    Tensor mine_w1 = scratch(Scratch::grad_mine, params_.w1.shape());
    Tensor mine_b1 = Tensor::empty(params_.b1.shape(), DType::f32);
    Tensor mine_w2 = Tensor::empty(params_.w2.shape(), DType::f32);
    b2_delta = Tensor::empty(params_.b2.shape(), DType::f32);
    Work works[] = {g.reduce_scatter(raw_w1, mine_w1), g.reduce_scatter(raw_b1, mine_b1),
                    g.reduce_scatter(wg.w2, mine_w2), g.reduce_scatter(raw_b2, b2_delta)};
    for (auto& work : works) work.wait();
    charge_memory(4.0 * static_cast<double>(raw_w1.nbytes() + wg.w2.nbytes()));  // re-layout, sums
    if (!config_.skip_compute) {
      add_into(grads_.w1, mine_w1);
      add_into(grads_.b1, mine_b1);
      add_into(grads_.w2, mine_w2);
    }
  }
  // fc2's bias is replicated on the S ranks of an expert: each gets the sum.
  if (S > 1) shard_group_->allreduce(b2_delta, b2_delta).wait();
  if (S > 1 || gathered) add_into(grads_.b2, b2_delta);
}

ExpertActivations MoELayer::allocate_activations(const DispatchPlan& p) {
  const int64_t M = config_.model_dim, R = p.recv_rows();
  const PlanShape shape = shape_of(p.exec.r);
  const int64_t Hw = shape.hidden, H1w = config_.activation == Activation::swiglu ? 2 * Hw : Hw;
  ExpertActivations a;
  a.pre = scratch(Scratch::pre, {R, H1w});
  a.act = scratch(Scratch::act, {R, Hw});
  a.out = scratch(Scratch::expert_out, {R, M});
  if (config_.compute == DType::bf16) {
    const Working& w = saved_.weights;
    a.rows16 = scratch(Scratch::recv_bf16, {R, M}, DType::bf16);
    a.act16 = scratch(Scratch::act_bf16, {R, Hw}, DType::bf16);
    a.w1_16 = scratch(Scratch::w1_bf16, w.p.w1.shape(), DType::bf16);
    a.w2_16 = scratch(Scratch::w2_bf16, w.p.w2.shape(), DType::bf16);
    charge_memory(1.5 * static_cast<double>(w.p.w1.nbytes() + w.p.w2.nbytes()));
    if (!config_.skip_compute) {
      kernels::cpu::to_bf16(w.p.w1.data_as<float>(), w.p.w1.numel(), static_cast<uint16_t*>(a.w1_16.data()));
      kernels::cpu::to_bf16(w.p.w2.data_as<float>(), w.p.w2.numel(), static_cast<uint16_t*>(a.w2_16.data()));
    }
  }
  return a;
}

void MoELayer::run_chunk(const DispatchPlan& p, int chunk, const Working& w, const TensorView& rows,
                         ExpertActivations& a) {
  PhaseTimer timer(times_, virtual_times_, &MoEPhaseTimes::experts);
  const int64_t M = config_.model_dim;
  const int64_t Hw = w.p.w2.shape()[1], H1w = w.p.w1.shape()[2];
  const bool bf = config_.compute == DType::bf16;
  const float* x = static_cast<const float*>(rows.data());
  auto b16 = [](const Tensor& t, int64_t offset) { return static_cast<const uint16_t*>(t.data()) + offset; };
  int64_t offset = p.recv_offset(chunk);
  if (bf && !config_.skip_compute) {
    const int64_t n = p.recv_offset(chunk + 1) - offset;
    kernels::cpu::to_bf16(x + offset * M, n * M, static_cast<uint16_t*>(a.rows16.data()) + offset * M);
  }
  for (int u = 0; u < p.exchange_ranks; ++u)
    for (int l = 0; l < p.slots; ++l) {
      const int64_t m = p.recv_block(chunk, u, l);
      if (m == 0) continue;
      float* pre_b = a.pre.data_as<float>() + offset * H1w;
      float* act_b = a.act.data_as<float>() + offset * Hw;
      float* out_b = a.out.data_as<float>() + offset * M;
      // Biases first, then GEMMs accumulate on top. With r > 1 only the first
      // hidden piece adds fc2's bias: the pieces' outputs are summed.
      charge_memory(static_cast<double>(m) * (2 * H1w + Hw + M) * sizeof(float));  // biases, activation
      const bool elementwise = !config_.skip_compute;  // timing only: GEMMs charge, nothing is touched
      if (elementwise) {
        kernels::cpu::broadcast_rows(w.p.b1.data_as<float>() + l * H1w, m, H1w, pre_b);
        if (w.adds_bias)
          kernels::cpu::broadcast_rows(w.p.b2.data_as<float>() + l * M, m, M, out_b);
        else
          std::memset(out_b, 0, static_cast<size_t>(m * M) * sizeof(float));
      }
      if (bf)
        gemm_bf16({.m = m, .n = H1w, .k = M, .a = b16(a.rows16, offset * M), .lda = M, .b = b16(a.w1_16, l * M * H1w),
                   .ldb = H1w, .accumulate = true, .c = pre_b, .ldc = H1w});
      else
        gemm({.m = m, .n = H1w, .k = M, .a = x + offset * M, .lda = M, .b = w.p.w1.data_as<float>() + l * M * H1w,
              .ldb = H1w, .beta = 1.f, .c = pre_b, .ldc = H1w});
      if (elementwise) kernels::cpu::activation_forward(config_.activation, pre_b, m, Hw, act_b);
      if (bf) {
        uint16_t* a16 = static_cast<uint16_t*>(a.act16.data()) + offset * Hw;
        if (elementwise) kernels::cpu::to_bf16(act_b, m * Hw, a16);
        gemm_bf16({.m = m, .n = M, .k = Hw, .a = a16, .lda = Hw, .b = b16(a.w2_16, l * Hw * M), .ldb = M,
                   .accumulate = true, .c = out_b, .ldc = M});
      } else {
        gemm({.m = m, .n = M, .k = Hw, .a = act_b, .lda = Hw, .b = w.p.w2.data_as<float>() + l * Hw * M, .ldb = M,
              .beta = 1.f, .c = out_b, .ldc = M});
      }
      offset += m;
    }
}

ExpertActivations MoELayer::run_experts(const DispatchPlan& p, const TensorView& rows) {
  gather_weights(p, saved_.weights);
  ExpertActivations a = allocate_activations(p);
  for (int i = 0; i < p.exec.d; ++i) run_chunk(p, i, saved_.weights, rows, a);
  return a;
}

MoELayer::Exchange MoELayer::combine_exchange_async(const DispatchPlan& p, const TensorView& expert_out) {
  const int64_t M = config_.model_dim;
  if (p.exchange_ranks == 1)  // nothing moves; the caller keeps expert_out alive (an owner that owns nothing)
    return {Tensor::adopt(expert_out, std::shared_ptr<void>(std::shared_ptr<void>(), expert_out.data())),
            completed_work("combine")};
  Tensor back = scratch(Scratch::back, {p.send_rows(), M});
  return {back, exchange_all(p, expert_out, back, false)};
}

Tensor MoELayer::combine_exchange(const DispatchPlan& p, const TensorView& expert_out) {
  Exchange e = combine_exchange_async(p, expert_out);
  PhaseTimer timer(times_, virtual_times_, &MoEPhaseTimes::combine_a2a);
  e.done.wait();
  return e.rows;
}

Tensor MoELayer::combine(const DispatchPlan& p, const TensorView& returned) {
  PhaseTimer timer(times_, virtual_times_, &MoEPhaseTimes::decode);
  const int64_t M = config_.model_dim;
  const int kc = p.k * p.copies;
  Tensor out = Tensor::empty({p.tokens, M}, DType::f32);
  std::vector<float> scale(p.row_of_choice.size(), 0.f);
  for (size_t c = 0; c < scale.size(); ++c)
    if (p.row_of_choice[c] >= 0) scale[c] = p.weight_of_row[static_cast<size_t>(p.row_of_choice[c])];
  kernels::cpu::combine_rows(static_cast<const float*>(returned.data()), p.row_of_choice.data(), scale.data(),
                             p.tokens, kc, M, out.data_as<float>());
  charge_memory(static_cast<double>(p.send_rows() + p.tokens) * M * sizeof(float));
  return out;
}

namespace {
std::string expert_key(int expert, const char* name) { return "experts." + std::to_string(expert) + "." + name; }
}  // namespace

void MoELayer::save(const std::string& prefix) const {
  const int me = group_->rank(), W = group_->size(), S = layout_.shards();
  const int64_t M = config_.model_dim, H = config_.hidden_dim, H1 = hidden_in(), H1s = H1 / S, Hs = local_hidden_;
  const bool gated = config_.activation == Activation::swiglu;
  std::vector<std::pair<std::string, TensorView>> tensors;
  std::vector<Tensor> keep;
  if (me == 0) tensors.emplace_back("gate.weight", gate_weight_.view());
  auto slice = [](const Tensor& t, int slot, Shape shape) {
    const int64_t n = shape_numel(shape);
    return TensorView(const_cast<float*>(t.data_as<float>()) + slot * n, DType::f32, std::move(shape));
  };
  if (S == 1) {
    for (int slot = 0; slot < layout_.local_experts(); ++slot) {
      const int e = layout_.expert_at(me, slot);
      tensors.emplace_back(expert_key(e, "w1"), slice(params_.w1, slot, {M, H1}));
      tensors.emplace_back(expert_key(e, "b1"), slice(params_.b1, slot, {H1}));
      tensors.emplace_back(expert_key(e, "w2"), slice(params_.w2, slot, {H, M}));
      tensors.emplace_back(expert_key(e, "b2"), slice(params_.b2, slot, {M}));
    }
  } else {
    // Sliced experts are saved whole by their first shard, so the checkpoint
    // does not depend on S.
    Tensor w1 = Tensor::empty({S, M, H1s}, DType::f32), b1 = Tensor::empty({S, H1s}, DType::f32);
    Tensor w2 = Tensor::empty({S * Hs, M}, DType::f32);
    Work works[] = {shard_group_->allgather(params_.w1, w1), shard_group_->allgather(params_.b1, b1),
                    shard_group_->allgather(params_.w2, w2)};
    for (auto& work : works) work.wait();
    if (layout_.shard_of_rank(me) == 0) {
      Tensor fw1 = Tensor::empty({M, H1}, DType::f32), fb1 = Tensor::empty({H1}, DType::f32);
      for (int s = 0; s < S; ++s) {
        copy_hidden_piece(gated, M, H, s, S, fw1.data_as<float>(), w1.data_as<float>() + s * M * H1s, false);
        copy_hidden_piece(gated, 1, H, s, S, fb1.data_as<float>(), b1.data_as<float>() + s * H1s, false);
      }
      const int e = layout_.expert_at(me, 0);
      tensors.emplace_back(expert_key(e, "w1"), fw1.view());
      tensors.emplace_back(expert_key(e, "b1"), fb1.view());
      tensors.emplace_back(expert_key(e, "w2"), TensorView(w2.data(), DType::f32, {H, M}));
      tensors.emplace_back(expert_key(e, "b2"), slice(params_.b2, 0, {M}));
      keep = {fw1, fb1, w2};
    }
  }
  save_safetensors(prefix + ".rank" + std::to_string(me) + "-of-" + std::to_string(W) + ".safetensors", tensors,
                   {{"format", "switchyard-moe-v1"}, {"experts", std::to_string(config_.router.experts)}});
  group_->barrier().wait();  // every shard is on disk before anyone loads
}

void MoELayer::load(const std::string& prefix) {
  const std::vector<SafetensorsFile> shards = open_checkpoint_shards(prefix);
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
  const int S = layout_.shards(), shard = layout_.shard_of_rank(group_->rank());
  const int64_t M = config_.model_dim, H = config_.hidden_dim, H1 = hidden_in(), H1s = H1 / S, Hs = local_hidden_;
  const bool gated = config_.activation == Activation::swiglu;
  Tensor g = find("gate.weight").load("gate.weight", gate_weight_.shape(), DType::f32);
  std::memcpy(gate_weight_.data(), g.data(), g.nbytes());
  const int me = group_->rank();
  for (int slot = 0; slot < layout_.local_experts(); ++slot) {
    const int e = layout_.expert_at(me, slot);
    auto load = [&](const char* name, const Shape& shape) {
      const std::string key = expert_key(e, name);
      return find(key).load(key, shape, DType::f32);
    };
    Tensor w1 = load("w1", {M, H1}), b1 = load("b1", {H1}), w2 = load("w2", {H, M}), b2 = load("b2", {M});
    copy_hidden_piece(gated, M, H, shard, S, w1.data_as<float>(), params_.w1.data_as<float>() + slot * M * H1s, true);
    copy_hidden_piece(gated, 1, H, shard, S, b1.data_as<float>(), params_.b1.data_as<float>() + slot * H1s, true);
    std::memcpy(params_.w2.data_as<float>() + slot * Hs * M, w2.data_as<float>() + shard * Hs * M,
                static_cast<size_t>(Hs * M) * sizeof(float));
    std::memcpy(params_.b2.data_as<float>() + slot * M, b2.data(), b2.nbytes());
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

MoELayer::CommBusy MoELayer::comm_busy() const {
  const bool virt = config_.device_model != nullptr;
  auto sum = [&](const Communicator& c, std::initializer_list<const char*> ops) {
    const CommStats st = c.stats();
    double t = 0;
    for (const char* op : ops) {
      auto it = st.ops.find(op);
      if (it != st.ops.end()) t += virt ? it->second.virtual_seconds : it->second.seconds;
    }
    return t;
  };
  CommBusy b;
  b.exchange = sum(*group_, {"alltoall", "alltoallv"});
  if (hierarchical_)
    b.exchange += sum(*hierarchical_->intra(), {"alltoall", "alltoallv"}) +
                  sum(*hierarchical_->inter(), {"alltoall", "alltoallv"});
  b.weights = sum(*group_, {"allgather", "allgatherv", "reduce_scatter"});
  std::vector<const Communicator*> seen;
  for (const auto& [r, g] : gather_groups_)
    if (std::find(seen.begin(), seen.end(), g.get()) == seen.end()) {
      seen.push_back(g.get());
      b.weights += sum(*g, {"allgather", "allgatherv", "reduce_scatter"});
    }
  return b;
}

void MoELayer::verify_plan_agreement(const ExecPlan& plan) {
  if (!config_.check_plan || group_->size() == 1) return;
  const auto h = static_cast<int64_t>(plan.hash() >> 1);
  Tensor v = Tensor::empty({2}, DType::i64);
  v.data_as<int64_t>()[0] = h;
  v.data_as<int64_t>()[1] = -h;
  group_->allreduce(v, v, {.op = ReduceOp::max}).wait();
  if (v.data_as<int64_t>()[0] != h || v.data_as<int64_t>()[1] != -h)
    SY_THROW(InvalidArgument, "moe: ranks of '", group_->name(), "' run different plans; rank ", group_->rank(),
             " has (", plan.describe(), "). The plan must be a function of inputs agreed across the group");
}

MoEForward MoELayer::forward(const TensorView& x) { return forward(x, routing_choice(), config_.plan); }

MoEForward MoELayer::forward(const TensorView& x, const RoutingChoice& routing, const ExecPlan& exec) {
  return forward_impl(x, routing, &exec, nullptr);
}

MoEForward MoELayer::forward(const TensorView& x, const RoutingChoice& routing, PlanChooser& chooser) {
  return forward_impl(x, routing, nullptr, &chooser);
}

MoEForward MoELayer::forward_impl(const TensorView& x, const RoutingChoice& routing, const ExecPlan* fixed,
                                  PlanChooser* chooser) {
  if (fixed) check_plan(*fixed);
  if (routing.k < 1 || routing.k > config_.router.experts)
    SY_THROW(InvalidArgument, "moe: routing k = ", routing.k, ", expected 1..", config_.router.experts);
  router_ = config_.router;
  router_.k = routing.k;
  router_.capacity_factor = routing.capacity_factor;
  router_.validate();
  Saved& sv = saved_;
  sv.valid = false;
  sv.routing = route_tokens(x, sv.logits);
  ExecPlan exec;
  if (fixed) {
    exec = *fixed;
    sv.plan = plan(sv.routing, x.size(0), exec);
  } else {
    // One max-all-reduce agrees the capacity and the chooser's inputs.
    std::vector<double> values = chooser->local_inputs(*this, x.size(0));
    values.insert(values.begin(), static_cast<double>(expert_capacity(router_, x.size(0), sv.routing, nullptr)));
    if (group_->size() > 1) {
      PhaseTimer timer(times_, virtual_times_, &MoEPhaseTimes::gate);
      group_->allreduce(TensorView(values.data(), DType::f64, {static_cast<int64_t>(values.size())}),
                        TensorView(values.data(), DType::f64, {static_cast<int64_t>(values.size())}),
                        {.op = ReduceOp::max}).wait();
    }
    const auto capacity = static_cast<int64_t>(values.front());
    values.erase(values.begin());
    exec = chooser->choose(*this, values, capacity);
    sv.plan = plan(sv.routing, x.size(0), exec, capacity);
  }
  verify_plan_agreement(exec);
  DispatchPlan& p = sv.plan;
  exchange_layout(p);
  // Chunk i's all-to-all runs on the executor while chunk i-1's experts compute;
  // the working weights are gathered meanwhile on the sharding group.
  const int64_t M = config_.model_dim;
  Tensor send = encode(p, x);
  const bool moves = p.exchange_ranks > 1;
  const int d = exec.d;
  PendingWorks to_experts, back;
  sv.rows = moves ? scratch(Scratch::recv, {p.recv_rows(), M}) : send;
  if (moves)
    for (int i = 0; i < d; ++i) to_experts.push_back(exchange(p, i, send, sv.rows, true));
  gather_weights(p, sv.weights);
  sv.experts = allocate_activations(p);
  sv.returned = moves ? scratch(Scratch::back, {p.send_rows(), M}) : sv.experts.out;
  for (int i = 0; i < d; ++i) {
    if (moves) {
      PhaseTimer timer(times_, virtual_times_, &MoEPhaseTimes::dispatch_a2a);
      to_experts[static_cast<size_t>(i)].wait();
    }
    run_chunk(p, i, sv.weights, sv.rows, sv.experts);
    if (moves) back.push_back(exchange(p, i, sv.experts.out, sv.returned, false));
  }
  {
    PhaseTimer timer(times_, virtual_times_, &MoEPhaseTimes::combine_a2a);
    back.wait_all();
  }
  // Timing only: expert outputs were neither computed nor moved; zeros keep
  // the gate's gradient (and so routing) finite.
  if (config_.skip_compute) std::memset(sv.returned.data(), 0, static_cast<size_t>(p.send_rows() * M) * sizeof(float));
  sv.x = scratch(Scratch::input, x.shape());
  if (x.nbytes()) std::memcpy(sv.x.data(), x.data(), x.nbytes());
  sv.valid = true;
  MoEForward f;
  f.output = combine(p, sv.returned);
  f.balance_loss = sv.routing.balance_loss;
  f.z_loss = sv.routing.z_loss;
  f.dropped = p.dropped;
  return f;
}

void MoELayer::backward_chunk(const DispatchPlan& p, int chunk, const Working& w, const Tensor& d_out,
                              bool input_grad, ExpertParams& grads, Tensor& d_rows, Tensor& dy16, Tensor& dp16) {
  const Saved& sv = saved_;
  const int64_t M = config_.model_dim;
  const int64_t Hw = w.p.w2.shape()[1], H1w = w.p.w1.shape()[2];
  const bool bf = config_.compute == DType::bf16;
  auto b16 = [](const Tensor& t, int64_t offset) { return static_cast<const uint16_t*>(t.data()) + offset; };
  int64_t offset = p.recv_offset(chunk);
  if (bf && !config_.skip_compute) {
    const int64_t n = p.recv_offset(chunk + 1) - offset;
    kernels::cpu::to_bf16(d_out.data_as<float>() + offset * M, n * M, static_cast<uint16_t*>(dy16.data()) + offset * M);
  }
  Tensor d_act = scratch(Scratch::d_act, {p.recv_rows(), Hw}), d_pre = scratch(Scratch::d_pre, {p.recv_rows(), H1w});
  for (int u = 0; u < p.exchange_ranks; ++u)
    for (int l = 0; l < p.slots; ++l) {
      const int64_t m = p.recv_block(chunk, u, l);
      if (m == 0) continue;
      const float* dy = d_out.data_as<float>() + offset * M;
      const float* act = sv.experts.act.data_as<float>() + offset * Hw;
      const float* pre = sv.experts.pre.data_as<float>() + offset * H1w;
      const float* x = sv.rows.data_as<float>() + offset * M;
      float* da = d_act.data_as<float>() + offset * Hw;
      float* dp = d_pre.data_as<float>() + offset * H1w;
      float* dw1 = grads.w1.data_as<float>() + l * M * H1w;
      float* dw2 = grads.w2.data_as<float>() + l * Hw * M;
      const bool elementwise = !config_.skip_compute;  // timing only: GEMMs charge, nothing is touched
      if (w.adds_bias && elementwise) kernels::cpu::add_column_sums(dy, m, M, grads.b2.data_as<float>() + l * M);
      if (bf) {
        const uint16_t* dy_b = static_cast<const uint16_t*>(dy16.data()) + offset * M;
        gemm_bf16({.transpose_a = true, .m = Hw, .n = M, .k = m, .a = b16(sv.experts.act16, offset * Hw), .lda = Hw,
                   .b = dy_b, .ldb = M, .accumulate = true, .c = dw2, .ldc = M});
        gemm_bf16({.transpose_b = true, .m = m, .n = Hw, .k = M, .a = dy_b, .lda = M,
                   .b = b16(sv.experts.w2_16, l * Hw * M), .ldb = M, .c = da, .ldc = Hw});
      } else {
        gemm({.transpose_a = true, .m = Hw, .n = M, .k = m, .a = act, .lda = Hw, .b = dy, .ldb = M, .beta = 1.f,
              .c = dw2, .ldc = M});
        gemm({.transpose_b = true, .m = m, .n = Hw, .k = M, .a = dy, .lda = M,
              .b = w.p.w2.data_as<float>() + l * Hw * M, .ldb = M, .c = da, .ldc = Hw});
      }
      charge_memory(static_cast<double>(m) * (3 * H1w + Hw + M) * sizeof(float));  // activation, bias sums
      if (elementwise) {
        kernels::cpu::activation_backward(config_.activation, pre, da, m, Hw, dp);
        kernels::cpu::add_column_sums(dp, m, H1w, grads.b1.data_as<float>() + l * H1w);
      }
      if (bf) {
        uint16_t* dp_b = static_cast<uint16_t*>(dp16.data()) + offset * H1w;
        if (elementwise) kernels::cpu::to_bf16(dp, m * H1w, dp_b);
        gemm_bf16({.transpose_a = true, .m = M, .n = H1w, .k = m, .a = b16(sv.experts.rows16, offset * M), .lda = M,
                   .b = dp_b, .ldb = H1w, .accumulate = true, .c = dw1, .ldc = H1w});
        if (input_grad)
          gemm_bf16({.transpose_b = true, .m = m, .n = M, .k = H1w, .a = dp_b, .lda = H1w,
                     .b = b16(sv.experts.w1_16, l * M * H1w), .ldb = H1w, .c = d_rows.data_as<float>() + offset * M,
                     .ldc = M});
      } else {
        gemm({.transpose_a = true, .m = M, .n = H1w, .k = m, .a = x, .lda = M, .b = dp, .ldb = H1w, .beta = 1.f,
              .c = dw1, .ldc = H1w});
        if (input_grad)
          gemm({.transpose_b = true, .m = m, .n = M, .k = H1w, .a = dp, .lda = H1w,
                .b = w.p.w1.data_as<float>() + l * M * H1w, .ldb = H1w, .c = d_rows.data_as<float>() + offset * M,
                .ldc = M});
      }
      offset += m;
    }
}

Tensor MoELayer::backward(const TensorView& dout, double balance_coef, double z_coef, bool input_grad) {
  if (!saved_.valid) SY_THROW(InvalidArgument, "moe: backward without a forward to differentiate");
  PhaseTimer timer(times_, virtual_times_, &MoEPhaseTimes::backward);
  const Saved& sv = saved_;
  const DispatchPlan& p = sv.plan;
  const int64_t T = p.tokens, M = config_.model_dim;
  const int E = config_.router.experts, k = p.k, kc = p.k * p.copies, S = layout_.shards();
  if (dout.dtype() != DType::f32 || dout.shape() != Shape{T, M} || !dout.is_contiguous())
    SY_THROW(InvalidArgument, "moe: dout is ", dtype_name(dout.dtype()), " ", shape_string(dout.shape()),
             ", expected contiguous f32 [", T, ", ", M, "] like the output");
  const float* g = static_cast<const float*>(dout.data());

  // Combine: returned rows (every copy) were weighted and summed into their tokens.
  Tensor d_returned = scratch(Scratch::d_returned, {p.send_rows(), M});
  if (!config_.skip_compute)  // timing only: these rows are neither computed on nor moved
    kernels::cpu::gather_scaled_rows(g, p.token_of_row.data(), p.weight_of_row.data(), p.send_rows(), M,
                                     d_returned.data_as<float>());
  std::vector<float> d_weight_of_row(static_cast<size_t>(p.send_rows()));
  kernels::cpu::row_dots(g, p.token_of_row.data(), sv.returned.data_as<float>(), p.send_rows(), M,
                         d_weight_of_row.data());
  charge_memory(4.0 * p.send_rows() * M * sizeof(float));

  // To the experts the way the tokens went, chunk by chunk, each chunk's
  // gradient returning while the next one computes.
  const bool moves = p.exchange_ranks > 1;
  const int d = p.exec.d;
  Tensor d_out = moves ? scratch(Scratch::d_out, {p.recv_rows(), M}) : d_returned;
  PendingWorks to_experts, back;
  if (moves)
    for (int i = 0; i < d; ++i) to_experts.push_back(exchange(p, i, d_returned, d_out, true));
  const PlanShape shape = shape_of(p.exec.r);
  const Working& w = sv.weights;
  ExpertParams wg;  // working-weight gradients
  if (w.gathered) {
    wg.w1 = scratch(Scratch::dw1, w.p.w1.shape());
    wg.w2 = scratch(Scratch::dw2, w.p.w2.shape());
    if (!config_.skip_compute) {
      std::memset(wg.w1.data(), 0, wg.w1.nbytes());
      std::memset(wg.w2.data(), 0, wg.w2.nbytes());
    }
    wg.b1 = Tensor::zeros(w.p.b1.shape(), DType::f32);
    wg.b2 = Tensor::zeros(w.p.b2.shape(), DType::f32);
  } else {
    wg = grads_;
    if (S > 1) wg.b2 = Tensor::zeros(grads_.b2.shape(), DType::f32);  // summed over the expert's ranks below
  }
  Tensor d_rows = scratch(Scratch::d_rows, {p.recv_rows(), M});
  Tensor d_sent = moves ? scratch(Scratch::d_sent, {p.send_rows(), M}) : d_rows;
  Tensor dy16, dp16;
  if (config_.compute == DType::bf16) {
    dy16 = scratch(Scratch::d_out_bf16, {p.recv_rows(), M}, DType::bf16);
    dp16 = scratch(Scratch::d_pre_bf16, {p.recv_rows(), w.p.w1.shape()[2]}, DType::bf16);
  }
  for (int i = 0; i < d; ++i) {
    if (moves) to_experts[static_cast<size_t>(i)].wait();
    backward_chunk(p, i, w, d_out, input_grad, wg, d_rows, dy16, dp16);
    if (moves && input_grad) back.push_back(exchange(p, i, d_rows, d_sent, false));
  }
  scatter_gradients(shape, wg, w.gathered);

  // Gate: the weights of the choices (summed over a row's copies), then the
  // losses, down to the logits.
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
      double dw = 0.0;
      for (int c = 0; c < p.copies; ++c) {
        const int64_t row = p.row_of_choice[static_cast<size_t>((t * k + j) * p.copies + c)];
        if (row >= 0) dw += d_weight_of_row[static_cast<size_t>(row)];
      }
      chosen_sum += s[t * E + chosen[t * k + j]];
      dot += dw * weight[t * k + j];
      ds[chosen[t * k + j]] += dw;
    }
    if (router_.renormalize)  // w_j = s_j / sum_chosen s
      for (int j = 0; j < k; ++j) {
        const int e = chosen[t * k + j];
        ds[e] = (ds[e] - dot) / chosen_sum;
      }
    if (balance_coef != 0.0 && T > 0) {
      SY_CHECK_EQ(sv.routing.balance_fraction.size(), static_cast<size_t>(E), "balance fractions of the saved routing");
      // balance = E * sum_e f_e * mean_t(s_te / sum_e s_te); f_e (a count) has no gradient.
      double row_sum = 0.0, gs = 0.0;
      for (int e = 0; e < E; ++e) row_sum += s[t * E + e];
      for (int e = 0; e < E; ++e) {
        const double f = sv.routing.balance_fraction[static_cast<size_t>(e)];
        gbal[e] = balance_coef * E * f / static_cast<double>(T);
        gs += gbal[e] * s[t * E + e] / row_sum;
      }
      for (int e = 0; e < E; ++e) ds[e] += (gbal[e] - gs) / row_sum;
    }
    float* dl = d_logits.data_as<float>() + t * E;
    if (router_.gate == GateKind::softmax) {
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
        .b = d_logits.data_as<float>(), .ldb = E, .c = local_gate_grad.data_as<float>(), .ldc = E},
       true);
  group_->allreduce(local_gate_grad, local_gate_grad).wait();
  add_into(gate_grad_, local_gate_grad);

  if (!input_grad) return Tensor();
  back.wait_all();
  // Timing only: the rows' gradients were neither computed nor moved; zeros
  // keep a stack of layers finite.
  if (config_.skip_compute) std::memset(d_sent.data(), 0, static_cast<size_t>(p.send_rows() * M) * sizeof(float));
  // Every copy's partial input gradient lands on its token.
  Tensor dx = Tensor::empty({T, M}, DType::f32);
  kernels::cpu::combine_rows(d_sent.data_as<float>(), p.row_of_choice.data(), nullptr, T, kc, M, dx.data_as<float>());
  charge_memory(static_cast<double>(p.send_rows() + T) * M * sizeof(float));
  gemm({.transpose_b = true, .m = T, .n = M, .k = E, .a = d_logits.data_as<float>(), .lda = E,
        .b = gate_weight_.data_as<float>(), .ldb = E, .beta = 1.f, .c = dx.data_as<float>(), .ldc = M},
       true);
  return dx;
}

}  // namespace switchyard
