// The MoE layer's device path (moe/ops.h: ops with their own memory) on
// IsolatedOps: host kernels on memory the host cannot dereference, over a
// communicator of that memory (comm/backends/staged). Every plan, placement,
// payload and checkpoint path runs the way it runs on CudaOps (routing
// metadata moved in, small results out, collectives on device buffers, host
// values through the host-buffer view), and must give bit for bit what the
// host layer gives on the same ranks: the kernels are the same, so any
// difference is a copy the device path missed or made twice. A host access of
// device memory faults at once (a non-canonical address).
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>

#include "comm/backends/staged/staged_backend.h"
#include "moe/eplb.h"
#include "moe/moe_layer.h"
#include "moe/planner.h"
#include "tests/common/rank_harness.h"

namespace switchyard {
namespace {

using testing::random_tensor;

Tensor to_isolated(const Tensor& host) {
  Tensor t = isolated_memory()->allocate(host.shape(), host.dtype());
  isolated_memory()->from_host(t.data(), host.data(), static_cast<int64_t>(host.nbytes()));
  return t;
}

Tensor host_copy(const Tensor& t) {
  if (t.device().is_cpu()) return t;
  Tensor h = Tensor::empty(t.shape(), t.dtype());
  isolated_memory()->to_host(h.data(), t.data(), static_cast<int64_t>(t.nbytes()));
  return h;
}

// Bit-equal (the same kernels in the same order), NaN poison included.
void expect_same(const std::string& what, const Tensor& device, const Tensor& host) {
  ASSERT_EQ(device.shape(), host.shape()) << what;
  ASSERT_TRUE(device.device() == Device::isolated() || !host.device().is_cpu())
      << what << " is not in the ops' memory";
  const Tensor d = host_copy(device);
  const auto* a = d.data_as<float>();
  const auto* b = host.data_as<float>();
  for (int64_t i = 0; i < host.numel(); ++i)
    if (std::memcmp(&a[i], &b[i], sizeof(float)) != 0) {
      ADD_FAILURE() << what << "[" << i << "] = " << a[i] << " on the device path, " << b[i] << " on the host";
      return;
    }
}

void expect_same_params(const std::string& what, const ExpertParams& device, const ExpertParams& host) {
  expect_same(what + " w1", device.w1, host.w1);
  expect_same(what + " b1", device.b1, host.b1);
  expect_same(what + " w2", device.w2, host.w2);
  expect_same(what + " b2", device.b2, host.b2);
}

// A host layer and the same layer on IsolatedOps, on the same ranks.
struct Pair {
  std::shared_ptr<Communicator> host_group, device_group;
  std::unique_ptr<MoELayer> host, device;
  Pair(Communicator& comm, MoEConfig c, uint64_t seed) {
    host_group = std::shared_ptr<Communicator>(&comm, [](Communicator*) {});
    device_group = make_staged_communicator(host_group, isolated_memory());
    MoEConfig hc = c, dc = c;
    hc.ops = std::make_shared<CpuOps>();
    dc.ops = std::make_shared<IsolatedOps>();
    host = std::make_unique<MoELayer>(hc, host_group);
    device = std::make_unique<MoELayer>(dc, device_group);
    host->init_parameters(seed);
    device->init_parameters(seed);
  }
  // One forward and backward under `plan` on both; everything compared.
  void step(const std::string& where, const Tensor& x, const Tensor& dout, const ExecPlan& plan, bool backward = true) {
    host->zero_grad();
    device->zero_grad();
    const MoEForward hf = host->forward(x, host->routing_choice(), plan);
    const MoEForward df = device->forward(to_isolated(x), device->routing_choice(), plan);
    expect_same(where + " output", df.output, hf.output);
    EXPECT_EQ(df.dropped, hf.dropped) << where;
    EXPECT_EQ(df.balance_loss, hf.balance_loss) << where;
    if (!backward) return;
    const Tensor hdx = host->backward(dout, 0.01, 0.001);
    const Tensor ddx = device->backward(to_isolated(dout), 0.01, 0.001);
    expect_same(where + " dx", ddx, hdx);
    expect_same(where + " gate grad", device->gate_grad(), host->gate_grad());
    expect_same_params(where + " expert grads", device->expert_grads(), host->expert_grads());
  }
};

MoEConfig small_config(int experts, int hidden) {
  MoEConfig c;
  c.model_dim = 12, c.hidden_dim = hidden;
  c.activation = kernels::Activation::swiglu;
  c.router.experts = experts, c.router.k = std::min(2, experts), c.router.capacity_factor = 1.0;
  return c;
}

TEST(DeviceOps, EveryPlanOnIsolatedMemoryEqualsTheHostLayer) {
  testing::for_each_rank([&](Communicator& comm, uint64_t seed) {
    const int n = comm.size(), me = comm.rank();
    for (int E : {2 * n, n > 1 ? n / 2 : 1}) {
      if (n % std::max(E, 1) != 0 && E % n != 0) continue;
      const int S = E >= n ? 1 : n / E;
      for (DType compute : {DType::f32, DType::bf16}) {
        MoEConfig c = small_config(E, 4 * S);
        c.compute = compute;
        Pair pair(comm, c, seed + E);
        const int64_t T = me == n - 1 && n > 1 ? 0 : 7 + 2 * me;  // the last rank has no tokens
        const Tensor x = random_tensor(seed + 100 + me, T, c.model_dim);
        const Tensor dout = random_tensor(seed + 200 + me, T, c.model_dim);
        for (int r : valid_sharding_degrees(pair.host->layout().shards()))
          for (int d : {1, 2})
            for (ExchangeMode mode : {ExchangeMode::padded, ExchangeMode::dropless}) {
              const ExecPlan plan{r, d, A2AAlgorithm::flat, mode};
              pair.step("rank " + std::to_string(me) + " E " + std::to_string(E) + " " + std::string(dtype_name(compute)) + " " +
                            plan.describe(),
                        x, dout, plan);
            }
        pair.host->sgd_step(0.1);
        pair.device->sgd_step(0.1);
        expect_same("gate after sgd", pair.device->gate_weight(), pair.host->gate_weight());
        expect_same_params("experts after sgd", pair.device->params(), pair.host->params());
      }
    }
  });
}

TEST(DeviceOps, PayloadsSendOnceAndCombineLayoutsOnIsolatedMemory) {
  testing::for_each_rank([&](Communicator& comm, uint64_t seed) {
    const int n = comm.size(), me = comm.rank();
    const int64_t T = 9 + me;
    const Tensor x = random_tensor(seed + 10 + me, T, 12), dout = random_tensor(seed + 20 + me, T, 12);
    const ExecPlan dropless{1, 2, A2AAlgorithm::flat, ExchangeMode::dropless};
    {
      MoEConfig c = small_config(2 * n, 8);
      c.router.k = std::min(3, 2 * n);
      c.send_once_per_rank = true;
      Pair pair(comm, c, seed);
      pair.step("send once", x, dout, dropless);
    }
    for (DType payload : {DType::bf16, DType::fp8_e4m3}) {
      MoEConfig c = small_config(2 * n, 8);
      c.dispatch_payload = payload;
      c.combine_payload = DType::bf16;
      Pair pair(comm, c, seed);
      pair.step("payload " + std::string(dtype_name(payload)), x, dout, dropless, /*backward=*/false);
    }
    // Results to the next rank, reversed; backward takes dout in that layout.
    MoEConfig c = small_config(2 * n, 8);
    Pair pair(comm, c, seed);
    CombineLayout to_next;
    const int next = (me + 1) % n, prev = (me + n - 1) % n;
    const int64_t incoming = 9 + prev;
    for (int64_t t = 0; t < T; ++t) {
      to_next.rank.push_back(next);
      to_next.index.push_back(T - 1 - t);
    }
    to_next.output_rows = incoming;
    const ExecPlan plan{1, 1, A2AAlgorithm::flat, ExchangeMode::padded};
    MoEHandle hb = pair.host->plan(x, pair.host->routing_choice(), plan, &to_next);
    MoEHandle db = pair.device->plan(to_isolated(x), pair.device->routing_choice(), plan, &to_next);
    const MoEForward& hf = pair.host->forward(*hb);
    const MoEForward& df = pair.device->forward(*db);
    expect_same("moved output", df.output, hf.output);
    const Tensor moved_dout = random_tensor(seed + 30 + me, incoming, 12);
    expect_same("moved dx", pair.device->backward(*db, to_isolated(moved_dout)), pair.host->backward(*hb, moved_dout));
    expect_same("moved gate grad", pair.device->gate_grad(), pair.host->gate_grad());
  });
}

TEST(DeviceOps, ReplicasMigrationAndCheckpointsOnIsolatedMemory) {
  testing::for_each_rank([&](Communicator& comm, uint64_t seed) {
    const int n = comm.size(), me = comm.rank();
    const int E = 2 * n;
    // Two slots per rank plus one replica of expert 0 on every rank but its own.
    MoEConfig c = small_config(E, 8);
    c.router.capacity_factor = 0;
    std::vector<double> load(static_cast<size_t>(E), 1.0);
    load[0] = 4.0;
    c.placement = eplb::place(load, E + n, n);
    Pair pair(comm, c, seed);
    const int64_t T = 11;
    const Tensor x = random_tensor(seed + 40 + me, T, 12), dout = random_tensor(seed + 50 + me, T, 12);
    const ExecPlan plan{1, 1, A2AAlgorithm::flat, ExchangeMode::dropless};
    pair.step("replicas", x, dout, plan);
    // Migrate both to an identity placement, moving an optimizer-like state with them.
    ExpertParams hstate = pair.host->expert_grads(), dstate = pair.device->expert_grads();
    const ExpertPlacement to = ExpertPlacement::identity(E, n);
    pair.host->migrate(to, {&hstate});
    pair.device->migrate(to, {&dstate});
    expect_same_params("migrated params", pair.device->params(), pair.host->params());
    expect_same_params("migrated state", dstate, hstate);
    pair.step("after migrate", x, dout, plan);
    // A checkpoint of the device layer loads into a host layer (default placement: the same identity), and a
    // host layer's checkpoint into a device layer.
    const std::string dir = (std::filesystem::temp_directory_path() /
                             ("sy_device_ops_ckpt_" + std::to_string(seed) + "_" + std::to_string(n))).string();
    if (me == 0) std::filesystem::create_directories(dir);
    comm.barrier().wait();
    pair.device->sgd_step(0.1);
    pair.device->save(dir + "/device");
    MoEConfig plain = small_config(E, 8);
    plain.router.capacity_factor = 0;
    MoEConfig hc = plain, dc = plain;
    hc.ops = std::make_shared<CpuOps>();
    dc.ops = std::make_shared<IsolatedOps>();
    MoELayer reloaded(hc, pair.host_group);
    reloaded.load(dir + "/device");
    expect_same("reloaded gate", pair.device->gate_weight(), reloaded.gate_weight());
    expect_same_params("reloaded experts", pair.device->params(), reloaded.params());
    reloaded.sgd_step(0.5);
    reloaded.save(dir + "/host");
    MoELayer device_reloaded(dc, pair.device_group);
    device_reloaded.load(dir + "/host");
    expect_same("device-reloaded gate", device_reloaded.gate_weight(), reloaded.gate_weight());
    expect_same_params("device-reloaded experts", device_reloaded.params(), reloaded.params());
    comm.barrier().wait();
    if (me == 0) std::filesystem::remove_all(dir);
  });
}

// The rest of the layer's surface on isolated memory: the planner (its calibration through the ops and its
// choice on the agreed host values), the sigmoid gate's bias update, EPLB rebalancing, expert data parallelism
// (a domain's exchange and its host counts, with a host group of its own), nearest replicas, sliced experts'
// checkpoints, finite-input checks and several batches in flight.
TEST(DeviceOps, PlannerBiasRebalanceDomainsAndBatchesInFlightOnIsolatedMemory) {
  testing::for_each_rank([&](Communicator& comm, uint64_t seed) {
    const int n = comm.size(), me = comm.rank();
    const int64_t T = 10 + me;
    const Tensor x = random_tensor(seed + 60 + me, T, 12), dout = random_tensor(seed + 70 + me, T, 12);
    {  // planner-chosen plans, the same on both
      MoEConfig c = small_config(2 * n, 8);
      Pair pair(comm, c, seed);
      auto [hd, hl] = MoEPlanner::calibrate(*pair.host, n);
      auto [dd, dl] = MoEPlanner::calibrate(*pair.device, n);
      (void)hd, (void)hl;
      MoEPlanner dp(*pair.device, dd, dl);
      for (int step = 0; step < 3; ++step) {  // the host layer runs what the device layer's planner chose
        const MoEForward df = pair.device->forward(to_isolated(x), pair.device->routing_choice(), dp);
        const MoEForward hf = pair.host->forward(x, pair.host->routing_choice(), pair.device->last_plan().exec);
        expect_same("planned output", df.output, hf.output);
      }
      EXPECT_GT(dd.gemm_flops_f32, 0);
    }
    {  // the sigmoid gate's bias, then EPLB from the loads
      MoEConfig c = small_config(2 * n, 8);
      c.router.gate = GateKind::sigmoid_bias;
      c.router.renormalize = true;
      c.router.capacity_factor = 0;
      Pair pair(comm, c, seed);
      const ExecPlan plan{1, 1, A2AAlgorithm::flat, ExchangeMode::dropless};
      pair.step("sigmoid gate", x, dout, plan);
      pair.host->update_gate_bias(0.01);
      pair.device->update_gate_bias(0.01);
      pair.step("after the bias update", x, dout, plan);
      std::vector<double> load(static_cast<size_t>(2 * n), 1.0);
      load[1] = 5.0;
      const auto hr = pair.host->rebalance(load, 2 * n + n);
      const auto dr = pair.device->rebalance(load, 2 * n + n);
      EXPECT_EQ(dr.placement.phy2log(), hr.placement.phy2log());
      expect_same_params("rebalanced", pair.device->params(), pair.host->params());
      pair.step("after rebalance", x, dout, plan);
    }
    if (n % 2 == 0) {  // expert data parallelism: two expert groups of n / 2, the device layer with its own host group
      MoEConfig c = small_config(n, 8);
      c.router.capacity_factor = 0;
      c.placement = ExpertPlacement::expert_data_parallel(n, n, n / 2);
      c.replica_domain = n / 2;
      MoEConfig hc = c, dc = c;
      hc.ops = std::make_shared<CpuOps>();
      dc.ops = std::make_shared<IsolatedOps>();
      std::shared_ptr<Communicator> group(&comm, [](Communicator*) {});
      MoELayer host(hc, group), device(dc, make_staged_communicator(group, isolated_memory()), group);
      host.init_parameters(seed);
      device.init_parameters(seed);
      EXPECT_EQ(device.exchange_group()->size(), std::max(1, n / 2));
      const ExecPlan plan{1, 2, A2AAlgorithm::flat, ExchangeMode::dropless};
      const MoEForward hf = host.forward(x, host.routing_choice(), plan);
      const MoEForward df = device.forward(to_isolated(x), device.routing_choice(), plan);
      expect_same("EP x DP output", df.output, hf.output);
      expect_same("EP x DP dx", device.backward(to_isolated(dout)), host.backward(dout));
      expect_same_params("EP x DP expert grads (summed over the replicas)", device.expert_grads(), host.expert_grads());
    }
    {  // nearest replicas, batches in flight, finite-input checks
      MoEConfig c = small_config(2 * n, 8);
      c.router.capacity_factor = 0;
      c.check_finite = true;
      std::vector<double> load(static_cast<size_t>(2 * n), 1.0);
      load[0] = 3.0;
      c.placement = eplb::place(load, 2 * n + n, n);
      c.replica_choice = MoEConfig::ReplicaChoice::nearest;
      c.node_size = n % 2 == 0 && n > 2 ? 2 : 0;
      Pair pair(comm, c, seed);
      const ExecPlan plan{1, 2, A2AAlgorithm::flat, ExchangeMode::dropless};
      std::vector<MoEHandle> hb, db;
      const Tensor dx_in = to_isolated(x);
      for (int i = 0; i < 3; ++i) {
        hb.push_back(pair.host->plan(x, pair.host->routing_choice(), plan));
        db.push_back(pair.device->plan(dx_in, pair.device->routing_choice(), plan));
      }
      for (int i = 0; i < 3; ++i) pair.host->dispatch(*hb[i]), pair.device->dispatch(*db[i]);
      for (int i = 2; i >= 0; --i) {
        expect_same("batch in flight " + std::to_string(i), pair.device->forward(*db[i]).output,
                    pair.host->forward(*hb[i]).output);
        expect_same("its dx", pair.device->backward(*db[i], to_isolated(dout)), pair.host->backward(*hb[i], dout));
      }
      Tensor bad = x.clone();
      if (T > 0) bad.data_as<float>()[T * 12 - 1] = NAN;
      EXPECT_THROW(pair.device->forward(to_isolated(bad)), InvalidArgument);
    }
    if (n >= 2) {  // sliced experts (one expert over every rank) save from the device and load back
      MoEConfig c = small_config(1, 4 * n);
      Pair pair(comm, c, seed);
      const std::string dir = (std::filesystem::temp_directory_path() /
                               ("sy_device_ops_sliced_" + std::to_string(seed) + "_" + std::to_string(n))).string();
      if (me == 0) std::filesystem::create_directories(dir);
      comm.barrier().wait();
      pair.device->sgd_step(0.3);  // after a step (grads are zero: the weights stay, so perturb through a step)
      pair.step("sliced", x, dout, {1, 1, A2AAlgorithm::flat, ExchangeMode::padded});
      pair.host->sgd_step(0.3);
      pair.device->sgd_step(0.3);
      pair.device->save(dir);
      MoEConfig hc = c;
      hc.ops = std::make_shared<CpuOps>();
      MoELayer reloaded(hc, pair.host_group);
      reloaded.load(dir);
      expect_same_params("sliced reload", pair.device->params(), reloaded.params());
      comm.barrier().wait();
      if (me == 0) std::filesystem::remove_all(dir);
    }
  });
}

TEST(DeviceOps, HostDataAndHostCommunicatorsAreRefusedNamingTheDevice) {
  testing::for_each_rank([&](Communicator& comm, uint64_t seed) {
    std::shared_ptr<Communicator> group(&comm, [](Communicator*) {});
    MoEConfig c = small_config(2 * comm.size(), 8);
    c.ops = std::make_shared<IsolatedOps>();
    try {
      MoELayer on_host_group(c, group);
      ADD_FAILURE() << "device ops over a host communicator were accepted";
    } catch (const InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find("moves memory of cpu"), std::string::npos) << e.what();
    }
    MoELayer layer(c, make_staged_communicator(group, isolated_memory()));
    layer.init_parameters(seed);
    const Tensor x = random_tensor(seed, 4, 12);
    try {
      layer.forward(x);
      ADD_FAILURE() << "a host input was accepted by a device layer";
    } catch (const InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find("on isolated"), std::string::npos) << e.what();
    }
    if (comm.size() >= 4 && comm.size() % 2 == 0) {
      MoEConfig h = c;
      h.node_size = 2;
      MoELayer two_d(h, make_staged_communicator(group, isolated_memory()));
      EXPECT_THROW(two_d.check_plan({1, 1, A2AAlgorithm::hierarchical, ExchangeMode::padded}), NotSupported);
    }
  });
}

}  // namespace
}  // namespace switchyard
