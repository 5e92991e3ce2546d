// What `switchyard run` executes: the job a JobConfig describes, on every rank
// of its backend.
#pragma once

#include <string>

#include "core/env.h"
#include "launch/config.h"

namespace switchyard {

// The backend the runtime gets for comm.backend: "" (chosen from the
// launcher's variables) for auto; ConfigError naming the key's file:line and
// the variables found when threads is pinned under a launcher.
std::string runtime_backend(const JobConfig& config, const EnvLookup& lookup);

// Runs the job; returns the process exit code (non-zero when a check failed).
int run_job(const JobConfig& config);

}  // namespace switchyard
