#include "moe/planner.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <numeric>

#include "comm/virtual_time.h"
#include "core/error.h"

namespace switchyard {
namespace {
constexpr double kFloat = 4.0;

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

// Each rank sends `per_peer` to every rank of its exchange (blocks of
// `exchange` consecutive ranks; itself included), nothing to the others.
std::vector<double> uniform(int world, int exchange, double per_peer) {
  std::vector<double> m(static_cast<size_t>(world) * world, 0.0);
  for (int i = 0; i < world; ++i)
    for (int j = i / exchange * exchange; j < (i / exchange + 1) * exchange; ++j) m[static_cast<size_t>(i) * world + j] = per_peer;
  return m;
}
}  // namespace

MoECostModel::MoECostModel(const MoELayer& layer, DeviceModel device, LinkModel link, PlannerOptions options)
    : device_(device), link_(link), options_(std::move(options)) {
  const MoEConfig& c = layer.config();
  world_ = layer.group()->size();
  exchange_ranks_ = layer.exchange_group()->size();
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
  if (link_.ranks_per_node < 1) link_.ranks_per_node = 1;
}

void MoECostModel::follow_exchange(const MoELayer& layer) {
  exchange_ranks_ = layer.exchange_group()->size();
  hierarchical_ = layer.has_hierarchical();
  local_experts_ = layer.layout().local_experts();
}

std::vector<double> MoECostModel::traffic(const ExecPlan& plan, const PlanInputs& batch, double rows_per_rank) const {
  const int W = world_;
  const bool per_peer = plan.r == 1 && shards_ == 1 && plan.exchange == ExchangeMode::dropless;
  if (!per_peer || batch.peer_rows.empty()) return uniform(W, exchange_ranks_, rows_per_rank / exchange_ranks_);
  // Shuffled rows (a padded exchange sends its capacity per expert wherever the rows are: nothing to gain there).
  const bool shuffled = plan.shuffle && batch.shuffled_peer_rows.size() == static_cast<size_t>(W) * W;
  if (!batch.peer_rows_summarised || shuffled) {
    // A capped exchange sends at most the capacity per expert: the excess drops.
    std::vector<double> m = shuffled ? batch.shuffled_peer_rows : batch.peer_rows;
    const double most = static_cast<double>(batch.capacity) * local_experts_;
    if (batch.capacity > 0)
      for (double& v : m) v = std::min(v, most);
    return m;
  }
  // Locality summary (rows to self, inside the node, across nodes): spread
  // evenly over the exchange's peers of each class.
  std::vector<double> m(static_cast<size_t>(W) * W, 0.0);
  for (int i = 0; i < W; ++i) {
    int near = 0, far = 0;
    for (int j = 0; j < W; ++j)
      if (j != i && same_exchange(i, j)) (link_.same_node(i, j) ? near : far) += 1;
    const double* s = batch.peer_rows.data() + 3 * i;
    for (int j = 0; j < W; ++j)
      if (same_exchange(i, j))
        m[static_cast<size_t>(i) * W + j] =
            j == i ? s[0] : link_.same_node(i, j) ? s[1] / std::max(1, near) : s[2] / std::max(1, far);
  }
  return m;
}

double MoECostModel::a2a_seconds(const ExecPlan& plan, const std::vector<double>& bytes, double link_scale,
                                 double* copies) const {
  const int W = world_;
  if (W == 1) return 0.0;
  // One flat all-to-all: each rank's messages to its peers, each link class
  // at its bandwidth (a pair's cost is the larger of its two directions).
  // peer(i, j): whether the exchange has i and j talk (every pair, or one 2DH phase's).
  auto exchange = [&](const std::vector<double>& b, const std::function<bool(int, int)>& peer) {
    double slowest = 0;
    for (int i = 0; i < W; ++i) {
      double latency = 0, intra = 0, inter = 0;
      for (int j = 0; j < W; ++j) {
        if (j == i || !same_exchange(i, j) || !peer(i, j)) continue;
        // Every peer of the exchange gets a message, empty ones too (all-to-all-v posts them all).
        const double pair = std::max(b[static_cast<size_t>(i) * W + j], b[static_cast<size_t>(j) * W + i]);
        const bool near = link_.same_node(i, j);
        latency += near ? link_.intra.latency : link_.inter.latency;
        (near ? intra : inter) += pair;
      }
      slowest = std::max(slowest, latency + std::max(intra / link_.intra.bandwidth, inter / link_.inter.bandwidth));
    }
    return slowest;
  };
  if (plan.a2a == A2AAlgorithm::flat || !hierarchical_) return link_scale * exchange(bytes, [](int, int) { return true; });
  // 2DH over the layer's node groups of g ranks: first inside each group every
  // rank sends local rank l' what goes to local index l' anywhere, then across
  // groups local rank l sends group a' what its group has for (a', l).
  const int g = node_size_;
  std::vector<double> phase1(bytes.size(), 0.0), phase2(bytes.size(), 0.0);
  double relayout = 0;
  for (int i = 0; i < W; ++i) {
    double sent = 0;
    for (int j = 0; j < W; ++j) {
      const double b = bytes[static_cast<size_t>(i) * W + j];
      sent += b;
      const int via = i / g * g + j % g;  // the rank of i's group with j's local index
      phase1[static_cast<size_t>(i) * W + via] += b;
      phase2[static_cast<size_t>(via) * W + j] += b;
    }
    relayout = std::max(relayout, 2.0 * sent / device_.memory_bandwidth);
  }
  const LinkClass& inside = g <= link_.ranks_per_node ? link_.intra : link_.inter;
  const double counts = plan.exchange == ExchangeMode::dropless ? (g - 1) * inside.latency : 0.0;
  if (copies) *copies = relayout;
  const double inside_nodes = exchange(phase1, [&](int i, int j) { return i / g == j / g; });
  const double across_nodes = exchange(phase2, [&](int i, int j) { return i % g == j % g; });
  return link_scale * (inside_nodes + across_nodes + counts) + relayout;
}

double MoECostModel::collective_seconds(int group, bool spans_nodes, double full_bytes, double link_scale) const {
  if (group <= 1) return 0.0;
  const LinkClass& c = spans_nodes ? link_.inter : link_.intra;
  return link_scale * (group - 1) * (c.latency + full_bytes / group / c.bandwidth);
}

PlanCost MoECostModel::predict(const ExecPlan& plan, const PlanInputs& batch, const Corrections& corr) const {
  const int S = shards_, r = plan.r, E = experts_, W = world_, L = local_experts_;
  const double M = static_cast<double>(model_dim_), H = static_cast<double>(hidden_);
  const double T = static_cast<double>(batch.tokens), C = static_cast<double>(batch.capacity);
  const bool padded = plan.exchange == ExchangeMode::padded;
  double rows = 0, Hw = H;
  if (r == 0 || S == 1) {
    rows = padded ? E * C : T * k_;
  } else {
    const int R = S / r;
    rows = padded ? E * R * std::ceil(C / R) * r : T * k_ * r;
    Hw = H / r;
  }
  // The all-to-all's bytes per rank pair, and the rows the busiest rank's experts compute.
  const std::vector<double> rows_between = traffic(plan, batch, rows);
  double compute_rows = rows, sources = 1;  // and how many ranks send the busiest receiver rows
  if (r != 0 && W > 1) {
    compute_rows = 0;
    for (int j = 0; j < W; ++j) {
      double in = 0, from = 0;
      for (int i = 0; i < W; ++i) {
        in += rows_between[static_cast<size_t>(i) * W + j];
        from += rows_between[static_cast<size_t>(i) * W + j] > 0;
      }
      if (in > compute_rows) compute_rows = in, sources = std::max(1.0, from);
    }
  }
  const double H1w = gated_ ? 2 * Hw : Hw;
  const double mem = device_.memory_bandwidth;
  // Experts (the busiest receiver's rows), as the layer runs them: per chunk
  // and working expert one GEMM per source rank's block, each at its
  // roofline; the first block of an expert in a chunk also reads its weight
  // (or, for a weight gradient, writes it), the others only their rows.
  const int d = W == 1 || r == 0 ? 1 : plan.d;
  const double slots = r == 0 ? E : L, blocks = r == 0 ? 1.0 : sources;
  // Experts a chunk's rows reach (padded: every one, its padding computed too;
  // dropless: as many as so many rows spread over them hit).
  const double chunk_rows = compute_rows / d;
  const double active = padded ? slots : std::max(1.0, slots * (1 - std::pow(1 - 1 / slots, chunk_rows)));
  const double block_rows = chunk_rows / (active * blocks);
  // A GEMM kind over all blocks, its expert-sized operand p x q: a weight
  // (rows x p times p x q), or an fp32 weight gradient (p x rows times rows x q).
  auto expert_gemm = [&](double p, double q, bool gradient) {
    auto block = [&](bool paid) {
      return gradient ? device_.gemm_seconds(p, q, block_rows, bf16_, paid, true)
                      : device_.gemm_seconds(block_rows, q, p, bf16_, paid);
    };
    return d * active * (block(false) + (blocks - 1) * block(true));
  };
  const double gemm_fwd = expert_gemm(M, H1w, false) + expert_gemm(Hw, M, false);
  const double gemm_bwd = expert_gemm(Hw, M, true) + expert_gemm(M, Hw, false) + expert_gemm(M, H1w, true) +
                          (options_.input_grad ? expert_gemm(H1w, M, false) : 0.0);
  const double compute_fwd = corr.compute * (gemm_fwd + compute_rows * (2 * H1w + Hw + M) * kFloat / mem);
  const double compute_bwd = corr.compute * (gemm_bwd + compute_rows * (3 * H1w + Hw + M) * kFloat / mem);
  // Working weights: all-gathered in the sharding group, gradients reduce-scattered.
  int G = 1;
  if (r == 0) G = W;
  else if (S > 1) G = S / r;
  const double H1 = gated_ ? 2 * H : H, Hs = H / S, H1s = H1 / S;
  const double stored = L * (M * H1s + H1s + Hs * M + M) * kFloat;
  const bool spans = G > link_.ranks_per_node;
  double gather = 0, relayout = 0;
  if (G > 1) {
    gather = 4 * collective_seconds(G, spans, G * stored / 4, corr.link);  // four tensors
    const int pieces = r == 0 ? S : G;
    const double working_w1 = (r == 0 ? E : L) * M * H1w * kFloat;
    if (pieces > 1) relayout = 2 * working_w1 / mem;
  }
  if (bf16_) relayout += 1.5 * (r == 0 ? E : L) * M * (H1w + Hw) * kFloat / mem;
  // All-to-alls: d chunks each way, rows x M floats per direction.
  std::vector<double> chunk_bytes = rows_between;
  for (double& b : chunk_bytes) b *= M * kFloat / d;
  double chunk_copies = 0;
  const double chunk = r == 0 ? 0.0 : a2a_seconds(plan, chunk_bytes, corr.link, &chunk_copies);
  const double counts =
      r != 0 && !padded ? a2a_seconds({plan.r, 1, A2AAlgorithm::flat, plan.exchange},
                                      uniform(W, exchange_ranks_, d * L * 8.0), corr.link)
                        : 0.0;
  PlanCost cost;
  cost.compute = compute_fwd + (options_.training ? compute_bwd : 0.0);
  cost.forward_compute = compute_fwd;
  cost.weights = gather + relayout + (options_.training ? gather + relayout : 0.0);
  const double chunks = 2 * d + (options_.training ? d * (options_.input_grad ? 2 : 1) : 0);
  cost.exchange = counts + chunks * chunk;
  cost.link_busy = counts + chunks * (chunk - chunk_copies) + gather * (options_.training ? 2 : 1);
  const double gate = 2 * T * M * E / device_.gemm_flops_f32 * (options_.training ? 3 : 1) * corr.compute;
  const double streams = (2 * rows + rows + T) * M * kFloat / mem +
                         (options_.training ? (5 * rows + T) * M * kFloat / mem + 3 * stored / mem : 0.0);
  // Ring all-reduces over the group: the capacity agreement (a few values)
  // and, training, the gate's gradient [M, E].
  const bool group_spans = W > link_.ranks_per_node;
  const double agreement = 8.0 * (6 + static_cast<double>(batch.peer_rows.size()));  // the capacity and PlanInputs
  const double gate_sync = 2 * collective_seconds(W, group_spans, agreement, corr.link) +
                           (options_.training ? 2 * collective_seconds(W, group_spans, M * E * kFloat, corr.link) : 0.0);
  cost.other = gate + corr.compute * streams + gate_sync + (plan.shuffle ? batch.shuffle_seconds : 0.0);
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

std::vector<ExecPlan> tutel_plans(const MoELayer& layer, const PlannerOptions& options) {
  const int W = layer.group()->size();
  // 2dh when the layer's exchange runs it now (a planner keeps these candidates; after a migrate that takes
  // 2dh away its filter leaves them out, and one that brings it back adds none).
  const bool hierarchical = layer.has_hierarchical();
  std::vector<ExecPlan> plans;
  for (int r : valid_sharding_degrees(layer.layout().shards()))
    for (int d : options.overlap_degrees)
      for (A2AAlgorithm a2a : {A2AAlgorithm::flat, A2AAlgorithm::hierarchical})
        for (ExchangeMode x : {ExchangeMode::padded, ExchangeMode::dropless}) {
          if (!options.choose_exchange && x != layer.config().plan.exchange) continue;
          if (a2a == A2AAlgorithm::hierarchical && (!hierarchical || r == 0)) continue;
          // r = 0 has no all-to-all: one plan, whatever d, a2a and the exchange say.
          if (r == 0 && (d != options.overlap_degrees.front() || a2a != A2AAlgorithm::flat ||
                         x != (options.choose_exchange ? ExchangeMode::padded : layer.config().plan.exchange)))
            continue;
          if (W == 1 && d != options.overlap_degrees.front()) continue;
          plans.push_back({r, d, a2a, x});
        }
  return plans;
}

MoEPlanner::MoEPlanner(const MoELayer& layer, DeviceModel device, LinkModel link, PlannerOptions options)
    : world_(layer.group()->size()),
      k_(layer.config().router.k),
      experts_(layer.config().router.experts),
      router_(layer.config().router),
      model_(std::make_shared<MoECostModel>(layer, device, link, options)),
      planner_(model_, options),
      options_(options) {
  planner_.add_candidates("tutel", tutel_plans(layer, options));
  if (planner_.candidates().empty()) SY_THROW(InvalidArgument, "planner: no candidate plans for this layer");
}

int64_t MoEPlanner::capacity_for(int64_t tokens) const {
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

PlanInputs::Layout MoEPlanner::layout(bool with_peer_rows) const {
  PlanInputs::Layout l;
  l.world = world_;
  if (with_peer_rows && world_ > 1) {
    l.summarised = world_ > options_.peer_rows_up_to;
    l.peer_values = l.summarised ? world_ * 3 : world_ * world_;
  }
  return l;
}

std::vector<double> MoEPlanner::local_inputs(MoELayer& layer, int64_t tokens, const Routing* routing) {
  const bool virt = layer.ops().device_model() != nullptr;
  snapshot_phases_ = virt ? layer.virtual_phase_times() : layer.phase_times();
  snapshot_busy_ = layer.comm_busy();
  PlanInputs in;
  in.tokens = tokens;
  in.measured_compute = snapshot_phases_.experts - last_phases_.experts;
  in.measured_links = snapshot_busy_.exchange - last_busy_.exchange + snapshot_busy_.weights - last_busy_.weights;
  if (!virt && !layer.ops().host_memory()) {
    // Device ops return before the device is done: phase and communicator
    // times are issue times, so nothing is learned from them (non-positive
    // measurements leave the corrections as the calibration set them).
    in.measured_compute = in.measured_links = 0;
  }
  // The last batch's capacity rides along: uncapped dropless plans keep a
  // rank-local one (nothing agrees it), and predictions must use the group's.
  in.previous_capacity = layer.last_plan().capacity;
  with_peer_rows_ = routing != nullptr;
  const PlanInputs::Layout l = layout(with_peer_rows_);
  if (l.peer_values > 0) {
    // Where this rank's routed rows go under expert parallelism: each choice
    // to its expert's ranks (split over replicas, or over the S ranks of a
    // sliced expert).
    const int W = world_, me = layer.group()->rank(), E = experts_;
    const ParamLayout& pl = layer.layout();
    std::vector<std::vector<std::pair<int, double>>> to(static_cast<size_t>(E));
    for (int e = 0; e < E; ++e) {
      if (pl.shards() > 1) {
        const int first = pl.owner(e), S = pl.shards();
        for (int s = 0; s < S; ++s) to[static_cast<size_t>(e)].push_back({first + s, 1.0 / S});
      } else {
        for (auto [p, share] : layer.replica_shares(me, e))
          to[static_cast<size_t>(e)].push_back({pl.placement().rank_of_slot(p), share});
      }
    }
    // Rows per expert, at most this rank's capacity when capped (the excess drops).
    std::vector<double> load(static_cast<size_t>(E), 0.0);
    const int32_t* experts = routing->experts.numel() ? routing->experts.data_as<int32_t>() : nullptr;
    for (int64_t c = 0; c < routing->experts.numel(); ++c)
      if (experts[c] >= 0 && experts[c] < E) load[static_cast<size_t>(experts[c])] += 1;
    if (router_.capacity_factor != 0) {  // capped (cf < 0: by the factor or the largest load)
      const auto cap = static_cast<double>(capacity_for(tokens));
      for (double& v : load) v = std::min(v, cap);
    }
    std::vector<double> mine(static_cast<size_t>(W), 0.0);
    for (int e = 0; e < E; ++e)
      for (auto [rank, share] : to[static_cast<size_t>(e)]) mine[static_cast<size_t>(rank)] += share * load[static_cast<size_t>(e)];
    in.peer_rows.assign(static_cast<size_t>(l.peer_values), 0.0);
    if (!l.summarised) {
      std::copy(mine.begin(), mine.end(), in.peer_rows.begin() + static_cast<std::ptrdiff_t>(me) * W);
    } else {
      const LinkModel& link = model_->link();
      for (int j = 0; j < W; ++j)
        in.peer_rows[static_cast<size_t>(3 * me + (j == me ? 0 : link.same_node(me, j) ? 1 : 2))] +=
            mine[static_cast<size_t>(j)];
    }
  }
  return in.pack(l);
}

ExecPlan MoEPlanner::next(MoELayer& layer, int64_t tokens) {
  // One max-allreduce agrees this batch's tokens and the previous batch's
  // measurements (the slowest rank's), so every rank decides alike.
  std::vector<double> agreed = local_inputs(layer, tokens, nullptr);
  const auto n = static_cast<int64_t>(agreed.size());
  layer.host_group()->allreduce(TensorView(agreed.data(), DType::f64, {n}),
                                TensorView(agreed.data(), DType::f64, {n}), {.op = ReduceOp::max}).wait();
  return choose(layer, agreed, -1);
}

ExecPlan MoEPlanner::choose(MoELayer& layer, const std::vector<double>& agreed, int64_t capacity) {
  PlanInputs in = PlanInputs::unpack(agreed, layout(with_peer_rows_));
  if (planner_.has_decided() && in.previous_capacity > 0) last_capacity_ = in.previous_capacity;
  in.capacity = capacity >= 0 ? capacity : capacity_for(in.tokens);
  // The layer's placement may have changed since (migrate): plans it cannot run are out, and the
  // exchange is priced as it is now.
  const bool permutation = layer.layout().is_permutation(), hierarchical = layer.has_hierarchical();
  model_->follow_exchange(layer);
  const ExecPlan chosen = planner_.choose(
      in,
      [&](const ExecPlan& p) {
        return (p.r == 1 || permutation) && (p.a2a != A2AAlgorithm::hierarchical || hierarchical) &&
               (!forced_ || p == *forced_);
      },
      forced_.has_value());
  last_tokens_ = in.tokens;
  last_phases_ = snapshot_phases_;
  last_busy_ = snapshot_busy_;
  last_inputs_ = in;
  return chosen;
}

PlanCost MoEPlanner::predict(const ExecPlan& plan, int64_t tokens, int64_t capacity) const {
  PlanInputs in;
  in.tokens = tokens;
  in.capacity = capacity;
  return planner_.predict(plan, in);
}

std::pair<DeviceModel, LinkModel> MoEPlanner::calibrate(MoELayer& layer, int ranks_per_node) {
  const MoEConfig& c = layer.config();
  Communicator& g = *layer.group();
  MoEOps& ops = layer.ops();
  const bool virt = ops.device_model() != nullptr;
  // Seconds of fn: the emulated clock's advance (deterministic: one run), or
  // the median wall time of a few after a warm-up.
  auto seconds = [&](int reps, const std::function<void()>& fn) {
    if (virt) {
      const double start = virtual_time::now();
      fn();
      return virtual_time::now() - start;
    }
    fn();
    ops.synchronize();
    std::vector<double> t;
    for (int i = 0; i < reps; ++i) {
      const auto start = Clock::now();
      fn();
      ops.synchronize();  // device ops return before the work is done
      t.push_back(std::chrono::duration<double>(Clock::now() - start).count());
    }
    std::sort(t.begin(), t.end());
    return t[t.size() / 2];
  };
  // Rows enough that the GEMM runs at its rate, not at the memory bandwidth.
  const int64_t m = 2048, M = c.model_dim, H = c.hidden_dim;
  Tensor a = ops.allocate({m, M}, DType::f32, true), b = ops.allocate({M, H}, DType::f32, true);
  Tensor out = ops.allocate({m, H}, DType::f32, true);
  const double t_gemm = seconds(3, [&] {
    ops.gemm({.m = m, .n = H, .k = M, .a = a.data_as<float>(), .lda = M, .b = b.data_as<float>(), .ldb = H,
              .c = out.data_as<float>(), .ldc = H});
  });
  double t_bf16 = t_gemm / 2;
  if (c.compute == DType::bf16) {
    Tensor a16 = ops.allocate({m, M}, DType::bf16, true), b16 = ops.allocate({M, H}, DType::bf16, true);
    t_bf16 = seconds(3, [&] {
      ops.gemm_bf16({.m = m, .n = H, .k = M, .a = static_cast<const uint16_t*>(a16.data()), .lda = M,
                     .b = static_cast<const uint16_t*>(b16.data()), .ldb = H, .c = out.data_as<float>(), .ldc = H});
    });
  }
  const int64_t copy_bytes = 8 << 20;
  Tensor src = ops.allocate({copy_bytes}, DType::u8, true), dst = ops.allocate({copy_bytes}, DType::u8, true);
  const double t_copy = seconds(3, [&] { ops.copy(dst.data(), src.data(), copy_bytes); });
  // Each link class on a group that uses only it: the ranks of my node, and
  // (several nodes) the ranks of my local index on every node.
  const int W = g.size(), me = g.rank(), per_node = std::clamp(ranks_per_node, 1, W);
  const int nodes = (W + per_node - 1) / per_node;
  std::vector<int> node_members, across_members;
  for (int u = me / per_node * per_node; u < std::min(W, (me / per_node + 1) * per_node); ++u) node_members.push_back(u);
  for (int u = me % per_node; u < W; u += per_node) across_members.push_back(u);
  // Two all-to-all sizes on a group: latency per peer from the small one, bandwidth from the difference.
  auto measure_link = [&](Communicator& group, double out[2]) {
    const int p = group.size();
    const int64_t big = 1 << 18;  // floats per peer
    // Through the ops: untouched pages when timing only (the emulator moves no bulk then).
    Tensor s_small = ops.allocate({p * 2}, DType::f32, true), r_small = ops.allocate({p * 2}, DType::f32, true);
    Tensor s_big = ops.allocate({p * big}, DType::f32, true), r_big = ops.allocate({p * big}, DType::f32, true);
    group.barrier().wait();
    const double t_small = seconds(5, [&] { group.alltoall(s_small, r_small).wait(); });
    group.barrier().wait();
    const double t_big = seconds(3, [&] { group.alltoall(s_big, r_big).wait(); });
    const int peers = std::max(1, p - 1);
    out[0] = p > 1 ? t_small / peers : 1e-6;
    out[1] = p > 1 ? std::max(1e6, big * 4.0 * peers / std::max(1e-9, t_big - t_small)) : 1e12;
  };
  double intra[2] = {1e-6, 1e12}, inter[2] = {1e-6, 1e12};
  if (W > 1) {
    auto node = g.create_group(node_members, g.name() + "/calibrate-node");
    measure_link(*node, intra);
    if (nodes > 1) {
      auto across = g.create_group(across_members, g.name() + "/calibrate-across");
      across->set_concurrent_siblings(true);  // every local index measures at once, as their NICs see it
      if (across->size() > 1) measure_link(*across, inter);
    } else {
      inter[0] = intra[0], inter[1] = intra[1];
    }
  }
  // The slowest rank's: max of times, min of bandwidths (as max of their negatives).
  double t[7] = {t_gemm, t_bf16, t_copy, intra[0], -intra[1], inter[0], -inter[1]};
  layer.host_group()->allreduce(TensorView(t, DType::f64, {7}), TensorView(t, DType::f64, {7}), {.op = ReduceOp::max})
      .wait();
  DeviceModel dev;
  dev.gemm_flops_f32 = 2.0 * m * M * H / t[0];
  dev.gemm_flops_bf16 = 2.0 * m * M * H / t[1];
  dev.memory_bandwidth = static_cast<double>(copy_bytes) * 2 / t[2];  // read and written
  LinkModel link;
  link.intra = {t[3], -t[4]};
  link.inter = {t[5], -t[6]};
  link.ranks_per_node = per_node;
  return {dev, link};
}

ShufflePlanner::ShufflePlanner(const MoELayer& layer, DeviceModel device, LinkModel link, const AffinityTables& tables,
                               int first, int members, ShuffleCost cost)
    : world_(layer.group()->size()), k_(layer.config().router.k), cost_(cost) {
  const int W = world_, E = tables.experts();
  if (tables.ranks() != W || first < 0 || members < 1 || first + members > W)
    SY_THROW(InvalidArgument, "shuffle planner: tables for ", tables.ranks(), " ranks, a group of ", members,
             " from rank ", first, " on a layer of ", W, " ranks");
  PlannerOptions po;
  po.training = false;
  po.choose_exchange = false;
  po.overlap_degrees = {1};
  const auto model = std::make_shared<const MoECostModel>(layer, device, link, po);
  // Seeds worth a few batches of evidence.
  constexpr double kSeedChoices = 64;
  const std::vector<float>& frequency = tables.token_frequency();
  std::vector<double> share(static_cast<size_t>(W));
  for (int l = 0; l < tables.layers(); ++l) {
    const AffinityLayer& t = tables.layer(l);
    double seen = 0, best = 0;
    for (size_t v = 0; v < frequency.size(); ++v) {
      if (!(frequency[v] > 0)) continue;
      std::fill(share.begin(), share.end(), 0.0);
      for (int e = 0; e < E; ++e)
        share[static_cast<size_t>(t.rank_of_expert[static_cast<size_t>(e)])] += t.confidence[v * E + static_cast<size_t>(e)];
      seen += frequency[v];
      best += frequency[v] * *std::max_element(share.begin() + first, share.begin() + first + members);
    }
    Layer& s = layers_.emplace_back();
    s.choices[0] = s.choices[1] = kSeedChoices * k_;
    s.local[0] = s.choices[0] / W;  // the rows' order knows nothing of their experts
    // A group of one moves nothing: its rows stay where they are.
    s.local[1] = members == 1 ? s.local[0] : s.choices[1] * (seen > 0 ? best / seen : 1.0 / W);
    po.label = "layer " + std::to_string(l) + " token shuffling";
    s.planner = std::make_unique<Planner>(model, po);
    ExecPlan in_place = layer.config().plan, shuffled = in_place;
    in_place.shuffle = false, shuffled.shuffle = true;
    s.planner->add_candidates("in place", {in_place});
    s.planner->add_candidates("speculative MoE", {shuffled});
  }
}

bool ShufflePlanner::decide(int layer, const std::vector<int64_t>& held, double hidden) {
  Layer& s = layers_.at(static_cast<size_t>(layer));
  const int W = world_, members = static_cast<int>(held.size());
  int64_t rows = 0, most = 0;
  for (int64_t h : held) rows += h, most = std::max(most, h);
  // Every rank sends its rows' non-local choices evenly to the others.
  auto traffic = [&](double share) {
    std::vector<double> m(static_cast<size_t>(W) * W, 0.0);
    for (int i = 0; i < W; ++i) {
      const double choices = static_cast<double>(held[static_cast<size_t>(i % members)]) * k_;
      for (int j = 0; j < W; ++j)
        m[static_cast<size_t>(i) * W + j] = i == j ? choices * share : choices * (1 - share) / std::max(1, W - 1);
    }
    return m;
  };
  PlanInputs in;
  in.tokens = most;
  in.peer_rows = traffic(s.local[0] / s.choices[0]);
  in.shuffled_peer_rows = traffic(s.local[1] / s.choices[1]);
  in.shuffle_seconds = std::max(0.0, cost_.seconds(rows) - hidden);
  return s.planner->choose(in).shuffle;
}

void ShufflePlanner::observe(int layer, bool shuffled, double choices, double local) {
  Layer& s = layers_.at(static_cast<size_t>(layer));
  constexpr double kDecay = 0.9;  // per batch: recent batches count most
  s.local[shuffled] = kDecay * s.local[shuffled] + local;
  s.choices[shuffled] = kDecay * s.choices[shuffled] + choices;
}

std::pair<double, double> ShufflePlanner::local_shares(int layer) const {
  const Layer& s = layers_.at(static_cast<size_t>(layer));
  return {s.local[0] / s.choices[0], s.local[1] / s.choices[1]};
}

}  // namespace switchyard
