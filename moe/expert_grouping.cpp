#include "moe/expert_grouping.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>

#include "core/error.h"

namespace switchyard {
namespace {

struct Problem {
  int V, E, W;
  std::vector<double> per_occurrence;  // [V, E]: the share of token t's choices that go to expert e
  std::vector<double> frequency;       // [V]: token t's choices
  double total_choices = 0, capacity = 0;
};

Problem make_problem(const std::vector<double>& counts, int V, int E, int W) {
  if (W < 1 || E % W != 0)
    SY_THROW(InvalidArgument, "expert grouping: ", E, " experts on ", W, " ranks, expected a rank count dividing them");
  if (counts.size() != static_cast<size_t>(V) * static_cast<size_t>(E))
    SY_THROW(InvalidArgument, "expert grouping: ", counts.size(), " counts, expected vocab x experts = ", V, " x ", E);
  Problem p{V, E, W, std::vector<double>(counts.size(), 0.0), std::vector<double>(static_cast<size_t>(V), 0.0)};
  // Loads are counted in choices (k per occurrence), so a rank's capacity is 1 / W of all choices
  // and each id's row is normalised over the experts.
  for (int t = 0; t < V; ++t) {
    double s = 0;
    for (int e = 0; e < E; ++e) {
      const double c = counts[static_cast<size_t>(t) * E + e];
      if (!(c >= 0) || !std::isfinite(c)) SY_THROW(InvalidArgument, "expert grouping: count [", t, ", ", e, "] = ", c, ", expected >= 0");
      s += c;
    }
    p.frequency[static_cast<size_t>(t)] = s;
    for (int e = 0; e < E; ++e)
      p.per_occurrence[static_cast<size_t>(t) * E + e] = s > 0 ? counts[static_cast<size_t>(t) * E + e] / s : 0.0;
    p.total_choices += s;
  }
  p.capacity = p.total_choices / W;
  return p;
}

// The token step: split each id's load over the ranks, at most capacity per
// rank, the ids with the most to lose from a second choice first. Returns
// the load matrix [V, W] and the local choices it reaches.
double split_tokens(const Problem& p, const std::vector<int>& rank_of_expert, std::vector<double>& load) {
  const int V = p.V, E = p.E, W = p.W;
  std::vector<double> affinity(static_cast<size_t>(V) * W, 0.0);  // local share of an occurrence on each rank
  for (int t = 0; t < V; ++t)
    for (int e = 0; e < E; ++e) affinity[static_cast<size_t>(t) * W + rank_of_expert[static_cast<size_t>(e)]] += p.per_occurrence[static_cast<size_t>(t) * E + e];
  std::vector<std::vector<int>> order(static_cast<size_t>(V));
  std::vector<double> regret(static_cast<size_t>(V), 0.0);
  for (int t = 0; t < V; ++t) {
    auto& o = order[static_cast<size_t>(t)];
    o.resize(static_cast<size_t>(W));
    std::iota(o.begin(), o.end(), 0);
    const double* a = &affinity[static_cast<size_t>(t) * W];
    std::stable_sort(o.begin(), o.end(), [&](int x, int y) { return a[x] > a[y]; });
    regret[static_cast<size_t>(t)] = W > 1 ? a[o[0]] - a[o[1]] : 0.0;
  }
  std::vector<int> ids(static_cast<size_t>(V));
  std::iota(ids.begin(), ids.end(), 0);
  std::stable_sort(ids.begin(), ids.end(), [&](int x, int y) { return regret[static_cast<size_t>(x)] > regret[static_cast<size_t>(y)]; });
  std::vector<double> room(static_cast<size_t>(W), p.capacity);
  load.assign(static_cast<size_t>(V) * W, 0.0);
  double local = 0;
  for (int t : ids) {
    double left = p.frequency[static_cast<size_t>(t)];
    for (int w : order[static_cast<size_t>(t)]) {
      if (left <= 0) break;
      const double take = std::min(left, room[static_cast<size_t>(w)]);
      if (take <= 0) continue;
      load[static_cast<size_t>(t) * W + w] += take;
      room[static_cast<size_t>(w)] -= take;
      left -= take;
      local += take * affinity[static_cast<size_t>(t) * W + w];
    }
    if (left > 0) {  // rounding left a sliver: the roomiest rank takes it
      const int w = static_cast<int>(std::max_element(room.begin(), room.end()) - room.begin());
      load[static_cast<size_t>(t) * W + w] += left;
      room[static_cast<size_t>(w)] -= left;
      local += left * affinity[static_cast<size_t>(t) * W + w];
    }
  }
  return local;
}

// Choices each expert receives (independent of the token split).
std::vector<double> expert_choices(const Problem& p) {
  std::vector<double> c(static_cast<size_t>(p.E), 0.0);
  for (int t = 0; t < p.V; ++t)
    for (int e = 0; e < p.E; ++e)
      c[static_cast<size_t>(e)] += p.frequency[static_cast<size_t>(t)] * p.per_occurrence[static_cast<size_t>(t) * p.E + e];
  return c;
}

double imbalance(const std::vector<double>& choices, const std::vector<int>& rank, int W) {
  std::vector<double> on(static_cast<size_t>(W), 0.0);
  double total = 0;
  for (size_t e = 0; e < choices.size(); ++e) on[static_cast<size_t>(rank[e])] += choices[e], total += choices[e];
  return total > 0 ? *std::max_element(on.begin(), on.end()) / (total / W) : 1.0;
}

// The expert step: each expert's local choices on each rank under the token split; experts to slots exactly
// for locality, then swaps of two experts on different ranks while locality less the balance penalty gains.
std::vector<int> place_experts(const Problem& p, const std::vector<double>& load, const std::vector<double>& choices,
                               double balance_weight) {
  const int V = p.V, E = p.E, W = p.W, per_rank = E / W;
  std::vector<double> on_rank(static_cast<size_t>(E) * W, 0.0);
  for (int t = 0; t < V; ++t)
    for (int w = 0; w < W; ++w) {
      const double n = load[static_cast<size_t>(t) * W + w];
      if (n == 0) continue;
      for (int e = 0; e < E; ++e) on_rank[static_cast<size_t>(e) * W + w] += n * p.per_occurrence[static_cast<size_t>(t) * E + e];
    }
  std::vector<double> value(static_cast<size_t>(E) * E);
  for (int e = 0; e < E; ++e)
    for (int s = 0; s < E; ++s) value[static_cast<size_t>(e) * E + s] = on_rank[static_cast<size_t>(e) * W + s / per_rank];
  const std::vector<int> slot = max_weight_assignment(value, E);
  std::vector<int> rank(static_cast<size_t>(E));
  for (int e = 0; e < E; ++e) rank[static_cast<size_t>(e)] = slot[static_cast<size_t>(e)] / per_rank;
  if (balance_weight <= 0 || W == 1) return rank;
  // Swaps priced incrementally: locality changes by four entries, the busiest load is read off W sums.
  const double total = p.total_choices > 0 ? p.total_choices : 1.0;
  std::vector<double> on(static_cast<size_t>(W), 0.0);
  double all = 0;
  for (int e = 0; e < E; ++e) on[static_cast<size_t>(rank[static_cast<size_t>(e)])] += choices[static_cast<size_t>(e)], all += choices[static_cast<size_t>(e)];
  const double mean = all > 0 ? all / W : 1.0;
  auto busiest = [&] { return *std::max_element(on.begin(), on.end()) / mean; };
  auto local_of = [&](int e, int r) { return on_rank[static_cast<size_t>(e) * W + r] / total; };
  double penalty = balance_weight * (busiest() - 1.0);
  for (bool improved = true; improved;) {
    improved = false;
    for (int a = 0; a < E; ++a)
      for (int b = a + 1; b < E; ++b) {
        const int ra = rank[static_cast<size_t>(a)], rb = rank[static_cast<size_t>(b)];
        if (ra == rb) continue;
        const double gain_local = local_of(a, rb) + local_of(b, ra) - local_of(a, ra) - local_of(b, rb);
        const double shift = choices[static_cast<size_t>(a)] - choices[static_cast<size_t>(b)];
        on[static_cast<size_t>(ra)] -= shift, on[static_cast<size_t>(rb)] += shift;
        const double next_penalty = balance_weight * (busiest() - 1.0);
        if (gain_local - (next_penalty - penalty) > 1e-12) {
          std::swap(rank[static_cast<size_t>(a)], rank[static_cast<size_t>(b)]);
          penalty = next_penalty, improved = true;
        } else {
          on[static_cast<size_t>(ra)] += shift, on[static_cast<size_t>(rb)] -= shift;
        }
      }
  }
  return rank;
}

}  // namespace

std::vector<int> max_weight_assignment(const std::vector<double>& value, int n) {
  SY_CHECK(value.size() == static_cast<size_t>(n) * static_cast<size_t>(n));
  // Hungarian algorithm on cost = -value with row and column potentials (1-based, column 0 a sentinel).
  const double inf = std::numeric_limits<double>::infinity();
  std::vector<double> u(static_cast<size_t>(n) + 1, 0.0), v(static_cast<size_t>(n) + 1, 0.0);
  std::vector<int> row_of(static_cast<size_t>(n) + 1, 0), way(static_cast<size_t>(n) + 1, 0);
  for (int i = 1; i <= n; ++i) {
    row_of[0] = i;
    int j0 = 0;
    std::vector<double> minv(static_cast<size_t>(n) + 1, inf);
    std::vector<char> used(static_cast<size_t>(n) + 1, 0);
    do {
      used[static_cast<size_t>(j0)] = 1;
      const int i0 = row_of[static_cast<size_t>(j0)];
      double delta = inf;
      int j1 = 0;
      for (int j = 1; j <= n; ++j) {
        if (used[static_cast<size_t>(j)]) continue;
        const double cur = -value[static_cast<size_t>(i0 - 1) * n + (j - 1)] - u[static_cast<size_t>(i0)] - v[static_cast<size_t>(j)];
        if (cur < minv[static_cast<size_t>(j)]) minv[static_cast<size_t>(j)] = cur, way[static_cast<size_t>(j)] = j0;
        if (minv[static_cast<size_t>(j)] < delta) delta = minv[static_cast<size_t>(j)], j1 = j;
      }
      for (int j = 0; j <= n; ++j) {
        if (used[static_cast<size_t>(j)]) {
          u[static_cast<size_t>(row_of[static_cast<size_t>(j)])] += delta;
          v[static_cast<size_t>(j)] -= delta;
        } else {
          minv[static_cast<size_t>(j)] -= delta;
        }
      }
      j0 = j1;
    } while (row_of[static_cast<size_t>(j0)] != 0);
    do {
      const int j1 = way[static_cast<size_t>(j0)];
      row_of[static_cast<size_t>(j0)] = row_of[static_cast<size_t>(j1)];
      j0 = j1;
    } while (j0 != 0);
  }
  std::vector<int> column(static_cast<size_t>(n), -1);
  for (int j = 1; j <= n; ++j) column[static_cast<size_t>(row_of[static_cast<size_t>(j)] - 1)] = j - 1;
  return column;
}

double grouping_local_share(const std::vector<double>& counts, int vocab, int experts, int ranks,
                            const std::vector<int>& rank_of_expert) {
  const Problem p = make_problem(counts, vocab, experts, ranks);
  std::vector<double> load;
  return p.total_choices > 0 ? split_tokens(p, rank_of_expert, load) / p.total_choices : 0.0;
}

ExpertGrouping group_experts(const std::vector<double>& counts, int V, int E, int W, const GroupingOptions& options) {
  if (E > 4096) SY_THROW(InvalidArgument, "expert grouping: ", E, " experts, expected at most 4096");
  if (!(options.balance_weight >= 0))
    SY_THROW(InvalidArgument, "expert grouping: balance_weight = ", options.balance_weight, ", expected >= 0");
  const Problem p = make_problem(counts, V, E, W);
  const std::vector<double> choices = expert_choices(p);
  ExpertGrouping best;
  std::vector<int> identity(static_cast<size_t>(E));
  for (int e = 0; e < E; ++e) identity[static_cast<size_t>(e)] = e / (E / W);
  std::mt19937_64 rng(options.seed);
  std::vector<double> load;
  const double total = p.total_choices > 0 ? p.total_choices : 1.0;
  best.identity_local_share = split_tokens(p, identity, load) / total;
  best.identity_rank_load_max_over_mean = imbalance(choices, identity, W);
  auto objective = [&](double local, const std::vector<int>& rank) {
    return local / total - options.balance_weight * (imbalance(choices, rank, W) - 1.0);
  };
  double best_value = -INFINITY;
  for (int start = 0; start <= options.restarts; ++start) {
    std::vector<int> rank = identity;
    if (start > 0) std::shuffle(rank.begin(), rank.end(), rng);
    double local = split_tokens(p, rank, load);
    double value = objective(local, rank);
    int it = 0;
    for (; it < options.max_iterations; ++it) {
      std::vector<int> next = place_experts(p, load, choices, options.balance_weight);
      std::vector<double> next_load;
      const double next_local = split_tokens(p, next, next_load);
      const double next_value = objective(next_local, next);
      if (!(next_value > value + 1e-9)) break;
      rank = std::move(next), load = std::move(next_load), local = next_local, value = next_value;
    }
    if (value > best_value + 1e-12) {
      best_value = value;
      best.rank_of_expert = rank;
      best.local_share = local / total;
      best.rank_load_max_over_mean = imbalance(choices, rank, W);
      best.iterations = it;
    }
  }
  return best;
}

std::vector<ExpertGrouping> group_experts(const RoutingTrace& trace, int ranks, const GroupingOptions& options) {
  int vocab = 1;
  for (int32_t t : trace.tokens) vocab = std::max(vocab, t + 1);
  std::vector<ExpertGrouping> out;
  for (int l = 0; l < trace.layers; ++l) {
    std::vector<double> counts(static_cast<size_t>(vocab) * trace.experts, 0.0);
    for (int64_t i = 0; i < trace.size(); ++i)
      for (int j = 0; j < trace.k; ++j)
        counts[static_cast<size_t>(trace.tokens[static_cast<size_t>(i)]) * trace.experts + trace.expert(l, i, j)] += 1.0;
    out.push_back(group_experts(counts, vocab, trace.experts, ranks, options));
  }
  return out;
}

}  // namespace switchyard
