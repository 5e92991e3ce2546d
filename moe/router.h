// The router: gate logits -> for each token k experts and their weights, the
// balancing losses, and the expert capacity of the batch; and the gate's
// backward, down to the logits.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "core/rng.h"
#include "core/tensor.h"

namespace switchyard {

enum class GateKind : uint8_t {
  softmax,       // top-k over softmax probabilities (GShard, Tutel)
  sigmoid_bias,  // sigmoid scores, selection by scores + per-expert bias (DeepSeek-V3, aux-loss-free balancing)
};

// How a capacity factor becomes slots per expert (T tokens, E experts, k choices).
enum class CapacityRounding : uint8_t {
  switchyard,  // k * ceil(cf * T / E)
  tutel,       // k * floor(cf * ceil(T / E)), as Tutel computes it (its flags then drop the same tokens)
};

// The load-balancing loss E * sum_e f_e * P_e, P_e the mean over tokens of
// expert e's score normalised per token; what f_e counts:
enum class BalanceLoss : uint8_t {
  all_choices,  // f_e = share of all T*k choices that went to e
  top1,         // f_e = share of the T tokens whose first choice is e (GShard's form, as Tutel computes it)
};

struct RouterConfig {
  int experts = 0;
  int k = 2;
  GateKind gate = GateKind::softmax;
  // The k weights of a token sum to 1. With k = 1 every weight becomes 1 and
  // the gate gets no gradient from the task loss (a warning says so once;
  // Tutel normalises only when k > 1).
  bool renormalize = false;
  // Training noise: N(0, noise_std) added to the logits before the gate (needs an Rng).
  double noise_std = 0.0;
  // Grouped top-k (DeepSeek-V3): experts in `groups` consecutive groups, tokens
  // choose only among the `topk_groups` best groups. groups = 1: plain top-k.
  int groups = 1;
  int topk_groups = 1;
  // > 0: C = k * ceil(cf * T / E); 0: dropless (C = the largest expert load);
  // < 0: the largest load, capped at k * ceil(|cf| * T / E). Rounded up to the
  // alignment, and the maximum over the expert group, so ranks with different
  // token counts agree.
  double capacity_factor = 1.0;
  CapacityRounding capacity_rounding = CapacityRounding::switchyard;
  int capacity_alignment = 1;
  BalanceLoss balance_loss = BalanceLoss::all_choices;
  // Batch-prioritised routing (V-MoE): capacity slots go to tokens in order of
  // their best gate weight rather than their position, so drops hit the least
  // confident tokens.
  bool batch_prioritized = false;

  // Throws InvalidArgument naming the field, its value and what was expected.
  void validate() const;
};

struct Routing {
  Tensor experts;  // [T, k] i32, best first
  Tensor weights;  // [T, k] f32
  Tensor scores;   // [T, E] f32: softmax probabilities or sigmoid scores
  std::vector<int64_t> expert_load;  // this rank's assignments per expert
  std::vector<double> balance_fraction;  // f_e of the balance loss (RouterConfig::balance_loss); no gradient
  // The balancing loss E * sum_e f_e * P_e (f_e: balance_fraction, as
  // RouterConfig::balance_loss counts it; P_e the mean over tokens of e's
  // score normalised per token). 0 for T = 0.
  double balance_loss = 0.0;
  // Router z-loss (ST-MoE): mean over tokens of logsumexp(logits)^2.
  double z_loss = 0.0;
};

// logits: [T, E] f32 on the host. bias: [E] f32 for sigmoid_bias (may be empty).
Routing route(const RouterConfig& config, const TensorView& logits, const TensorView* bias = nullptr,
              Rng* noise = nullptr);

// A routing given rather than computed (a recorded trace replayed): experts
// [T, k] i32 (logical ids, best first) and their weights [T, k] f32; the
// scores hold the weights at the chosen experts, the losses are 0. Throws
// naming a bad id or a weight that is not finite.
Routing replayed_routing(const RouterConfig& config, const TensorView& experts, const TensorView& weights);

// k * (cf * T / E) rounded as config.capacity_rounding says (cf: |capacity_factor|).
int64_t capacity_by_factor(const RouterConfig& config, int64_t tokens);
CapacityRounding parse_capacity_rounding(const std::string& name, const std::string& field);
BalanceLoss parse_balance_loss(const std::string& name, const std::string& field);

// The batch's expert capacity C (see RouterConfig::capacity_factor). With an
// expert group it is the maximum over the group (a collective call).
int64_t expert_capacity(const RouterConfig& config, int64_t tokens, const Routing& routing,
                        Communicator* expert_group = nullptr);

// d(loss)/d(logits) [T, E] for the routing made from `logits` [T, E], given
// d(loss)/d(weight) of every choice [T * k] (0 for dropped choices), plus
// balance_coef * balance_loss + z_coef * z_loss.
Tensor gate_backward(const RouterConfig& config, const Routing& routing, const TensorView& logits,
                     const std::vector<double>& d_weight_of_choice, double balance_coef, double z_coef);

}  // namespace switchyard
