// Planner: picks the ExecPlan of each batch for a MoE layer from a cost model
// of the plan's phases (all-to-all over link classes, expert GEMMs, weight
// gathers, streamed bytes), seeded by a calibration (measured here, or an
// emulated cluster's preset) and refined online from what the previous batch
// measured: compute and link corrections from the layer's phase and
// communication times. Every input of the decision is agreed across the group
// (token counts and measurements all-reduced), so every rank picks the same
// plan; MoEConfig::check_plan verifies that with a hash.
#pragma once

#include <string>
#include <vector>

#include "moe/moe_layer.h"
#include "parallel/cost_model.h"

namespace switchyard {

struct PlannerOptions {
  std::vector<int> overlap_degrees{1, 2, 4};
  bool choose_exchange = true;  // padded vs dropless (both result-neutral); else the layer's configured one
  bool training = true;         // forward + backward per batch
  bool input_grad = false;      // backward also returns dx (one more GEMM and all-to-all)
  double smoothing = 0.3;       // weight of a new measurement in the corrections (log-space)
  double switch_margin = 0.03;  // change plans only for a predicted gain above this fraction
};

// Predicted seconds of one batch under a plan, by part (before overlap for
// the parts; total accounts for the pipeline).
struct PlanCost {
  double total = 0;
  double exchange = 0;  // all-to-all busy time (both directions, forward and backward)
  double compute = 0;   // expert GEMMs and their streamed bytes
  double weights = 0;   // working-weight gathers and gradient scatters
  double other = 0;     // gate, encode, decode, optimizer
  double link_busy = 0; // the part spent on links (what the communicators' busy times measure)
  std::string describe() const;
};

class Planner : public PlanChooser {
 public:
  Planner(const MoELayer& layer, DeviceModel device, LinkModel link, PlannerOptions options = {});

  // A device and link model measured on the layer's group (collective): a
  // GEMM of the layer's expert shape, and all-to-alls of two sizes for alpha
  // and beta. Slowest rank's numbers, so every rank gets the same model.
  static std::pair<DeviceModel, LinkModel> calibrate(MoELayer& layer, int ranks_per_node);

  // The plan for the next batch, with `tokens` on this rank (collective: one
  // small all-reduce). Folds in the previous batch's measurements first.
  // layer.forward(x, routing, planner) decides without that extra collective.
  ExecPlan next(MoELayer& layer, int64_t tokens);
  // PlanChooser: inputs ride on the layer's capacity all-reduce.
  std::vector<double> local_inputs(MoELayer& layer, int64_t tokens) override;
  ExecPlan choose(MoELayer& layer, const std::vector<double>& agreed, int64_t capacity) override;
  // Cost of a plan for a batch whose largest rank has `tokens` tokens and
  // whose expert capacity is `capacity` rows.
  PlanCost predict(const ExecPlan& plan, int64_t tokens, int64_t capacity) const;
  std::vector<ExecPlan> candidates() const { return candidates_; }
  // Why the last decision was made: the chosen plan, the runner-up, the
  // corrections in force.
  const std::string& explanation() const { return explanation_; }
  double compute_correction() const { return compute_scale_; }
  double link_correction() const { return link_scale_; }
  int decisions_changed() const { return changes_; }

 private:
  struct Shape;
  // One all-to-all of `bytes` per rank; `copies` gets 2DH's local re-layout time.
  double a2a_seconds(const ExecPlan& plan, double bytes, double* copies = nullptr) const;
  double collective_seconds(int group, bool spans_nodes, double full_bytes) const;
  int64_t capacity_for(int64_t tokens) const;
  // measured: the experts' and the links' busy seconds; capacity: the group's (max) of that batch.
  void observe(MoELayer& layer, const double measured[2], int64_t capacity);

  // Layer geometry.
  int world_, experts_, shards_, local_experts_, node_size_, k_;
  int64_t model_dim_, hidden_;
  bool gated_, bf16_, hierarchical_;
  RouterConfig router_;  // the layer's, for its capacity rule
  DeviceModel device_;
  LinkModel link_;
  PlannerOptions options_;
  std::vector<ExecPlan> candidates_;
  double compute_scale_ = 1.0, link_scale_ = 1.0;
  // The previous batch, for observe().
  bool pending_ = false;
  ExecPlan last_plan_;
  int64_t last_tokens_ = 0, last_capacity_ = 0;
  MoEPhaseTimes last_phases_, snapshot_phases_;
  MoELayer::CommBusy last_busy_, snapshot_busy_;
  std::string explanation_;
  int changes_ = 0;
  int observations_ = 0;
};

}  // namespace switchyard
