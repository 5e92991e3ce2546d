#include "parallel/runtime.h"

#include "comm/store/tcp_store.h"
#include "core/config.h"
#if SWITCHYARD_HAS_UCX
#include "comm/backends/ucx/ucx_backend.h"
#endif

#include <unistd.h>

#include <algorithm>
#include <charconv>
#include <thread>

#include "comm/backends/fake/fake_backend.h"
#include "comm/backends/threads/threads_backend.h"
#include "core/config.h"
#include "core/error.h"
#include "core/logging.h"
#include "kernels/gemm.h"
#if SWITCHYARD_HAS_MPI
#include "comm/backends/mpi/mpi_backend.h"
#endif

namespace switchyard {
namespace {

struct LauncherVars {
  const char* launcher;
  const char* rank;
  const char* size;
  const char* local_rank;
  const char* local_size;
};

// In the order they are tried; the first whose rank and size are both set wins.
constexpr LauncherVars kLaunchers[] = {
    {"torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"},
    {"open-mpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
     "OMPI_COMM_WORLD_LOCAL_SIZE"},
    {"pmi", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"},
    {"slurm", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE"},
};

int parse_int_var(const std::string& name, const std::string& value, int min) {
  int out = 0;
  // Slurm writes tasks per node as "4(x2),3": the leading count is this layout's local size.
  auto [end, ec] = std::from_chars(value.data(), value.data() + value.size(), out);
  const bool slurm_list = name == "SLURM_TASKS_PER_NODE" && ec == std::errc() && end != value.data();
  if (ec != std::errc() || (end != value.data() + value.size() && !slurm_list) || out < min)
    SY_THROW(ConfigError, name, "='", value, "': expected an integer >= ", min);
  return out;
}

}  // namespace

std::optional<RankInfo> discover_rank(const EnvLookup& lookup) {
  RankInfo info;
  info.launcher = "none";
  bool found = false;
  std::vector<std::string> from;
  for (const LauncherVars& l : kLaunchers) {
    auto rank = lookup(l.rank), size = lookup(l.size);
    if (!rank || !size) continue;
    found = true;
    info.launcher = l.launcher;
    info.rank = parse_int_var(l.rank, *rank, 0);
    info.world_size = parse_int_var(l.size, *size, 1);
    from.push_back(std::string(l.rank) + "/" + l.size);
    if (auto v = lookup(l.local_rank)) {
      info.local_rank = parse_int_var(l.local_rank, *v, 0);
      from.push_back(l.local_rank);
    }
    std::string local_size_var = l.local_size;
    auto ls = lookup(local_size_var);
    if (!ls && std::string(l.launcher) == "slurm") ls = lookup(local_size_var = "SLURM_TASKS_PER_NODE");
    if (ls) {
      info.local_size = parse_int_var(local_size_var, *ls, 1);
      from.push_back(local_size_var);
    } else {
      info.local_size = info.world_size;  // no node information: one node
    }
    break;
  }
  const Env e = parse_env(lookup);
  auto override_field = [&](const std::optional<int>& v, int& field, const char* name) {
    if (!v) return;
    field = *v;
    from.push_back(name);
    found = true;
  };
  const bool size_overridden = e.world_size.has_value();
  override_field(e.rank, info.rank, "SWITCHYARD_RANK");
  override_field(e.world_size, info.world_size, "SWITCHYARD_WORLD_SIZE");
  override_field(e.local_rank, info.local_rank, "SWITCHYARD_LOCAL_RANK");
  override_field(e.local_size, info.local_size, "SWITCHYARD_LOCAL_SIZE");
  if (!found) return std::nullopt;
  if (info.launcher == "none") info.launcher = "switchyard";
  if (size_overridden && !e.local_size && info.local_size > info.world_size) info.local_size = info.world_size;
  if (!e.local_rank && e.local_size) info.local_rank = info.rank % info.local_size;
  std::string source;
  for (const auto& f : from) source += (source.empty() ? "" : ", ") + f;
  info.source = source;
  if (info.rank >= info.world_size)
    SY_THROW(ConfigError, "rank ", info.rank, " is not below the world size ", info.world_size, " (from ", source, ")");
  if (info.local_size > info.world_size)
    SY_THROW(ConfigError, "local size ", info.local_size, " exceeds the world size ", info.world_size, " (from ",
             source, ")");
  if (info.local_rank >= info.local_size)
    SY_THROW(ConfigError, "local rank ", info.local_rank, " is not below the local size ", info.local_size,
             " (from ", source, ")");
  return info;
}

BackendChoice choose_backend(const std::string& requested, const EnvLookup& lookup) {
  if (!requested.empty()) return {requested, "requested explicitly"};
  const Env e = parse_env(lookup);
  if (!e.backend.empty()) return {e.backend, "SWITCHYARD_BACKEND"};
  auto info = discover_rank(lookup);
  if (!info || info->launcher == "switchyard") return {"threads", "no launcher variables: ranks as threads"};
  if (info->launcher == "torchrun")
    return {SWITCHYARD_HAS_UCX ? "ucx" : "tcp",
            "torchrun-style variables (RANK, WORLD_SIZE): UCX bootstrapped through the TCP store at MASTER_ADDR:MASTER_PORT"};
  return {"mpi", "launched by " + info->launcher + " (" + info->source + ")"};
}

Runtime::Runtime(std::shared_ptr<Communicator> world, RankInfo info, std::vector<int> node_of_rank)
    : world_(std::move(world)), info_(std::move(info)), node_of_rank_(std::move(node_of_rank)) {
  SY_CHECK_EQ(world_->rank(), info_.rank, "the world communicator's rank and the discovered rank");
  SY_CHECK_EQ(world_->size(), info_.world_size, "the world communicator's size and the discovered world size");
  if (node_of_rank_.empty())
    for (int r = 0; r < info_.world_size; ++r) node_of_rank_.push_back(r / info_.local_size);
  SY_CHECK_EQ(node_of_rank_.size(), static_cast<size_t>(info_.world_size), "node_of_rank entries");
  std::vector<int> node_members;
  for (int r = 0; r < info_.world_size; ++r) {
    nodes_ = std::max(nodes_, node_of_rank_[static_cast<size_t>(r)] + 1);
    if (node_of_rank_[static_cast<size_t>(r)] == node()) {
      if (r == info_.rank) info_.local_rank = static_cast<int>(node_members.size());
      node_members.push_back(r);
    }
  }
  info_.local_size = static_cast<int>(node_members.size());
  node_group_ = world_->create_group(node_members, "node" + std::to_string(node()));
  // Thread budget: this rank's share of the node's cores for its GEMMs.
  const int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  gemm_threads_ = env().gemm_threads > 0 ? env().gemm_threads : std::max(1, cores / info_.local_size);
  kernels::cpu::set_gemm_threads(gemm_threads_);
  kernels::cpu::warn_if_spinning(gemm_threads_, info_.local_size);
}

std::vector<int> nodes_from_host_names(Communicator& world) {
  char host[256] = {};
  gethostname(host, sizeof host - 1);
  Tensor mine = Tensor::empty({1}, DType::i64), all = Tensor::empty({world.size()}, DType::i64);
  mine.data_as<int64_t>()[0] = static_cast<int64_t>(std::hash<std::string>{}(host));
  world.allgather(mine, all).wait();
  std::vector<int> node_of_rank(static_cast<size_t>(world.size()));
  std::vector<int64_t> seen;
  for (int r = 0; r < world.size(); ++r) {
    const int64_t h = all.data_as<int64_t>()[r];
    auto it = std::find(seen.begin(), seen.end(), h);
    node_of_rank[static_cast<size_t>(r)] = static_cast<int>(it - seen.begin());
    if (it == seen.end()) seen.push_back(h);
  }
  return node_of_rank;
}

namespace {
uint16_t port_of(const std::string& text, const std::string& what) {
  char* end = nullptr;
  const long port = std::strtol(text.c_str(), &end, 10);
  if (text.empty() || *end != '\0' || port < 1 || port > 65535)
    SY_THROW(ConfigError, what, " = '", text, "', expected a port number 1..65535");
  return static_cast<uint16_t>(port);
}

}  // namespace

StoreAddress ucx_store_address(const RankInfo& info, const EnvLookup& lookup) {
  StoreAddress a;
  auto need = [&](const char* name) -> std::string {
    auto v = lookup(name);
    if (!v || v->empty())
      SY_THROW(ConfigError, "backend ucx: ", name, " is not set; start the processes with `switchyard launch` "
               "or torchrun (which set MASTER_ADDR and MASTER_PORT), or set SWITCHYARD_STORE=ADDR:PORT");
    return *v;
  };
  if (auto store = lookup("SWITCHYARD_STORE"); store && !store->empty()) {
    // `switchyard launch` (or the user) names the store; its host holds it.
    const auto colon = store->rfind(':');
    if (colon == std::string::npos || colon == 0)
      SY_THROW(ConfigError, "SWITCHYARD_STORE = '", *store, "', expected ADDR:PORT");
    a.host = store->substr(0, colon);
    a.port = port_of(store->substr(colon + 1), "SWITCHYARD_STORE's port");
    a.source = "SWITCHYARD_STORE";
    auto token = lookup("SWITCHYARD_STORE_TOKEN");
    if (!token || token->empty())
      SY_THROW(ConfigError, "backend ucx: SWITCHYARD_STORE is set but SWITCHYARD_STORE_TOKEN is not; expected the "
               "job's secret (`switchyard launch` sets both)");
    a.token = *token;
    return a;
  }
  // Torchrun-style: torch's store has MASTER_PORT, Switchyard's is the next port, hosted by rank 0.
  a.host = need("MASTER_ADDR");
  const uint16_t master = port_of(need("MASTER_PORT"), "MASTER_PORT");
  if (master == 65535) SY_THROW(ConfigError, "MASTER_PORT = 65535 leaves no port for Switchyard's store (MASTER_PORT + 1); "
                                "set SWITCHYARD_STORE=ADDR:PORT");
  a.port = static_cast<uint16_t>(master + 1);
  a.source = "MASTER_ADDR:MASTER_PORT+1 (hosted by rank 0)";
  a.hosted_by_rank0 = true;
  if (auto token = lookup("SWITCHYARD_STORE_TOKEN"); token && !token->empty()) {
    a.token = *token;
  } else {
    // Without a shared secret the token comes from what every rank of the job
    // sees: no more closed than torch's own store on MASTER_PORT.
    a.token = "torchrun:" + lookup("TORCHELASTIC_RUN_ID").value_or("") + ":" + a.host + ":" +
              std::to_string(master) + ":" + std::to_string(info.world_size);
  }
  return a;
}

#if SWITCHYARD_HAS_UCX
namespace {

constexpr const char* kUcxBootstrapPrefix = "bootstrap/ucx";

// Under torchrun-style variables nothing hosts Switchyard's store (torch's own
// store sits on MASTER_PORT), so rank 0 hosts it for the life of its process.
// At exit it stays up until every other rank has left (said done or failed, or
// its heartbeat stopped), so no rank loses the store while it still runs.
class HostedStore {
 public:
  HostedStore(const std::string& host, uint16_t port, const std::string& token, int world_size)
      : token_(token), world_size_(world_size) {
    try {
      server_ = std::make_unique<TcpStoreServer>(token, port, host);
      local_address_ = host == "0.0.0.0" ? "127.0.0.1" : host;  // where this process reaches it at exit
    } catch (const InvalidArgument&) {  // a host name, not an address: listen on every interface
      server_ = std::make_unique<TcpStoreServer>(token, port, "0.0.0.0");
    }
    port_ = server_->port();
  }
  ~HostedStore() {
    try {
      linger();
    } catch (const std::exception&) {
    }
  }
  uint16_t port() const { return port_; }

 private:
  // Until every other rank said done (or some rank failed), or its heartbeat stood still for the
  // heartbeat's own dead-after time (its process is gone); at most 30 s. Without a heartbeat
  // (SWITCHYARD_UCX_HEARTBEAT_MS=0) nothing tells, and the store goes at once.
  void linger() {
    const int64_t dead_after_ms = env().ucx_heartbeat_ms;
    if (world_size_ <= 1 || dead_after_ms <= 0) return;
    TcpStore store(local_address_, port_, token_, Milliseconds(1000));
    const std::string hb = std::string(kUcxBootstrapPrefix) + "/heartbeat/";
    using Clock = std::chrono::steady_clock;
    std::vector<std::optional<Store::Bytes>> last(static_cast<size_t>(world_size_));
    std::vector<Clock::time_point> changed(static_cast<size_t>(world_size_), Clock::now());
    std::vector<bool> left(static_cast<size_t>(world_size_), false);
    const auto deadline = Clock::now() + std::chrono::seconds(30);
    while (Clock::now() < deadline) {
      if (store.try_get(hb + "failed")) return;
      bool all_left = true;
      for (int r = 1; r < world_size_; ++r) {
        const size_t i = static_cast<size_t>(r);
        if (left[i]) continue;
        if (store.try_get(hb + "done/" + std::to_string(r))) {
          left[i] = true;
          continue;
        }
        auto beat = store.try_get(hb + "hb/" + std::to_string(r));
        if (beat != last[i]) {
          last[i] = beat;
          changed[i] = Clock::now();
        }
        left[i] = Clock::now() - changed[i] > std::chrono::milliseconds(dead_after_ms);
        all_left = all_left && left[i];
      }
      if (all_left) return;
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
  }
  std::unique_ptr<TcpStoreServer> server_;
  std::string local_address_ = "127.0.0.1";
  std::string token_;
  int world_size_;
  uint16_t port_ = 0;
};

HostedStore* g_hosted_store = nullptr;  // rank 0's under torchrun; lives until the process exits

}  // namespace

std::shared_ptr<Communicator> bootstrap_ucx_world(const RankInfo& info, Milliseconds timeout) {
  const StoreAddress address = ucx_store_address(info, process_env);
  const std::string& host = address.host;
  const std::string& token = address.token;
  const uint16_t port = address.port;
  if (address.hosted_by_rank0 && info.rank == 0 && !g_hosted_store) {
    try {
      g_hosted_store = new HostedStore(host, port, token, info.world_size);
    } catch (const IoError& e) {
      SY_THROW(IoError, "backend ucx: rank 0 hosts Switchyard's store at MASTER_PORT + 1 = ", port,
               " and cannot: ", e.what(), "; set SWITCHYARD_STORE=ADDR:PORT to choose its address");
    }
    // Destroyed at exit, after everything that uses it: it lingers until the other ranks have left.
    std::atexit([] { delete std::exchange(g_hosted_store, nullptr); });
  }
  TcpStore store(host, static_cast<uint16_t>(port), token, timeout);
  // Every rank must agree on the world size: a mismatch is named, not a hang.
  store.set("bootstrap/world_size/" + std::to_string(info.rank), Store::to_bytes(std::to_string(info.world_size)));
  const int64_t joined = store.add("bootstrap/joined", 1);
  if (joined > info.world_size)
    SY_THROW(ConfigError, "backend ucx: ", joined, " processes joined the store at ", host, ":", port,
             " but WORLD_SIZE = ", info.world_size, " here; every rank must be started with the same WORLD_SIZE");
  std::shared_ptr<Communicator> world;
  try {
    world = make_ucx_world_communicator(store, info.rank, info.world_size, kUcxBootstrapPrefix, timeout, [=] {
      return std::unique_ptr<Store>(std::make_unique<TcpStore>(host, static_cast<uint16_t>(port), token, timeout));
    });
  } catch (const TimeoutError& e) {
    SY_THROW(TimeoutError, e.what(), " (", store.add("bootstrap/joined", 0), " of WORLD_SIZE = ", info.world_size,
             " processes joined; a rank failed to start, or the ranks disagree on WORLD_SIZE)");
  }
  for (int r = 0; r < info.world_size; ++r) {
    const std::string theirs = Store::to_string(store.get("bootstrap/world_size/" + std::to_string(r), timeout));
    if (theirs != std::to_string(info.world_size))
      SY_THROW(ConfigError, "backend ucx: rank ", r, " has WORLD_SIZE = ", theirs, ", rank ", info.rank, " has ",
               info.world_size);
  }
  return world;
}
#endif

ProcessWorld connect_process_world(const RuntimeOptions& options) {
  const BackendChoice choice = choose_backend(options.backend, process_env);
  if (choice.backend == "threads") {
    if (options.ranks != 1)
      SY_THROW(ConfigError, "backend threads (", choice.reason, "): a process on its own holds one rank, got ranks = ",
               options.ranks, "; start several processes with mpirun or `switchyard launch`");
    ProcessWorld pw;
    pw.world = ThreadsWorld(1).communicator(0);  // the communicator keeps the world's state
    if (options.timeout) pw.world->set_default_timeout(*options.timeout);
    pw.info = RankInfo{0, 1, 0, 1, "none", "threads backend (one rank)"};
    return pw;
  }
  if (choice.backend == "mpi") {
#if SWITCHYARD_HAS_MPI
    auto world = make_mpi_world_communicator();
    if (options.timeout) world->set_default_timeout(*options.timeout);
    RankInfo info = discover_rank(process_env).value_or(RankInfo{world->rank(), world->size(), 0, world->size(),
                                                                 "none", "MPI_COMM_WORLD"});
    if (info.rank != world->rank() || info.world_size != world->size())
      SY_THROW(ConfigError, "launcher variables (", info.source, ") say rank ", info.rank, " of ", info.world_size,
               " but MPI_COMM_WORLD says ", world->rank(), " of ", world->size());
    // Nodes from host names, unless a local size is imposed (one machine acting as several nodes).
    std::vector<int> node_of_rank;
    if (options.local_size) {
      info.local_size = *options.local_size;
    } else if (!env().local_size) {
      node_of_rank = nodes_from_host_names(*world);
    }
    return {world, info, std::move(node_of_rank)};
#else
    SY_THROW(NotSupported, "backend mpi is not built in (configure with -DSWITCHYARD_WITH_MPI=ON)");
#endif
  }
  if (choice.backend == "tcp" || choice.backend == "ucx") {
#if SWITCHYARD_HAS_UCX
    const auto found = discover_rank(process_env);
    if (!found)
      SY_THROW(ConfigError, "backend ucx needs RANK and WORLD_SIZE (and MASTER_ADDR, MASTER_PORT, "
               "SWITCHYARD_STORE_TOKEN): start the processes with `switchyard launch` or torchrun");
    RankInfo info = *found;
    auto world = bootstrap_ucx_world(info, options.timeout.value_or(Milliseconds(60000)));
    if (options.timeout) world->set_default_timeout(*options.timeout);
    if (options.local_size) info.local_size = *options.local_size;
    return {world, info, {}};
#else
    SY_THROW(NotSupported, "backend ", choice.backend, " (", choice.reason,
             ") needs UCX, which this build lacks (install libucx-dev and reconfigure); or launch with mpirun");
#endif
  }
  SY_THROW(ConfigError, "backend '", choice.backend, "' (", choice.reason,
           ") has no process world; expected threads (one rank), mpi or ucx");
}

void run_ranks(const RuntimeOptions& options, const std::function<void(Runtime&)>& fn) {
  const BackendChoice choice = choose_backend(options.backend, process_env);
  SY_LOG_INFO("runtime", "backend ", choice.backend, ": ", choice.reason);
  if (choice.backend == "threads") {
    SY_CHECK_GE(options.ranks, 1, "threads ranks");
    const int local_size = options.local_size.value_or(options.ranks);
    run_thread_ranks(options.ranks, [&](Communicator& world) {
      // The world is owned by run_thread_ranks; the runtime holds it without owning.
      std::shared_ptr<Communicator> unowned(&world, [](Communicator*) {});
      RankInfo info{world.rank(), world.size(), world.rank() % local_size, local_size, "switchyard",
                    "threads backend"};
      Runtime rt(unowned, info);
      fn(rt);
    }, {options.timeout});
    return;
  }
  if (choice.backend == "fake") {
    auto world = make_fake_communicator(options.fake_rank, options.ranks);
    if (options.timeout) world->set_default_timeout(*options.timeout);
    const int local_size = options.local_size.value_or(options.ranks);
    Runtime rt(world, RankInfo{options.fake_rank, options.ranks, options.fake_rank % local_size, local_size, "none",
                               "fake backend"});
    fn(rt);
    return;
  }
  if (choice.backend == "mpi" || choice.backend == "tcp" || choice.backend == "ucx") {
    ProcessWorld pw = connect_process_world(options);
    Runtime rt(pw.world, pw.info, std::move(pw.node_of_rank));
    fn(rt);
    return;
  }
  SY_THROW(ConfigError, "unknown backend '", choice.backend, "' (", choice.reason, "), expected threads, mpi or fake");
}

}  // namespace switchyard
