// The unified parameter layout (Tutel's): E global experts on the W ranks of
// the expert group.
//  - Whole experts (E >= W, or any physical placement): each rank stores the
//    experts of its physical slots (moe/placement.h). The default is E/W per
//    rank, expert e at slot e (position e); a placement may add replicas,
//    leave ranks without experts and give ranks different slot counts.
//  - Sliced (E < W, default placement only): S = W/E consecutive ranks share
//    one expert (position rank / S), each storing a 1/S slice of its hidden
//    dimension (shard rank % S).
// Every execution plan runs on the default layouts unchanged: plans gather
// weights or move tokens transiently, stored parameters never move. Physical
// placements with replicas or uneven slots run expert-parallel plans (r = 1).
// Checkpoints are keyed by logical expert id.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <vector>

#include "moe/placement.h"

namespace switchyard {

class ParamLayout {
 public:
  // The default placement (identity), or `placement` (whole experts only: its
  // ranks must be `ranks`).
  ParamLayout(int global_experts, int ranks, const std::optional<ExpertPlacement>& placement = std::nullopt);

  int global_experts() const { return experts_; }
  int ranks() const { return ranks_; }
  // S: ranks sharing one expert (1 for whole experts).
  int shards() const { return shards_; }
  int shard_of_rank(int rank) const { return rank % shards_; }
  // Expert slots a rank stores (1 when sliced), and the most any rank stores.
  int slots(int rank) const { return shards_ > 1 ? 1 : placement_.slots(rank); }
  int local_experts() const { return shards_ > 1 ? 1 : placement_.max_slots(); }
  // Hidden width each rank stores of an expert of hidden size H; throws
  // naming H and S when S does not divide it.
  int64_t local_hidden(int64_t hidden) const;

  // Every plan runs on it (no replicas, equal slots per rank, or sliced).
  bool is_permutation() const { return shards_ > 1 || placement_.is_permutation(); }
  // The physical placement of whole experts (the identity when sliced).
  const ExpertPlacement& placement() const { return placement_; }

  // Position of a logical expert (its first replica's physical slot when whole),
  // and the logical expert at a position.
  int position(int expert) const;
  int expert_at_position(int position) const;
  // Where a position is stored: its first rank (of S when sliced), and the slot.
  int first_rank_of_position(int position) const;
  int position_at(int rank, int slot) const { return shards_ > 1 ? rank / shards_ : placement_.first_slot(rank) + slot; }
  int owner(int expert) const { return first_rank_of_position(position(expert)); }
  int slot(int expert) const { return shards_ > 1 ? 0 : position(expert) - placement_.first_slot(owner(expert)); }
  // The logical expert at a rank's slot (-1: an unused slot).
  int expert_at(int rank, int slot) const { return expert_at_position(position_at(rank, slot)); }
  // A permutation: position_of_expert[e] is where logical expert e lives.
  void set_placement(std::vector<int> position_of_expert);

 private:
  int experts_, ranks_, shards_;
  ExpertPlacement placement_;        // whole experts
  std::vector<int> position_, expert_at_;  // sliced: the permutation of positions
};

}  // namespace switchyard
