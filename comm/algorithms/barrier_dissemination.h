// Dissemination barrier: ceil(log2(size)) rounds of empty messages to rank+2^k.
#pragma once

#include "comm/transport.h"

namespace switchyard::algorithms {

void barrier_dissemination(Transport& t, Deadline deadline);

}  // namespace switchyard::algorithms
