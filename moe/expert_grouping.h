// Expert grouping (Sem-MoE's s-EG): experts that the same tokens use put on
// the same rank, so that a token moved to one rank (speculative token
// shuffling, moe/affinity.h) finds more of its k experts there.
//
// Per layer, a balanced token-expert co-clustering. Variables: the rank of
// each expert (E / W per rank) and a token-load split of each token id over
// the ranks (a token id's occurrences may go to several ranks; each rank
// takes at most 1 / W of all tokens, as the equal chunks of a batch do).
// Objective: the expected local activations, sum over token ids and ranks
// of (the id's occurrences on the rank) x (its choices per occurrence of the
// experts there), less balance_weight x the busiest rank's expert load over
// the mean, minus 1 (the choices its experts receive: the experts' GEMMs
// wait for the busiest rank). An alternating solver: given the experts,
// split the tokens (a greedy transport, the most decided ids first); given
// the tokens, place the experts (an exact assignment of experts to slots,
// Hungarian, for the local term; then pairwise swaps while the whole
// objective gains); repeat until no step helps, from the identity and from
// seeded random starts; the best is kept. The result is an ExpertPlacement permutation: the gate keeps
// routing logical experts, so a model's output is unchanged.
#pragma once

#include <cstdint>
#include <vector>

#include "moe/routing_trace.h"

namespace switchyard {

struct GroupingOptions {
  int restarts = 8;         // random starts besides the identity
  int max_iterations = 50;  // alternations per start
  uint64_t seed = 1;
  // Weight of the expert-load imbalance (busiest rank / mean - 1) against the
  // local share; 0: locality alone.
  double balance_weight = 0.3;
};

struct ExpertGrouping {
  std::vector<int> rank_of_expert;  // [E]: E / W experts per rank
  double local_share = 0;           // expected local choices / all choices, on the counts given
  double rank_load_max_over_mean = 1;  // the busiest rank's expert load over the mean
  double identity_rank_load_max_over_mean = 1;
  double identity_local_share = 0;  // the same for E / W experts per rank in expert order (tokens split alike)
  int iterations = 0;               // alternations of the start that won
};

// counts [vocab, E]: choices of token id t for expert e (e.g. a trace's build part).
// Throws above 4,096 experts (the assignment is cubic in them).
ExpertGrouping group_experts(const std::vector<double>& counts, int vocab, int experts, int ranks,
                             const GroupingOptions& options = {});
// Per layer of a trace.
std::vector<ExpertGrouping> group_experts(const RoutingTrace& trace, int ranks, const GroupingOptions& options = {});

// The expected local share of a placement with the token split the solver
// would choose for it (the token step alone).
double grouping_local_share(const std::vector<double>& counts, int vocab, int experts, int ranks,
                            const std::vector<int>& rank_of_expert);

// Maximum-weight assignment of n rows to n columns (value [n, n]); returns
// the column of each row. O(n^3).
std::vector<int> max_weight_assignment(const std::vector<double>& value, int n);

}  // namespace switchyard
