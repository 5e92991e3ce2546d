// Runtime: who this process is (rank discovery from launcher variables), the
// world communicator of the chosen backend, and the node grouping.
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "core/env.h"

namespace switchyard {

struct RankInfo {
  int rank = 0;
  int world_size = 1;
  int local_rank = 0;
  int local_size = 1;
  std::string launcher;  // "torchrun", "open-mpi", "pmi", "slurm", "switchyard", "none"
  std::string source;    // which variables gave the values, for `switchyard info`
};

// Reads launcher variables in the order torchrun (RANK, WORLD_SIZE, LOCAL_RANK,
// LOCAL_WORLD_SIZE), Open MPI (OMPI_COMM_WORLD_*), PMI (PMI_RANK, PMI_SIZE,
// MPI_LOCALRANKID, MPI_LOCALNRANKS), Slurm (SLURM_PROCID, SLURM_NTASKS,
// SLURM_LOCALID, SLURM_NTASKS_PER_NODE or SLURM_TASKS_PER_NODE); SWITCHYARD_RANK,
// _WORLD_SIZE, _LOCAL_RANK, _LOCAL_SIZE override field by field. nullopt when
// no launcher and no override says anything. ConfigError for inconsistent values.
std::optional<RankInfo> discover_rank(const EnvLookup& lookup);

// Which backend a process should use when the config leaves it open: the
// launcher decides (Open MPI/PMI/Slurm -> mpi; none -> threads).
struct BackendChoice {
  std::string backend;
  std::string reason;
};
BackendChoice choose_backend(const std::string& requested, const EnvLookup& lookup);

struct RuntimeOptions {
  std::string backend;  // threads | mpi | fake ("" = choose_backend)
  int ranks = 1;        // threads and fake: world size (mpi: from the launcher)
  int fake_rank = 0;    // fake: which rank this process plays
  std::optional<Milliseconds> timeout;
  // Ranks per node, placed in blocks (lets one machine act as several nodes);
  // unset: from host names for mpi, all ranks on one node for threads and fake.
  // SWITCHYARD_LOCAL_SIZE sets it too.
  std::optional<int> local_size;
};

class Runtime {
 public:
  // One rank's runtime over an existing world communicator. `node_of_rank`
  // gives each world rank's node (e.g. from host names); empty: ranks are
  // taken as placed in blocks of info.local_size.
  Runtime(std::shared_ptr<Communicator> world, RankInfo info, std::vector<int> node_of_rank = {});

  Communicator& world() { return *world_; }
  std::shared_ptr<Communicator> world_ptr() { return world_; }
  // local_rank / local_size describe this rank's node as the runtime grouped it.
  const RankInfo& info() const { return info_; }
  int node() const { return node_of_rank_[static_cast<size_t>(info_.rank)]; }
  int nodes() const { return nodes_; }
  const std::vector<int>& node_of_rank() const { return node_of_rank_; }
  // Ranks on this node (created at construction, never per batch).
  Communicator& node_group() { return *node_group_; }
  // GEMM threads of this rank (set for the constructing thread): SWITCHYARD_GEMM_THREADS,
  // else the node's cores / its ranks.
  int gemm_threads() const { return gemm_threads_; }

 private:
  std::shared_ptr<Communicator> world_;
  RankInfo info_;
  std::vector<int> node_of_rank_;
  int nodes_ = 1;
  int gemm_threads_ = 1;
  std::shared_ptr<Communicator> node_group_;
};

// Node index of every rank from a collective exchange of host names: nodes are
// numbered in order of their lowest rank.
std::vector<int> nodes_from_host_names(Communicator& world);

// Where a UCX world's ranks meet. SWITCHYARD_STORE=ADDR:PORT (set by
// `switchyard launch`, with SWITCHYARD_STORE_TOKEN) names a store someone
// hosts. Otherwise (torchrun, or its variables set by hand) torch keeps
// MASTER_PORT and Switchyard's store is MASTER_ADDR:MASTER_PORT+1, hosted by
// rank 0, with SWITCHYARD_STORE_TOKEN if set, else a token made from the job's
// variables. ConfigError naming a missing or malformed variable.
struct StoreAddress {
  std::string host;
  uint16_t port = 0;
  std::string token;
  bool hosted_by_rank0 = false;
  std::string source;  // which variables gave it
};
StoreAddress ucx_store_address(const RankInfo& info, const EnvLookup& lookup);

// The UCX world of a process started by `switchyard launch` or torchrun,
// through the store ucx_store_address() names (rank 0 hosting it under
// torchrun). ConfigError naming a missing variable or a WORLD_SIZE mismatch.
std::shared_ptr<Communicator> bootstrap_ucx_world(const RankInfo& info, Milliseconds timeout);

// This process's world where ranks are processes (mpi, ucx/tcp), or a lone
// process's one-rank threads world: what embedders (the Python module) hold
// for the life of their program. node_of_rank is empty unless host names gave it.
struct ProcessWorld {
  std::shared_ptr<Communicator> world;
  RankInfo info;
  std::vector<int> node_of_rank;
};
ProcessWorld connect_process_world(const RuntimeOptions& options);

// Runs fn on every rank of the configured backend: N threads of this process
// (threads), this process's rank (mpi, fake). Errors propagate as in run_thread_ranks.
void run_ranks(const RuntimeOptions& options, const std::function<void(Runtime&)>& fn);

}  // namespace switchyard
