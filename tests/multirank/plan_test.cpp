// Execution plans over the unified layout (rank harness backend): every valid
// sharding degree r, pipelining degree d, all-to-all algorithm and exchange
// mode gives the single-rank result, for experts whole (E >= W) or sliced
// over ranks (E < W); plans switched between training steps give the losses
// of a fixed plan; checkpoints move between world sizes.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <map>
#include <thread>

#include "comm/backends/threads/threads_backend.h"
#include "comm/backends/emulated/emulated_backend.h"
#include "comm/virtual_time.h"
#include "parallel/checkpoint.h"
#include "moe/moe_layer.h"
#include "moe/planner.h"
#include "tests/common/rank_harness.h"

namespace switchyard {
namespace {

// The single-rank reference runs on the host ops whatever SWITCHYARD_MOE_OPS
// says, so the suite's emulated-ops run compares the decorator against the host.
MoEConfig on_host(MoEConfig c) {
  c.ops = std::make_shared<CpuOps>();
  return c;
}

using testing::random_tensor;

void expect_close(const std::string& what, const float* got, const float* want, int64_t n, double tol = 2e-4) {
  for (int64_t i = 0; i < n; ++i)
    if (!(std::fabs(got[i] - want[i]) <= tol * (1 + std::fabs(want[i]))))
      SY_THROW(Error, what, "[", i, "] = ", got[i], ", one rank gives ", want[i]);
}

// Columns of hidden slice `s` of `S` of a [rows, 2H] swiglu weight (gate | up).
std::vector<float> gated_slice(const float* full, int64_t rows, int64_t H, int s, int S) {
  const int64_t hs = H / S;
  std::vector<float> out;
  for (int64_t i = 0; i < rows; ++i)
    for (int half = 0; half < 2; ++half)
      out.insert(out.end(), full + i * 2 * H + half * H + s * hs, full + i * 2 * H + half * H + (s + 1) * hs);
  return out;
}

// Every rank's tokens, concatenated in rank order (rank r has rows_of(r) rows).
struct AllTokens {
  Tensor x, dout;
  int64_t first_mine = 0;
};
AllTokens all_tokens(int n, int me, uint64_t seed, int64_t M, const std::function<int64_t(int)>& rows_of) {
  int64_t total = 0;
  AllTokens a;
  for (int r = 0; r < n; ++r) {
    if (r == me) a.first_mine = total;
    total += rows_of(r);
  }
  a.x = Tensor::empty({total, M}, DType::f32);
  a.dout = Tensor::empty({total, M}, DType::f32);
  for (int r = 0, at = 0; r < n; at += static_cast<int>(rows_of(r)), ++r) {
    Tensor xr = random_tensor(seed + 100 + r, rows_of(r), M), dr = random_tensor(seed + 200 + r, rows_of(r), M);
    if (xr.nbytes()) std::memcpy(a.x.data_as<float>() + at * M, xr.data(), xr.nbytes());
    if (dr.nbytes()) std::memcpy(a.dout.data_as<float>() + at * M, dr.data(), dr.nbytes());
  }
  return a;
}

std::vector<ExecPlan> every_plan(const MoELayer& layer, bool hierarchical) {
  std::vector<ExecPlan> plans;
  for (int r : valid_sharding_degrees(layer.layout().shards()))
    for (int d : {1, 2, 4})
      for (A2AAlgorithm a2a : {A2AAlgorithm::flat, A2AAlgorithm::hierarchical})
        for (ExchangeMode x : {ExchangeMode::padded, ExchangeMode::dropless})
          if (a2a == A2AAlgorithm::flat || hierarchical) plans.push_back({r, d, a2a, x});
  return plans;
}

// One forward and backward under `plan` from a common virtual start: the
// slowest rank's virtual seconds (an emulated group).
double virtual_step(Communicator& comm, Communicator& group, MoELayer& layer, const Tensor& x, const Tensor& dout,
                    const ExecPlan& plan) {
  group.barrier().wait();
  const double start = virtual_time::now();
  layer.forward(x, layer.routing_choice(), plan);
  layer.backward(dout);
  return allreduce_scalar(comm, virtual_time::now() - start, ReduceOp::max);
}

TEST(MoEPlans, EveryPlanEqualsOneRankForwardAndBackward) {
  testing::for_each_rank([&](Communicator& comm, uint64_t seed) {
    const int n = comm.size(), me = comm.rank();
    std::shared_ptr<Communicator> group(&comm, [](Communicator*) {});
    for (int E : {1, 2, 4, 8}) {
      if (E % n != 0 && n % E != 0) continue;
      const int S = E >= n ? 1 : n / E;
      MoEConfig c;
      c.model_dim = 12, c.hidden_dim = 4 * S;
      c.activation = kernels::Activation::swiglu;
      c.router.experts = E, c.router.k = std::min(2, E), c.router.capacity_factor = 0.0;  // no drops
      c.node_size = n % 2 == 0 && n > 2 ? 2 : 0;
      const int64_t M = c.model_dim, H = c.hidden_dim;
      auto rows_of = [&](int r) -> int64_t { return r == n - 1 && n > 1 ? 0 : 5 + 3 * r; };
      AllTokens all = all_tokens(n, me, seed + E, M, rows_of);
      ThreadsWorld solo_world(1);
      MoELayer whole(on_host(c), solo_world.communicator(0));
      whole.init_parameters(seed);
      MoEForward wf = whole.forward(all.x);
      Tensor wdx = whole.backward(all.dout);

      MoELayer layer(c, group);
      layer.init_parameters(seed);
      Tensor x = random_tensor(seed + E + 100 + me, rows_of(me), M);
      Tensor dout = random_tensor(seed + E + 200 + me, rows_of(me), M);
      const int L = layer.layout().local_experts(), s = layer.layout().shard_of_rank(me);
      const int64_t Hs = H / S;
      for (const ExecPlan& plan : every_plan(layer, c.node_size > 0)) {
        const std::string where = "rank " + std::to_string(me) + " E = " + std::to_string(E) + " (" + plan.describe() + ") ";
        layer.zero_grad();
        MoEForward f = layer.forward(x, layer.routing_choice(), plan);
        Tensor dx = layer.backward(dout);
        expect_close(where + "output", f.output.data_as<float>(), wf.output.data_as<float>() + all.first_mine * M,
                     f.output.numel());
        expect_close(where + "dx", dx.data_as<float>(), wdx.data_as<float>() + all.first_mine * M, dx.numel());
        expect_close(where + "gate grad", layer.gate_grad().data_as<float>(), whole.gate_grad().data_as<float>(),
                     layer.gate_grad().numel());
        const ExpertParams& g = layer.expert_grads();
        const ExpertParams& wg = whole.expert_grads();
        for (int slot = 0; slot < L; ++slot) {
          const int e = layer.layout().expert_at(me, slot);
          const auto w1 = gated_slice(wg.w1.data_as<float>() + e * M * 2 * H, M, H, s, S);
          const auto b1 = gated_slice(wg.b1.data_as<float>() + e * 2 * H, 1, H, s, S);
          expect_close(where + "w1 grad", g.w1.data_as<float>() + slot * M * 2 * Hs, w1.data(), M * 2 * Hs);
          expect_close(where + "b1 grad", g.b1.data_as<float>() + slot * 2 * Hs, b1.data(), 2 * Hs);
          expect_close(where + "w2 grad", g.w2.data_as<float>() + slot * Hs * M,
                       wg.w2.data_as<float>() + e * H * M + s * Hs * M, Hs * M);
          expect_close(where + "b2 grad", g.b2.data_as<float>() + slot * M, wg.b2.data_as<float>() + e * M, M);
        }
      }
    }
  });
}

// With capacity (drops), every plan keeps the same choices: outputs equal the
// expert-parallel plan's.
TEST(MoEPlans, PlansKeepTheDropsOfCapacity) {
  testing::for_each_rank([&](Communicator& comm, uint64_t seed) {
    const int n = comm.size(), me = comm.rank();
    std::shared_ptr<Communicator> group(&comm, [](Communicator*) {});
    const int E = n % 2 == 0 ? n / 2 : n;  // sliced in pairs where the world allows
    MoEConfig c;
    c.model_dim = 16, c.hidden_dim = 8;
    c.router.experts = E, c.router.k = std::min(2, E), c.router.capacity_factor = 0.5;
    c.node_size = n % 2 == 0 && n > 2 ? 2 : 0;
    MoELayer layer(c, group);
    layer.init_parameters(seed);
    Tensor x = random_tensor(seed + 7 + me, 23, 16);
    MoEForward base = layer.forward(x, layer.routing_choice(), ExecPlan{});
    Tensor base_out = base.output;
    for (const ExecPlan& plan : every_plan(layer, c.node_size > 0)) {
      MoEForward f = layer.forward(x, layer.routing_choice(), plan);
      EXPECT_EQ(f.dropped, base.dropped) << plan.describe();
      expect_close("rank " + std::to_string(me) + " (" + plan.describe() + ") output", f.output.data_as<float>(),
                   base_out.data_as<float>(), f.output.numel(), 1e-5);
    }
  });
}

// A training loop that changes its plan every step follows the losses of a
// fixed plan.
TEST(MoEPlans, SwitchingPlansBetweenStepsKeepsTheLosses) {
  testing::for_each_rank([&](Communicator& comm, uint64_t seed) {
    const int n = comm.size(), me = comm.rank();
    std::shared_ptr<Communicator> group(&comm, [](Communicator*) {});
    const int E = n >= 2 && n % 2 == 0 ? n / 2 : n;
    MoEConfig c;
    c.model_dim = 16, c.hidden_dim = 16;
    c.router.experts = E, c.router.k = std::min(2, E), c.router.capacity_factor = 1.0;
    auto train = [&](bool switching) {
      MoELayer layer(c, group);
      layer.init_parameters(seed);
      const auto plans = every_plan(layer, false);
      std::vector<double> losses;
      for (int step = 0; step < 6; ++step) {
        Tensor x = random_tensor(seed + 31 * step + me, 19, 16);
        const ExecPlan plan = switching ? plans[static_cast<size_t>(step * 7) % plans.size()] : ExecPlan{};
        MoEForward f = layer.forward(x, layer.routing_choice(), plan);
        // loss = 0.5 * |y - x|^2 summed over the group
        Tensor dout = Tensor::empty(x.shape(), DType::f32);
        double loss = 0;
        for (int64_t i = 0; i < x.numel(); ++i) {
          const float diff = f.output.data_as<float>()[i] - x.data_as<float>()[i];
          dout.data_as<float>()[i] = diff;
          loss += 0.5 * diff * diff;
        }
        losses.push_back(allreduce_scalar(comm, loss));
        layer.zero_grad();
        layer.backward(dout, 0.01);
        layer.sgd_step(0.05);
      }
      return losses;
    };
    const auto fixed = train(false), switched = train(true);
    for (size_t i = 0; i < fixed.size(); ++i)
      if (std::fabs(fixed[i] - switched[i]) > 1e-4 * (1 + std::fabs(fixed[i])))
        SY_THROW(Error, "rank ", me, ": step ", i, " loss ", switched[i], " with switching plans, ", fixed[i],
                 " with a fixed plan");
  });
}

// A checkpoint saved on this world (experts sliced where E < W) reloads on one
// rank and on half the ranks with the same outputs.
TEST(MoEPlans, CheckpointReloadsUnderOtherWorldSizes) {
  testing::for_each_rank([&](Communicator& comm, uint64_t seed) {
    const int n = comm.size(), me = comm.rank();
    std::shared_ptr<Communicator> group(&comm, [](Communicator*) {});
    const int E = n % 2 == 0 ? n / 2 : n;
    MoEConfig c;
    c.model_dim = 12, c.hidden_dim = 8;
    c.activation = kernels::Activation::swiglu;
    c.router.experts = E, c.router.k = std::min(2, E), c.router.capacity_factor = 0.0;
    const std::string dir = (std::filesystem::temp_directory_path() /
                             ("sy_plan_ckpt_" + std::to_string(seed) + "_" + std::to_string(n))).string();
    if (me == 0) std::filesystem::create_directories(dir);
    comm.barrier().wait();
    auto rows_of = [](int r) -> int64_t { return 6 + r; };
    AllTokens all = all_tokens(n, me, seed, 12, rows_of);
    Tensor x = random_tensor(seed + 100 + me, rows_of(me), 12);
    Tensor dout = random_tensor(seed + 200 + me, rows_of(me), 12);
    MoELayer layer(c, group);
    layer.init_parameters(seed);
    layer.forward(x);
    layer.backward(dout);
    layer.sgd_step(0.1);  // weights no initialiser would give
    MoEForward trained = layer.forward(x);
    layer.save(dir + "/moe");
    // One rank holding every expert.
    ThreadsWorld solo_world(1);
    MoELayer solo(on_host(c), solo_world.communicator(0));
    solo.load(dir + "/moe");
    MoEForward sf = solo.forward(all.x);
    expect_close("rank " + std::to_string(me) + " W=1 reload output", trained.output.data_as<float>(),
                 sf.output.data_as<float>() + all.first_mine * 12, trained.output.numel(), 1e-5);
    // `switchyard ckpt reshard` to one rank's layout loads to the same weights.
    if (me == 0) {
      const ReshardReport rep = reshard_checkpoint(dir + "/moe", dir + "/one", 1);
      EXPECT_EQ(rep.experts, E);
      EXPECT_EQ(rep.source_ranks, n);
      EXPECT_EQ(Checkpoint::open(dir + "/one").world_size(), 1);
      MoELayer resharded(c, solo_world.communicator(0));
      resharded.load(dir + "/one");
      MoEForward rf = resharded.forward(all.x);
      expect_close("resharded reload output", rf.output.data_as<float>(), sf.output.data_as<float>(),
                   rf.output.numel(), 0.0);
    }
    // Half the ranks (thread-ranks of rank 0's process), when the world is even.
    if (me == 0 && n % 2 == 0 && n > 2) {
      std::vector<float> half_out;
      run_thread_ranks(n / 2, [&](Communicator& half) {
        std::shared_ptr<Communicator> g(&half, [](Communicator*) {});
        MoELayer l(c, g);
        l.load(dir + "/moe");
        // rank h of the half world takes the tokens of ranks 2h and 2h+1
        const int h = half.rank();
        int64_t first = 0;
        for (int r = 0; r < 2 * h; ++r) first += rows_of(r);
        const int64_t rows = rows_of(2 * h) + rows_of(2 * h + 1);
        Tensor xh = Tensor::empty({rows, 12}, DType::f32);
        std::memcpy(xh.data(), all.x.data_as<float>() + first * 12, xh.nbytes());
        MoEForward hf = l.forward(xh);
        expect_close("half-world rank " + std::to_string(h) + " reload output", hf.output.data_as<float>(),
                     sf.output.data_as<float>() + first * 12, hf.output.numel(), 1e-5);
      });
    }
    comm.barrier().wait();
    if (me == 0) std::filesystem::remove_all(dir);
  });
}

// On an emulated cluster (timing only: GEMMs and bulky payloads skipped, so
// the shapes can be those where the choice matters), a planner seeded with a
// wrong calibration (GEMMs 100x too fast, links 3x too slow: it sees nothing
// to overlap) corrects itself from what the batches measure: from the third
// batch on, its plan is within 6% of the emulator's cheapest fixed plan.
TEST(MoEPlans, PlannerWithAWrongCalibrationReachesTheCheapestPlan) {
  testing::for_each_rank([&](Communicator& comm, uint64_t seed) {
    const int n = comm.size(), me = comm.rank();
    LinkModel link;
    link.intra = {3e-6, 3.6e11};
    link.inter = {6e-6, 4.5e10};
    const bool two_nodes = n >= 4 && n % 2 == 0;
    link.ranks_per_node = two_nodes ? n / 2 : n;
    DeviceModel device;
    device.gemm_flops_f32 = 1.5e14, device.gemm_flops_bf16 = 3.5e14, device.memory_bandwidth = 2.7e12;
    std::shared_ptr<Communicator> world(&comm, [](Communicator*) {});
    auto group = make_emulated_communicator(world, link, /*timing_only=*/true);
    MoEConfig c;
    c.model_dim = 512, c.hidden_dim = 1024;
    c.router.experts = n % 2 == 0 ? n / 2 : n, c.router.k = std::min(2, c.router.experts);
    c.router.capacity_factor = 1.0;
    c.node_size = two_nodes ? n / 2 : 0;
    c.device_model = std::make_shared<DeviceModel>(device);
    c.skip_compute = true;
    c.check_plan = true;
    MoELayer layer(c, group);
    layer.init_parameters(seed);
    const int64_t T = 1024;
    Tensor x = random_tensor(seed + me, T, 512), dout = random_tensor(seed + 50 + me, T, 512);
    auto step = [&](const ExecPlan& plan) { return virtual_step(comm, *group, layer, x, dout, plan); };
    DeviceModel wrong_device = device;
    wrong_device.gemm_flops_f32 /= 10, wrong_device.gemm_flops_bf16 /= 10;
    LinkModel wrong_link = link;
    wrong_link.intra.bandwidth *= 30, wrong_link.inter.bandwidth *= 30;
    wrong_link.intra.latency /= 30, wrong_link.inter.latency /= 30;
    PlannerOptions po;
    po.input_grad = true;  // backward(dout) returns dx
    MoEPlanner planner(layer, wrong_device, wrong_link, po);
    std::map<uint64_t, double> fixed;  // plan hash -> virtual step time
    double best = 1e30;
    for (const ExecPlan& p : planner.candidates()) {
      const double t = step(p);  // virtual time needs no warm-up
      fixed[p.hash()] = t;
      best = std::min(best, t);
    }
    ExecPlan chosen;
    double worst_settled = 0;
    for (int batch = 0; batch < 6; ++batch) {
      layer.forward(x, layer.routing_choice(), planner);
      layer.backward(dout);
      chosen = layer.last_plan().exec;
      if (std::getenv("SY_DEBUG_PLANNER") && me == 0)
        std::printf("batch %d: %s (fixed %.2f us, best %.2f us) %s\n", batch, chosen.describe().c_str(),
                    fixed.at(chosen.hash()) * 1e6, best * 1e6, planner.explanation().c_str());
      if (batch >= 2) worst_settled = std::max(worst_settled, fixed.at(chosen.hash()));
    }
    if (std::getenv("SY_DEBUG_PLANNER") && me == 0)
      for (const ExecPlan& p : planner.candidates())
        std::printf("  %-36s emulated %8.2f us  predicted %8.2f us  %s\n", p.describe().c_str(),
                    fixed.at(p.hash()) * 1e6, planner.predict(p, T, layer.last_plan().capacity).total * 1e6,
                    planner.predict(p, T, layer.last_plan().capacity).describe().c_str());
    if (worst_settled > 1.06 * best)  // the switch margin (3%) plus model error
      SY_THROW(Error, "rank ", me, ": planner settled on (", chosen.describe(), ") at ", worst_settled * 1e6,
               " us virtual, the cheapest fixed plan takes ", best * 1e6, " us; ", planner.explanation());
  });
}

// Timing only is the same run without the bulk work: on every plan (whole
// and sliced experts, 2DH, pipelined, gathered r = 0), a timing-only layer's
// forward and backward take the virtual time of a computing one.
TEST(MoEPlans, TimingOnlyChargesWhatComputingChargesOnEveryPlan) {
  testing::for_each_rank([&](Communicator& comm, uint64_t seed) {
    const int n = comm.size(), me = comm.rank();
    if (n < 2) return;
    LinkModel link;
    link.intra = {3e-6, 2e11};
    link.inter = {7e-6, 3e10};
    link.ranks_per_node = n % 2 == 0 && n > 2 ? 2 : n;
    DeviceModel device;
    device.gemm_flops_f32 = 2e14, device.gemm_flops_bf16 = 4e14, device.memory_bandwidth = 2e12;
    std::shared_ptr<Communicator> world(&comm, [](Communicator*) {});
    auto group = make_emulated_communicator(world, link);
    for (int E : {n, std::max(1, n / 2)}) {
      if (E != n && n % E != 0) continue;
      MoEConfig c;
      c.model_dim = 24, c.hidden_dim = 24;
      c.activation = kernels::Activation::swiglu;
      c.router.experts = E, c.router.k = std::min(2, E), c.router.capacity_factor = 1.0;
      c.node_size = link.ranks_per_node < n ? link.ranks_per_node : 0;
      c.device_model = std::make_shared<DeviceModel>(device);
      MoELayer computing(c, group);
      c.skip_compute = true;
      MoELayer timing(c, group);
      computing.init_parameters(seed);
      timing.init_parameters(seed);
      Tensor x = random_tensor(seed + me, 17 + 3 * me, 24), dout = random_tensor(seed + 9 + me, 17 + 3 * me, 24);
      for (const ExecPlan& plan : every_plan(computing, c.node_size > 0)) {
        const double a = virtual_step(comm, *group, computing, x, dout, plan);
        const double b = virtual_step(comm, *group, timing, x, dout, plan);
        if (std::fabs(a - b) > 1e-9 * a)
          SY_THROW(Error, "rank ", me, " E = ", E, " (", plan.describe(), "): timing only took ", b * 1e6,
                   " us virtual, computing ", a * 1e6, " us");
      }
    }
  });
}

// Skewed traffic: every token's two experts live on its own rank and its
// node's other rank, so dropless traffic never leaves the node while padded
// blocks still cross it. The planner prices the batch's per-peer rows and
// picks what the emulated cluster finds cheapest; priced as uniform traffic
// (next(), no routing) it would pick a plan measurably slower, so the skew
// is what the test checks.
TEST(MoEPlans, PlannerUnderSkewedTrafficPicksTheEmulatorsCheapestPlan) {
  testing::for_each_rank([&](Communicator& comm, uint64_t seed) {
    const int n = comm.size(), me = comm.rank();
    if (n != 4) return;  // two emulated nodes of two ranks
    LinkModel link;
    link.intra = {2e-6, 3e11};
    link.inter = {8e-6, 1.2e10};
    link.ranks_per_node = 2;
    DeviceModel device;
    device.gemm_flops_f32 = 4e14, device.gemm_flops_bf16 = 8e14, device.memory_bandwidth = 3e12;
    std::shared_ptr<Communicator> world(&comm, [](Communicator*) {});
    auto group = make_emulated_communicator(world, link, /*timing_only=*/true);
    MoEConfig c;
    c.model_dim = 512, c.hidden_dim = 512;
    c.router.experts = 4, c.router.k = 2, c.router.capacity_factor = 1.0;
    c.node_size = 2;
    c.device_model = std::make_shared<DeviceModel>(device);
    c.skip_compute = true;
    c.check_plan = true;
    MoELayer layer(c, group);
    layer.init_parameters(seed);
    // Logit e is feature e: tokens here favour expert `me`, then its node partner.
    Tensor& gate = layer.gate_weight();
    std::memset(gate.data(), 0, gate.nbytes());
    for (int e = 0; e < 4; ++e) gate.data_as<float>()[e * 4 + e] = 1.f;
    const int64_t T = 2048;
    Tensor x = random_tensor(seed + me, T, 512), dout = random_tensor(seed + 50 + me, T, 512);
    for (int64_t t = 0; t < T; ++t) {
      x.data_as<float>()[t * 512 + me] = 4.f;
      x.data_as<float>()[t * 512 + (me ^ 1)] = 3.f;
    }
    auto step = [&](const ExecPlan& plan) { return virtual_step(comm, *group, layer, x, dout, plan); };
    auto [dev, lk] = MoEPlanner::calibrate(layer, 2);
    MoEPlanner planner(layer, dev, lk);
    std::map<uint64_t, double> fixed;
    double best = 1e30;
    ExecPlan best_plan;
    for (const ExecPlan& p : planner.candidates()) {
      fixed[p.hash()] = step(p);
      if (fixed[p.hash()] < best) best = fixed[p.hash()], best_plan = p;
    }
    ExecPlan chosen;
    for (int batch = 0; batch < 4; ++batch) {
      layer.forward(x, layer.routing_choice(), planner);
      layer.backward(dout);
      chosen = layer.last_plan().exec;
    }
    const double got = fixed.at(chosen.hash());
    if (got > 1.05 * best)
      SY_THROW(Error, "rank ", me, ": under skewed traffic the planner chose (", chosen.describe(), ") at ", got * 1e6,
               " us virtual; the cheapest plan (", best_plan.describe(), ") takes ", best * 1e6, " us; ",
               planner.explanation());
    MoEPlanner uniform(layer, dev, lk);
    const ExecPlan blind = uniform.next(layer, T);
    if (fixed.at(blind.hash()) < 1.15 * best)
      SY_THROW(Error, "rank ", me, ": the scenario does not test the skew: uniform pricing picks (", blind.describe(),
               ") at ", fixed.at(blind.hash()) * 1e6, " us against the best ", best * 1e6, " us");
  });
}

// Ranks measure different wall times and hold different token counts, yet
// every batch's plan is the same on all of them (check_plan all-reduces its hash).
TEST(MoEPlans, RanksWithDifferentTimingsAgreeOnThePlan) {
  testing::for_each_rank([&](Communicator& comm, uint64_t seed) {
    const int n = comm.size(), me = comm.rank();
    std::shared_ptr<Communicator> group(&comm, [](Communicator*) {});
    MoEConfig c;
    c.model_dim = 32, c.hidden_dim = 64;
    c.router.experts = n % 2 == 0 ? n / 2 : n, c.router.k = std::min(2, c.router.experts);
    c.router.capacity_factor = 0.0;
    c.check_plan = true;
    MoELayer layer(c, group);
    layer.init_parameters(seed);
    auto [device, link] = MoEPlanner::calibrate(layer, n);
    MoEPlanner planner(layer, device, link);
    for (int batch = 0; batch < 7; ++batch) {
      const int64_t rows = 8 + 13 * ((me + batch) % 3);  // differs by rank and batch
      Tensor x = random_tensor(seed + 10 * batch + me, rows, 32);
      // Mix the two ways of asking: a separate agreement, and inside forward;
      // two separate ones in a row too (a dropless batch's capacity is rank-local).
      MoEForward f = batch % 3 ? layer.forward(x, layer.routing_choice(), planner.next(layer, rows))
                               : layer.forward(x, layer.routing_choice(), planner);  // throws if plans differ
      layer.backward(f.output);
      // A rank that is slower on purpose makes the group's measurements differ.
      if (me == 0) std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
  });
}

}  // namespace
}  // namespace switchyard
