// The fake backend: one process plays one rank of a world of any size (1,024+)
// and no data moves. Ops validate, count and complete at once; outputs are left
// untouched. For sharding, mesh and planner logic at scale.
#pragma once

#include <memory>

#include "comm/communicator.h"

namespace switchyard {

std::shared_ptr<Communicator> make_fake_communicator(int rank, int size);

}  // namespace switchyard
