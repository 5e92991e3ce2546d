#include "launch/bench_scale.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>

#include "core/error.h"
#include "launch/plot.h"

namespace switchyard {

int run_bench_scale(const BenchScaleOptions& s) {
  if (s.mode != "weak" && s.mode != "strong")
    SY_THROW(ConfigError, "--mode = '", s.mode, "', expected weak or strong");
  if (s.ranks.empty()) SY_THROW(ConfigError, "--ranks is empty; expected a list such as 2,4,8");
  for (int w : s.ranks)
    if (w < 1) SY_THROW(ConfigError, "--ranks has ", w, "; expected counts >= 1");
  const int base = s.ranks.front();
  const int64_t base_tokens = static_cast<int64_t>(s.moe.batch_size) * s.moe.num_tokens;
  const int base_experts = s.moe.num_local_experts > 0 ? s.moe.num_local_experts * base : base / -s.moe.num_local_experts;
  std::ofstream csv(s.csv);
  if (!csv) SY_THROW(IoError, "bench scale: cannot write '", s.csv, "'");
  csv << "mode,ranks,kind,experts,tokens_per_rank,plan,step_time_s,wall_s,tokens_per_s\n";
  std::printf("# switchyard bench scale (%s): ranks %s; up to %d real thread-ranks on this machine (wall clock), "
              "every count also emulated on %s (timing only, virtual clock)\n",
              s.mode.c_str(), [&] {
                std::string l;
                for (int w : s.ranks) l += (l.empty() ? "" : ",") + std::to_string(w);
                return l;
              }().c_str(),
              s.real_ranks, s.emulate.c_str());
  std::printf("# %-6s %-9s %7s %12s  %-40s %12s %12s %14s\n", "ranks", "kind", "experts", "tokens/rank", "plan",
              "step_time", "wall", "tokens/s");
  std::string real_points, emulated_points;  // "ranks tokens/s" lines for the plot
  for (int w : s.ranks) {
    BenchMoeOptions o = s.moe;
    o.ranks = w;
    o.backend = "threads";
    o.quiet = true;
    int experts = 0;
    if (s.mode == "weak") {
      experts = s.moe.num_local_experts > 0 ? s.moe.num_local_experts * w : w / -s.moe.num_local_experts;
    } else {
      experts = base_experts;
      o.batch_size = 1;
      o.num_tokens = static_cast<int>(base_tokens * base / w);
      if (experts % w != 0 && w % experts != 0) {
        std::printf("#   %d ranks: %d experts neither divide nor are divided by the ranks; skipped\n", w, experts);
        continue;
      }
      o.num_local_experts = experts >= w ? experts / w : -(w / experts);
    }
    o.top = std::min(o.top, experts);  // k <= E at the smallest counts
    for (const bool real : {true, false}) {
      if (real && w > s.real_ranks) continue;
      BenchMoeOptions run = o;
      if (!real) {
        run.emulate = s.emulate;
        run.timing_only = true;
        run.nodes = 0;
      }
      BenchMoeResult r;
      run.result = &r;
      run_bench_moe(run);
      const double tps = static_cast<double>(r.tokens) / r.step_time;
      const int64_t per_rank = static_cast<int64_t>(run.batch_size) * run.num_tokens;
      std::printf("  %-6d %-9s %7d %12lld  %-40s %12.6f %12.6f %14.0f\n", w, real ? "real" : "emulated", experts,
                  static_cast<long long>(per_rank), r.plan.c_str(), r.step_time, r.wall, tps);
      std::fflush(stdout);
      std::string plan = r.plan;  // commas would split the CSV field for simple readers (gnuplot)
      for (auto& ch : plan)
        if (ch == ',') ch = ';';
      csv << s.mode << ',' << w << ',' << (real ? "real" : "emulated") << ',' << experts << ',' << per_rank << ','
          << plan << ',' << r.step_time << ',' << r.wall << ',' << tps << '\n';
      csv.flush();
      (real ? real_points : emulated_points) += std::to_string(w) + " " + std::to_string(tps) + "\n";
    }
  }
  csv.close();
  std::printf("# wrote %s\n", s.csv.c_str());
  if (s.png.empty()) return 0;
  std::ostringstream gp;
  gp << "set logscale xy 2\nset offsets graph 0.03, graph 0.03, 0, 0\nset key top left\nset grid\n"
     << "set xlabel 'ranks'\nset ylabel 'tokens/s (all ranks)'\nset format y '%.0s%c'\n"
     << "set title 'bench scale (" << s.mode << "): " << s.emulate << " virtual clock vs this machine wall clock'\n"
     << "$emulated << EOD\n" << emulated_points << "EOD\n$real << EOD\n" << real_points << "EOD\n"
     << "plot $emulated using 1:2 with linespoints title 'emulated " << s.emulate
     << "', $real using 1:2 with points pt 7 ps 1.5 title 'real (this machine)'\n";
  plot_png(s.png, gp.str());
  return 0;
}

}  // namespace switchyard
