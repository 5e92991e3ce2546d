#include "core/env.h"

#include <algorithm>

#include <charconv>
#include <cstdint>
#include <cstdlib>

#include "core/error.h"
#include "core/failpoint.h"

namespace switchyard {
namespace {

template <typename T>
T parse_integer(const std::string& name, const std::string& value, T min, const char* expected) {
  T out{};
  auto [end, ec] = std::from_chars(value.data(), value.data() + value.size(), out);
  if (ec != std::errc() || end != value.data() + value.size() || out < min)
    SY_THROW(ConfigError, name, "='", value, "': expected ", expected);
  return out;
}

struct VarSpec {
  const char* name;
  const char* type;
  const char* default_value;
  const char* doc;
  std::function<void(Env&, const std::string&, const std::string&)> apply;
};

const std::vector<VarSpec>& specs() {
  static const std::string failpoint_doc =
      "Testing: NAME or NAME#N kills this process with SIGKILL the N-th time (default 1) it passes the named point, "
      "so a crash there can be tested (points: " + failpoint_names() + ").";
  static const std::vector<VarSpec> table = {
      {"SWITCHYARD_LOG_LEVEL", "string", "warn",
       "Log level: trace, debug, info, warn, error or off; per subsystem as 'warn,comm=debug'.",
       [](Env& e, const std::string&, const std::string& v) { e.log_level = v; }},
      {"SWITCHYARD_COMM_TIMEOUT_MS", "int", "300000",
       "Default timeout of a communication op in milliseconds (an op's own option wins).",
       [](Env& e, const std::string& n, const std::string& v) {
         e.comm_timeout_ms = parse_integer<int64_t>(n, v, 1, "a positive number of milliseconds");
       }},
      {"SWITCHYARD_BACKEND", "string", "",
       "Communicator backend when the config names none: threads, mpi, ucx or fake.",
       [](Env& e, const std::string&, const std::string& v) { e.backend = v; }},
      {"SWITCHYARD_RANK", "int", "", "Rank of this process; overrides every launcher's variable.",
       [](Env& e, const std::string& n, const std::string& v) { e.rank = parse_integer<int>(n, v, 0, "a rank >= 0"); }},
      {"SWITCHYARD_WORLD_SIZE", "int", "", "Number of ranks; overrides every launcher's variable.",
       [](Env& e, const std::string& n, const std::string& v) {
         e.world_size = parse_integer<int>(n, v, 1, "a world size >= 1");
       }},
      {"SWITCHYARD_LOCAL_RANK", "int", "", "Rank within this node; overrides the launcher's.",
       [](Env& e, const std::string& n, const std::string& v) {
         e.local_rank = parse_integer<int>(n, v, 0, "a local rank >= 0");
       }},
      {"SWITCHYARD_LOCAL_SIZE", "int", "",
       "Ranks per node; overrides the launcher's (lets one machine act as several nodes).",
       [](Env& e, const std::string& n, const std::string& v) {
         e.local_size = parse_integer<int>(n, v, 1, "a local size >= 1");
       }},
      {"SWITCHYARD_GEMM_THREADS", "int", "0", "GEMM threads per rank; 0 = cores on the node / local ranks.",
       [](Env& e, const std::string& n, const std::string& v) {
         e.gemm_threads = parse_integer<int>(n, v, 0, "a thread count >= 0");
       }},
      {"SWITCHYARD_SPIN_US", "int", "250",
       "Microseconds a communicator's waits poll (yielding the core) before they sleep: a small op's "
       "hand-offs between threads, and a short wait for a slower rank, then cost no wake-up; 0 = always sleep.",
       [](Env& e, const std::string& n, const std::string& v) {
         e.spin_us = parse_integer<int64_t>(n, v, 0, "microseconds in [0, 1000000]");
         if (e.spin_us > 1000000) SY_THROW(ConfigError, n, "='", v, "': expected microseconds in [0, 1000000]");
       }},
      {"SWITCHYARD_STORE", "string", "",
       "ADDR:PORT of the job's TCP store for the ucx backend (`switchyard launch` sets it, with SWITCHYARD_STORE_TOKEN, "
       "and gives torch MASTER_PORT); unset under torchrun: rank 0 hosts it at MASTER_ADDR:MASTER_PORT+1.",
       [](Env& e, const std::string&, const std::string& v) { e.store = v; }},
      {"SWITCHYARD_UCX_HEARTBEAT_MS", "int", "2000",
       "UCX backend: a rank whose heartbeat (through the job's store, every 250 ms) stops this long is declared dead "
       "and every rank's ops fail naming it; 0 = no heartbeat (dead peers are then found at the op timeout).",
       [](Env& e, const std::string& n, const std::string& v) {
         e.ucx_heartbeat_ms = parse_integer<int64_t>(n, v, 0, "milliseconds >= 0 (0: off)");
       }},
      {"SWITCHYARD_POISON_BUFFERS", "bool", "0",
       "Debug: fill every pooled MoE buffer with NaN bytes when a batch takes it, so a read before a write shows "
       "(the test suite sets it); 0 or 1.",
       [](Env& e, const std::string& n, const std::string& v) {
         if (v != "0" && v != "1") SY_THROW(ConfigError, n, "='", v, "': expected 0 or 1");
         e.poison_buffers = v == "1";
       }},
      {"SWITCHYARD_MOE_OPS", "string", "cpu",
       "Debug: what MoE layers without a device model run their operations on: cpu, or emulated (every operation "
       "through the emulated-device decorator with no device to charge, to check that it computes exactly what the "
       "host does; the test suite runs the MoE tests both ways).",
       [](Env& e, const std::string& n, const std::string& v) {
         if (v != "cpu" && v != "emulated") SY_THROW(ConfigError, n, "='", v, "': expected cpu or emulated");
         e.moe_ops = v;
       }},
      {"SWITCHYARD_FAILPOINT", "string", "", failpoint_doc.c_str(),
       [](Env& e, const std::string& n, const std::string& v) {
         const auto hash = v.find('#');
         if (v.empty() || hash == 0) SY_THROW(ConfigError, n, "='", v, "': expected NAME or NAME#N");
         if (hash != std::string::npos) parse_integer<int64_t>(n, v.substr(hash + 1), 1, "a pass count N >= 1 after '#'");
         const std::string name = v.substr(0, hash);
         if (std::find(std::begin(kFailpoints), std::end(kFailpoints), name) == std::end(kFailpoints))
           SY_THROW(ConfigError, n, "='", v, "': no point '", name, "'; expected one of ", failpoint_names());
         e.failpoint = v;
       }},
      {"SWITCHYARD_TEST_SEED", "uint64", "", "Seed for test inputs, to reproduce a failure (tests print theirs).",
       [](Env& e, const std::string& n, const std::string& v) {
         e.test_seed = parse_integer<uint64_t>(n, v, 0, "an unsigned 64-bit seed");
       }},
      {"SWITCHYARD_MPI_MAX_MESSAGE_BYTES", "int", "1073741824",
       "Largest single MPI point-to-point message; bigger ones travel in pieces (MPI counts are int).",
       [](Env& e, const std::string& n, const std::string& v) {
         e.mpi_max_message_bytes = parse_integer<int64_t>(n, v, 1, "a byte count in [1, 2147483647]");
         if (e.mpi_max_message_bytes > INT32_MAX) SY_THROW(ConfigError, n, "='", v, "': expected a byte count in [1, 2147483647]");
       }},
      {"SWITCHYARD_HOST_CACHE_BYTES", "int", "4294967296",
       "Freed host blocks of 1 MiB and more kept for reuse, at most this many bytes (0 = no cache).",
       [](Env& e, const std::string& n, const std::string& v) {
         e.host_cache_bytes = parse_integer<int64_t>(n, v, 0, "a byte count >= 0");
       }},
  };
  return table;
}

}  // namespace

std::optional<std::string> process_env(const std::string& name) {
  const char* v = std::getenv(name.c_str());
  if (!v) return std::nullopt;
  return std::string(v);
}

Env parse_env(const EnvLookup& lookup) {
  Env e;
  for (const auto& spec : specs())
    if (auto v = lookup(spec.name); v && !v->empty()) spec.apply(e, spec.name, *v);
  return e;
}

const Env& env() {
  static const Env parsed = parse_env(process_env);
  return parsed;
}

std::vector<EnvVarDoc> env_table(const EnvLookup& lookup) {
  std::vector<EnvVarDoc> out;
  for (const auto& spec : specs()) out.push_back({spec.name, spec.type, spec.default_value, spec.doc, lookup(spec.name)});
  return out;
}

}  // namespace switchyard
