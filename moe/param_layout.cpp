#include "moe/param_layout.h"

#include "core/error.h"

namespace switchyard {

ParamLayout::ParamLayout(int global_experts, int ranks, const std::optional<ExpertPlacement>& placement)
    : experts_(global_experts), ranks_(ranks), shards_(1) {
  if (ranks < 1) SY_THROW(InvalidArgument, "param layout: ranks = ", ranks, ", expected >= 1");
  if (global_experts < 1) SY_THROW(InvalidArgument, "param layout: experts = ", global_experts, ", expected >= 1");
  if (placement) {
    if (placement->experts() != global_experts || placement->ranks() != ranks)
      SY_THROW(InvalidArgument, "param layout: the placement has ", placement->experts(), " experts on ",
               placement->ranks(), " ranks; expected ", global_experts, " on ", ranks);
    placement_ = *placement;
    return;
  }
  if (global_experts >= ranks && global_experts % ranks != 0)
    SY_THROW(InvalidArgument, "param layout: experts = ", global_experts, " is not a multiple of the ", ranks,
             " ranks of the expert group");
  if (global_experts < ranks && ranks % global_experts != 0)
    SY_THROW(InvalidArgument, "param layout: ", ranks, " ranks share ", global_experts,
             " experts unevenly; with fewer experts than ranks the ranks must be a multiple of the experts");
  if (global_experts >= ranks) {
    placement_ = ExpertPlacement::identity(global_experts, ranks);
    return;
  }
  shards_ = ranks / global_experts;
  std::vector<int> identity(static_cast<size_t>(global_experts));
  for (int e = 0; e < global_experts; ++e) identity[static_cast<size_t>(e)] = e;
  set_placement(identity);
}

int64_t ParamLayout::local_hidden(int64_t hidden) const {
  if (hidden % shards() != 0)
    SY_THROW(InvalidArgument, "param layout: hidden_dim = ", hidden, " is not divisible by the ", shards(),
             " ranks that share each expert (", ranks_, " ranks, ", experts_, " experts)");
  return hidden / shards();
}

int ParamLayout::position(int expert) const {
  return shards_ > 1 ? position_[static_cast<size_t>(expert)] : placement_.primary_slot(expert);
}

int ParamLayout::expert_at_position(int position) const {
  return shards_ > 1 ? expert_at_[static_cast<size_t>(position)] : placement_.phy2log()[static_cast<size_t>(position)];
}

int ParamLayout::first_rank_of_position(int position) const {
  return shards_ > 1 ? position * shards_ : placement_.rank_of_slot(position);
}

void ParamLayout::set_placement(std::vector<int> position_of_expert) {
  if (static_cast<int>(position_of_expert.size()) != experts_)
    SY_THROW(InvalidArgument, "placement has ", position_of_expert.size(), " entries, expected one per expert (",
             experts_, ")");
  if (shards_ == 1) {
    placement_ = ExpertPlacement::from_positions(ranks_, position_of_expert);
    return;
  }
  // Sliced: positions are whole-expert slots of one imaginary rank (the same permutation check).
  expert_at_ = ExpertPlacement::from_positions(1, position_of_expert).phy2log();
  position_ = std::move(position_of_expert);
}

}  // namespace switchyard
