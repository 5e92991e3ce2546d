#include "moe/eplb.h"

#include <algorithm>
#include <numeric>

#include "core/error.h"

namespace switchyard::eplb {

Packing balanced_packing(const std::vector<float>& weight, int packs) {
  const int n = static_cast<int>(weight.size());
  if (packs < 1 || n % packs != 0)
    SY_THROW(InvalidArgument, "eplb: ", n, " items into ", packs, " packs; expected a divisor of the items");
  const int per_pack = n / packs;
  Packing p;
  p.pack.assign(static_cast<size_t>(n), -1);
  p.rank_in_pack.assign(static_cast<size_t>(n), -1);
  if (per_pack == 1) {  // item i is pack i
    std::iota(p.pack.begin(), p.pack.end(), 0);
    std::fill(p.rank_in_pack.begin(), p.rank_in_pack.end(), 0);
    return p;
  }
  std::vector<int> order(static_cast<size_t>(n));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return weight[a] > weight[b]; });
  std::vector<float> load(static_cast<size_t>(packs), 0.f);
  std::vector<int> items(static_cast<size_t>(packs), 0);
  for (int item : order) {
    int best = -1;
    for (int q = 0; q < packs; ++q)
      if (items[q] < per_pack && (best < 0 || load[q] < load[best])) best = q;
    p.pack[item] = best;
    p.rank_in_pack[item] = items[best]++;
    load[best] += weight[item];
  }
  return p;
}

Replication replicate_experts(const std::vector<float>& weight, int physical) {
  const int E = static_cast<int>(weight.size());
  if (physical < E) SY_THROW(InvalidArgument, "eplb: ", physical, " physical experts for ", E, " logical ones");
  Replication r;
  r.phy2log.resize(static_cast<size_t>(physical));
  r.replica.assign(static_cast<size_t>(physical), 0);
  r.count.assign(static_cast<size_t>(E), 1);
  std::iota(r.phy2log.begin(), r.phy2log.begin() + E, 0);
  for (int slot = E; slot < physical; ++slot) {
    int hottest = 0;
    for (int e = 1; e < E; ++e)
      if (weight[e] / static_cast<float>(r.count[e]) > weight[hottest] / static_cast<float>(r.count[hottest])) hottest = e;
    r.phy2log[slot] = hottest;
    r.replica[slot] = r.count[hottest]++;
  }
  return r;
}

Rebalance rebalance_experts(const std::vector<float>& load, int physical, int groups, int nodes, int ranks) {
  const int E = static_cast<int>(load.size());
  if (E < 1 || ranks < 1 || nodes < 1 || groups < 1)
    SY_THROW(InvalidArgument, "eplb: ", E, " experts, ", groups, " groups, ", nodes, " nodes, ", ranks,
             " ranks; expected each >= 1");
  if (groups % nodes != 0) groups = nodes = 1;  // the global policy
  if (E % groups != 0)
    SY_THROW(InvalidArgument, "eplb: ", E, " experts in ", groups, " groups; expected a divisor");
  if (ranks % nodes != 0) SY_THROW(InvalidArgument, "eplb: ", ranks, " ranks on ", nodes, " nodes; expected a multiple");
  if (physical % ranks != 0)
    SY_THROW(InvalidArgument, "eplb: ", physical, " physical experts on ", ranks, " ranks; expected a multiple");
  if (physical < E) SY_THROW(InvalidArgument, "eplb: ", physical, " physical experts for ", E, " logical ones");
  if ((physical / nodes) < E / nodes)
    SY_THROW(InvalidArgument, "eplb: ", physical / nodes, " slots per node for ", E / nodes, " experts");
  const int group_size = E / groups, groups_per_node = groups / nodes, per_node = E / nodes;
  const int phys_per_node = physical / nodes, ranks_per_node = ranks / nodes, per_rank = physical / ranks;
  // 1. Expert groups onto nodes: "node-local" order mlog = node * per_node + ..., and its inverse.
  std::vector<float> group_load(static_cast<size_t>(groups), 0.f);
  for (int e = 0; e < E; ++e) group_load[e / group_size] += load[e];
  const Packing by_node = balanced_packing(group_load, nodes);
  std::vector<int> mlog_of(static_cast<size_t>(E)), log_of_mlog(static_cast<size_t>(E));
  for (int e = 0; e < E; ++e) {
    const int g = e / group_size;
    const int mlog = (by_node.pack[g] * groups_per_node + by_node.rank_in_pack[g]) * group_size + e % group_size;
    mlog_of[e] = mlog;
    log_of_mlog[mlog] = e;
  }
  Rebalance out;
  out.phy2log.assign(static_cast<size_t>(physical), -1);
  out.replica.assign(static_cast<size_t>(physical), 0);
  out.count.assign(static_cast<size_t>(E), 0);
  for (int node = 0; node < nodes; ++node) {
    // 2. Replicas inside the node, over its experts in node-local order.
    std::vector<float> node_load(static_cast<size_t>(per_node));
    for (int i = 0; i < per_node; ++i) node_load[i] = load[log_of_mlog[node * per_node + i]];
    const Replication rep = replicate_experts(node_load, phys_per_node);
    // 3. The node's physical experts onto its ranks, by load per replica.
    std::vector<float> phys_load(static_cast<size_t>(phys_per_node));
    for (int p = 0; p < phys_per_node; ++p)
      phys_load[p] = node_load[rep.phy2log[p]] / static_cast<float>(rep.count[rep.phy2log[p]]);
    const Packing by_rank = balanced_packing(phys_load, ranks_per_node);
    for (int p = 0; p < phys_per_node; ++p) {
      const int slot = node * phys_per_node + by_rank.pack[p] * per_rank + by_rank.rank_in_pack[p];
      const int e = log_of_mlog[node * per_node + rep.phy2log[p]];
      out.phy2log[slot] = e;
      out.replica[slot] = rep.replica[p];
    }
    for (int i = 0; i < per_node; ++i) out.count[log_of_mlog[node * per_node + i]] = rep.count[i];
  }
  return out;
}

ExpertPlacement to_placement(const Rebalance& r, int ranks) {
  const int physical = static_cast<int>(r.phy2log.size());
  if (ranks < 1 || physical % ranks != 0)
    SY_THROW(InvalidArgument, "eplb: ", physical, " physical experts on ", ranks, " ranks; expected a multiple");
  return ExpertPlacement(static_cast<int>(r.count.size()), std::vector<int>(static_cast<size_t>(ranks), physical / ranks),
                         r.phy2log);
}

ExpertPlacement place(const std::vector<double>& load, int physical, int ranks, int groups, int nodes) {
  if (groups > 1 && nodes > 1 && groups % nodes != 0)
    SY_THROW(InvalidArgument, "eplb: the hierarchical policy packs ", groups, " expert groups onto ", nodes,
             " nodes; expected a multiple of the nodes");
  return to_placement(rebalance_experts(std::vector<float>(load.begin(), load.end()), physical, groups, nodes, ranks),
                      ranks);
}

}  // namespace switchyard::eplb
