// The fake backend: one process plays one rank of a world of any size (1,024+)
// and no data travels. Ops validate, count and complete at once, and fill their
// outputs as if every other rank were this one (all-to-all: from each peer what
// this rank sends itself; sums of f32, f64, i32, i64: W times its values; a
// plain recv: zeros). For
// sharding, mesh and planner logic at scale.
#pragma once

#include <memory>

#include "comm/communicator.h"

namespace switchyard {

std::shared_ptr<Communicator> make_fake_communicator(int rank, int size);

}  // namespace switchyard
