// The MoE layer's side of the planner (parallel/planner.h): its cost model
// (all-to-alls priced per peer from the batch's routed rows, expert GEMMs at
// their roofline, weight gathers, streamed bytes), the Tutel strategy's
// candidate plans, and MoEPlanner, which feeds the generic planner from the
// layer (its inputs ride on the layer's capacity all-reduce) and measures
// the device and links it is seeded with (calibrate: on the group the layer
// runs on, in virtual time when the layer is emulated).
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "moe/affinity.h"
#include "moe/moe_layer.h"
#include "parallel/cost_model.h"
#include "parallel/planner.h"

namespace switchyard {

// What a plan costs on a layer's geometry, for a device and link model.
class MoECostModel final : public PlanCostModel {
 public:
  MoECostModel(const MoELayer& layer, DeviceModel device, LinkModel link, PlannerOptions options);
  PlanCost predict(const ExecPlan& plan, const PlanInputs& batch, const Corrections& corrections) const override;
  const LinkModel& link() const { return link_; }
  // The layer's exchange as it is now (it changes when migrate() moves the
  // experts onto or off replica domains).
  void follow_exchange(const MoELayer& layer);

 private:
  // Bytes each rank sends each rank in one all-to-all of this plan (world x
  // world, sender-major), from the batch's per-peer rows or uniform.
  std::vector<double> traffic(const ExecPlan& plan, const PlanInputs& batch, double rows_per_rank) const;
  // One all-to-all moving `bytes` (world x world), the slowest rank's
  // seconds; `copies` gets 2DH's local re-layout time.
  double a2a_seconds(const ExecPlan& plan, const std::vector<double>& bytes, double link_scale,
                     double* copies = nullptr) const;
  double collective_seconds(int group, bool spans_nodes, double full_bytes, double link_scale) const;
  // Whether ranks i and j both take part in the layer's all-to-alls (one
  // replica domain, or the whole group).
  bool same_exchange(int i, int j) const { return i / exchange_ranks_ == j / exchange_ranks_; }
  int world_, exchange_ranks_, experts_, shards_, local_experts_, node_size_, k_;
  int64_t model_dim_, hidden_;
  bool gated_, bf16_, hierarchical_;
  DeviceModel device_;
  LinkModel link_;
  PlannerOptions options_;
};

// Tutel's adaptive parallelism: every sharding degree the layout allows, the
// pipelining degrees asked for, flat and (with node groups) 2DH, padded and
// dropless exchange (or the layer's when not chosen).
std::vector<ExecPlan> tutel_plans(const MoELayer& layer, const PlannerOptions& options);

class MoEPlanner : public PlanChooser {
 public:
  MoEPlanner(const MoELayer& layer, DeviceModel device, LinkModel link, PlannerOptions options = {});

  // A device and link model measured on the layer's group (collective): a
  // GEMM of the layer's expert shape and a copy through the layer's ops, and
  // all-to-alls of two sizes inside a node and across nodes for each link
  // class's alpha and beta. Virtual seconds when the layer has a device model
  // (the emulated cluster is measured like real hardware), else wall time;
  // the slowest rank's numbers, so every rank gets the same model.
  static std::pair<DeviceModel, LinkModel> calibrate(MoELayer& layer, int ranks_per_node);

  // The plan for the next batch, with `tokens` on this rank (collective: one
  // small all-reduce; traffic assumed uniform). layer.forward(x, routing,
  // planner) decides without that extra collective, from the routed rows.
  ExecPlan next(MoELayer& layer, int64_t tokens);
  // PlanChooser: inputs ride on the layer's capacity all-reduce.
  std::vector<double> local_inputs(MoELayer& layer, int64_t tokens, const Routing* routing) override;
  ExecPlan choose(MoELayer& layer, const std::vector<double>& agreed, int64_t capacity) override;
  // Cost of a plan for a batch whose largest rank has `tokens` tokens and
  // whose expert capacity is `capacity` rows, traffic uniform.
  PlanCost predict(const ExecPlan& plan, int64_t tokens, int64_t capacity) const;
  PlanCost predict(const ExecPlan& plan, const PlanInputs& batch) const { return planner_.predict(plan, batch); }
  const std::vector<ExecPlan>& candidates() const { return planner_.candidates(); }
  const std::string& explanation() const { return planner_.explanation(); }
  double compute_correction() const { return planner_.corrections().compute; }
  double link_correction() const { return planner_.corrections().link; }
  int decisions_changed() const { return planner_.decisions_changed(); }
  // The inputs of the last decision (agreed), for explaining it.
  const PlanInputs& last_inputs() const { return last_inputs_; }
  // Until cleared, every decision is this plan (the inputs are agreed and the
  // corrections learned as usual): a probe that times each candidate.
  void force(std::optional<ExecPlan> plan) { forced_ = std::move(plan); }


 private:
  int64_t capacity_for(int64_t tokens) const;
  PlanInputs::Layout layout(bool with_peer_rows) const;
  int world_, k_, experts_;
  RouterConfig router_;
  std::shared_ptr<MoECostModel> model_;
  Planner planner_;
  PlannerOptions options_;
  int64_t last_tokens_ = 0, last_capacity_ = 0;
  MoEPhaseTimes last_phases_, snapshot_phases_;
  MoELayer::CommBusy last_busy_, snapshot_busy_;
  bool with_peer_rows_ = false;  // what the last local_inputs packed
  PlanInputs last_inputs_;
  std::optional<ExecPlan> forced_;
};

// Speculative token shuffling's per-batch switch (ExecPlan::shuffle), per
// layer: a Planner over the layer's plan in place and shuffled. It prices
// the all-to-all's per-peer rows at each layout's local share of choices
// (learned from what earlier batches reached, observe(); seeded from the
// tables: 1/W in place, shuffled each token's best rank of the group, room
// or not), the shuffled plan paying the host cost, and logs its decisions
// when they change. It does not look at each row's own prediction first:
// that is the cost it decides whether to pay. Ranks that feed it the same
// rows and counts decide alike.
class ShufflePlanner {
 public:
  // layer: the MoE layers' geometry and plan; tables: the seeds, under the
  // placement the layers hold; the `members` ranks from `first` are the group
  // a shuffle moves rows within (tensor-parallel attention's); cost: the
  // host's, agreed over the ranks that decide.
  ShufflePlanner(const MoELayer& layer, DeviceModel device, LinkModel link, const AffinityTables& tables, int first,
                 int members, ShuffleCost cost);
  // Whether `layer` shuffles a batch whose group members hold `held` rows
  // each in place (every other group of the world taken alike); `hidden`:
  // seconds of the host cost that overlap device work (the attention heads
  // on a GPU), not paid.
  bool decide(int layer, const std::vector<int64_t>& held, double hidden = 0);
  // What a batch of `layer` reached: its choices and the local ones.
  void observe(int layer, bool shuffled, double choices, double local);
  std::pair<double, double> local_shares(int layer) const;  // {in place, shuffled}
  const std::string& explanation(int layer) const { return layers_.at(static_cast<size_t>(layer)).planner->explanation(); }
  const ShuffleCost& cost() const { return cost_; }

 private:
  struct Layer {
    double local[2] = {0, 0}, choices[2] = {0, 0};  // in place, shuffled; decayed per batch
    std::unique_ptr<Planner> planner;
  };
  int world_, k_;
  ShuffleCost cost_;
  std::vector<Layer> layers_;
};

}  // namespace switchyard
