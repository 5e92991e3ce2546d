#include "moe/placement.h"

#include <algorithm>

#include "core/error.h"

namespace switchyard {

ExpertPlacement::ExpertPlacement(int experts, std::vector<int> slots_per_rank, std::vector<int> phy2log)
    : experts_(experts), slots_per_rank_(std::move(slots_per_rank)), phy2log_(std::move(phy2log)) {
  if (experts < 1) SY_THROW(InvalidArgument, "placement: experts = ", experts, ", expected >= 1");
  if (slots_per_rank_.empty()) SY_THROW(InvalidArgument, "placement: no ranks, expected at least one");
  first_slot_.assign(slots_per_rank_.size() + 1, 0);
  for (size_t w = 0; w < slots_per_rank_.size(); ++w) {
    if (slots_per_rank_[w] < 0)
      SY_THROW(InvalidArgument, "placement: rank ", w, " has ", slots_per_rank_[w], " slots, expected >= 0");
    first_slot_[w + 1] = first_slot_[w] + slots_per_rank_[w];
    max_slots_ = std::max(max_slots_, slots_per_rank_[w]);
  }
  if (first_slot_.back() != static_cast<int>(phy2log_.size()))
    SY_THROW(InvalidArgument, "placement: the ranks hold ", first_slot_.back(), " slots but phy2log has ",
             phy2log_.size(), " entries; expected one per physical slot");
  log2phy_.assign(static_cast<size_t>(experts), {});
  for (int p = 0; p < physical_slots(); ++p) {
    const int e = phy2log_[static_cast<size_t>(p)];
    if (e < -1 || e >= experts)
      SY_THROW(InvalidArgument, "placement: physical slot ", p, " holds expert ", e, ", expected 0..", experts - 1,
               " or -1 (unused)");
    if (e < 0) continue;
    log2phy_[static_cast<size_t>(e)].push_back(p);
  }
  permutation_ = physical_slots() == experts;
  for (int e = 0; e < experts; ++e) {
    if (log2phy_[static_cast<size_t>(e)].empty())
      SY_THROW(InvalidArgument, "placement: expert ", e, " has no physical slot; expected every logical expert on "
                                "at least one rank");
    permutation_ = permutation_ && log2phy_[static_cast<size_t>(e)].size() == 1;
  }
  for (int s : slots_per_rank_) permutation_ = permutation_ && s == slots_per_rank_.front();
}

std::vector<int64_t> ExpertPlacement::nearest_shares(int expert, int ranks_per_node) const {
  const auto& slots = replicas_of(expert);
  const int W = ranks(), R = static_cast<int>(slots.size());
  std::vector<double> supply(static_cast<size_t>(W), 1.0 / W), demand(static_cast<size_t>(R), 1.0 / R);
  std::vector<double> flow(static_cast<size_t>(W) * R, 0.0);
  std::vector<int> levels = {1};
  if (ranks_per_node > 1 && ranks_per_node < W) levels.push_back(ranks_per_node);
  levels.push_back(W);
  for (int L : levels)
    for (int first = 0; first < W; first += L) {
      const int last = std::min(W, first + L);
      double s = 0, d = 0;
      for (int i = first; i < last; ++i) s += supply[static_cast<size_t>(i)];
      for (int j = 0; j < R; ++j) {
        const int r = rank_of_slot(slots[static_cast<size_t>(j)]);
        if (r >= first && r < last) d += demand[static_cast<size_t>(j)];
      }
      const double moved = L == W ? s : std::min(s, d);  // the last level takes everything left
      if (moved <= 0 || d <= 0) continue;
      for (int j = 0; j < R; ++j) {
        const int r = rank_of_slot(slots[static_cast<size_t>(j)]);
        if (r < first || r >= last) continue;
        const double taken = demand[static_cast<size_t>(j)] / d;
        for (int i = first; i < last; ++i)
          flow[static_cast<size_t>(i) * R + j] += moved * supply[static_cast<size_t>(i)] / s * taken;
      }
      for (int i = first; i < last; ++i) supply[static_cast<size_t>(i)] *= 1 - moved / s;
      for (int j = 0; j < R; ++j) {
        const int r = rank_of_slot(slots[static_cast<size_t>(j)]);
        if (r >= first && r < last) demand[static_cast<size_t>(j)] *= 1 - moved / d;
      }
    }
  // Per source, quanta by largest remainder (ties to the lower replica), so each row sums exactly.
  std::vector<int64_t> quanta(flow.size(), 0);
  for (int i = 0; i < W; ++i) {
    double total = 0;
    for (int j = 0; j < R; ++j) total += flow[static_cast<size_t>(i) * R + j];
    std::vector<std::pair<double, int>> rest;
    int64_t given = 0;
    for (int j = 0; j < R; ++j) {
      const double exact = flow[static_cast<size_t>(i) * R + j] / total * static_cast<double>(kShareQuanta);
      const auto whole = static_cast<int64_t>(exact);
      quanta[static_cast<size_t>(i) * R + j] = whole;
      given += whole;
      rest.push_back({exact - static_cast<double>(whole), j});
    }
    std::stable_sort(rest.begin(), rest.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
    for (size_t n = 0; given < kShareQuanta; ++n, ++given) ++quanta[static_cast<size_t>(i) * R + rest[n % rest.size()].second];
  }
  return quanta;
}

int ExpertPlacement::rank_of_slot(int physical) const {
  const auto it = std::upper_bound(first_slot_.begin(), first_slot_.end(), physical);
  return static_cast<int>(it - first_slot_.begin()) - 1;
}

ExpertPlacement ExpertPlacement::identity(int experts, int ranks) {
  std::vector<int> positions(static_cast<size_t>(std::max(0, experts)));
  for (int e = 0; e < experts; ++e) positions[static_cast<size_t>(e)] = e;
  return from_positions(ranks, positions);
}

ExpertPlacement ExpertPlacement::from_positions(int ranks, const std::vector<int>& position_of_expert) {
  const int E = static_cast<int>(position_of_expert.size());
  if (ranks < 1 || E % ranks != 0)
    SY_THROW(InvalidArgument, "placement: ", E, " experts on ", ranks, " ranks; expected a multiple of the ranks");
  std::vector<int> phy2log(static_cast<size_t>(E), -1);
  for (int e = 0; e < E; ++e) {
    const int p = position_of_expert[static_cast<size_t>(e)];
    if (p < 0 || p >= E || phy2log[static_cast<size_t>(p)] >= 0)
      SY_THROW(InvalidArgument, "placement of expert ", e, " at position ", p, " is out of range or taken");
    phy2log[static_cast<size_t>(p)] = e;
  }
  return ExpertPlacement(E, std::vector<int>(static_cast<size_t>(ranks), E / ranks), std::move(phy2log));
}

ExpertPlacement ExpertPlacement::round_robin(int experts, int ranks, int slots_per_rank) {
  if (ranks < 1 || slots_per_rank < 0 || static_cast<int64_t>(ranks) * slots_per_rank < experts)
    SY_THROW(InvalidArgument, "placement: round_robin of ", experts, " experts on ", ranks, " ranks x ", slots_per_rank,
             " slots; expected at least one slot per expert");
  std::vector<int> phy2log(static_cast<size_t>(ranks) * static_cast<size_t>(slots_per_rank));
  for (size_t p = 0; p < phy2log.size(); ++p) phy2log[p] = static_cast<int>(p % static_cast<size_t>(experts));
  return ExpertPlacement(experts, std::vector<int>(static_cast<size_t>(ranks), slots_per_rank), std::move(phy2log));
}

ExpertPlacement ExpertPlacement::expert_data_parallel(int experts, int ranks, int ep_size) {
  if (ep_size < 1 || ranks % ep_size != 0)
    SY_THROW(InvalidArgument, "placement: expert_parallel_size = ", ep_size, " does not divide the ", ranks,
             " ranks; expected a divisor");
  if (experts % ep_size != 0)
    SY_THROW(InvalidArgument, "placement: ", experts, " experts over expert groups of ", ep_size,
             " ranks; expected a multiple of expert_parallel_size");
  const int per_rank = experts / ep_size;
  std::vector<int> phy2log;
  for (int r = 0; r < ranks; ++r)
    for (int s = 0; s < per_rank; ++s) phy2log.push_back(r % ep_size * per_rank + s);
  return ExpertPlacement(experts, std::vector<int>(static_cast<size_t>(ranks), per_rank), std::move(phy2log));
}

ExpertPlacement ExpertPlacement::from_replicas(int experts, int ranks, int slots_per_rank,
                                               const std::vector<std::vector<int>>& slots_of_expert) {
  if (ranks < 1 || slots_per_rank < 0)
    SY_THROW(InvalidArgument, "placement: ", ranks, " ranks x ", slots_per_rank, " slots; expected >= 1 x >= 0");
  if (static_cast<int>(slots_of_expert.size()) != experts)
    SY_THROW(InvalidArgument, "placement: ", slots_of_expert.size(), " experts listed, expected ", experts);
  std::vector<int> phy2log(static_cast<size_t>(ranks) * static_cast<size_t>(slots_per_rank), -1);
  for (int e = 0; e < experts; ++e)
    for (int p : slots_of_expert[static_cast<size_t>(e)]) {
      if (p < 0 || p >= static_cast<int>(phy2log.size()))
        SY_THROW(InvalidArgument, "placement: expert ", e, " at physical slot ", p, ", expected 0..",
                 phy2log.size() - 1, " (", ranks, " ranks x ", slots_per_rank, " slots)");
      if (phy2log[static_cast<size_t>(p)] >= 0)
        SY_THROW(InvalidArgument, "placement: physical slot ", p, " given to experts ", phy2log[static_cast<size_t>(p)],
                 " and ", e, "; expected one expert per slot");
      phy2log[static_cast<size_t>(p)] = e;
    }
  return ExpertPlacement(experts, std::vector<int>(static_cast<size_t>(ranks), slots_per_rank), std::move(phy2log));
}

std::string ExpertPlacement::describe() const {
  int replicated = 0, extra = 0, empty_ranks = 0, unused = 0;
  for (const auto& r : log2phy_) {
    replicated += r.size() > 1;
    extra += static_cast<int>(r.size()) - 1;
  }
  for (int s : slots_per_rank_) empty_ranks += s == 0;
  for (int e : phy2log_) unused += e < 0;
  return std::to_string(experts_) + " experts on " + std::to_string(physical_slots()) + " slots of " +
         std::to_string(ranks()) + " ranks (" + std::to_string(replicated) + " replicated, " + std::to_string(extra) +
         " extra replicas, " + std::to_string(empty_ranks) + " ranks without experts, " + std::to_string(unused) +
         " unused slots)";
}

}  // namespace switchyard
