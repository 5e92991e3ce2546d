// Physical expert placement, shaped like DeepSeek EPLB's output: logical
// experts on the physical expert slots of the expert group's ranks. A logical
// expert may have several replicas (slots on different ranks), a rank may
// hold no experts, ranks may hold different numbers of slots, and a slot may
// be unused. Builders are pure functions (no communicator), so placements for
// thousands of ranks can be made and checked anywhere.
//
// Which replica a routed token uses is a function every rank agrees on: the
// drops are decided per logical expert first (replicas never change results),
// then the i-th kept choice of expert e, in GShard slot order, goes to replica
// (i + source rank + batch number) mod replicas(e).
#pragma once

#include <string>
#include <vector>

namespace switchyard {

class ExpertPlacement {
 public:
  ExpertPlacement() = default;
  // slots_per_rank[w]: physical slots on rank w; phy2log[p]: the logical
  // expert at physical slot p (slots numbered rank by rank), -1 if unused.
  // Throws naming the problem: a logical expert without a slot, an id out of
  // range, sizes that disagree. Two replicas of one expert may share a rank
  // (EPLB packs by load alone); they split that rank's rows of the expert.
  ExpertPlacement(int experts, std::vector<int> slots_per_rank, std::vector<int> phy2log);

  // E / W experts per rank, expert e at slot e.
  static ExpertPlacement identity(int experts, int ranks);
  // A permutation: logical expert e at physical slot position_of_expert[e], E / W per rank.
  static ExpertPlacement from_positions(int ranks, const std::vector<int>& position_of_expert);
  // `slots_per_rank` slots on every rank, physical slot p holding expert p mod E:
  // with more slots than experts the first experts get the extra replicas.
  static ExpertPlacement round_robin(int experts, int ranks, int slots_per_rank);
  // Expert data parallelism (Megatron's expert_model_parallel_size): the
  // world in W / ep_size expert groups of ep_size consecutive ranks, each
  // holding every expert once (E / ep_size per rank); expert e of each group
  // on its local rank e / (E / ep_size). With MoEConfig::replica_domain =
  // ep_size a token uses its own group's replica, and the replicas' gradient
  // sum is the expert-data-parallel all-reduce.
  static ExpertPlacement expert_data_parallel(int experts, int ranks, int ep_size);
  // `slots_per_rank` on every rank and the physical slots of each logical
  // expert (the placement file's form; launch/placement_file.h reads it).
  static ExpertPlacement from_replicas(int experts, int ranks, int slots_per_rank,
                                       const std::vector<std::vector<int>>& slots_of_expert);

  int experts() const { return experts_; }
  int ranks() const { return static_cast<int>(slots_per_rank_.size()); }
  int physical_slots() const { return static_cast<int>(phy2log_.size()); }
  int slots(int rank) const { return slots_per_rank_[static_cast<size_t>(rank)]; }
  int max_slots() const { return max_slots_; }
  int first_slot(int rank) const { return first_slot_[static_cast<size_t>(rank)]; }
  int rank_of_slot(int physical) const;
  // The logical expert at a rank's local slot (-1: unused).
  int expert_at(int rank, int local_slot) const { return phy2log_[static_cast<size_t>(first_slot(rank) + local_slot)]; }
  const std::vector<int>& phy2log() const { return phy2log_; }
  // The physical slots holding logical expert e, ascending (EPLB's log2phy row).
  const std::vector<int>& replicas_of(int expert) const { return log2phy_[static_cast<size_t>(expert)]; }
  int replicas(int expert) const { return static_cast<int>(replicas_of(expert).size()); }
  // The replica that owns e's checkpoint entry (its first).
  int primary_slot(int expert) const { return replicas_of(expert).front(); }
  // Every rank holds the same number of slots, each logical expert exactly
  // one: the layout every plan (r = 0, sliced experts) runs on.
  bool is_permutation() const { return permutation_; }
  std::string describe() const;

  // Nearest balanced replica choice: the share of expert e's choices that
  // each source rank sends each of e's replicas, in quanta of kShareQuanta
  // per source ([ranks][replicas(e)], replicas in replicas_of order; every
  // row sums to kShareQuanta). Every source has the same supply and every
  // replica the same demand, filled nearest first: a source's own rank's
  // replicas, then its node's (blocks of ranks_per_node consecutive ranks;
  // <= 1: no node level), then every replica, each level spreading a
  // block's remaining supply over its remaining demand proportionally. So a
  // replica expects 1 / replicas(e) of the load when sources route alike,
  // and no row leaves a rank or node that could have kept it without
  // overloading a replica (greedy by level is optimal for such nested costs).
  static constexpr int64_t kShareQuanta = int64_t{1} << 20;
  std::vector<int64_t> nearest_shares(int expert, int ranks_per_node) const;
  bool operator==(const ExpertPlacement& o) const {
    return experts_ == o.experts_ && slots_per_rank_ == o.slots_per_rank_ && phy2log_ == o.phy2log_;
  }

 private:
  int experts_ = 0;
  std::vector<int> slots_per_rank_, first_slot_, phy2log_;
  std::vector<std::vector<int>> log2phy_;
  int max_slots_ = 0;
  bool permutation_ = false;
};

}  // namespace switchyard
