#include "launch/decode.h"

#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <map>
#include <memory>
#include <optional>

#include "core/error.h"
#include "kernels/gemm.h"
#include "comm/virtual_time.h"
#include "launch/cluster_presets.h"
#include "launch/gemm_rate.h"
#include "launch/plot.h"
#include "model/afd_plan.h"
#include "model/engine.h"
#include "model/serving.h"
#include "model/speculative.h"
#include "moe/affinity.h"
#include "parallel/runtime.h"

namespace switchyard {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

std::vector<int> bytes_of(const std::string& text) {
  std::vector<int> t;
  for (unsigned char c : text) t.push_back(c);
  return t;
}

double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Nearest-rank percentile (q in (0, 1]).
double percentile(std::vector<double> v, double q) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t i = static_cast<size_t>(std::ceil(q * static_cast<double>(v.size()))) - 1;
  return v[std::min(i, v.size() - 1)];
}

double max_over_ranks(Communicator& world, double v) {
  Tensor t = Tensor::empty({1}, DType::f64);
  t.data_as<double>()[0] = v;
  world.allreduce(t, t, {.op = ReduceOp::max}).wait();
  return t.data_as<double>()[0];
}

// Sums n floats with 64 independent accumulators, cloned per ISA: a read at
// the memory's speed rather than at one add's latency.
__attribute__((target_clones("avx512f", "avx2", "default")))
float sum_floats(const float* p, size_t n) {
  float acc[64] = {};
  size_t i = 0;
  for (; i + 64 <= n; i += 64)
#pragma omp simd
    for (int j = 0; j < 64; ++j) acc[j] += p[i + j];
  float total = 0;
  for (; i < n; ++i) total += p[i];
  for (float a : acc) total += a;
  return total;
}

// The machine's rates, measured by every rank at once on its own share of
// the cores (as the benchmark then runs), so no rank waits or polls while
// another measures. Read bandwidth depends on where the bytes fit (a batch-1
// step of the tiny models fits in L3), so it is measured per footprint: the
// ranks read `bytes` in all, each its 1/W share, warm; rate = bytes over the
// slowest rank's time (median of 5).
double read_bandwidth_at(Communicator& world, double bytes) {
  const size_t n = std::max<size_t>(static_cast<size_t>(bytes / world.size() / sizeof(float)), 4096);
  std::vector<float> buf(n, 1.f);
  const int passes = static_cast<int>(std::clamp((size_t{64} << 20) / (n * sizeof(float)), size_t{1}, size_t{256}));
  volatile float sink = 0;
  std::vector<double> runs;
  for (int r = 0; r < 6; ++r) {
    world.barrier().wait();
    const auto t = Clock::now();
    float sum = 0;
#pragma omp parallel reduction(+ : sum)
    {  // one region for every pass: a passive OpenMP team's wake-up is not a read
      const size_t T = static_cast<size_t>(omp_get_num_threads()), me = static_cast<size_t>(omp_get_thread_num());
      for (int p = 0; p < passes; ++p) sum += sum_floats(buf.data() + n * me / T, n * (me + 1) / T - n * me / T);
    }
    sink = sink + sum;
    const double slowest = max_over_ranks(world, seconds_since(t));
    if (r > 0) runs.push_back(static_cast<double>(n * sizeof(float)) * world.size() * passes / slowest);  // run 0 pages in
  }
  return median(runs);
}


// GEMM threads per rank: the given number, else the runtime's budget (the
// node's cores over its ranks, or SWITCHYARD_GEMM_THREADS).
int set_rank_threads(const DecodeParallelism& p, const Runtime& rt) {
  if (p.threads > 0) kernels::cpu::set_gemm_threads(p.threads);
  return p.threads > 0 ? p.threads : rt.gemm_threads();
}

RuntimeOptions runtime_options(const DecodeParallelism& p) {
  RuntimeOptions ro;
  ro.backend = p.backend;
  ro.ranks = p.ranks;
  if (p.timeout_ms > 0) ro.timeout = Milliseconds(p.timeout_ms);
  return ro;
}

// The model's roles on `world` ranks (disaggregated: --afd), and `device`.
ModelOptions model_options(const DecodeParallelism& p, int world, std::shared_ptr<const DeviceModel> device = nullptr) {
  ModelOptions mo;
  mo.device = std::move(device);
  if (!p.afd.empty()) mo.roles = RoleSplit::parse(p.afd, world, p.afd_field);
  auto payload = [](const std::string& v, const std::string& field, bool fp8) {
    if (v == "f32") return DType::f32;
    if (v == "bf16") return DType::bf16;
    if (v == "fp8" && fp8) return DType::fp8_e4m3;
    if (v == "fp8")
      SY_THROW(ConfigError, field, " = fp8: results come back in f32 or bf16 (fp8 is for the rows sent to the "
               "experts); expected f32 or bf16");
    SY_THROW(ConfigError, field, " = '", v, "', expected f32, bf16", fp8 ? " or fp8" : "");
  };
  mo.dispatch_payload = payload(p.dispatch_dtype, p.dispatch_field, true);
  mo.combine_payload = payload(p.combine_dtype, p.combine_field, false);
  if (!p.affinity.empty()) {
    const AffinityTables tables = AffinityTables::load(p.affinity);
    if (tables.ranks() != world)
      SY_THROW(ConfigError, p.affinity_field, " = ", p.affinity, ": tables built for ", tables.ranks(),
               " ranks, the job has ", world, " (affinity build --ranks ", world, ")");
    if (!p.afd.empty())
      SY_THROW(ConfigError, p.affinity_field, " with ", p.afd_field, " = ", p.afd,
               ": expert grouping on a disaggregated deployment is not built");
    mo.placements = tables.placements();
  }
  return mo;
}

// The engine of `model` as `p` schedules it (micro-batches included).
// ranks_per_node: how the expert group sits on nodes (--specmoe auto calibrates its links by it).
std::unique_ptr<InferenceEngine> make_engine(Model& model, const DecodeParallelism& p, int ranks_per_node) {
  if (p.microbatches < 0 || p.microbatches > 64)
    SY_THROW(ConfigError, p.microbatches_field, " = ", p.microbatches, ", expected 1..64 (0: automatic)");
  if (p.microbatches != 1 && p.afd.empty())
    SY_THROW(ConfigError, p.microbatches_field, " = ", p.microbatches, " without ", p.afd_field,
             "; micro-batches ping-pong between attention and FFN ranks (expected 1, or an ", p.afd_field, " split)");
  auto engine = std::make_unique<InferenceEngine>(
      model, LayerSchedule::make(p.schedule(), model.config().layers, model.expert_group()->size()));
  engine->set_microbatches(p.microbatches);
  if (p.specmoe == "on" || p.specmoe == "auto") {
    if (p.affinity.empty())
      SY_THROW(ConfigError, p.specmoe_field, " = ", p.specmoe, " needs ", p.affinity_field,
               " TABLES (switchyard affinity build): the shuffle predicts from them");
    if (engine->schedule().attention() != AttentionMode::tp)
      SY_THROW(ConfigError, p.specmoe_field, " = ", p.specmoe, " shuffles tokens inside tensor-parallel attention's "
               "reduce-scatter; the attention is ", attention_mode_name(engine->schedule().attention()), " (expected tp)");
    engine->set_token_shuffling(std::make_shared<const AffinityTables>(AffinityTables::load(p.affinity)),
                                {.automatic = p.specmoe == "auto", .ranks_per_node = ranks_per_node});
  } else if (p.specmoe != "off") {
    SY_THROW(ConfigError, p.specmoe_field, " = '", p.specmoe, "', expected on, auto or off");
  }
  return engine;
}

// Speculative MoE's counters over the world (collective): the share of routed
// choices whose expert sat on the row's own rank.
std::string local_activation_summary(InferenceEngine& engine) {
  const Model::LocalActivationCount& la = engine.model().local_activation();
  Tensor sums = Tensor::zeros({6}, DType::f64);
  double* v = sums.data_as<double>();
  for (size_t l = 0; l < la.pairs.size(); ++l) v[0] += static_cast<double>(la.pairs[l]), v[1] += static_cast<double>(la.local[l]);
  const InferenceEngine::ShuffleCounts& sc = engine.shuffle_counts();
  v[2] = static_cast<double>(sc.rows), v[3] = static_cast<double>(sc.predicted);
  v[4] = static_cast<double>(sc.decided), v[5] = static_cast<double>(sc.shuffled);
  engine.world().allreduce(sums, sums).wait();
  char line[256];
  std::snprintf(line, sizeof line, "local activation %.3f of %.0f choices, token shuffling %s", v[0] > 0 ? v[1] / v[0] : 0.0,
                v[0], engine.token_shuffling_automatic() ? "auto" : engine.token_shuffling() ? "on" : "off");
  std::string out = line;
  if (engine.token_shuffling_automatic() && v[4] > 0) {
    std::snprintf(line, sizeof line, ", %.0f%% of %.0f layer-batches shuffled", 100.0 * v[5] / v[4], v[4] / engine.schedule().tp());
    out += line;
  }
  if (engine.token_shuffling() && v[2] > 0) {
    std::snprintf(line, sizeof line, " (%.0f%% of shuffled rows keyed by look-back)", 100.0 * v[3] / v[2]);
    out += line;
  }
  return out;
}

// How the schedule runs, for a result line: "attention dp" or "2A2F, m = 2".
std::string schedule_name(const InferenceEngine& engine) {
  const ModelOptions& o = engine.model().options();
  const std::string payloads = o.dispatch_payload == DType::f32 && o.combine_payload == DType::f32
                                   ? ""
                                   : ", payloads " + std::string(dtype_name(o.dispatch_payload)) + "/" +
                                         std::string(dtype_name(o.combine_payload));
  if (const auto& roles = engine.schedule().roles())
    return roles->name() + ", m = " +
           (engine.microbatches() > 0 ? std::to_string(engine.microbatches())
                                      : "auto (" + std::to_string(engine.last_microbatches()) + " last step)") +
           payloads;
  return std::string("attention ") + attention_mode_name(engine.schedule().attention()) + payloads;
}

// A CSV cell: the name's commas as semicolons.
std::string csv_field(std::string s) {
  std::replace(s.begin(), s.end(), ',', ';');
  return s;
}

// Each side's pipeline bubble (InferenceEngine::StepTimes: the share of step
// time spent waiting on exchanges), the mean over its ranks; colocated, every
// rank is both sides. Collective.
struct SideBubbles {
  double attention = 0, ffn = 0;  // wall
  double attention_virtual = 0, ffn_virtual = 0;
};
SideBubbles side_bubbles(Communicator& world, const InferenceEngine& engine) {
  const int W = world.size(), R = world.rank();
  Tensor all = Tensor::zeros({2 * W}, DType::f64);
  all.data_as<double>()[R] = engine.step_times().bubble();
  all.data_as<double>()[W + R] = engine.step_times().virtual_bubble();
  world.allreduce(all, all).wait();
  const auto& roles = engine.schedule().roles();
  SideBubbles b;
  int na = 0, nf = 0;
  for (int r = 0; r < W; ++r) {
    const bool a = !roles || roles->is_attention(r), f = !roles || roles->is_ffn(r);
    const double wall = all.data_as<double>()[r], virt = all.data_as<double>()[W + r];
    if (a) b.attention += wall, b.attention_virtual += virt, ++na;
    if (f) b.ffn += wall, b.ffn_virtual += virt, ++nf;
  }
  b.attention /= std::max(na, 1), b.attention_virtual /= std::max(na, 1);
  b.ffn /= std::max(nf, 1), b.ffn_virtual /= std::max(nf, 1);
  return b;
}

// Greedy decoding's next step: every chunk's next input is the argmax of its
// last row of logits (the first maximum, as sample() chooses at temperature 0).
void feed_greedy_tokens(const Tensor& logits, int vocab, std::vector<Chunk>& chunks) {
  int64_t row = -1;
  for (Chunk& ch : chunks) {
    row += static_cast<int64_t>(ch.tokens.size());
    const float* r = logits.data_as<float>() + row * vocab;
    ch.tokens = {static_cast<int>(std::max_element(r, r + vocab) - r)};
  }
}

const std::string kText = "The quick brown fox jumps over the lazy dog; a stitch in time saves nine. ";

std::vector<int> prompt_of(int64_t s, int length) {
  std::vector<int> p;
  for (int i = 0; i < length; ++i) p.push_back(static_cast<unsigned char>(kText[static_cast<size_t>(s * 7 + i) % kText.size()]));
  return p;
}

// The bytes one decode step of `batch` sequences must read at least (each
// distinct weight once: attention, norms, gate, head, the `touched` experts
// per layer its tokens chose, and the KV cache so far) and the FLOPs it must
// do: the ideal machine's step, whatever the schedule.
struct StepWork {
  double bytes = 0, flops = 0;
};
StepWork decode_step_work(const ModelConfig& c, double expert_params, double batch, double mean_len, double touched) {
  const double d = c.d_model, L = c.layers, E = c.experts, k = c.k;
  StepWork w;
  w.bytes = (L * (4 * d * d + 2 * d + d * E + touched * expert_params) + d * c.vocab_size + d + batch * d) * 4.0 +
            batch * mean_len * L * 2 * d * 4.0;
  w.flops = batch * (L * (8 * d * d + 4 * d * mean_len + 2 * d * E + k * 2.0 * expert_params) + 2 * d * c.vocab_size);
  return w;
}

// Every rank's busy spans of the engine's last recorded step to rank 0, which
// writes PNG.csv (rank, side, layer, micro-batch, start and end in ms) and
// draws a bar per span, a row per rank, coloured by micro-batch. Collective.
void write_timeline(Communicator& world, const InferenceEngine& engine, const std::string& png, const std::string& title) {
  const int W = world.size();
  constexpr int kFields = 6;  // rank, attention, layer, micro-batch, start, end
  std::vector<double> mine;
  for (const InferenceEngine::BusySpan& s : engine.timeline())
    for (double v : {static_cast<double>(world.rank()), s.attention ? 1.0 : 0.0, static_cast<double>(s.layer),
                     static_cast<double>(s.microbatch), s.start, s.end})
      mine.push_back(v);
  Tensor counts = Tensor::zeros({W}, DType::f64);
  counts.data_as<double>()[world.rank()] = static_cast<double>(mine.size());
  world.allreduce(counts, counts).wait();
  std::vector<int64_t> n(static_cast<size_t>(W));
  int64_t total = 0;
  for (int r = 0; r < W; ++r) total += n[static_cast<size_t>(r)] = static_cast<int64_t>(counts.data_as<double>()[r]);
  Tensor all = Tensor::empty({std::max<int64_t>(total, 1)}, DType::f64);
  world.allgatherv(TensorView(mine.data(), DType::f64, {static_cast<int64_t>(mine.size())}), all, n).wait();
  if (world.rank() != 0) return;
  const std::string csv_path = png + ".csv";
  std::ofstream csv(csv_path);
  if (!csv) SY_THROW(IoError, "bench decode: cannot write the timeline's '", csv_path, "'");
  csv << "rank,side,layer,microbatch,start_ms,end_ms\n";
  std::string rows;
  const double* v = all.data_as<double>();
  for (int64_t i = 0; i + kFields <= total; i += kFields) {
    char line[160];
    std::snprintf(line, sizeof line, "%d,%s,%d,%d,%.6f,%.6f\n", static_cast<int>(v[i]), v[i + 1] > 0 ? "attention" : "ffn",
                  static_cast<int>(v[i + 2]), static_cast<int>(v[i + 3]), v[i + 4] * 1e3, v[i + 5] * 1e3);
    csv << line;
    std::snprintf(line, sizeof line, "%.6f %d %.6f %d\n", (v[i + 4] + v[i + 5]) / 2 * 1e3, static_cast<int>(v[i]),
                  (v[i + 5] - v[i + 4]) / 2 * 1e3, static_cast<int>(v[i + 3]) + 1);
    rows += line;
  }
  csv.close();
  std::printf("# wrote %s (%lld busy spans)\n", csv_path.c_str(), static_cast<long long>(total / kFields));
  std::string ytics;
  const auto& roles = engine.schedule().roles();
  for (int r = 0; r < W; ++r)
    ytics += std::string(r ? ", " : "") + "'" + (roles && roles->is_ffn(r) ? "F" : "A") + std::to_string(r) + "' " +
             std::to_string(r);
  plot_png(png, "set grid x\nset xlabel 'ms since the step began'\nset ylabel 'rank'\nset ytics (" + ytics +
                    ")\nset yrange [-0.6:" + std::to_string(W) + "-0.4] reverse\nset key off\nset title 'one step: " +
                    title + " (colour: micro-batch)'\n$d << EOD\n" + rows +
                    "EOD\nplot $d using 1:2:3:(0.35):4 with boxxyerror fs solid 0.85 noborder lc variable\n");
}

// Emulated: every figure but the wall column is virtual time on `cluster`.
void bench_batches(InferenceEngine& engine, const BenchDecodeOptions& o, const ClusterModel* cluster) {
  Model& model = engine.model();
  const ModelConfig& c = model.config();
  Communicator& world = engine.world();  // emulated when emulating: its barriers meet the ranks' virtual clocks
  const bool speak = world.rank() == 0;
  const int W = world.size(), G = engine.schedule().token_groups(), me = engine.token_group();
  if (o.redundant_experts > 0 && (c.experts + o.redundant_experts) % model.expert_group()->size() != 0)
    SY_THROW(InvalidArgument, "bench decode: --redundant_experts = ", o.redundant_experts, ": ", c.experts, " + ",
             o.redundant_experts, " physical experts do not divide over the ", model.expert_group()->size(),
             " ranks of the expert group");
  std::FILE* csv = speak && !o.csv.empty() ? std::fopen(o.csv.c_str(), "w") : nullptr;
  // Every rank fails together when rank 0 cannot write it (no rank left waiting).
  if (max_over_ranks(world, speak && !o.csv.empty() && !csv ? 1 : 0) > 0)
    SY_THROW(IoError, "bench decode: cannot write --csv '", o.csv, "' (rank 0)");
  if (csv && cluster)
    std::fprintf(csv, "batch,ranks,attention,tpot_ms_virtual,tokens_per_s_virtual,tokens_per_s_per_gpu_virtual,"
                      "attention_ms_virtual,moe_ms_virtual,floor_ms_virtual,ratio_virtual,wall_ms_per_step,"
                      "memory_gb_per_rank,attention_idle_virtual,ffn_idle_virtual\n");
  else if (csv)
    std::fprintf(csv, "batch,ranks,attention,tokens_per_s,tokens_per_s_per_rank,ms_per_step,attention_ms,moe_ms,"
                      "head_ms,floor_ms,ratio,read_gb_per_s,attention_idle,ffn_idle\n");
  const double mean_len = o.prompt_tokens + (o.steps + 1) / 2.0;
  const int positions = o.prompt_tokens + o.steps + 1;  // each sequence's cache
  DecodeMemory memory = engine.memory();
  // The largest share of a batch one token group holds; every rank judges alike.
  auto sequences_per_group = [&](int B) { return (B + G - 1) / G; };
  // Sequences per token group that fit on every rank (-1: unbounded); ranks differ under
  // disaggregation (attention ranks hold the KV, FFN ranks the experts), and all must decide alike.
  auto agreed_fits = [&](const DecodeMemory& m) {
    const int64_t f = m.max_sequences(positions);
    const double most = max_over_ranks(world, f < 0 ? -1e18 : -static_cast<double>(f));
    return most <= -1e18 ? int64_t{-1} : static_cast<int64_t>(-most);
  };
  int64_t fits = agreed_fits(memory);
  const double heaviest_weights = max_over_ranks(world, memory.weights);
  if (cluster) {
    if (speak) {
      std::printf("# emulated %s: %d rank(s) per node; times are virtual (device and link models), the last column "
                  "this machine's wall time\n", cluster->name.c_str(), cluster->link.ranks_per_node);
      std::printf("# device memory per rank: %.4g GB of weights (the heaviest rank: %.4g GB) + %.1f KB of KV per "
                  "sequence position; ", memory.weights / 1e9, heaviest_weights / 1e9, memory.kv_per_position / 1e3);
      if (fits >= 0)
        std::printf("%.4g GB hold %lld sequences of %d positions per token group\n", memory.capacity / 1e9,
                    static_cast<long long>(fits), positions);
      else
        std::printf("the preset bounds nothing\n");
      std::printf("floor = max(distinct bytes a step reads / (%d x %.0f GB/s), FLOPs / (%d x %.0f TFLOP/s)): the "
                  "ideal cluster's step; attn and moe ms: each the slowest rank's per step, waits for the other "
                  "ranks included (so they may add up to more than the TPOT)\n", W,
                  cluster->device.memory_bandwidth / 1e9, W, cluster->device.gemm_flops_f32 / 1e12);
      std::printf("# A idle, F idle: the attention and FFN ranks' pipeline bubble (share of the step spent waiting on "
                  "the MoE exchanges; colocated, every rank is both)\n");
      std::printf("%6s %10s %12s %12s %9s %9s %9s %7s %7s %7s %10s %8s\n", "batch", "TPOT ms", "tokens/s", "per GPU",
                  "attn ms", "moe ms", "floor ms", "ratio", "A idle", "F idle", "wall ms", "mem GB");
      std::fflush(stdout);
    }
  }
  // The floor's rates first, every rank measuring at once (no benchmark traffic beside it).
  const double flop_rate = cluster ? cluster->device.gemm_flops_f32 * W : machine_gemm_rate(world);
  std::vector<double> bandwidth;
  // At the footprint of a step that reads every expert (the most a step reads).
  for (int B : o.batches)
    bandwidth.push_back(cluster ? cluster->device.memory_bandwidth * W
                                : read_bandwidth_at(world, decode_step_work(c, model.expert_bytes() / 4, B, mean_len,
                                                                            c.experts).bytes));
  if (speak && !cluster) {
    std::printf("floor = max(distinct bytes a step reads / read bandwidth at that footprint, FLOPs / %.1f GFLOP/s "
                "(oneDNN sgemm 1024^3)); both measured here, by every rank at once on its share of the cores\n",
                flop_rate / 1e9);
    std::printf("A idle, F idle: the attention and FFN ranks' pipeline bubble (share of the step spent waiting on the "
                "MoE exchanges; colocated, every rank is both)\n");
    std::printf("%6s %12s %12s %10s %9s %9s %9s %9s %7s %8s %7s %7s\n", "batch", "tokens/s", "per rank", "ms/step",
                "attn ms", "moe ms", "head ms", "floor ms", "ratio", "GB/s", "A idle", "F idle");
  }
  std::string points;
  double last_tps = 0;
  for (size_t bi = 0; bi < o.batches.size(); ++bi) {
    const int B = o.batches[bi];
    memory = engine.memory();  // rebalancing may have added replicas (slots) since the last batch
    fits = agreed_fits(memory);
    if (fits >= 0 && sequences_per_group(B) > fits) {  // as a GPU would: the batch does not fit beside the weights
      // Name the rank that binds (disaggregated: an FFN rank's experts may, with no KV at all).
      Tensor per_rank = Tensor::zeros({3 * W}, DType::f64);
      double* pr = per_rank.data_as<double>();
      pr[world.rank()] = memory.weights, pr[W + world.rank()] = memory.kv_per_position;
      pr[2 * W + world.rank()] = static_cast<double>(memory.max_sequences(positions));
      world.allreduce(per_rank, per_rank).wait();
      int binding = 0;
      for (int r = 0; r < W; ++r)
        if (pr[2 * W + r] >= 0 && (pr[2 * W + binding] < 0 || pr[2 * W + r] < pr[2 * W + binding])) binding = r;
      const auto& roles = engine.schedule().roles();
      const std::string who = roles ? std::string(roles->is_ffn(binding) ? "FFN" : "attention") + " rank " +
                                          std::to_string(binding)
                                    : "every rank";
      if (speak)
        std::printf("%6d refused: %d sequence(s) of %d positions per token group need %.4g GB of KV + %.4g GB of "
                    "weights on %s; the device holds %.4g GB (at most %lld sequences)\n",
                    B, sequences_per_group(B), positions,
                    static_cast<double>(sequences_per_group(B)) * positions * pr[W + binding] / 1e9,
                    pr[binding] / 1e9, who.c_str(), memory.capacity / 1e9, static_cast<long long>(fits));
      continue;
    }
    std::vector<KVCache> caches;
    std::vector<Chunk> chunks;
    caches.reserve(static_cast<size_t>(B));
    for (int s = 0; s < B; ++s) {
      if (s % G != me) continue;  // dp: sequence s lives on rank s mod W
      caches.push_back(engine.new_cache(o.prompt_tokens + o.steps + 1));
      chunks.push_back({&caches.back(), prompt_of(s, o.prompt_tokens)});
    }
    Tensor logits = engine.step(chunks);
    model.reset_expert_loads();  // rebalancing judges decode steps, not the prefill
    Tensor chosen = Tensor::zeros({o.steps, c.layers, c.experts}, DType::f64);
    model.reset_times();
    engine.reset_step_times();
    world.barrier().wait();
    const auto start = Clock::now();
    const double virtual_start = virtual_time::now();
    double rebalancing = 0, rebalancing_virtual = 0;  // re-placing experts, left out of the step times
    std::vector<std::vector<double>> loads_before(static_cast<size_t>(c.layers));
    for (int l = 0; l < c.layers; ++l) loads_before[static_cast<size_t>(l)] = model.expert_load_since(l);
    for (int step = 0; step < o.steps; ++step) {
      feed_greedy_tokens(logits, c.vocab_size, chunks);
      logits = engine.step(chunks);
      for (int l = 0; l < c.layers; ++l) {  // which experts this step's tokens chose here (no traffic while timing)
        std::vector<double>& before = loads_before[static_cast<size_t>(l)];
        const std::vector<double>& load = model.expert_load_since(l);  // every micro-batch's choices
        for (size_t e = 0; e < load.size(); ++e) {
          if (load[e] > (e < before.size() ? before[e] : 0.0))
            chosen.data_as<double>()[(static_cast<size_t>(step) * c.layers + l) * c.experts + e] = 1;
        }
        before = load;
      }
      if (o.rebalance_every > 0 && (step + 1) % o.rebalance_every == 0) {
        const auto t0 = Clock::now();
        const double v0 = virtual_time::now();
        const Model::Rebalance r = model.rebalance_experts(o.redundant_experts);
        const double took = max_over_ranks(world, seconds_since(t0));
        rebalancing += took;
        rebalancing_virtual += virtual_time::now() - v0;
        for (int l = 0; l < c.layers; ++l) loads_before[static_cast<size_t>(l)] = model.expert_load_since(l);  // reset
        if (speak)
          std::printf("# batch %d, after step %d: rebalanced %d layers onto %s in %.1f ms (not in the step times); "
                      "rank load max/mean estimated from the loads of the last %d steps %.3f -> %.3f (mean over "
                      "layers; replicas taken to share evenly)\n",
                      B, step + 1, c.layers, r.placement.c_str(), took * 1e3, o.rebalance_every, r.before, r.after);
      }
    }
    const double wall_elapsed = seconds_since(start);
    world.barrier().wait();
    const double virtual_seconds = max_over_ranks(world, virtual_time::now() - virtual_start - rebalancing_virtual);
    const double seconds = max_over_ranks(world, wall_elapsed) - rebalancing;
    // The slowest rank's virtual attention (tp: with its reduce-scatter and all-gather) and MoE layers.
    const double attention_virtual = max_over_ranks(world, model.virtual_times().attention);
    const double moe_virtual = max_over_ranks(world, model.virtual_times().moe);
    const SideBubbles idle = side_bubbles(world, engine);
    world.allreduce(chosen, chosen, {.op = ReduceOp::max}).wait();  // chosen by any rank's tokens
    double touched = 0;
    for (int64_t i = 0; i < chosen.numel(); ++i) touched += chosen.data_as<double>()[i];
    touched /= static_cast<double>(o.steps) * c.layers;  // distinct experts a step read per layer
    const StepWork work = decode_step_work(c, model.expert_bytes() / 4, B, mean_len, touched);
    const double step_ms = seconds / o.steps * 1e3;
    const double floor_ms = std::max(work.bytes / bandwidth[bi], work.flops / flop_rate) * 1e3;
    const ModelPhaseTimes t = model.times();
    // One more step, recorded and drawn, after every figure of the batch was taken.
    if (!o.timeline.empty() && bi + 1 == o.batches.size()) {
      engine.record_timeline(true);
      feed_greedy_tokens(logits, c.vocab_size, chunks);
      logits = engine.step(chunks);
      engine.record_timeline(false);
      write_timeline(world, engine, o.timeline, c.name + ", batch " + std::to_string(B) + ", " + schedule_name(engine) +
                                                    (cluster ? ", virtual time on " + cluster->name : std::string(", wall time")));
    }

    if (cluster) {
      const double tpot = virtual_seconds / o.steps, tps = B / tpot;
      const double moe_ms = moe_virtual / o.steps * 1e3, attn_ms = attention_virtual / o.steps * 1e3;
      const double mem = memory.weights + static_cast<double>(sequences_per_group(B)) * positions * memory.kv_per_position;
      last_tps = tps;
      if (!speak) continue;
      std::printf("%6d %10.4f %12.1f %12.1f %9.4f %9.4f %9.4f %7.2f %6.1f%% %6.1f%% %10.3f %8.3f\n", B, tpot * 1e3, tps,
                  tps / W, attn_ms, moe_ms, floor_ms, tpot * 1e3 / floor_ms, 100 * idle.attention_virtual,
                  100 * idle.ffn_virtual, step_ms, mem / 1e9);
      std::fflush(stdout);
      points += std::to_string(B) + " " + std::to_string(tps / W) + "\n";
      if (csv)
        std::fprintf(csv, "%d,%d,%s,%.6f,%.2f,%.2f,%.6f,%.6f,%.6f,%.3f,%.4f,%.4f,%.4f,%.4f\n", B, W,
                     csv_field(schedule_name(engine)).c_str(), tpot * 1e3, tps, tps / W, attn_ms, moe_ms, floor_ms,
                     tpot * 1e3 / floor_ms, step_ms, mem / 1e9, idle.attention_virtual, idle.ffn_virtual);
      continue;
    }
    const double tps = B * o.steps / seconds;
    last_tps = tps;
    if (!speak) continue;
    // A step well under its floor means the floor's estimate (a warm read at the step's footprint) was wrong
    // for this run, not that the step beat the machine: the ratio is then not a result.
    const bool beaten = step_ms < 0.8 * floor_ms;
    std::printf("%6d %12.1f %12.1f %10.3f %9.3f %9.3f %9.3f %9.3f %7.2f %8.1f %6.1f%% %6.1f%%%s\n", B, tps, tps / W,
                step_ms, t.attention / o.steps * 1e3, t.moe / o.steps * 1e3, t.head / o.steps * 1e3, floor_ms,
                step_ms / floor_ms, bandwidth[bi] / 1e9, 100 * idle.attention, 100 * idle.ffn,
                beaten ? "  INCONCLUSIVE: the step beat its floor by over 20% (the bandwidth estimate is off here)" : "");
    std::fflush(stdout);
    points += std::to_string(B) + " " + std::to_string(tps) + "\n";
    if (csv)
      std::fprintf(csv, "%d,%d,%s,%.2f,%.2f,%.4f,%.4f,%.4f,%.4f,%.4f,%.3f,%.2f,%.4f,%.4f\n", B, W,
                   csv_field(schedule_name(engine)).c_str(), tps, tps / W, step_ms, t.attention / o.steps * 1e3,
                   t.moe / o.steps * 1e3, t.head / o.steps * 1e3, floor_ms, step_ms / floor_ms, bandwidth[bi] / 1e9,
                   idle.attention, idle.ffn);
  }
  if (!speak) return;
  if (cluster && last_tps == 0)
    std::printf("no batch fitted the device memory of %s\n", cluster->name.c_str());
  else if (cluster)
    std::printf("total tokens/s (virtual, %s): %.1f (the last batch that fitted, all %d GPUs)\n", cluster->name.c_str(),
                last_tps, W);
  else
    std::printf("total tokens/s: %.1f (batch %d, all %d ranks)\n", last_tps, o.batches.back(), W);
  if (csv) {
    std::fclose(csv);
    std::printf("# wrote %s\n", o.csv.c_str());
  }
  if (!o.png.empty())
    plot_png(o.png, "set logscale x 2\nset grid\nset key top left\nset xlabel 'batch (sequences)'\n"
                    "set ylabel '" + std::string(cluster ? "tokens/s per GPU (virtual)" : "tokens/s (all ranks)") +
                        "'\nset title 'bench decode: " + c.name + ", " + schedule_name(engine) + " on " + std::to_string(W) +
                        (cluster ? " emulated " + cluster->name : std::string(" rank(s)")) + "'\n$d << EOD\n" + points +
                        "EOD\nplot $d using 1:2 with linespoints pt 7 title 'tokens/s'\n");
}

void bench_requests(Runtime& rt, InferenceEngine& engine, const BenchDecodeOptions& o) {
  Model& model = engine.model();
  const ModelConfig& c = model.config();
  Communicator& world = rt.world();
  const bool speak = world.rank() == 0;
  const int W = world.size();
  // The same requests on every rank (same seed).
  Rng rng(o.seed);
  auto between = [&](int lo, int hi) { return lo + static_cast<int>(rng.uniform(0, hi - lo + 1 - 1e-9)); };
  const auto arrivals = poisson_arrivals(o.requests, o.rate, o.seed + 1);
  std::vector<std::vector<int>> texts;
  if (!o.prompts.empty()) {
    std::ifstream in(o.prompts);
    if (!in) SY_THROW(IoError, "bench decode: cannot read --prompts '", o.prompts, "'");
    for (std::string line; std::getline(in, line);)
      if (!line.empty()) texts.push_back(bytes_of(line));
    if (texts.empty()) SY_THROW(InvalidArgument, "bench decode: --prompts '", o.prompts, "' holds no prompt");
  }
  std::vector<Request> requests(static_cast<size_t>(o.requests));
  for (int i = 0; i < o.requests; ++i) {
    Request& r = requests[static_cast<size_t>(i)];
    r.id = i;
    const int length = between(std::max(1, o.prompt_tokens / 2), std::max(1, o.prompt_tokens * 3 / 2));
    if (texts.empty()) {
      r.prompt = prompt_of(i, length);
    } else {
      const std::vector<int>& text = texts[static_cast<size_t>(i) % texts.size()];
      r.prompt.assign(text.begin(), text.begin() + std::min<size_t>(static_cast<size_t>(length), text.size()));
    }
    r.max_new_tokens = between(std::max(1, o.steps / 2), std::max(1, o.steps * 3 / 2));
    r.arrival = arrivals[static_cast<size_t>(i)];
  }
  ServingOptions so;
  so.max_batch = o.max_batch;
  so.kv_budget = o.kv_budget;
  so.prefill_chunk = o.prefill_chunk;
  so.redundant_experts = o.redundant_experts;
  so.rebalance_every = o.rebalance_every;
  so.on_rebalance = [&](int64_t step, const Model::Rebalance& r, double seconds) {
    if (speak)
      std::printf("# after step %lld: rebalanced %d layers onto %s in %.1f ms (in the total time, not in step()); "
                  "rank load max/mean estimated from the loads since the last one %.3f -> %.3f (mean over layers; "
                  "replicas taken to share evenly)\n",
                  static_cast<long long>(step), c.layers, r.placement.c_str(), seconds * 1e3, r.before, r.after);
  };
  {  // warm-up: a few short requests at once, untimed
    std::vector<Request> warm;
    for (int i = 0; i < 2 * W; ++i) warm.push_back({.id = i, .prompt = prompt_of(i, 8), .max_new_tokens = 4});
    RoundRobinScheduler rr;
    serve(engine, warm, rr, {.max_batch = o.max_batch});
    model.reset_expert_loads();  // the first rebalance sees the requests' loads only
  }
  so.progress = [&](const ServeProgress& p) {
    std::fprintf(stderr, "[bench decode] %6.1f s: %lld/%lld requests finished, %lld steps\n", p.seconds,
                 static_cast<long long>(p.finished), static_cast<long long>(p.total), static_cast<long long>(p.steps));
  };
  RoundRobinScheduler rr;
  std::unique_ptr<AffinityScheduler> by_affinity;
  if (o.scheduler == "affinity")
    by_affinity = std::make_unique<AffinityScheduler>(std::make_shared<const AffinityTables>(AffinityTables::load(o.parallel.affinity)));
  RequestScheduler& scheduler = by_affinity ? static_cast<RequestScheduler&>(*by_affinity) : rr;
  ServingStats st;
  model.reset_times();
  engine.reset_step_times();
  model.reset_local_activation();  // the requests' choices only, not the warm-up's
  const auto results = serve(engine, requests, scheduler, so, &st);
  const SideBubbles idle = side_bubbles(world, engine);
  // Every request's figures to every rank: the group that served it fills its row.
  const int F = 6;  // ttft, tpot, tokens, prompt, group, arrival
  Tensor all = Tensor::zeros({o.requests * F}, DType::f64);
  if (engine.speaks_for_group())
    for (const RequestResult& r : results) {
      double* row = all.data_as<double>() + r.id * F;
      const Request& q = requests[static_cast<size_t>(r.id)];
      row[0] = r.ttft(), row[1] = r.tpot(), row[2] = static_cast<double>(r.tokens.size());
      row[3] = static_cast<double>(q.prompt.size()), row[4] = r.group, row[5] = q.arrival;
    }
  world.allreduce(all, all).wait();
  Tensor per_rank = Tensor::zeros({2 * W}, DType::f64);  // rows computed, step seconds
  per_rank.data_as<double>()[world.rank()] = static_cast<double>(st.rows);
  per_rank.data_as<double>()[W + world.rank()] = st.step_seconds;
  world.allreduce(per_rank, per_rank).wait();
  const double seconds = max_over_ranks(world, st.seconds);
  if (!speak) return;
  std::vector<double> ttft, tpot;
  double tokens = 0;
  for (int i = 0; i < o.requests; ++i) {
    const double* row = all.data_as<double>() + i * F;
    ttft.push_back(row[0] * 1e3);
    if (row[2] > 1) tpot.push_back(row[1] * 1e3);
    tokens += row[2];
  }
  char rate[64];
  std::snprintf(rate, sizeof rate, "Poisson at %g/s", o.rate);
  const std::string arriving = o.rate > 0 ? rate : "all at once";
  std::printf("requests: %d (prompts %d..%d tokens, outputs %d..%d tokens), arrivals %s, max batch %d per rank, "
              "prefill chunk %s, KV budget %s\n",
              o.requests, std::max(1, o.prompt_tokens / 2), std::max(1, o.prompt_tokens * 3 / 2),
              std::max(1, o.steps / 2), std::max(1, o.steps * 3 / 2),
              arriving.c_str(), o.max_batch,
              o.prefill_chunk > 0 ? std::to_string(o.prefill_chunk).c_str() : "whole prompts",
              o.kv_budget > 0 ? std::to_string(o.kv_budget).c_str() : "unlimited");
  std::printf("total tokens/s: %.1f (all %d ranks; %.0f tokens generated in %.3f s)\n", tokens / seconds, W, tokens, seconds);
  std::printf("tokens/s per rank: %.1f\n", tokens / seconds / W);
  std::printf("TTFT ms: median %.2f, p90 %.2f\nTPOT ms: median %.3f, p90 %.3f\n", median(ttft),
              percentile(ttft, 0.9), median(tpot), percentile(tpot, 0.9));
  std::printf("steps: %lld (%lld without rows on rank 0); rows per rank:", static_cast<long long>(st.steps),
              static_cast<long long>(st.idle_steps));
  for (int r = 0; r < W; ++r) std::printf(" %.0f", per_rank.data_as<double>()[r]);
  std::printf("; in step(): %.3f s of %.3f s on rank 0\n", st.step_seconds, seconds);
  if (st.rebalances > 0)
    std::printf("rebalances: %lld, %.3f s in all (every %d steps, %d redundant experts)\n",
                static_cast<long long>(st.rebalances), st.rebalance_seconds, o.rebalance_every, o.redundant_experts);
  std::printf("pipeline bubble (share of step time waiting on the MoE exchanges): attention ranks %.1f%%, FFN ranks "
              "%.1f%%%s\n", 100 * idle.attention, 100 * idle.ffn,
              engine.schedule().roles() ? "" : " (colocated: every rank is both)");
  if (!o.csv.empty()) {
    std::ofstream csv(o.csv);
    if (!csv) SY_THROW(IoError, "bench decode: cannot write --csv '", o.csv, "'");
    csv << "request,rank,prompt_tokens,new_tokens,arrival_s,ttft_ms,tpot_ms\n";
    for (int i = 0; i < o.requests; ++i) {
      const double* row = all.data_as<double>() + i * F;
      csv << i << ',' << engine.schedule().group_leader(static_cast<int>(row[4])) << ',' << row[3] << ',' << row[2]
          << ',' << row[5] << ',' << row[0] * 1e3 << ',' << row[1] * 1e3 << '\n';
    }
    csv.close();
    std::printf("# wrote %s\n", o.csv.c_str());
    if (!o.png.empty())
      plot_png(o.png, "set datafile separator ','\nset grid\nset key top left\nset xlabel 'request (arrival order)'\n"
                      "set ylabel 'TTFT (ms)'\nset y2label 'TPOT (ms)'\nset y2tics\nset ytics nomirror\n"
                      "set title 'bench decode: " + c.name + ", " + std::to_string(o.requests) + " requests, attention " +
                          attention_mode_name(engine.schedule().attention()) + " on " + std::to_string(W) +
                          " rank(s)'\nplot '" + o.csv + "' every ::1 using 1:6 with points pt 7 title 'TTFT', '' every ::1 using 1:7 "
                          "axes x1y2 with points pt 5 title 'TPOT'\n");
  } else if (!o.png.empty()) {
    std::printf("# --png needs --csv (the plot reads it)\n");
  }
}

}  // namespace

void BenchDecodeOptions::validate() const {
  if (scheduler != "round_robin" && scheduler != "affinity")
    SY_THROW(ConfigError, "bench decode: --scheduler = '", scheduler, "', expected round_robin or affinity");
  if (scheduler == "affinity" && (requests == 0 || parallel.affinity.empty() || parallel.attention != "dp"))
    SY_THROW(ConfigError, "bench decode: --scheduler affinity assigns requests to data-parallel ranks by the tables: "
             "it needs --requests, --affinity TABLES and --attention dp");
  if (scheduler == "affinity" && redundant_experts > 0)
    SY_THROW(ConfigError, "bench decode: --scheduler affinity scores requests by the tables' placement, and "
             "--redundant_experts re-places the experts while serving; expected one of them");
  if (!prompts.empty() && requests == 0)
    SY_THROW(ConfigError, "bench decode: --prompts is for request mode (--requests N)");
  if (prompt_tokens < 1) SY_THROW(InvalidArgument, "bench decode: --prompt_tokens = ", prompt_tokens, ", expected >= 1");
  if (steps < 1) SY_THROW(InvalidArgument, "bench decode: --steps = ", steps, ", expected >= 1");
  if (requests < 0) SY_THROW(InvalidArgument, "bench decode: --requests = ", requests, ", expected >= 0 (0: batch mode)");
  if (rate < 0 || !std::isfinite(rate))
    SY_THROW(InvalidArgument, "bench decode: --rate = ", rate, ", expected >= 0 (0: all at once)");
  if (max_batch < 1) SY_THROW(InvalidArgument, "bench decode: --max_batch = ", max_batch, ", expected >= 1");
  if (kv_budget < 0) SY_THROW(InvalidArgument, "bench decode: --kv_budget = ", kv_budget, ", expected >= 0");
  if (prefill_chunk < 0) SY_THROW(InvalidArgument, "bench decode: --prefill_chunk = ", prefill_chunk, ", expected >= 0");
  if (redundant_experts < 0 || rebalance_every < 0 || (rebalance_every > 0) != (redundant_experts > 0))
    SY_THROW(InvalidArgument, "bench decode: --redundant_experts = ", redundant_experts, " and --rebalance_every = ",
             rebalance_every, ", expected both > 0 (or both 0)");
  if (redundant_experts > (1 << 20))
    SY_THROW(InvalidArgument, "bench decode: --redundant_experts = ", redundant_experts, ", expected at most 2^20");
  if (parallel.threads < 0) SY_THROW(InvalidArgument, "bench decode: --threads = ", parallel.threads, ", expected >= 0");
  if (redundant_experts > 0 && !parallel.afd.empty())
    SY_THROW(InvalidArgument, "bench decode: --redundant_experts with --afd: rebalancing a disaggregated model's "
             "experts is not built (EPLB would place experts on the attention ranks)");
  if (!timeline.empty() && (parallel.afd.empty() || requests > 0))
    SY_THROW(InvalidArgument, "bench decode: --timeline draws a disaggregated step of batch mode; expected --afd A:F "
             "and no --requests");
  if (!emulate.empty() && requests > 0)
    SY_THROW(InvalidArgument, "bench decode: --emulate times batch mode in virtual time; request mode (--requests = ",
             requests, ") runs on this machine's wall clock (give one of them)");
  for (int B : batches)
    if (B < 1) SY_THROW(InvalidArgument, "bench decode: --batch ", B, ", expected >= 1");
}

void BenchSpecOptions::validate() const {
  if (!parallel.affinity.empty())
    SY_THROW(ConfigError, "bench spec: ", parallel.affinity_field, " is not built here (the base and the draft would "
             "need a placement each); use it with generate or bench decode");
  if (!parallel.afd.empty() || parallel.microbatches != 1)
    SY_THROW(ConfigError, "bench spec: ", parallel.afd.empty() ? parallel.microbatches_field : parallel.afd_field,
             " is for disaggregated decoding; speculative decoding on a disaggregated deployment is not built");
  if (parallel.dispatch_dtype != "f32" || parallel.combine_dtype != "f32")
    SY_THROW(ConfigError, "bench spec: ", parallel.dispatch_dtype != "f32" ? parallel.dispatch_field : parallel.combine_field,
             " other than f32 is not built for speculative decoding (it compares against exact greedy decoding)");
  if (count < 1) SY_THROW(InvalidArgument, "bench spec: --count = ", count, ", expected >= 1");
  if (max_new_tokens < 1) SY_THROW(InvalidArgument, "bench spec: --max_new_tokens = ", max_new_tokens, ", expected >= 1");
  if (batch < 1) SY_THROW(InvalidArgument, "bench spec: --batch = ", batch, ", expected >= 1");
  if (rounds < 1) SY_THROW(InvalidArgument, "bench spec: --rounds = ", rounds, ", expected >= 1");
  for (int g : gammas)
    if (g < 1 || g > 64) SY_THROW(InvalidArgument, "bench spec: --gamma ", g, ", expected 1..64");
  for (int n : lps)
    if (n < 1) SY_THROW(InvalidArgument, "bench spec: --lp ", n, ", expected >= 1");
  for (const std::string& c : calibrations) parse_calibration(c, "bench spec: --calibration");
}

namespace {
// One configuration's figures, summed over this rank's batches.
struct SpecRun {
  std::string mode;  // plain | exact | easyspec
  int lp = 1, gamma = 0;
  std::string calibration = "-";
  SpeculativeStats stats;
  std::vector<double> tokens_per_s;  // per round
  double virtual_tokens_per_s = 0;   // emulated: on the preset (deterministic)
  bool same_as_plain = true;
};
}  // namespace

int run_bench_spec(const BenchSpecOptions& o) {
  o.validate();
  std::vector<std::vector<int>> prompts;
  {
    std::ifstream in(o.prompts);
    if (!in) SY_THROW(IoError, "bench spec: cannot read --prompts '", o.prompts, "'");
    std::string line;
    while (static_cast<int>(prompts.size()) < o.count && std::getline(in, line))
      if (!line.empty()) prompts.push_back(bytes_of(line));
    if (prompts.empty()) SY_THROW(InvalidArgument, "bench spec: --prompts '", o.prompts, "' holds no prompt");
  }
  std::optional<ClusterModel> cluster;
  if (!o.emulate.empty()) cluster = load_cluster_preset(o.emulate);
  run_ranks(runtime_options(o.parallel), [&](Runtime& rt) {
    const int threads = set_rank_threads(o.parallel, rt);
    std::shared_ptr<Communicator> group = rt.world_ptr();
    ModelOptions mo;
    if (cluster) {
      group = make_emulated_communicator(group, cluster->link);
      mo.device = std::make_shared<const DeviceModel>(cluster->device);
    }
    Communicator& world = *group;  // emulated: its barriers meet the ranks' virtual clocks
    const int W = world.size();
    const bool speak = world.rank() == 0;
    // The draft is small: by default every rank holds all of it, so its MoE layers need no all-to-all.
    const std::shared_ptr<Communicator> self = group->split(group->rank(), 0);
    Model base(o.model, group, mo), draft(o.draft, o.draft_spread ? group : self, mo);
    InferenceEngine be(base, LayerSchedule::make(o.parallel.schedule(), base.config().layers, W));
    if (be.schedule().token_groups() != 1)
      SY_THROW(ConfigError, "bench spec: --attention = ", o.parallel.attention, " gives ", be.schedule().token_groups(),
               " token groups; expected one (replicated, or tp over all ", W, " ranks), as EasySpec drafts over every rank");
    InferenceEngine exact_draft(draft,
                                o.draft_spread ? LayerSchedule::make(o.parallel.schedule(), draft.config().layers, W)
                                               : LayerSchedule::replicated(draft.config().layers, W),
                                group);
    for (const auto& p : prompts)
      if (static_cast<int>(p.size()) + o.max_new_tokens + 1 > std::min(base.config().max_seq, draft.config().max_seq))
        SY_THROW(InvalidArgument, "bench spec: a prompt of ", p.size(), " tokens + --max_new_tokens = ", o.max_new_tokens,
                 " exceed max_seq");
    std::vector<SpecRun> runs;
    runs.push_back({"plain", 1, 0});
    for (int n : o.lps)
      for (int g : o.gammas) {
        if (n == 1) {
          runs.push_back({"exact", 1, g, "never"});
          continue;
        }
        if (n > W) continue;  // said below
        for (const std::string& c : o.calibrations) runs.push_back({"easyspec", n, g, c});
      }
    if (speak) {
      std::printf("bench spec: %s verifying %s (%s) on %d rank(s) (%s), %d GEMM thread(s) per rank; %zu prompts from "
                  "%s, %d new tokens each, greedy, %d at once; %d round(s), configurations alternated\n",
                  base.config().name.c_str(), draft.config().name.c_str(),
                  o.draft_spread ? "its experts spread over the ranks" : "all of it on every rank", W,
                  be.schedule().describe().c_str(), threads,
                  prompts.size(), o.prompts.c_str(), o.max_new_tokens, o.batch, o.rounds);
      for (int n : o.lps)
        if (n > W) std::printf("# --lp %d skipped: it needs %d ranks\n", n, n);
      std::fflush(stdout);
    }
    {  // warm-up, untimed: buffers and caches sized, the draft's first forwards paid
      SpeculativeOptions warm{.gamma = o.gammas.front()};
      speculative_generate(be, exact_draft, {prompts.front()}, std::min(8, o.max_new_tokens), warm);
    }
    if (speak && cluster)
      std::printf("# wall times under --emulate include the emulator's own work (a small all-reduce per collective)\n");
    std::vector<std::vector<int>> reference;  // plain greedy output, per prompt
    std::map<int, std::unique_ptr<InferenceEngine>> lp_drafts;
    for (int round = 0; round < o.rounds; ++round)
      for (SpecRun& run : runs) {
        InferenceEngine* de = &exact_draft;
        if (run.mode == "easyspec") {
          auto& e = lp_drafts[run.lp];
          if (!e)
            e = std::make_unique<InferenceEngine>(draft, LayerSchedule::layer_parallel(draft.config().layers, W, run.lp),
                                                  group);
          de = e.get();
        }
        std::vector<std::vector<int>> out;
        world.barrier().wait();
        const auto start = Clock::now();
        const double virtual_start = virtual_time::now();
        SpeculativeStats total;
        for (size_t first = 0; first < prompts.size(); first += static_cast<size_t>(o.batch)) {
          const std::vector<std::vector<int>> batch(
              prompts.begin() + static_cast<std::ptrdiff_t>(first),
              prompts.begin() + static_cast<std::ptrdiff_t>(std::min(prompts.size(), first + static_cast<size_t>(o.batch))));
          std::vector<std::vector<int>> got;
          if (run.mode == "plain") {  // prefill, then one token per step
            std::vector<KVCache> caches;
            std::vector<Chunk> chunks;
            caches.reserve(batch.size());
            for (const auto& p : batch) {
              caches.push_back(be.new_cache(static_cast<int>(p.size()) + o.max_new_tokens + 1));
              chunks.push_back({&caches.back(), p});
            }
            got.assign(batch.size(), {});
            for (int t = 0; t < o.max_new_tokens; ++t) {
              feed_greedy_tokens(be.step(chunks), base.config().vocab_size, chunks);
              for (size_t c = 0; c < chunks.size(); ++c) got[c].push_back(chunks[c].tokens[0]);
            }
          } else {
            SpeculativeStats st;
            got = speculative_generate(be, *de, batch, o.max_new_tokens,
                                       {.gamma = run.gamma,
                                        .calibration = run.mode == "exact" ? Calibration::never
                                                                           : parse_calibration(run.calibration, "--calibration"),
                                        .adaptive_gamma = o.adaptive},
                                       &st);
            total += st;
          }
          out.insert(out.end(), got.begin(), got.end());
        }
        const double wall = seconds_since(start);
        world.barrier().wait();
        const double virtual_seconds = max_over_ranks(world, virtual_time::now() - virtual_start);
        const double seconds = max_over_ranks(world, wall);
        const double tokens = static_cast<double>(prompts.size()) * o.max_new_tokens;
        run.tokens_per_s.push_back(tokens / seconds);
        if (cluster) run.virtual_tokens_per_s = tokens / virtual_seconds;
        if (run.mode == "plain") reference = out;
        else if (out != reference) run.same_as_plain = false;
        // Acceptance is the same every round (greedy); times per token are over every round.
        run.stats += total;
        if (speak) std::fprintf(stderr, "[bench spec] round %d/%d: %s lp=%d gamma=%d %s: %.1f tokens/s\n", round + 1,
                                o.rounds, run.mode.c_str(), run.lp, run.gamma, run.calibration.c_str(), tokens / seconds);
      }
    // EasySpec's bound on the drafting speed-up: D = gamma / (1 + (gamma - 1) r), r = a fuzzy draft step's time
    // over an exact one, both measured here on one sequence (alternated, medians of 15; virtual when emulating).
    std::map<int, double> step_ratio;
    for (auto& [n, engine] : lp_drafts) {
      KVCache cache = engine->new_cache(static_cast<int>(prompts.front().size()) + 2);
      engine->step_exact({{&cache, prompts.front()}});
      const int length = cache.length();
      std::vector<double> exact_t, fuzzy_t;
      for (int i = 0; i < 16; ++i)
        for (int fuzzy = 0; fuzzy < 2; ++fuzzy) {
          world.barrier().wait();
          const auto t0 = Clock::now();
          const double v0 = virtual_time::now();
          if (fuzzy) engine->step({{&cache, {prompts.front().back()}}});
          else engine->step_exact({{&cache, {prompts.front().back()}}});
          world.barrier().wait();
          const double took = cluster ? max_over_ranks(world, virtual_time::now() - v0)
                                      : max_over_ranks(world, seconds_since(t0));
          if (i > 0) (fuzzy ? fuzzy_t : exact_t).push_back(took);  // step 0 warms up
          cache.crop(length);
        }
      step_ratio[n] = median(fuzzy_t) / median(exact_t);
    }
    // Each configuration's drafting time per round (calibration included) against exact drafting's at its gamma.
    std::map<int, double> exact_round;
    for (const SpecRun& run : runs)
      if (run.mode == "exact" && run.stats.rounds > 0)
        exact_round[run.gamma] = (run.stats.draft_seconds + run.stats.calibration_seconds) / run.stats.rounds;
    if (!speak) return;
    for (const auto& [n, r] : step_ratio)
      std::printf("# lp %d: a fuzzy draft step takes %.2f of an exact one (%s); bound on drafting x exact: D = gamma / "
                  "(1 + (gamma - 1) x %.2f)\n", n, r, cluster ? "virtual" : "wall", r);
    const double plain = median(runs.front().tokens_per_s), plain_virtual = runs.front().virtual_tokens_per_s;
    std::printf("plain: %.1f tokens/s (median of %d)", plain, o.rounds);
    if (cluster) std::printf("; %.1f tokens/s virtual on %s", plain_virtual, cluster->name.c_str());
    std::printf("\n");
    std::FILE* csv = o.csv.empty() ? nullptr : std::fopen(o.csv.c_str(), "w");
    if (!o.csv.empty() && !csv) SY_THROW(IoError, "bench spec: cannot write --csv '", o.csv, "'");
    if (csv)
      std::fprintf(csv, "mode,lp,gamma,calibration,accepted,proposed,acceptance,tokens_per_round,draft_ms_per_token,"
                        "verify_ms_per_token,calibration_ms_per_token,tokens_per_s,vs_plain,same_as_plain,"
                        "virtual_tokens_per_s,virtual_vs_plain\n");
    std::string points;
    bool all_same = true;
    for (const SpecRun& run : runs) {
      if (run.mode == "plain") continue;
      const SpeculativeStats& st = run.stats;
      const double per = static_cast<double>(std::max<int64_t>(st.generated, 1));
      const double tps = median(run.tokens_per_s);
      all_same = all_same && run.same_as_plain;
      std::printf("spec %s lp=%d gamma=%s%d calibration=%s: acceptance %lld/%lld (%.3f), tokens/round %.2f, draft %.3f "
                  "ms/token, verify %.3f ms/token, calibration %.3f ms/token, %.1f tokens/s, %.2fx plain%s\n",
                  run.mode.c_str(), run.lp, o.adaptive ? "<=" : "", run.gamma, run.calibration.c_str(),
                  static_cast<long long>(st.accepted), static_cast<long long>(st.proposed), st.acceptance(),
                  st.tokens_per_round(),
                  st.draft_seconds / per * 1e3, st.verify_seconds / per * 1e3, st.calibration_seconds / per * 1e3, tps,
                  tps / plain, run.same_as_plain ? "" : "  OUTPUT DIFFERS FROM PLAIN GREEDY");
      if (cluster)
        std::printf("     virtual on %s: %.1f tokens/s, %.2fx plain\n", cluster->name.c_str(), run.virtual_tokens_per_s,
                    run.virtual_tokens_per_s / plain_virtual);
      if (run.mode == "easyspec" && exact_round.count(run.gamma) && st.rounds > 0 && step_ratio.count(run.lp)) {
        const double r = step_ratio.at(run.lp), bound = run.gamma / (1 + (run.gamma - 1) * r);
        const double measured = exact_round.at(run.gamma) / ((st.draft_seconds + st.calibration_seconds) / st.rounds);
        if (cluster)  // the run's drafting times are wall; the bound is the preset's (virtual)
          std::printf("     drafting x exact: bound D %.2f (virtual)\n", bound);
        else
          std::printf("     drafting x exact (wall, per round): measured %.2f, bound D %.2f\n", measured, bound);
      }
      if (csv)
        std::fprintf(csv, "%s,%d,%d,%s,%lld,%lld,%.4f,%.3f,%.4f,%.4f,%.4f,%.2f,%.3f,%d,%.2f,%.3f\n", run.mode.c_str(),
                     run.lp, run.gamma, run.calibration.c_str(), static_cast<long long>(st.accepted),
                     static_cast<long long>(st.proposed), st.acceptance(), st.tokens_per_round(),
                     st.draft_seconds / per * 1e3, st.verify_seconds / per * 1e3, st.calibration_seconds / per * 1e3,
                     tps, tps / plain, run.same_as_plain ? 1 : 0, run.virtual_tokens_per_s,
                     cluster ? run.virtual_tokens_per_s / plain_virtual : 0.0);
    }
    std::printf("%s\n", all_same ? "every configuration's output equals plain greedy decoding"
                                  : "FAILED: some configuration's output differs from plain greedy decoding");
    std::fflush(stdout);
    if (csv) {
      std::fclose(csv);
      std::printf("# wrote %s\n", o.csv.c_str());
      if (!o.png.empty()) {  // acceptance per gamma: exact drafting, then each (lp, calibration) of EasySpec
        std::string series = "'" + o.csv + "' every ::1 using 3:(strcol(1) eq 'exact' ? $7 : 1/0) with points pt 7 "
                             "ps 2 title 'exact'";
        for (int n : o.lps)
          for (const std::string& c : o.calibrations)
            if (n > 1 && n <= W)
              series += ", '' every ::1 using 3:($2 == " + std::to_string(n) + " && strcol(4) eq '" + c +
                        "' ? $7 : 1/0) with points ps 1.5 title 'easyspec lp " + std::to_string(n) + ", calibration " + c + "'";
        plot_png(o.png, "set datafile separator ','\nset grid\nset key bottom left\nset xlabel 'gamma'\n"
                        "set ylabel 'acceptance (proposals accepted)'\nset title 'bench spec: " + base.config().name +
                            " verifying " + draft.config().name + "'\nplot " + series + "\n");
      }
    }
    if (!all_same) SY_THROW(InvalidArgument, "bench spec: speculative output differs from plain greedy decoding");
  });
  return 0;
}

int run_generate(const GenerateOptions& o) {
  if (o.prompt.empty()) SY_THROW(InvalidArgument, "generate: --prompt is empty; expected some text to continue");
  if (o.parallel.threads < 0) SY_THROW(InvalidArgument, "generate: --threads = ", o.parallel.threads, ", expected >= 0");
  if (o.max_new_tokens < 1)
    SY_THROW(InvalidArgument, "generate: --max_new_tokens = ", o.max_new_tokens, ", expected >= 1");
  run_ranks(runtime_options(o.parallel), [&](Runtime& rt) {
    set_rank_threads(o.parallel, rt);
    Model model(o.model, rt.world_ptr(), model_options(o.parallel, rt.world().size()));
    const std::unique_ptr<InferenceEngine> engine_ptr = make_engine(model, o.parallel, rt.info().local_size);
    InferenceEngine& engine = *engine_ptr;
    if (!o.draft.empty() && engine.schedule().roles())
      SY_THROW(ConfigError, "--draft with --afd = ", o.parallel.afd, ": speculative decoding on a disaggregated "
               "deployment is not built (run the draft colocated: drop --afd)");
    if (static_cast<int>(o.prompt.size()) + o.max_new_tokens > model.config().max_seq)
      SY_THROW(InvalidArgument, "generate: a prompt of ", o.prompt.size(), " tokens + --max_new_tokens = ",
               o.max_new_tokens, " exceed the model's max_seq = ", model.config().max_seq);
    // The request goes to token group 0; its first rank streams the text (rank 0 unless the roles put an
    // FFN rank first).
    const bool speak = engine.schedule().group_leader(0) == rt.world().rank();
    auto echo_prompt = [&] {
      if (!speak) return;
      std::fputs(o.prompt.c_str(), stdout);
      std::fflush(stdout);
    };
    if (!o.draft.empty()) {  // speculative: the request on token group 0, the others join every collective empty
      const std::shared_ptr<Communicator> self = rt.world().split(rt.world().rank(), 0);
      Model draft(o.draft, o.draft_spread ? rt.world_ptr() : self);  // default: all of the small draft on every rank
      if (o.speculative != "plain" && o.speculative != "easyspec")
        SY_THROW(ConfigError, "--speculative = '", o.speculative, "', expected plain or easyspec");
      if (o.speculative == "easyspec" && engine.schedule().token_groups() != 1)
        SY_THROW(ConfigError, "--speculative = easyspec drafts layer-parallel over every rank, so the model's attention "
                 "must give one token group (replicated, or tp over all ", rt.world().size(), " ranks); --attention = ",
                 o.parallel.attention, " gives ", engine.schedule().token_groups());
      const LayerSchedule draft_schedule =
          o.speculative == "easyspec" ? LayerSchedule::layer_parallel(draft.config().layers, rt.world().size(), o.lp, "--lp")
          : o.draft_spread            ? LayerSchedule::make(o.parallel.schedule(), draft.config().layers, rt.world().size())
                                      : LayerSchedule::replicated(draft.config().layers, rt.world().size());
      InferenceEngine draft_engine(draft, draft_schedule, rt.world_ptr());
      const Calibration calibration = parse_calibration(o.calibration, "--calibration");
      echo_prompt();
      std::vector<std::vector<int>> prompts;
      if (engine.token_group() == 0) prompts.push_back(bytes_of(o.prompt));
      SpeculativeStats st;
      const auto out = speculative_generate(engine, draft_engine, prompts, o.max_new_tokens,
                                            {.gamma = o.gamma, .sampling = o.sampling, .calibration = calibration,
                                             .adaptive_gamma = o.adaptive_gamma},
                                            &st);
      if (speak) {
        for (int t : out.at(0)) std::fputc(t, stdout);
        std::printf("\n[%s verifying %s (%s%s) on %d rank(s), attention %s, gamma %d, calibration %s] acceptance %.2f "
                    "(%lld of %lld), %.2f tokens per base forward, %lld base forwards for %zu tokens; drafting %.1f "
                    "ms, verifying %.1f ms, calibrating %.1f ms, %.1f tokens/s\n",
                    model.config().name.c_str(), draft.config().name.c_str(), o.speculative.c_str(),
                    o.speculative == "easyspec" ? (", lp " + std::to_string(o.lp)).c_str() : "", rt.world().size(),
                    attention_mode_name(engine.schedule().attention()), o.gamma, o.calibration.c_str(), st.acceptance(),
                    static_cast<long long>(st.accepted), static_cast<long long>(st.proposed), st.tokens_per_round(),
                    static_cast<long long>(st.rounds), out.at(0).size(), st.draft_seconds * 1e3,
                    st.verify_seconds * 1e3, st.calibration_seconds * 1e3,
                    static_cast<double>(out.at(0).size()) / st.total_seconds);
      }
      return;
    }
    echo_prompt();
    Request r{.id = 0, .prompt = bytes_of(o.prompt), .max_new_tokens = o.max_new_tokens, .sampling = o.sampling};
    ServingOptions so;
    so.on_token = [&](int64_t, int token) {
      if (!speak) return;
      std::fputc(token, stdout);
      std::fflush(stdout);
    };
    RoundRobinScheduler rr;
    ServingStats st;
    const auto results = serve(engine, {r}, rr, so, &st);
    const std::string lar = o.parallel.affinity.empty() ? "" : "; " + local_activation_summary(engine);
    if (speak && !results.empty()) {
      const RequestResult& res = results[0];
      std::printf("\n[%s on %d rank(s), %s] prefill %lld tokens, first token after %.1f ms; %zu tokens in "
                  "%.1f ms (%.1f tokens/s after the first)%s\n",
                  model.config().name.c_str(), rt.world().size(), schedule_name(engine).c_str(),
                  static_cast<long long>(st.prompt_tokens), res.ttft() * 1e3, res.tokens.size(),
                  (res.finish - res.arrival) * 1e3, res.tpot() > 0 ? 1.0 / res.tpot() : 0.0, lar.c_str());
    }
  });
  return 0;
}

int run_bench_decode(const BenchDecodeOptions& o) {
  o.validate();
  std::optional<ClusterModel> cluster;
  if (!o.emulate.empty()) cluster = load_cluster_preset(o.emulate);
  run_ranks(runtime_options(o.parallel), [&](Runtime& rt) {
    std::shared_ptr<Communicator> group = rt.world_ptr();
    std::shared_ptr<const DeviceModel> device;
    if (cluster) {
      group = make_emulated_communicator(group, cluster->link);
      device = std::make_shared<const DeviceModel>(cluster->device);
    }
    Model model(o.model, group, model_options(o.parallel, group->size(), device));
    const ModelConfig& c = model.config();
    const std::unique_ptr<InferenceEngine> engine_ptr =
        make_engine(model, o.parallel, cluster ? cluster->link.ranks_per_node : rt.info().local_size);
    InferenceEngine& engine = *engine_ptr;
    if (o.requests > 0 && longest_request(o.prompt_tokens, o.steps) > c.max_seq)
      SY_THROW(InvalidArgument, "bench decode: request mode draws prompts of up to 3/2 x --prompt_tokens = ",
               std::max(1, o.prompt_tokens * 3 / 2), " and outputs of up to 3/2 x --steps = ", std::max(1, o.steps * 3 / 2),
               " tokens; together they exceed max_seq (", c.max_seq, ")");
    if (o.requests == 0 && o.prompt_tokens + o.steps + 1 > c.max_seq)
      SY_THROW(InvalidArgument, "bench decode: --prompt_tokens = ", o.prompt_tokens, " + --steps = ", o.steps,
               " + 1 exceed max_seq (", c.max_seq, ")");
    const int threads = set_rank_threads(o.parallel, rt);
    if (rt.world().rank() == 0) {
      std::printf("bench decode: model %s (%d layers, d_model %d, %d experts top-%d); %s; %d GEMM thread(s) per rank\n",
                  c.name.c_str(), c.layers, c.d_model, c.experts, c.k, engine.schedule().describe().c_str(), threads);
      if (o.requests == 0)
        std::printf("batch mode: prompts of %d tokens, %d decode steps timed per batch size\n", o.prompt_tokens, o.steps);
      if (!o.parallel.affinity.empty()) {
        std::printf("speculative MoE: experts placed by %s; token shuffling %s", o.parallel.affinity.c_str(),
                    o.parallel.specmoe.c_str());
        if (engine.token_shuffling())
          std::printf(" (its host cost, measured: %.1f us + %.0f ns per row of a group)", engine.shuffle_cost().per_batch * 1e6,
                      engine.shuffle_cost().per_row * 1e9);
        std::printf(o.requests > 0 ? "; requests placed %s\n" : "\n", o.scheduler == "affinity" ? "by affinity" : "round robin");
      }
      std::fflush(stdout);
    }
    if (o.requests > 0)
      bench_requests(rt, engine, o);
    else
      bench_batches(engine, o, cluster ? &*cluster : nullptr);
    if (!o.parallel.affinity.empty()) {
      const std::string lar = local_activation_summary(engine);
      if (rt.world().rank() == 0) std::printf("# speculative MoE over every step (prefills too): %s\n", lar.c_str());
    }
  });
  return 0;
}

int run_afd_plan(const AfdPlanOptions& o) {
  const ClusterModel cluster = load_cluster_preset(o.emulate);
  const std::vector<std::string> presets = decode_shape_presets();
  const bool published = std::find(presets.begin(), presets.end(), o.model) != presets.end();
  if (!published && !std::ifstream(o.model + "/config.json"))
    SY_THROW(ConfigError, "afd plan: --model '", o.model, "' is neither a published shape (expected step3 or "
             "deepseek-v3) nor a model folder (no ", o.model, "/config.json)");
  const DecodeShape shape = published ? DecodeShape::preset(o.model)
                                      : DecodeShape::of(ModelConfig::load(o.model + "/config.json"));
  const AfdHardware hw = AfdHardware::of(cluster, shape.weight_bytes);
  const AfdSearch search{o.gpus, o.context, o.tpot_ms * 1e-3, o.max_microbatches};
  const char* dtype = shape.weight_bytes <= 1 ? "fp8" : shape.weight_bytes <= 2 ? "bf16" : "f32";
  std::printf("afd plan: %s (%d layers, %d MoE, H %.0f, %d experts top-%d + %d shared, %s weights and KV) on %s: %d "
              "GPUs, context %d, TPOT <= %.1f ms\n", shape.name.c_str(), shape.layers, shape.moe_layers, shape.hidden,
              shape.experts, shape.top_k, shape.shared_experts, dtype, cluster.name.c_str(), o.gpus, o.context,
              o.tpot_ms);
  std::printf("# a cost model, not a run: every block at its roofline on the preset (%.0f TFLOP/s %s GEMMs, %.0f GB/s "
              "HBM, %.0f GB per GPU), NICs of %.1f GB/s per GPU each way, NVLink %.0f GB/s, %d GPUs per node\n",
              hw.flops / 1e12, dtype, hw.memory_bandwidth / 1e9, hw.memory_capacity / 1e9, hw.nic_bandwidth / 1e9,
              hw.intra_bandwidth / 1e9, hw.gpus_per_node);
  std::printf("%-10s %3s %3s %9s %9s %13s %8s %8s %8s %7s %7s %9s %9s\n", "split", "tp", "m", "batch/mb", "TPOT ms",
              "tokens/s/GPU", "Ta us", "Te us", "Tc us", "A idle", "F idle", "A mem GB", "F mem GB");
  std::FILE* csv = o.csv.empty() ? nullptr : std::fopen(o.csv.c_str(), "w");
  if (!o.csv.empty() && !csv) SY_THROW(IoError, "afd plan: cannot write --csv '", o.csv, "'");
  if (csv)
    std::fprintf(csv, "attention_gpus,ffn_gpus,ffn_tp,microbatches,batch_per_microbatch,tpot_ms,tokens_per_s_per_gpu,ta_us,"
                      "te_us,tc_us,attention_idle,ffn_idle,attention_memory_gb,ffn_memory_gb\n");
  auto row = [&](const std::string& split, const AfdChoice& c) {
    const AfdCost& k = c.cost;
    std::printf("%-10s %3d %3d %9lld %9.2f %13.1f %8.1f %8.1f %8.1f %6.1f%% %6.1f%% %9.2f %9.2f\n", split.c_str(),
                c.plan.colocated ? 1 : c.plan.ffn_tp, c.plan.microbatches, static_cast<long long>(c.plan.batch), k.tpot * 1e3, k.tokens_per_s_per_gpu,
                k.ta * 1e6, k.te * 1e6, k.tc * 1e6, 100 * k.bubble_attention, 100 * k.bubble_ffn,
                k.attention_memory / 1e9, k.ffn_memory / 1e9);
  };
  // Every candidate to the CSV; per split the best m (and FFN tensor parallelism) printed and plotted; the
  // search's answer is the best of them.
  const std::vector<AfdChoice> candidates = afd_candidates(shape, hw, search);
  auto faster = [](const AfdChoice& c, const AfdChoice& than) {
    return !than.found || c.cost.tokens_per_s_per_gpu > than.cost.tokens_per_s_per_gpu;
  };
  AfdChoice best;
  std::vector<std::string> points(static_cast<size_t>(o.max_microbatches));  // per m: "A tokens/s" lines
  for (int a = 1; a < o.gpus; ++a) {
    AfdChoice split_best;
    for (int m = 1; m <= o.max_microbatches; ++m) {
      AfdChoice at_m;  // the best FFN tensor-parallel degree at this split and m
      for (const AfdChoice& c : candidates) {
        if (c.plan.attention_gpus != a || c.plan.microbatches != m) continue;
        if (csv)
          std::fprintf(csv, "%d,%d,%d,%d,%lld,%.4f,%.2f,%.2f,%.2f,%.2f,%.4f,%.4f,%.3f,%.3f\n", a, o.gpus - a,
                       c.plan.ffn_tp, m, static_cast<long long>(c.plan.batch), c.cost.tpot * 1e3,
                       c.cost.tokens_per_s_per_gpu, c.cost.ta * 1e6, c.cost.te * 1e6, c.cost.tc * 1e6,
                       c.cost.bubble_attention, c.cost.bubble_ffn, c.cost.attention_memory / 1e9,
                       c.cost.ffn_memory / 1e9);
        if (faster(c, at_m)) at_m = c;
      }
      if (!at_m.found) continue;
      points[static_cast<size_t>(m - 1)] += std::to_string(a) + " " + std::to_string(at_m.cost.tokens_per_s_per_gpu) + "\n";
      if (faster(at_m, split_best)) split_best = at_m;
    }
    if (!split_best.found) continue;
    if (faster(split_best, best)) best = split_best;
    // Print the splits a person compares: every one up to 16 GPUs, then whole nodes.
    if (o.gpus <= 16 || a % hw.gpus_per_node == 0)
      row(std::to_string(a) + "A" + std::to_string(o.gpus - a) + "F", split_best);
  }
  const AfdChoice colocated = best_colocated(shape, hw, search);
  if (csv) {
    std::fclose(csv);
    std::printf("# wrote %s (a row per split and m)\n", o.csv.c_str());
  }
  if (colocated.found) row("colocated", colocated);
  if (!best.found) {
    std::printf("no AFD split meets a TPOT of %.1f ms within the HBM on %d GPUs\n", o.tpot_ms, o.gpus);
    return 1;
  }
  std::printf("best AFD: %s, %lld sequences per attention GPU per micro-batch: %.1f tokens/s per GPU at %.2f ms TPOT\n",
              plan_name(best.plan, shape, hw).c_str(), static_cast<long long>(best.plan.batch),
              best.cost.tokens_per_s_per_gpu, best.cost.tpot * 1e3);
  if (colocated.found)
    std::printf("best colocated: %s, %lld sequences per GPU per micro-batch: %.1f tokens/s per GPU at %.2f ms TPOT; "
                "AFD / colocated = %.2f\n", plan_name(colocated.plan, shape, hw).c_str(),
                static_cast<long long>(colocated.plan.batch), colocated.cost.tokens_per_s_per_gpu,
                colocated.cost.tpot * 1e3, best.cost.tokens_per_s_per_gpu / colocated.cost.tokens_per_s_per_gpu);
  else
    std::printf("best colocated: none meets the target within the HBM (a GPU holding attention, KV and its experts)\n");
  std::printf("m ablation at %dA%dF, FFN %s:", best.plan.attention_gpus, best.plan.ffn_gpus,
              ffn_parallelism(best.plan, shape).c_str());
  double at_one = 0;
  for (int m = 1; m <= o.max_microbatches; ++m) {
    AfdChoice c;  // the best split and FFN parallelism at this m, from the candidates
    for (const AfdChoice& k : candidates)
      if (k.plan.attention_gpus == best.plan.attention_gpus && k.plan.ffn_tp == best.plan.ffn_tp && k.plan.microbatches == m)
        c = k;
    if (m == 1 && c.found) at_one = c.cost.tokens_per_s_per_gpu;
    if (c.found)
      std::printf(" m=%d %.1f%s", m, c.cost.tokens_per_s_per_gpu,
                  m > 1 && at_one > 0 ? (" (" + std::to_string(c.cost.tokens_per_s_per_gpu / at_one).substr(0, 4) + "x)").c_str() : "");
    else
      std::printf(" m=%d none", m);
  }
  std::printf("\n");
  if (!o.png.empty()) {
    std::string script = "set grid\nset key top left\nset xlabel 'attention GPUs (the rest FFN)'\nset ylabel "
                         "'tokens/s per GPU (cost model)'\nset title 'afd plan: " + shape.name + " on " +
                         std::to_string(o.gpus) + " GPUs of " + cluster.name + ", context " +
                         std::to_string(o.context) + ", TPOT <= " + std::to_string(o.tpot_ms).substr(0, 5) + " ms'\n";
    std::string plots;
    for (int m = 1; m <= o.max_microbatches; ++m) {
      if (points[static_cast<size_t>(m - 1)].empty()) continue;
      script += "$m" + std::to_string(m) + " << EOD\n" + points[static_cast<size_t>(m - 1)] + "EOD\n";
      plots += std::string(plots.empty() ? "" : ", ") + "$m" + std::to_string(m) + " using 1:2 with linespoints title 'm = " +
               std::to_string(m) + "'";
    }
    if (colocated.found)
      plots += ", " + std::to_string(colocated.cost.tokens_per_s_per_gpu) + " with lines dt 2 lw 2 title 'colocated'";
    plot_png(o.png, script + "plot " + plots + "\n");
  }
  const double tf = std::max(best.cost.ta, best.cost.te);
  std::printf("MegaScale-Infer's bound for it: m >= 2 (1 + Tc / Tf) = 2 (1 + %.1f / %.1f) -> %d\n", best.cost.tc * 1e6,
              tf * 1e6, min_microbatches(best.cost.tc, tf));
  return 0;
}

}  // namespace switchyard
