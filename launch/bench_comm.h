// bench comm: nccl-tests-style sweeps of one collective over message sizes,
// every result checked. Columns: size count type redop root time algbw busbw #wrong.
#pragma once

#include <ostream>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "launch/config.h"

namespace switchyard {

struct BenchRow {
  std::string op;
  int64_t bytes = 0;   // nccl-tests "size": see bench_bytes_meaning()
  int64_t count = 0;   // bytes / element size
  DType dtype = DType::f32;
  std::string redop;   // "none" for data movement
  int root = -1;
  double time_us = 0;  // per op, the slowest rank's average over the timed iterations
  double algbw = 0;    // GB/s = bytes / time
  double busbw = 0;    // algbw x the op's bus factor (nccl-tests' definitions)
  int64_t wrong = 0;   // mismatching elements over all ranks (-1 when not checked)
};

// The ops bench comm knows, and nccl-tests' bus-bandwidth factor for each.
const std::vector<std::string>& bench_ops();
double bus_factor(const std::string& op, int ranks);

// Runs the sweep for every op in cfg.ops on every rank of `comm` (a collective
// call). Rank 0 prints the table to `out` (nullptr elsewhere) row by row.
std::vector<BenchRow> run_bench_comm(Communicator& comm, const BenchCommSection& cfg, std::ostream* out);

void write_bench_csv(const std::string& path, const std::vector<BenchRow>& rows, const std::string& backend, int ranks);

}  // namespace switchyard
