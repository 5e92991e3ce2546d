// Ring allgather with per-rank element counts: each step forwards the block
// received in the previous one, so every link carries every block once.
#pragma once

#include <span>

#include "comm/transport.h"

namespace switchyard::algorithms {

void allgatherv_ring(Transport& t, const void* in, void* out, std::span<const int64_t> counts, size_t element_size,
                     Deadline deadline);

}  // namespace switchyard::algorithms
