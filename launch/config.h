// The YAML job configuration of `switchyard run --config FILE --set a.b=v`.
//
// Every key is one entry of a schema table (launch/config.cpp): its dotted
// path, type, range or choices, doc and setter. Loading, validation, the
// effective-config dump and the documented schema (docs/config.md) all read
// that table, so a new section is a few new entries. Every error is a
// ConfigError naming the file:line:col (or the --set override), the dotted
// key, the value found and what was expected.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "core/dtype.h"

namespace switchyard {

// comm: the world communicator.
struct CommSection {
  std::string backend = "auto";  // auto (the launcher's, else threads) | threads | mpi | ucx | fake
  int ranks = 4;                    // ranks of the threads and fake backends (mpi: from mpirun)
  int64_t timeout_ms = 30000;       // per-op timeout
};

// bench: the comm-bench job (nccl-tests style sweep).
struct BenchCommSection {
  // Each one of: allreduce, reduce_scatter, allgather, alltoall, broadcast, sendrecv.
  std::vector<std::string> ops = {"alltoall"};
  int64_t min_bytes = 65536;
  int64_t max_bytes = 67108864;
  int64_t step_factor = 2;
  int iters = 20;
  int warmup = 5;
  DType dtype = DType::f32;
  std::string redop = "sum";  // sum | max | min
  std::string algorithm = "auto";  // auto | native | generic
  int root = 0;               // broadcast root (checked against the world size at run time)
  bool check = true;          // verify every result, count #wrong
  std::string csv;            // "" = no csv
};

struct MoESection {
  int64_t model_dim = 64;
  int64_t hidden_dim = 128;
  int experts = 8;  // global; a multiple of the number of ranks
  int top_k = 2;
  double capacity_factor = 1.25;
  std::string capacity_rounding = "switchyard";  // switchyard | tutel
  std::string balance_loss = "all_choices";      // all_choices | top1
  std::string exchange = "padded";   // padded | dropless
  std::string activation = "gelu";   // relu | gelu | swiglu
  std::string gate = "softmax";      // softmax | sigmoid_bias
  int expert_groups = 1;             // group-limited routing: groups of experts (1: plain top-k)
  int topk_groups = 1;               // ... the groups a token chooses among
  std::string eplb_policy = "global";  // global | hierarchical
  std::string strategy = "auto";     // auto (the planner) | fixed (r, overlap_degree, a2a, exchange below)
  int r = 1;                         // sharding degree of the fixed plan
  int overlap_degree = 1;            // pipelining degree d of the fixed plan
  std::string a2a = "flat";          // flat | 2dh
  int nodes = 0;                     // nodes the ranks form, for 2dh (0: the runtime's)
  int expert_parallel_size = 0;      // EP x DP: ranks per expert group (0: the world)
  int redundant_experts = 0;         // EPLB: extra replicas (E + R physical experts over the ranks)
  std::string replica_choice = "in_turn";  // in_turn | nearest (MoEConfig::replica_choice)
  std::string device = "cpu";  // cpu | cuda (launch/moe_device.h; job moe-train)
  int rebalance_every = 0;           // re-place the replicas from measured loads every N steps (0: never)
};

struct TrainSection {
  int steps = 100;
  int64_t tokens_per_rank = 256;
  double lr = 0.05;
  double balance_coef = 0.01;
  double z_coef = 0.0;
  double bias_rate = 0.001;  // sigmoid_bias gate: per-step bias adjustment (aux-loss-free balancing)
  int log_every = 10;
  int64_t seed = 1;
  // moe-lm-train only:
  int64_t warmup = 20;          // linear learning-rate warm-up steps, then cosine decay
  double min_lr_ratio = 0.1;    // the decay ends at lr * this
  double clip = 1.0;            // global gradient-norm limit; 0: none
  double weight_decay = 0.0;    // AdamW's decoupled decay
  DType dtype = DType::f32;     // the experts' GEMMs: f32 or bf16 (fp32 masters)
  std::string checkpoint;       // directory of the sharded checkpoint; "": none
  int checkpoint_every = 0;     // also save every this many steps; 0: only at the end
  bool resume = false;          // continue from train.checkpoint when it holds one
  int stop_after = 0;           // end this run after this many steps (checkpointed; the schedule spans train.steps); 0: run to the end
};

// lm: the decoder the moe-lm-train job trains (its FFNs are moe.* layers; d_model is moe.model_dim).
struct LmSection {
  int layers = 2;
  int heads = 4;
  int seq = 128;     // bytes per training sequence (the model's max_seq)
  int batch = 16;    // sequences per step over all ranks
  std::string corpus = "/usr/share/games/fortunes";
  int eval_every = 100;      // held-out loss every this many steps (and at the end)
  int eval_sequences = 128;  // held-out windows of lm.seq bytes per evaluation
  int probe_plans = 1;       // moe.strategy auto: time each fixed candidate plan this many steps first; 0: no probe
};

// model: the decoder the serve job runs, and how it runs over the ranks.
struct ModelSection {
  std::string path = "examples/tiny_lm/base";  // a folder with config.json and model.safetensors
  std::string attention = "replicated";        // replicated | dp | tp (model/layer_schedule.h)
  int tp = 1;                                   // ranks per tensor-parallel attention group
  std::string afd;                              // "A:F": attention-FFN disaggregation (empty: colocated)
  int microbatches = 1;                         // with afd: micro-batches ping-ponged per step
  std::string dispatch_dtype = "f32";           // what the MoE exchanges carry: f32 | bf16
  std::string combine_dtype = "f32";
  int threads = 0;                              // GEMM threads per rank; 0: cores / ranks on the node
  int redundant_experts = 0;                    // extra expert replicas (EPLB), re-placed every rebalance_every steps
  int rebalance_every = 0;                      // serving steps between re-placements; 0: never
  std::string affinity;                         // speculative MoE tables (affinity build); "" = none
  std::string specmoe = "off";                  // token shuffling with them: off | on | auto
};

// serve: a stream of requests through the model (continuous batching).
struct ServeSection {
  int requests = 64;
  double rate = 0;          // Poisson arrivals per second; 0: all at once
  int prompt_tokens = 32;   // prompts of prompt_tokens/2 .. 3*prompt_tokens/2 tokens
  int new_tokens = 32;      // outputs of new_tokens/2 .. 3*new_tokens/2 tokens
  int max_batch = 64;       // sequences in flight per rank
  int64_t kv_budget = 0;    // KV positions per rank; 0: unlimited
  int prefill_chunk = 0;    // prompt tokens per rank per step; 0: whole prompts
  int64_t seed = 1;
  std::string scheduler = "round_robin";  // round_robin | affinity (by model.affinity)
  std::string csv;          // a row per request; "" = none
};

struct JobConfig {
  std::string job = "comm-bench";
  CommSection comm;
  BenchCommSection bench;
  MoESection moe;
  TrainSection train;
  LmSection lm;
  ModelSection model;
  ServeSection serve;
  std::string log_level = "warn";  // log.level, a SWITCHYARD_LOG_LEVEL-style spec
  std::string source = "<defaults>";  // the file name, or "<defaults>"
  // Where each key set by the file or an override came from ("file:line:col",
  // "--set key=value"), for errors found after loading; unset keys are absent.
  std::map<std::string, std::string> origin;
  std::string where(const std::string& key) const {  // "file:line:col", or "<source> (default)"
    const auto it = origin.find(key);
    return it != origin.end() ? it->second : source + " (default)";
  }
};

// Loads a YAML file, then applies overrides ("dotted.key=value", the value a
// YAML scalar or flow node such as "[alltoall,allreduce]") in order. Missing
// keys keep their defaults; an empty file is all defaults. Throws ConfigError.
JobConfig load_config_file(const std::string& path, const std::vector<std::string>& overrides = {});
// The same from text; source_name stands for the file in messages. For
// defaults plus overrides only: load_config_string("", "<defaults>", overrides).
JobConfig load_config_string(const std::string& yaml_text, const std::string& source_name,
                             const std::vector<std::string>& overrides = {});

// One row of the schema, for `switchyard info` and the docs.
struct ConfigKeyDoc {
  std::string key;            // dotted path, "comm.ranks"
  std::string type;           // int, size, bool, string, enum, enum list, dtype
  std::string default_value;  // as it would be written in YAML
  std::string allowed;        // range or choices, "" = any
  std::string doc;
};
std::vector<ConfigKeyDoc> config_schema();
// The documented schema as a Markdown table, generated from the same table used for validation.
std::string config_schema_markdown();
// The effective configuration as YAML (loads back to the same JobConfig).
std::string config_to_yaml(const JobConfig& config);

}  // namespace switchyard
