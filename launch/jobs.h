// What `switchyard run` executes: the job a JobConfig describes, on every rank
// of its backend.
#pragma once

#include "launch/config.h"

namespace switchyard {

// Runs the job; returns the process exit code (non-zero when a check failed).
int run_job(const JobConfig& config);

}  // namespace switchyard
