// The unified parameter layout (Tutel's): E global experts on W ranks of the
// expert group. E >= W: each rank stores E/W whole experts. A placement table
// maps each logical expert to (rank, slot), so expert grouping and load
// balancing can permute experts without touching the math. Checkpoints are
// keyed by logical expert id. (E < W, experts sliced over S = W/E ranks, comes
// with adaptive parallelism.)
#pragma once

#include <cstddef>
#include <vector>

namespace switchyard {

class ParamLayout {
 public:
  // Identity placement: expert e on rank e / (E/W), slot e % (E/W).
  ParamLayout(int global_experts, int ranks);

  int global_experts() const { return experts_; }
  int ranks() const { return ranks_; }
  int local_experts() const { return experts_ / ranks_; }
  int owner(int expert) const { return position_[static_cast<size_t>(expert)] / local_experts(); }
  int slot(int expert) const { return position_[static_cast<size_t>(expert)] % local_experts(); }
  // Global position rank * local_experts + slot of a logical expert, and back.
  int position(int expert) const { return position_[static_cast<size_t>(expert)]; }
  int expert_at(int rank, int slot) const { return expert_at_[static_cast<size_t>(rank * local_experts() + slot)]; }
  // A permutation: position_of_expert[e] is where logical expert e lives.
  void set_placement(std::vector<int> position_of_expert);

 private:
  int experts_, ranks_;
  std::vector<int> position_, expert_at_;
};

}  // namespace switchyard
