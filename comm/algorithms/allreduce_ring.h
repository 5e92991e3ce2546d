// Ring allreduce: a reduce-scatter then an allgather around the ring, each of
// size-1 steps moving count/size elements. Every chunk is reduced along one
// fixed path, so all ranks end with bit-identical results.
#pragma once

#include "comm/transport.h"

namespace switchyard::algorithms {

void allreduce_ring(Transport& t, const void* in, void* out, size_t count, DType dtype, ReduceOp op,
                    Deadline deadline);

}  // namespace switchyard::algorithms
