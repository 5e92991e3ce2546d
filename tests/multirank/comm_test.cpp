// The communicator suite: every collective on every rank of the backend this
// binary was started with (see tests/common/rank_harness.h), over element
// counts (0, 1, odd, 1M) and each op's dtypes, against float64 references
// computed from every rank's regenerated input.
#include <functional>
#include <gtest/gtest.h>

#include <csignal>

#include <atomic>
#include <cmath>
#include <cstring>
#include <thread>

#include "comm/algorithms/alltoallv_hierarchical.h"
#include "comm/communicator.h"
#include "core/rng.h"
#include "tests/common/rank_harness.h"

namespace switchyard {
namespace {

using testing::for_each_rank;
using testing::harness_is_threads;

constexpr int64_t kCounts[] = {0, 1, 1001, 1 << 20};
constexpr DType kReduceTypes[] = {DType::f32, DType::f64, DType::bf16, DType::f16, DType::i32, DType::i64};
constexpr DType kMoveTypes[] = {DType::f32, DType::f64, DType::bf16, DType::f16,
                                DType::fp8_e4m3, DType::i32, DType::i64, DType::u8};

// Rank r's input: random values drawn from (seed, r, salt), so any rank can
// regenerate any other rank's input for the reference.
Tensor make_input(uint64_t seed, int rank, int salt, int64_t count, DType dtype) {
  Tensor t = Tensor::empty({count}, dtype);
  Rng rng(seed * 1000003u + static_cast<uint64_t>(rank) * 7919u + static_cast<uint64_t>(salt));
  if (is_floating(dtype))
    rng.fill_uniform(t, -1.0, 1.0);
  else
    rng.fill_uniform(t, dtype == DType::u8 ? 0 : -1000, dtype == DType::u8 ? 255 : 1000);
  return t;
}

Tensor poisoned(int64_t count, DType dtype) {
  Tensor t = Tensor::empty({count}, dtype);
  poison(t);
  return t;
}

// Bound on the error of summing `terms` values of magnitude <= 1 in `dtype`:
// terms-1 roundings, each at most the unit roundoff times a partial sum <= terms.
double sum_tolerance(DType dtype, int terms) {
  const double t = terms;
  switch (dtype) {
    case DType::f64: return t * t * 0x1p-53;
    case DType::f32: return t * t * 0x1p-24;
    case DType::bf16: return t * t * 0x1p-8;
    case DType::f16: return t * t * 0x1p-11;
    default: return 0.0;
  }
}

// Throws with the first mismatching element: a failing rank reports through the harness.
void expect_near(const Tensor& got, const std::vector<double>& want, double tol, const std::string& what) {
  ASSERT_EQ(got.numel(), static_cast<int64_t>(want.size())) << what;
  for (size_t i = 0; i < want.size(); ++i) {
    const double g = load_as_double(got.data(), got.dtype(), i);
    if (!(std::fabs(g - want[i]) <= tol))
      SY_THROW(Error, what, ": element ", i, " is ", g, ", expected ", want[i], " (tolerance ", tol, ")");
  }
}

void expect_bytes_equal(const void* got, const void* want, size_t bytes, const std::string& what) {
  if (bytes && std::memcmp(got, want, bytes) != 0) {
    const auto* g = static_cast<const uint8_t*>(got);
    const auto* w = static_cast<const uint8_t*>(want);
    size_t i = 0;
    while (g[i] == w[i]) ++i;
    SY_THROW(Error, what, ": byte ", i, " of ", bytes, " is ", int(g[i]), ", expected ", int(w[i]));
  }
}

double reduce_ref(ReduceOp op, double acc, double v) {
  switch (op) {
    case ReduceOp::sum: return acc + v;
    case ReduceOp::max: return std::max(acc, v);
    case ReduceOp::min: return std::min(acc, v);
  }
  return acc;
}

struct CountType {
  int64_t count;
  DType dtype;
};
std::string name_of(const ::testing::TestParamInfo<CountType>& info) {
  return std::string(dtype_name(info.param.dtype)) + "_n" + std::to_string(info.param.count);
}
std::vector<CountType> combos(std::span<const DType> types) {
  std::vector<CountType> out;
  for (int64_t c : kCounts)
    for (DType t : types) out.push_back({c, t});
  return out;
}

class ReduceTest : public ::testing::TestWithParam<CountType> {};
class MoveTest : public ::testing::TestWithParam<CountType> {};

TEST_P(ReduceTest, AllreduceMatchesFloat64ReferenceAndIsIdenticalOnAllRanks) {
  const auto [count, dtype] = GetParam();
  for (ReduceOp op : {ReduceOp::sum, ReduceOp::max, ReduceOp::min}) {
    for_each_rank([&](Communicator& comm, uint64_t seed) {
      const int n = comm.size();
      Tensor in = make_input(seed, comm.rank(), 1, count, dtype);
      Tensor out = poisoned(count, dtype);
      comm.allreduce(in, out, {{}, op}).wait();
      std::vector<double> want(static_cast<size_t>(count));
      for (int r = 0; r < n; ++r) {
        Tensor other = make_input(seed, r, 1, count, dtype);
        for (int64_t i = 0; i < count; ++i)
          want[i] = r == 0 ? load_as_double(other.data(), dtype, i)
                           : reduce_ref(op, want[i], load_as_double(other.data(), dtype, i));
      }
      const double tol = op == ReduceOp::sum ? sum_tolerance(dtype, n) : 0.0;
      expect_near(out, want, tol, std::string("allreduce ") + std::string(reduce_op_name(op)));
      // Plans depend on every rank seeing the same bits: compare with rank 0's result.
      Tensor root_copy = out.clone();
      comm.broadcast(root_copy, 0).wait();
      expect_bytes_equal(out.data(), root_copy.data(), out.nbytes(), "allreduce result differs from rank 0's");
      // In place.
      Tensor inplace = make_input(seed, comm.rank(), 1, count, dtype);
      comm.allreduce(inplace, inplace, {{}, op}).wait();
      expect_near(inplace, want, tol, "in-place allreduce");
    });
  }
}

TEST_P(ReduceTest, ReduceScatterGivesEachRankItsReducedBlock) {
  const auto [count, dtype] = GetParam();
  for (ReduceOp op : {ReduceOp::sum, ReduceOp::max, ReduceOp::min}) {
    for_each_rank([&](Communicator& comm, uint64_t seed) {
      const int n = comm.size();
      const int64_t block = count / n + (count % 2);  // odd sizes stay odd-ish per rank
      Tensor in = make_input(seed, comm.rank(), 2, block * n, dtype);
      Tensor out = poisoned(block, dtype);
      comm.reduce_scatter(in, out, {{}, op}).wait();
      std::vector<double> want(static_cast<size_t>(block), 0.0);
      for (int r = 0; r < n; ++r) {
        Tensor other = make_input(seed, r, 2, block * n, dtype);
        for (int64_t i = 0; i < block; ++i) {
          const double v = load_as_double(other.data(), dtype, comm.rank() * block + i);
          want[i] = r == 0 ? v : reduce_ref(op, want[i], v);
        }
      }
      expect_near(out, want, op == ReduceOp::sum ? sum_tolerance(dtype, n) : 0.0,
                  "reduce_scatter " + std::string(reduce_op_name(op)));
    });
  }
}

TEST_P(MoveTest, AllgatherAndAllgathervCollectEveryRanksBlock) {
  const auto [count, dtype] = GetParam();
  for_each_rank([&](Communicator& comm, uint64_t seed) {
    const int n = comm.size();
    const int64_t block = count / n + (count % 2);
    Tensor in = make_input(seed, comm.rank(), 3, block, dtype);
    Tensor out = poisoned(block * n, dtype);
    comm.allgather(in, out).wait();
    const size_t esize = dtype_size(dtype);
    for (int r = 0; r < n; ++r) {
      Tensor other = make_input(seed, r, 3, block, dtype);
      expect_bytes_equal(static_cast<char*>(out.data()) + r * block * esize, other.data(), other.nbytes(), "allgather");
    }
    // Uneven: rank r contributes (block + r) % 7 elements, some ranks none.
    std::vector<int64_t> counts(static_cast<size_t>(n));
    int64_t total = 0;
    for (int r = 0; r < n; ++r) total += counts[r] = (block + r) % 7 + (count > 1000 ? block : 0);
    Tensor vin = make_input(seed, comm.rank(), 4, counts[comm.rank()], dtype);
    Tensor vout = poisoned(total, dtype);
    comm.allgatherv(vin, vout, counts).wait();
    size_t offset = 0;
    for (int r = 0; r < n; ++r) {
      Tensor other = make_input(seed, r, 4, counts[r], dtype);
      expect_bytes_equal(static_cast<char*>(vout.data()) + offset, other.data(), other.nbytes(), "allgatherv");
      offset += other.nbytes();
    }
  });
}

TEST_P(MoveTest, AlltoallAndAlltoallvDeliverEveryBlock) {
  const auto [count, dtype] = GetParam();
  for_each_rank([&](Communicator& comm, uint64_t seed) {
    const int n = comm.size(), me = comm.rank();
    const size_t esize = dtype_size(dtype);
    const int64_t block = count / n + (count % 2);
    Tensor in = make_input(seed, me, 5, block * n, dtype);
    Tensor out = poisoned(block * n, dtype);
    comm.alltoall(in, out).wait();
    for (int r = 0; r < n; ++r) {
      Tensor other = make_input(seed, r, 5, block * n, dtype);  // rank r's input; its block `me` is ours
      expect_bytes_equal(static_cast<char*>(out.data()) + r * block * esize,
                         static_cast<char*>(other.data()) + me * block * esize, block * esize, "alltoall");
    }
    // Variable: rank s sends (s + 2d) % 5 (+block when large) elements to d; empty blocks included.
    auto sent = [&](int s, int d) { return static_cast<int64_t>((s + 2 * d) % 5) + (count > 1000 ? block : 0); };
    std::vector<int64_t> send_counts(n), recv_counts(n);
    int64_t send_total = 0, recv_total = 0;
    for (int p = 0; p < n; ++p) {
      send_total += send_counts[p] = sent(me, p);
      recv_total += recv_counts[p] = sent(p, me);
    }
    Tensor vin = make_input(seed, me, 6, send_total, dtype);
    Tensor vout = poisoned(recv_total, dtype);
    comm.alltoallv(vin, send_counts, vout, recv_counts).wait();
    size_t offset = 0;
    for (int s = 0; s < n; ++s) {
      int64_t s_total = 0, s_offset = 0;
      for (int d = 0; d < n; ++d) {
        if (d == me) s_offset = s_total;
        s_total += sent(s, d);
      }
      Tensor other = make_input(seed, s, 6, s_total, dtype);
      expect_bytes_equal(static_cast<char*>(vout.data()) + offset, static_cast<char*>(other.data()) + s_offset * esize,
                         static_cast<size_t>(sent(s, me)) * esize, "alltoallv");
      offset += static_cast<size_t>(sent(s, me)) * esize;
    }
  });
}

// 2D-hierarchical all-to-all(v) delivers what the flat one does, for every
// node size that divides the world (1 and the whole world included), with
// empty blocks and a large one.
TEST(Comm, HierarchicalAlltoallEqualsFlatForEveryNodeSize) {
  for_each_rank([&](Communicator& comm, uint64_t seed) {
    const int n = comm.size(), me = comm.rank();
    for (int local = 1; local <= n; ++local) {
      if (n % local != 0) continue;
      algorithms::HierarchicalAlltoall h(comm, local);
      for (DType dtype : {DType::f32, DType::u8}) {
        auto sent = [&](int s, int d) { return static_cast<int64_t>((3 * s + d) % 4) + (s == d ? 70001 : 0); };
        std::vector<int64_t> send_counts(n), recv_counts(n);
        int64_t send_total = 0, recv_total = 0;
        for (int p = 0; p < n; ++p) {
          send_total += send_counts[p] = sent(me, p);
          recv_total += recv_counts[p] = sent(p, me);
        }
        Tensor in = make_input(seed, me, 11 + local, send_total, dtype);
        Tensor flat = poisoned(recv_total, dtype), hier = poisoned(recv_total, dtype);
        comm.alltoallv(in, send_counts, flat, recv_counts).wait();
        h.alltoallv(in, send_counts, hier, recv_counts).wait();
        expect_bytes_equal(hier.data(), flat.data(), hier.nbytes(), "2dh alltoallv");
        const int64_t block = 3 + local;
        Tensor uin = make_input(seed, me, 21 + local, block * n, dtype);
        Tensor uflat = poisoned(block * n, dtype), uhier = poisoned(block * n, dtype);
        comm.alltoall(uin, uflat).wait();
        h.alltoall(uin, uhier).wait();
        expect_bytes_equal(uhier.data(), uflat.data(), uhier.nbytes(), "2dh alltoall");
      }
    }
  });
}

TEST_P(MoveTest, BroadcastFromFirstAndLastRank) {
  const auto [count, dtype] = GetParam();
  for_each_rank([&](Communicator& comm, uint64_t seed) {
    for (int root : {0, comm.size() - 1}) {
      Tensor buf = comm.rank() == root ? make_input(seed, root, 7, count, dtype) : poisoned(count, dtype);
      comm.broadcast(buf, root).wait();
      Tensor want = make_input(seed, root, 7, count, dtype);
      expect_bytes_equal(buf.data(), want.data(), want.nbytes(), "broadcast from root " + std::to_string(root));
    }
  });
}

TEST_P(MoveTest, SendRecvAroundTheRingOverlapped) {
  const auto [count, dtype] = GetParam();
  for_each_rank([&](Communicator& comm, uint64_t seed) {
    const int n = comm.size(), me = comm.rank();
    if (n == 1) return;
    Tensor mine = make_input(seed, me, 8, count, dtype);
    Tensor got = poisoned(count, dtype);
    // Separate send and recv ops run one after the other on the executor and sends are
    // rendezvous, so even ranks send first and odd ranks receive first (sendrecv needs no care).
    Work a, b;
    if (me % 2 == 0) {
      a = comm.send(mine, (me + 1) % n, {.tag = 42});
      b = comm.recv(got, (me + n - 1) % n, {.tag = 42});
    } else {
      b = comm.recv(got, (me + n - 1) % n, {.tag = 42});
      a = comm.send(mine, (me + 1) % n, {.tag = 42});
    }
    a.wait();
    b.wait();
    Tensor want = make_input(seed, (me + n - 1) % n, 8, count, dtype);
    expect_bytes_equal(got.data(), want.data(), want.nbytes(), "recv from the previous rank");
  });
}

TEST_P(MoveTest, SendrecvShiftsTheRingByAnyDistance) {
  const auto [count, dtype] = GetParam();
  for_each_rank([&](Communicator& comm, uint64_t seed) {
    const int n = comm.size(), me = comm.rank();
    for (int shift : {0, 1, n - 1}) {
      Tensor mine = make_input(seed, me, 9, count, dtype);
      Tensor got = poisoned(count, dtype);
      comm.sendrecv(mine, (me + shift) % n, got, (me + n - shift) % n).wait();
      Tensor want = make_input(seed, (me + n - shift) % n, 9, count, dtype);
      expect_bytes_equal(got.data(), want.data(), want.nbytes(), "sendrecv shift " + std::to_string(shift));
    }
  });
}

INSTANTIATE_TEST_SUITE_P(Counts, ReduceTest, ::testing::ValuesIn(combos(kReduceTypes)), name_of);
INSTANTIATE_TEST_SUITE_P(Counts, MoveTest, ::testing::ValuesIn(combos(kMoveTypes)), name_of);

TEST(Comm, BarrierHoldsEveryRankUntilAllArrive) {
  static std::atomic<int> arrived{0};
  arrived = 0;
  for_each_rank([&](Communicator& comm, uint64_t) {
    comm.barrier().wait();  // start together
    for (int phase = 1; phase <= 3; ++phase) {
      // Rank 0 dawdles: nobody may pass the barrier before it arrives. The
      // ranks leave the previous barrier close together, but on a loaded
      // machine not within milliseconds: 200 ms of dawdling, 100 ms of slack.
      const auto start = Clock::now();
      if (comm.rank() == 0) std::this_thread::sleep_for(std::chrono::milliseconds(200));
      if (harness_is_threads()) arrived.fetch_add(1);
      comm.barrier().wait();
      if (Clock::now() - start < std::chrono::milliseconds(100))  // holds on every backend
        SY_THROW(Error, "rank ", comm.rank(), " passed barrier ", phase, " before rank 0 arrived");
      if (harness_is_threads() && arrived.load() < phase * comm.size())
        SY_THROW(Error, "rank ", comm.rank(), " passed barrier ", phase, " with only ", arrived.load(), " arrivals");
      comm.barrier().wait();  // nobody starts the next phase before all checked
    }
  });
}

// Groups of different parents with equal member lists (a row group of the
// world and a group made inside a column group) run ops at the same time
// without crossing messages.
TEST(Comm, NestedGroupsWithEqualMemberListsStayApart) {
  for_each_rank([&](Communicator& comm, uint64_t) {
    const int n = comm.size(), me = comm.rank();
    if (n != 4) return;
    auto row = comm.create_group({me / 2 * 2, me / 2 * 2 + 1});  // member list {0,1} or {2,3}
    auto column = comm.create_group({me % 2, me % 2 + 2});
    auto inner = column->create_group({0, 1});                  // member list {0,1} of the column
    for (int round = 0; round < 20; ++round) {
      Tensor a = Tensor::empty({4096}, DType::f32), b = Tensor::empty({4096}, DType::f32);
      for (int i = 0; i < 4096; ++i) a.data_as<float>()[i] = static_cast<float>(me + 1), b.data_as<float>()[i] = 100.f * (me + 1);
      ReduceOptions generic;  // over the backend's send/recv, where tags matter
      generic.algorithm = Algorithm::generic;
      Work wa = row->allreduce(a, a, generic), wb = inner->allreduce(b, b, generic);
      wa.wait();
      wb.wait();
      const float row_sum = static_cast<float>(me / 2 * 2 + 1 + me / 2 * 2 + 2);
      const float col_sum = 100.f * static_cast<float>(me % 2 + 1 + me % 2 + 3);
      if (a.data_as<float>()[4095] != row_sum || b.data_as<float>()[4095] != col_sum)
        SY_THROW(Error, "rank ", me, " round ", round, ": row sum ", a.data_as<float>()[4095], " (want ", row_sum,
                 "), column sum ", b.data_as<float>()[4095], " (want ", col_sum, ")");
    }
  });
}

TEST(Comm, SplitGroupsByColorAndOrdersByKey) {
  for_each_rank([&](Communicator& comm, uint64_t) {
    const int n = comm.size(), me = comm.rank();
    auto child = comm.split(me % 2, -me);  // reverse order inside each color
    ASSERT_NE(child, nullptr);
    std::vector<int> members;
    for (int r = n - 1; r >= 0; --r)
      if (r % 2 == me % 2) members.push_back(r);
    EXPECT_EQ(child->size(), static_cast<int>(members.size()));
    EXPECT_EQ(members[child->rank()], me);
    Tensor v = Tensor::empty({1}, DType::i64);
    v.data_as<int64_t>()[0] = me;
    child->allreduce(v, v).wait();
    int64_t want = 0;
    for (int r : members) want += r;
    EXPECT_EQ(v.data_as<int64_t>()[0], want);
    // Parent and child carry traffic independently.
    comm.barrier().wait();
    child->barrier().wait();
    // color < 0 opts out.
    auto none = comm.split(me == 0 ? -1 : 0, me);
    EXPECT_EQ(none == nullptr, me == 0);
    if (none) {
      EXPECT_EQ(none->size(), n - 1);
    }
  });
}

TEST(Comm, CreateGroupNeedsOnlyItsMembers) {
  for_each_rank([&](Communicator& comm, uint64_t) {
    const int n = comm.size(), me = comm.rank();
    if (me >= (n + 1) / 2) return;  // the upper half never calls it
    std::vector<int> members;
    for (int r = (n + 1) / 2 - 1; r >= 0; --r) members.push_back(r);
    auto group = comm.create_group(members, "lower");
    EXPECT_EQ(group->size(), (n + 1) / 2);
    EXPECT_EQ(group->rank(), (n + 1) / 2 - 1 - me);
    EXPECT_NE(group->name().find("lower"), std::string::npos);
    Tensor v = Tensor::empty({1}, DType::i32);
    v.data_as<int32_t>()[0] = 1;
    group->allreduce(v, v).wait();
    EXPECT_EQ(v.data_as<int32_t>()[0], (n + 1) / 2);
  });
}

TEST(Comm, CreateGroupWhileAnotherCommunicatorStillHasToStartAnOp) {
  // Rank 0 queues a recv and an allreduce on a second communicator and goes
  // straight into a group creation on the first; rank 1 sends late, and every
  // rank finishes the allreduce before joining the creation. Rank 0's allreduce
  // can only start while the creation waits: a creation that blocked this
  // process's other communicators (MPI: a blocking call under the MPI lock) hangs here.
  for_each_rank([&](Communicator& comm, uint64_t) {
    const int n = comm.size(), me = comm.rank();
    if (n < 2) return;
    std::vector<int> everyone(n);
    for (int r = 0; r < n; ++r) everyone[r] = r;
    auto second = comm.create_group(everyone, "second");
    Tensor t = Tensor::empty({1}, DType::i64);
    t.data_as<int64_t>()[0] = me;
    Tensor token = Tensor::zeros({1}, DType::i32);
    if (me == 0) {
      Work got = second->recv(token, 1);
      Work sum = second->allreduce(t, t);
      auto third = comm.create_group(everyone, "third");
      EXPECT_EQ(third->size(), n);
      got.wait();
      sum.wait();
    } else {
      if (me == 1) {
        std::this_thread::sleep_for(std::chrono::milliseconds(100));
        second->send(token, 0).wait();
      }
      second->allreduce(t, t).wait();
      comm.create_group(everyone, "third");
    }
    EXPECT_EQ(t.data_as<int64_t>()[0], int64_t{n} * (n - 1) / 2);
  }, Milliseconds(10000));
}

TEST(Comm, OpsIssuedBackToBackCompleteInOrderWhileTheCallerComputes) {
  for_each_rank([&](Communicator& comm, uint64_t seed) {
    const int n = comm.size();
    std::vector<Tensor> ins, outs;
    std::vector<Work> works;
    for (int i = 0; i < 4; ++i) {
      ins.push_back(make_input(seed, comm.rank(), 20 + i, 4096, DType::f64));
      outs.push_back(poisoned(4096, DType::f64));
      works.push_back(comm.allreduce(ins.back(), outs.back()));
    }
    volatile double busy = 0;  // the caller keeps computing while the executor works
    for (int i = 0; i < 100000; ++i) busy = busy + std::sqrt(static_cast<double>(i));
    for (int i = 3; i >= 0; --i) works[i].wait();
    for (int i = 0; i < 4; ++i) {
      std::vector<double> want(4096, 0.0);
      for (int r = 0; r < n; ++r) {
        Tensor other = make_input(seed, r, 20 + i, 4096, DType::f64);
        for (int j = 0; j < 4096; ++j) want[j] += other.data_as<double>()[j];
      }
      expect_near(outs[i], want, 1e-12 * n, "allreduce #" + std::to_string(i));
    }
  });
}

TEST(Comm, StatsCountBytesPerOpAndPerPeer) {
  for_each_rank([&](Communicator& comm, uint64_t) {
    const int n = comm.size();
    comm.reset_stats();
    Tensor in = Tensor::zeros({16 * n}, DType::f32), out = Tensor::empty({16 * n}, DType::f32);
    comm.alltoall(in, out).wait();
    comm.alltoall(in, out).wait();
    const CommStats s = comm.stats();
    ASSERT_EQ(s.ops.count("alltoall"), 1u);
    EXPECT_EQ(s.ops.at("alltoall").calls, 2u);
    EXPECT_EQ(s.ops.at("alltoall").bytes, 2u * 16 * n * 4);
    EXPECT_GE(s.ops.at("alltoall").seconds, 0.0);
    for (int p = 0; p < n; ++p) {
      EXPECT_EQ(s.sent_to[p], p == comm.rank() ? 0u : 2u * 16 * 4) << "peer " << p;
      EXPECT_EQ(s.received_from[p], p == comm.rank() ? 0u : 2u * 16 * 4) << "peer " << p;
    }
    // Totals are the same whether a backend runs its own collective (counted as a
    // direct exchange) or a ring/tree from comm/algorithms (counted as moved).
    Tensor block = Tensor::zeros({16}, DType::f32), gathered = Tensor::empty({16 * n}, DType::f32);
    comm.reset_stats();
    comm.allgather(block, gathered).wait();
    EXPECT_EQ(comm.stats().total_received(), uint64_t(n - 1) * 64);
    comm.reset_stats();
    comm.allreduce(in, out).wait();
    EXPECT_EQ(comm.stats().total_received(), uint64_t(2 * (n - 1)) * 64);
    comm.reset_stats();
    comm.broadcast(block, 0).wait();
    EXPECT_EQ(comm.stats().total_received(), comm.rank() == 0 ? 0u : 64u);
  });
}

TEST(Comm, BadArgumentsAreRejectedOnTheCallersThreadWithClearMessages) {
  for_each_rank([&](Communicator& comm, uint64_t) {
    const int n = comm.size();
    Tensor u8 = Tensor::zeros({4}, DType::u8);
    auto expect_message = [](auto&& call, const std::string& needle) {
      try {
        call();
      } catch (const InvalidArgument& e) {
        if (std::string(e.what()).find(needle) == std::string::npos)
          SY_THROW(Error, "message '", e.what(), "' lacks '", needle, "'");
        return;
      }
      SY_THROW(Error, "no InvalidArgument for a call that should fail with '", needle, "'");
    };
    expect_message([&] { comm.allreduce(u8, u8); }, "dtype u8 cannot be reduced");
    Tensor f4 = Tensor::zeros({4}, DType::f32), f5 = Tensor::zeros({5}, DType::f32);
    Tensor d4 = Tensor::zeros({4}, DType::f64);
    expect_message([&] { comm.allreduce(f4, f5); }, "out has 5 elements, expected 4");
    expect_message([&] { comm.allreduce(f4, d4); }, "out dtype f64 differs from in dtype f32");
    expect_message([&] { comm.broadcast(f4, n); }, "root " + std::to_string(n) + " out of range");
    Tensor g4 = Tensor::zeros({4}, DType::f32);
    expect_message([&] { comm.alltoallv(f4, {4}, g4, {4, 0, 0}); }, "entries, expected one per rank");
    expect_message([&] { comm.send(f4, comm.rank()); }, "is this rank");
    Tensor odd = Tensor::zeros({n * 3 + 1}, DType::f32), odd_out = Tensor::zeros({n * 3 + 1}, DType::f32);
    if (n > 1) expect_message([&] { comm.alltoall(odd, odd_out); }, "expected a multiple of the size");
    // The communicator is still usable afterwards.
    comm.barrier().wait();
  });
}

TEST(Comm, GenericAlgorithmsAgreeWithTheBackendsOwn) {
  // On MPI this runs comm/algorithms over MPI_Isend/Irecv instead of MPI_I* collectives.
  for_each_rank([&](Communicator& comm, uint64_t seed) {
    const int n = comm.size(), me = comm.rank();
    const int64_t block = 1001;
    OpOptions generic;
    generic.algorithm = Algorithm::generic;
    Tensor in = make_input(seed, me, 30, block * n, DType::f32);
    Tensor native_out = poisoned(block * n, DType::f32), generic_out = poisoned(block * n, DType::f32);
    comm.alltoall(in, native_out).wait();
    comm.alltoall(in, generic_out, generic).wait();
    expect_bytes_equal(generic_out.data(), native_out.data(), native_out.nbytes(), "generic alltoall");
    Tensor mine = make_input(seed, me, 31, block, DType::f32);
    poison(native_out), poison(generic_out);
    comm.allgather(mine, native_out).wait();
    comm.allgather(mine, generic_out, generic).wait();
    expect_bytes_equal(generic_out.data(), native_out.data(), native_out.nbytes(), "generic allgather");
    Tensor b = me == 0 ? make_input(seed, 0, 32, block, DType::f32) : poisoned(block, DType::f32);
    comm.broadcast(b, 0, generic).wait();
    Tensor want = make_input(seed, 0, 32, block, DType::f32);
    expect_bytes_equal(b.data(), want.data(), want.nbytes(), "generic broadcast");
    ReduceOptions ring;
    ring.algorithm = Algorithm::generic;
    Tensor sum_native = poisoned(block, DType::f32), sum_generic = poisoned(block, DType::f32);
    comm.allreduce(mine, sum_native).wait();
    comm.allreduce(mine, sum_generic, ring).wait();
    std::vector<double> want_sum(block);
    for (int64_t i = 0; i < block; ++i) want_sum[i] = load_as_double(sum_native.data(), DType::f32, i);
    expect_near(sum_generic, want_sum, sum_tolerance(DType::f32, n), "generic allreduce");
    comm.barrier(generic).wait();
  });
}

TEST(Comm, OverlappingBuffersAreRejectedButExactInPlaceAllreduceIsAllowed) {
  for_each_rank([&](Communicator& comm, uint64_t) {
    const int n = comm.size();
    Tensor buf = Tensor::zeros({4 * n + 4}, DType::f32);
    TensorView whole = buf.view().slice(0, 4 * n), shifted = buf.view().slice(2, 4 * n + 2);
    EXPECT_THROW(comm.alltoall(whole, shifted), InvalidArgument);
    EXPECT_THROW(comm.alltoall(whole, whole), InvalidArgument);
    EXPECT_THROW(comm.allreduce(whole, shifted), InvalidArgument);
    comm.allreduce(whole, whole).wait();
  });
}

// Host backends refuse device memory before touching it, naming the op, the
// buffer and the device (the nccl backend, in turn, refuses host memory).
TEST(Comm, DeviceBuffersAreRefusedByHostBackends) {
  for_each_rank([&](Communicator& comm, uint64_t) {
    float never_touched[8];
    const TensorView device_view(never_touched, DType::f32, {8}, Device::cuda(0));
    Tensor host = Tensor::zeros({8}, DType::f32);
    auto expect_refusal = [](const std::function<void()>& call, const std::string& needle) {
      try {
        call();
      } catch (const NotSupported& e) {
        const std::string what = e.what();
        if (what.find(needle) == std::string::npos || what.find("cuda:0") == std::string::npos ||
            what.find("host memory only") == std::string::npos)
          SY_THROW(Error, "refusal without '", needle, "', 'cuda:0' and 'host memory only': ", what);
        return;
      }
      SY_THROW(Error, "no NotSupported for device memory ('", needle, "')");
    };
    expect_refusal([&] { comm.allreduce(device_view, device_view); }, "allreduce: in");
    expect_refusal([&] { comm.allgather(host, device_view); }, "allgather: out");
    expect_refusal([&] { comm.broadcast(device_view, 0); }, "broadcast: buffer");
    comm.barrier().wait();
  });
}

// ---- failure behaviour: threads only (under MPI a failure aborts the job by design) ----

TEST(CommFailure, ARankThatThrowsFailsTheRunWithItsMessageAndStopsTheOthersFast) {
  if (!harness_is_threads() || testing::harness_config().ranks < 2) GTEST_SKIP() << "needs >= 2 thread-ranks";
  const auto start = Clock::now();
  try {
    for_each_rank(
        [&](Communicator& comm, uint64_t) {
          if (comm.rank() == 1) SY_THROW(Error, "rank one gives up");
          Tensor t = Tensor::zeros({8}, DType::f32);
          comm.allreduce(t, t).wait();  // would wait for rank 1 for the full 30 s timeout
        },
        Milliseconds(30000));
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("rank 1: rank one gives up"), std::string::npos) << e.what();
  }
  EXPECT_LT(Clock::now() - start, std::chrono::seconds(5));
}

TEST(CommFailure, ARankThatStopsEarlyMakesTheOthersTimeOutNamingThePeer) {
  if (!harness_is_threads() || testing::harness_config().ranks < 2) GTEST_SKIP() << "needs >= 2 thread-ranks";
  const auto start = Clock::now();
  try {
    for_each_rank(
        [&](Communicator& comm, uint64_t) {
          if (comm.rank() == comm.size() - 1) return;  // leaves without a word
          Tensor t = Tensor::zeros({8}, DType::f32);
          comm.allreduce(t, t).wait();
        },
        Milliseconds(300));
    FAIL() << "no error";
  } catch (const TimeoutError& e) {
    // The first rank to give up reports which peer it waited for; the others are
    // then stopped by the abort.
    const std::string m = e.what();
    EXPECT_NE(m.find("allreduce on 'world'"), std::string::npos) << m;
    EXPECT_NE(m.find("timed out waiting for"), std::string::npos) << m;
    EXPECT_NE(m.find("that rank has not reached the matching op"), std::string::npos) << m;
  }
  EXPECT_LT(Clock::now() - start, std::chrono::seconds(5));
}

TEST(CommFailure, WorkWaitWithTimeoutThrowsWhileTheOpRunsThenCompletes) {
  if (!harness_is_threads() || testing::harness_config().ranks < 2) GTEST_SKIP() << "needs >= 2 thread-ranks";
  for_each_rank([&](Communicator& comm, uint64_t) {
    Tensor t = Tensor::zeros({3}, DType::i32);
    if (comm.rank() == 0) {
      Work w = comm.recv(t, 1);
      EXPECT_THROW(w.wait(Milliseconds(20)), TimeoutError);
      EXPECT_FALSE(w.test());
      w.wait();
      EXPECT_EQ(t.data_as<int32_t>()[2], 7);
    } else if (comm.rank() == 1) {
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
      t.data_as<int32_t>()[2] = 7;
      comm.send(t, 0).wait();
    }
  });
}

TEST(CommFailure, ASendThatTimedOutIsWithdrawnSoALateReceiverGetsNothingStale) {
  if (!harness_is_threads() || testing::harness_config().ranks < 2) GTEST_SKIP() << "needs >= 2 thread-ranks";
  for_each_rank([&](Communicator& comm, uint64_t) {
    if (comm.rank() == 0) {
      Tensor t = Tensor::zeros({64}, DType::f32);
      OpOptions quick;
      quick.timeout = Milliseconds(30);
      EXPECT_THROW(comm.send(t, 1, quick).wait(), TimeoutError);
      // t is released here; the receiver must not copy from it.
    } else if (comm.rank() == 1) {
      std::this_thread::sleep_for(std::chrono::milliseconds(150));
      Tensor r = poisoned(64, DType::f32);
      OpOptions quick;
      quick.timeout = Milliseconds(100);
      EXPECT_THROW(comm.recv(r, 0, quick).wait(), TimeoutError);
    }
  });
}

TEST(CommFailure, SizeMismatchIsAnIoErrorAndLeavesTheCommunicatorUnusable) {
  if (!harness_is_threads() || testing::harness_config().ranks < 2) GTEST_SKIP() << "needs >= 2 thread-ranks";
  for_each_rank([&](Communicator& comm, uint64_t) {
    if (comm.rank() > 1) return;
    Tensor small = Tensor::zeros({3}, DType::f32), big = Tensor::zeros({4}, DType::f32);
    Work w = comm.rank() == 0 ? comm.send(big, 1) : comm.recv(small, 0);
    try {
      w.wait();
      SY_THROW(Error, "no error for a size mismatch");
    } catch (const IoError& e) {
      EXPECT_NE(std::string(e.what()).find("size mismatch"), std::string::npos) << e.what();
    }
    EXPECT_THROW(comm.barrier(), IoError);  // refused at once, naming the earlier failure
  });
}

// Run alone by the harness self-check (CTest comm_mpi_abort_on_failure): the last
// rank fails an assertion while the others wait in a collective; the job must
// end non-zero with the message instead of hanging.
TEST(HarnessSelfCheck, DeliberateFailureOnOneRank) {
  if (!std::getenv("SWITCHYARD_TEST_DELIBERATE_FAILURE")) GTEST_SKIP() << "only for the harness self-check";
  for_each_rank([&](Communicator& comm, uint64_t) {
    if (comm.rank() == comm.size() - 1) {
      ADD_FAILURE() << "deliberate failure on the last rank";
      return;
    }
    comm.barrier().wait();
  }, Milliseconds(60000));
}

// Run alone by CTest comm_mpi_timeout_aborts_with_reason: the last rank is late
// past rank 0's op timeout; under MPI the job must end within the timeout with
// the reason (a pending MPI op cannot be cancelled), not hang.
TEST(HarnessSelfCheck, PeerLatePastTheTimeout) {
  if (!std::getenv("SWITCHYARD_TEST_PEER_LATE")) GTEST_SKIP() << "only for the harness self-check";
  for_each_rank([&](Communicator& comm, uint64_t) {
    if (comm.rank() == comm.size() - 1) std::this_thread::sleep_for(std::chrono::seconds(30));
    Tensor t = Tensor::zeros({16}, DType::f32);
    comm.allreduce(t, t).wait();
  }, Milliseconds(1000));
}

// Run alone by CTest comm_ucx_heartbeat_finds_a_stopped_rank: the last rank
// stops itself (SIGSTOP: alive to the launcher, silent to its peers); the
// others, in an allreduce with a 15 s timeout, must fail within a few seconds
// naming it (the UCX heartbeat), and the launcher then ends the job. With 3
// ranks, rank 1 watches rank 2 and rank 0 learns of it only through what
// rank 1 published: CTest requires rank 0's line.
TEST(HarnessSelfCheck, StoppedPeerIsFoundByTheHeartbeat) {
  if (!std::getenv("SWITCHYARD_TEST_PEER_STOPS")) GTEST_SKIP() << "only for the harness self-check";
  for_each_rank([&](Communicator& comm, uint64_t) {
    comm.barrier().wait();
    if (comm.rank() == comm.size() - 1) ::raise(SIGSTOP);
    const auto start = std::chrono::steady_clock::now();
    Tensor t = Tensor::zeros({16}, DType::f32);
    try {
      comm.allreduce(t, t).wait();
      ADD_FAILURE() << "the allreduce completed without the stopped rank";
    } catch (const std::exception& e) {
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      // Rank 0 reports first: a reported failure ends the job, and rank 0's line is the one that proves the news spread.
      if (comm.rank() != 0) std::this_thread::sleep_for(std::chrono::seconds(2));
      ADD_FAILURE() << "rank " << comm.rank() << " gave up after " << s << " s: " << e.what();  // the expected end
      EXPECT_LT(s, 5.0) << "found after the heartbeat's 2 s, not at the op timeout";
    }
  }, Milliseconds(15000));
}

}  // namespace
}  // namespace switchyard
