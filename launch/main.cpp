// The switchyard command line: info, bench comm, run.
#include <CLI/CLI.hpp>
#include <sys/auxv.h>
#include <unistd.h>

#include <climits>

#include <cstdlib>
#include <iomanip>
#include <iostream>

#include "core/config.h"
#include "core/env.h"
#include "core/error.h"
#include "launch/bench_comm.h"
#include "launch/bench_moe.h"
#include "launch/bench_scale.h"
#include "launch/launcher.h"
#include "parallel/checkpoint.h"
#include "launch/config.h"
#include "launch/decode.h"
#include "kernels/gemm.h"
#include "launch/jobs.h"
#include "launch/specmoe.h"
#include "launch/trace_stats.h"
#include "parallel/runtime.h"

namespace switchyard {
namespace {

void print_info() {
  std::cout << "switchyard " << SWITCHYARD_VERSION << "\n\nBuild features\n";
  auto yes = [](int v) { return v ? "yes" : "no"; };
  std::cout << "  MPI backend       " << yes(SWITCHYARD_HAS_MPI) << "\n"
            << "  UCX               " << (SWITCHYARD_HAS_UCX ? "yes (backend ucx, bootstrapped through the TCP store)" : "no")
            << "\n"
            << "  CUDA              " << yes(SWITCHYARD_HAS_CUDA);
  if (SWITCHYARD_HAS_CUDA)
    std::cout << " (architectures " << SWITCHYARD_CUDA_ARCHITECTURES
              << "; libswitchyard_kernels_cuda and the device MoE layer, libswitchyard_moe_cuda; see docs/gpu.md)";
  std::cout << "\n  NCCL              "
            << (SWITCHYARD_HAS_NCCL ? "yes (backend nccl, libswitchyard_comm_nccl: device memory, one GPU per rank)" : "no")
            << "\n\nBackends compiled in: threads, fake, emulated" << (SWITCHYARD_HAS_MPI ? ", mpi" : "")
            << (SWITCHYARD_HAS_UCX ? ", ucx" : "") << (SWITCHYARD_HAS_NCCL ? ", nccl (library only)" : "") << "\n";

  std::cout << "\nThis process\n";
  {
    const kernels::cpu::WaitPolicy w = kernels::cpu::omp_wait_policy();
    std::cout << "  OpenMP wait       " << w.policy
              << (std::getenv("SWITCHYARD_REEXECED") ? " (set by switchyard before OpenMP loaded)"
                  : w.source == "unset"                          ? " (OMP_WAIT_POLICY unset: libgomp spins)"
                                                                 : " (from " + w.source + ")")
              << "; set OMP_WAIT_POLICY=passive for embedded use (libgomp reads it once, at load)\n";
  }
  try {
    auto info = discover_rank(process_env);
    if (info)
      std::cout << "  launcher          " << info->launcher << " (" << info->source << ")\n"
                << "  rank              " << info->rank << " of " << info->world_size << "\n"
                << "  local rank        " << info->local_rank << " of " << info->local_size << " on node "
                << info->rank / info->local_size << "\n";
    else
      std::cout << "  launcher          none found (no torchrun, Open MPI, PMI or Slurm variables)\n";
    const BackendChoice choice = choose_backend("", process_env);
    std::cout << "  default backend   " << choice.backend << " (" << choice.reason << ")\n";
  } catch (const Error& e) {
    std::cout << "  error             " << e.what() << "\n";
  }

  std::cout << "\nEnvironment variables\n";
  for (const EnvVarDoc& v : env_table(process_env)) {
    std::cout << "  " << std::left << std::setw(28) << v.name << std::setw(8) << v.type
              << (v.raw_value ? "= " + *v.raw_value : "(default " + (v.default_value.empty() ? "unset" : v.default_value) + ")")
              << "\n      " << v.doc << "\n";
  }
}

// True when the kernel started this very file (not ld.so or an emulator
// running it), so re-executing /proc/self/exe with the same argv is safe.
bool started_as_itself() {
  const char* exec_fn = reinterpret_cast<const char*>(getauxval(AT_EXECFN));
  if (!exec_fn) return false;
  char self[4096], started[4096];
  const ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
  if (n <= 0 || !realpath(exec_fn, started)) return false;
  self[n] = '\0';
  return std::string(self) == started;
}

// --backend, --ranks, --attention, --tp, --threads of generate and bench decode.
void add_decode_parallelism(CLI::App* app, DecodeParallelism& p) {
  app->add_option("--backend", p.backend, "threads, mpi (default: from the launcher)");
  app->add_option("--ranks", p.ranks, "Thread-ranks (threads backend); experts are spread over them")->capture_default_str();
  app->add_option("--attention", p.attention,
                  "replicated (every rank the same sequences), dp (each rank its own sequences and KV) or tp (heads split "
                  "over groups of --tp ranks, data-parallel across groups)")
      ->capture_default_str();
  app->add_option("--tp", p.tp, "Ranks per tensor-parallel attention group (with --attention tp)")->capture_default_str();
  app->add_option("--afd", p.afd,
                  "Attention-FFN disaggregation A:F: the first A ranks run data-parallel attention and hold no experts, "
                  "the other F hold the experts (A + F = the ranks); or rank lists [0,2]:[1,3]");
  app->add_option("--microbatches", p.microbatches,
                  "With --afd: micro-batches per step ping-ponged between the attention and FFN ranks (0: each step "
                  "from the measured Ta, Te, Tc: m >= 2 (1 + Tc / max(Ta, Te)))")
      ->capture_default_str();
  app->add_option("--dispatch_dtype,--dispatch-dtype", p.dispatch_dtype,
                  "What the MoE exchange carries to the experts: f32 (exact), bf16, or fp8 (e4m3, a scale per 128 "
                  "columns)")->capture_default_str();
  app->add_option("--combine_dtype,--combine-dtype", p.combine_dtype,
                  "What the experts' results come back in: f32 (exact) or bf16")->capture_default_str();
  app->add_option("--threads", p.threads, "GEMM threads per rank (0: this node's cores / its ranks)")->capture_default_str();
  app->add_option("--affinity", p.affinity,
                  "Expert grouping: place each layer's experts as these tables do (switchyard affinity build --ranks = "
                  "the ranks); the output does not change");
  app->add_option("--specmoe", p.specmoe,
                  "on: shuffle each layer's tokens to the ranks --affinity predicts, inside tensor-parallel attention's "
                  "reduce-scatter (--attention tp; output unchanged); auto: per batch and layer, when the planner "
                  "prices the all-to-all it saves above the shuffle's host cost; off")->capture_default_str();
}

}  // namespace
}  // namespace switchyard

int main(int argc, char** argv) {
  using namespace switchyard;
  // OpenMP's default wait policy spins, and libgomp reads the policy once,
  // when it loads, before main(): a spinning team collapses steps when
  // anything else shares the cores (measured 3x at one rank, far worse under
  // load). Unless the user chose one, start again with the passive policy.
  // Not for `launch` (it computes nothing, and its children, which may be any
  // program, keep the user's environment), and only when /proc/self/exe is
  // this program itself (not a loader or an emulator running it).
  if (!std::getenv("OMP_WAIT_POLICY") && !std::getenv("GOMP_SPINCOUNT") && !std::getenv("SWITCHYARD_REEXECED") &&
      !(argc > 1 && std::string(argv[1]) == "launch") && started_as_itself()) {
    if (setenv("OMP_WAIT_POLICY", "passive", 1) == 0 && setenv("SWITCHYARD_REEXECED", "1", 1) == 0)
      execv("/proc/self/exe", argv);
    // Not re-executed: go on with the policy libgomp already read.
    unsetenv("OMP_WAIT_POLICY");
    unsetenv("SWITCHYARD_REEXECED");
  }
  CLI::App app{"Switchyard: distributed mixture-of-experts runtime"};
  app.require_subcommand(1);

  auto* info = app.add_subcommand("info", "Build features, backends, detected rank/topology, environment variables");
  bool schema_only = false;
  info->add_flag("--config-schema", schema_only, "Print the YAML config schema (markdown) instead");

  auto* bench = app.add_subcommand("bench", "Benchmarks");
  bench->require_subcommand(1);
  auto* bench_comm = bench->add_subcommand("comm", "nccl-tests-style collective sweep, every result checked");
  std::string backend, csv, dtype = "f32", redop = "sum", algorithm = "auto";
  std::string min_bytes = "64K", max_bytes = "64M";
  std::vector<std::string> ops;
  int ranks = 4, iters = 20, warmup = 5, root = 0, check = 1;
  int64_t factor = 2, timeout_ms = 30000;
  bench_comm->add_option("--backend", backend, "threads, mpi, ucx or fake (default: from the launcher)");
  bench_comm->add_option("--ranks", ranks, "Ranks for the threads and fake backends")->capture_default_str();
  bench_comm->add_option("--op", ops, "Collective(s): allreduce, reduce_scatter, allgather, alltoall, broadcast, "
                                      "sendrecv, or all")->delimiter(',');
  bench_comm->add_option("-b,--minbytes", min_bytes, "Smallest size (K/M/G suffixes)")->capture_default_str();
  bench_comm->add_option("-e,--maxbytes", max_bytes, "Largest size")->capture_default_str();
  bench_comm->add_option("-f,--stepfactor", factor, "Size multiplier")->capture_default_str();
  bench_comm->add_option("-n,--iters", iters, "Timed iterations per size")->capture_default_str();
  bench_comm->add_option("-w,--warmup_iters", warmup, "Untimed iterations per size")->capture_default_str();
  bench_comm->add_option("-d,--datatype", dtype, "Element type")->capture_default_str();
  bench_comm->add_option("-o,--op_type", redop, "Reduction: sum, max, min")->capture_default_str();
  bench_comm->add_option("-r,--root", root, "Broadcast root")->capture_default_str();
  bench_comm->add_option("--algorithm", algorithm, "auto, native (the backend's own) or generic (comm/algorithms)")
      ->capture_default_str();
  bench_comm->add_option("-c,--check", check, "Check results (0/1)")->capture_default_str();
  bench_comm->add_option("--csv", csv, "Also write rows to this CSV file");
  bench_comm->add_option("--timeout-ms", timeout_ms, "Per-op timeout")->capture_default_str();

  auto* bench_moe = bench->add_subcommand("moe", "Tutel helloworld: MoE layer steps, phase breakdown, GEMM floor");
  BenchMoeOptions moe;
  bench_moe->add_option("--batch_size,--batch-size", moe.batch_size, "Sequences per rank")->capture_default_str();
  bench_moe->add_option("--num_tokens,--num-tokens", moe.num_tokens, "Tokens per sequence")->capture_default_str();
  bench_moe->add_option("--model_dim,--model-dim", moe.model_dim, "Model dimension")->capture_default_str();
  bench_moe->add_option("--hidden_size,--hidden-size", moe.hidden_size, "Expert hidden size")->capture_default_str();
  bench_moe->add_option("--num_local_experts,--num-local-experts", moe.num_local_experts,
                        "Experts per rank; -S: S ranks share each expert (sliced hidden dim)")
      ->capture_default_str();
  bench_moe->add_option("--adaptive_r,--adaptive-r", moe.adaptive_r,
                        "Sharding degree r: 0 data parallel, 1 expert parallel, r | S expert+tensor parallel")
      ->capture_default_str();
  bench_moe->add_option("--a2a_ffn_overlap_degree,--a2a-ffn-overlap-degree", moe.overlap_degree,
                        "Pipelining degree d (chunks of all-to-all overlapping expert compute)")
      ->capture_default_str();
  bench_moe->add_flag("--use_2dh,--use-2dh", moe.use_2dh, "2D-hierarchical all-to-all (intra-node, then inter-node)");
  bench_moe->add_option("--placement", moe.placement,
                        "Physical expert placement (YAML: slots_per_rank: S, experts: {id: [physical slots]}; "
                        "replicas and unused slots allowed)");
  bench_moe->add_flag("--send_once,--send-once", moe.send_once,
                      "Dropless: send a token once per destination rank (and chunk), copied there to each expert");
  bench_moe->add_option("--ep_size,--ep-size", moe.ep_size,
                        "Expert-parallel group size (EP x DP; 0 = the world); E = num_local_experts x ep_size")
      ->capture_default_str();
  bench_moe->add_option("--redundant_experts,--redundant-experts", moe.redundant_experts,
                        "Extra expert replicas placed by EPLB (E + R physical experts over the ranks)")
      ->capture_default_str();
  bench_moe->add_option("--rebalance_every,--rebalance-every", moe.rebalance_every,
                        "Re-place the replicas from the loads measured since the last rebalance every N steps (0: never)")
      ->capture_default_str();
  bench_moe->add_option("--replica_choice,--replica-choice", moe.replica_choice,
                        "Which replica a routed choice uses: in_turn (every replica takes every n-th, exact shares) or "
                        "nearest (the source's own rank's replicas, then its node's, then any, balanced in expectation)")
      ->check(CLI::IsMember({"in_turn", "nearest"}))
      ->capture_default_str();
  bench_moe->add_option("--device", moe.device,
                        "Where the layer runs: cpu, or cuda (each rank's GPU through the CUDA ops; the expert group over "
                        "nccl, or staged over threads; fails with 'built without CUDA' or 'no CUDA device')")
      ->check(CLI::IsMember({"cpu", "cuda"}))
      ->capture_default_str();
  bench_moe->add_option("--expert_groups,--expert-groups", moe.expert_groups,
                        "Group-limited routing (DeepSeek-V3's n_group): experts in this many consecutive groups")
      ->capture_default_str();
  bench_moe->add_option("--topk_groups,--topk-groups", moe.topk_groups,
                        "Group-limited routing (topk_group): each token chooses among its best this many groups")
      ->capture_default_str();
  bench_moe->add_option("--eplb_policy,--eplb-policy", moe.eplb_policy,
                        "Redundant experts: EPLB's global policy, or hierarchical (expert groups packed onto nodes, "
                        "replicas inside each node; needs --expert_groups a multiple of the nodes)")
      ->check(CLI::IsMember({"global", "hierarchical"}))
      ->capture_default_str();
  bench_moe->add_option("--gate_skew,--gate-skew", moe.gate_skew,
                        "zipf:S: lower expert e's gate logit by S ln(e+1) (a Zipf-skewed router; top-k loads "
                        "concentrate even more)");
  bench_moe->add_option("--microbatches", moe.microbatches,
                        "Batches in flight per step: the tokens split into M micro-batches whose phases interleave")
      ->capture_default_str();
  bench_moe->add_option("--strategy", moe.strategy, "fixed (the flags' plan) or auto (the planner picks per batch)")
      ->capture_default_str();
  bench_moe->add_flag("--sweep", moe.sweep, "Run every plan (r, d, a2a) in turn and print a table");
  bench_moe->add_option("--nodes", moe.nodes,
                        "Nodes the ranks form, for 2DH and emulation (0: the runtime's, or the preset's GPUs per node)")
      ->capture_default_str();
  bench_moe->add_option("--emulate", moe.emulate,
                        "Emulated cluster preset (cpu-local, h100-nvlink-ib, a100-nvlink-ib) or .yaml path: "
                        "step_time is virtual, wall time appended");
  bench_moe->add_flag("--timing_only,--timing-only", moe.timing_only,
                      "With --emulate: skip expert GEMMs and bulky payloads (virtual times only; losses meaningless)");
  bench_moe->add_option("--top", moe.top, "Experts per token (k)")->capture_default_str();
  bench_moe->add_option("--dtype", moe.dtype, "float32 or bfloat16 (bf16 GEMM operands, fp32 accumulation)")->capture_default_str();
  bench_moe->add_option("--capacity_factor,--capacity-factor", moe.capacity_factor,
                        "> 0: factor; 0: dropless; < 0: capped dropless")->capture_default_str();
  bench_moe->add_option("--capacity_rounding,--capacity-rounding", moe.capacity_rounding,
                        "tutel: k*floor(cf*ceil(T/E)) slots, as Tutel; switchyard: k*ceil(cf*T/E)")->capture_default_str();
  bench_moe->add_option("--num_steps,--num-steps", moe.num_steps, "Steps")->capture_default_str();
  bench_moe->add_flag("--eval", moe.eval, "Forward only");
  bench_moe->add_flag("--input_grad,--input-grad", moe.input_grad, "Also compute the input's gradient");
  bench_moe->add_option("--exchange", moe.exchange, "padded or dropless")->capture_default_str();
  bench_moe->add_option("--activation", moe.activation, "relu, gelu or swiglu")->capture_default_str();
  bench_moe->add_option("--backend", moe.backend, "threads, mpi (default: from the launcher)");
  bench_moe->add_option("--ranks", moe.ranks, "Thread-ranks (threads backend)")->capture_default_str();
  bench_moe->add_option("--seed", moe.seed, "Seed of weights and inputs")->capture_default_str();

  auto* bench_decode = bench->add_subcommand("decode", "Decode tokens/s and latency per batch size, phase breakdown, memory floor");
  BenchDecodeOptions decode;
  bench_decode->add_option("--model", decode.model, "Model folder (config.json, model.safetensors)")->required();
  bench_decode->add_option("--batch", decode.batches, "Batch sizes")->delimiter(',')->capture_default_str();
  bench_decode->add_option("--prompt_tokens,--prompt-tokens", decode.prompt_tokens, "Prompt length")->capture_default_str();
  bench_decode->add_option("--steps", decode.steps, "Decode steps timed")->capture_default_str();
  add_decode_parallelism(bench_decode, decode.parallel);
  bench_decode->add_option("--requests", decode.requests, "Request mode: this many requests (0: batch mode)")
      ->capture_default_str();
  bench_decode->add_option("--rate", decode.rate, "Request mode: Poisson arrivals per second (0: all at once)")
      ->capture_default_str();
  bench_decode->add_option("--max_batch,--max-batch", decode.max_batch, "Request mode: sequences in flight per rank")
      ->capture_default_str();
  bench_decode->add_option("--kv_budget,--kv-budget", decode.kv_budget, "Request mode: KV positions per rank (0: unlimited)")
      ->capture_default_str();
  bench_decode->add_option("--redundant_experts,--redundant-experts", decode.redundant_experts,
                           "Extra expert replicas (EPLB) re-placed every --rebalance_every steps")
      ->capture_default_str();
  bench_decode->add_option("--rebalance_every,--rebalance-every", decode.rebalance_every,
                           "Re-place the redundant experts from the loads of the last N decode (or, with --requests, serving) steps")
      ->capture_default_str();
  bench_decode->add_option("--prefill_chunk,--prefill-chunk", decode.prefill_chunk,
                           "Request mode: prompt tokens prefilled per rank per step (0: whole prompts)")
      ->capture_default_str();
  bench_decode->add_option("--scheduler", decode.scheduler,
                           "Request mode: round_robin, or affinity (requests to the data-parallel rank whose experts "
                           "their tokens use, every W consecutive requests on all W ranks; needs --affinity, "
                           "--attention dp)")->capture_default_str();
  bench_decode->add_option("--prompts", decode.prompts, "Request mode: prompts from this file, one per line in turn "
                           "(cut to the drawn length; default: a fixed text)");
  bench_decode->add_option("--seed", decode.seed, "Request mode: seed of the request lengths and arrivals")
      ->capture_default_str();
  bench_decode->add_option("--emulate", decode.emulate,
                           "Batch mode on an emulated cluster preset (h100-nvlink-ib, ...): virtual TPOT and tokens/s "
                           "per GPU beside wall time; batches beyond its HBM are refused");
  bench_decode->add_option("--png", decode.png, "Also plot the CSV (gnuplot)");
  bench_decode->add_option("--timeline", decode.timeline,
                           "With --afd: one more step of the last batch drawn as a timeline PNG (and PNG.csv): which "
                           "side is busy when");
  bench_decode->add_option("--csv", decode.csv, "Also write CSV (batch mode: per batch size; request mode: per request)");

  auto* bench_scale = bench->add_subcommand("scale", "Weak/strong scaling of the MoE layer: real ranks here, emulated beyond");
  BenchScaleOptions scale;
  scale.moe.batch_size = 1;
  scale.moe.num_tokens = 2048;
  scale.moe.model_dim = 1024;
  scale.moe.hidden_size = 4096;
  scale.moe.num_local_experts = 1;
  scale.moe.num_steps = 4;
  scale.moe.strategy = "auto";
  bench_scale->add_option("--mode", scale.mode, "weak (per-rank work fixed) or strong (global work fixed)")
      ->capture_default_str();
  bench_scale->add_option("--ranks", scale.ranks, "Rank counts")->delimiter(',')->capture_default_str();
  bench_scale->add_option("--real_ranks,--real-ranks", scale.real_ranks, "Counts up to this also run for real")
      ->capture_default_str();
  bench_scale->add_option("--emulate", scale.emulate, "Cluster preset for the emulated runs")->capture_default_str();
  bench_scale->add_option("--csv", scale.csv, "CSV output")->capture_default_str();
  bench_scale->add_option("--png", scale.png, "Plot output (gnuplot); empty: none")->capture_default_str();
  bench_scale->add_option("--batch_size,--batch-size", scale.moe.batch_size, "Sequences per rank")->capture_default_str();
  bench_scale->add_option("--num_tokens,--num-tokens", scale.moe.num_tokens, "Tokens per sequence")->capture_default_str();
  bench_scale->add_option("--model_dim,--model-dim", scale.moe.model_dim, "Model dimension")->capture_default_str();
  bench_scale->add_option("--hidden_size,--hidden-size", scale.moe.hidden_size, "Expert hidden size")->capture_default_str();
  bench_scale->add_option("--num_local_experts,--num-local-experts", scale.moe.num_local_experts,
                          "Experts per rank (weak) or of the first count (strong); -S: S ranks per expert")
      ->capture_default_str();
  bench_scale->add_option("--top", scale.moe.top, "Experts per token")->capture_default_str();
  bench_scale->add_option("--capacity_factor,--capacity-factor", scale.moe.capacity_factor, "Capacity factor")
      ->capture_default_str();
  bench_scale->add_option("--num_steps,--num-steps", scale.moe.num_steps, "Steps per point")->capture_default_str();
  bench_scale->add_option("--strategy", scale.moe.strategy, "auto or fixed")->capture_default_str();
  bench_scale->add_option("--dtype", scale.moe.dtype, "float32 or bfloat16")->capture_default_str();

  auto* launch = app.add_subcommand("launch", "Start N local ranks of a command, torchrun-style, with the job's TCP store");
  LaunchOptions lo;
  launch->add_option("--nprocs,--nproc-per-node", lo.nprocs, "Processes on this node")->required();
  launch->add_option("--nnodes", lo.nnodes, "Nodes")->capture_default_str();
  launch->add_option("--node-rank,--node_rank", lo.node_rank, "This node's index")->capture_default_str();
  launch->add_option("--master", lo.master, "ADDR:PORT of node 0's store (default: loopback, a free port)");
  launch->add_option("command", lo.command, "-- CMD ARGS...")->required();
  launch->prefix_command(false);

  auto* ckpt = app.add_subcommand("ckpt", "Checkpoint tools (the sharded format of layer, model and training checkpoints)");
  auto* reshard = ckpt->add_subcommand("reshard", "Rewrite a checkpoint's shards as a world of --ranks ranks stores them "
                                       "(loading needs no reshard: any world size reads any checkpoint)");
  std::string reshard_from, reshard_to;
  int reshard_ranks = 1;
  reshard->add_option("--from", reshard_from, "Source checkpoint directory (its manifest.json names the shards)")->required();
  reshard->add_option("--to", reshard_to, "Target directory (a new generation there)")->required();
  reshard->add_option("--ranks", reshard_ranks, "Ranks of the target layout")->required();
  ckpt->require_subcommand(1);

  auto* gen = app.add_subcommand("generate", "Continue a prompt with a model (streams the text, then tokens/s)");
  GenerateOptions go;
  gen->add_option("--model", go.model, "Model folder (config.json, model.safetensors), e.g. examples/tiny_lm/base")->required();
  gen->add_option("--prompt", go.prompt, "Text to continue")->required();
  gen->add_option("--max_new_tokens,--max-new-tokens", go.max_new_tokens, "Tokens to generate")->capture_default_str();
  gen->add_option("--temperature", go.sampling.temperature, "0: greedy")->capture_default_str();
  gen->add_option("--top_k,--top-k", go.sampling.top_k, "Sample among the k likeliest (0: all)")->capture_default_str();
  gen->add_option("--top_p,--top-p", go.sampling.top_p, "Nucleus sampling mass")->capture_default_str();
  gen->add_option("--seed", go.sampling.seed, "Sampling seed")->capture_default_str();
  gen->add_option("--draft", go.draft, "Speculative decoding with this draft model folder (e.g. examples/tiny_lm/draft)");
  gen->add_option("--gamma", go.gamma, "Speculative decoding: tokens the draft proposes per round")->capture_default_str();
  gen->add_option("--speculative", go.speculative,
                  "With --draft: plain (the draft on the model's schedule) or easyspec (the draft's middle layers in "
                  "layer-parallel groups of --lp; the model's attention must give one token group: replicated, or tp "
                  "over every rank)")->capture_default_str();
  gen->add_flag("--draft_spread,--draft-spread", go.draft_spread,
               "Speculative: spread the draft's experts over the ranks (default: all of the draft on every rank)");
  gen->add_flag("--adaptive_gamma,--adaptive-gamma", go.adaptive_gamma,
               "Speculative: gamma per round from the measured acceptance (--gamma: the most)");
  gen->add_option("--lp", go.lp, "easyspec: draft layers per layer-parallel group (<= ranks)")->capture_default_str();
  gen->add_option("--calibration", go.calibration,
                  "Speculative: exact draft pass after each round: every, mismatch (after a rejection) or never")
      ->capture_default_str();
  add_decode_parallelism(gen, go.parallel);

  auto* bench_spec = bench->add_subcommand("spec", "Speculative decoding (exact and EasySpec drafting) against plain greedy decoding");
  BenchSpecOptions spec;
  bench_spec->add_option("--model", spec.model, "Base model folder")->required();
  bench_spec->add_option("--draft", spec.draft, "Draft model folder")->required();
  bench_spec->add_option("--prompts", spec.prompts, "Prompts, one per line (examples/tiny_lm/heldout_prompts.txt)")->required();
  bench_spec->add_option("--count", spec.count, "Prompts taken from the file")->capture_default_str();
  bench_spec->add_option("--max_new_tokens,--max-new-tokens", spec.max_new_tokens, "Tokens per prompt")->capture_default_str();
  bench_spec->add_option("--batch", spec.batch, "Prompts decoded at once")->capture_default_str();
  bench_spec->add_option("--gamma", spec.gammas, "Draft tokens per round")->delimiter(',')->capture_default_str();
  bench_spec->add_option("--lp", spec.lps, "1: exact drafting; N > 1: EasySpec groups of N layers (<= ranks)")
      ->delimiter(',')->capture_default_str();
  bench_spec->add_option("--calibration", spec.calibrations, "EasySpec calibration policies: every, mismatch, never")
      ->delimiter(',')->capture_default_str();
  bench_spec->add_option("--emulate", spec.emulate,
                         "A cluster preset (h100-nvlink-ib, ...): tokens/s also in virtual time on it");
  bench_spec->add_flag("--draft_spread,--draft-spread", spec.draft_spread,
                       "Spread the draft's experts over the ranks (default: all of the draft on every rank)");
  bench_spec->add_flag("--adaptive", spec.adaptive, "Gamma per sequence and round from its acceptance (--gamma: the most)");
  bench_spec->add_option("--rounds", spec.rounds, "Runs of every configuration, alternated (medians)")->capture_default_str();
  bench_spec->add_option("--csv", spec.csv, "Also write CSV (a row per configuration)");
  bench_spec->add_option("--png", spec.png, "Also plot acceptance per gamma (gnuplot; needs --csv)");
  add_decode_parallelism(bench_spec, spec.parallel);

  auto* afd = app.add_subcommand("afd", "Attention-FFN disaggregation tools");
  auto* afd_plan = afd->add_subcommand("plan", "Search the attention:FFN split, the FFN's parallelism and micro-batches "
                                               "for the best tokens/s per GPU at a TPOT target (a cost model)");
  AfdPlanOptions afd_options;
  afd_plan->add_option("--model", afd_options.model, "A model folder, or a published shape: step3, deepseek-v3")
      ->required();
  afd_plan->add_option("--emulate", afd_options.emulate, "The cluster preset (configs/clusters)")->capture_default_str();
  afd_plan->add_option("--gpus", afd_options.gpus, "GPUs of the deployment (attention + FFN)")->capture_default_str();
  afd_plan->add_option("--context", afd_options.context, "Context positions per sequence")->capture_default_str();
  afd_plan->add_option("--tpot_ms,--tpot-ms", afd_options.tpot_ms, "TPOT target in ms")->capture_default_str();
  afd_plan->add_option("--max_microbatches,--max-microbatches", afd_options.max_microbatches,
                       "Micro-batches tried per split (1..)")->capture_default_str();
  afd_plan->add_option("--csv", afd_options.csv, "Also write a row per split and m");
  afd_plan->add_option("--png", afd_options.png, "Also plot tokens/s per GPU per split and m (gnuplot)");
  afd->require_subcommand(1);

  auto* trace = app.add_subcommand("trace", "Routing trace tools");
  auto* trace_stats_cmd = trace->add_subcommand("stats", "Per-layer expert load skew and how predictable a token's experts are from its id");
  std::string trace_file;
  trace_stats_cmd->add_option("FILE", trace_file, "A routing trace (examples/tiny_lm/trace/*.safetensors)")->required();
  auto* trace_record = trace->add_subcommand("record", "Routing trace of the held-out fortunes through a model (the C++ "
                                                       "model on one rank; one sequence per fortune)");
  TraceRecordOptions record;
  trace_record->add_option("--model", record.model, "Model folder, e.g. examples/tiny_lm/base")->required();
  trace_record->add_option("-o,--out", record.out, "The trace to write (safetensors)")->required();
  trace_record->add_option("--corpus", record.corpus, "Folder of fortune files")->capture_default_str();
  trace_record->add_option("--max_tokens,--max-tokens", record.max_tokens, "Stop after this many tokens (0: all)")
      ->capture_default_str();
  trace->require_subcommand(1);

  auto* affinity = app.add_subcommand("affinity", "Speculative MoE: token-expert affinity tables and expert grouping");
  auto* affinity_build = affinity->add_subcommand(
      "build", "Tables (and an expert grouping) from a routing trace's build part; prints the held-out LAR");
  AffinityBuildOptions ab;
  affinity_build->add_option("TRACE", ab.trace, "A routing trace (trace record, or examples/tiny_lm/trace.py)")->required();
  affinity_build->add_option("--ranks", ab.ranks, "Ranks the experts are placed on")->capture_default_str();
  affinity_build->add_option("-o,--out", ab.out, "The tables to write (safetensors)")->required();
  affinity_build->add_option("--lookback", ab.lookback, "Previous layers whose rank sets key the joint table (0..2)")
      ->capture_default_str();
  affinity_build->add_option("--grouping", ab.grouping, "Place the experts by co-clustering (true), or E/W per rank in order")
      ->capture_default_str();
  affinity_build->add_option("--balance_weight,--balance-weight", ab.balance_weight,
                             "Grouping: weight of the busiest rank's expert load (over the mean, minus 1) against the "
                             "local share; 0: locality alone")->capture_default_str();
  affinity_build->add_option("--build_every,--build-every", ab.build_every,
                             "Document j builds the tables iff j % N == 0; the rest is scored")->capture_default_str();
  affinity_build->add_option("--batch_tokens,--batch-tokens", ab.batch_tokens, "Tokens per scored batch")->capture_default_str();
  affinity_build->add_option("--model", ab.model, "Unseen tokens borrow the rows of their nearest neighbour in this model's embedding");
  affinity->require_subcommand(1);

  auto* bench_specmoe = bench->add_subcommand("specmoe", "Speculative MoE: held-out local activation rate of vanilla, "
                                                         "expert grouping, token shuffling and both, per rank count");
  BenchSpecMoeOptions sm;
  bench_specmoe->add_option("--model", sm.model, "Model folder, e.g. examples/tiny_lm/base")->required();
  bench_specmoe->add_option("--trace", sm.trace, "A routing trace instead of recording the held-out fortunes");
  bench_specmoe->add_option("--corpus", sm.corpus, "Folder of fortune files")->capture_default_str();
  bench_specmoe->add_option("--ranks", sm.ranks, "Rank counts")->delimiter(',')->capture_default_str();
  bench_specmoe->add_option("--lookback", sm.lookback, "Previous layers whose rank sets key the joint table (0..2)")
      ->capture_default_str();
  bench_specmoe->add_option("--balance_weight,--balance-weight", sm.balance_weight,
                            "Grouping: weight of the busiest rank's expert load against the local share (0: locality alone)")
      ->capture_default_str();
  bench_specmoe->add_option("--build_every,--build-every", sm.build_every,
                            "Document j builds the tables iff j % N == 0; the rest is scored")->capture_default_str();
  bench_specmoe->add_option("--batch_tokens,--batch-tokens", sm.batch_tokens, "Tokens per batch")->capture_default_str();
  bench_specmoe->add_option("--max_tokens,--max-tokens", sm.max_tokens, "Record at most this many tokens (0: all)")
      ->capture_default_str();
  bench_specmoe->add_option("--emulate", sm.emulate, "A cluster preset: also the MoE layer's virtual time per configuration "
                            "(the scored routing replayed through a timing-only layer of --layer_model_dim/--layer_hidden)");
  bench_specmoe->add_option("--layer_model_dim,--layer-model-dim", sm.layer_model_dim, "With --emulate: the timed layer's d_model")
      ->capture_default_str();
  bench_specmoe->add_option("--layer_hidden,--layer-hidden", sm.layer_hidden, "With --emulate: the timed layer's expert hidden size")
      ->capture_default_str();
  bench_specmoe->add_option("--layer_batches,--layer-batches", sm.layer_batches, "With --emulate: scored batches timed")
      ->capture_default_str();
  bench_specmoe->add_option("--nodes", sm.nodes, "With --emulate: the ranks in this many nodes (0: the preset's ranks per node)")
      ->capture_default_str();
  bench_specmoe->add_option("--csv", sm.csv, "Also write CSV (a row per configuration and rank count)");
  bench_specmoe->add_option("--png", sm.png, "Also plot LAR per configuration (gnuplot; needs --csv)");

  auto* run = app.add_subcommand("run", "Run the job a YAML config describes");
  std::string config_path;
  std::vector<std::string> sets;
  int run_ranks_flag = 0;
  run->add_option("--config", config_path, "YAML job config (see docs/config.md)")->required();
  run->add_option("--set", sets, "Override a key: --set comm.backend=mpi (repeatable)");
  run->add_option("--ranks", run_ranks_flag, "Shorthand for --set comm.ranks=N");

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }

  try {
    if (info->parsed()) {
      if (schema_only)
        std::cout << config_schema_markdown();
      else
        print_info();
      return 0;
    }
    if (bench_comm->parsed()) {
      if (backend.empty()) backend = choose_backend("", process_env).backend;
      std::string op_list;
      if (ops.empty() || (ops.size() == 1 && ops[0] == "all")) ops = ops.empty() ? std::vector<std::string>{"alltoall"} : bench_ops();
      for (const auto& o : ops) op_list += (op_list.empty() ? "" : ",") + o;
      const std::vector<std::string> overrides = {
          "comm.backend=" + backend, "comm.ranks=" + std::to_string(ranks),
          "comm.timeout_ms=" + std::to_string(timeout_ms), "bench.ops=[" + op_list + "]",
          "bench.min_bytes=" + min_bytes, "bench.max_bytes=" + max_bytes,
          "bench.step_factor=" + std::to_string(factor), "bench.iters=" + std::to_string(iters),
          "bench.warmup=" + std::to_string(warmup), "bench.dtype=" + dtype, "bench.redop=" + redop, "bench.algorithm=" + algorithm,
          "bench.root=" + std::to_string(root), "bench.check=" + std::string(check ? "true" : "false"),
          "bench.csv='" + csv + "'"};
      return run_job(load_config_string("", "<command line>", overrides));
    }
    if (bench_moe->parsed()) return run_bench_moe(moe);
    if (bench_decode->parsed()) return run_bench_decode(decode);
    if (bench_spec->parsed()) return run_bench_spec(spec);
    if (afd_plan->parsed()) return run_afd_plan(afd_options);
    if (gen->parsed()) return run_generate(go);
    if (bench_scale->parsed()) return run_bench_scale(scale);
    if (launch->parsed()) return run_launch(lo);
    if (trace_record->parsed()) return run_trace_record(record);
    if (affinity_build->parsed()) return run_affinity_build(ab);
    if (bench_specmoe->parsed()) return run_bench_specmoe(sm);
    if (trace_stats_cmd->parsed()) {
      std::fputs(format_trace_stats(trace_stats(trace_file)).c_str(), stdout);
      return 0;
    }
    if (reshard->parsed()) {
      const ReshardReport r = reshard_checkpoint(reshard_from, reshard_to, reshard_ranks);
      std::printf("resharded %d experts from %d shards of '%s' into %d shards in '%s' (generation %llu)\n", r.experts,
                  r.source_ranks, reshard_from.c_str(), r.ranks, reshard_to.c_str(),
                  static_cast<unsigned long long>(Checkpoint::open(reshard_to).generation()));
      return 0;
    }
    if (run->parsed()) {
      if (run_ranks_flag > 0) sets.push_back("comm.ranks=" + std::to_string(run_ranks_flag));
      return run_job(load_config_file(config_path, sets));
    }
  } catch (const std::exception& e) {
    std::cerr << "switchyard: error: " << e.what() << "\n";
    return 2;
  }
  return 0;
}
