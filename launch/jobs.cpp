#include "launch/jobs.h"

#include <atomic>
#include <iostream>

#include "core/logging.h"
#include "launch/bench_comm.h"
#include "parallel/runtime.h"

namespace switchyard {

int run_job(const JobConfig& config) {
  set_log_levels(config.log_level);
  if (config.job != "comm-bench") SY_THROW(ConfigError, config.source, ": job '", config.job, "' is not known");
  RuntimeOptions options;
  options.backend = config.comm.backend;
  options.ranks = config.comm.ranks;
  options.timeout = Milliseconds(config.comm.timeout_ms);
  std::atomic<int64_t> wrong{0};
  run_ranks(options, [&](Runtime& rt) {
    Communicator& world = rt.world();
    const bool leader = world.rank() == 0;
    if (leader) std::cout << "# switchyard " << config.source << ": job " << config.job << "\n";
    auto rows = run_bench_comm(world, config.bench, leader ? &std::cout : nullptr);
    if (!leader) return;
    for (const auto& r : rows) wrong += std::max<int64_t>(r.wrong, 0);
    if (!config.bench.csv.empty()) {
      write_bench_csv(config.bench.csv, rows, std::string(world.backend_name()), world.size());
      std::cout << "# wrote " << rows.size() << " rows to " << config.bench.csv << "\n";
    }
  });
  if (wrong > 0) {
    std::cerr << "switchyard: " << wrong << " wrong elements in the checked results\n";
    return 3;
  }
  return 0;
}

}  // namespace switchyard
