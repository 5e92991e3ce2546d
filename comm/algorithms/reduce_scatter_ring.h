// Ring reduce-scatter with equal blocks: partial sums travel around the ring,
// each rank adding its own block, so rank r ends with the reduction of block r.
#pragma once

#include "comm/transport.h"

namespace switchyard::algorithms {

void reduce_scatter_ring(Transport& t, const void* in, void* out, size_t block_count, DType dtype, ReduceOp op,
                         Deadline deadline);

}  // namespace switchyard::algorithms
