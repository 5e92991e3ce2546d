// Runs a test body on every rank of the backend the test binary was started
// with: N thread-ranks in this process (--backend=threads --ranks=N), or this
// process's rank under mpirun (--backend=mpi). All ranks get the same seed.
#pragma once

#include <cstdint>
#include <functional>
#include <string>

#include "comm/communicator.h"

namespace switchyard::testing {

struct RankHarnessConfig {
  std::string backend = "threads";
  int ranks = 2;
};

// Parses --backend= and --ranks= (after gtest removed its flags); sets up MPI
// and the abort-on-failure listener for the mpi backend.
void init_rank_harness(int argc, char** argv);
const RankHarnessConfig& harness_config();
bool harness_is_threads();

// fn(comm, seed) on every rank; throws on the main thread with the first
// failing rank's message (threads), or fails this process's test (mpi).
void for_each_rank(const std::function<void(Communicator&, uint64_t seed)>& fn,
                   Milliseconds op_timeout = Milliseconds(5000));

// A [rows, width] f32 tensor uniform in [-1, 1) from `seed`: any rank can
// regenerate any other rank's input.
Tensor random_tensor(uint64_t seed, int64_t rows, int64_t width);

// Releases MPI before exit.
void shutdown_rank_harness();

}  // namespace switchyard::testing
