// switchyard launch: starts N local processes of a command the way torchrun
// does (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR,
// MASTER_PORT), hosts the job's TCP store on node 0 (the processes connect to
// it with the job token in SWITCHYARD_STORE_TOKEN), prefixes every line a rank
// prints with "[rank] ", and returns the first failing exit code after
// stopping the other ranks.
#pragma once

#include <string>
#include <vector>

namespace switchyard {

struct LaunchOptions {
  int nprocs = 1;          // processes on this node
  int nnodes = 1;
  int node_rank = 0;
  std::string master;      // ADDR:PORT of node 0's store; "" = 127.0.0.1 and a free port (one node)
  int grace_ms = 5000;     // after a failure: SIGTERM, then SIGKILL after this long
  std::vector<std::string> command;
};

int run_launch(const LaunchOptions& options);

}  // namespace switchyard
