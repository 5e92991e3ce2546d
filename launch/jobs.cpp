#include "launch/jobs.h"
#include "launch/moe_device.h"

#include <algorithm>
#include <atomic>
#include <filesystem>
#include <cstdio>
#include <iostream>

#include "core/logging.h"
#include "launch/bench_comm.h"
#include "launch/decode.h"
#include "launch/train_lm.h"
#include "model/model_config.h"
#include "moe/eplb.h"
#include "moe/moe_layer.h"
#include "moe/planner.h"
#include "parallel/runtime.h"

namespace switchyard {

namespace {

MoEConfig moe_config(const JobConfig& job) {
  const MoESection& m = job.moe;
  MoEConfig c;
  c.model_dim = m.model_dim;
  c.hidden_dim = m.hidden_dim;
  c.activation = kernels::parse_activation(m.activation).value();  // the config schema admits only these
  c.plan.exchange = parse_exchange_mode(m.exchange, "moe.exchange");
  c.router.experts = m.experts;
  c.router.k = m.top_k;
  c.router.gate = m.gate == "sigmoid_bias" ? GateKind::sigmoid_bias : GateKind::softmax;
  c.router.renormalize = c.router.gate == GateKind::sigmoid_bias;
  c.router.capacity_factor = m.capacity_factor;
  c.router.capacity_rounding = parse_capacity_rounding(m.capacity_rounding, "moe.capacity_rounding");
  c.router.balance_loss = parse_balance_loss(m.balance_loss, "moe.balance_loss");
  c.router.groups = m.expert_groups;
  c.router.topk_groups = m.topk_groups;
  c.plan.r = m.r;
  c.plan.d = m.overlap_degree;
  c.plan.a2a = parse_a2a_algorithm(m.a2a, "moe.a2a");
  return c;
}

// A synthetic regression task the experts can learn: target = sign-split
// linear map, y = x A1 where x.u >= 0 and y = x A2 elsewhere (u, A1, A2 fixed
// and random), so different regions of input space want different experts.
void train_moe(Runtime& rt, const JobConfig& job) {
  Communicator& world = rt.world();
  const bool leader = world.rank() == 0;
  const TrainSection& tr = job.train;
  MoEConfig student_config = moe_config(job);
  const int nodes = job.moe.nodes > 0 ? job.moe.nodes : rt.nodes();
  if (world.size() % nodes != 0)
    SY_THROW(ConfigError, "moe.nodes = ", nodes, " does not divide the ", world.size(), " ranks");
  student_config.node_size = world.size() / nodes;
  const int W = world.size(), E = student_config.router.experts, ep = job.moe.expert_parallel_size;
  const int physical = E + job.moe.redundant_experts;
  // What the layer would refuse, refused here naming the keys and where they were set.
  if (job.moe.expert_groups < 1 || E % job.moe.expert_groups != 0)
    SY_THROW(ConfigError, job.where("moe.expert_groups"), ": moe.expert_groups = ", job.moe.expert_groups,
             ", expected a divisor of moe.experts = ", E);
  if (job.moe.topk_groups > job.moe.expert_groups || job.moe.topk_groups * (E / job.moe.expert_groups) < job.moe.top_k)
    SY_THROW(ConfigError, job.where("moe.topk_groups"), ": moe.topk_groups = ", job.moe.topk_groups,
             ", expected at most moe.expert_groups = ", job.moe.expert_groups, " with at least moe.top_k = ",
             job.moe.top_k, " experts in that many groups of ", E / job.moe.expert_groups);
  if (job.moe.eplb_policy != "global" && job.moe.redundant_experts == 0)
    SY_THROW(ConfigError, job.where("moe.eplb_policy"), ": moe.eplb_policy = ", job.moe.eplb_policy,
             " needs moe.redundant_experts > 0 (replicas to place)");
  if (job.moe.top_k > E)
    SY_THROW(ConfigError, job.where("moe.top_k"), ": moe.top_k = ", job.moe.top_k, ", expected at most moe.experts = ",
             E, " (", job.where("moe.experts"), ")");
  if (ep == 0 && job.moe.redundant_experts == 0 && (E >= W ? E % W != 0 : W % E != 0))
    SY_THROW(ConfigError, job.where("moe.experts"), ": moe.experts = ", E, " cannot be laid out over the ", W,
             " ranks; expected a multiple of ", W, " (whole experts per rank) or a divisor of it (ranks sharing an "
             "expert's hidden units)");
  if (ep > 0 && (W % ep != 0 || E % ep != 0))
    SY_THROW(ConfigError, job.where("moe.expert_parallel_size"), ": moe.expert_parallel_size = ", ep,
             ", expected a divisor of the ", W, " ranks and of moe.experts = ", E);
  if (ep > 0 && job.moe.redundant_experts > 0)
    SY_THROW(ConfigError, "moe.expert_parallel_size and moe.redundant_experts each choose the placement; give one");
  const bool nearest = job.moe.replica_choice == "nearest";
  if (nearest && ep > 0)
    SY_THROW(ConfigError, job.where("moe.replica_choice"), ": moe.replica_choice = nearest with moe.expert_parallel_size = ",
             ep, " (", job.where("moe.expert_parallel_size"), "); expert data parallelism keeps tokens in their group, "
             "expected in_turn");
  if (job.moe.rebalance_every > 0 && job.moe.redundant_experts == 0)
    SY_THROW(ConfigError, "moe.rebalance_every = ", job.moe.rebalance_every, " needs moe.redundant_experts > 0");
  if (ep > 0) {
    student_config.placement = ExpertPlacement::expert_data_parallel(E, W, ep);
    student_config.replica_domain = ep;
  } else if (job.moe.redundant_experts > 0) {
    if (physical % W != 0)
      SY_THROW(ConfigError, "moe.redundant_experts = ", job.moe.redundant_experts, ": ", E, " + ",
               job.moe.redundant_experts, " physical experts do not divide over ", W, " ranks");
    const int node_count = W / student_config.node_size;
    if (job.moe.eplb_policy == "hierarchical") {
      if (node_count < 2 || job.moe.expert_groups % node_count != 0)
        SY_THROW(ConfigError, job.where("moe.eplb_policy"), ": moe.eplb_policy = hierarchical packs moe.expert_groups = ",
                 job.moe.expert_groups, " onto ", node_count, " node(s) (moe.nodes); expected 2 or more nodes and a "
                 "multiple of them");
      student_config.eplb_hierarchical = true;
    }
    student_config.placement = student_config.eplb_placement(std::vector<double>(static_cast<size_t>(E), 1.0), physical, W);
  }
  if (nearest) student_config.replica_choice = MoEConfig::ReplicaChoice::nearest;
  const bool placed = student_config.placement.has_value();
  // moe.device: cuda puts the layer on each rank's GPU; the task's tokens and loss stay on the host.
  const MoEDevice dev = make_moe_device(job.moe.device, rt.world_ptr(), "moe.device (" + job.where("moe.device") + ")",
                                        rt.info().local_rank, rt.info().local_size);
  if (dev.on_device()) student_config.ops = dev.ops;
  MoELayer student(student_config, dev.group, dev.host_group);
  student.init_parameters(static_cast<uint64_t>(tr.seed));
  std::unique_ptr<MoEPlanner> planner;
  if (job.moe.strategy == "auto") {
    PlannerOptions po;
    po.input_grad = false;
    auto [device, link] = MoEPlanner::calibrate(student, world.size() / nodes);
    planner = std::make_unique<MoEPlanner>(student, device, link, po);
  }
  std::string last_plan;
  const int64_t Md = student_config.model_dim;
  Tensor maps = Tensor::empty({2, Md, Md}, DType::f32), split = Tensor::empty({Md}, DType::f32);
  Rng task(static_cast<uint64_t>(tr.seed) + 1000);  // the same on every rank
  task.fill_uniform(maps, -std::sqrt(3.0 / Md), std::sqrt(3.0 / Md));
  task.fill_uniform(split, -1, 1);
  auto make_target = [&](const Tensor& x) {
    const int64_t rows = x.shape()[0];
    Tensor y = Tensor::zeros({rows, Md}, DType::f32);
    for (int64_t t = 0; t < rows; ++t) {
      const float* xt = x.data_as<float>() + t * Md;
      double side = 0;
      for (int64_t i = 0; i < Md; ++i) side += double(xt[i]) * split.data_as<float>()[i];
      const float* a = maps.data_as<float>() + (side >= 0 ? 0 : Md * Md);
      float* yt = y.data_as<float>() + t * Md;
      for (int64_t i = 0; i < Md; ++i)
        for (int64_t j = 0; j < Md; ++j) yt[j] += xt[i] * a[i * Md + j];
    }
    return y;
  };
  const int64_t T = tr.tokens_per_rank, M = student_config.model_dim;
  if (leader && dev.on_device()) std::printf("# moe.device: %s\n", dev.description.c_str());
  if (leader)
    std::printf("# moe-train: %d ranks (%s), %d experts (%d per rank), top-%d, M=%lld H=%lld, %s, plan %s, "
                "capacity factor %g, %lld tokens/rank/step, %d steps, SGD lr %g, %d GEMM threads/rank\n",
                world.size(), std::string(world.backend_name()).c_str(), student_config.router.experts,
                student.layout().local_experts(), student_config.router.k, static_cast<long long>(M),
                static_cast<long long>(student_config.hidden_dim), job.moe.activation.c_str(),
                planner ? "auto (the planner's choice per batch, printed per step)"
                        : ("fixed: " + student_config.plan.describe()).c_str(),
                job.moe.capacity_factor, static_cast<long long>(T), tr.steps, tr.lr, rt.gemm_threads());
  double first_loss = 0, last_loss = 0, total_time = 0, zero_baseline = 0;
  int64_t dropped = 0;
  const int skip = std::min(2, tr.steps / 2);  // warm-up steps left out of the timing summary
  std::vector<double> load_since(static_cast<size_t>(E), 0.0);  // logical expert loads since the last placement
  double rank_load = 0, rank_load_since = 0;
  int steps_since = 0;
  for (int step = 0; step < tr.steps; ++step) {
    if (job.moe.rebalance_every > 0 && step > 0 && step % job.moe.rebalance_every == 0) {
      // EPLB from the loads measured since the last placement.
      const ExpertPlacement next = student.rebalance(load_since, physical).placement;
      if (leader)
        std::printf("# rebalanced at step %d: %s; rank load max/mean was %.3f over the last %d steps\n", step + 1,
                    next.describe().c_str(), rank_load_since / std::max(1, steps_since), steps_since);
      std::fill(load_since.begin(), load_since.end(), 0.0);
      rank_load_since = 0, steps_since = 0;
    }
    Tensor x = Tensor::empty({T, M}, DType::f32);
    Rng(static_cast<uint64_t>(tr.seed) * 1000003u + static_cast<uint64_t>(step) * 131u + static_cast<uint64_t>(world.rank()))
        .fill_uniform(x, -1, 1);
    Tensor target = make_target(x);
    if (step == skip) student.reset_profile();
    world.barrier().wait();
    const auto start = Clock::now();
    student.zero_grad();
    const Tensor x_in = student.ops().copy_in(x);  // the layer's memory (x itself on the host)
    MoEForward f = planner ? student.forward(x_in, student.routing_choice(), *planner)
                           : student.forward(x_in, student.routing_choice(), student_config.plan);
    f.output = student.ops().copy_out(f.output);
    const ExecPlan plan = student.last_plan().exec;
    if (placed) {  // rows each rank's experts received, and the logical loads for the next placement
      rank_load = rank_load_max_over_mean(world, {&student.last_plan()});
      rank_load_since += rank_load, ++steps_since;
      const auto& load = student.last_routing().expert_load;
      for (int e = 0; e < E && e < static_cast<int>(load.size()); ++e) load_since[static_cast<size_t>(e)] += load[e];
    }
    Tensor dout = Tensor::empty({T, M}, DType::f32);
    double squared = 0, target_squared = 0;
    for (int64_t i = 0; i < T * M; ++i) target_squared += double(target.data_as<float>()[i]) * target.data_as<float>()[i];
    const double count = allreduce_scalar(world, static_cast<double>(T * M));
    for (int64_t i = 0; i < T * M; ++i) {
      const double d = double(f.output.data_as<float>()[i]) - target.data_as<float>()[i];
      squared += d * d;
      dout.data_as<float>()[i] = static_cast<float>(2.0 * d / count);  // d(mean over all ranks)/d out
    }
    student.backward(student.ops().copy_in(dout), tr.balance_coef / world.size(), tr.z_coef / world.size(), false);
    student.sgd_step(tr.lr);
    if (student_config.router.gate == GateKind::sigmoid_bias && tr.bias_rate > 0)
      student.update_gate_bias(tr.bias_rate);
    student.ops().synchronize();
    const double step_time =
        allreduce_scalar(world, std::chrono::duration<double>(Clock::now() - start).count(), ReduceOp::max);
    const double loss = allreduce_scalar(world, squared) / count;
    const double balance = allreduce_scalar(world, f.balance_loss) / world.size();
    const double step_dropped = allreduce_scalar(world, static_cast<double>(f.dropped));
    const double zero_loss = allreduce_scalar(world, target_squared) / count;
    if (step == 0) first_loss = loss;
    zero_baseline += zero_loss / tr.steps;
    last_loss = loss;
    if (step >= skip) total_time += step_time, dropped += static_cast<int64_t>(step_dropped);
    if (leader && (step % tr.log_every == 0 || step == tr.steps - 1))
      std::printf("step %4d/%d  loss %.6f  balance %.4f  dropped %5.0f  step_time %.4f s  (%s)%s\n", step + 1, tr.steps,
                  loss, balance, step_dropped, step_time, plan.describe().c_str(),
                  placed ? detail::make_string("  rank load max/mean ", rank_load).c_str() : "");
    if (leader && planner && plan.describe() != last_plan) std::printf("# %s\n", planner->explanation().c_str());
    last_plan = plan.describe();
    std::fflush(stdout);
  }
  const int timed = tr.steps - skip;
  const MoEPhaseTimes& pt = student.phase_times();
  if (!leader) return;
  const double per_step = total_time / timed;
  std::printf("#\n# summary over %d steps (after %d warm-up)\n", timed, skip);
  std::printf("#   loss                 %.6f -> %.6f (%.1f%% of the first)\n", first_loss, last_loss,
              100.0 * last_loss / first_loss);
  std::printf("#   loss of predicting 0 %.6f (the targets' mean square)\n", zero_baseline);
  std::printf("#   step time            %.6f s\n", per_step);
  std::printf("#   tokens/s (all ranks) %.0f\n", static_cast<double>(T) * world.size() / per_step);
  std::printf("#   tokens dropped       %lld (%.2f%% of the routed copies)\n", static_cast<long long>(dropped),
              100.0 * dropped / std::max(1.0, static_cast<double>(T) * world.size() * student_config.router.k * timed));
  std::printf("#   share of time per phase (rank 0):\n");
  const std::pair<const char*, double> phases[] = {{"gate", pt.gate},         {"encode", pt.encode},
                                                   {"all-to-all", pt.dispatch_a2a}, {"weight gather", pt.weights},
                                                   {"experts", pt.experts},
                                                   {"all-to-all back", pt.combine_a2a}, {"decode", pt.decode},
                                                   {"backward", pt.backward}};
  for (const auto& [name, seconds] : phases)
    std::printf("#     %-16s %5.1f%%  %.6f s/step\n", name, 100.0 * seconds / timed / per_step, seconds / timed);
  std::printf("#     %-16s %5.1f%%  (loss, SGD, synchronisation)\n", "other",
              100.0 * (1.0 - pt.total() / timed / per_step));
}

}  // namespace

// comm.backend for the runtime: auto leaves it to the launcher's variables
// (mpirun: mpi, `switchyard launch` or torchrun: ucx, none: threads). A
// pinned threads backend under a launcher would make every process run its
// own job on its own: refused, naming the variables.
std::string runtime_backend(const JobConfig& config, const EnvLookup& lookup) {
  if (config.comm.backend == "auto") return "";
  if (config.comm.backend == "threads") {
    const auto launched = discover_rank(lookup);
    if (launched && launched->world_size > 1)
      SY_THROW(ConfigError, config.where("comm.backend"), ": comm.backend = threads, but this process was started by ",
               launched->launcher, " as rank ", launched->rank, " of ", launched->world_size, " (", launched->source,
               "): each of the ", launched->world_size, " processes would run its own job; expected comm.backend: auto "
               "(the launcher's backend) or mpi / ucx");
  }
  return config.comm.backend;
}

namespace {
// What the serve job would refuse once running, refused first naming the config keys and where they were set
// (the decoder's own messages name the CLI's flags).
void check_serve_config(const JobConfig& config) {
  const std::string dir = config.model.path;
  if (!std::filesystem::exists(std::filesystem::path(dir) / "config.json"))
    SY_THROW(ConfigError, config.where("model.path"), ": model.path = '", dir, "' holds no config.json; expected a "
             "model folder (config.json, model.safetensors), relative to the working directory");
  const ModelConfig m = ModelConfig::load(dir + "/config.json");
  const ServeSection& s = config.serve;
  const int longest = longest_request(s.prompt_tokens, s.new_tokens);
  if (longest > m.max_seq)
    SY_THROW(ConfigError, config.where(config.where("serve.new_tokens").starts_with("--set") &&
                                               !config.where("serve.prompt_tokens").starts_with("--set")
                                           ? "serve.new_tokens" : "serve.prompt_tokens"),
             ": serve.prompt_tokens = ", s.prompt_tokens, " and serve.new_tokens = ", s.new_tokens, " draw requests of up "
             "to ", longest, " positions (3/2 of each); model '", m.name, "' holds max_seq = ", m.max_seq);
  const std::string& tables = config.model.affinity;
  if (!tables.empty() && !std::filesystem::exists(tables))
    SY_THROW(ConfigError, config.where("model.affinity"), ": model.affinity = '", tables, "' does not exist; expected "
             "tables from switchyard affinity build, relative to the working directory");
  if (config.model.specmoe != "off" && (tables.empty() || config.model.attention != "tp"))
    SY_THROW(ConfigError, config.where("model.specmoe"), ": model.specmoe = ", config.model.specmoe, " shuffles tokens "
             "by model.affinity inside tensor-parallel attention; expected model.affinity set and model.attention = "
             "tp (model.attention = ", config.model.attention, ")");
  if (s.scheduler == "affinity" && (tables.empty() || config.model.attention != "dp"))
    SY_THROW(ConfigError, config.where("serve.scheduler"), ": serve.scheduler = affinity assigns requests to "
             "data-parallel ranks by model.affinity; expected model.affinity set and model.attention = dp "
             "(model.attention = ", config.model.attention, ")");
  const bool launched = discover_rank(process_env).has_value();
  const int ranks = config.comm.ranks;
  if (!launched && m.experts % ranks != 0 && ranks % m.experts != 0)
    SY_THROW(ConfigError, config.where("comm.ranks"), ": comm.ranks = ", ranks, " cannot hold the ", m.experts,
             " experts of model '", m.name, "' evenly; expected a divisor or a multiple of ", m.experts);
}
}  // namespace

int run_job(const JobConfig& config) {
  set_log_levels(config.log_level);
  RuntimeOptions options;
  options.backend = runtime_backend(config, process_env);
  options.ranks = config.comm.ranks;
  options.timeout = Milliseconds(config.comm.timeout_ms);
  if (config.job != "moe-train" && config.moe.device != "cpu")
    SY_THROW(ConfigError, config.where("moe.device"), ": moe.device = ", config.moe.device, " is for job moe-train; job ",
             config.job, " runs its MoE layers on the host (expected cpu)");
  if (config.job == "serve") {
    BenchDecodeOptions o;
    o.model = config.model.path;
    o.parallel = {.backend = options.backend, .ranks = config.comm.ranks, .attention = config.model.attention,
                  .tp = config.model.tp, .afd = config.model.afd, .microbatches = config.model.microbatches,
                  .dispatch_dtype = config.model.dispatch_dtype, .combine_dtype = config.model.combine_dtype,
                  .threads = config.model.threads, .timeout_ms = config.comm.timeout_ms,
                  .attention_field = "model.attention", .tp_field = "model.tp", .afd_field = "model.afd",
                  .microbatches_field = "model.microbatches", .dispatch_field = "model.dispatch_dtype",
                  .combine_field = "model.combine_dtype", .affinity = config.model.affinity,
                  .affinity_field = "model.affinity", .specmoe = config.model.specmoe, .specmoe_field = "model.specmoe"};
    const ServeSection& s = config.serve;
    check_serve_config(config);
    o.requests = s.requests;
    o.rate = s.rate;
    o.prompt_tokens = s.prompt_tokens;
    o.steps = s.new_tokens;
    o.max_batch = s.max_batch;
    o.kv_budget = s.kv_budget;
    o.prefill_chunk = s.prefill_chunk;
    o.seed = static_cast<uint64_t>(s.seed);
    o.csv = s.csv;
    o.scheduler = s.scheduler;
    o.redundant_experts = config.model.redundant_experts;
    o.rebalance_every = config.model.rebalance_every;
    std::cout << "# switchyard " << config.source << ": job serve\n";
    return run_bench_decode(o);
  }
  if (config.job == "moe-train") {
    run_ranks(options, [&](Runtime& rt) { train_moe(rt, config); });
    return 0;
  }
  if (config.job == "moe-lm-train") {
    run_ranks(options, [&](Runtime& rt) { train_lm(rt, config); });
    return 0;
  }
  if (config.job != "comm-bench") SY_THROW(ConfigError, config.source, ": job '", config.job, "' is not known");
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
