// The MoE layer over the rank harness's backend (thread-ranks or mpirun):
// expert-parallel forward and backward equal one rank holding every expert on
// all ranks' tokens, in both exchange modes.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>

#include "comm/backends/threads/threads_backend.h"
#include "moe/moe_layer.h"
#include "tests/common/rank_harness.h"

namespace switchyard {
namespace {

Tensor tokens(uint64_t seed, int64_t rows, int64_t width) { return testing::random_tensor(seed, rows, width); }

void expect_close(const char* what, const float* got, const float* want, int64_t n, int rank) {
  for (int64_t i = 0; i < n; ++i)
    if (std::fabs(got[i] - want[i]) > 1e-4 * (1 + std::fabs(want[i])))
      SY_THROW(Error, "rank ", rank, ": ", what, "[", i, "] = ", got[i], ", one rank gives ", want[i]);
}

TEST(MoEMultiRank, ExpertParallelEqualsOneRankForwardAndBackward) {
  for (ExchangeMode mode : {ExchangeMode::padded, ExchangeMode::dropless}) {
    testing::for_each_rank([&](Communicator& comm, uint64_t seed) {
      const int n = comm.size(), me = comm.rank();
      MoEConfig c;
      c.model_dim = 12, c.hidden_dim = 20;
      c.activation = kernels::cpu::Activation::swiglu;
      c.plan.exchange = mode;
      c.router.experts = 2 * n, c.router.k = std::min(2, 2 * n), c.router.capacity_factor = 0.0;
      auto rows_of = [&](int r) -> int64_t { return r == n - 1 && n > 1 ? 0 : 3 + 4 * r; };
      std::shared_ptr<Communicator> group(&comm, [](Communicator*) {});
      MoELayer layer(c, group);
      layer.init_parameters(seed);
      Tensor x = tokens(seed + 100 + me, rows_of(me), 12), dout = tokens(seed + 200 + me, rows_of(me), 12);
      MoEForward f = layer.forward(x);
      Tensor dx = layer.backward(dout);

      int64_t total = 0, mine = 0;
      for (int r = 0; r < n; ++r) {
        if (r == me) mine = total;
        total += rows_of(r);
      }
      Tensor all_x = Tensor::empty({total, 12}, DType::f32), all_d = Tensor::empty({total, 12}, DType::f32);
      for (int r = 0, at = 0; r < n; at += static_cast<int>(rows_of(r)), ++r) {
        Tensor xr = tokens(seed + 100 + r, rows_of(r), 12), dr = tokens(seed + 200 + r, rows_of(r), 12);
        if (xr.nbytes()) std::memcpy(all_x.data_as<float>() + at * 12, xr.data(), xr.nbytes());
        if (dr.nbytes()) std::memcpy(all_d.data_as<float>() + at * 12, dr.data(), dr.nbytes());
      }
      ThreadsWorld solo_world(1);
      MoELayer whole(c, solo_world.communicator(0));
      whole.init_parameters(seed);
      MoEForward wf = whole.forward(all_x);
      Tensor all_dx = whole.backward(all_d);
      expect_close("output", f.output.data_as<float>(), wf.output.data_as<float>() + mine * 12, f.output.numel(), me);
      expect_close("dx", dx.data_as<float>(), all_dx.data_as<float>() + mine * 12, dx.numel(), me);
      expect_close("gate grad", layer.gate_grad().data_as<float>(), whole.gate_grad().data_as<float>(),
                   layer.gate_grad().numel(), me);
      const int64_t w1 = 12 * 40;  // M x 2H for swiglu
      for (int slot = 0; slot < layer.layout().local_experts(); ++slot) {
        const int e = layer.layout().expert_at(me, slot);
        expect_close("w1 grad", layer.expert_grads().w1.data_as<float>() + slot * w1,
                     whole.expert_grads().w1.data_as<float>() + e * w1, w1, me);
        expect_close("b2 grad", layer.expert_grads().b2.data_as<float>() + slot * 12,
                     whole.expert_grads().b2.data_as<float>() + e * 12, 12, me);
      }
    });
  }
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
        MoELayer whole(c, solo_world.communicator(0));
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
    c.activation = kernels::cpu::Activation::gelu;
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
    many.finish(*h[1]);
    many.finish(*h[0]);
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

}  // namespace
}  // namespace switchyard
