// The emulated backend over the harness's backend: data still arrives, and the
// virtual clock of a known op sequence equals the closed-form alpha-beta sum,
// with compute overlapping an op in flight as on two GPU streams.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>

#include "comm/backends/emulated/emulated_backend.h"
#include "comm/backends/fake/fake_backend.h"
#include "comm/virtual_time.h"
#include "core/rng.h"
#include "tests/common/rank_harness.h"

namespace switchyard {
namespace {

LinkModel test_links() {
  LinkModel m;
  m.intra = {2e-6, 4e9};
  m.inter = {9e-6, 5e8};
  m.ranks_per_node = 2;
  return m;
}

void expect_time(double got, double want, const std::string& what) {
  if (std::fabs(got - want) > 1e-12 + 1e-9 * want)
    SY_THROW(Error, what, ": virtual time ", got, " s, closed form ", want, " s");
}

TEST(Emulated, VirtualClockOfAKnownSequenceIsTheAlphaBetaSum) {
  testing::for_each_rank([&](Communicator& comm, uint64_t seed) {
    const int n = comm.size(), me = comm.rank();
    const LinkModel m = test_links();
    std::shared_ptr<Communicator> world(&comm, [](Communicator*) {});
    auto em = make_emulated_communicator(world, m);
    virtual_time::reset(0);
    // 1. alltoall of `block` f32 per peer: each rank pays alpha per peer plus its
    //    slowest class's bytes; the op ends after the slowest rank.
    const int64_t block = 1000 + 24 * (seed % 7);
    Tensor in = Tensor::empty({block * n}, DType::f32), out = Tensor::empty({block * n}, DType::f32);
    Rng(seed + me).fill_uniform(in, -1, 1);
    em->alltoall(in, out).wait();
    double a2a = 0;
    for (int r = 0; r < n; ++r) {
      double alpha = 0, near = 0, far = 0;
      for (int p = 0; p < n; ++p) {
        if (p == r) continue;
        const bool same = m.same_node(r, p);
        alpha += same ? m.intra.latency : m.inter.latency;
        (same ? near : far) += static_cast<double>(block * 4);
      }
      a2a = std::max(a2a, alpha + std::max(near / m.intra.bandwidth, far / m.inter.bandwidth));
    }
    expect_time(virtual_time::now(), a2a, "after alltoall");
    // The data moved for real: block `me` of rank 0's input.
    Tensor from0 = Tensor::empty({block * n}, DType::f32);
    Rng(seed).fill_uniform(from0, -1, 1);
    for (int64_t i = 0; i < block; ++i)
      ASSERT_EQ(out.data_as<float>()[i], from0.data_as<float>()[me * block + i]);
    // 2. allreduce of `bytes`: ring over the group's slowest class.
    const int64_t elems = 4096;
    Tensor v = Tensor::zeros({elems}, DType::f32);
    em->allreduce(v, v).wait();
    const LinkClass group = n > m.ranks_per_node ? m.inter : m.intra;
    const double ring = n == 1 ? 0.0 : 2.0 * (n - 1) * (group.latency + elems * 4.0 / n / group.bandwidth);
    expect_time(virtual_time::now(), a2a + ring, "after allreduce");
    // 3. Overlap: compute for 1 ms while a barrier runs; the wait costs nothing
    //    more when the op ended first. Then an op issued after 1 ms of compute
    //    starts then, not when the stream went idle.
    Work b = em->barrier();
    virtual_time::charge(1e-3);
    b.wait();
    const double barrier_cost = n <= 1 ? 0.0 : std::ceil(std::log2(n)) * group.latency;
    const double after_overlap = a2a + ring + std::max(1e-3, barrier_cost);
    expect_time(virtual_time::now(), after_overlap, "after overlapped barrier");
    virtual_time::charge(2e-3);
    em->allreduce(v, v).wait();
    expect_time(virtual_time::now(), after_overlap + 2e-3 + ring, "after compute then allreduce");
  });
}

// Timing only: bulky floating-point payloads are charged, not moved; small
// ones, integer ones (counts) and every allreduce move.
TEST(Emulated, TimingOnlyChargesBulkWithoutMovingIt) {
  testing::for_each_rank([&](Communicator& comm, uint64_t) {
    const int n = comm.size(), me = comm.rank();
    std::shared_ptr<Communicator> world(&comm, [](Communicator*) {});
    auto em = make_emulated_communicator(world, test_links(), true);
    virtual_time::reset(0);
    const int64_t big = static_cast<int64_t>(kEmulatedControlBytes) / 4 + n;  // f32 elements, over the limit
    const int64_t per_peer = big / n + 1;
    Tensor in = Tensor::empty({per_peer * n}, DType::f32), out = Tensor::empty({per_peer * n}, DType::f32);
    for (int64_t i = 0; i < in.numel(); ++i) in.data_as<float>()[i] = static_cast<float>(me + 1);
    for (int64_t i = 0; i < out.numel(); ++i) out.data_as<float>()[i] = -1.f;
    em->alltoall(in, out).wait();
    if (n > 1) {
      EXPECT_EQ(out.data_as<float>()[0], -1.f);  // charged, not moved
      EXPECT_GT(virtual_time::now(), 0.0);
    }
    Tensor counts = Tensor::empty({per_peer * n}, DType::i64), got = Tensor::empty({per_peer * n}, DType::i64);
    for (int64_t i = 0; i < counts.numel(); ++i) counts.data_as<int64_t>()[i] = me + 1;
    em->alltoall(counts, got).wait();
    for (int r = 0; r < n; ++r) EXPECT_EQ(got.data_as<int64_t>()[r * per_peer], r + 1);  // integers move
    Tensor sum = Tensor::empty({big}, DType::f32);
    for (int64_t i = 0; i < big; ++i) sum.data_as<float>()[i] = static_cast<float>(me + 1);
    em->allreduce(sum, sum).wait();
    EXPECT_EQ(sum.data_as<float>()[big - 1], static_cast<float>(n * (n + 1) / 2));  // allreduce moves
  });
}

// Over the fake backend one process plays one rank of a 1,024-rank cluster:
// nothing moves, the cost model still charges this rank's share, and groups
// made from it know their members' nodes.
TEST(Emulated, FakeBackendAtScaleUsesTheSameCostModel) {
  const int n = 1024, me = 37;
  LinkModel m = test_links();
  m.ranks_per_node = 8;
  auto em = make_emulated_communicator(make_fake_communicator(me, n), m);
  virtual_time::reset(0);
  const int64_t block = 256;  // f32 per peer
  Tensor in = Tensor::empty({block * n}, DType::f32), out = Tensor::empty({block * n}, DType::f32);
  em->alltoall(in, out).wait();
  const double a2a = 7 * m.intra.latency + (n - 8) * m.inter.latency +
                     std::max(7.0 * block * 4 / m.intra.bandwidth, (n - 8.0) * block * 4 / m.inter.bandwidth);
  expect_time(virtual_time::now(), a2a, "1024-rank alltoall");
  // My node's 8 ranks: an all-intra group, charged at the intra class.
  std::vector<int> node;
  for (int r = 32; r < 40; ++r) node.push_back(r);
  auto group = em->create_group(node);
  Tensor v = Tensor::zeros({1024}, DType::f32);
  group->allreduce(v, v).wait();
  expect_time(virtual_time::now(), a2a + 2.0 * 7 * (m.intra.latency + 4096.0 / 8 / m.intra.bandwidth),
              "node-group allreduce");
}

// A shared NIC: two ranks of a node crossing to the other node at once cost
// more than either alone (their bytes share the NIC's bandwidth), and exactly
// the closed form; with a NIC per rank they cost the same as one alone. 2DH's
// cross-node groups are concurrent siblings: one member per NIC, yet the NIC
// carries its mate's share too.
TEST(Emulated, TwoStreamsSharingANicCostMoreThanEitherAlone) {
  testing::for_each_rank([&](Communicator& comm, uint64_t seed) {
    const int n = comm.size(), me = comm.rank();
    if (n != 4) return;  // two nodes of two ranks
    std::shared_ptr<Communicator> world(&comm, [](Communicator*) {});
    const int64_t block = 20000 + 8 * static_cast<int64_t>(seed % 5);  // f32 per cross-node peer
    // Ranks in `senders` send `block` floats to each rank of the other node; nothing else moves.
    auto a2a_time = [&](const LinkModel& m, const std::vector<int>& senders) {
      auto em = make_emulated_communicator(world, m);
      std::vector<int64_t> send(4, 0), recv(4, 0);
      const bool sending = std::find(senders.begin(), senders.end(), me) != senders.end();
      for (int p = 0; p < 4; ++p) {
        if (p / 2 == me / 2) continue;
        if (sending) send[static_cast<size_t>(p)] = block;
        if (std::find(senders.begin(), senders.end(), p) != senders.end()) recv[static_cast<size_t>(p)] = block;
      }
      int64_t ns = 0, nr = 0;
      for (int p = 0; p < 4; ++p) ns += send[static_cast<size_t>(p)], nr += recv[static_cast<size_t>(p)];
      Tensor in = Tensor::zeros({ns}, DType::f32), out = Tensor::zeros({nr}, DType::f32);
      em->barrier().wait();
      const double start = virtual_time::now();
      em->alltoallv(in, send, out, recv).wait();
      return virtual_time::now() - start;
    };
    LinkModel shared = test_links();
    shared.ranks_per_nic = 2;
    const double alone = a2a_time(shared, {0}), both = a2a_time(shared, {0, 1});
    const double latency = test_links().intra.latency + 2 * test_links().inter.latency;
    const double bytes = 2.0 * block * 4;  // to each of the other node's two ranks
    expect_time(alone, latency + bytes / shared.inter.bandwidth, "one rank crossing");
    expect_time(both, latency + 2 * bytes / shared.inter.bandwidth, "two ranks sharing the NIC");
    EXPECT_GT(both, alone);
    // Full duplex: node 0 sending while it receives as much costs no more than sending alone.
    expect_time(a2a_time(shared, {0, 2}), alone, "one rank each way through the shared NICs");
    const LinkModel own = test_links();  // a NIC per rank
    expect_time(a2a_time(own, {0, 1}), a2a_time(own, {0}), "two ranks with a NIC each");
    // Concurrent siblings: groups {0, 2} and {1, 3} cross at once; each group's NIC time doubles.
    auto em = make_emulated_communicator(world, shared);
    auto across = em->create_group({me % 2, me % 2 + 2}, "across");
    Tensor in = Tensor::zeros({2 * block}, DType::f32), out = Tensor::zeros({2 * block}, DType::f32);
    auto crossing = [&] {
      across->barrier().wait();
      const double start = virtual_time::now();
      across->alltoall(in, out).wait();
      return virtual_time::now() - start;
    };
    const double apart = crossing();
    across->set_concurrent_siblings(true);
    const double together = crossing();
    expect_time(apart, shared.inter.latency + block * 4.0 / shared.inter.bandwidth, "one group crossing");
    expect_time(together, shared.inter.latency + 2 * block * 4.0 / shared.inter.bandwidth, "sibling groups crossing");
  });
}

}  // namespace
}  // namespace switchyard
