// Rank discovery from launcher variables, backend choice, and DeviceMesh groups
// on thread-ranks and on the fake backend at 1,024 ranks.
#include <gtest/gtest.h>

#include <map>

#include "comm/backends/fake/fake_backend.h"
#include "comm/backends/threads/threads_backend.h"
#include "parallel/mesh.h"
#include "core/config.h"
#include "parallel/runtime.h"

namespace switchyard {
namespace {

EnvLookup lookup_in(const std::map<std::string, std::string>& vars) {
  return [vars](const std::string& n) -> std::optional<std::string> {
    auto it = vars.find(n);
    return it == vars.end() ? std::nullopt : std::optional(it->second);
  };
}

TEST(Discovery, EachLauncherInOrderAndOverridesWin) {
  EXPECT_FALSE(discover_rank(lookup_in({})).has_value());
  auto ompi = discover_rank(lookup_in({{"OMPI_COMM_WORLD_RANK", "5"}, {"OMPI_COMM_WORLD_SIZE", "8"},
                                       {"OMPI_COMM_WORLD_LOCAL_RANK", "1"}, {"OMPI_COMM_WORLD_LOCAL_SIZE", "4"}}));
  ASSERT_TRUE(ompi);
  EXPECT_EQ(ompi->launcher, "open-mpi");
  EXPECT_EQ(ompi->rank, 5);
  EXPECT_EQ(ompi->local_rank, 1);
  EXPECT_EQ(ompi->local_size, 4);
  // torchrun comes first when both are present.
  auto both = discover_rank(lookup_in({{"RANK", "2"}, {"WORLD_SIZE", "4"}, {"OMPI_COMM_WORLD_RANK", "0"},
                                       {"OMPI_COMM_WORLD_SIZE", "4"}}));
  EXPECT_EQ(both->launcher, "torchrun");
  EXPECT_EQ(both->rank, 2);
  auto pmi = discover_rank(lookup_in({{"PMI_RANK", "3"}, {"PMI_SIZE", "6"}, {"MPI_LOCALNRANKS", "3"},
                                      {"MPI_LOCALRANKID", "0"}}));
  EXPECT_EQ(pmi->launcher, "pmi");
  EXPECT_EQ(pmi->local_size, 3);
  auto slurm = discover_rank(lookup_in({{"SLURM_PROCID", "7"}, {"SLURM_NTASKS", "12"}, {"SLURM_LOCALID", "3"},
                                        {"SLURM_TASKS_PER_NODE", "4(x3)"}}));
  EXPECT_EQ(slurm->launcher, "slurm");
  EXPECT_EQ(slurm->local_size, 4);
  auto overridden = discover_rank(lookup_in({{"OMPI_COMM_WORLD_RANK", "5"}, {"OMPI_COMM_WORLD_SIZE", "8"},
                                             {"SWITCHYARD_LOCAL_SIZE", "2"}}));
  EXPECT_EQ(overridden->local_size, 2);
  EXPECT_EQ(overridden->local_rank, 1);
  EXPECT_NE(overridden->source.find("SWITCHYARD_LOCAL_SIZE"), std::string::npos);
}

TEST(Discovery, InconsistentValuesNameTheirVariables) {
  try {
    discover_rank(lookup_in({{"RANK", "4"}, {"WORLD_SIZE", "4"}}));
    FAIL();
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("rank 4 is not below the world size 4 (from RANK/WORLD_SIZE"),
              std::string::npos) << e.what();
  }
  EXPECT_THROW(discover_rank(lookup_in({{"PMI_RANK", "x"}, {"PMI_SIZE", "2"}})), ConfigError);
}

TEST(Discovery, BackendChoiceFollowsTheLauncher) {
  EXPECT_EQ(choose_backend("", lookup_in({})).backend, "threads");
  EXPECT_EQ(choose_backend("", lookup_in({{"OMPI_COMM_WORLD_RANK", "0"}, {"OMPI_COMM_WORLD_SIZE", "2"}})).backend,
            "mpi");
  EXPECT_EQ(choose_backend("", lookup_in({{"RANK", "0"}, {"WORLD_SIZE", "2"}})).backend,
            SWITCHYARD_HAS_UCX ? "ucx" : "tcp");
  EXPECT_EQ(choose_backend("fake", lookup_in({{"RANK", "0"}, {"WORLD_SIZE", "2"}})).backend, "fake");
  EXPECT_EQ(choose_backend("", lookup_in({{"SWITCHYARD_BACKEND", "mpi"}})).backend, "mpi");
}

TEST(Mesh, GroupsOnThreadRanksReduceOverTheRightRanks) {
  run_thread_ranks(6, [](Communicator& world) {
    std::shared_ptr<Communicator> w(&world, [](Communicator*) {});
    DeviceMesh mesh(w, {{"dp", 2}, {"ep", 3}}, {{"attention", {0, 1}}, {"ffn", {2, 3, 4, 5}}});
    const int me = world.rank();
    EXPECT_EQ(mesh.coord("dp"), me / 3);
    EXPECT_EQ(mesh.coord("ep"), me % 3);
    EXPECT_EQ(mesh.group("ep").size(), 3);
    EXPECT_EQ(mesh.group("ep").rank(), me % 3);
    EXPECT_EQ(mesh.group("dp").rank(), me / 3);
    for (const char* dim : {"dp", "ep"}) {
      Tensor v = Tensor::empty({1}, DType::i32);
      v.data_as<int32_t>()[0] = me;
      mesh.group(dim).allreduce(v, v).wait();
      int want = 0;
      for (int r = 0; r < 6; ++r)
        if ((std::string(dim) == "dp" && r % 3 == me % 3) || (std::string(dim) == "ep" && r / 3 == me / 3)) want += r;
      if (v.data_as<int32_t>()[0] != want) SY_THROW(Error, dim, " group sum ", v.data_as<int32_t>()[0], " != ", want);
    }
    EXPECT_EQ(mesh.role(), me < 2 ? "attention" : "ffn");
    Tensor one = Tensor::empty({1}, DType::i32);
    one.data_as<int32_t>()[0] = 1;
    mesh.role_group()->allreduce(one, one).wait();
    EXPECT_EQ(one.data_as<int32_t>()[0], me < 2 ? 2 : 4);
  });
}

TEST(Mesh, FakeBackendAtThousandsOfRanksAndBadShapes) {
  auto world = make_fake_communicator(1234, 2048);
  DeviceMesh mesh(world, {{"dp", 8}, {"ep", 32}, {"tp", 8}});
  EXPECT_EQ(mesh.coord("dp"), 1234 / 256);
  EXPECT_EQ(mesh.coord("ep"), (1234 / 8) % 32);
  EXPECT_EQ(mesh.coord("tp"), 1234 % 8);
  EXPECT_EQ(mesh.group("ep").size(), 32);
  EXPECT_EQ(mesh.group("ep").rank(), (1234 / 8) % 32);
  try {
    DeviceMesh bad(world, {{"dp", 3}, {"ep", 5}});
    FAIL();
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("mesh dp=3 x ep=5 has 15 ranks but the world has 2048"), std::string::npos);
  }
  EXPECT_THROW(mesh.group("pp"), InvalidArgument);
}

TEST(Runtime, RunRanksOnThreadsGroupsNodesByLocalSize) {
  RuntimeOptions opts;
  opts.backend = "threads";
  opts.ranks = 4;
  opts.local_size = 2;  // one machine acting as two nodes
  run_ranks(opts, [](Runtime& rt) {
    EXPECT_EQ(rt.nodes(), 2);
    EXPECT_EQ(rt.node(), rt.world().rank() / 2);
    EXPECT_EQ(rt.node_group().size(), 2);
    EXPECT_EQ(rt.info().local_rank, rt.world().rank() % 2);
  });
}

TEST(Runtime, NodeGroupsFollowAnyPlacementAndHostNames) {
  run_thread_ranks(4, [](Communicator& world) {
    std::shared_ptr<Communicator> w(&world, [](Communicator*) {});
    const int me = world.rank();
    // Round-robin placement (mpirun --map-by node): ranks 0 and 2 share node 0.
    Runtime rt(w, RankInfo{me, 4, 0, 2, "test", "test"}, {0, 1, 0, 1});
    EXPECT_EQ(rt.node(), me % 2);
    EXPECT_EQ(rt.nodes(), 2);
    EXPECT_EQ(rt.info().local_rank, me / 2);
    Tensor v = Tensor::empty({1}, DType::i32);
    v.data_as<int32_t>()[0] = me;
    rt.node_group().allreduce(v, v).wait();
    if (v.data_as<int32_t>()[0] != (me % 2 == 0 ? 0 + 2 : 1 + 3))
      SY_THROW(Error, "node group of rank ", me, " summed to ", v.data_as<int32_t>()[0]);
    // All thread-ranks run on this host: one node.
    EXPECT_EQ(nodes_from_host_names(world), (std::vector<int>{0, 0, 0, 0}));
  });
}

}  // namespace
}  // namespace switchyard
