// Binomial-tree broadcast: log2(size) rounds; each rank receives once from its
// parent and forwards to its children.
#pragma once

#include "comm/transport.h"

namespace switchyard::algorithms {

void broadcast_binomial(Transport& t, void* buffer, size_t bytes, int root, Deadline deadline);

}  // namespace switchyard::algorithms
