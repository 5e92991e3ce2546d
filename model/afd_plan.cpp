#include "model/afd_plan.h"

#include <algorithm>
#include <cmath>
#include <sstream>

#include "core/error.h"

namespace switchyard {

DecodeShape DecodeShape::preset(const std::string& name) {
  DecodeShape s;
  s.name = name;
  if (name == "step3") {
    // arXiv 2507.19427 Table 1 and its released config: 61 layers, H 7168, MFA attention (query low rank 2048,
    // 64 heads of 256, one shared K and V head of 256), 48 experts top-3 + 1 shared of intermediate 5120 in
    // every layer but the first four and the last (dense, 18432), vocab 128815.
    s.layers = 61, s.moe_layers = 56, s.hidden = 7168, s.vocab = 128815;
    const double H = s.hidden, heads = 64, head_dim = 256, q_rank = 2048;
    s.attention_params = H * q_rank + q_rank * heads * head_dim + 2 * H * head_dim + heads * head_dim * H;
    s.kv_bytes_per_position = 2 * head_dim;                      // K and V, fp8: 512 B
    s.attention_flops_per_position = 2 * 2 * heads * head_dim;   // q.k and p.v per head: 65,536
    s.experts = 48, s.top_k = 3, s.shared_experts = 1;
    s.expert_params = s.shared_expert_params = 3 * H * 5120;
    s.dense_ffn_params = 3 * H * 18432;
  } else if (name == "deepseek-v3") {
    // DeepSeek-V3 (arXiv 2412.19437): 61 layers, H 7168, MLA (q rank 1536, kv rank 512 + 64 rope, 128 heads of
    // 128 + 64, v 128), decode with absorbed projections over the 576-wide latent cache; 256 experts top-8 + 1
    // shared of intermediate 2048 in every layer but the first three (dense, 18432), vocab 129280.
    s.layers = 61, s.moe_layers = 58, s.hidden = 7168, s.vocab = 129280;
    const double H = s.hidden, heads = 128;
    s.attention_params = H * 1536 + 1536 * heads * 192 + H * 576 + 512 * heads * 256 + heads * 128 * H;
    s.kv_bytes_per_position = 576;
    s.attention_flops_per_position = 2 * heads * (576 + 512);
    s.experts = 256, s.top_k = 8, s.shared_experts = 1;
    s.expert_params = s.shared_expert_params = 3 * H * 2048;
    s.dense_ffn_params = 3 * H * 18432;
  } else {
    SY_THROW(ConfigError, "decode shape '", name, "': expected step3 or deepseek-v3 (or a model folder)");
  }
  return s;
}

std::vector<std::string> decode_shape_presets() { return {"step3", "deepseek-v3"}; }

DecodeShape DecodeShape::of(const ModelConfig& c) {
  DecodeShape s;
  s.name = c.name;
  s.layers = s.moe_layers = c.layers;
  s.hidden = c.d_model, s.vocab = c.vocab_size;
  const double d = c.d_model, hidden = c.hidden;
  s.attention_params = 4 * d * d;
  s.kv_bytes_per_position = 2 * d * 4;
  s.attention_flops_per_position = 4 * d;
  s.experts = c.experts, s.top_k = c.k;
  const double h1 = c.activation == "swiglu" ? 2 * hidden : hidden;
  s.expert_params = d * h1 + h1 + hidden * d + d;
  s.weight_bytes = 4, s.dispatch_bytes = 4, s.combine_bytes = 4;
  return s;
}

double DecodeShape::attention_weight_bytes() const {
  return (layers * attention_params + 2 * vocab * hidden) * weight_bytes;
}

double DecodeShape::expert_weight_bytes() const {
  return (moe_layers * (experts * expert_params + shared_experts * shared_expert_params) +
          (layers - moe_layers) * dense_ffn_params) * weight_bytes;
}

AfdHardware AfdHardware::of(const ClusterModel& cluster, double weight_bytes) {
  AfdHardware h;
  const DeviceModel& d = cluster.device;
  h.flops = weight_bytes <= 1 && d.gemm_flops_fp8 > 0 ? d.gemm_flops_fp8
            : weight_bytes <= 2                      ? d.gemm_flops_bf16
                                                     : d.gemm_flops_f32;
  h.memory_bandwidth = d.memory_bandwidth;
  h.memory_capacity = d.memory_capacity;
  // GPUs sharing a NIC split it (links.inter is the NIC's rate, each way).
  h.nic_bandwidth = cluster.link.inter.bandwidth / std::max(cluster.link.ranks_per_nic, 1);
  h.nic_latency = cluster.link.inter.latency;
  h.intra_bandwidth = cluster.link.intra.bandwidth;
  h.intra_latency = cluster.link.intra.latency;
  h.gpus_per_node = std::max(cluster.link.ranks_per_node, 1);
  return h;
}

namespace {

double roofline(const AfdHardware& hw, double flops, double bytes) {
  return std::max(flops / hw.flops, bytes / hw.memory_bandwidth);
}

// Expected distinct bins touched by k picks spread uniformly over n bins.
double distinct_touched(double n, double k) { return n <= 1 ? 1.0 : n * (1.0 - std::pow(1.0 - 1.0 / n, k)); }

int nodes_of(int gpus, int per_node) { return (gpus + per_node - 1) / per_node; }

}  // namespace

AfdCost afd_cost(const DecodeShape& s, const AfdHardware& hw, int context, const AfdPlan& plan) {
  if (plan.batch < 1 || plan.microbatches < 1 || plan.attention_gpus < 1 || plan.ffn_gpus < 1)
    SY_THROW(InvalidArgument, "afd cost: batch ", plan.batch, ", ", plan.microbatches, " micro-batch(es), ",
             plan.attention_gpus, " attention and ", plan.ffn_gpus, " FFN GPU(s); expected each >= 1");
  if (plan.ffn_tp < 1 || plan.ffn_gpus % plan.ffn_tp != 0)
    SY_THROW(InvalidArgument, "afd cost: FFN tensor parallelism ", plan.ffn_tp, " does not divide the ", plan.ffn_gpus,
             " FFN GPUs");
  AfdCost c;
  const double b = static_cast<double>(plan.batch), m = plan.microbatches, H = s.hidden, ctx = context;
  const double wb = s.weight_bytes, k = s.top_k, shared = s.shared_experts;
  const double dense_layers = s.layers - s.moe_layers;
  // Attention per micro-batch: weights once, each sequence's KV of this layer, projections and scores.
  c.ta = roofline(hw, b * (2 * s.attention_params + ctx * s.attention_flops_per_position),
                  s.attention_params * wb + b * ctx * s.kv_bytes_per_position + 2 * b * H * wb);
  c.head = roofline(hw, 2 * b * H * s.vocab, s.vocab * H * wb);
  const double kv_bytes = m * b * ctx * s.layers * s.kv_bytes_per_position;
  auto link = [&](bool across_nodes) {
    return std::pair{across_nodes ? hw.nic_bandwidth : hw.intra_bandwidth, across_nodes ? hw.nic_latency : hw.intra_latency};
  };
  double te_moe = 0, te_dense = 0, tc_moe = 0, tc_dense = 0, nic_moe = 0, nic_dense = 0;
  if (!plan.colocated) {
    const double A = plan.attention_gpus, F = plan.ffn_gpus;
    // FFN side, the fullest GPU: ceil(E / F) whole experts and their share of the micro-batch's A b k routed
    // rows (tokens balanced over the experts), a replica of the shared experts with 1 / F of their rows; the
    // dense layers' FFN in tensor parallel over a node's FFN GPUs, replicated per FFN node.
    // Dense layers: tensor parallel over each FFN node's GPUs; the smallest node (the last may be partial) binds.
    const double t = plan.ffn_tp, groups = F / t;
    const double g = plan.ffn_gpus - (nodes_of(plan.ffn_gpus, hw.gpus_per_node) - 1) * hw.gpus_per_node;
    const double per_group = std::ceil(s.experts / groups);
    const int ffn_nodes = nodes_of(plan.ffn_gpus, hw.gpus_per_node);
    // More groups than experts: floor(groups / E) replicas of each share its rows (expert data parallelism).
    const double replicas = std::max(1.0, std::floor(groups / s.experts));
    const double routed = A * b * k * per_group / s.experts / replicas, shared_rows = A * b * shared / groups;
    // Every GPU of a group reads all of the group's rows; their partial outputs are reduce-scattered over
    // NVLink (each GPU then returns its slice of the rows to the attention side), not overlapped.
    const double all_reduce = t > 1 ? (t - 1) / t * (routed + shared_rows) * H * s.combine_bytes / hw.intra_bandwidth +
                                          hw.intra_latency
                                    : 0.0;
    te_moe = roofline(hw, 2 * (routed * s.expert_params + shared_rows * s.shared_expert_params) / t,
                      (per_group * s.expert_params + shared * s.shared_expert_params) * wb / t +
                          2 * (routed + shared_rows) * H * wb) + all_reduce;
    const double node_rows = A * b / ffn_nodes;
    te_dense = roofline(hw, 2 * node_rows * s.dense_ffn_params / g, s.dense_ffn_params * wb / g + 2 * node_rows * H * wb);
    // A token goes once to each FFN node its routed experts touch (the shared expert is on every GPU); inside
    // one node (the whole deployment on it) to each FFN GPU they touch, over NVLink.
    const bool across = plan.attention_gpus + plan.ffn_gpus > hw.gpus_per_node;
    // Plain copies: clang before 16 cannot capture structured bindings in the lambdas below.
    const auto link_across = link(across);
    const double bw = link_across.first, lat = link_across.second;
    auto transfer = [&](double destinations, double back_destinations, double messages) {
      const double out_a = b * H * s.dispatch_bytes * destinations, back_a = b * H * s.combine_bytes * back_destinations;
      const double out_f = out_a * A / F, back_f = back_a * A / F;  // an FFN GPU's share of every attention GPU's rows
      const double one_way = lat * messages + std::max(out_a, out_f) / bw;
      const double back = lat * messages + std::max(back_a, back_f) / bw;
      return std::tuple{std::max(one_way, back), one_way + back - std::max(one_way, back),
                        std::max({out_a, back_a, out_f, back_f}) / bw};
    };
    // One node: a token goes to every GPU of each group its experts touch (they all read the group's rows) and
    // comes back once per group (each GPU returns its reduce-scattered slice).
    const double groups_touched = std::max(1.0, distinct_touched(groups, k));
    const double dest_moe = across ? std::max(1.0, distinct_touched(ffn_nodes, k)) : t * groups_touched;
    const double back_moe = across ? dest_moe : groups_touched;
    const auto [tc1, tc1_other, nic1] = transfer(dest_moe, back_moe, dest_moe);
    const auto [tc2, tc2_other, nic2] = transfer(1.0, 1.0, 1.0);
    tc_moe = tc1, nic_moe = nic1, tc_dense = tc2, nic_dense = nic2;
    // A layer: each side busy m times, and micro-batch i's round trip before its next layer.
    auto layer = [&](double te, double tc, double tc_other, double nic) {
      return std::max({m * c.ta, m * te, m * nic, c.ta + te + tc + tc_other});
    };
    const double c_moe = layer(te_moe, tc1, tc1_other, nic1), c_dense = layer(te_dense, tc2, tc2_other, nic2);
    c.layer = c_moe;
    c.te = te_moe, c.tc = tc1, c.nic = nic1;
    c.tpot = s.moe_layers * c_moe + dense_layers * c_dense + (c.ta + te_moe + tc1 + tc1_other - c_moe / m) +
             m * c.head;
    c.attention_memory = s.attention_weight_bytes() + kv_bytes;
    c.ffn_memory = (s.moe_layers * (per_group * s.expert_params + shared * s.shared_expert_params) / t +
                    dense_layers * s.dense_ffn_params / g) * wb;
    c.bubble_attention = 1 - std::min(1.0, m * c.ta / c_moe);
    c.bubble_ffn = 1 - std::min(1.0, m * te_moe / c_moe);
    c.tokens_per_s_per_gpu = A * m * b / c.tpot / (A + F);
  } else {
    // Colocated on N GPUs: every GPU its b sequences' attention, its E / N experts' share of the rows and a copy
    // of the shared experts; the all-to-all over the N GPUs (DeepEP: a token once to each remote node it touches,
    // NVLink inside a node).
    const double N = plan.attention_gpus, per_gpu = std::ceil(s.experts / N);
    // The fullest GPU: ceil(E / N) experts with their share of all N b k routed rows, and its own b shared rows.
    const double replicas = std::max(1.0, std::floor(N / s.experts));  // more GPUs than experts: EP x DP
    const double routed = N * b * k * per_gpu / s.experts / replicas, shared_rows = b * shared;
    const double weights = (per_gpu * s.expert_params + shared * s.shared_expert_params) * wb;
    te_moe = roofline(hw, 2 * (routed * s.expert_params + shared_rows * s.shared_expert_params),
                      weights + 2 * (routed + shared_rows) * H * wb);
    te_dense = roofline(hw, 2 * b * s.dense_ffn_params, s.dense_ffn_params * wb + 2 * b * H * wb);
    const int nodes = nodes_of(plan.attention_gpus, hw.gpus_per_node);
    double remote_nodes = nodes > 1 ? (nodes - 1) * (1.0 - std::pow(1.0 - 1.0 / nodes, k)) : 0.0;
    const auto nic = link(true), nv = link(false);  // plain copies, captured below (clang before 16)
    const double nic_bw = nic.first, nic_lat = nic.second, nv_bw = nv.first, nv_lat = nv.second;
    const double gpn = std::min<double>(N, hw.gpus_per_node);
    const double local = b * H * k * (gpn - 1) / N;  // rows to other GPUs of this node
    auto a2a = [&](double bytes_per_element) {
      const double inter = b * H * bytes_per_element * remote_nodes / nic_bw + (nodes > 1 ? nic_lat : 0);
      const double intra = N > 1 ? local * bytes_per_element / nv_bw + nv_lat : 0;
      return std::max(inter, intra);
    };
    tc_moe = a2a(s.dispatch_bytes) + a2a(s.combine_bytes);  // dispatch then combine
    const double compute_moe = c.ta + te_moe, compute_dense = c.ta + te_dense;
    // m = 1: compute and all-to-all in turn; m = 2: one micro-batch's all-to-all under the other's compute.
    c.layer = m == 1 ? compute_moe + tc_moe : m * std::max(compute_moe, tc_moe);
    const double c_dense = m * compute_dense;
    c.te = te_moe, c.tc = tc_moe, c.nic = tc_moe;
    c.tpot = s.moe_layers * c.layer + dense_layers * c_dense + m * c.head;
    c.attention_memory = c.ffn_memory = s.attention_weight_bytes() + kv_bytes +
                                        (s.moe_layers * (per_gpu * s.expert_params + shared * s.shared_expert_params) +
                                         dense_layers * s.dense_ffn_params) * wb;
    c.bubble_attention = c.bubble_ffn = 1 - std::min(1.0, m * compute_moe / c.layer);
    c.tokens_per_s_per_gpu = m * b / c.tpot;
  }
  c.fits = hw.memory_capacity <= 0 || (c.attention_memory <= hw.memory_capacity && c.ffn_memory <= hw.memory_capacity);
  return c;
}

int min_microbatches(double tc, double tf) {
  if (!(tf > 0)) SY_THROW(InvalidArgument, "min_microbatches: Tf = ", tf, ", expected > 0");
  return static_cast<int>(std::ceil(2.0 * (1.0 + std::max(tc, 0.0) / tf) - 1e-12));
}

int auto_microbatches(double ta, double te, double tc, int64_t most_sequences, int limit) {
  const double tf = std::max(ta, te);
  // MegaScale-Infer's bound holds while the transfer is shorter than the compute (its Tc < Tf); beyond, the
  // step is transfer-bound and every extra micro-batch adds its latencies: two keep one side busy.
  const int m = tf > 0 && tc < tf ? min_microbatches(tc, tf) : 2;
  return static_cast<int>(std::clamp<int64_t>(std::min<int64_t>(m, limit), 1, std::max<int64_t>(most_sequences, 1)));
}

double step3_min_sparsity(double hidden, int layers, double flops, double hbm_bandwidth, double server_network) {
  // 50 ms over 3 stages is 16.6 ms per stage for the network; 3 H bytes per token per layer (fp8 out, bf16
  // back) within 16.6 ms / L, for at least FLOPs / (2 S BW) tokens (fp8 weights: 2 FLOPs per weight byte).
  const double budget = 16.6e-3 * 2.0 / 3.0;
  return hidden * flops * layers / (server_network * hbm_bandwidth * budget);
}

AfdChoice best_batch(const DecodeShape& shape, const AfdHardware& hw, const AfdSearch& search, AfdPlan plan) {
  auto ok = [&](int64_t b) {
    plan.batch = b;
    const AfdCost c = afd_cost(shape, hw, search.context, plan);
    return c.fits && c.tpot <= search.tpot_target;
  };
  AfdChoice out;
  if (!ok(1)) return out;
  int64_t lo = 1, hi = 2;
  while (hi < (int64_t{1} << 24) && ok(hi)) lo = hi, hi *= 2;
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    (ok(mid) ? lo : hi) = mid;
  }
  plan.batch = lo;
  out.plan = plan;
  out.cost = afd_cost(shape, hw, search.context, plan);
  out.found = true;
  return out;
}

namespace {
void check_search(const AfdSearch& s) {
  if (s.gpus < 2) SY_THROW(ConfigError, "afd plan: --gpus = ", s.gpus, ", expected >= 2 (attention and FFN GPUs)");
  if (s.context < 1) SY_THROW(ConfigError, "afd plan: --context = ", s.context, ", expected >= 1");
  if (!(s.tpot_target > 0)) SY_THROW(ConfigError, "afd plan: --tpot_ms = ", s.tpot_target * 1e3, ", expected > 0");
  if (s.max_microbatches < 1)
    SY_THROW(ConfigError, "afd plan: --max_microbatches = ", s.max_microbatches, ", expected >= 1");
}
}  // namespace

std::vector<int> ffn_tp_degrees(int ffn_gpus, const DecodeShape& shape, const AfdHardware& hw) {
  std::vector<int> out;
  for (int t : {1, 2, 4, 8})
    if (t <= hw.gpus_per_node && ffn_gpus % t == 0 && (t > 1 || ffn_gpus <= shape.experts)) out.push_back(t);
  return out;
}

namespace {
bool better(const AfdChoice& a, const AfdChoice& b) {
  return a.found && (!b.found || a.cost.tokens_per_s_per_gpu > b.cost.tokens_per_s_per_gpu);
}
}  // namespace

std::vector<AfdChoice> afd_candidates(const DecodeShape& shape, const AfdHardware& hw, const AfdSearch& search) {
  check_search(search);
  std::vector<AfdChoice> out;
  for (int a = 1; a < search.gpus; ++a)
    for (int m = 1; m <= search.max_microbatches; ++m)
      for (int t : ffn_tp_degrees(search.gpus - a, shape, hw)) {
        AfdChoice c = best_batch(shape, hw, search, {false, a, search.gpus - a, m, 0, t});
        if (c.found) out.push_back(std::move(c));
      }
  return out;
}

AfdChoice best_afd(const DecodeShape& shape, const AfdHardware& hw, const AfdSearch& search) {
  AfdChoice best;
  for (const AfdChoice& c : afd_candidates(shape, hw, search))
    if (better(c, best)) best = c;
  return best;
}

AfdChoice best_colocated(const DecodeShape& shape, const AfdHardware& hw, const AfdSearch& search) {
  check_search(search);
  AfdChoice best;
  for (int m = 1; m <= 2; ++m) {
    const AfdChoice c = best_batch(shape, hw, search, {true, search.gpus, search.gpus, m, 0});
    if (better(c, best)) best = c;
  }
  return best;
}

std::string ffn_parallelism(const AfdPlan& plan, const DecodeShape& shape) {
  const int t = plan.colocated ? 1 : plan.ffn_tp, G = (plan.colocated ? plan.attention_gpus : plan.ffn_gpus) / t;
  const int E = shape.experts;
  std::ostringstream out;
  out << "ep " << std::min(G, E);
  if (t > 1) out << " x tp " << t;
  if (G >= 2 * E) out << " x dp " << G / E << " (" << G / E << " replicas of each expert)";
  else
    out << " (" << E / G << (E % G ? "-" + std::to_string(E / G + 1) : std::string()) << " experts per "
        << (t > 1 ? "group" : "GPU") << ")";
  return out.str();
}

std::string plan_name(const AfdPlan& plan, const DecodeShape& shape, const AfdHardware& hw) {
  std::ostringstream out;
  if (plan.colocated) {
    out << "colocated on " << plan.attention_gpus << " GPUs, " << (plan.microbatches == 1 ? "all-to-all exposed" : "2 micro-batches overlapped");
    return out.str();
  }
  out << plan.attention_gpus << "A" << plan.ffn_gpus << "F";
  const int g = hw.gpus_per_node;
  if (plan.attention_gpus % g == 0 && plan.ffn_gpus % g == 0 && g > 1)
    out << " (" << plan.attention_gpus / g << "A" << plan.ffn_gpus / g << "F in nodes of " << g << ")";
  out << ", m = " << plan.microbatches << ", FFN " << ffn_parallelism(plan, shape);
  return out.str();
}

}  // namespace switchyard
