// The fake backend at 1,024+ ranks: validation, groups and traffic accounting
// without any data travelling; outputs as from a world of copies of this rank.
#include <gtest/gtest.h>

#include <cstring>

#include "comm/backends/fake/fake_backend.h"

namespace switchyard {
namespace {

TEST(FakeBackend, ThousandsOfRanksCountLogicalTrafficAndMoveNothing) {
  const int world = 2048, me = 1500;
  auto comm = make_fake_communicator(me, world);
  EXPECT_EQ(comm->backend_name(), "fake");
  std::vector<int64_t> counts(world, 2);
  counts[7] = 0;
  Tensor in = Tensor::zeros({2 * world - 2}, DType::f32);
  Tensor out = Tensor::empty({2 * world - 2}, DType::f32);
  std::memset(out.data(), 0x5a, out.nbytes());
  comm->alltoallv(in, counts, out, counts).wait();
  EXPECT_EQ(out.data_as<float>()[0], 0.0f);  // filled, never left as it was (a dropless exchange reads it)
  const CommStats s = comm->stats();
  EXPECT_EQ(s.sent_to[7], 0u);
  EXPECT_EQ(s.sent_to[8], 8u);
  EXPECT_EQ(s.sent_to[me], 0u);
  EXPECT_EQ(s.total_sent(), 8u * (world - 2));
  EXPECT_EQ(s.ops.at("alltoallv").calls, 1u);
  // Every collective records the traffic a direct exchange would have.
  comm->reset_stats();
  Tensor block = Tensor::zeros({3}, DType::f64), all = Tensor::empty({3 * world}, DType::f64);
  comm->allgather(block, all).wait();
  EXPECT_EQ(comm->stats().sent_to[0], 24u);
  EXPECT_EQ(comm->stats().total_received(), 24u * (world - 1));
  comm->reset_stats();
  comm->broadcast(block, me).wait();
  EXPECT_EQ(comm->stats().total_sent(), 24u * (world - 1));
  comm->reset_stats();
  Tensor big = Tensor::zeros({world}, DType::f32);
  comm->allreduce(big, big).wait();
  EXPECT_EQ(comm->stats().sent_to[1], 8u);  // 2 * 4 * world / world
    // Validation is as strict as on a real backend.
  EXPECT_THROW(comm->alltoallv(in, counts, out, std::vector<int64_t>(world, 1)), InvalidArgument);
}

// Outputs as if every rank were this one. Before, they were left uninitialised: a dropless
// exchange read garbage counts and tried to allocate 8e16 bytes.
TEST(FakeBackend, OutputsAreThoseOfAWorldOfCopiesOfThisRank) {
  const int world = 5, me = 3;
  auto comm = make_fake_communicator(me, world);
  Tensor counts = Tensor::empty({world}, DType::i64), got = Tensor::empty({world}, DType::i64);
  for (int p = 0; p < world; ++p) counts.data_as<int64_t>()[p] = 10 + p;  // rows this rank sends to p
  std::memset(got.data(), 0xff, got.nbytes());
  comm->alltoall(counts, got).wait();
  for (int p = 0; p < world; ++p) EXPECT_EQ(got.data_as<int64_t>()[p], 10 + me) << "from " << p;
  Tensor x = Tensor::empty({3}, DType::f32);
  for (int i = 0; i < 3; ++i) x.data_as<float>()[i] = 1.5f * i;
  Tensor sum = Tensor::empty({3}, DType::f32), max = Tensor::empty({3}, DType::f32);
  comm->allreduce(x, sum).wait();
  comm->allreduce(x, max, {.op = ReduceOp::max}).wait();
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(sum.data_as<float>()[i], world * 1.5f * i);
    EXPECT_EQ(max.data_as<float>()[i], 1.5f * i);
  }
  Tensor all = Tensor::empty({3 * world}, DType::f32);
  comm->allgather(x, all).wait();
  for (int i = 0; i < 3 * world; ++i) EXPECT_EQ(all.data_as<float>()[i], 1.5f * (i % 3));
  // alltoallv with other receive counts: this rank's self-block, cut or zero-padded to each.
  Tensor in = Tensor::empty({world * 2}, DType::f32), out = Tensor::empty({world * 3}, DType::f32);
  for (int i = 0; i < world * 2; ++i) in.data_as<float>()[i] = static_cast<float>(i);
  comm->alltoallv(in, std::vector<int64_t>(world, 2), out, std::vector<int64_t>(world, 3)).wait();
  for (int p = 0; p < world; ++p) {
    EXPECT_EQ(out.data_as<float>()[3 * p], 2.0f * me);
    EXPECT_EQ(out.data_as<float>()[3 * p + 1], 2.0f * me + 1);
    EXPECT_EQ(out.data_as<float>()[3 * p + 2], 0.0f);
  }
}

TEST(FakeBackend, GroupsFromMemberListsAndSplitIsRefusedClearly) {
  auto comm = make_fake_communicator(37, 1024);
  std::vector<int> column;
  for (int r = 37 % 8; r < 1024; r += 8) column.push_back(r);
  auto group = comm->create_group(column, "ep");
  EXPECT_EQ(group->size(), 128);
  EXPECT_EQ(group->rank(), 37 / 8);
  EXPECT_EQ(group->name(), "world/ep");
  try {
    comm->split(0, 0);
    FAIL();
  } catch (const NotSupported& e) {
    EXPECT_NE(std::string(e.what()).find("backend fake does not support split"), std::string::npos);
  }
  EXPECT_THROW(comm->create_group({1, 2, 3}), InvalidArgument);  // caller not a member
}

}  // namespace
}  // namespace switchyard
