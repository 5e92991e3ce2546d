#include "launch/bench_moe.h"
#include "launch/moe_device.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <numeric>

#include "kernels/gemm.h"
#include "comm/virtual_time.h"
#include "launch/cluster_presets.h"
#include "launch/placement_file.h"
#include "moe/eplb.h"
#include "moe/planner.h"
#include "parallel/runtime.h"

namespace switchyard {
namespace {

using kernels::Activation;

// Median seconds of one GEMM of this shape with the layer's own call.
double time_gemm(const GemmShape& s) {
  const int64_t a_rows = s.transpose_a ? s.k : s.m, a_cols = s.transpose_a ? s.m : s.k;
  const int64_t b_rows = s.transpose_b ? s.n : s.k, b_cols = s.transpose_b ? s.k : s.n;
  const DType operand = s.bf16 ? DType::bf16 : DType::f32;
  Tensor a = Tensor::zeros({a_rows, a_cols}, operand), b = Tensor::zeros({b_rows, b_cols}, operand);
  Tensor c = Tensor::zeros({s.m, s.n}, DType::f32);
  auto run = [&] {
    if (s.bf16)
      kernels::cpu::gemm_bf16({.transpose_a = s.transpose_a, .transpose_b = s.transpose_b, .m = s.m, .n = s.n,
                               .k = s.k, .a = static_cast<const uint16_t*>(a.data()), .lda = a_cols,
                               .b = static_cast<const uint16_t*>(b.data()), .ldb = b_cols, .c = c.data_as<float>(),
                               .ldc = s.n});
    else
      kernels::cpu::gemm_f32({.transpose_a = s.transpose_a, .transpose_b = s.transpose_b, .m = s.m, .n = s.n,
                              .k = s.k, .a = a.data_as<float>(), .lda = a_cols, .b = b.data_as<float>(),
                              .ldb = b_cols, .c = c.data_as<float>(), .ldc = s.n});
  };
  run();  // warm up
  std::vector<double> runs;
  for (int r = 0; r < 7; ++r) {
    const auto start = Clock::now();
    run();
    runs.push_back(std::chrono::duration<double>(Clock::now() - start).count());
  }
  std::sort(runs.begin(), runs.end());
  return runs[runs.size() / 2];
}

}  // namespace

double time_memcpy(int64_t bytes) {
  if (bytes <= 0) return 0.0;
  std::vector<char> src(static_cast<size_t>(bytes), 1), dst(static_cast<size_t>(bytes));
  std::memcpy(dst.data(), src.data(), src.size());
  std::vector<double> runs;
  for (int r = 0; r < 7; ++r) {
    const auto start = Clock::now();
    std::memcpy(dst.data(), src.data(), src.size());
    runs.push_back(std::chrono::duration<double>(Clock::now() - start).count());
  }
  std::sort(runs.begin(), runs.end());
  return runs[runs.size() / 2];
}

namespace {
double median(std::vector<double> v) {
  if (v.empty()) return 0.0;
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}
}  // namespace

int run_bench_moe(const BenchMoeOptions& o) {
  const bool bf16 = o.dtype == "bfloat16" || o.dtype == "bf16";
  if (!bf16 && o.dtype != "float32" && o.dtype != "float" && o.dtype != "f32")
    SY_THROW(ConfigError, "--dtype: got '", o.dtype, "', expected float32 or bfloat16");
  if (o.num_local_experts == 0)
    SY_THROW(ConfigError, "--num_local_experts = 0, expected experts per rank (> 0) or -S (S ranks share one expert)");
  if (o.num_steps < 1 || o.batch_size < 0 || o.num_tokens < 0)
    SY_THROW(ConfigError, "--num_steps must be >= 1 and sizes >= 0");
  if (o.microbatches < 1 || o.microbatches > 64)
    SY_THROW(ConfigError, "--microbatches = ", o.microbatches, ", expected 1..64 batches in flight");
  if (o.strategy != "fixed" && o.strategy != "auto")
    SY_THROW(ConfigError, "--strategy = '", o.strategy, "', expected fixed or auto");
  RuntimeOptions ro;
  ro.backend = o.backend;
  ro.ranks = o.ranks;
  run_ranks(ro, [&](Runtime& rt) {
    Communicator& world = rt.world();
    const bool leader = world.rank() == 0;
    const int W = world.size();
    MoEConfig c;
    c.model_dim = o.model_dim;
    c.hidden_dim = o.hidden_size;
    const auto activation = kernels::parse_activation(o.activation);
    if (!activation) SY_THROW(ConfigError, "--activation: got '", o.activation, "', expected relu, gelu or swiglu");
    c.activation = *activation;
    c.plan.exchange = parse_exchange_mode(o.exchange, "--exchange");
    if (o.ep_size < 0 || (o.ep_size > 0 && W % o.ep_size != 0))
      SY_THROW(ConfigError, "--ep_size = ", o.ep_size, " does not divide the ", W, " ranks; expected a divisor");
    if (o.ep_size > 0 && o.num_local_experts < 0)
      SY_THROW(ConfigError, "--ep_size needs whole experts (--num_local_experts > 0), got ", o.num_local_experts);
    if (o.num_local_experts > 0) {
      c.router.experts = o.num_local_experts * (o.ep_size > 0 ? o.ep_size : W);
    } else {
      if (W % -o.num_local_experts != 0)
        SY_THROW(ConfigError, "--num_local_experts = ", o.num_local_experts, ": ", -o.num_local_experts,
                 " ranks per expert do not divide the ", W, " ranks");
      c.router.experts = W / -o.num_local_experts;
    }
    c.router.k = o.top;
    c.router.capacity_factor = o.capacity_factor;
    c.router.capacity_rounding = parse_capacity_rounding(o.capacity_rounding, "--capacity_rounding");
    c.router.renormalize = o.top > 1;  // Tutel normalises the k gate weights, never a single one
    if (o.expert_groups < 1 || c.router.experts % o.expert_groups != 0)
      SY_THROW(ConfigError, "--expert_groups = ", o.expert_groups, ", expected a divisor of the ", c.router.experts,
               " experts");
    if (o.topk_groups < 1 || o.topk_groups > o.expert_groups ||
        o.topk_groups * (c.router.experts / o.expert_groups) < o.top)
      SY_THROW(ConfigError, "--topk_groups = ", o.topk_groups, ", expected 1..--expert_groups (", o.expert_groups,
               ") with at least --top (", o.top, ") experts in that many groups of ", c.router.experts / o.expert_groups);
    c.router.groups = o.expert_groups;
    c.router.topk_groups = o.topk_groups;
    c.compute = bf16 ? DType::bf16 : DType::f32;
    std::optional<ClusterModel> cluster;
    if (!o.emulate.empty()) cluster = load_cluster_preset(o.emulate);
    if (o.timing_only && !cluster) SY_THROW(ConfigError, "--timing_only needs --emulate PRESET");
    const int nodes = o.nodes > 0                ? o.nodes
                      : cluster                  ? std::max(1, W / std::min(W, cluster->link.ranks_per_node))
                                                 : rt.nodes();
    if (W % nodes != 0) SY_THROW(ConfigError, "--nodes = ", nodes, " does not divide the ", W, " ranks");
    c.node_size = W / nodes;
    // The layer's group: the world, or the world seen through the cluster's link model.
    std::shared_ptr<Communicator> group = rt.world_ptr();
    if (cluster) {
      LinkModel link = cluster->link;
      link.ranks_per_node = W / nodes;
      link.ranks_per_nic = std::gcd(link.ranks_per_nic, link.ranks_per_node);  // fewer ranks per node than the preset's
      group = make_emulated_communicator(group, link, o.timing_only);
      c.device_model = std::make_shared<DeviceModel>(cluster->device);
      c.skip_compute = o.timing_only;
    }
    c.plan.r = o.adaptive_r < 0 ? 1 : o.adaptive_r;
    c.plan.d = o.overlap_degree;
    c.plan.a2a = o.use_2dh ? A2AAlgorithm::hierarchical : A2AAlgorithm::flat;
    if (!o.placement.empty()) c.placement = load_placement_file(o.placement, c.router.experts, W);
    c.send_once_per_rank = o.send_once;
    if (int(!o.placement.empty()) + int(o.ep_size > 0) + int(o.redundant_experts > 0) > 1)
      SY_THROW(ConfigError, "--placement, --ep_size and --redundant_experts each choose the placement; give one");
    if (o.redundant_experts < 0 || o.rebalance_every < 0)
      SY_THROW(ConfigError, "--redundant_experts and --rebalance_every must be >= 0");
    if (o.eplb_policy != "global" && o.redundant_experts == 0)
      SY_THROW(ConfigError, "--eplb_policy ", o.eplb_policy, " needs --redundant_experts R > 0 (replicas to place)");
    if (o.rebalance_every > 0 && o.redundant_experts == 0)
      SY_THROW(ConfigError, "--rebalance_every needs --redundant_experts R > 0 (replicas to place)");
    const int E = c.router.experts, physical = E + o.redundant_experts;
    if (o.ep_size > 0) {
      c.placement = ExpertPlacement::expert_data_parallel(E, W, o.ep_size);
      c.replica_domain = o.ep_size;
    }
    if (o.replica_choice != "in_turn" && o.replica_choice != "nearest")
      SY_THROW(ConfigError, "--replica_choice = '", o.replica_choice, "', expected in_turn or nearest");
    if (o.replica_choice == "nearest") {
      if (o.ep_size > 0)
        SY_THROW(ConfigError, "--replica_choice nearest with --ep_size: expert data parallelism keeps tokens in their "
                 "expert group; expected in_turn");
      c.replica_choice = MoEConfig::ReplicaChoice::nearest;
    }
    if (o.redundant_experts > 0) {
      if (physical % W != 0)
        SY_THROW(ConfigError, "--redundant_experts = ", o.redundant_experts, ": ", E, " + ", o.redundant_experts,
                 " physical experts do not divide over ", W, " ranks");
      // Before any load is measured: EPLB on equal loads.
      const int node_count = c.node_size > 1 && c.node_size < W ? W / c.node_size : 1;
      if (o.eplb_policy == "hierarchical") {
        if (node_count < 2 || o.expert_groups % node_count != 0)
          SY_THROW(ConfigError, "--eplb_policy hierarchical packs --expert_groups = ", o.expert_groups,
                   " onto ", node_count, " node(s); expected 2 or more nodes (--nodes, --emulate) and a multiple of them");
        c.eplb_hierarchical = true;
      }
      c.placement = c.eplb_placement(std::vector<double>(static_cast<size_t>(E), 1.0), physical, W);
    }
    double zipf = 0;
    if (!o.gate_skew.empty()) {
      try {
        if (o.gate_skew.rfind("zipf:", 0) != 0) throw std::invalid_argument("prefix");
        size_t used = 0;
        zipf = std::stod(o.gate_skew.substr(5), &used);
        if (used != o.gate_skew.size() - 5 || !(zipf > 0)) throw std::invalid_argument("value");
      } catch (const std::exception&) {
        SY_THROW(ConfigError, "--gate_skew = '", o.gate_skew, "', expected zipf:S with S > 0");
      }
    }
    // --device cuda: the layer's ops and group on this rank's GPU; the host
    // keeps the tokens and the loss (each step moves x in, the output out).
    if (o.device != "cpu" && cluster)
      SY_THROW(ConfigError, "--device ", o.device, " with --emulate: the emulated cluster runs on host ops; expected one");
    const MoEDevice dev = make_moe_device(o.device, group, "--device", rt.info().local_rank, rt.info().local_size);
    if (dev.on_device()) {
      c.ops = dev.ops;
      group = dev.group;
      if (leader) std::printf("# device: %s\n", dev.description.c_str());
    }
    MoELayer layer(c, group, dev.host_group);
    layer.init_parameters(o.seed);

    const int64_t T = static_cast<int64_t>(o.batch_size) * o.num_tokens, M = o.model_dim;
    Tensor x = Tensor::empty({T, M}, DType::f32), target = Tensor::empty({T, M}, DType::f32);
    Tensor dout = Tensor::empty({T, M}, DType::f32);
    Rng rng(o.seed * 7919 + static_cast<uint64_t>(world.rank()));
    rng.fill_uniform(x, -1, 1);
    rng.fill_uniform(target, -0.1, 0.1);
    if (zipf > 0) {  // feature 0 is a constant 1 whose gate row lowers expert e's logit by S ln(e + 1)
      Tensor gate = layer.ops().copy_out(layer.gate_weight()).clone();
      for (int e = 0; e < E; ++e) gate.data_as<float>()[e] -= static_cast<float>(zipf * std::log(e + 1.0));
      layer.ops().from_host(layer.gate_weight().data(), gate.data(), static_cast<int64_t>(gate.nbytes()));
    }
    const bool report_load = o.redundant_experts > 0 || zipf > 0 || o.ep_size > 0;
    // Loads are judged on tokens the placement never saw: fresh ones every step.
    auto draw_tokens = [&] {
      rng.fill_uniform(x, -1, 1);
      if (zipf > 0)
        for (int64_t t = 0; t < T; ++t) x.data_as<float>()[t * M] = 1.f;
    };
    if (zipf > 0) draw_tokens();
    std::vector<double> load_since(static_cast<size_t>(E), 0.0);  // logical expert loads since the last placement
    std::vector<double> rank_load_ratios;                          // max/mean rows per rank, per step
    if (leader && !o.quiet)
      std::printf("# switchyard bench moe: %d ranks (%s, %d nodes), %lld tokens/rank, model_dim %d, hidden %d, %d experts "
                  "(%s), top-%d, capacity factor %g, %s exchange, %s, %d GEMM threads/rank, %s\n",
                  W, std::string(world.backend_name()).c_str(), nodes, static_cast<long long>(T), o.model_dim,
                  o.hidden_size, c.router.experts,
                  layer.layout().shards() > 1 ? (std::to_string(layer.layout().shards()) + " ranks per expert").c_str()
                                              : (std::to_string(layer.layout().local_experts()) + " per rank").c_str(),
                  o.top, o.capacity_factor, o.exchange.c_str(), o.activation.c_str(), rt.gemm_threads(),
                  o.eval ? "forward only (--eval)" : "training (fwd+bwd+SGD)");
    if (leader && !o.quiet && o.send_once && c.plan.exchange != ExchangeMode::dropless)
      std::printf("# --send_once applies to dropless plans only; this run's padded exchange sends every row\n");
    if (leader && !o.quiet && c.placement)
      std::printf("# placement %s: %s\n", o.placement.c_str(), c.placement->describe().c_str());
    if (leader && !o.quiet && o.microbatches > 1)
      std::printf("# %d micro-batches in flight per step (phases interleaved); capacity is per micro-batch, so the "
                  "losses equal the plain run's when nothing drops (capacity factor <= 0)\n",
                  o.microbatches);
    if (leader && cluster && !o.quiet)
      std::printf("# emulated cluster %s (%s): %d ranks per node; step_time is virtual (device and link models), "
                  "wall = this machine%s\n",
                  cluster->name.c_str(), cluster->description.c_str(), W / nodes,
                  o.timing_only ? "; timing only: GEMMs and bulky payloads skipped, losses meaningless" : "");
    int64_t dropped_total = 0;
    // One synchronized step under `plan`; returns the slowest rank's seconds.
    // --strategy auto (and the sweep's auto row): the planner, seeded by a
    // calibration on this group (emulated: on the emulated cluster, in
    // virtual time, as on real hardware; never from the preset's figures).
    std::unique_ptr<MoEPlanner> planner;
    auto make_planner = [&] {
      PlannerOptions po;
      po.training = !o.eval;
      po.input_grad = o.input_grad;
      auto [device, link] = MoEPlanner::calibrate(layer, W / nodes);
      return std::make_unique<MoEPlanner>(layer, device, link, po);
    };
    if (o.strategy == "auto" || o.sweep) planner = make_planner();
    double last_wall = 0;
    // One synchronized step under `fixed`, or the planner's plan when null.
    auto step = [&](int index, const ExecPlan* fixed, bool print) {
      if (report_load && index > 0) draw_tokens();
      world.barrier().wait();
      group->barrier().wait();  // emulated: every rank's virtual time meets here
      const double virtual_start = virtual_time::now();
      const auto start = Clock::now();

      const double flops_at_start = layer.gemm_flops();
      // auto: the planner decides inside plan(), on the capacity all-reduce.
      const Tensor x_in = layer.ops().copy_in(x);
      auto plan_rows = [&](int64_t first, int64_t rows) {
        const TensorView part(x_in.data_as<float>() + first * M, DType::f32, {rows, M}, x_in.device());
        return fixed ? layer.plan(part, layer.routing_choice(), *fixed)
                     : layer.plan(part, layer.routing_choice(), *planner);
      };
      MoEForward f;
      std::vector<MoEHandle> batches;
      std::vector<int64_t> first_row;
      if (o.microbatches == 1) {
        f = fixed ? layer.forward(x_in, layer.routing_choice(), *fixed)
                  : layer.forward(x_in, layer.routing_choice(), *planner);
        f.output = layer.ops().copy_out(f.output);
      } else {
        // M batches in flight: all planned and dispatched, then their experts
        // chunk by chunk in turn (each chunk's return all-to-all overlapping the
        // next batch's experts), then combined.
        const int mb = o.microbatches;
        for (int i = 0; i <= mb; ++i) first_row.push_back(T * i / mb);
        for (int i = 0; i < mb; ++i) batches.push_back(plan_rows(first_row[i], first_row[i + 1] - first_row[i]));
        for (auto& b : batches) layer.dispatch(*b);
        int chunks = 0;
        for (auto& b : batches) chunks = std::max(chunks, b->chunks());
        for (int chunk = 0; chunk < chunks; ++chunk)
          for (auto& b : batches)
            if (chunk < b->chunks()) layer.experts(*b, chunk);
        for (auto& b : batches) layer.combine(*b);
        f.output = Tensor::empty({T, M}, DType::f32);
        for (int i = 0; i < mb; ++i) {
          const MoEForward& part = layer.finish(*batches[static_cast<size_t>(i)]);
          if (part.output.nbytes())
            layer.ops().to_host(f.output.data_as<float>() + first_row[i] * M, part.output.data(),
                                static_cast<int64_t>(part.output.nbytes()));
          f.dropped += part.dropped;
        }
      }
      const ExecPlan plan = layer.last_plan().exec;
      // The step's plans (for the rows each rank's experts got) and the logical loads.
      std::vector<const DispatchPlan*> step_plans;
      auto count = [&](const DispatchPlan& p, const Routing& r) {
        step_plans.push_back(&p);
        for (int e = 0; e < E && e < static_cast<int>(r.expert_load.size()); ++e)
          load_since[static_cast<size_t>(e)] += static_cast<double>(r.expert_load[static_cast<size_t>(e)]);
      };
      if (batches.empty())
        count(layer.last_plan(), layer.last_routing());
      else
        for (auto& b : batches) count(b->plan(), b->routing());
      double local_loss = 0.0;
      const float* out = f.output.data_as<float>();
      float* d = dout.data_as<float>();
      const float* y = target.data_as<float>();
      const int64_t n = T * M;
#pragma omp parallel for schedule(static) reduction(+ : local_loss)
      for (int64_t i = 0; i < n; ++i) {
        const double diff = out[i] - y[i];
        local_loss += diff * diff;
        d[i] = static_cast<float>(2.0 * diff / static_cast<double>(std::max<int64_t>(1, n)));
      }
      if (!o.eval) {
        layer.zero_grad();
        const Tensor dout_in = layer.ops().copy_in(dout);
        if (batches.empty())
          layer.backward(dout_in, 0.0, 0.0, o.input_grad);
        else
          for (size_t i = 0; i < batches.size(); ++i) {
            const int64_t rows = first_row[i + 1] - first_row[i];
            layer.backward(*batches[i],
                           TensorView(dout_in.data_as<float>() + first_row[i] * M, DType::f32, {rows, M},
                                      dout_in.device()),
                           0.0, 0.0, o.input_grad);
          }
        layer.sgd_step(o.lr);
      }
      layer.ops().synchronize();  // device ops: the step's work done before its time is read
      const double mine = std::chrono::duration<double>(Clock::now() - start).count();
      const double wall = allreduce_scalar(world, mine, ReduceOp::max);
      const double step_time =
          cluster ? allreduce_scalar(world, virtual_time::now() - virtual_start, ReduceOp::max) : wall;
      last_wall = wall;
      const double loss = allreduce_scalar(world, local_loss) / std::max<double>(1.0, allreduce_scalar(world, double(T * M)));
      const double step_flops = allreduce_scalar(world, layer.gemm_flops() - flops_at_start);
      dropped_total += f.dropped;
      if (report_load) {
        rank_load_ratios.push_back(rank_load_max_over_mean(*layer.host_group(), step_plans));
        if (leader && print) std::printf("rank load max/mean: %.3f\n", rank_load_ratios.back());
      }
      if (leader && print)
        std::printf("STEP-%d: loss = %.5f, step_time = %.6f sec, perf = %.2f tflops. (f = %g, %s)%s\n", index, loss,
                    step_time, step_flops / step_time * 1e-12, o.capacity_factor, plan.describe().c_str(),
                    cluster ? detail::make_string(" wall = ", wall, " sec").c_str() : "");
      std::fflush(stdout);
      return step_time;
    };

    if (o.sweep) {
      // Every candidate the planner has (the strategies' plans this layout
      // runs), each for num_steps steps after one warm-up.
      std::vector<ExecPlan> plans;
      for (const ExecPlan& p : planner->candidates())
        if (p.r == 1 || layer.layout().is_permutation()) plans.push_back(p);  // replicas: expert parallel only
      std::vector<double> medians, wall_medians;
      int index = 0;
      const auto sweep_start = std::chrono::steady_clock::now();
      for (size_t pi = 0; pi < plans.size(); ++pi) {
        const ExecPlan& p = plans[pi];
        if (leader && pi > 0) {  // progress on stderr: plan i of N and the time still to go at this pace
          const double spent = std::chrono::duration<double>(std::chrono::steady_clock::now() - sweep_start).count();
          std::fprintf(stderr, "[bench moe --sweep] plan %zu/%zu (%s), %.1f s so far, about %.0f s to go\n", pi + 1,
                       plans.size(), p.describe().c_str(), spent,
                       spent / static_cast<double>(pi) * static_cast<double>(plans.size() + 1 - pi));
        }
        if (!o.timing_only) step(index++, &p, true);  // warm-up: buffers sized (virtual time needs none)
        std::vector<double> times, walls;
        for (int s = 0; s < o.num_steps; ++s) {
          times.push_back(step(index++, &p, true));
          walls.push_back(last_wall);
        }
        medians.push_back(median(times));
        wall_medians.push_back(median(walls));
      }
      // The planner's row: its first steps learn, the median is over the rest.
      std::vector<double> auto_times, auto_walls;
      std::vector<ExecPlan> auto_plans;  // what the planner ran in its counted steps
      for (int s = 0; s < o.num_steps + 3; ++s) {
        const double t = step(index++, nullptr, true);
        if (s >= 3) auto_times.push_back(t), auto_walls.push_back(last_wall), auto_plans.push_back(layer.last_plan().exec);
      }
      if (leader) {
        const double best = *std::min_element(medians.begin(), medians.end());
        const double worst = *std::max_element(medians.begin(), medians.end());
        std::printf("# sweep: median synchronized step time per plan (%s), and its ratio to the best%s\n",
                    cluster ? "virtual, emulated" : "wall clock", cluster ? "; then this machine's wall time" : "");
        // The planner's prediction for each plan, from the last batch it decided
        // (agreed inputs, its learned corrections), against the measurement.
        double worst_error = 0;
        for (size_t i = 0; i < plans.size(); ++i) {
          const double predicted = planner->predict(plans[i], planner->last_inputs()).total;
          const double error = predicted / medians[i] - 1;
          worst_error = std::max(worst_error, std::abs(error));
          std::printf("#   %-40s %10.6f sec  x%.3f   predicted %10.6f sec (%+5.1f%%)", plans[i].describe().c_str(),
                      medians[i], medians[i] / best, predicted, 100 * error);
          if (cluster) std::printf("   wall %10.6f sec", wall_medians[i]);
          std::printf("\n");
        }
        std::printf("#   %-40s %10.6f sec  x%.3f", "auto (planner, after 3 learning steps)", median(auto_times),
                    median(auto_times) / best);
        if (cluster) std::printf("   wall %10.6f sec", median(auto_walls));
        std::printf("\n# %s\n", planner->explanation().c_str());
        std::printf("# best / worst = %.3f (the worst plan is %.2fx slower than the best); auto / best = %.3f; "
                    "largest prediction error %.1f%%\n",
                    best / worst, worst / best, median(auto_times) / best, 100 * worst_error);
        // The planner's steps ran a plan the sweep measured too: their times
        // must agree, or the machine's noise, not the planner, made the ratio.
        const bool one_plan = std::all_of(auto_plans.begin(), auto_plans.end(),
                                          [&](const ExecPlan& p) { return p == auto_plans.front(); });
        const auto swept = std::find(plans.begin(), plans.end(), auto_plans.front());
        if (one_plan && swept != plans.end()) {
          const double same = median(auto_times) / medians[static_cast<size_t>(swept - plans.begin())];
          if (same > 1.05 || same < 0.95)
            std::printf("# INCONCLUSIVE: auto ran (%s) throughout, whose fixed run took %.6f sec; auto's %.6f sec "
                        "differs by %+.1f%%: the machine was too noisy to judge auto / best\n",
                        auto_plans.front().describe().c_str(), medians[static_cast<size_t>(swept - plans.begin())],
                        median(auto_times), 100 * (same - 1));
        }
      }
      return;
    }

    const int skip = std::min(5, o.num_steps / 2);  // first steps warm caches and allocators
    double timed = 0.0;
    std::vector<double> step_times, wall_times;
    for (int s = 0; s < o.num_steps; ++s) {
      if (s == skip) {
        layer.reset_profile();
        dropped_total = 0;
      }
      if (o.rebalance_every > 0 && s > 0 && s % o.rebalance_every == 0) {
        // EPLB from the loads of the steps since the last placement, judged on the next ones.
        const size_t last = rank_load_ratios.size(), first = last >= static_cast<size_t>(o.rebalance_every)
                                                                  ? last - static_cast<size_t>(o.rebalance_every) : 0;
        const double before = median(std::vector<double>(rank_load_ratios.begin() + static_cast<ptrdiff_t>(first),
                                                         rank_load_ratios.end()));
        const ExpertPlacement next = layer.rebalance(load_since, physical).placement;
        std::fill(load_since.begin(), load_since.end(), 0.0);
        if (leader && !o.quiet)
          std::printf("# rebalanced at step %d from the loads of steps %zu..%d: %s; rank load max/mean was %.3f "
                      "(median of those steps)\n",
                      s, first, s - 1, next.describe().c_str(), before);
      }
      const double t = step(s, o.strategy == "auto" ? nullptr : &c.plan, !o.quiet);
      if (s >= skip) timed += t, step_times.push_back(t), wall_times.push_back(last_wall);
    }
    const int steps = o.num_steps - skip;
    if (leader && o.result) {
      o.result->step_time = median(step_times);
      o.result->wall = median(wall_times);
      o.result->plan = layer.last_plan().exec.describe();
      o.result->tokens = T * W;
    }
    if (o.quiet) return;
    if (leader) std::printf("[Summary] Average synchronized step_time = %.6f sec.\n", timed / steps);
    if (leader && report_load && !rank_load_ratios.empty())
      std::printf("# rank load max/mean (routed rows per rank, no padding): median %.3f over the last %zu steps\n",
                  median(std::vector<double>(rank_load_ratios.end() - static_cast<ptrdiff_t>(std::min<size_t>(
                                                                           rank_load_ratios.size(), static_cast<size_t>(steps))),
                                             rank_load_ratios.end())),
                  std::min<size_t>(rank_load_ratios.size(), static_cast<size_t>(steps)));
    if (leader && planner)
      std::printf("# %s (plan changes: %d)\n", planner->explanation().c_str(), planner->decisions_changed());
    // Breakdown (this rank), GEMMs, and the floor: the same GEMMs timed alone
    // (emulated: the device model's time for them).
    const MoEPhaseTimes& pt = cluster ? layer.virtual_phase_times() : layer.phase_times();
    double floor = 0.0;
    std::vector<std::pair<GemmShape, std::pair<double, double>>> rows;
    for (const auto& [shape, count] : layer.gemms()) {
      const double per_step = static_cast<double>(count) / steps;
      const double t = cluster ? cluster->device.gemm_seconds(static_cast<double>(shape.m), static_cast<double>(shape.n),
                                                              static_cast<double>(shape.k), shape.bf16)
                               : time_gemm(shape);
      floor += per_step * t;
      rows.push_back({shape, {per_step, t}});
    }
    const double floor_max = allreduce_scalar(world, floor, ReduceOp::max);
    if (leader) {
      const double total = timed / steps;
      auto line = [&](const char* name, double seconds) {
        std::printf("#   %-14s %10.6f sec  %5.1f%%\n", name, seconds / steps, 100.0 * seconds / steps / total);
      };
      std::printf("# phases per step (rank 0, %s; share of the synchronized step):\n",
                  cluster ? "virtual seconds" : "wall seconds");
      line("gate", pt.gate);
      line("encode", pt.encode);
      line("all-to-all", pt.dispatch_a2a);
      line("weight gather", pt.weights);
      line("bf16 weights", pt.convert);
      line("experts", pt.experts);
      line("all-to-all back", pt.combine_a2a);
      line("decode", pt.decode);
      line("backward", pt.backward);
      std::printf("# tokens dropped per step (all ranks): %.1f\n", allreduce_scalar(world, double(dropped_total)) / steps);
      std::printf("# rows dispatched (rank 0, last batch): %lld of %lld routed rows%s\n",
                  static_cast<long long>(layer.last_plan().dispatch_rows()),
                  static_cast<long long>(layer.last_plan().send_rows()),
                  layer.last_plan().send_once ? " (each token once per destination rank)" : "");
      std::printf("# GEMMs per step (rank 0): m x n x k [transposes] count, median time alone\n");
      for (const auto& [s, v] : rows)
        std::printf("#   %6lld x %6lld x %6lld  %s%s %s x%-6.1f %10.6f sec  (%.1f GFLOP/s)\n", static_cast<long long>(s.m),
                    static_cast<long long>(s.n), static_cast<long long>(s.k), s.transpose_a ? "A^T" : "A  ",
                    s.transpose_b ? " B^T" : " B  ", s.bf16 ? "bf16" : "f32 ", v.first, v.second,
                    2.0 * s.m * s.n * s.k / v.second * 1e-9);
      std::printf("# GEMM floor (slowest rank): %.6f sec per step; step time / floor = %.3f\n", floor_max,
                  total / floor_max);
      // Encode gathers the routed rows into the send buffer, decode sums them
      // back into tokens: each moves the routed rows' bytes once.
      const int64_t routed_bytes = layer.last_plan().send_rows() * M * static_cast<int64_t>(sizeof(float));
      const double copy = time_memcpy(routed_bytes);
      std::printf("# encode + decode: %.6f sec per step for %lld routed bytes each; memcpy floor %.6f sec each; "
                  "(encode + decode) / (2 x floor) = %.2f\n",
                  (pt.encode + pt.decode) / steps, static_cast<long long>(routed_bytes), copy,
                  copy > 0 ? (pt.encode + pt.decode) / steps / (2 * copy) : 0.0);
    } else {
      allreduce_scalar(world, double(dropped_total));
    }
  });
  return 0;
}

}  // namespace switchyard
