// bench scale: weak or strong scaling of the MoE layer over rank counts. Rank
// counts this machine can run for real (threads) are timed on the wall clock;
// every count is also run on an emulated cluster (timing only), so the curve
// reaches sizes no 2-core box has. Writes CSV and, when gnuplot is present, a
// PNG of tokens/s against ranks.
#pragma once

#include <string>
#include <vector>

#include "launch/bench_moe.h"

namespace switchyard {

struct BenchScaleOptions {
  std::string mode = "weak";  // weak: tokens and experts per rank fixed; strong: global tokens and experts fixed
  std::vector<int> ranks{2, 4, 8, 16, 32, 64};
  int real_ranks = 2;         // counts up to this also run for real
  std::string emulate = "h100-nvlink-ib";
  std::string csv = "bench-scale.csv";
  std::string png = "bench-scale.png";  // "" = no plot
  BenchMoeOptions moe;        // per-rank sizes (weak) or those of the first count (strong)
};

int run_bench_scale(const BenchScaleOptions& options);

}  // namespace switchyard
