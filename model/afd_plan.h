// Attention-FFN disaggregation's deployment search and the cost model it
// stands on (MegaScale-Infer's ping-pong pipeline, Step-3's AFD), for models
// and clusters far larger than this machine.
//
// Per layer and micro-batch of b sequences per attention GPU:
//   Ta  attention on an attention GPU at its roofline: the layer's attention
//       weights and the b sequences' KV read from HBM, the projections' and
//       the scores' FLOPs;
//   Te  the experts on the fullest FFN GPU: F / t expert-parallel groups of
//       t GPUs (t = 1: whole experts), a group holding ceil(E / groups)
//       experts and a replica of the shared experts, each split over its t
//       GPUs, with their share of the routed rows (tokens balanced over the
//       experts) and 1 / groups of the shared rows, at the roofline, the
//       weights read once per micro-batch, plus the group's reduce-scatter
//       of partial outputs over NVLink; a dense layer's FFN in tensor parallel
//       over a node's FFN GPUs (that all-reduce not charged);
//   Tc  the transfer each way over a GPU's NIC (A->F the rows in the
//       dispatch dtype, F->A the results in the combine dtype), a token
//       crossing once to each FFN node its experts touch (one node: to each
//       FFN GPU, over NVLink).
// A layer takes C = max(m Ta, m Te, m Tnic, Ta + Tout + Te + Tback) with m
// micro-batches (each side busy m times per layer, and micro-batch i back
// on the attention side before its next layer; Tout and Tback the two
// directions of Tc); a step takes L C + (Ta + Tout + Te + Tback - C / m)
// (MegaScale-Infer's fill term) + m heads.
// With Ta = Te = Tf the pipeline has no bubble once m >= 2 (1 + Tc / Tf).
//
// The colocated baseline (DP attention + EP on every GPU, DeepSeek's decode)
// runs the same blocks on each GPU, the all-to-all exposed, or overlapped by
// two micro-batches (DeepSeek's dual micro-batch overlap). HBM bounds both:
// weights + KV per GPU, so a colocated GPU holding experts too fits fewer
// sequences, which is AFD's main advantage.
#pragma once

#include <string>
#include <vector>

#include "model/model_config.h"
#include "parallel/cost_model.h"

namespace switchyard {

// What a decode step of one token costs, by side, per layer.
struct DecodeShape {
  std::string name;
  int layers = 0;             // decoder layers
  int moe_layers = 0;         // of them MoE; the rest run a dense FFN (on the FFN side)
  double hidden = 0;          // H
  double vocab = 0;
  double attention_params = 0;        // per layer: projections (q, k, v, o, low-rank parts)
  double kv_bytes_per_position = 0;   // per layer and context position
  double attention_flops_per_position = 0;  // per layer, query token and context position (scores + values)
  int experts = 0, top_k = 0, shared_experts = 0;
  double expert_params = 0;           // one routed expert (SwiGLU: 3 H I)
  double shared_expert_params = 0;    // one shared expert
  double dense_ffn_params = 0;        // a dense layer's FFN
  double weight_bytes = 1;            // bytes per weight (fp8 1, bf16 2, f32 4)
  double dispatch_bytes = 1, combine_bytes = 2;  // payload bytes per element, A->F and F->A
  // Published shapes: "step3" (arXiv 2507.19427 Table 1: MFA, 48 experts top-3 + 1 shared) and
  // "deepseek-v3" (MLA, 256 experts top-8 + 1 shared), FP8 weights, KV and dispatch, bf16 combine.
  static DecodeShape preset(const std::string& name);
  // A Switchyard model (config.json): f32 weights, KV and payloads, as the engine runs it.
  static DecodeShape of(const ModelConfig& config);
  double attention_weight_bytes() const;  // all layers, embedding and head
  double expert_weight_bytes() const;     // all layers' routed, shared and dense FFN weights
};
std::vector<std::string> decode_shape_presets();

// One GPU of the cluster (a preset's device and links).
struct AfdHardware {
  double flops = 0;              // achieved GEMM FLOP/s at the weights' dtype
  double memory_bandwidth = 0;   // achieved HBM bytes/s
  double memory_capacity = 0;    // bytes (0: unbounded)
  double nic_bandwidth = 0;      // bytes/s per GPU across nodes, each direction
  double nic_latency = 0;        // seconds per message
  double intra_bandwidth = 0;    // bytes/s per GPU inside a node (NVLink), each direction
  double intra_latency = 0;
  int gpus_per_node = 8;
  // The preset's figures; fp8 weights use its FP8 rate when it has one, else bf16's.
  static AfdHardware of(const ClusterModel& cluster, double weight_bytes);
};

// The deployment: A attention GPUs (DP attention), F FFN GPUs holding whole
// experts (expert parallelism), m micro-batches of b sequences per
// attention GPU. colocated: every GPU both (A = F = the
// GPUs), m = 1 (exposed all-to-all) or 2 (overlapped).
struct AfdPlan {
  bool colocated = false;
  int attention_gpus = 0, ffn_gpus = 0, microbatches = 1;
  int64_t batch = 0;  // sequences per attention GPU per micro-batch
  // FFN GPUs per expert-parallel group, each expert's hidden split over them
  // (tensor parallelism inside a node; divides ffn_gpus). 1: whole experts
  // per GPU, the only form the engine runs today.
  int ffn_tp = 1;
};

struct AfdCost {
  double ta = 0, te = 0, tc = 0;  // per layer and micro-batch: attention, experts, the slower transfer direction
  double nic = 0;                 // per layer and micro-batch: the busier NIC's time (A->F and F->A directions)
  double layer = 0;               // C: a layer's time with the pipeline full
  double head = 0;                // the LM head per micro-batch (attention side)
  double tpot = 0;                // seconds per decode step
  double tokens_per_s_per_gpu = 0;
  double attention_memory = 0, ffn_memory = 0;  // bytes per GPU
  bool fits = true;               // both sides within HBM
  double bubble_attention = 0, bubble_ffn = 0;  // each side's idle share of a layer
};

AfdCost afd_cost(const DecodeShape& shape, const AfdHardware& hw, int context, const AfdPlan& plan);

// MegaScale-Infer's bound: micro-batches that hide the transfer, m >= 2 (1 + tc / tf).
int min_microbatches(double tc, double tf);
// The engine's automatic depth (InferenceEngine::set_microbatches(0)): the
// bound for measured Ta, Te and Tc with Tf = max(Ta, Te) while Tc < Tf (the
// paper's regime), 2 when the transfer is as long as the compute or longer
// (more micro-batches would only add latencies) and before anything was
// measured; at most `most_sequences` (a micro-batch needs one) and `limit`.
int auto_microbatches(double ta, double te, double tc, int64_t most_sequences, int limit = 8);

// Step-3's minimum MoE sparsity (Table 7): the activated share S of the
// experts for which the FFN side, fed over the network, can be compute-bound
// within a 3-stage, 50 ms TPOT pipeline: 3 H bytes per token per layer
// (fp8 dispatch, bf16 combine) over the server's network within 16.6 ms / L,
// and at least FLOPs / (2 S BW) tokens per layer:
// S >= H FLOPs L / (Net BW x 11.1 ms).
double step3_min_sparsity(double hidden, int layers, double flops, double hbm_bandwidth, double server_network);

struct AfdSearch {
  int gpus = 32;            // the deployment's GPUs (AFD: A + F; colocated: all of them)
  int context = 4096;       // positions per sequence
  double tpot_target = 0.05;
  int max_microbatches = 4;
};
struct AfdChoice {
  AfdPlan plan;
  AfdCost cost;
  bool found = false;
};
// The largest batch that meets the TPOT target and fits HBM, for every split
// A:F with F FFN GPUs, every FFN tensor-parallel degree t in 1, 2, 4, 8
// (dividing F, within a node; t = 1 needs F <= E) and every m in
// 1..max_microbatches; the best tokens/s per GPU.
AfdChoice best_afd(const DecodeShape& shape, const AfdHardware& hw, const AfdSearch& search);
// Every plan the search tries that meets the target (each with its largest
// batch), ordered by attention GPUs, then m, then FFN tensor parallelism;
// best_afd is the first with the most tokens/s per GPU.
std::vector<AfdChoice> afd_candidates(const DecodeShape& shape, const AfdHardware& hw, const AfdSearch& search);
// The same for the colocated deployment on all the GPUs (exposed and overlapped all-to-all).
AfdChoice best_colocated(const DecodeShape& shape, const AfdHardware& hw, const AfdSearch& search);
// The largest batch meeting the target for one plan (plan.batch ignored); found = false when none does.
AfdChoice best_batch(const DecodeShape& shape, const AfdHardware& hw, const AfdSearch& search, AfdPlan plan);

// "16A16F (2A2F in nodes of 8), m = 3, ep 16" or "colocated on 32, 2 micro-batches".
std::string plan_name(const AfdPlan& plan, const DecodeShape& shape, const AfdHardware& hw);
// The FFN side's inner parallelism: "ep F (n experts per GPU)", "ep G x tp
// t", or with more groups than experts "... x dp R" (replicas).
std::string ffn_parallelism(const AfdPlan& plan, const DecodeShape& shape);
// The FFN tensor-parallel degrees the search tries for F FFN GPUs.
std::vector<int> ffn_tp_degrees(int ffn_gpus, const DecodeShape& shape, const AfdHardware& hw);

}  // namespace switchyard
