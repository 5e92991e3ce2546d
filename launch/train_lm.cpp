#include "launch/train_lm.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <map>
#include <memory>
#include <optional>

#include "core/error.h"
#include "launch/gemm_rate.h"
#include "model/lm_train.h"
#include "moe/planner.h"
#include "parallel/checkpoint.h"

namespace switchyard {
namespace {

using Clock = std::chrono::steady_clock;

double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v.size() % 2 ? v[v.size() / 2] : 0.5 * (v[v.size() / 2 - 1] + v[v.size() / 2]);
}

// What the layers refuse later, refused here naming the keys and where they were set.
ModelConfig lm_model_config(const JobConfig& job, int world) {
  const MoESection& m = job.moe;
  const LmSection& lm = job.lm;
  if (m.experts % world != 0)
    SY_THROW(ConfigError, job.where("moe.experts"), ": moe.experts = ", m.experts, " over ", world,
             " ranks; moe-lm-train keeps whole experts per rank, expected a multiple of the rank count");
  if (m.model_dim % lm.heads != 0 || (m.model_dim / lm.heads) % 2 != 0)
    SY_THROW(ConfigError, job.where("lm.heads"), ": lm.heads = ", lm.heads, " with moe.model_dim = ", m.model_dim,
             " (", job.where("moe.model_dim"), "); expected heads dividing the width into even head widths");
  if (m.top_k > m.experts)
    SY_THROW(ConfigError, job.where("moe.top_k"), ": moe.top_k = ", m.top_k, ", expected at most moe.experts = ", m.experts,
             " (", job.where("moe.experts"), ")");
  if (job.train.dtype != DType::f32 && job.train.dtype != DType::bf16)
    SY_THROW(ConfigError, job.where("train.dtype"), ": train.dtype = ", dtype_name(job.train.dtype),
             ", expected f32 or bf16");
  if (m.gate == "sigmoid_bias")
    SY_THROW(ConfigError, job.where("moe.gate"), ": moe.gate = sigmoid_bias: its bias balancing is not built into "
             "moe-lm-train yet (nor saved in its checkpoints); expected softmax");
  if ((job.train.checkpoint_every > 0 || job.train.stop_after > 0) && job.train.checkpoint.empty())
    SY_THROW(ConfigError, job.where(job.train.checkpoint_every > 0 ? "train.checkpoint_every" : "train.stop_after"),
             ": ", job.train.checkpoint_every > 0 ? "train.checkpoint_every" : "train.stop_after",
             " needs train.checkpoint (a directory to save into)");
  if (job.moe.expert_parallel_size != 0 || job.moe.redundant_experts != 0)
    SY_THROW(ConfigError, job.where(job.moe.expert_parallel_size ? "moe.expert_parallel_size" : "moe.redundant_experts"),
             ": moe-lm-train runs the experts expert-parallel over the world; EP x DP and redundant experts are "
             "not built for it yet (expected 0)");
  ModelConfig c;
  c.name = "moe-lm";
  c.vocab_size = 256;
  c.d_model = static_cast<int>(m.model_dim);
  c.layers = lm.layers;
  c.heads = lm.heads;
  c.max_seq = lm.seq;
  c.experts = m.experts;
  c.k = m.top_k;
  c.hidden = m.hidden_dim;
  c.activation = m.activation;
  c.gate = m.gate;
  c.renormalize = m.gate == "sigmoid_bias";
  return c;
}

// FLOPs of one training step's dense GEMMs on `sequences` sequences of T
// (forward, input and weight gradients: three GEMMs of each product;
// attention's scores and mixing, four more in the backward).
double dense_step_flops(const ModelConfig& c, int sequences, int T) {
  const double N = static_cast<double>(sequences) * T, d = c.d_model, V = c.vocab_size;
  const double projections = 3 * 4 * 2 * N * d * d, head = 3 * 2 * N * d * V;
  const double attention = (4 + 8) * static_cast<double>(sequences) * T * T * d;  // 2 fwd + 4 bwd GEMMs of 2 T^2 hd per head
  return c.layers * (projections + attention) + head;
}

}  // namespace

void train_lm(Runtime& rt, const JobConfig& job) {
  Communicator& world = rt.world();
  const bool leader = world.rank() == 0;
  const TrainSection& tr = job.train;
  const LmSection& lm = job.lm;
  const ModelConfig mc = lm_model_config(job, world.size());
  const bool automatic = job.moe.strategy == "auto";
  LmTrainOptions options;
  options.compute = tr.dtype;
  options.capacity_factor = job.moe.capacity_factor;
  options.capacity_rounding = parse_capacity_rounding(job.moe.capacity_rounding, "moe.capacity_rounding");
  options.balance_loss = parse_balance_loss(job.moe.balance_loss, "moe.balance_loss");
  options.plan.r = job.moe.r;
  options.plan.d = job.moe.overlap_degree;
  options.plan.a2a = parse_a2a_algorithm(job.moe.a2a, "moe.a2a");
  options.plan.exchange = parse_exchange_mode(job.moe.exchange, "moe.exchange");
  const int nodes = job.moe.nodes > 0 ? job.moe.nodes : rt.nodes();
  options.node_size = world.size() % nodes == 0 ? world.size() / nodes : 0;
  const TextCorpus corpus = TextCorpus::fortunes(lm.corpus);
  TrainableLM model(mc, rt.world_ptr(), options);
  model.init_parameters(static_cast<uint64_t>(tr.seed));
  LmTrainSchedule schedule;
  schedule.batch = lm.batch;
  schedule.seq = lm.seq;
  schedule.steps = tr.steps;
  schedule.lr = tr.lr;
  schedule.min_lr_ratio = tr.min_lr_ratio;
  schedule.warmup = tr.warmup;
  schedule.clip = tr.clip;
  schedule.balance_coef = tr.balance_coef;
  schedule.z_coef = tr.z_coef;
  schedule.seed = static_cast<uint64_t>(tr.seed);
  schedule.adam.weight_decay = tr.weight_decay;
  LmTrainer trainer(model, corpus, schedule);
  const double unigram = corpus.unigram_nats();
  if (tr.resume && tr.checkpoint.empty())
    SY_THROW(ConfigError, job.where("train.resume"), ": train.resume = true needs train.checkpoint (a directory)");
  // Rank 0 looks, every rank follows: ranks that disagreed (a directory not shared) would train different runs.
  double found = leader && !tr.checkpoint.empty() && Checkpoint::exists(tr.checkpoint) ? 1.0 : 0.0;
  world.broadcast(TensorView(&found, DType::f64, {1}), 0).wait();
  PlannerOptions po;
  po.input_grad = true;
  std::map<std::string, std::string> meta;  // of the checkpoint resumed from
  if (tr.resume && found != 0) {
    meta = trainer.resume(tr.checkpoint);
    if (leader)
      std::printf("# resumed from %s (generation %s, saved by %s ranks) at step %lld\n", tr.checkpoint.c_str(),
                  meta.at("generation").c_str(), meta.at("world_size").c_str(),
                  static_cast<long long>(trainer.next_step()));
  } else if (leader && found != 0) {
    std::printf("# %s holds a checkpoint; this run starts fresh and replaces it at its first save (train.resume: "
                "true continues it)\n", tr.checkpoint.c_str());
  } else if (leader && tr.resume) {
    std::printf("# train.resume: no checkpoint in %s yet; starting fresh\n", tr.checkpoint.c_str());
  }
  int64_t parameters = 0;
  for (const TrainParam& p : model.parameters())
    parameters += p.kind == ParamKind::expert ? p.value.numel() * world.size() : p.value.numel();
  if (leader)
    std::printf("# moe-lm-train: %d ranks (%s), %d layers, d_model %d, %d heads, %d experts top-%d (hidden %lld, %s), "
                "%.2f M parameters, %s experts; %d x %d bytes per step, %d steps, AdamW lr %g (warm-up %lld, cosine to "
                "x%g), clip %g; plan %s; corpus %s: %zu bytes train, %zu held out, unigram %.3f nats/byte\n",
                world.size(), std::string(world.backend_name()).c_str(), mc.layers, mc.d_model, mc.heads, mc.experts,
                mc.k, static_cast<long long>(mc.hidden), mc.activation.c_str(), parameters / 1e6,
                dtype_name(tr.dtype).data(), lm.batch, lm.seq, tr.steps, tr.lr, static_cast<long long>(tr.warmup),
                tr.min_lr_ratio, tr.clip, automatic ? "auto (the planner's per batch)" : options.plan.describe().c_str(),
                lm.corpus.c_str(), corpus.train.size(), corpus.held_out.size(), unigram);
  // auto: every candidate fixed for lm.probe_plans steps first (timed), then the planner.
  std::vector<ExecPlan> probe;
  const int64_t end = tr.stop_after > 0 ? std::min<int64_t>(tr.steps, trainer.next_step() + tr.stop_after) : tr.steps;
  // The control plan (the best probed one) as the checkpoint keeps it: r d a2a exchange.
  auto encode = [](const ExecPlan& p) {
    return std::to_string(p.r) + " " + std::to_string(p.d) + " " + std::to_string(static_cast<int>(p.a2a)) + " " +
           std::to_string(static_cast<int>(p.exchange));
  };
  std::optional<ExecPlan> control;
  std::string no_control = lm.probe_plans == 0 ? "lm.probe_plans = 0" : "";
  if (automatic && meta.count("control_plan")) {  // a resumed run keeps its probe's verdict instead of probing again
    ExecPlan p;
    int a2a = 0, exchange = 0;
    if (std::sscanf(meta.at("control_plan").c_str(), "%d %d %d %d", &p.r, &p.d, &a2a, &exchange) == 4) {
      p.a2a = static_cast<A2AAlgorithm>(a2a);
      p.exchange = static_cast<ExchangeMode>(exchange);
      const std::vector<ExecPlan> here = tutel_plans(model.moe(0), po);  // another world size may not run it
      if (std::find(here.begin(), here.end(), p) != here.end()) control = p;
    }
  }
  if (automatic && !control) {
    const std::vector<ExecPlan> all = tutel_plans(model.moe(0), po);
    for (int rep = 0; rep < lm.probe_plans; ++rep) probe.insert(probe.end(), all.begin(), all.end());
    // The probe takes at most half of this run's steps, so the planner gets the rest.
    if (static_cast<int64_t>(probe.size()) * 2 > end - trainer.next_step()) {
      if (leader && !probe.empty())
        std::printf("# no plan probe: its %zu steps would take more than half of this run's %lld\n", probe.size(),
                    static_cast<long long>(end - trainer.next_step()));
      if (!probe.empty()) no_control = "no probe: the run is too short for it";
      probe.clear();
    }
  }
  std::map<std::string, std::vector<double>> probed;  // plan -> MoE seconds per step
  std::vector<std::unique_ptr<MoEPlanner>> planners;
  std::map<std::string, int> ran;  // plans auto ran since the last plan line (layer-steps)
  // After the probe every 4th step runs the best probed plan fixed (a control, interleaved with auto's steps,
  // so the comparison sees the same drift and is free of the probe's best-of-many selection bias).
  std::vector<double> auto_moe, control_moe;
  int64_t after_probe = 0;
  auto moe_flops = [&] {
    double f = 0;
    for (int l = 0; l < mc.layers; ++l) f += model.moe(l).gemm_flops();
    return f;
  };
  double rank_dense_flops = 0, rank_moe_flops = 0;  // this rank's, summed over the steps run
  auto moe_seconds = [&] {
    double s = 0;
    for (int l = 0; l < mc.layers; ++l) s += model.moe(l).phase_times().total();
    return s;
  };
  auto save = [&] {
    std::map<std::string, std::string> extra = {{"capacity_factor", std::to_string(job.moe.capacity_factor)}};
    if (control) extra["control_plan"] = encode(*control);
    const uint64_t g = trainer.save(tr.checkpoint, extra);
    if (leader)
      std::printf("checkpoint: %s (generation %llu, step %lld)\n", tr.checkpoint.c_str(),
                  static_cast<unsigned long long>(g), static_cast<long long>(trainer.next_step()));
  };
  auto evaluate = [&] {
    const double held = trainer.held_out_loss(lm.eval_sequences);
    if (leader)
      std::printf("held-out loss %.4f nats/byte (unigram %.4f; ratio %.3f) after %lld steps\n", held, unigram,
                  held / unigram, static_cast<long long>(trainer.next_step()));
    return held;
  };
  const auto start = Clock::now();
  int64_t ran_steps = 0, probe_at = 0;
  double step_seconds = 0;
  std::fflush(stdout);
  while (trainer.next_step() < end) {
    const bool probing = probe_at < static_cast<int64_t>(probe.size());
    if (!probing && !probed.empty() && !control) {
      double best_time = 0;
      for (const ExecPlan& p : probe)
        if (!control || median(probed[p.describe()]) < best_time) control = p, best_time = median(probed[p.describe()]);
    }
    const bool controlling = !probing && control && after_probe % 4 == 3;
    if (automatic && planners.empty()) {  // calibrated once, before the probe, which the planners then learn from
      auto [device, link] = MoEPlanner::calibrate(model.moe(0), options.node_size > 0 ? options.node_size : world.size());
      std::vector<PlanChooser*> choosers;
      for (int l = 0; l < mc.layers; ++l) {
        planners.push_back(std::make_unique<MoEPlanner>(model.moe(l), device, link, po));
        choosers.push_back(planners.back().get());
      }
      model.set_plan_choosers(choosers);
    }
    // Forced plans go through the planners, which learn from them as from their own choices.
    for (auto& planner : planners)
      planner->force(probing ? std::optional<ExecPlan>(probe[static_cast<size_t>(probe_at)])
                     : controlling ? control : std::nullopt);
    const double moe_before = moe_seconds(), moe_flops_before = moe_flops();
    const auto t0 = Clock::now();
    const LmTrainer::Step st = trainer.step();
    // Wall seconds of the step and of its MoE layers: the slowest rank's.
    double times[2] = {std::chrono::duration<double>(Clock::now() - t0).count(), moe_seconds() - moe_before};
    world.allreduce(TensorView(times, DType::f64, {2}), TensorView(times, DType::f64, {2}), {.op = ReduceOp::max}).wait();
    step_seconds += times[0];
    ++ran_steps;
    rank_moe_flops += moe_flops() - moe_flops_before;
    rank_dense_flops += dense_step_flops(mc, static_cast<int>(trainer.starts(st.step).size()), lm.seq);
    if (probing) {
      probed[probe[static_cast<size_t>(probe_at)].describe()].push_back(times[1]);
      ++probe_at;
    } else if (controlling) {
      control_moe.push_back(times[1]);
      ++after_probe;
    } else if (automatic) {
      auto_moe.push_back(times[1]);
      for (int l = 0; l < mc.layers; ++l) ++ran[model.moe(l).last_plan().exec.describe()];
      ++after_probe;
    }
    const int64_t s = st.step + 1;
    const bool last = s == end;
    if (leader && (st.step % tr.log_every == 0 || last)) {
      const double elapsed = std::chrono::duration<double>(Clock::now() - start).count();
      std::printf("step %5lld/%d  loss %.6f  balance %.3f  |g| %.3f  lr %.2e  %.0f tokens/s  %.1f s%s\n",
                  static_cast<long long>(s), tr.steps, st.loss, st.balance, st.grad_norm, st.lr,
                  static_cast<double>(ran_steps) * lm.batch * lm.seq / std::max(step_seconds, 1e-9), elapsed,
                  probing       ? ("  (probing " + probe[static_cast<size_t>(probe_at - 1)].describe() + ")").c_str()
                  : controlling ? "  (control: the best probed plan)"
                                : "");
    }
    if (leader && automatic && !probing && !ran.empty() && (st.step % tr.log_every == 0 || last)) {
      std::string plans;
      for (const auto& [plan, count] : ran) plans += (plans.empty() ? "" : ", ") + plan + " x" + std::to_string(count);
      const double mine = median(auto_moe);
      if (!control) {
        std::printf("plan: auto ran %s (layer-steps); MoE %.2f ms/step (median of %zu steps; no control: %s)\n",
                    plans.c_str(), 1e3 * mine, auto_moe.size(), no_control.c_str());
        ran.clear();
        auto_moe.clear();
      } else if (!control_moe.empty()) {  // else the samples wait for the first control step
        std::printf("plan: auto ran %s (layer-steps); MoE %.2f ms/step (median of %zu steps) vs the best probed plan "
                    "(%s) fixed on %zu interleaved steps %.2f ms/step: auto/best %.3f\n",
                    plans.c_str(), 1e3 * mine, auto_moe.size(), control->describe().c_str(), control_moe.size(),
                    1e3 * median(control_moe), mine / std::max(median(control_moe), 1e-12));
        ran.clear();
        auto_moe.clear();
        control_moe.clear();
      }
    }
    std::fflush(stdout);
    if (s % lm.eval_every == 0 && !last) evaluate();
    if (!tr.checkpoint.empty() && tr.checkpoint_every > 0 && s % tr.checkpoint_every == 0 && !last) save();
  }
  const double held = evaluate();
  if (!tr.checkpoint.empty()) save();
  if (ran_steps > 0) {
    // The floor: each rank's GEMM FLOPs at its measured concurrent rate; the slowest rank's bounds the step.
    // This rank's share of the machine's rates (every rank runs its GEMMs at once, as in training).
    const double f32_rate = machine_gemm_rate(world, DType::f32) / world.size();
    const double bf16_rate = machine_gemm_rate(world, DType::bf16) / world.size();
    const double expert_rate = tr.dtype == DType::bf16 ? bf16_rate : f32_rate;
    double floor[2] = {(rank_dense_flops / f32_rate + rank_moe_flops / expert_rate) / ran_steps,
                       (rank_dense_flops + rank_moe_flops) / ran_steps};
    const double total_flops = allreduce_scalar(world, floor[1]);
    world.allreduce(TensorView(floor, DType::f64, {2}), TensorView(floor, DType::f64, {2}), {.op = ReduceOp::max}).wait();
    if (leader) {
      const double per_step = step_seconds / ran_steps;
      std::printf("# %lld steps in %.1f s: %.4f s/step, %.0f tokens/s over %d ranks; held-out %.4f nats/byte = %.3f x "
                  "unigram\n",
                  static_cast<long long>(ran_steps), step_seconds, per_step,
                  static_cast<double>(ran_steps) * lm.batch * lm.seq / step_seconds, world.size(), held, held / unigram);
      std::printf("# GEMM floor: %.3f GFLOP per step over all ranks; the busiest rank's GEMMs at its measured "
                  "concurrent rate (%.1f GFLOP/s f32, %.1f bf16: 1024^3 GEMMs on every rank at once) take %.4f s: step time / floor = %.2f\n",
                  total_flops / 1e9, f32_rate / 1e9, bf16_rate / 1e9, floor[0], per_step / floor[0]);
    }
  }
  std::fflush(stdout);
}

}  // namespace switchyard
