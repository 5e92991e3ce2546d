// The unified parameter layout (Tutel's): E global experts on the W ranks of
// the expert group, at E expert positions.
//  - E >= W: each rank stores L = E/W whole experts (positions rank * L + slot).
//  - E <  W: S = W/E consecutive ranks share one expert (position rank / S),
//    each storing a 1/S slice of its hidden dimension (shard rank % S).
// Every execution plan runs on this layout unchanged: plans gather weights or
// move tokens transiently, stored parameters never move. A placement table maps
// each logical expert to a position, so expert grouping and load balancing can
// permute experts without touching the math; checkpoints are keyed by logical
// expert id.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace switchyard {

class ParamLayout {
 public:
  // Identity placement: logical expert e at position e.
  ParamLayout(int global_experts, int ranks);

  int global_experts() const { return experts_; }
  int ranks() const { return ranks_; }
  // Experts stored per rank (1 when experts are sliced).
  int local_experts() const { return experts_ >= ranks_ ? experts_ / ranks_ : 1; }
  // S: ranks sharing one expert (1 when E >= W).
  int shards() const { return experts_ >= ranks_ ? 1 : ranks_ / experts_; }
  int shard_of_rank(int rank) const { return rank % shards(); }
  // Hidden width each rank stores of an expert of hidden size H; throws
  // naming H and S when S does not divide it.
  int64_t local_hidden(int64_t hidden) const;

  // Position of a logical expert, and the logical expert at a position.
  int position(int expert) const { return position_[static_cast<size_t>(expert)]; }
  int expert_at_position(int position) const { return expert_at_[static_cast<size_t>(position)]; }
  // Where a position is stored: its first rank (of S when sliced), and the slot.
  int first_rank_of_position(int position) const {
    return shards() > 1 ? position * shards() : position / local_experts();
  }
  int position_at(int rank, int slot) const { return shards() > 1 ? rank / shards() : rank * local_experts() + slot; }
  int owner(int expert) const { return first_rank_of_position(position(expert)); }
  int slot(int expert) const { return shards() > 1 ? 0 : position(expert) % local_experts(); }
  int expert_at(int rank, int slot) const { return expert_at_position(position_at(rank, slot)); }
  // A permutation: position_of_expert[e] is where logical expert e lives.
  void set_placement(std::vector<int> position_of_expert);

 private:
  int experts_, ranks_;
  std::vector<int> position_, expert_at_;
};

}  // namespace switchyard
