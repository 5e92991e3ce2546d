// The MoE layer's ops seam (moe/ops.h): the emulated decorator computes
// exactly what the host ops compute, charges each operation by the device
// model's formulas, and in timing-only mode skips bulk work (outputs left as
// they were) while still computing the gate's GEMMs; a timing-only layer
// charges what a computing layer charges.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "comm/backends/threads/threads_backend.h"
#include "comm/virtual_time.h"
#include "moe/moe_layer.h"
#include "moe/ops.h"
#include "moe/planner.h"

namespace switchyard {
namespace {

std::vector<float> random_floats(uint64_t seed, size_t n) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  std::vector<float> v(n);
  for (auto& x : v) x = u(rng);
  return v;
}

DeviceModel test_device() {
  DeviceModel d;
  d.gemm_flops_f32 = 1e12, d.gemm_flops_bf16 = 4e12, d.memory_bandwidth = 1e11;
  return d;
}

// Seconds `op` advanced this thread's virtual clock.
template <typename F>
double charged(F&& op) {
  virtual_time::reset();
  op();
  return virtual_time::now();
}

bool bits_equal(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

TEST(MoEOps, EmulatedComputesWhatTheHostComputesAndChargesTheModel) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  const DeviceModel dev = test_device();
  CpuOps host_ops;
  EmulatedOps emulated_ops(std::make_shared<CpuOps>(), std::make_shared<DeviceModel>(dev), false);
  MoEOps &host = host_ops, &emulated = emulated_ops;  // through the seam, as the layer calls them
  const int64_t m = 37, n = 29, k = 53;  // odd sizes
  const auto a = random_floats(seed, m * k), b = random_floats(seed + 1, k * n), c0 = random_floats(seed + 2, m * n);
  auto want = c0, got = c0;
  host.gemm({.m = m, .n = n, .k = k, .a = a.data(), .lda = k, .b = b.data(), .ldb = n, .beta = 1.f, .c = want.data(),
             .ldc = n});
  const double t = charged([&] {
    emulated.gemm({.m = m, .n = n, .k = k, .a = a.data(), .lda = k, .b = b.data(), .ldb = n, .beta = 1.f,
                   .c = got.data(), .ldc = n});
  });
  EXPECT_TRUE(bits_equal(got, want));
  // The roofline written out: 2mnk FLOPs against (A + B + C) * 4 bytes.
  const double flops = 2.0 * m * n * k, bytes = 4.0 * (m * k + k * n + m * n);
  EXPECT_DOUBLE_EQ(t, std::max(flops / dev.gemm_flops_f32, bytes / dev.memory_bandwidth));
  const double t_read = charged([&] {
    emulated.gemm({.m = m, .n = n, .k = k, .a = a.data(), .lda = k, .b = b.data(), .ldb = n, .c = got.data(),
                   .ldc = n}, OpData::bulk, /*weights_read=*/true);
  });
  EXPECT_DOUBLE_EQ(t_read, std::max(flops / dev.gemm_flops_f32, 4.0 * (m * k + m * n) / dev.memory_bandwidth));

  // Rows: gather, scatter, combine (with a dropped choice), row dots.
  const int64_t rows = 11, width = 13, tokens = 5;
  const int kk = 2;
  const auto src = random_floats(seed + 3, rows * width);
  std::vector<int64_t> index = {3, -1, 0, 10, 7, 7, 2, 9, 1, 4, 6};
  std::vector<float> g_host(rows * width, NAN), g_emul(rows * width, NAN);
  host.gather_rows(src.data(), index.data(), rows, width, g_host.data());
  EXPECT_DOUBLE_EQ(charged([&] { emulated.gather_rows(src.data(), index.data(), rows, width, g_emul.data()); }),
                   2.0 * rows * width * 4 / dev.memory_bandwidth);
  EXPECT_TRUE(bits_equal(g_emul, g_host));
  std::vector<int64_t> choice_row = {0, 5, -1, 2, 8, 1, 3, 4, 10, -1};  // tokens x k, two dropped
  const auto scale = random_floats(seed + 4, tokens * kk);
  std::vector<float> o_host(tokens * width, NAN), o_emul(tokens * width, NAN);
  host.combine_rows(src.data(), choice_row.data(), scale.data(), tokens, kk, width, o_host.data());
  EXPECT_DOUBLE_EQ(charged([&] {
                     emulated.combine_rows(src.data(), choice_row.data(), scale.data(), tokens, kk, width,
                                           o_emul.data());
                   }),
                   (8.0 + tokens) * width * 4 / dev.memory_bandwidth);  // 8 rows read, 5 written
  EXPECT_TRUE(bits_equal(o_emul, o_host));
  std::vector<int64_t> distinct = {4, 0, 2};
  std::vector<float> s_host(rows * width, 0.f), s_emul(rows * width, 0.f);
  host.scatter_rows(src.data(), distinct.data(), 3, width, s_host.data());
  emulated.scatter_rows(src.data(), distinct.data(), 3, width, s_emul.data());
  EXPECT_TRUE(bits_equal(s_emul, s_host));
  for (int64_t j = 0; j < width; ++j) EXPECT_EQ(s_host[4 * width + j], src[j]);  // row 0 went to row 4

  // Activations: swiglu reads two halves per output column.
  const auto pre = random_floats(seed + 5, rows * 2 * width);
  std::vector<float> y_host(rows * width), y_emul(rows * width);
  host.activation_forward(kernels::Activation::swiglu, pre.data(), rows, width, y_host.data());
  EXPECT_DOUBLE_EQ(charged([&] {
                     emulated.activation_forward(kernels::Activation::swiglu, pre.data(), rows, width, y_emul.data());
                   }),
                   3.0 * rows * width * 4 / dev.memory_bandwidth);
  EXPECT_TRUE(bits_equal(y_emul, y_host));
}

TEST(MoEOps, TimingOnlySkipsBulkWorkButNotTheGate) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  const DeviceModel dev = test_device();
  auto inner = std::make_shared<CpuOps>();
  EmulatedOps computing_ops(inner, std::make_shared<DeviceModel>(dev), false);
  EmulatedOps timing_ops(inner, std::make_shared<DeviceModel>(dev), true);
  MoEOps &computing = computing_ops, &timing = timing_ops;
  EXPECT_TRUE(computing.computes());
  EXPECT_FALSE(timing.computes());
  const int64_t m = 8, n = 6, k = 10;
  const auto a = random_floats(seed, m * k), b = random_floats(seed + 1, k * n);
  const kernels::GemmArgs args{.m = m, .n = n, .k = k, .a = a.data(), .lda = k, .b = b.data(), .ldb = n};
  std::vector<float> bulk(m * n, NAN), gate(m * n, NAN), want(m * n, NAN);
  kernels::GemmArgs into = args;
  into.c = want.data(), into.ldc = n;
  inner->gemm(into, OpData::bulk, false);
  into.c = bulk.data();
  const double t_bulk = charged([&] { timing.gemm(into, OpData::bulk, false); });
  into.c = gate.data();
  const double t_gate = charged([&] { timing.gemm(into, OpData::gate, false); });
  const double t_computing = charged([&] { computing.gemm(into, OpData::bulk, false); });
  for (float v : bulk) EXPECT_TRUE(std::isnan(v)) << "a timing-only bulk GEMM wrote its output";
  EXPECT_TRUE(bits_equal(gate, want)) << "the gate's GEMM must run when timing only (routing needs it)";
  EXPECT_DOUBLE_EQ(t_bulk, t_computing);
  EXPECT_DOUBLE_EQ(t_gate, t_computing);

  // Bulk rows stay untouched; the layer's results (combine, row dots) are zeros.
  const auto src = random_floats(seed + 2, 4 * 3);
  std::vector<int64_t> index = {1, 0, 3, 2};
  std::vector<float> gathered(12, NAN), combined(6, NAN), dots(4, NAN);
  timing.gather_rows(src.data(), index.data(), 4, 3, gathered.data());
  timing.combine_rows(src.data(), index.data(), nullptr, 2, 2, 3, combined.data());
  timing.row_dots(src.data(), index.data(), src.data(), 4, 3, dots.data());
  for (float v : gathered) EXPECT_TRUE(std::isnan(v));
  for (float v : combined) EXPECT_EQ(v, 0.f);
  for (float v : dots) EXPECT_EQ(v, 0.f);
  // Allocations stay untouched pages when timing only, are zeros otherwise.
  Tensor z = computing.allocate({5, 7}, DType::f32, true);
  for (int64_t i = 0; i < z.numel(); ++i) EXPECT_EQ(z.data_as<float>()[i], 0.f);
}

// One layer, forward and backward, on each of: the host, the emulated device
// computing, the emulated device timing only.
struct LayerRun {
  Tensor out, dx, gate_grad;
  double virtual_seconds = 0;
};

LayerRun run_layer(MoEConfig c, uint64_t seed, const Tensor& x, const Tensor& dout) {
  ThreadsWorld world(1);
  MoELayer layer(c, world.communicator(0));
  layer.init_parameters(seed);
  virtual_time::reset();
  LayerRun r;
  r.out = layer.forward(x).output;
  r.dx = layer.backward(dout);
  r.virtual_seconds = virtual_time::now();
  r.gate_grad = layer.gate_grad();
  return r;
}

TEST(MoEOps, ALayerTimingOnlyChargesWhatItChargesComputing) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  for (DType compute : {DType::f32, DType::bf16})
    for (ExchangeMode x : {ExchangeMode::padded, ExchangeMode::dropless}) {
      SCOPED_TRACE(std::string(dtype_name(compute)) + (x == ExchangeMode::padded ? " padded" : " dropless"));
      MoEConfig c;
      c.model_dim = 24, c.hidden_dim = 40;
      c.activation = kernels::Activation::swiglu;
      c.router.experts = 5, c.router.k = 2, c.router.capacity_factor = 1.0;
      c.plan.exchange = x;
      c.compute = compute;
      const int64_t T = 19;
      Tensor tokens = Tensor::empty({T, c.model_dim}, DType::f32), dout = Tensor::empty({T, c.model_dim}, DType::f32);
      Rng(seed).fill_uniform(tokens, -1, 1);
      Rng(seed + 1).fill_uniform(dout, -1, 1);
      c.ops = std::make_shared<CpuOps>();
      const LayerRun host = run_layer(c, seed, tokens, dout);
      c.ops = nullptr;
      c.device_model = std::make_shared<DeviceModel>(test_device());
      const LayerRun computing = run_layer(c, seed, tokens, dout);
      c.skip_compute = true;
      const LayerRun timing = run_layer(c, seed, tokens, dout);
      EXPECT_EQ(host.virtual_seconds, 0.0);
      EXPECT_GT(computing.virtual_seconds, 0.0);
      EXPECT_DOUBLE_EQ(timing.virtual_seconds, computing.virtual_seconds);
      ASSERT_EQ(std::memcmp(computing.out.data(), host.out.data(), host.out.nbytes()), 0);
      ASSERT_EQ(std::memcmp(computing.dx.data(), host.dx.data(), host.dx.nbytes()), 0);
      ASSERT_EQ(std::memcmp(computing.gate_grad.data(), host.gate_grad.data(), host.gate_grad.nbytes()), 0);
      for (int64_t i = 0; i < timing.out.numel(); ++i) ASSERT_EQ(timing.out.data_as<float>()[i], 0.f);
      for (int64_t i = 0; i < timing.dx.numel(); ++i) ASSERT_TRUE(std::isfinite(timing.dx.data_as<float>()[i]));
      for (int64_t i = 0; i < timing.gate_grad.numel(); ++i)
        ASSERT_TRUE(std::isfinite(timing.gate_grad.data_as<float>()[i]));
    }
}

// Timing only still trains the gate (routing evolves as in a real run): SGD
// moves the gate by its gradient while the experts stay untouched.
TEST(MoEOps, TimingOnlyStillStepsTheGate) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  MoEConfig c;
  c.model_dim = 16, c.hidden_dim = 8;
  c.router.experts = 4, c.router.k = 2, c.router.capacity_factor = 1.0;
  c.device_model = std::make_shared<DeviceModel>(test_device());
  c.skip_compute = true;
  ThreadsWorld world(1);
  MoELayer layer(c, world.communicator(0));
  layer.init_parameters(seed);
  Tensor x = Tensor::empty({13, 16}, DType::f32), dout = Tensor::empty({13, 16}, DType::f32);
  Rng(seed).fill_uniform(x, -1, 1);
  Rng(seed + 1).fill_uniform(dout, -1, 1);
  layer.forward(x);
  layer.backward(dout, /*balance_coef=*/0.1);
  const std::vector<float> before(layer.gate_weight().data_as<float>(),
                                  layer.gate_weight().data_as<float>() + layer.gate_weight().numel());
  const std::vector<float> grad(layer.gate_grad().data_as<float>(),
                                layer.gate_grad().data_as<float>() + layer.gate_grad().numel());
  layer.sgd_step(0.5);
  double moved = 0;
  for (size_t i = 0; i < before.size(); ++i) {
    ASSERT_EQ(layer.gate_weight().data_as<float>()[i], before[i] + -0.5f * grad[i]) << "gate element " << i;
    moved += std::fabs(grad[i]);
  }
  EXPECT_GT(moved, 0.0) << "the balance loss gives the gate a gradient even when timing only";
}

// The planner's inputs: packed and unpacked unchanged, and the locality
// summary (large groups) prices traffic that is uniform inside each class
// exactly as the full per-peer matrix does; skewed traffic costs more than
// uniform traffic of the same total.
TEST(MoEOps, PlannerInputsAndTheirLocalitySummary) {
  const int W = 8;
  ThreadsWorld world(W);
  MoEConfig c;
  c.model_dim = 64, c.hidden_dim = 128;
  c.router.experts = 8, c.router.k = 2, c.router.capacity_factor = 0;
  MoELayer layer(c, world.communicator(0));  // geometry only: no collective runs
  DeviceModel dev;
  LinkModel link;
  link.intra = {2e-6, 2e11}, link.inter = {8e-6, 2e10}, link.ranks_per_node = 4;
  MoECostModel model(layer, dev, link, PlannerOptions{});
  PlanInputs full;
  full.tokens = 512, full.capacity = 0;
  full.peer_rows.assign(W * W, 0.0);
  PlanInputs summary = full;
  summary.peer_rows.assign(W * 3, 0.0);
  summary.peer_rows_summarised = true;
  for (int i = 0; i < W; ++i)
    for (int j = 0; j < W; ++j) {
      const double rows = i == j ? 300 : i / 4 == j / 4 ? 100 : 40;  // to itself, inside its node, across
      full.peer_rows[static_cast<size_t>(i * W + j)] = rows;
      summary.peer_rows[static_cast<size_t>(3 * i + (i == j ? 0 : i / 4 == j / 4 ? 1 : 2))] += rows;
    }
  const ExecPlan dropless{1, 1, A2AAlgorithm::flat, ExchangeMode::dropless};
  const PlanCost pf = model.predict(dropless, full, {}), ps = model.predict(dropless, summary, {});
  EXPECT_NEAR(pf.exchange, ps.exchange, 1e-12 * pf.exchange);
  EXPECT_NEAR(pf.compute, ps.compute, 1e-12 * pf.compute);
  const double a = pf.total;  // the totals differ by the agreement's own size (W x W values or W x 3)
  EXPECT_NEAR(a, ps.total, 1e-4 * a);
  PlanInputs skewed = full;  // the same rows, all of rank 0's sent across nodes to rank 4
  for (int j = 0; j < W; ++j) skewed.peer_rows[static_cast<size_t>(j)] = 0;
  skewed.peer_rows[4] = 300 + 3 * 100 + 4 * 40;
  EXPECT_GT(model.predict(dropless, skewed, {}).total, a);
  // Round trip through the all-reduce form.
  full.measured_compute = 1.5, full.measured_links = 0.25, full.previous_capacity = 17;
  const PlanInputs::Layout l{W, W * W, false};
  const PlanInputs back = PlanInputs::unpack(full.pack(l), l);
  EXPECT_EQ(back.tokens, full.tokens);
  EXPECT_EQ(back.previous_capacity, 17);
  EXPECT_EQ(back.measured_links, 0.25);
  EXPECT_EQ(back.peer_rows, full.peer_rows);
  EXPECT_FALSE(back.peer_rows_summarised);
}

}  // namespace
}  // namespace switchyard

namespace switchyard {
namespace {

// Plans priced by their pipelining degree alone: d = 1 is 1.00 ms, d = 2 1.02 ms (within the 3% hysteresis).
class FixedCosts final : public PlanCostModel {
 public:
  PlanCost predict(const ExecPlan& plan, const PlanInputs&, const Corrections&) const override {
    PlanCost c;
    c.total = plan.d == 1 ? 1.00e-3 : 1.02e-3;
    return c;
  }
};

// A plan imposed on the planner (a probe, a control step) runs and is learned
// from, but does not become the plan the hysteresis holds on to.
TEST(Planner, AForcedPlanDoesNotBecomeTheHeldChoice) {
  PlannerOptions options;
  Planner planner(std::make_shared<FixedCosts>(), options);
  ExecPlan one, two;
  one.d = 1, two.d = 2;
  planner.add_candidates("test", {one, two});
  PlanInputs in;
  in.tokens = 8;
  EXPECT_EQ(planner.choose(in).d, 1);
  EXPECT_EQ(planner.choose(in, [&](const ExecPlan& p) { return p == two; }, true).d, 2);
  EXPECT_EQ(planner.choose(in).d, 1) << "the forced plan was kept by the hysteresis";
  EXPECT_EQ(planner.decisions_changed(), 1) << "forced decisions are not counted as changes";
  // A free choice of d = 2 (d = 1 not runnable) is held next time, though d = 1 is 2% cheaper.
  EXPECT_EQ(planner.choose(in, [&](const ExecPlan& p) { return p == two; }).d, 2);
  EXPECT_EQ(planner.choose(in).d, 2);
}

}  // namespace
}  // namespace switchyard
