// `switchyard generate` (stream a model's continuation of a prompt) and
// `switchyard bench decode` (decode throughput per batch size against a
// machine floor, or a stream of requests with TTFT and TPOT), over
// thread-ranks or the ranks of mpirun, with attention replicated or data
// parallel (model/layer_schedule.h) and the experts spread over the ranks.
#pragma once

#include <algorithm>
#include <string>
#include <vector>

#include "model/generate.h"
#include "model/layer_schedule.h"

namespace switchyard {

// How the decoder runs over the ranks (shared by generate and bench decode).
struct DecodeParallelism {
  std::string backend;  // threads | mpi | "" (from the launcher)
  int ranks = 1;        // thread-ranks (threads backend)
  std::string attention = "replicated";  // replicated | dp | tp
  int tp = 1;
  // Attention-FFN disaggregation: "A:F" (model/layer_schedule.h RoleSplit), and
  // the micro-batches each step ping-pongs between the two sides.
  std::string afd;
  int microbatches = 1;
  // What the MoE exchanges carry: f32 (exact) or bf16, to the experts and back.
  std::string dispatch_dtype = "f32", combine_dtype = "f32";
  int threads = 0;      // GEMM (OpenMP) threads per rank; 0: the machine's cores / ranks on this node
  int64_t timeout_ms = 0;  // per-op timeout; 0: the runtime's default
  std::string attention_field = "--attention", tp_field = "--tp";  // names in errors (a config's: model.attention)
  std::string afd_field = "--afd", microbatches_field = "--microbatches";
  std::string dispatch_field = "--dispatch_dtype", combine_field = "--combine_dtype";
  // Expert grouping: the placement of `switchyard affinity build` tables (their ranks = the world's).
  std::string affinity;
  std::string affinity_field = "--affinity";
  // Speculative token shuffling with those tables (tensor-parallel attention):
  // on | auto (the planner's choice per batch and layer) | off.
  std::string specmoe = "off";
  std::string specmoe_field = "--specmoe";
  ScheduleOptions schedule() const { return {attention, tp, attention_field, tp_field, afd, afd_field}; }
};

struct GenerateOptions {
  std::string model;  // a folder with config.json and model.safetensors
  std::string prompt;
  int max_new_tokens = 64;
  SamplingOptions sampling;
  DecodeParallelism parallel;
  // Speculative decoding (model/speculative.h) when set: the draft proposes
  // `gamma` tokens per round on the same ranks and schedule, the model verifies.
  std::string draft;
  int gamma = 4;
  std::string speculative = "plain";  // plain | easyspec
  int lp = 2;                         // easyspec: layers per layer-parallel group
  std::string calibration = "every";  // every | mismatch | never
  bool adaptive_gamma = false;        // gamma per round from the measured acceptance, at most `gamma`
  bool draft_spread = false;          // the draft's experts spread over the ranks (default: all on every rank)
};
int run_generate(const GenerateOptions& options);

struct BenchDecodeOptions {
  std::string model;
  DecodeParallelism parallel;
  // Batch mode: B sequences of prompt_tokens each, then `steps` decode steps, per B.
  std::vector<int> batches = {1, 2, 4, 8, 16, 32, 64};
  int prompt_tokens = 32;
  int steps = 32;
  // Request mode (requests > 0): prompts of prompt_tokens/2..3*prompt_tokens/2,
  // outputs of steps/2..3*steps/2 tokens, arriving at `rate` per second.
  int requests = 0;
  double rate = 0;      // Poisson arrivals per second; 0: all at once
  int max_batch = 64;   // sequences in flight per rank
  int64_t kv_budget = 0;
  int prefill_chunk = 0;
  uint64_t seed = 1;
  // Request mode: round_robin, or affinity (Sem-MoE's: --affinity tables, --attention dp).
  std::string scheduler = "round_robin";
  std::string prompts;  // request mode: prompts from this file, one per line in turn (default: a fixed text)
  std::string csv;  // batch mode: a row per batch size; request mode: a row per request
  std::string png;  // a plot of the CSV (gnuplot)
  // Every rebalance_every decode steps (batch mode) or serving steps
  // (requests), the MoE layers re-place E + redundant_experts physical
  // experts from the loads since (EPLB + migrate).
  int redundant_experts = 0;
  int rebalance_every = 0;
  // Batch mode on an emulated cluster (a preset of configs/clusters): every
  // block charges the preset's device model, the collectives its links, and
  // its HBM capacity refuses batches whose KV does not fit beside the weights.
  std::string emulate;
  // Disaggregated, batch mode: one more step of the last batch recorded (each
  // rank's busy spans) and drawn as a timeline PNG (and PNG.csv).
  std::string timeline;
  void validate() const;
};
int run_bench_decode(const BenchDecodeOptions& options);
// Request mode's longest request: prompts of up to 3/2 x prompt_tokens and
// outputs of up to 3/2 x steps positions (the serve job's rule too).
inline int longest_request(int prompt_tokens, int steps) {
  return std::max(1, prompt_tokens * 3 / 2) + std::max(1, steps * 3 / 2);
}

// `switchyard bench spec`: speculative decoding against plain greedy decoding
// of the same prompts on the same ranks: exact drafting (the draft on the
// model's schedule) and EasySpec layer-parallel drafting per --lp, gamma and
// calibration policy. One line per configuration (acceptance, tokens per
// base forward, drafting / verification / calibration time per token,
// tokens/s and its ratio to plain decoding); CSV and a plot.
struct BenchSpecOptions {
  std::string model, draft;
  std::string prompts;  // a file, one prompt per line (examples/tiny_lm/heldout_prompts.txt)
  int count = 50;       // prompts taken from it
  int max_new_tokens = 128;
  int batch = 1;        // prompts decoded at once
  std::vector<int> gammas = {2, 4, 6};
  std::vector<int> lps = {1, 2, 4};  // 1: exact drafting; > 1 (<= ranks): EasySpec groups
  std::vector<std::string> calibrations = {"every", "never"};  // for lp > 1
  int rounds = 1;       // every configuration this many times, alternated; medians of tokens/s
  bool adaptive = false;  // gamma per sequence and round from its acceptance, each --gamma the most
  std::string emulate;    // a cluster preset: tokens/s in virtual time on it, beside wall time
  bool draft_spread = false;  // the draft's experts spread over the ranks (default: the whole draft on every rank)
  DecodeParallelism parallel;
  std::string csv, png;
  void validate() const;
};
int run_bench_spec(const BenchSpecOptions& options);

// `switchyard afd plan`: the deployment search of model/afd_plan.h for a
// model (a folder, or a published shape: step3, deepseek-v3) on a cluster
// preset: the best attention:FFN split, the FFN's inner parallelism and m
// that maximise tokens/s per GPU within the TPOT target and each GPU's HBM,
// against the best colocated deployment on the same GPUs; the m ablation of
// the best split, MegaScale-Infer's bound on m, and a row per split in --csv.
// A cost model at the preset's rooflines, not a run: it says so.
struct AfdPlanOptions {
  std::string model;
  std::string emulate = "h100-nvlink-ib";
  int gpus = 32;
  int context = 4096;
  double tpot_ms = 50;
  int max_microbatches = 4;
  std::string csv;
  std::string png;  // tokens/s per GPU against the attention GPUs, a line per m (gnuplot)
};
int run_afd_plan(const AfdPlanOptions& options);

}  // namespace switchyard
