// DeepSeek's expert-parallel load balancer (EPLB, deepseek-ai/EPLB), written
// here from its published algorithm: from a load per logical expert, extra
// replicas go to the experts with the most load per replica, and the physical
// experts are packed onto ranks so every rank carries about the same load.
//  - hierarchical (groups of experts divisible by nodes): expert groups are
//    packed onto nodes first, replicas are made inside each node, then the
//    node's physical experts are packed onto its ranks (traffic stays in the
//    node where it can);
//  - global otherwise: one group, one node.
// Ties go to the lowest index here; the reference's sort is not stable, so on
// exactly tied loads the two may order items differently (the golden tests
// use distinct loads). Loads are summed in float32 like it.
#pragma once

#include <vector>

#include "moe/placement.h"

namespace switchyard::eplb {

// n weighted items into `packs` packs of n / packs items each: heaviest first,
// each into the lightest pack that still has room (lowest index on ties).
struct Packing {
  std::vector<int> pack;          // [n]
  std::vector<int> rank_in_pack;  // [n]
};
Packing balanced_packing(const std::vector<float>& weight, int packs);

// `physical` >= E replicas: expert e keeps replica 0 at physical slot e; each
// further slot goes to the expert with the largest load / replicas so far.
struct Replication {
  std::vector<int> phy2log;  // [physical]
  std::vector<int> replica;  // [physical]: which replica of its expert
  std::vector<int> count;    // [E]
};
Replication replicate_experts(const std::vector<float>& weight, int physical);

struct Rebalance {
  std::vector<int> phy2log;  // [physical]: slots rank-major, physical / ranks per rank
  std::vector<int> replica;  // [physical]
  std::vector<int> count;    // [E]: replicas of each logical expert
};
// load [E]; physical a multiple of ranks, ranks a multiple of nodes.
Rebalance rebalance_experts(const std::vector<float>& load, int physical, int groups, int nodes, int ranks);

// The result as a placement of `ranks` ranks with physical / ranks slots each.
ExpertPlacement to_placement(const Rebalance& r, int ranks);

// The placement Switchyard uses: the global policy by default (any expert
// may take any rank's spare slots); with groups > 1 expert groups and
// nodes > 1 dividing them, the hierarchical one (for group-limited routing,
// RouterConfig::groups / topk_groups: a token's experts then sit on at most
// topk_groups nodes' worth of groups).
ExpertPlacement place(const std::vector<double>& load, int physical, int ranks, int groups = 1, int nodes = 1);

}  // namespace switchyard::eplb
