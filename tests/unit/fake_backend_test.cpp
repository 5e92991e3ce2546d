// The fake backend at 1,024+ ranks: validation, groups and traffic accounting
// without any data moving.
#include <gtest/gtest.h>

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
  EXPECT_EQ(static_cast<uint8_t*>(out.data())[0], 0x5a);  // untouched
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
