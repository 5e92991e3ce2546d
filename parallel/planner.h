// Planner: picks each batch's ExecPlan among the candidates the strategies
// contribute, by the predictions of a cost model (PlanCostModel), refined
// online: a compute and a link correction learned from what earlier batches
// measured against what the model predicted for them. Every input of a
// decision is agreed across the group (PlanInputs travels packed on one
// max-all-reduce, riding on one the caller makes anyway), so every rank picks
// the same plan. The MoE layer's cost model and candidates are in
// moe/planner.h; this part knows nothing of the layer.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "parallel/exec_plan.h"

namespace switchyard {

struct PlannerOptions {
  std::vector<int> overlap_degrees{1, 2, 4};
  bool choose_exchange = true;  // padded vs dropless (both result-neutral); else the layer's configured one
  bool training = true;         // forward + backward per batch
  bool input_grad = false;      // backward also returns dx (one more GEMM and all-to-all)
  double smoothing = 0.3;       // weight of a new measurement in the corrections (log-space)
  double switch_margin = 0.03;  // change plans only for a predicted gain above this fraction
  // Largest group whose per-peer rows ride on the agreement (W x W values);
  // above it the rows go as a locality summary (to self, inside the node, across nodes).
  int peer_rows_up_to = 64;
  // Names the decisions in the log and the explanation ("planner [layer 3]: ..."); empty: none.
  std::string label;
};

// Predicted seconds of one batch under a plan, by part (before overlap for
// the parts; total accounts for the pipeline).
struct PlanCost {
  double total = 0;
  double exchange = 0;         // all-to-all busy time (both directions, forward and backward)
  double compute = 0;          // expert GEMMs and their streamed bytes
  double forward_compute = 0;  // the forward part of compute (what an experts phase measures)
  double weights = 0;          // working-weight gathers and gradient scatters
  double other = 0;            // gate, encode, decode, optimizer
  double link_busy = 0;        // the part spent on links (what the communicators' busy times measure)
  std::string describe() const;
};

// What one batch's decision is made from, the same on every rank.
struct PlanInputs {
  int64_t tokens = 0;    // the largest rank's tokens
  int64_t capacity = 0;  // the batch's expert capacity (rows per expert and source)
  // Rows each rank sends to each rank under expert parallelism: world x world,
  // sender-major; or, for larger groups, each rank's rows to itself, to its
  // node and across nodes (world x 3). Empty: traffic assumed uniform.
  std::vector<double> peer_rows;
  bool peer_rows_summarised = false;  // the world x 3 form
  // Speculative token shuffling (ExecPlan::shuffle): the rows each rank would
  // send each rank with the batch's rows moved to their predicted ranks
  // (world x world; empty: as peer_rows), and the host seconds the move
  // costs (predicting every row's rank, assigning the chunks). Not carried by
  // pack(): the inference engine's members compute them alike from the rows
  // they share.
  std::vector<double> shuffled_peer_rows;
  double shuffle_seconds = 0;
  // Measured over the previous batch: expert compute (the slowest rank's
  // seconds), link busy time (the least of the ranks':
  // the last to join an exchange waits least, the others' busy time includes
  // waiting for it); and that batch's capacity.
  double measured_compute = 0, measured_links = 0;
  int64_t previous_capacity = 0;

  // The max-all-reduce form (each field a max, measured_links packed negated
  // so its max is the minimum; each rank fills its own peer_rows entries,
  // zeros elsewhere). `layout` says how many values.
  struct Layout {
    int world = 1;
    int peer_values = 0;      // world * world, world * 3, or 0
    bool summarised = false;  // the world * 3 form
    size_t size() const { return 5 + static_cast<size_t>(peer_values); }
  };
  std::vector<double> pack(const Layout& layout) const;
  static PlanInputs unpack(const std::vector<double>& values, const Layout& layout);
};

// The corrections a planner has learned: multiply the model's compute and link times.
struct Corrections {
  double compute = 1.0;
  double link = 1.0;
};

class PlanCostModel {
 public:
  virtual ~PlanCostModel() = default;
  virtual PlanCost predict(const ExecPlan& plan, const PlanInputs& batch, const Corrections& corrections) const = 0;
};

class Planner {
 public:
  Planner(std::shared_ptr<const PlanCostModel> model, PlannerOptions options = {});

  // A strategy's candidate plans (duplicates of earlier ones are dropped).
  void add_candidates(const std::string& strategy, const std::vector<ExecPlan>& plans);
  const std::vector<ExecPlan>& candidates() const { return candidates_; }

  // The plan for a batch (agreed inputs): the cheapest candidate `runnable`
  // accepts, unless the current plan is within the switch margin of it. The
  // previous decision's measurements (in `agreed`) are folded in first.
  // forced: `runnable` admits one plan the caller imposes (a probe): it is
  // measured and learned from like a choice, but the hysteresis keeps
  // comparing against the last plan chosen freely, and it is not counted or
  // logged as a decision.
  ExecPlan choose(const PlanInputs& agreed, const std::function<bool(const ExecPlan&)>& runnable = {},
                  bool forced = false);
  // The cost model's prediction with the corrections learned so far.
  PlanCost predict(const ExecPlan& plan, const PlanInputs& batch) const;
  const Corrections& corrections() const { return corrections_; }
  // Why the last decision was made: the chosen plan, the runner-up, the corrections.
  const std::string& explanation() const { return explanation_; }
  int decisions_changed() const { return changes_; }
  bool has_decided() const { return pending_; }

 private:
  void observe(const PlanInputs& agreed);
  std::shared_ptr<const PlanCostModel> model_;
  PlannerOptions options_;
  std::vector<ExecPlan> candidates_;
  std::vector<std::string> strategy_of_;
  Corrections corrections_;
  bool pending_ = false;
  ExecPlan last_plan_;   // what ran last (observe() attributes the measurements to it)
  ExecPlan held_plan_;   // the last free choice (the hysteresis keeps it)
  bool held_ = false;
  PlanInputs last_inputs_;
  std::string explanation_;
  int changes_ = 0;
  int observations_ = 0;
};

}  // namespace switchyard
