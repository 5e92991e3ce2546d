// All-to-all(v) by direct exchange: every pair swaps its blocks, posted in
// pairwise order (rank r sends to r+i while receiving from r-i) so that peers
// are not all hit at once.
#pragma once

#include <span>

#include "comm/transport.h"

namespace switchyard::algorithms {

void alltoallv_pairwise(Transport& t, const void* in, std::span<const int64_t> send_counts, void* out,
                        std::span<const int64_t> recv_counts, size_t element_size, Deadline deadline);

}  // namespace switchyard::algorithms
