#include "parallel/planner.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "core/logging.h"

namespace switchyard {

std::string PlanCost::describe() const {
  return detail::make_string(total * 1e3, " ms (all-to-all ", exchange * 1e3, ", experts ", compute * 1e3,
                             ", weights ", weights * 1e3, ", other ", other * 1e3, ")");
}

std::vector<double> PlanInputs::pack(const Layout& layout) const {
  std::vector<double> v(layout.size(), 0.0);
  v[0] = static_cast<double>(tokens);
  v[1] = static_cast<double>(capacity);
  v[2] = measured_compute;
  v[3] = -measured_links;
  v[4] = static_cast<double>(previous_capacity);
  if (layout.peer_values > 0) {
    if (peer_rows.size() != static_cast<size_t>(layout.peer_values))
      SY_THROW(InvalidArgument, "planner inputs: ", peer_rows.size(), " peer-row values, expected ",
               layout.peer_values);
    std::copy(peer_rows.begin(), peer_rows.end(), v.begin() + 5);
  }
  return v;
}

PlanInputs PlanInputs::unpack(const std::vector<double>& v, const Layout& layout) {
  SY_CHECK_EQ(v.size(), layout.size(), "planner inputs");
  PlanInputs in;
  in.tokens = static_cast<int64_t>(v[0]);
  in.capacity = static_cast<int64_t>(v[1]);
  in.measured_compute = v[2];
  in.measured_links = -v[3];
  in.previous_capacity = static_cast<int64_t>(v[4]);
  in.peer_rows.assign(v.begin() + 5, v.end());
  in.peer_rows_summarised = layout.summarised;
  return in;
}

Planner::Planner(std::shared_ptr<const PlanCostModel> model, PlannerOptions options)
    : model_(std::move(model)), options_(std::move(options)) {
  if (!model_) SY_THROW(InvalidArgument, "planner: no cost model");
}

void Planner::add_candidates(const std::string& strategy, const std::vector<ExecPlan>& plans) {
  for (const ExecPlan& p : plans)
    if (std::find(candidates_.begin(), candidates_.end(), p) == candidates_.end()) {
      candidates_.push_back(p);
      strategy_of_.push_back(strategy);
    }
}

PlanCost Planner::predict(const ExecPlan& plan, const PlanInputs& batch) const {
  return model_->predict(plan, batch, corrections_);
}

void Planner::observe(const PlanInputs& agreed) {
  // What the model says the previous batch should have cost, uncorrected, at
  // the capacity it really had.
  PlanInputs previous = last_inputs_;
  if (agreed.previous_capacity > 0) previous.capacity = agreed.previous_capacity;
  const PlanCost p = model_->predict(last_plan_, previous, Corrections{});
  auto update = [&](double& scale, double observed, double predicted) {
    if (!(observed > 0) || !(predicted > 0)) return;
    // The first measurement replaces the calibration's guess; later ones are smoothed.
    const double a = observations_ == 0 ? 1.0 : options_.smoothing;
    scale = std::exp((1 - a) * std::log(scale) + a * std::log(observed / predicted));
  };
  update(corrections_.compute, agreed.measured_compute, p.forward_compute);
  update(corrections_.link, agreed.measured_links, p.link_busy);
  ++observations_;
}

ExecPlan Planner::choose(const PlanInputs& agreed, const std::function<bool(const ExecPlan&)>& runnable,
                         bool forced) {
  if (candidates_.empty()) SY_THROW(InvalidArgument, "planner: no candidate plans (no strategy contributed any)");
  if (pending_) observe(agreed);
  std::vector<PlanCost> costs;
  for (const ExecPlan& p : candidates_) {
    costs.push_back(predict(p, agreed));
    if (runnable && !runnable(p)) costs.back().total = INFINITY;
  }
  size_t best = 0;
  for (size_t i = 1; i < costs.size(); ++i)
    if (costs[i].total < costs[best].total) best = i;
  if (!std::isfinite(costs[best].total))
    SY_THROW(InvalidArgument, "planner: none of the ", candidates_.size(), " candidate plans can run");
  size_t second = best == 0 ? (costs.size() > 1 ? 1 : 0) : 0;
  for (size_t i = 0; i < costs.size(); ++i)
    if (i != best && costs[i].total < costs[second].total) second = i;
  // Hysteresis: keep the current plan unless another is predicted clearly
  // (options.switch_margin) cheaper, so noise in measured times cannot make
  // the decision flap between near-ties.
  if (held_)
    for (size_t i = 0; i < candidates_.size(); ++i)
      if (candidates_[i] == held_plan_ && std::isfinite(costs[i].total) &&
          costs[best].total > costs[i].total * (1.0 - options_.switch_margin))
        best = i;
  const ExecPlan chosen = candidates_[best];
  const bool changed = !forced && (!held_ || !(chosen == held_plan_));
  explanation_ = detail::make_string(
      "planner", options_.label.empty() ? "" : " [" + options_.label + "]", ": (", chosen.describe(), ") from ", strategy_of_[best], " predicted ", costs[best].describe(),
      "; runner-up (", candidates_[second].describe(), ") ", costs[second].total * 1e3, " ms; ", agreed.tokens,
      " tokens/rank, capacity ", agreed.capacity,
      agreed.peer_rows.empty() ? "; traffic uniform" : agreed.peer_rows_summarised ? "; traffic by locality" : "; traffic per peer",
      "; corrections compute x", corrections_.compute, ", links x", corrections_.link);
  if (changed) {  // why, in the log, whenever the decision changes
    ++changes_;
    SY_LOG_INFO("planner", explanation_);
  }
  pending_ = true;
  last_plan_ = chosen;
  last_inputs_ = agreed;
  if (!forced) held_plan_ = chosen, held_ = true;
  return chosen;
}

}  // namespace switchyard
