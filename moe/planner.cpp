#include "moe/planner.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "core/logging.h"
#include "kernels/gemm.h"

namespace switchyard {
namespace {
constexpr double kFloat = 4.0;

double median_seconds(int reps, const std::function<void()>& fn) {
  fn();  // warm-up
  std::vector<double> t;
  for (int i = 0; i < reps; ++i) {
    const auto start = Clock::now();
    fn();
    t.push_back(std::chrono::duration<double>(Clock::now() - start).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

// The pipeline of one direction pair: d chunks sent back to back on one FIFO
// stream, each computed once it arrived (and not before `ready`), each sent
// back once computed, behind the stream's earlier chunks.
double pipeline(int d, double chunk_out, double chunk_compute, double chunk_back, double ready) {
  double computed = 0;
  std::vector<double> posted(static_cast<size_t>(d));
  for (int i = 0; i < d; ++i) {
    computed = std::max({(i + 1) * chunk_out, computed, i == 0 ? ready : 0.0}) + chunk_compute;
    posted[static_cast<size_t>(i)] = computed;
  }
  double stream = d * chunk_out;
  for (int i = 0; i < d; ++i) stream = std::max(stream, posted[static_cast<size_t>(i)]) + chunk_back;
  return std::max(stream, computed);
}
}  // namespace

std::string PlanCost::describe() const {
  return detail::make_string(total * 1e3, " ms (all-to-all ", exchange * 1e3, ", experts ", compute * 1e3,
                             ", weights ", weights * 1e3, ", other ", other * 1e3, ")");
}

Planner::Planner(const MoELayer& layer, DeviceModel device, LinkModel link, PlannerOptions options)
    : device_(device), link_(link), options_(std::move(options)) {
  const MoEConfig& c = layer.config();
  world_ = layer.group()->size();
  experts_ = c.router.experts;
  shards_ = layer.layout().shards();
  local_experts_ = layer.layout().local_experts();
  node_size_ = c.node_size;
  k_ = c.router.k;
  model_dim_ = c.model_dim;
  hidden_ = c.hidden_dim;
  gated_ = c.activation == kernels::Activation::swiglu;
  bf16_ = c.compute == DType::bf16;
  hierarchical_ = layer.has_hierarchical();
  router_ = c.router;
  for (int r : valid_sharding_degrees(shards_))
    for (int d : options_.overlap_degrees) {
      for (A2AAlgorithm a2a : {A2AAlgorithm::flat, A2AAlgorithm::hierarchical})
        for (ExchangeMode x : {ExchangeMode::padded, ExchangeMode::dropless}) {
          if (!options_.choose_exchange && x != c.plan.exchange) continue;
          if (a2a == A2AAlgorithm::hierarchical && (!hierarchical_ || r == 0)) continue;
          if (r == 0 && (d != options_.overlap_degrees.front() || a2a != A2AAlgorithm::flat)) continue;  // no all-to-all
          if (world_ == 1 && d != options_.overlap_degrees.front()) continue;
          candidates_.push_back({r, d, a2a, x});
        }
    }
  SY_CHECK(!candidates_.empty(), "planner: no candidate plans");
}

int64_t Planner::capacity_for(int64_t tokens) const {
  const double cf = router_.capacity_factor;
  const int64_t by_factor = capacity_by_factor(router_, tokens);
  // Without a factor the capacity is the largest load: scale the last batch's.
  int64_t largest = last_tokens_ > 0 && last_capacity_ > 0
                        ? static_cast<int64_t>(std::ceil(static_cast<double>(last_capacity_) * tokens / last_tokens_))
                        : static_cast<int64_t>(std::ceil(2.0 * tokens * k_ / experts_));
  int64_t c = cf > 0 ? by_factor : cf == 0 ? largest : std::min(largest, by_factor);
  const int64_t a = router_.capacity_alignment;
  return (c + a - 1) / a * a;
}

double Planner::a2a_seconds(const ExecPlan& plan, double bytes, double* copies) const {
  const int W = world_;
  if (W == 1) return 0.0;
  const int G = std::min(link_.ranks_per_node, W);
  if (plan.a2a == A2AAlgorithm::flat || !hierarchical_) {
    const double alpha = (G - 1) * link_.intra.latency + (W - G) * link_.inter.latency;
    const double intra = bytes * (G - 1) / W, inter = bytes * (W - G) / W;
    return link_scale_ * (alpha + std::max(intra / link_.intra.bandwidth, inter / link_.inter.bandwidth));
  }
  const int g = node_size_, n = W / g;
  const LinkClass& inside = g <= link_.ranks_per_node ? link_.intra : link_.inter;
  const double phase1 = (g - 1) * inside.latency + bytes * (g - 1) / g / inside.bandwidth;
  const double phase2 = (n - 1) * link_.inter.latency + bytes * (n - 1) / n / link_.inter.bandwidth;
  const double counts = plan.exchange == ExchangeMode::dropless ? (g - 1) * inside.latency : 0.0;
  const double relayout = 2.0 * bytes / device_.memory_bandwidth;
  if (copies) *copies = relayout;
  return link_scale_ * (phase1 + phase2 + counts) + relayout;
}

double Planner::collective_seconds(int group, bool spans_nodes, double full_bytes) const {
  if (group <= 1) return 0.0;
  const LinkClass& c = spans_nodes ? link_.inter : link_.intra;
  return link_scale_ * (group - 1) * (c.latency + full_bytes / group / c.bandwidth);
}

PlanCost Planner::predict(const ExecPlan& plan, int64_t tokens, int64_t capacity) const {
  const int S = shards_, r = plan.r, E = experts_, W = world_, L = local_experts_;
  const double M = static_cast<double>(model_dim_), H = static_cast<double>(hidden_), T = static_cast<double>(tokens);
  const double C = static_cast<double>(capacity);
  const bool padded = plan.exchange == ExchangeMode::padded;
  double rows = 0, Hw = H;
  if (r == 0 || S == 1) {
    rows = padded ? E * C : T * k_;
  } else {
    const int R = S / r;
    rows = padded ? E * R * std::ceil(C / R) * r : T * k_ * r;
    Hw = H / r;
  }
  const double H1w = gated_ ? 2 * Hw : Hw;
  const double rate = bf16_ ? device_.gemm_flops_bf16 : device_.gemm_flops_f32;
  const double mem = device_.memory_bandwidth;
  // Experts (rows received = rows sent, loads balanced).
  const double gemm_fwd = 2 * rows * M * (H1w + Hw);
  const double gemm_bwd = 2 * rows * M * (H1w + 2 * Hw) + (options_.input_grad ? 2 * rows * M * H1w : 0.0);
  // The GEMMs at their roofline: a few rows per expert (decode) read the working weights at the bandwidth
  // (backward: read for the input gradient, the weight gradients written).
  const double weight_bytes = (r == 0 ? E : L) * M * (H1w + Hw) * (bf16_ ? 2.0 : kFloat);
  const double compute_fwd =
      compute_scale_ * (std::max(gemm_fwd / rate, weight_bytes / mem) + rows * (2 * H1w + Hw + M) * kFloat / mem);
  const double compute_bwd =
      compute_scale_ * (std::max(gemm_bwd / rate, 2 * weight_bytes / mem) + rows * (3 * H1w + Hw + M) * kFloat / mem);
  // Working weights: all-gathered in the sharding group, gradients reduce-scattered.
  int G = 1;
  if (r == 0) G = W;
  else if (S > 1) G = S / r;
  const double H1 = gated_ ? 2 * H : H, Hs = H / S, H1s = H1 / S;
  const double stored = L * (M * H1s + H1s + Hs * M + M) * kFloat;
  const bool spans = G > link_.ranks_per_node;
  double gather = 0, relayout = 0;
  if (G > 1) {
    gather = 4 * collective_seconds(G, spans, G * stored / 4);  // four tensors
    const int pieces = r == 0 ? S : G;
    const double working_w1 = (r == 0 ? E : L) * M * H1w * kFloat;
    if (pieces > 1) relayout = 2 * working_w1 / mem;
  }
  if (bf16_) relayout += 1.5 * (r == 0 ? E : L) * M * (H1w + Hw) * kFloat / mem;
  // All-to-alls: d chunks each way, rows x M floats per direction.
  const int d = W == 1 || r == 0 ? 1 : plan.d;
  const double bytes = rows * M * kFloat;
  double chunk_copies = 0;
  const double chunk = r == 0 ? 0.0 : a2a_seconds(plan, bytes / d, &chunk_copies);
  const double counts =
      r != 0 && !padded ? a2a_seconds({plan.r, 1, A2AAlgorithm::flat, plan.exchange}, W * d * L * 8.0) : 0.0;
  PlanCost cost;
  cost.compute = compute_fwd + (options_.training ? compute_bwd : 0.0);
  cost.weights = gather + relayout + (options_.training ? gather + relayout : 0.0);
  const double chunks = 2 * d + (options_.training ? d * (options_.input_grad ? 2 : 1) : 0);
  cost.exchange = counts + chunks * chunk;
  cost.link_busy = counts + chunks * (chunk - chunk_copies) + gather * (options_.training ? 2 : 1);
  const double gate = 2 * T * M * E / device_.gemm_flops_f32 * (options_.training ? 3 : 1) * compute_scale_;
  const double streams = (2 * rows + rows + T) * M * kFloat / mem +
                         (options_.training ? (5 * rows + T) * M * kFloat / mem + 3 * stored / mem : 0.0);
  const double gate_sync = collective_seconds(W, W > link_.ranks_per_node, 8.0) * (options_.training ? 2 : 1);
  cost.other = gate + compute_scale_ * streams + gate_sync;
  const double ready = gather + relayout;
  double fwd = 0, bwd = 0;
  if (r == 0 || W == 1) {
    fwd = ready + compute_fwd;
    bwd = compute_bwd + gather + relayout;
  } else {
    fwd = counts + pipeline(d, chunk, compute_fwd / d, chunk, ready);
    bwd = pipeline(d, chunk, compute_bwd / d, options_.input_grad ? chunk : 0.0, 0.0) + gather + relayout;
  }
  cost.total = fwd + (options_.training ? bwd : 0.0) + cost.other;
  return cost;
}

void Planner::observe(MoELayer&, const double measured[2], int64_t capacity) {
  const double cs = compute_scale_, ls = link_scale_;
  compute_scale_ = link_scale_ = 1.0;  // predictions without the corrections
  const PlanCost p = predict(last_plan_, last_tokens_, capacity);
  const bool training = options_.training;
  options_.training = false;
  const PlanCost forward = predict(last_plan_, last_tokens_, capacity);
  options_.training = training;
  compute_scale_ = cs, link_scale_ = ls;
  auto update = [&](double& scale, double observed, double predicted) {
    if (!(observed > 0) || !(predicted > 0)) return;
    // The first measurement replaces the calibration's guess; later ones are smoothed.
    const double a = observations_ == 0 ? 1.0 : options_.smoothing;
    scale = std::exp((1 - a) * std::log(scale) + a * std::log(observed / predicted));
  };
  // The experts phase is the forward expert compute.
  update(compute_scale_, measured[0], forward.compute);
  // All-to-alls and weight collectives share the link model.
  update(link_scale_, measured[1], p.link_busy);
  ++observations_;
  last_capacity_ = capacity;
}

std::vector<double> Planner::local_inputs(MoELayer& layer, int64_t tokens) {
  const bool virt = layer.config().device_model != nullptr;
  snapshot_phases_ = virt ? layer.virtual_phase_times() : layer.phase_times();
  snapshot_busy_ = layer.comm_busy();
  // The last batch's capacity rides along: uncapped dropless plans keep a
  // rank-local one (nothing agrees it), and predictions must use the group's.
  return {static_cast<double>(tokens), snapshot_phases_.experts - last_phases_.experts,
          snapshot_busy_.exchange - last_busy_.exchange + snapshot_busy_.weights - last_busy_.weights,
          static_cast<double>(layer.last_plan().capacity)};
}

ExecPlan Planner::next(MoELayer& layer, int64_t tokens) {
  // One max-allreduce agrees this batch's tokens and the previous batch's
  // measurements (the slowest rank's), so every rank decides alike.
  std::vector<double> agreed = local_inputs(layer, tokens);
  layer.group()->allreduce(TensorView(agreed.data(), DType::f64, {4}), TensorView(agreed.data(), DType::f64, {4}),
                           {.op = ReduceOp::max}).wait();
  return choose(layer, agreed, -1);
}

ExecPlan Planner::choose(MoELayer& layer, const std::vector<double>& agreed, int64_t capacity) {
  SY_CHECK_EQ(agreed.size(), size_t{4}, "planner inputs");
  if (pending_) observe(layer, agreed.data() + 1, static_cast<int64_t>(agreed[3]));
  const auto T = static_cast<int64_t>(agreed[0]);
  const int64_t C = capacity >= 0 ? capacity : capacity_for(T);
  size_t best = 0, second = 0;
  std::vector<PlanCost> costs;
  // The layer's placement may have changed since (migrate): plans it cannot run are out.
  const bool permutation = layer.layout().is_permutation();
  for (const ExecPlan& p : candidates_) {
    costs.push_back(predict(p, T, C));
    if (p.r != 1 && !permutation) costs.back().total = INFINITY;
  }
  for (size_t i = 1; i < costs.size(); ++i)
    if (costs[i].total < costs[best].total) best = i;
  second = best == 0 ? (costs.size() > 1 ? 1 : 0) : 0;
  for (size_t i = 0; i < costs.size(); ++i)
    if (i != best && costs[i].total < costs[second].total) second = i;
  // Hysteresis: keep the current plan unless another is predicted clearly
  // (options.switch_margin) cheaper, so noise in measured times cannot make
  // the decision flap between near-ties.
  if (pending_)
    for (size_t i = 0; i < candidates_.size(); ++i)
      if (candidates_[i] == last_plan_ && costs[best].total > costs[i].total * (1.0 - options_.switch_margin)) best = i;
  const ExecPlan chosen = candidates_[best];
  const bool changed = !pending_ || !(chosen == last_plan_);
  {
    explanation_ = detail::make_string("planner: (", chosen.describe(), ") predicted ", costs[best].describe(),
                                       "; runner-up (", candidates_[second].describe(), ") ",
                                       costs[second].total * 1e3, " ms; ", T, " tokens/rank, capacity ", C,
                                       "; corrections compute x", compute_scale_, ", links x", link_scale_);
  }
  if (changed) {  // why, in the log, whenever the decision changes
    ++changes_;
    SY_LOG_INFO("planner", explanation_);
  }
  pending_ = true;
  last_plan_ = chosen;
  last_tokens_ = T;
  last_phases_ = snapshot_phases_;
  last_busy_ = snapshot_busy_;
  return chosen;
}

std::pair<DeviceModel, LinkModel> Planner::calibrate(MoELayer& layer, int ranks_per_node) {
  const MoEConfig& c = layer.config();
  Communicator& g = *layer.group();
  const int64_t m = 256, M = c.model_dim, H = c.hidden_dim;
  Tensor a = Tensor::zeros({m, M}, DType::f32), b = Tensor::zeros({M, H}, DType::f32), out = Tensor::zeros({m, H}, DType::f32);
  const double t_gemm = median_seconds(3, [&] {
    kernels::cpu::gemm_f32({.m = m, .n = H, .k = M, .a = a.data_as<float>(), .lda = M, .b = b.data_as<float>(),
                            .ldb = H, .c = out.data_as<float>(), .ldc = H});
  });
  double t_bf16 = t_gemm / 2;
  if (c.compute == DType::bf16) {
    Tensor a16 = Tensor::zeros({m, M}, DType::bf16), b16 = Tensor::zeros({M, H}, DType::bf16);
    t_bf16 = median_seconds(3, [&] {
      kernels::cpu::gemm_bf16({.m = m, .n = H, .k = M, .a = static_cast<const uint16_t*>(a16.data()), .lda = M,
                               .b = static_cast<const uint16_t*>(b16.data()), .ldb = H, .c = out.data_as<float>(),
                               .ldc = H});
    });
  }
  const int64_t copy_bytes = 8 << 20;
  std::vector<char> src(static_cast<size_t>(copy_bytes), 1), dst(static_cast<size_t>(copy_bytes));
  const double t_copy = median_seconds(3, [&] { std::memcpy(dst.data(), src.data(), src.size()); });
  const int W = g.size();
  const int64_t big = 1 << 18;  // floats per peer
  Tensor s_small = Tensor::zeros({W * 2}, DType::f32), r_small = Tensor::zeros({W * 2}, DType::f32);
  Tensor s_big = Tensor::zeros({W * big}, DType::f32), r_big = Tensor::zeros({W * big}, DType::f32);
  const double t_small = median_seconds(5, [&] { g.alltoall(s_small, r_small).wait(); });
  const double t_big = median_seconds(3, [&] { g.alltoall(s_big, r_big).wait(); });
  double t[5] = {t_gemm, t_bf16, t_copy, t_small, t_big};
  g.allreduce(TensorView(t, DType::f64, {5}), TensorView(t, DType::f64, {5}), {.op = ReduceOp::max}).wait();
  DeviceModel dev;
  dev.gemm_flops_f32 = 2.0 * m * M * H / t[0];
  dev.gemm_flops_bf16 = 2.0 * m * M * H / t[1];
  dev.memory_bandwidth = static_cast<double>(copy_bytes) / t[2];
  LinkModel link;
  const int peers = std::max(1, W - 1);
  link.intra.latency = W > 1 ? t[3] / peers : 1e-6;
  link.intra.bandwidth = W > 1 ? std::max(1e6, big * 4.0 * peers / std::max(1e-9, t[4] - t[3])) : 1e12;
  link.inter = link.intra;
  link.ranks_per_node = ranks_per_node;
  return {dev, link};
}

}  // namespace switchyard
