// bench moe: Tutel's helloworld, same flags and output lines, on Switchyard's
// MoE layer: forward (and backward + SGD unless --eval) per step, then a
// per-phase breakdown, the GEMMs it ran, and the step time against the floor
// of those GEMMs timed on the same shapes in the same run.
#pragma once

#include <string>

#include "moe/moe_layer.h"

namespace switchyard {

// Median seconds to memcpy `bytes` between two buffers: the floor of a phase
// that reads and writes that many bytes once (bench moe's encode/decode, bench decode).
double time_memcpy(int64_t bytes);

// What a run measured (rank 0's view of the synchronized steps), for bench scale.
struct BenchMoeResult {
  double step_time = 0;  // median after warm-up: virtual when emulated, else wall
  double wall = 0;       // median wall seconds on this machine
  std::string plan;      // the last step's plan
  int64_t tokens = 0;    // all ranks' tokens per step
};

struct BenchMoeOptions {
  int batch_size = 16;
  int num_tokens = 512;
  int model_dim = 2048;
  int hidden_size = 2048;
  int num_local_experts = 2;  // per rank; -S: S ranks share one expert (Tutel's meaning)
  int top = 2;
  std::string dtype = "float32";
  double capacity_factor = 1.0;
  std::string capacity_rounding = "tutel";  // tutel: Tutel's k*floor(cf*ceil(T/E)), so its flags drop the same tokens
  int num_steps = 100;
  bool eval = false;
  bool input_grad = false;
  std::string exchange = "padded";
  std::string activation = "relu";
  std::string backend;  // "" = from the launcher (threads without one)
  int ranks = 1;        // threads
  // Execution plan (Tutel's flags): sharding degree r (-1: 1), pipelining
  // degree, 2D-hierarchical all-to-all; --strategy auto lets the planner
  // choose per batch; --sweep runs every plan in turn and tabulates them.
  int adaptive_r = -1;
  int overlap_degree = 1;
  bool use_2dh = false;
  std::string strategy = "fixed";  // fixed | auto
  bool sweep = false;
  // Batches in flight per step: the step's tokens split into this many
  // micro-batches, all planned and dispatched before any combines (handles).
  int microbatches = 1;
  bool send_once = false;  // MoEConfig::send_once_per_rank (dropless)
  // Expert data parallelism: expert groups of ep_size ranks (0: the world);
  // num_local_experts is per rank of an expert group (E = it x ep_size).
  int ep_size = 0;
  // Redundant experts (EPLB): R extra replicas (E + R physical experts over
  // the ranks), re-placed from the measured loads every rebalance_every steps.
  int redundant_experts = 0;
  int rebalance_every = 0;
  // Which replica a routed choice uses (MoEConfig::replica_choice): in_turn
  // or nearest (own rank, then node, balanced).
  std::string replica_choice = "in_turn";
  // Where the layer runs: cpu, or cuda (CudaOps on each rank's GPU; launch/moe_device.h).
  std::string device = "cpu";
  // Group-limited routing (DeepSeek-V3's n_group / topk_group): experts in
  // expert_groups consecutive groups, each token choosing among its
  // topk_groups best groups; eplb_policy hierarchical packs those groups
  // onto the nodes (replicas inside each node), global ignores them.
  int expert_groups = 1;
  int topk_groups = 1;
  std::string eplb_policy = "global";
  // A skewed gate: "zipf:S" lowers expert e's logit by S ln(e + 1) (through a
  // constant input feature): the gate's probabilities fall off like a Zipf
  // law, and top-k loads concentrate on the first experts even more.
  std::string gate_skew;
  // A physical expert placement file (launch/placement_file.h); "": E / W per rank.
  std::string placement;
  int nodes = 0;  // for 2DH: ranks per node = ranks / nodes (0: the runtime's nodes)
  // Emulated cluster (configs/clusters/<preset>.yaml): step times are virtual,
  // wall time is appended. timing_only skips GEMMs and bulky payloads.
  std::string emulate;
  bool timing_only = false;
  double lr = 1e-3;
  bool quiet = false;                // no per-step lines and no breakdown (bench scale)
  BenchMoeResult* result = nullptr;  // filled when set
  uint64_t seed = 1;
};

int run_bench_moe(const BenchMoeOptions& options);

}  // namespace switchyard
