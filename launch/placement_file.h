// Physical expert placement files, for `bench moe --placement FILE`:
//
//   slots_per_rank: 3           # physical slot p lives on rank p / 3
//   experts:                    # logical id: [physical slots]
//     0: [0, 4]                 # a replica on rank 0 and one on rank 1
//     1: [1]
//     ...                       # slots nobody names stay unused
//
// Every logical expert 0..E-1 needs at least one slot; replicas of one expert
// must be on different ranks. Errors name the file and line.
#pragma once

#include <string>

#include "moe/placement.h"

namespace switchyard {

ExpertPlacement load_placement_file(const std::string& path, int experts, int ranks);

}  // namespace switchyard
