// The MoE layer over the rank harness's backend (thread-ranks or mpirun):
// expert-parallel forward and backward equal one rank holding every expert on
// all ranks' tokens, in both exchange modes.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <functional>
#include <set>

#include "comm/backends/emulated/emulated_backend.h"
#include "comm/backends/threads/threads_backend.h"
#include "comm/virtual_time.h"
#include "moe/eplb.h"
#include "moe/moe_layer.h"
#include "tests/common/rank_harness.h"

namespace switchyard {
namespace {

// The single-rank reference runs on the host ops whatever SWITCHYARD_MOE_OPS
// says, so the suite's emulated-ops run compares the decorator against the host.
MoEConfig on_host(MoEConfig c) {
  c.ops = std::make_shared<CpuOps>();
  return c;
}

Tensor tokens(uint64_t seed, int64_t rows, int64_t width) { return testing::random_tensor(seed, rows, width); }

void expect_close(const char* what, const float* got, const float* want, int64_t n, int rank) {
  for (int64_t i = 0; i < n; ++i)
    if (std::fabs(got[i] - want[i]) > 1e-4 * (1 + std::fabs(want[i])))
      SY_THROW(Error, "rank ", rank, ": ", what, "[", i, "] = ", got[i], ", one rank gives ", want[i]);
}

// The gate's gradient and every stored slot's expert gradients against one
// rank holding every expert (slot s of this rank is logical expert e there).
void expect_grads_like_whole(MoELayer& layer, MoELayer& whole, int me) {
  expect_close("gate grad", layer.gate_grad().data_as<float>(), whole.gate_grad().data_as<float>(),
               whole.gate_grad().numel(), me);
  ExpertParams& g = layer.expert_grads();
  ExpertParams& w = whole.expert_grads();
  const std::pair<const char*, std::pair<Tensor*, Tensor*>> parts[] = {
      {"w1 grad", {&g.w1, &w.w1}}, {"b1 grad", {&g.b1, &w.b1}}, {"w2 grad", {&g.w2, &w.w2}}, {"b2 grad", {&g.b2, &w.b2}}};
  for (int slot = 0; slot < layer.layout().slots(me); ++slot) {
    const int e = layer.layout().expert_at(me, slot);
    if (e < 0) continue;
    for (const auto& [name, t] : parts) {
      const int64_t per = t.second->numel() / t.second->shape()[0];
      expect_close(name, t.first->data_as<float>() + slot * per, t.second->data_as<float>() + e * per, per, me);
    }
  }
}

// All ranks' rows of a per-rank tensor family, in rank order.
Tensor all_rows(int n, const std::function<Tensor(int)>& of_rank, int64_t width, int64_t& mine, int me) {
  int64_t total = 0;
  for (int r = 0; r < n; ++r) total += of_rank(r).shape()[0];
  Tensor all = Tensor::empty({total, width}, DType::f32);
  int64_t at = 0;
  for (int r = 0; r < n; ++r) {
    Tensor t = of_rank(r);
    if (r == me) mine = at;
    if (t.nbytes()) std::memcpy(all.data_as<float>() + at * width, t.data(), t.nbytes());
    at += t.shape()[0];
  }
  return all;
}

// The same batches through one rank holding every expert (`whole_config` with
// the default placement and a flat exchange) on all ranks' rows: this rank's
// output, dx and every gradient must match it.
void expect_like_whole(MoELayer& layer, const MoEForward& f, const Tensor& dx, MoEConfig whole_config, uint64_t seed,
                       const std::function<Tensor(int)>& x_of, const std::function<Tensor(int)>& d_of, int n, int me) {
  whole_config.placement.reset();
  whole_config.replica_domain = 0;
  whole_config.eplb_hierarchical = false;
  whole_config.replica_choice = MoEConfig::ReplicaChoice::in_turn;
  whole_config.node_size = 0;
  whole_config.plan.a2a = A2AAlgorithm::flat;
  const int64_t M = whole_config.model_dim;
  int64_t mine = 0;
  Tensor all_x = all_rows(n, x_of, M, mine, me), all_d = all_rows(n, d_of, M, mine, me);
  ThreadsWorld solo_world(1);
  MoELayer whole(on_host(whole_config), solo_world.communicator(0));
  whole.init_parameters(seed);
  MoEForward wf = whole.forward(all_x);
  Tensor all_dx = whole.backward(all_d);
  expect_close("output", f.output.data_as<float>(), wf.output.data_as<float>() + mine * M, f.output.numel(), me);
  expect_close("dx", dx.data_as<float>(), all_dx.data_as<float>() + mine * M, dx.numel(), me);
  expect_grads_like_whole(layer, whole, me);
}

TEST(MoEMultiRank, ExpertParallelEqualsOneRankForwardAndBackward) {
  for (ExchangeMode mode : {ExchangeMode::padded, ExchangeMode::dropless}) {
    testing::for_each_rank([&](Communicator& comm, uint64_t seed) {
      const int n = comm.size(), me = comm.rank();
      MoEConfig c;
      c.model_dim = 12, c.hidden_dim = 20;
      c.activation = kernels::Activation::swiglu;
      c.plan.exchange = mode;
      c.router.experts = 2 * n, c.router.k = std::min(2, 2 * n), c.router.capacity_factor = 0.0;
      auto rows_of = [&](int r) -> int64_t { return r == n - 1 && n > 1 ? 0 : 3 + 4 * r; };
      std::shared_ptr<Communicator> group(&comm, [](Communicator*) {});
      MoELayer layer(c, group);
      layer.init_parameters(seed);
      Tensor x = tokens(seed + 100 + me, rows_of(me), 12), dout = tokens(seed + 200 + me, rows_of(me), 12);
      MoEForward f = layer.forward(x);
      Tensor dx = layer.backward(dout);
      expect_like_whole(layer, f, dx, c, seed, [&](int r) { return tokens(seed + 100 + r, rows_of(r), 12); },
                        [&](int r) { return tokens(seed + 200 + r, rows_of(r), 12); }, n, me);
    });
  }
}

// bf16 compute keeps bf16 copies of the stored weights while they are
// unchanged (one conversion for any number of inference batches) and makes
// them again after a backward, a mutable params() or parameters_changed():
// the output always follows the weights (against a fresh layer given the
// same weights).
TEST(MoEMultiRank, Bf16WeightCopiesFollowTheWeights) {
  testing::for_each_rank([&](Communicator& comm, uint64_t seed) {
    const int n = comm.size(), me = comm.rank();
    MoEConfig c;
    c.model_dim = 16, c.hidden_dim = 24;
    c.compute = DType::bf16;
    c.plan.exchange = ExchangeMode::dropless;
    c.router.experts = 2 * n, c.router.k = std::min(2, 2 * n), c.router.capacity_factor = 0.0;
    std::shared_ptr<Communicator> group(&comm, [](Communicator*) {});
    MoELayer layer(c, group), fresh(c, group);
    layer.init_parameters(seed);
    fresh.init_parameters(seed);
    const Tensor x = tokens(seed + 100 + me, 7 + me, 16), dout = tokens(seed + 200 + me, 7 + me, 16);
    auto same = [](const Tensor& a, const Tensor& b) { return std::memcmp(a.data(), b.data(), a.nbytes()) == 0; };
    auto scale = [](Tensor& t, float f) {
      for (int64_t i = 0; i < t.numel(); ++i) t.data_as<float>()[i] *= f;
    };
    const Tensor first = layer.forward(x).output.clone();
    const int64_t made = layer.bf16_weight_conversions();
    EXPECT_EQ(made, 1);
    for (int i = 0; i < 3; ++i) EXPECT_TRUE(same(layer.forward(x).output, first));
    EXPECT_EQ(layer.bf16_weight_conversions(), made) << "inference made the copies again";
    ExpertParams& kept = layer.params();  // mutable: marks the weights changed
    scale(kept.w1, 0.5f);
    scale(fresh.params().w1, 0.5f);
    const Tensor halved = layer.forward(x).output.clone();
    EXPECT_EQ(layer.bf16_weight_conversions(), made + 1);
    EXPECT_TRUE(same(halved, fresh.forward(x).output));
    EXPECT_FALSE(same(halved, first));
    // An optimizer's write through a reference taken before, after a backward.
    layer.backward(dout);
    scale(kept.w2, 2.0f);
    scale(fresh.params().w2, 2.0f);
    EXPECT_TRUE(same(layer.forward(x).output, fresh.forward(x).output));
    // A write announced by parameters_changed().
    scale(kept.w1, 3.0f);
    layer.parameters_changed();
    scale(fresh.params().w1, 3.0f);
    EXPECT_TRUE(same(layer.forward(x).output, fresh.forward(x).output));
    EXPECT_GT(layer.phase_times().convert, 0.0);
  });
}

// A replayed routing (MoELayer::replay_routing: a recorded trace at any
// shape) is taken instead of the gate's once: the gate's own choices replayed
// give every output bit again; other choices give what a float64 reference of
// those choices gives; bad replays are refused naming the problem.
TEST(MoEMultiRank, ReplayedRoutingIsUsedOnceAndExactly) {
  testing::for_each_rank([&](Communicator& comm, uint64_t seed) {
    const int n = comm.size(), me = comm.rank();
    MoEConfig c;
    c.model_dim = 8, c.hidden_dim = 6;
    c.plan.exchange = ExchangeMode::dropless;
    c.router.experts = 2 * n, c.router.k = std::min(2, 2 * n), c.router.capacity_factor = 0.0;
    const int E = c.router.experts, k = c.router.k;
    std::shared_ptr<Communicator> group(&comm, [](Communicator*) {});
    MoELayer layer(c, group);
    layer.init_parameters(seed);
    const int64_t T = 5 + me;
    Tensor x = tokens(seed + 100 + me, T, 8);
    const Tensor gate_out = layer.forward(x).output.clone();
    const Tensor experts = layer.last_routing().experts.clone(), weights = layer.last_routing().weights.clone();
    layer.replay_routing(experts.clone(), weights.clone());
    EXPECT_EQ(0, std::memcmp(layer.forward(x).output.data(), gate_out.data(), gate_out.nbytes()));
    // Other choices: every token to experts (t, t + 1) mod E with weights 0.75, 0.25.
    Tensor other = Tensor::empty({T, k}, DType::i32), w = Tensor::empty({T, k}, DType::f32);
    for (int64_t t = 0; t < T; ++t)
      for (int j = 0; j < k; ++j)
        other.data_as<int32_t>()[t * k + j] = static_cast<int32_t>((t + j) % E), w.data_as<float>()[t * k + j] = j ? 0.25f : 0.75f;
    layer.replay_routing(other, w);
    const Tensor replayed = layer.forward(x).output.clone();
    EXPECT_THROW(layer.backward(x), InvalidArgument);  // no gate logits to train
    // float64 reference: out[t] = sum_j w_j * (relu(x W1_e + b1) W2_e + b2), e's weights gathered from every rank.
    const int64_t M = 8, H = 6;
    auto all_of = [&](const Tensor& mine_t, int64_t per) {  // every rank's slots, in rank order (E / W each)
      Tensor all = Tensor::empty({E, per}, DType::f32);
      comm.allgather(mine_t, all).wait();
      return all;
    };
    const Tensor w1 = all_of(layer.params().w1, M * H), b1 = all_of(layer.params().b1, H);
    const Tensor w2 = all_of(layer.params().w2, H * M), b2 = all_of(layer.params().b2, M);
    double worst = 0;
    for (int64_t t = 0; t < T; ++t)
      for (int64_t col = 0; col < M; ++col) {
        double want = 0;
        for (int j = 0; j < k; ++j) {
          const int e = (static_cast<int>(t) + j) % E;
          double y = b2.data_as<float>()[e * M + col];
          for (int64_t h = 0; h < H; ++h) {
            double a = b1.data_as<float>()[e * H + h];
            for (int64_t i = 0; i < M; ++i) a += static_cast<double>(x.data_as<float>()[t * M + i]) * w1.data_as<float>()[e * M * H + i * H + h];
            const double g = std::max(a, 0.0);  // relu, the layer's default
            y += g * w2.data_as<float>()[e * H * M + h * M + col];
          }
          want += (j ? 0.25 : 0.75) * y;
        }
        worst = std::max(worst, std::fabs(want - replayed.data_as<float>()[t * M + col]) / (1.0 + std::fabs(want)));
      }
    EXPECT_LT(worst, 1e-4) << "replayed choices against float64";
    // Used once: the next forward routes by the gate again.
    EXPECT_EQ(0, std::memcmp(layer.forward(x).output.data(), gate_out.data(), gate_out.nbytes()));
    // Refused: a wrong token count, an expert out of range, a repeated expert (alone on every rank: no collective yet).
    layer.replay_routing(Tensor::zeros({T + 1, k}, DType::i32), Tensor::zeros({T + 1, k}, DType::f32));
    EXPECT_THROW(layer.forward(x), InvalidArgument);
    Tensor bad = experts.clone();
    bad.data_as<int32_t>()[0] = E;
    EXPECT_THROW(replayed_routing(c.router, bad, weights), InvalidArgument);
    if (k == 2) {
      bad = experts.clone();
      bad.data_as<int32_t>()[1] = bad.data_as<int32_t>()[0];
      EXPECT_THROW(replayed_routing(c.router, bad, weights), InvalidArgument);
    }
  });
}

// With capacity, every source rank gets C slots per expert (Tutel's rule), and
// C is the group's: with equal token counts each rank's output equals its
// tokens through one rank holding every expert. In bf16 as well.
TEST(MoEMultiRank, CapacityAndBf16AgreeWithOneRankPerSource) {
  for (DType compute : {DType::f32, DType::bf16})
    for (ExchangeMode mode : {ExchangeMode::padded, ExchangeMode::dropless}) {
      testing::for_each_rank([&](Communicator& comm, uint64_t seed) {
        const int n = comm.size(), me = comm.rank();
        MoEConfig c;
        c.model_dim = 32, c.hidden_dim = 24, c.plan.exchange = mode, c.compute = compute;
        c.router.experts = 2 * n, c.router.k = std::min(2, 2 * n), c.router.capacity_factor = 0.6;
        std::shared_ptr<Communicator> group(&comm, [](Communicator*) {});
        MoELayer layer(c, group);
        layer.init_parameters(seed);
        Tensor x = tokens(seed + 300 + me, 40, 32), dout = tokens(seed + 400 + me, 40, 32);
        MoEForward f = layer.forward(x);
        Tensor dx = layer.backward(dout);
        ThreadsWorld solo_world(1);
        MoELayer whole(on_host(c), solo_world.communicator(0));
        whole.init_parameters(seed);
        MoEForward wf = whole.forward(x);
        Tensor wdx = whole.backward(dout);
        EXPECT_EQ(f.dropped, wf.dropped);
        const double tol = compute == DType::bf16 ? 1e-3 : 1e-5;
        for (int64_t i = 0; i < x.numel(); ++i) {
          const float a = f.output.data_as<float>()[i], b = wf.output.data_as<float>()[i];
          const float da = dx.data_as<float>()[i], db = wdx.data_as<float>()[i];
          if (std::fabs(a - b) > tol * (1 + std::fabs(b)) || std::fabs(da - db) > tol * (1 + std::fabs(db)))
            SY_THROW(Error, "rank ", me, " ", dtype_name(compute), " mode ", int(mode), ": element ", i, " output ", a,
                     " vs ", b, ", dx ", da, " vs ", db);
        }
      });
    }
}

// Three batches in flight, their phases interleaved (the same order on every
// rank), equal the same batches run one after another: outputs and input
// gradients bit for bit, parameter gradients to rounding. Plans differ per
// batch, including r = 0 (weights gathered per batch) and padded.
TEST(MoEMultiRank, InterleavedHandlesEqualSequentialBatches) {
  testing::for_each_rank([&](Communicator& comm, uint64_t seed) {
    const int n = comm.size(), me = comm.rank();
    MoEConfig c;
    c.model_dim = 12, c.hidden_dim = 20;
    c.activation = kernels::Activation::gelu;
    c.router.experts = 2 * n, c.router.k = std::min(2, 2 * n), c.router.capacity_factor = 0.8;
    c.check_plan = true;
    std::shared_ptr<Communicator> group(&comm, [](Communicator*) {});
    const ExecPlan plans[3] = {{.r = 1, .d = 2, .exchange = ExchangeMode::dropless},
                               {.r = 0, .d = 1, .exchange = ExchangeMode::padded},
                               {.r = 1, .d = 1, .exchange = ExchangeMode::padded}};
    std::vector<Tensor> xs, douts;
    for (int i = 0; i < 3; ++i) {
      const int64_t rows = i == 1 && me == n - 1 ? 0 : 5 + 3 * i + me;  // one rank with no tokens
      xs.push_back(tokens(seed + 500 + 10 * i + me, rows, 12));
      douts.push_back(tokens(seed + 600 + 10 * i + me, rows, 12));
    }
    MoELayer one(c, group), many(c, group);
    one.init_parameters(seed);
    many.init_parameters(seed);
    std::vector<Tensor> want_y, want_dx;
    for (int i = 0; i < 3; ++i) {
      want_y.push_back(one.forward(xs[i], one.routing_choice(), plans[i]).output.clone());
      want_dx.push_back(one.backward(douts[i]).clone());
    }
    MoEHandle h[3];
    h[0] = many.plan(xs[0], many.routing_choice(), plans[0]);
    many.dispatch(*h[0]);
    h[1] = many.plan(xs[1], many.routing_choice(), plans[1]);
    many.experts(*h[0], 0);
    many.dispatch(*h[1]);
    h[2] = many.plan(xs[2], many.routing_choice(), plans[2]);
    many.experts(*h[1], 0);
    many.dispatch(*h[2]);
    many.combine(*h[0]);
    many.forward(*h[2]);
    // finish() is local (no combine layout): ranks may take it in any order.
    if (me % 2) {
      many.finish(*h[1]);
      many.finish(*h[0]);
    } else {
      many.finish(*h[0]);
      many.finish(*h[1]);
    }
    for (int i : {1, 2, 0}) {
      Tensor dx = many.backward(*h[i], douts[i]);
      const Tensor& y = h[i]->result().output;
      if (y.nbytes() && (std::memcmp(y.data(), want_y[i].data(), y.nbytes()) ||
                         std::memcmp(dx.data(), want_dx[i].data(), dx.nbytes())))
        SY_THROW(Error, "rank ", me, ": batch ", i, " in flight differs from one after another");
    }
    expect_close("gate grad", many.gate_grad().data_as<float>(), one.gate_grad().data_as<float>(),
                 one.gate_grad().numel(), me);
    expect_close("w1 grad", many.expert_grads().w1.data_as<float>(), one.expert_grads().w1.data_as<float>(),
                 one.expert_grads().w1.numel(), me);
    expect_close("b1 grad", many.expert_grads().b1.data_as<float>(), one.expert_grads().b1.data_as<float>(),
                 one.expert_grads().b1.numel(), me);
  });
}

// A placement with everything a physical placement may have, for n ranks and
// E = 2n experts: the last rank holds no experts (n > 1), the others hold
// expert e on rank e mod (n - 1), experts 0 and 1 have a second replica on the
// next such rank (n > 2), and rank 0 has one unused slot (uneven slots).
ExpertPlacement awkward_placement(int n) {
  const int E = 2 * n, hosts = std::max(1, n - 1);
  std::vector<std::vector<int>> on_rank(static_cast<size_t>(n));
  for (int e = 0; e < E; ++e) on_rank[static_cast<size_t>(e % hosts)].push_back(e);
  if (hosts > 1)
    for (int e : {0, 1}) on_rank[static_cast<size_t>((e % hosts + 1) % hosts)].push_back(e);
  on_rank[0].push_back(-1);
  std::vector<int> slots, phy2log;
  for (const auto& r : on_rank) {
    slots.push_back(static_cast<int>(r.size()));
    phy2log.insert(phy2log.end(), r.begin(), r.end());
  }
  return ExpertPlacement(E, slots, phy2log);
}


// Replicas, a rank without experts and uneven slots: outputs and gradients
// equal one rank holding every expert (each replica's gradient is the whole
// expert's), in both exchange modes and pipelined.
// Replicas chosen in turn or nearest first (own rank, then node) alike.
TEST(MoEMultiRank, PhysicalPlacementEqualsOneRankHoldingEveryExpert) {
  using Choice = MoEConfig::ReplicaChoice;
  for (Choice choice : {Choice::in_turn, Choice::nearest})
  for (int variant = 0; variant < 3; ++variant)  // awkward placement, EPLB's, awkward over 2DH
  for (ExchangeMode mode : {ExchangeMode::padded, ExchangeMode::dropless})
    testing::for_each_rank([&](Communicator& comm, uint64_t seed) {
      const int n = comm.size(), me = comm.rank();
      const bool from_eplb = variant == 1;
      if (variant == 2 && n != 4) return;
      MoEConfig c;
      c.model_dim = 12, c.hidden_dim = 16;
      c.activation = kernels::Activation::swiglu;
      c.plan.exchange = mode;
      c.plan.d = 2;
      c.router.experts = 2 * n, c.router.k = 2, c.router.capacity_factor = 0.0;
      c.check_plan = true;
      c.replica_choice = choice;
      if (variant == 2) {  // two nodes of two ranks; padded blocks differ per rank
        c.node_size = 2;
        c.plan.a2a = A2AAlgorithm::hierarchical;
      }
      c.placement = awkward_placement(n);
      if (from_eplb) {  // EPLB on skewed loads: 3 replicas per rank's worth, possibly two of one expert on a rank
        std::vector<float> load(static_cast<size_t>(2 * n));
        for (int e = 0; e < 2 * n; ++e) load[static_cast<size_t>(e)] = 100.f / static_cast<float>(e + 1) + 0.1f * e;
        c.placement = eplb::to_placement(eplb::rebalance_experts(load, 3 * n, 1, 1, n), n);
      }
      std::shared_ptr<Communicator> group(&comm, [](Communicator*) {});
      MoELayer layer(c, group);
      layer.init_parameters(seed);
      EXPECT_EQ(layer.layout().slots(me), c.placement->slots(me));
      auto x_of = [&](int r) { return tokens(seed + 700 + r, 6 + 3 * r, 12); };
      auto d_of = [&](int r) { return tokens(seed + 800 + r, 6 + 3 * r, 12); };
      MoEForward f = layer.forward(x_of(me));
      Tensor dx = layer.backward(d_of(me));
      expect_like_whole(layer, f, dx, c, seed, x_of, d_of, n, me);
      // Only expert-parallel plans run on it, and the error says why.
      EXPECT_THROW(layer.check_plan(ExecPlan{.r = 0}), InvalidArgument);
    });
}

// bf16 and fp8 rows, f32 and bf16 results, under every plan and placement the layer runs (padded and
// dropless, d = 1 and 2, r = 0 with weights gathered, an awkward placement
// with replicas) give one rank's results with the same payloads: a row is
// rounded wherever it goes, its own rank included, and also where nothing
// moves. Backward refuses them on every rank.
TEST(MoEMultiRank, PayloadsEqualOneRankWithTheSamePayloadsForEveryPlan) {
  for (DType rows_dtype : {DType::bf16, DType::fp8_e4m3})
  for (DType results_dtype : {DType::f32, DType::bf16})
  for (int variant = 0; variant < 3; ++variant)  // identity, identity with r = 0, awkward placement
    for (ExchangeMode mode : {ExchangeMode::padded, ExchangeMode::dropless})
      for (int d : {1, 2})
        testing::for_each_rank([&](Communicator& comm, uint64_t seed) {
          const int n = comm.size(), me = comm.rank();
          MoEConfig c;
          c.model_dim = 12, c.hidden_dim = 16;
          c.activation = kernels::Activation::gelu;
          c.plan.exchange = mode;
          c.plan.d = d;
          c.plan.r = variant == 1 ? 0 : 1;
          c.router.experts = 2 * n, c.router.k = 2, c.router.capacity_factor = 0.0;
          c.dispatch_payload = rows_dtype;
          c.combine_payload = results_dtype;
          if (variant == 2) c.placement = awkward_placement(n);
          std::shared_ptr<Communicator> group(&comm, [](Communicator*) {});
          MoELayer layer(c, group);
          layer.init_parameters(seed);
          auto x_of = [&](int r) { return tokens(seed + 900 + r, 5 + 2 * r, 12); };
          const MoEForward f = layer.forward(x_of(me));
          MoEConfig whole_config = c;
          whole_config.placement.reset();
          whole_config.plan.r = 1;
          int64_t mine = 0;
          const Tensor all_x = all_rows(n, x_of, 12, mine, me);
          ThreadsWorld solo_world(1);
          MoELayer whole(on_host(whole_config), solo_world.communicator(0));
          whole.init_parameters(seed);
          const MoEForward wf = whole.forward(all_x);
          const float* got = f.output.data_as<float>();
          const float* want = wf.output.data_as<float>() + mine * 12;
          if (results_dtype == DType::f32) {
            // The rows are the same bits wherever they go, so only the GEMMs' batch differs: rounding.
            expect_close(rows_dtype == DType::bf16 ? "bf16-rows output" : "fp8-rows output", got, want,
                         f.output.numel(), me);
          } else {
            // An expert result a GEMM's batch moved across a bf16 rounding boundary differs by one bf16 step
            // (2^-8 of it): bounded by a step of the row's largest magnitude.
            for (int64_t t = 0; t < f.output.shape()[0]; ++t) {
              float row_max = 0;
              for (int64_t m = 0; m < 12; ++m) row_max = std::max(row_max, std::fabs(want[t * 12 + m]));
              for (int64_t m = 0; m < 12; ++m)
                if (std::fabs(got[t * 12 + m] - want[t * 12 + m]) > row_max / 64 + 1e-6f)
                  SY_THROW(Error, "rank ", me, ": bf16-results output[", t, ", ", m, "] = ", got[t * 12 + m],
                           ", one rank gives ", want[t * 12 + m]);
            }
          }
          EXPECT_THROW(layer.backward(tokens(seed + 1, 5 + 2 * me, 12)), NotSupported);
        });
  // Ranks whose layers carry different payloads would size their exchanges differently: with the plan check
  // on, every rank refuses the batch.
  testing::for_each_rank([&](Communicator& comm, uint64_t seed) {
    if (comm.size() < 2) return;
    MoEConfig c;
    c.model_dim = 8, c.hidden_dim = 8, c.router.experts = 2 * comm.size(), c.router.k = 1;
    c.plan.exchange = ExchangeMode::dropless, c.router.capacity_factor = 0.0, c.check_plan = true;
    if (comm.rank() == 0) c.dispatch_payload = DType::bf16;
    std::shared_ptr<Communicator> group(&comm, [](Communicator*) {});
    MoELayer layer(c, group);
    layer.init_parameters(seed);
    try {
      layer.forward(tokens(seed, 4, 8));
      ADD_FAILURE() << "no error";
    } catch (const InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find("payloads"), std::string::npos) << e.what();
    }
  });
}

// Capacity binds per logical expert before a replica is chosen: with capacity
// each source rank's output equals its tokens through one rank holding every
// expert, whatever the replicas.
// Timing only with replicated experts: the replica gradient sums are charged
// (as the ring all-reduce, without moving the unwritten sums) and the step
// costs what a computing one costs, up to the sums' padding to whole blocks.
TEST(MoEMultiRank, TimingOnlyReplicasChargeWhatComputingCharges) {
  testing::for_each_rank([&](Communicator& comm, uint64_t seed) {
    const int n = comm.size(), me = comm.rank();
    if (n < 2) return;
    LinkModel link;
    link.intra = {3e-6, 2e11}, link.inter = {7e-6, 3e10}, link.ranks_per_node = n;
    DeviceModel device;
    device.gemm_flops_f32 = 2e14, device.gemm_flops_bf16 = 4e14, device.memory_bandwidth = 2e12;
    std::shared_ptr<Communicator> world(&comm, [](Communicator*) {});
    auto group = make_emulated_communicator(world, link);
    MoEConfig c;
    c.model_dim = 16, c.hidden_dim = 8;
    c.router.experts = 2 * n, c.router.k = 2, c.router.capacity_factor = 1.0;
    c.placement = awkward_placement(n);
    c.device_model = std::make_shared<DeviceModel>(device);
    MoELayer computing(c, group);
    c.skip_compute = true;
    MoELayer timing(c, group);
    computing.init_parameters(seed);
    timing.init_parameters(seed);
    Tensor x = tokens(seed + 40 + me, 30, 16), dout = tokens(seed + 41 + me, 30, 16);
    auto step = [&](MoELayer& layer) {
      group->barrier().wait();
      const double start = virtual_time::now();
      layer.forward(x);
      layer.backward(dout);
      layer.sgd_step(0.1);
      return allreduce_scalar(comm, virtual_time::now() - start, ReduceOp::max);
    };
    const double a = step(computing), b = step(timing);
    EXPECT_GT(a, 0.0);
    if (std::fabs(a - b) > 1e-3 * a)
      SY_THROW(Error, "rank ", me, ": timing only took ", b * 1e6, " us virtual with replicas, computing ", a * 1e6, " us");
  });
}

TEST(MoEMultiRank, ReplicasNeverChangeWhichChoicesDrop) {
  for (auto choice : {MoEConfig::ReplicaChoice::in_turn, MoEConfig::ReplicaChoice::nearest})
  testing::for_each_rank([&](Communicator& comm, uint64_t seed) {
    const int n = comm.size(), me = comm.rank();
    MoEConfig c;
    c.model_dim = 16, c.hidden_dim = 8;
    c.router.experts = 2 * n, c.router.k = 2, c.router.capacity_factor = 0.6;
    c.placement = awkward_placement(n);
    c.replica_choice = choice;
    c.node_size = n % 2 == 0 && n > 2 ? 2 : 0;
    std::shared_ptr<Communicator> group(&comm, [](Communicator*) {});
    MoELayer layer(c, group);
    layer.init_parameters(seed);
    Tensor x = tokens(seed + 900 + me, 40, 16);
    MoEForward f = layer.forward(x);
    MoEConfig whole_config = c;
    whole_config.placement.reset();
    ThreadsWorld solo_world(1);
    MoELayer whole(on_host(whole_config), solo_world.communicator(0));
    whole.init_parameters(seed);
    MoEForward wf = whole.forward(x);
    EXPECT_EQ(f.dropped, wf.dropped);
    EXPECT_GT(wf.dropped, 0);
    expect_close("output", f.output.data_as<float>(), wf.output.data_as<float>(), f.output.numel(), me);
  });
}

// Nearest replica choice keeps a replicated expert's rows on the source's
// own rank where it holds a replica (in turn sends half of them away), with
// the same results; every replica gets its share of each source's rows.
// EPLB's placement gives replicas unequal shares (padded blocks sized by them).
TEST(MoEMultiRank, NearestReplicasKeepRowsOnTheirOwnRank) {
  for (bool from_eplb : {false, true})
  for (ExchangeMode mode : {ExchangeMode::dropless, ExchangeMode::padded})
  testing::for_each_rank([&](Communicator& comm, uint64_t seed) {
    const int n = comm.size(), me = comm.rank();
    if (n < 3) return;  // the awkward placement has replicas from 3 ranks on
    MoEConfig c;
    c.model_dim = 8, c.hidden_dim = 8;
    c.router.experts = 2 * n, c.router.k = 2, c.router.capacity_factor = from_eplb ? 0.0 : 1.5;
    c.plan.exchange = mode;
    c.placement = awkward_placement(n);
    if (from_eplb) {
      std::vector<double> load(static_cast<size_t>(2 * n));
      for (int e = 0; e < 2 * n; ++e) load[static_cast<size_t>(e)] = 100.0 / (e + 1);
      c.placement = eplb::place(load, 4 * n, n);
    }
    std::shared_ptr<Communicator> group(&comm, [](Communicator*) {});
    MoEConfig nc = c;
    nc.replica_choice = MoEConfig::ReplicaChoice::nearest;
    MoELayer in_turn(c, group), nearest(nc, group);
    in_turn.init_parameters(seed);
    nearest.init_parameters(seed);
    Tensor x = tokens(seed + 2100 + me, 64, 8);
    MoEForward a = in_turn.forward(x), b = nearest.forward(x);
    expect_close("output", b.output.data_as<float>(), a.output.data_as<float>(), a.output.numel(), me);
    double kept[2] = {static_cast<double>(in_turn.last_plan().kept_rows_to_rank[static_cast<size_t>(me)]),
                      static_cast<double>(nearest.last_plan().kept_rows_to_rank[static_cast<size_t>(me)])};
    comm.allreduce(TensorView(kept, DType::f64, {2}), TensorView(kept, DType::f64, {2})).wait();
    if (!from_eplb) {
      EXPECT_GT(kept[1], kept[0]) << "nearest kept no more rows on their own ranks than in turn";
    }
    // Dropless: each replica's rows from this rank are its share of the expert's kept rows (within one row),
    // the shares taken from ExpertPlacement::nearest_shares (in turn: equal shares).
    if (mode == ExchangeMode::dropless) {
      const ExpertPlacement& pl = *c.placement;
      for (const MoELayer* layer : {&in_turn, &nearest}) {
        const DispatchPlan& p = layer->last_plan();
        for (int u = 0; u < n; ++u)
          for (int l = 0; l < pl.slots(u); ++l) {
            const int e = pl.expert_at(u, l);
            if (e < 0) continue;
            const auto& slots = pl.replicas_of(e);
            const auto j = static_cast<size_t>(std::find(slots.begin(), slots.end(), pl.first_slot(u) + l) - slots.begin());
            const double m = static_cast<double>(p.rows_per_expert[static_cast<size_t>(e)]);
            const double share = layer == &nearest ? static_cast<double>(pl.nearest_shares(e, 0)[static_cast<size_t>(me) * slots.size() + j]) /
                                                         static_cast<double>(ExpertPlacement::kShareQuanta)
                                                   : 1.0 / static_cast<double>(slots.size());
            const auto rows = static_cast<double>(p.send_block_rows[static_cast<size_t>(u * p.slots + l)]);
            EXPECT_LT(std::fabs(rows - m * share), 1.0)
                << (layer == &nearest ? "nearest" : "in turn") << ": rank " << me << " sent " << rows << " rows of expert "
                << e << " to its replica on rank " << u << ", expected its share " << share << " of " << m;
          }
      }
    }
  });
}

// migrate() moves the stored experts and an optimizer's per-expert state:
// it equals a fresh load of the same weights, stale handles are refused, and
// momentum training continues with the losses of a run that never migrated.
// A checkpoint of a replicated placement stores each logical expert once and
// loads under any placement.
TEST(MoEMultiRank, MigrateMovesWeightsAndOptimizerState) {
  testing::for_each_rank([&](Communicator& comm, uint64_t seed) {
    const int n = comm.size(), me = comm.rank();
    MoEConfig c;
    c.model_dim = 12, c.hidden_dim = 10;
    c.activation = kernels::Activation::gelu;
    c.plan.exchange = ExchangeMode::dropless;
    c.router.experts = 2 * n, c.router.k = 2, c.router.capacity_factor = 0.0;
    std::shared_ptr<Communicator> group(&comm, [](Communicator*) {});
    MoELayer still(c, group), moving(c, group);
    still.init_parameters(seed);
    moving.init_parameters(seed);
    // Momentum SGD on the experts (v = 0.9 v + g; p -= lr v), plain SGD on the gate.
    auto momentum_state = [](MoELayer& l) {
      ExpertParams v;
      v.w1 = Tensor::zeros(l.params().w1.shape(), DType::f32);
      v.b1 = Tensor::zeros(l.params().b1.shape(), DType::f32);
      v.w2 = Tensor::zeros(l.params().w2.shape(), DType::f32);
      v.b2 = Tensor::zeros(l.params().b2.shape(), DType::f32);
      return v;
    };
    ExpertParams v_still = momentum_state(still), v_moving = momentum_state(moving);
    auto step = [&](MoELayer& l, ExpertParams& v, int i) {
      Tensor x = tokens(seed + 1000 + 10 * i + me, 11, 12), d = tokens(seed + 1100 + 10 * i + me, 11, 12);
      l.zero_grad();
      MoEForward f = l.forward(x);
      double loss = 0;
      for (int64_t j = 0; j < f.output.numel(); ++j) loss += double(f.output.data_as<float>()[j]) * d.data_as<float>()[j];
      l.backward(d);
      const std::pair<Tensor*, Tensor*> pairs[] = {{&l.params().w1, &v.w1}, {&l.params().b1, &v.b1},
                                                   {&l.params().w2, &v.w2}, {&l.params().b2, &v.b2}};
      const Tensor* grads[] = {&l.expert_grads().w1, &l.expert_grads().b1, &l.expert_grads().w2, &l.expert_grads().b2};
      for (int t = 0; t < 4; ++t)
        for (int64_t j = 0; j < pairs[t].first->numel(); ++j) {
          float& vel = pairs[t].second->data_as<float>()[j];
          vel = 0.9f * vel + grads[t]->data_as<float>()[j];
          pairs[t].first->data_as<float>()[j] -= 0.05f * vel;
        }
      for (int64_t j = 0; j < l.gate_weight().numel(); ++j)
        l.gate_weight().data_as<float>()[j] -= 0.05f * l.gate_grad().data_as<float>()[j];
      std::vector<double> sum{loss};
      comm.allreduce(TensorView(sum.data(), DType::f64, {1}), TensorView(sum.data(), DType::f64, {1})).wait();
      return sum[0];
    };
    for (int i = 0; i < 2; ++i) EXPECT_EQ(step(still, v_still, i), step(moving, v_moving, i));
    MoEHandle stale = moving.plan(tokens(seed, 4, 12), moving.routing_choice(), moving.config().plan);
    const ExpertPlacement target = awkward_placement(n);
    moving.migrate(target, {&v_moving});
    EXPECT_THROW(moving.forward(*stale), InvalidArgument);
    // A fresh layer on the target placement loading the un-migrated weights computes the same.
    const std::string prefix = (std::filesystem::temp_directory_path() /
                                ("sy_migrate_" + std::to_string(seed) + "_" + std::to_string(n) + "_" +
                                 (testing::harness_is_threads() ? "t" : "m")))
                                   .string();
    still.save(prefix);
    MoEConfig placed = c;
    placed.placement = target;
    MoELayer loaded(placed, group);
    loaded.load(prefix);
    Tensor probe = tokens(seed + 1200 + me, 9, 12);
    Tensor a = moving.forward(probe).output.clone(), b = loaded.forward(probe).output.clone();
    if (a.nbytes() && std::memcmp(a.data(), b.data(), a.nbytes()))
      SY_THROW(Error, "rank ", me, ": migrate differs from a fresh load of the same weights");
    // The replicated placement's checkpoint holds each logical expert once (a
    // duplicate would make load() refuse it) and reloads under the default.
    comm.barrier().wait();
    if (me == 0)
      for (int r = 0; r < n; ++r)
        std::filesystem::remove(prefix + ".rank" + std::to_string(r) + "-of-" + std::to_string(n) + ".safetensors");
    comm.barrier().wait();
    moving.save(prefix);
    MoELayer back(c, group);
    back.load(prefix);
    Tensor again = back.forward(probe).output;
    expect_close("reload under the default placement", again.data_as<float>(), a.data_as<float>(), a.numel(), me);
    for (int i = 2; i < 5; ++i) {
      const double want = step(still, v_still, i), got = step(moving, v_moving, i);
      if (std::fabs(got - want) > 1e-5 * (1 + std::fabs(want)))
        SY_THROW(Error, "rank ", me, ": after migrate step ", i, " loss ", got, ", unmigrated ", want);
    }
    // And back from the replicated placement to the default one.
    moving.migrate(ExpertPlacement::identity(2 * n, n), {&v_moving});
    for (int i = 5; i < 7; ++i) {
      const double want = step(still, v_still, i), got = step(moving, v_moving, i);
      if (std::fabs(got - want) > 1e-5 * (1 + std::fabs(want)))
        SY_THROW(Error, "rank ", me, ": after migrating back, step ", i, " loss ", got, ", unmigrated ", want);
    }
    // Ranks that disagree on the placement are told so, together.
    if (n > 1) {
      EXPECT_THROW(moving.migrate(me == 0 ? ExpertPlacement::identity(2 * n, n) : target, {&v_moving}),
                   InvalidArgument);
    }
    comm.barrier().wait();
    if (me == 0)
      for (int r = 0; r < n; ++r)
        std::filesystem::remove(prefix + ".rank" + std::to_string(r) + "-of-" + std::to_string(n) + ".safetensors");
  });
}

// A combine layout sends each token's result to another rank and row: here
// rank s's token t goes to rank s + 1 at row T_s - 1 - t (the last rank owns no
// tokens but still receives some). Outputs, dx and every gradient equal one
// rank holding every expert with the results (and douts) permuted alike.
TEST(MoEMultiRank, CombineLayoutReturnsResultsToAnotherRank) {
  for (int d : {1, 2})
    testing::for_each_rank([&](Communicator& comm, uint64_t seed) {
      const int n = comm.size(), me = comm.rank();
      MoEConfig c;
      c.model_dim = 10, c.hidden_dim = 12;
      c.plan.exchange = ExchangeMode::dropless;
      c.plan.d = d;
      c.router.experts = 2 * n, c.router.k = 2, c.router.capacity_factor = 0.0;
      c.check_plan = true;
      std::shared_ptr<Communicator> group(&comm, [](Communicator*) {});
      auto rows_of = [&](int r) -> int64_t { return n > 1 && r == n - 1 ? 0 : 4 + 3 * r; };
      auto x_of = [&](int r) { return tokens(seed + 1300 + r, rows_of(r), 10); };
      auto dout_at = [&](int q) { return tokens(seed + 1400 + q, rows_of((q - 1 + n) % n), 10); };  // in the layout
      MoELayer layer(c, group);
      layer.init_parameters(seed);
      const int64_t T = rows_of(me);
      CombineLayout to_next;
      for (int64_t t = 0; t < T; ++t) {
        to_next.rank.push_back((me + 1) % n);
        to_next.index.push_back(T - 1 - t);
      }
      to_next.output_rows = rows_of((me - 1 + n) % n);
      MoEHandle h = layer.plan(x_of(me), layer.routing_choice(), c.plan, &to_next);
      const MoEForward& f = layer.forward(*h);
      ASSERT_EQ(f.output.shape(), (Shape{to_next.output_rows, 10}));
      Tensor dx = layer.backward(*h, dout_at(me));
      // One rank, every token, douts moved back to the tokens they belong to.
      int64_t mine = 0;
      Tensor all_x = all_rows(n, x_of, 10, mine, me);
      auto d_of_tokens = [&](int s) {
        const int64_t Ts = rows_of(s);
        Tensor in_layout = dout_at((s + 1) % n), out = Tensor::empty({Ts, 10}, DType::f32);
        for (int64_t t = 0; t < Ts; ++t)
          std::memcpy(out.data_as<float>() + t * 10, in_layout.data_as<float>() + (Ts - 1 - t) * 10, 10 * sizeof(float));
        return out;
      };
      Tensor all_d = all_rows(n, d_of_tokens, 10, mine, me);
      ThreadsWorld solo_world(1);
      MoELayer whole(on_host(c), solo_world.communicator(0));
      whole.init_parameters(seed);
      MoEForward wf = whole.forward(all_x);
      Tensor all_dx = whole.backward(all_d);
      const int from = (me - 1 + n) % n;
      int64_t from_offset = 0;
      for (int r = 0; r < from; ++r) from_offset += rows_of(r);
      for (int64_t i = 0; i < to_next.output_rows; ++i)  // row i holds the sender's token output_rows - 1 - i
        expect_close("output", f.output.data_as<float>() + i * 10,
                     wf.output.data_as<float>() + (from_offset + to_next.output_rows - 1 - i) * 10, 10, me);
      expect_close("dx", dx.data_as<float>(), all_dx.data_as<float>() + mine * 10, dx.numel(), me);
      expect_grads_like_whole(layer, whole, me);
    });
}

// Sending a token once per destination rank changes nothing but the rows on
// the wire: outputs, dx and gradients bit for bit, pipelined, with 2DH, and
// with replicas; fewer rows leave when a token's experts share a rank.
TEST(MoEMultiRank, SendingATokenOncePerRankChangesOnlyTheRowsSent) {
  for (int variant = 0; variant < 3; ++variant)
    testing::for_each_rank([&](Communicator& comm, uint64_t seed) {
      const int n = comm.size(), me = comm.rank();
      MoEConfig c;
      c.model_dim = 8, c.hidden_dim = 12;
      c.plan.exchange = ExchangeMode::dropless;
      c.plan.d = variant == 1 ? 3 : 1;
      c.router.experts = 4 * n, c.router.k = 3, c.router.capacity_factor = variant == 2 ? 0.7 : 0.0;
      if (variant == 1 && n == 4) {
        c.node_size = 2;
        c.plan.a2a = A2AAlgorithm::hierarchical;
      }
      if (variant == 2) c.placement = awkward_placement(n), c.router.experts = 2 * n, c.router.k = 2;
      std::shared_ptr<Communicator> group(&comm, [](Communicator*) {});
      MoEConfig once_config = c;
      once_config.send_once_per_rank = true;
      MoELayer every(c, group), once(once_config, group);
      every.init_parameters(seed);
      once.init_parameters(seed);
      Tensor x = tokens(seed + 1500 + me, 13 + me, 8), dout = tokens(seed + 1600 + me, 13 + me, 8);
      MoEForward a = every.forward(x), b = once.forward(x);
      Tensor da = every.backward(dout), db = once.backward(dout);
      auto same = [&](const char* what, const Tensor& u, const Tensor& v) {
        if (u.nbytes() != v.nbytes() || (u.nbytes() && std::memcmp(u.data(), v.data(), u.nbytes())))
          SY_THROW(Error, "rank ", me, " variant ", variant, ": ", what, " differs when sent once per rank");
      };
      same("output", a.output, b.output);
      same("dx", da, db);
      same("gate grad", every.gate_grad(), once.gate_grad());
      same("w1 grad", every.expert_grads().w1, once.expert_grads().w1);
      same("b2 grad", every.expert_grads().b2, once.expert_grads().b2);
      double saved[2] = {static_cast<double>(once.last_plan().send_rows() - once.last_plan().dispatch_rows()),
                         static_cast<double>(once.last_plan().send_rows())};
      comm.allreduce(TensorView(saved, DType::f64, {2}), TensorView(saved, DType::f64, {2})).wait();
      EXPECT_EQ(every.last_plan().dispatch_rows(), every.last_plan().send_rows());
      if (n > 1) {
        EXPECT_GT(saved[0], 0) << "top-3 of " << c.router.experts << " experts never shared a rank";
      }
    });
}

// Expert data parallelism (EP x DP) as a physical placement: every expert
// group of ep ranks holds each expert once, tokens stay inside their group,
// and the replicas' gradient sum is the expert-data-parallel all-reduce.
// Outputs and gradients equal one rank holding every expert on all tokens.
TEST(MoEMultiRank, ExpertDataParallelEqualsOneRankHoldingEveryExpert) {
  for (int ep : {1, 2, 4})
    for (ExchangeMode mode : {ExchangeMode::dropless, ExchangeMode::padded})
      testing::for_each_rank([&](Communicator& comm, uint64_t seed) {
        const int n = comm.size(), me = comm.rank();
        if (n % ep != 0 || ep > n) return;
        MoEConfig c;
        c.model_dim = 8, c.hidden_dim = 10;
        c.plan.exchange = mode;
        c.router.experts = 2 * ep, c.router.k = 2, c.router.capacity_factor = 0.0;
        c.placement = ExpertPlacement::expert_data_parallel(c.router.experts, n, ep);
        c.replica_domain = ep;
        c.check_plan = true;
        std::shared_ptr<Communicator> group(&comm, [](Communicator*) {});
        MoELayer layer(c, group);
        layer.init_parameters(seed);
        auto x_of = [&](int r) { return tokens(seed + 1700 + r, 5 + 2 * r, 8); };
        auto d_of = [&](int r) { return tokens(seed + 1800 + r, 5 + 2 * r, 8); };
        comm.reset_stats();
        MoEForward f = layer.forward(x_of(me));
        Tensor dx = layer.backward(d_of(me));
        // The all-to-alls ran on the expert group alone: nothing crossed it,
        // and no message (not even an empty one) went to another group.
        EXPECT_EQ(layer.exchange_group()->size(), ep);
        EXPECT_EQ(layer.exchange_first(), me / ep * ep);
        EXPECT_EQ(layer.last_plan().exchange_ranks, ep);
        const CommStats world = comm.stats();
        if (ep < n) {
          EXPECT_EQ(world.ops.count("alltoallv") + world.ops.count("alltoall"), 0u)
              << "rank " << me << ": an exchange spanned the whole world";
        }
        // Each replica's gradient is the sum over the expert-data-parallel groups.
        expect_like_whole(layer, f, dx, c, seed, x_of, d_of, n, me);
      });
}

// migrate() re-decides the exchange: from expert data parallelism (domain
// exchange) to a placement whose domains lack experts (whole group) and back,
// the results equal one rank holding every expert each time.
TEST(MoEMultiRank, MigrateSwitchesBetweenDomainAndWholeGroupExchanges) {
  for (bool two_dh : {false, true})  // 2dh: nodes of 2 ranks, so a domain of 2 fits one node and falls back to flat
  testing::for_each_rank([&](Communicator& comm, uint64_t seed) {
    const int n = comm.size(), me = comm.rank();
    if (n < 2 || n % 2 != 0 || (two_dh && n != 4)) return;
    const int ep = n / 2, E = 2 * ep;
    MoEConfig c;
    c.model_dim = 8, c.hidden_dim = 6;
    c.router.experts = E, c.router.k = 2, c.router.capacity_factor = 0.0;
    c.plan.exchange = ExchangeMode::dropless;
    const ExpertPlacement edp = ExpertPlacement::expert_data_parallel(E, n, ep);
    std::vector<double> load(static_cast<size_t>(E));
    for (int e = 0; e < E; ++e) load[static_cast<size_t>(e)] = 10.0 / (e + 1);
    const ExpertPlacement skewed = eplb::place(load, 2 * n, n);  // every rank 2 slots, hot experts replicated anywhere
    c.placement = two_dh ? skewed : edp;
    if (two_dh) c.node_size = 2, c.plan.a2a = A2AAlgorithm::hierarchical;
    c.replica_domain = ep;
    c.check_plan = true;
    std::shared_ptr<Communicator> group(&comm, [](Communicator*) {});
    MoELayer layer(c, group);
    layer.init_parameters(seed);
    int step = 0;
    for (const ExpertPlacement& to : two_dh ? std::vector<ExpertPlacement>{edp, skewed} : std::vector<ExpertPlacement>{skewed, edp}) {
      layer.migrate(to);
      ++step;
      bool complete = true;  // whether each domain holds every expert (the exchange then stays in it)
      for (int e = 0; e < E; ++e)
        for (int d = 0; d < n / ep; ++d) {
          bool held = false;
          for (int p : to.replicas_of(e)) held |= to.rank_of_slot(p) / ep == d;
          complete = complete && held;
        }
      if (to == edp) EXPECT_TRUE(complete);
      if (two_dh && to == skewed) EXPECT_FALSE(complete) << "the round trip needs a whole-group exchange";
      EXPECT_EQ(layer.exchange_group()->size(), complete ? ep : n) << "after migrate " << step;
      if (two_dh) {  // the domain fits one node: flat; back on the whole group: 2dh again
        EXPECT_EQ(layer.config().plan.a2a, complete ? A2AAlgorithm::flat : A2AAlgorithm::hierarchical) << step;
      }
      MoEConfig now = c;
      now.placement = to;
      auto x_of = [&](int r) { return tokens(seed + 2200 + 10 * step + r, 5 + r, 8); };
      auto d_of = [&](int r) { return tokens(seed + 2300 + 10 * step + r, 5 + r, 8); };
      MoEForward f = layer.forward(x_of(me));
      Tensor dx = layer.backward(d_of(me));
      expect_like_whole(layer, f, dx, now, seed, x_of, d_of, n, me);
    }
  });
}

// Group-limited routing with EPLB's hierarchical policy: rebalance() packs
// each expert group onto one node and makes its replicas there, so a token's
// choices (from its topk_groups best groups) reach only those groups' nodes;
// results equal one rank holding every expert.
TEST(MoEMultiRank, HierarchicalRebalanceKeepsEachExpertGroupOnOneNode) {
  testing::for_each_rank([&](Communicator& comm, uint64_t seed) {
    const int n = comm.size(), me = comm.rank();
    if (n != 4) return;
    MoEConfig c;
    c.model_dim = 8, c.hidden_dim = 6;
    c.router.experts = 8, c.router.k = 2, c.router.capacity_factor = 0.0;
    c.router.groups = 4, c.router.topk_groups = 2;
    c.node_size = 2;
    c.eplb_hierarchical = true;
    c.plan.exchange = ExchangeMode::dropless;
    std::shared_ptr<Communicator> group(&comm, [](Communicator*) {});
    MoELayer layer(c, group);
    layer.init_parameters(seed);
    std::vector<double> mine(8);
    for (int e = 0; e < 8; ++e) mine[static_cast<size_t>(e)] = (e * 7 + me) % 5 + 1;  // any loads
    const ExpertPlacement pl = layer.rebalance(mine, 12).placement;
    for (int g = 0; g < 4; ++g) {
      std::set<int> nodes;
      for (int e = 2 * g; e < 2 * g + 2; ++e)
        for (int p : pl.replicas_of(e)) nodes.insert(pl.rank_of_slot(p) / 2);
      EXPECT_EQ(nodes.size(), 1u) << "expert group " << g << " spans nodes: " << pl.describe();
    }
    MoEConfig now = c;
    now.placement = pl;
    auto x_of = [&](int r) { return tokens(seed + 2400 + r, 7 + r, 8); };
    auto d_of = [&](int r) { return tokens(seed + 2500 + r, 7 + r, 8); };
    MoEForward f = layer.forward(x_of(me));
    Tensor dx = layer.backward(d_of(me));
    expect_like_whole(layer, f, dx, now, seed, x_of, d_of, n, me);
    // Groups that do not divide over the nodes are refused, naming them.
    MoEConfig bad = c;
    bad.router.groups = 1, bad.router.topk_groups = 1;
    EXPECT_THROW(MoELayer(bad, group), InvalidArgument);
  });
}

// A replica domain that lacks an expert cannot keep its tokens: the layer
// then exchanges over the whole group, and results stay those of one rank.
TEST(MoEMultiRank, ReplicaDomainMissingAnExpertExchangesOverTheWholeGroup) {
  testing::for_each_rank([&](Communicator& comm, uint64_t seed) {
    const int n = comm.size(), me = comm.rank();
    if (n < 2 || n % 2 != 0) return;
    const int ep = n / 2, E = 2 * ep;
    MoEConfig c;
    c.model_dim = 8, c.hidden_dim = 6;
    c.router.experts = E, c.router.k = 2, c.router.capacity_factor = 0.0;
    // Expert data parallelism, except that the second group holds expert 1 twice and expert 0 not at all.
    ExpertPlacement edp = ExpertPlacement::expert_data_parallel(E, n, ep);
    std::vector<int> phy2log = edp.phy2log();
    std::replace(phy2log.begin() + E, phy2log.end(), 0, 1);
    c.placement = ExpertPlacement(E, std::vector<int>(static_cast<size_t>(n), 2), phy2log);
    c.replica_domain = ep;
    c.check_plan = true;
    std::shared_ptr<Communicator> group(&comm, [](Communicator*) {});
    MoELayer layer(c, group);
    layer.init_parameters(seed);
    EXPECT_EQ(layer.exchange_group().get(), &comm);
    EXPECT_EQ(layer.exchange_first(), 0);
    auto x_of = [&](int r) { return tokens(seed + 1900 + r, 6 + r, 8); };
    auto d_of = [&](int r) { return tokens(seed + 2000 + r, 6 + r, 8); };
    MoEForward f = layer.forward(x_of(me));
    Tensor dx = layer.backward(d_of(me));
    EXPECT_EQ(layer.last_plan().exchange_ranks, n);
    expect_like_whole(layer, f, dx, c, seed, x_of, d_of, n, me);
  });
}

}  // namespace
}  // namespace switchyard
