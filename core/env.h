// The one typed, documented set of SWITCHYARD_* environment variables.
// Read once on first use; `switchyard info` prints the table with docs and values.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

namespace switchyard {

struct Env {
  std::string log_level = "warn";        // SWITCHYARD_LOG_LEVEL
  int64_t comm_timeout_ms = 300000;      // SWITCHYARD_COMM_TIMEOUT_MS
  std::string backend;                   // SWITCHYARD_BACKEND ("" = from the launcher)
  std::optional<int> rank;               // SWITCHYARD_RANK
  std::optional<int> world_size;         // SWITCHYARD_WORLD_SIZE
  std::optional<int> local_rank;         // SWITCHYARD_LOCAL_RANK
  std::optional<int> local_size;         // SWITCHYARD_LOCAL_SIZE
  int gemm_threads = 0;                  // SWITCHYARD_GEMM_THREADS (0 = cores / local ranks)
  std::optional<uint64_t> test_seed;     // SWITCHYARD_TEST_SEED
  int64_t mpi_max_message_bytes = int64_t{1} << 30;  // SWITCHYARD_MPI_MAX_MESSAGE_BYTES
  int64_t host_cache_bytes = int64_t{4} << 30;        // SWITCHYARD_HOST_CACHE_BYTES
  int64_t spin_us = 250;                 // SWITCHYARD_SPIN_US
  int64_t ucx_heartbeat_ms = 2000;       // SWITCHYARD_UCX_HEARTBEAT_MS
  std::string store;                     // SWITCHYARD_STORE (ADDR:PORT; parsed by ucx_store_address)
  bool poison_buffers = false;           // SWITCHYARD_POISON_BUFFERS
  std::string moe_ops = "cpu";           // SWITCHYARD_MOE_OPS
  std::string failpoint;                 // SWITCHYARD_FAILPOINT (core/failpoint.h)
};

struct EnvVarDoc {
  std::string name;
  std::string type;
  std::string default_value;
  std::string doc;
  std::optional<std::string> raw_value;  // as set in the environment, if set
};

using EnvLookup = std::function<std::optional<std::string>(const std::string& name)>;

// The process environment, parsed on first call. Throws ConfigError naming the
// variable, its value and what was expected.
const Env& env();
// Parse from any lookup (tests).
Env parse_env(const EnvLookup& lookup);
// Every variable with its doc and current raw value.
std::vector<EnvVarDoc> env_table(const EnvLookup& lookup);
std::optional<std::string> process_env(const std::string& name);

}  // namespace switchyard
